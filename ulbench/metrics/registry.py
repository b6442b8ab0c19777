"""The metrics a suite can ask for: what each needs and which direction is better (lm-evaluation-harness style)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    name: str
    higher_is_better: bool | None  # None: two-sided, neither direction is "better" on its own (a rate)
    needs: str  # "samples" (generated images) or "reconstructions" (dataset images through the autoencoder)
    description: str


METRICS: dict[str, MetricInfo] = {m.name: m for m in (
    MetricInfo("fid", False, "samples", "Frechet Inception Distance of generated samples vs the reference"),
    MetricInfo("kid", False, "samples", "Kernel Inception Distance (unbiased at small N) of samples vs the reference"),
    MetricInfo("rfid", False, "reconstructions", "FID of autoencoder reconstructions vs their originals"),
    MetricInfo("psnr", True, "reconstructions", "PSNR (uint8, range 255) of reconstructions vs originals, in dB"),
    MetricInfo("bits_per_pixel", None, "reconstructions", "latent rate: the prior's L_z in bits per pixel"),
)}
