"""The small built-in sets, held in memory: Fashion-MNIST (Debian package) and crops of the bundled photos.

Each is a ``MemoryDataset`` (float (N, 3, R, R) in [-1, 1], integer labels) behind the same interface as the
streamed sets, so the same loader, latent cache and sweep serve both.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from ulbench.data.base import MemoryDataset
from ulbench.errors import UserError
from ulbench.metrics.images import _decode, photo_crops

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_PAD = 2  # 28x28 -> 32x32
PHOTO_TRAIN_CROPS = 2048
PHOTO_SEED = 12345  # train crops: a seed distinct from the evaluation examples' photos:0 / photos:1


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR) -> MemoryDataset:
    prefix = {"train": "train", "test": "t10k"}[split]
    img, lab = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.is_file() or not lab.is_file():
        raise UserError(f"Fashion-MNIST not found at {root} (looked for {img.name}). Install it with "
                        f"`{FASHION_MNIST_INSTALL}` (Debian/Ubuntu), or pass --data FOLDER with your own images.")
    x = torch.from_numpy(_read_idx(img).copy()).float()[:, None] / 127.5 - 1  # (N, 1, 28, 28)
    x = torch.nn.functional.pad(x, (FASHION_MNIST_PAD,) * 4, value=-1.0).expand(-1, 3, -1, -1).contiguous()
    return MemoryDataset("fashion-mnist", x, torch.from_numpy(_read_idx(lab).astype(np.int64)), 10)


def photos(resolution: int = 32, n: int = PHOTO_TRAIN_CROPS, seed: int = PHOTO_SEED) -> MemoryDataset:
    """Random crops of the bundled photos, area-downsampled 4x to ``resolution``; the label of a crop is the photo
    it was cut from (9 classes: a class-conditional suite learns which photo to draw from; unconditional suites drop
    the labels)."""
    from ulbench.metrics.images import BUNDLED_PHOTOS

    crops, sources = photo_crops(seed, n, size=4 * resolution, sources=True)
    x = torch.nn.functional.interpolate(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1,
                                        size=resolution, mode="area")
    return MemoryDataset("photos", x, torch.from_numpy(sources), len(BUNDLED_PHOTOS))


def write_photo_tree(out: str | Path, n: int, min_side: int, max_side: int, classes: int = 2, seed: int = 0,
                     quality: int = 90) -> Path:
    """A small real ImageFolder tree: ``n`` JPEG crops of the bundled photos, each of random width and height in
    [min_side, max_side] (both orientations; crops larger than their photo are cut smaller and BICUBIC-upscaled),
    spread over ``classes`` class folders. For tests, benchmarks and the prepared-photos suite."""
    from PIL import Image

    from ulbench.metrics.images import BUNDLED_PHOTOS

    import skimage

    folder = Path(skimage.__file__).parent / "data"
    photos_ = [_decode(folder / name) for name in BUNDLED_PHOTOS]
    rng = np.random.default_rng(seed)
    out = Path(out)
    for i in range(n):
        img = photos_[rng.integers(len(photos_))]
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        cw, ch = min(w, img.shape[1]), min(h, img.shape[0])
        y, x = rng.integers(0, img.shape[0] - ch + 1), rng.integers(0, img.shape[1] - cw + 1)
        crop = Image.fromarray(img[y: y + ch, x: x + cw])
        if (cw, ch) != (w, h):
            crop = crop.resize((w, h), Image.BICUBIC)
        path = out / f"class{i % classes:02d}" / f"photo{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, quality=quality)
    return out
