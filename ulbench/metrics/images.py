"""Image inputs for FID/KID/PSNR: folders, ADM .npz arrays, tensors, generators and the bundled photos.

Every source yields uint8 RGB images (protocols.md: generated images are quantized like saved PNGs before any
metric). ``ImageSource.batches`` returns lists of (H, W, 3) uint8 arrays so that folders of mixed sizes work;
``prepare_batch`` then applies the resize mode and returns what the Inception extractor takes.
"""
from __future__ import annotations

import hashlib
import numbers
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ulbench.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
RESIZE_MODES = ("legacy", "clean")  # torch-fidelity TF1 bilinear (= pytorch-fid / ADM), clean-fid PIL bicubic
# RGB photos bundled in the scikit-image wheel (no run-time download); CC0 / public domain per skimage's README.
BUNDLED_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
    "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg",
)
PHOTO_CROP_SIZE = 128
PHOTO_CROP_COUNT = 100


def quantize_images(x: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Float images (N, C, H, W) in ``value_range`` -> uint8, rounded and clamped exactly like a saved PNG."""
    lo, hi = value_range
    return ((x.float() - lo) * (255.0 / (hi - lo))).round().clamp(0, 255).to(torch.uint8)


def _as_hwc_list(batch: object, where: str) -> list[np.ndarray]:
    """A batch of uint8 images (torch NCHW or numpy NHWC, or a list of HWC arrays) -> list of (H, W, 3)."""
    if isinstance(batch, torch.Tensor):
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise UserError(
                f"{where}: expected a uint8 tensor (N, 3, H, W), got {batch.dtype} {tuple(batch.shape)}. "
                "Quantize float samples first with ulbench.metrics.images.quantize_images(x, value_range)."
            )
        return [a for a in batch.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy()]
    arr = np.asarray(batch) if not isinstance(batch, list) else None
    if arr is not None and (arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3)):
        raise UserError(f"{where}: expected uint8 arrays (N, H, W, 3), got {arr.dtype} {arr.shape}")
    items = list(arr) if arr is not None else batch
    return [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in items]


@dataclass
class ImageSource:
    """A named, countable stream of uint8 images. ``identity`` is a stable cache key (None: never cached).
    ``batches(batch_size, start, stop)`` streams images ``start`` .. ``stop - 1`` (a rank's share under torchrun);
    a one-pass iterable cannot start anywhere but 0."""

    name: str
    count: int | None
    _batches: object = field(repr=False)  # callable(batch_size, start, stop) -> Iterator[list[np.ndarray]]
    identity: str | None = None
    resolution: tuple[int, int] | None = None  # (H, W) if known and uniform

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[list[np.ndarray]]:
        return self._batches(batch_size, start, self.count if stop is None else stop)


def display_path(path: object) -> str:
    """A path as text that any terminal prints: bytes of a non-UTF-8 file name (surrogate escapes) as ``\\udcff``."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


# File formats each image extension should hold; another one is decoded by its content (as PIL, torch-fidelity and
# clean-fid do) with a warning, since JPEG bytes in a .png mean the samples went through a lossy codec.
EXPECTED_FORMATS = {".png": ("PNG",), ".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO")}


class DecodeNotes:
    """Warns once per input (a folder, a pair of folders) and kind about what decoding to 8-bit RGB changed: an
    alpha channel dropped, the first frame of an animation taken, a format other than the extension says."""

    def __init__(self, where: object):
        self.where, self.seen = display_path(where), set()

    def note(self, path: Path, mode: str, had_alpha: bool, frames: int, fmt: str | None) -> None:
        name = display_path(path)
        if had_alpha:
            # Dropped, not composited: ADM's reference batches, torch-fidelity and clean-fid all convert("RGB"),
            # which drops alpha; compositing onto a background would give pixels the references never saw.
            self._warn("alpha", f"{name} has an alpha channel (mode {mode}): it is dropped (the RGB values are "
                                "used as stored, as torch-fidelity and clean-fid do); save RGB images to silence this")
        if frames > 1:
            self._warn("animated", f"{name} is animated ({frames} frames): only its first frame is used")
        expected = EXPECTED_FORMATS.get(path.suffix.lower())
        if fmt and expected and fmt not in expected:
            self._warn("format", f"{name} holds {fmt} data although its extension is {path.suffix}: it is decoded "
                                 f"as {fmt}" + (" (lossy: the metric sees JPEG artifacts)" if fmt == "JPEG" else ""))

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self.seen:
            self.seen.add(kind)
            warnings.warn(f"{self.where}: {message}. Other files of this input like it are not listed.",
                          stacklevel=3)


def _decode(path: Path, notes: DecodeNotes | None = None) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB: 16-bit images scaled (round(v / 257)), palettes, CMYK, gray expanded,
    alpha dropped (``ulbench.data.transforms.decode_rgb``); a file that cannot be decoded is a ``UserError``."""
    from ulbench.data.transforms import UnreadableImage, decode_rgb  # here: ulbench.data imports this module

    try:
        rgb, info = decode_rgb(path, display_path(path))
    except UnreadableImage as e:
        raise UserError(f"cannot read image {display_path(path)}: {e.reason}. Remove or replace the file.") from None
    if notes is not None:
        notes.note(path, info.mode, info.had_alpha, info.frames, info.format)
    return rgb


def _header_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file's header (no decoding); a file PIL cannot open is a ``UserError`` naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's large-image note: the decoder raises if it is a bomb
            with Image.open(path) as im:
                return im.height, im.width
    except Exception as e:  # noqa: BLE001  PIL signals bad files with many types (DecompressionBombError, ...)
        raise UserError(f"cannot read image {display_path(path)}: {type(e).__name__}: {e}. Remove or replace the "
                        "file.") from None


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); a symbolic link with an image name that leads nowhere
    (broken, or a loop) is an error rather than an image silently left out."""
    files, dangling = [], []
    for p in folder.rglob("*"):
        if p.suffix.lower() not in IMAGE_EXTS:
            continue
        if p.is_file():
            files.append(p)
        elif p.is_symlink() and not p.exists():
            dangling.append(p)
    if dangling:
        names = ", ".join(display_path(p) for p in sorted(dangling)[:3])
        raise UserError(f"{display_path(folder)}: {len(dangling)} symbolic link(s) named like images lead to no file "
                        f"(broken, or a link loop): {names}. Remove them or fix their targets.")
    if not files:
        raise UserError(f"{display_path(folder)}: no images found (looked recursively for {', '.join(IMAGE_EXTS)}).")
    return sorted(files)


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, numbers.Integral) or limit < 1):
        raise UserError(f"limit={limit!r}: the number of images to use must be an integer >= 1 (or no limit)")


def folder_source(folder: Path, limit: int | None = None) -> ImageSource:
    check_limit(limit)
    files = list_images(folder)[:limit]
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(os.fsencode(p.relative_to(folder)) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    notes = DecodeNotes(folder)

    def batches(batch_size: int, start: int, stop: int) -> Iterator[list[np.ndarray]]:
        for i in range(start, stop, batch_size):
            yield [_decode(p, notes) for p in files[i: min(i + batch_size, stop)]]

    return ImageSource(str(folder), len(files), batches, identity=f"folder:{folder.resolve()}:{h.hexdigest()}",
                       resolution=_header_size(files[0]))


def load_npz_images(path: Path) -> np.ndarray:
    """ADM sample batch layout: ``arr_0`` uint8 (N, H, W, 3)."""
    from ulbench.metrics.stats import read_npz

    fix = "Write samples as np.savez(path, images) with images uint8 (N, H, W, 3), the ADM sample layout."
    with read_npz(path, fix) as z:
        if "arr_0" not in z:
            stats = "It holds 'mu': give it where statistics are accepted (eval fid)."
            raise UserError(f"{path}: no 'arr_0' array (ADM sample layout, uint8 NHWC); found {sorted(z.files)}. "
                            + (stats if "mu" in z else fix))
        arr = z["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        hint = fix
        if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
            hint = "It looks channels-first (N, C, H, W): save arr.transpose(0, 2, 3, 1). " + fix
        elif arr.ndim == 3:
            hint = "It has no channel axis (N, H, W): for gray images save np.repeat(arr[..., None], 3, -1). " + fix
        elif arr.dtype != np.uint8:
            hint = ("Quantize float samples like a saved PNG first (ulbench.metrics.images.quantize_images). " + fix)
        raise UserError(f"{path}: 'arr_0' must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}. {hint}")
    if len(arr) == 0:
        raise UserError(f"{path}: 'arr_0' holds no images")
    return arr


def array_source(arr: np.ndarray | torch.Tensor, name: str = "array", identity: str | None = None) -> ImageSource:
    items = _as_hwc_list(arr, name)

    def batches(batch_size: int, start: int, stop: int) -> Iterator[list[np.ndarray]]:
        for i in range(start, stop, batch_size):
            yield items[i: min(i + batch_size, stop)]

    return ImageSource(name, len(items), batches, identity=identity, resolution=items[0].shape[:2])


def iterable_source(batches_iter: Iterable, name: str = "generator", count: int | None = None) -> ImageSource:
    """Samples produced on the fly: each item a uint8 batch. Consumed once; re-batched to ``batch_size``."""

    def batches(batch_size: int, start: int, stop: int | None) -> Iterator[list[np.ndarray]]:
        if start != 0 or (stop is not None and count is not None and stop < count):
            raise UserError(f"{name}: a one-pass stream of images cannot be split across ranks; run it in one "
                            "process or give a folder or .npz")
        pending: list[np.ndarray] = []
        for b in batches_iter:
            pending.extend(_as_hwc_list(b, name))
            while len(pending) >= batch_size:
                yield pending[:batch_size]
                pending = pending[batch_size:]
        if pending:
            yield pending

    return ImageSource(name, count, batches)


def dataset_source(dataset, limit: int | None = None, name: str | None = None) -> ImageSource:
    """The first ``limit`` images (all by default) of an ``ulbench.data`` dataset, streamed in order; its
    identity is the dataset's content fingerprint, so its statistics are cached across runs."""
    from ulbench.data.base import to_uint8

    check_limit(limit)
    n = len(dataset) if limit is None else min(limit, len(dataset))

    def batches(batch_size: int, start: int, stop: int) -> Iterator[list[np.ndarray]]:
        for x, _ in dataset.batches(stop, batch_size, start):
            yield list(to_uint8(x).permute(0, 2, 3, 1).numpy())

    return ImageSource(name or f"dataset {dataset.name}", n, batches,
                       identity=f"dataset:{dataset.fingerprint()}:first{n}",
                       resolution=(dataset.resolution, dataset.resolution))


def photo_crops(seed: int, n: int = PHOTO_CROP_COUNT, size: int = PHOTO_CROP_SIZE,
                sources: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``n`` random ``size`` x ``size`` crops of the bundled scikit-image photos, deterministic in ``seed``; with
    ``sources``, also the index into BUNDLED_PHOTOS of the photo each crop was cut from (n,)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    photos = [_decode(folder / name) for name in BUNDLED_PHOTOS]
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    which = np.empty(n, np.int64)
    for i in range(n):
        which[i] = rng.integers(len(photos))
        img = photos[which[i]]
        y = rng.integers(0, img.shape[0] - size + 1)
        x = rng.integers(0, img.shape[1] - size + 1)
        out[i] = img[y: y + size, x: x + size]
    return (out, which) if sources else out


def resolve_source(spec: str | os.PathLike | np.ndarray | torch.Tensor | Iterable, limit: int | None = None) -> ImageSource:
    """Folder path, prepared dataset (folder or zip), ADM .npz of images, ``photos:SEED`` (bundled real photo
    crops), tensor/array, iterable, or an ImageSource."""
    check_limit(limit)
    if isinstance(spec, (np.ndarray, torch.Tensor)):
        return array_source(spec[:limit])
    if isinstance(spec, ImageSource):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        return iterable_source(spec)
    s = str(spec)
    if s.startswith("photos:"):
        try:
            seed = int(s.split(":", 1)[1])
        except ValueError:
            raise UserError(f"'{s}': expected photos:SEED with an integer seed, e.g. photos:0") from None
        return array_source(photo_crops(seed, n=limit or PHOTO_CROP_COUNT), name=s, identity=f"{s}:{limit}")
    path = Path(s).expanduser()
    from ulbench.data.prepared import PreparedDataset, is_prepared

    if is_prepared(path):  # `ulbench data prepare` output (folder or zip) or EDM2's: streamed in index order
        return dataset_source(PreparedDataset(path), limit, name=s)
    if path.is_dir():
        return folder_source(path, limit)
    if path.suffix == ".npz" and path.is_file():
        arr = load_npz_images(path)[:limit]
        st = path.stat()
        return array_source(arr, name=s, identity=f"npz:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{limit}")
    if not path.exists():
        raise UserError(f"'{display_path(s)}': no such folder or file. Give an image folder, an .npz (arr_0 uint8 "
                        "NHWC), a statistics .npz (mu, sigma) or photos:SEED.")
    raise UserError(f"'{display_path(s)}': not an image folder or .npz file.")


def prepare_batch(images: list[np.ndarray], mode: str) -> torch.Tensor:
    """uint8 HWC images -> Inception input: uint8 NCHW (legacy; resized inside the extractor) or float 299 (clean).

    Mixed sizes in legacy mode are resized one image at a time with the same TF1 bilinear resize, so each image's
    features are exactly those it would get alone.
    """
    if mode == "clean":
        from cleanfid.resize import build_resizer  # clean-fid's own PIL-bicubic float resize, per channel

        resize = build_resizer("clean")
        return torch.from_numpy(np.stack([resize(a) for a in images])).permute(0, 3, 1, 2).contiguous()
    if mode != "legacy":
        raise UserError(f"resize mode '{mode}' unknown; choose one of {RESIZE_MODES}")
    if len({a.shape for a in images}) == 1:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from ulbench.metrics.inception import INPUT_SIZE

    out = [interpolate_bilinear_2d_like_tensorflow1x(torch.tensor(a).permute(2, 0, 1)[None].float(),
                                                     size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
           for a in images]
    return torch.cat(out)
