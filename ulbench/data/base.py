"""The dataset interface every training and evaluation stage reads: a map-style ``torch.utils.data.Dataset``.

Item i is ``(image, label)``: image (3, R, R), either uint8 (prepared and on-the-fly sets: 4x less to move from
loader workers and to the device) or float32 in [-1, 1] (in-memory sets); ``to_float`` makes both the model's input.
Every dataset also says what it is: ``name``, ``resolution``, ``num_classes``, ``labels`` (all N, cheap) and a
``fingerprint`` (a content hash: latent-cache keys and metric fingerprints use it).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch

# A batch as the models take it (uint8 -> [-1, 1]): ul_model's own mapping, so harness and model agree.
from ul_model.stages import image_input as to_float  # noqa: F401


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """A batch of images (N, 3, H, W) as uint8 (float in [-1, 1] rounded and clamped like a saved PNG)."""
    return x if x.dtype == torch.uint8 else ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class ImageDataset(torch.utils.data.Dataset):
    """Base class: subclasses set name, resolution, num_classes, labels (np.int64, (N,)) and implement
    ``__getitem__`` and ``fingerprint``."""

    name: str
    resolution: int
    num_classes: int
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def batches(self, n: int | None = None, batch_size: int = 64, start: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Items ``start`` .. n - 1 (the first n, all by default) in order, as stacked (images, labels) batches."""
        n = len(self) if n is None else min(n, len(self))
        for lo in range(start, n, batch_size):
            items = [self[i] for i in range(lo, min(lo + batch_size, n))]
            yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)

    def uint8(self, n: int) -> np.ndarray:
        """First n images as uint8 NHWC (small sets only: references and originals stream via ``batches``)."""
        return torch.cat([to_uint8(x) for x, _ in self.batches(n)]).permute(0, 2, 3, 1).numpy()


class MemoryDataset(ImageDataset):
    """A small set held as one float tensor (bundled photo crops, Fashion-MNIST)."""

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        self.name, self.images, self.num_classes = name, images, num_classes
        self.labels_tensor = labels.long()
        self.labels = self.labels_tensor.numpy()
        self.resolution = images.shape[-1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def batches(self, n: int | None = None, batch_size: int = 64, start: int = 0):
        n = len(self) if n is None else min(n, len(self))
        for lo in range(start, n, batch_size):
            yield self.images[lo: min(lo + batch_size, n)], self.labels_tensor[lo: min(lo + batch_size, n)]

    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256(f"memory:{self.name}:{tuple(self.images.shape)}\n".encode())
            h.update(self.images.contiguous().numpy().tobytes())
            h.update(self.labels.tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


class Subset(ImageDataset):
    """The first n items of a dataset (``dataset.subset``, ``--max-images``): deterministic."""

    def __init__(self, base: ImageDataset, n: int):
        self.base, self.name, self.resolution, self.num_classes = base, base.name, base.resolution, base.num_classes
        self.labels = base.labels[:n]

    def __getitem__(self, i: int):
        if i >= len(self):
            raise IndexError(i)
        return self.base[i]

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.base.fingerprint()}:first{len(self)}".encode()).hexdigest()


class Unlabelled(ImageDataset):
    """Every item under the one label 0 (an unconditional suite on a labelled set)."""

    def __init__(self, base: ImageDataset):
        self.base, self.name, self.resolution, self.num_classes = base, base.name, base.resolution, 1
        self.labels = np.zeros(len(base), dtype=np.int64)

    def __getitem__(self, i: int):
        return self.base[i][0], 0

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.base.fingerprint()}:unlabelled".encode()).hexdigest()


class XFlip(ImageDataset):
    """EDM2's ``xflip``: 2N items, item N + i is item i mirrored left-right (deterministic, so a latent cache can
    hold both and a resumed run sees the same images)."""

    def __init__(self, base: ImageDataset):
        self.base, self.name, self.resolution, self.num_classes = base, base.name, base.resolution, base.num_classes
        self.labels = np.concatenate([base.labels, base.labels])

    def __getitem__(self, i: int):
        n = len(self.base)
        x, y = self.base[i % n]
        return (x.flip(-1) if i >= n else x), y

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.base.fingerprint()}:xflip".encode()).hexdigest()
