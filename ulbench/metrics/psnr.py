"""PSNR as protocols.md fixes it: uint8 images, data range 255, MSE and PSNR per image, then mean and std.

This is the SD-VAE/LDM convention. Float inputs are refused rather than guessed at: computing PSNR on [-1, 1]
data with data range 1 inflates every value by 20*log10(2) = 6.02 dB, a mistake this module makes impossible.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ulbench.errors import UserError
from ulbench.metrics.images import DecodeNotes, _decode, display_path, list_images, load_npz_images

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


NAMES_SHOWN = 5  # unpaired names listed in an error


def _keyed_images(folder: Path, metric: str) -> dict[str, Path]:
    """Image files of ``folder`` by pairing key: the relative path without its extension ('class/0001'), so that
    originals saved as JPEG pair with reconstructions saved as PNG. Two files with one key are an error."""
    by_key: dict[str, Path] = {}
    for p in list_images(folder):
        key = p.relative_to(folder).with_suffix("").as_posix()
        if key in by_key:
            raise UserError(f"{metric} pairs images by file name without extension: {display_path(by_key[key])} and "
                            f"{display_path(p)} have the same name; keep one of them.")
        by_key[key] = p
    return by_key


def _pair_folders(spec_a: Path, spec_b: Path, metric: str) -> list[tuple[str, Path, Path]]:
    a, b = _keyed_images(spec_a, metric), _keyed_images(spec_b, metric)
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    if only_a or only_b:
        def listed(keys: list[str]) -> str:
            more = f" and {len(keys) - NAMES_SHOWN} more" if len(keys) > NAMES_SHOWN else ""
            return ", ".join(display_path(k) for k in keys[:NAMES_SHOWN]) + more

        parts = [f"only in {display_path(d)}: {listed(keys)}" for d, keys in ((spec_a, only_a), (spec_b, only_b))
                 if keys]
        raise UserError(f"{metric} pairs images by file name (relative path, extension ignored): "
                        f"{display_path(spec_a)} has {len(a)} images, {display_path(spec_b)} has {len(b)}, and their "
                        f"names differ ({'; '.join(parts)}). Give two folders whose images have the same names.")
    return [(k, a[k], b[k]) for k in sorted(a)]


def paired_images(spec_a: str | os.PathLike, spec_b: str | os.PathLike,
                  metric: str = "PSNR") -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, uint8 HWC image of a, of b) for each pair: two folders, images paired by file name (relative path
    without extension), or two .npz image arrays, paired by index (arrays have no names); a folder and an array are
    not paired. All names are checked before any image is decoded; pairs of different sizes are an error."""
    path_a, path_b = Path(spec_a), Path(spec_b)
    kinds = ["folder" if p.is_dir() else "npz" if p.suffix == ".npz" and p.is_file() else None
             for p in (path_a, path_b)]
    for p, kind in zip((path_a, path_b), kinds):
        if kind is None:
            raise UserError(f"'{display_path(p)}': not an image folder or .npz (arr_0 uint8 NHWC)")
    if kinds[0] != kinds[1]:
        raise UserError(f"{metric} pairs a folder's images by file name and an .npz's by index; "
                        f"{display_path(path_a)} is a {kinds[0]} and {display_path(path_b)} a {kinds[1]}. Give two "
                        "folders or two .npz files.")
    pairs = _npz_pairs(path_a, path_b, metric) if kinds[0] == "npz" else _folder_pairs(path_a, path_b, metric)
    for key, x, y in pairs:  # one pair in memory at a time
        if x.shape != y.shape:
            raise UserError(f"{metric}: {key} is {x.shape[1]}x{x.shape[0]} in {display_path(path_a)} but "
                            f"{y.shape[1]}x{y.shape[0]} in {display_path(path_b)}; pairs must have the same size")
        yield key, x, y


def psnr_paired(spec_a: str | os.PathLike, spec_b: str | os.PathLike) -> dict:
    """PSNR between two paired image sets (``paired_images``)."""
    return summarize(np.asarray([psnr_per_image(x[None], y[None])[0] for _, x, y in paired_images(spec_a, spec_b)]))


def _npz_pairs(path_a: Path, path_b: Path, metric: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    imgs_a, imgs_b = load_npz_images(path_a), load_npz_images(path_b)
    if len(imgs_a) != len(imgs_b):
        raise UserError(f"{metric} pairs .npz images by index: {display_path(path_a)} has {len(imgs_a)} images, "
                        f"{display_path(path_b)} has {len(imgs_b)}; give two arrays of the same length.")
    return ((f"image {i}", x, y) for i, (x, y) in enumerate(zip(imgs_a, imgs_b)))


def _folder_pairs(path_a: Path, path_b: Path, metric: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    notes = DecodeNotes(f"{display_path(path_a)} and {display_path(path_b)}")
    pairs = _pair_folders(path_a, path_b, metric)  # names checked before any image is decoded
    return ((display_path(k), _decode(pa, notes), _decode(pb, notes)) for k, pa, pb in pairs)
