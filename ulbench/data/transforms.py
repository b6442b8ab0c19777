"""Decoding any image file to 8-bit RGB, and the crop transforms of ``ulbench data prepare``.

``decode_rgb`` follows ADM's ``Image.open(f).convert("RGB")`` (alpha dropped, palettes and CMYK converted by
PIL) except for 16-bit images, which are scaled to 8 bits (v8 = round(v16 / 257)) instead of clipped or truncated.
The transforms are the three of EDM2's ``dataset_tool.py convert --transform``, square output R x R:
``center-crop-dhariwal`` (ADM's ``center_crop_arr``, the ImageNet protocol of DiT, ADM, EDM2, MAR, REPA),
``center-crop`` and ``center-crop-wide``.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

DEFAULT_TRANSFORM = "center-crop-dhariwal"
TRANSFORMS = ("center-crop-dhariwal", "center-crop", "center-crop-wide")
UINT16_PER_UINT8 = 257  # 65535 / 255: v16 = v8 * 257 maps 8-bit values onto the 16-bit range exactly
UINT8_MAX = 255
UINT16_MAX = 65535
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
GRAY16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
# Pillow opens 16-bit colour PNGs keeping only each sample's high byte (rawmode "...;16B" -> 8-bit mode). Decoding
# the same stream a second time with these rawmodes (same bits per pixel, so the same PNG unfiltering) recovers
# the low bytes; 16-bit gray+alpha has no ";16L" unpacker, but "RGBA" (also 32 bits) returns its 4 raw bytes.
PNG16_LOW_BYTE_RAWMODE = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
PNG16_GRAY_ALPHA_RAWMODE = "LA;16B"
PNG16_GRAY_ALPHA_RAW_BYTES = "RGBA"
PNG16_MODE_NAMES = {"RGB;16B": "RGB;16", "RGBA;16B": "RGBA;16", "LA;16B": "LA;16"}  # DecodeInfo.mode


class UnreadableImage(Exception):
    """A file PIL cannot decode (truncated, not an image, unsupported): ``name`` and ``reason``."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@dataclass(frozen=True)
class DecodeInfo:
    mode: str  # the PIL mode the file opened as ("RGB", "P", "I;16", ...; "RGB;16", "RGBA;16", "LA;16": 16-bit PNGs)
    size: tuple[int, int]  # (width, height), PIL's order
    had_alpha: bool  # an alpha channel or a transparency key, dropped as ADM's convert("RGB") drops it
    frames: int = 1  # frames of an animation (GIF, APNG, WebP): only the first is decoded, as PIL's convert does
    format: str | None = None  # what PIL found in the bytes ("PNG", "JPEG", ...), whatever the file's extension


def _open(data: bytes | str | os.PathLike) -> Image.Image:
    return Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)


def _scale16(v: np.ndarray) -> np.ndarray:
    """16-bit samples -> 8-bit, v8 = round(v16 / 257) (no ties: 257 is odd), clipped to [0, 65535] first."""
    v = np.clip(v.astype(np.int64), 0, UINT16_MAX)
    return ((v + UINT16_PER_UINT8 // 2) // UINT16_PER_UINT8).astype(np.uint8)


def _reopen_with_rawmode(data, rawmode: str) -> np.ndarray:
    with _open(data) as im:
        im.tile = [im.tile[0]._replace(args=rawmode)]
        return np.asarray(im)


def _png16_colour(im: Image.Image, data, rawmode: str) -> np.ndarray:
    """A 16-bit RGB, RGBA or gray+alpha PNG as 8-bit RGB, scaled from the full 16-bit samples."""
    if rawmode == PNG16_GRAY_ALPHA_RAWMODE:
        raw = _reopen_with_rawmode(data, PNG16_GRAY_ALPHA_RAW_BYTES).astype(np.uint16)  # gray hi, lo, alpha hi, lo
        gray = _scale16(raw[..., 0] * 256 + raw[..., 1])
        return np.repeat(gray[..., None], 3, axis=-1)
    hi = np.asarray(im).astype(np.uint16)[..., :3]
    lo = _reopen_with_rawmode(data, PNG16_LOW_BYTE_RAWMODE[rawmode]).astype(np.uint16)[..., :3]
    return _scale16(hi * 256 + lo)


def _png16_rawmode(im: Image.Image) -> str | None:
    if im.format != "PNG" or len(im.tile) != 1 or not isinstance(im.tile[0].args, str):
        return None
    rawmode = im.tile[0].args
    return rawmode if rawmode in PNG16_MODE_NAMES else None


def _to_rgb8(im: Image.Image, data) -> tuple[np.ndarray, str]:
    rawmode = _png16_rawmode(im)  # read before load(): load() clears the tile list
    im.load()
    if rawmode is not None:
        return _png16_colour(im, data, rawmode), PNG16_MODE_NAMES[rawmode]
    if im.mode in GRAY16_MODES:
        gray = _scale16(np.asarray(im))
        return np.repeat(gray[..., None], 3, axis=-1), im.mode
    return np.asarray(im.convert("RGB")), im.mode  # ADM: pil_image.convert("RGB")


def decode_rgb(data: bytes | str | os.PathLike, name: str = "image") -> tuple[np.ndarray, DecodeInfo]:
    """File bytes (or a path) -> (H, W, 3) uint8 RGB and what the file was; ``UnreadableImage`` if PIL cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's palette-transparency and large-image notes
            with _open(data) as im:
                had_alpha = im.mode in ALPHA_MODES or "transparency" in im.info
                frames = im.n_frames if getattr(im, "is_animated", False) else 1
                fmt = im.format
                rgb, mode = _to_rgb8(im, data)
    except MemoryError:
        raise
    except Image.UnidentifiedImageError:
        raise UnreadableImage(name, "not an image file PIL can identify") from None
    except Exception as e:  # PIL signals corrupt files with OSError, SyntaxError, ValueError, zlib.error, ...
        raise UnreadableImage(name, f"{type(e).__name__}: {e}") from None
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise UnreadableImage(name, f"decoded to {rgb.dtype} {rgb.shape}, not 8-bit RGB")
    return np.ascontiguousarray(rgb), DecodeInfo(mode=mode, size=(rgb.shape[1], rgb.shape[0]), had_alpha=had_alpha,
                                                 frames=frames, format=fmt)


# ADM center_crop_arr (guided-diffusion image_datasets.py), as EDM2's center_crop_imagenet.
def center_crop_dhariwal(rgb: np.ndarray, R: int) -> np.ndarray:
    img = Image.fromarray(rgb)
    while min(*img.size) >= 2 * R:  # halve with BOX while the short side is >= 2R
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = R / min(*img.size)  # then one BICUBIC resize: short side -> R, sizes rounded (also upscales)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - R) // 2, (arr.shape[1] - R) // 2
    return arr[y: y + R, x: x + R]


# EDM2 dataset_tool.py center_crop: the centered square of side min(h, w), LANCZOS to R x R.
def center_crop(rgb: np.ndarray, R: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    c = min(h, w)
    square = rgb[(h - c) // 2: (h + c) // 2, (w - c) // 2: (w + c) // 2]
    return np.asarray(Image.fromarray(square).resize((R, R), Image.Resampling.LANCZOS))


# EDM2 dataset_tool.py center_crop_wide with a square R x R output (EDM2 compares the output-scale height
# ch = round(R h / w) with R, then crops ch *source* rows; we keep that). None: too small, the file is skipped.
def center_crop_wide(rgb: np.ndarray, R: int) -> np.ndarray | None:
    h, w = rgb.shape[:2]
    ch = round(R * h / w)
    if w < R or ch < R:
        return None
    band = rgb[(h - ch) // 2: (h + ch) // 2]
    return np.asarray(Image.fromarray(band).resize((R, R), Image.Resampling.LANCZOS))


_TRANSFORM_FNS = {"center-crop-dhariwal": center_crop_dhariwal, "center-crop": center_crop,
                  "center-crop-wide": center_crop_wide}


def apply_transform(name: str, rgb: np.ndarray, R: int) -> np.ndarray | None:
    """(H, W, 3) uint8 -> (R, R, 3) uint8 by transform ``name``; None means skip this image (too small)."""
    if name not in _TRANSFORM_FNS:
        raise ValueError(f"unknown transform {name!r}; one of {', '.join(TRANSFORMS)}")
    out = _TRANSFORM_FNS[name](rgb, R)
    return None if out is None else np.ascontiguousarray(out)
