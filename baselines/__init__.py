"""Baseline models the harness trains beside UL: the SD-style KL-VAE, DiT and EDM2 (see shared/design/baselines.md).

Like ``ul_model``, this package knows nothing of suites or reports; ``ulbench/methods/`` adapts it to the harness.
"""
