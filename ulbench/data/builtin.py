"""Training data for `ulbench train`: Fashion-MNIST (Debian package), bundled photo crops, an image folder.

Every dataset is a float tensor (N, 3, R, R) in [-1, 1] with integer labels; ``step_batches`` draws batch k from an
epoch permutation seeded by (seed, epoch), so a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ulbench.errors import UserError
from ulbench.metrics.images import _decode, list_images, photo_crops

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_PAD = 2  # 28x28 -> 32x32
PHOTO_TRAIN_CROPS = 2048
PHOTO_SEED = 12345  # train crops: a seed distinct from the evaluation examples' photos:0 / photos:1


@dataclass
class Dataset:
    name: str
    images: torch.Tensor  # (N, 3, R, R) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64
    num_classes: int

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    def uint8(self, n: int) -> np.ndarray:
        """First n images as uint8 NHWC (for metrics against generated samples)."""
        return ((self.images[:n] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR) -> Dataset:
    prefix = {"train": "train", "test": "t10k"}[split]
    img, lab = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.is_file() or not lab.is_file():
        raise UserError(f"Fashion-MNIST not found at {root} (looked for {img.name}). Install it with "
                        f"`{FASHION_MNIST_INSTALL}` (Debian/Ubuntu), or pass --data FOLDER with your own images.")
    x = torch.from_numpy(_read_idx(img).copy()).float()[:, None] / 127.5 - 1  # (N, 1, 28, 28)
    x = torch.nn.functional.pad(x, (FASHION_MNIST_PAD,) * 4, value=-1.0).expand(-1, 3, -1, -1).contiguous()
    return Dataset("fashion-mnist", x, torch.from_numpy(_read_idx(lab).astype(np.int64)), 10)


def photos(resolution: int = 32, n: int = PHOTO_TRAIN_CROPS, seed: int = PHOTO_SEED) -> Dataset:
    """Random crops of the bundled photos, area-downsampled 4x to ``resolution`` (unconditional: label 0)."""
    crops = torch.from_numpy(photo_crops(seed, n, size=4 * resolution)).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = torch.nn.functional.interpolate(crops, size=resolution, mode="area")
    return Dataset("photos", x, torch.zeros(n, dtype=torch.long), 1)


def image_folder(folder: Path, resolution: int) -> Dataset:
    """ImageFolder layout (class per sub-folder) or a flat folder (one class); centre crop, area resize."""
    files = list_images(folder)
    classes = sorted({p.parent.relative_to(folder).as_posix() for p in files})
    index = {c: i for i, c in enumerate(classes)}
    xs, ys = [], []
    for p in files:
        a = torch.from_numpy(_decode(p).copy()).permute(2, 0, 1).float()[None]
        side = min(a.shape[-2:])
        top, left = (a.shape[-2] - side) // 2, (a.shape[-1] - side) // 2
        a = a[..., top: top + side, left: left + side]
        xs.append(torch.nn.functional.interpolate(a, size=resolution, mode="area", antialias=False) / 127.5 - 1)
        ys.append(index[p.parent.relative_to(folder).as_posix()])
    return Dataset(folder.name, torch.cat(xs), torch.tensor(ys), len(classes))


def load_dataset(spec: str, resolution: int) -> Dataset:
    if spec == "fashion-mnist":
        ds = fashion_mnist()
    elif spec == "photos":
        ds = photos(resolution)
    elif Path(spec).is_dir():
        ds = image_folder(Path(spec), resolution)
    else:
        raise UserError(f"--data '{spec}': not 'fashion-mnist', 'photos' or an image folder")
    if ds.resolution != resolution:
        raise UserError(f"dataset {ds.name} is {ds.resolution}x{ds.resolution} but the preset expects {resolution}")
    return ds


def load_suite_dataset(suite) -> Dataset:
    """A suite's ``dataset`` section -> Dataset (errors name the suite file and key)."""
    spec = suite.dataset
    where = f"{suite.file}: dataset"
    if spec.name == "fashion-mnist":
        ds = fashion_mnist(spec.split)
    elif spec.name == "photos":
        # test split: crops drawn with another seed than the training crops
        ds = photos(spec.resolution, seed=PHOTO_SEED + (1 if spec.split == "test" else 0))
    else:
        folder = Path(spec.path).expanduser()
        if not folder.is_dir():
            raise UserError(f"{where}.path: {folder} is not a folder; point it at your images (ImageFolder layout)")
        ds = image_folder(folder, spec.resolution)
    if ds.resolution != spec.resolution:
        raise UserError(f"{where}.resolution: {spec.resolution}, but {ds.name} images are {ds.resolution}x"
                        f"{ds.resolution}")
    if spec.subset is not None:
        if spec.subset > len(ds.images):
            raise UserError(f"{where}.subset: {spec.subset} images asked for, {ds.name} has {len(ds.images)}")
        ds = Dataset(ds.name, ds.images[: spec.subset], ds.labels[: spec.subset], ds.num_classes)
    if not spec.class_conditional:
        ds = Dataset(ds.name, ds.images, torch.zeros_like(ds.labels), 1)
    return ds
