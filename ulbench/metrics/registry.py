"""The metrics a suite can ask for: what each needs and which direction is better (lm-evaluation-harness style)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    name: str
    higher_is_better: bool | None  # None: two-sided, neither direction is "better" on its own (a rate)
    needs: str  # "samples" (generated images) or "reconstructions" (dataset images through the autoencoder)
    description: str
    data: str = "both"  # "image", "video" or "both": the datasets it is defined on
    conditional: bool = False  # defined on class-conditional datasets only
    opt_in: bool = False  # only where a suite lists it (a file the user supplies, or a costly network): not a default


METRICS: dict[str, MetricInfo] = {m.name: m for m in (
    MetricInfo("fid", False, "samples", "Frechet Inception Distance of generated samples vs the reference", "image"),
    MetricInfo("kid", False, "samples", "Kernel Inception Distance (unbiased at small N) of samples vs the reference",
               "image"),
    MetricInfo("class_acc", True, "samples", "class-conditional: fraction of samples whose nearest class centroid "
               "(Inception pool features of the reference images of each class) is the class they were drawn for",
               "image", conditional=True),
    MetricInfo("rfid", False, "reconstructions", "FID of autoencoder reconstructions vs their originals", "image"),
    MetricInfo("psnr", True, "reconstructions", "PSNR (uint8, range 255) of reconstructions vs originals, in dB "
               "(clips: per frame, then the mean)"),
    MetricInfo("bits_per_pixel", None, "reconstructions", "latent rate: the prior's L_z in bits per pixel"),
    MetricInfo("fvd", False, "samples", "frame prediction: FVD (I3D) of the given + predicted frames as whole clips "
               "vs the real clips", "video"),
    MetricInfo("pred_psnr", True, "samples", "frame prediction: PSNR of the predicted frames vs the real ones, per "
               "frame (uint8, range 255), then the mean", "video"),
    MetricInfo("rfvd", False, "reconstructions", "FVD of autoencoder reconstructions vs their original clips", "video"),
    MetricInfo("bits_per_frame", None, "reconstructions", "latent rate: the prior's L_z in bits per frame", "video"),
    MetricInfo("fd_dinov2", False, "samples", "Frechet distance of samples vs the reference in DINOv2 ViT-L/14 "
               "feature space (EDM2's fd_dinov2); needs evaluation.dinov2_weights", "image", opt_in=True),
    # opt-in: as a default it would add the LPIPS network (cost, weights) to every suite that names no metrics
    MetricInfo("rlpips", False, "reconstructions", "LPIPS v0.1 (VGG) of reconstructions vs their originals, per "
               "image, then the mean", "image", opt_in=True),
    MetricInfo("precision", True, "samples", "improved precision (Kynkaanniemi et al. 2019, k=3 as ADM): fraction of "
               "samples inside the reference images' k-NN balls in FID's Inception features", "image", opt_in=True),
    MetricInfo("recall", True, "samples", "improved recall (k=3): fraction of reference images inside the samples' "
               "k-NN balls in FID's Inception features", "image", opt_in=True),
)}


def needs_of(metrics) -> set[str]:
    """What a suite's metrics need made: a subset of {"samples", "reconstructions"}."""
    return {METRICS[m].needs for m in metrics}


def needing(what: str) -> set[str]:
    """The metrics that need ``what`` ("samples" or "reconstructions")."""
    return {m for m, info in METRICS.items() if info.needs == what}


def metrics_for(video: bool, conditional: bool = False, opt_in: bool = False) -> list[str]:
    """The metrics defined on image (or video), unconditional (or class-conditional) datasets, in registry order: a
    suite's default list; ``opt_in=True``: with those a suite must list itself (all it may list)."""
    return [m.name for m in METRICS.values() if m.data in ("both", "video" if video else "image")
            and (conditional or not m.conditional) and (opt_in or not m.opt_in)]
