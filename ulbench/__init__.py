"""ulbench: evaluation and benchmarking harness for latent diffusion."""

__version__ = "0.1.0"
