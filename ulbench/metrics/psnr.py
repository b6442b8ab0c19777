"""PSNR as protocols.md fixes it: uint8 images, data range 255, MSE and PSNR per image, then mean and std.

This is the SD-VAE/LDM convention. Float inputs are refused rather than guessed at: computing PSNR on [-1, 1]
data with data range 1 inflates every value by 20*log10(2) = 6.02 dB, a mistake this module makes impossible.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ulbench.errors import UserError
from ulbench.metrics.images import _decode, list_images, load_npz_images

DATA_RANGE = 255.0


def psnr_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 pairs -> (N,) PSNR in dB (inf where a pair is identical)."""
    for name, x in (("first", a), ("second", b)):
        if x.dtype != np.uint8:
            raise UserError(
                f"PSNR: the {name} input is {x.dtype}, expected uint8. PSNR is measured on uint8-quantized images "
                "with data range 255 (protocols.md); quantize floats first (ulbench.metrics.images.quantize_images)."
            )
    if a.shape != b.shape:
        raise UserError(f"PSNR: inputs differ in shape: {a.shape} vs {b.shape}")
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = (diff.reshape(len(diff), -1) ** 2).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(DATA_RANGE**2 / mse)


def summarize(values: np.ndarray) -> dict:
    return {"psnr_mean": float(np.mean(values)), "psnr_std": float(np.std(values)), "n": int(len(values))}


def _load_set(spec: str | os.PathLike) -> tuple[list[str], list[np.ndarray]]:
    path = Path(spec)
    if path.is_dir():
        files = list_images(path)
        return [str(p) for p in files], [_decode(p) for p in files]
    if path.suffix == ".npz" and path.is_file():
        arr = load_npz_images(path)
        return [f"{path}[{i}]" for i in range(len(arr))], list(arr)
    raise UserError(f"'{spec}': not an image folder or .npz (arr_0 uint8 NHWC)")


def psnr_paired(spec_a: str | os.PathLike, spec_b: str | os.PathLike) -> dict:
    """PSNR between two folders (paired by sorted file name) or two .npz image arrays (paired by index)."""
    names_a, imgs_a = _load_set(spec_a)
    names_b, imgs_b = _load_set(spec_b)
    if len(imgs_a) != len(imgs_b):
        raise UserError(f"PSNR pairs images by sorted name: {spec_a} has {len(imgs_a)} images, {spec_b} has "
                        f"{len(imgs_b)}; give two sets of the same size.")
    values = np.empty(len(imgs_a))
    for i, (x, y) in enumerate(zip(imgs_a, imgs_b)):
        if x.shape != y.shape:
            raise UserError(f"PSNR: {names_a[i]} is {x.shape[1]}x{x.shape[0]} but its pair {names_b[i]} is "
                            f"{y.shape[1]}x{y.shape[0]}")
        values[i] = psnr_per_image(x[None], y[None])[0]
    return summarize(values)
