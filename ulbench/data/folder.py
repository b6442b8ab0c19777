"""An image tree read without preparation: each item decoded and ADM-cropped on the fly (slower than a prepared
set: every step decodes full-size JPEGs; ``ulbench data prepare`` does that work once).

Listing and labels are ``sources.Source``'s (EDM2's rule: the sorted top-level folder names are the classes), the
transform is the one ``prepare`` applies by default, so a prepared copy of the tree yields the same pixels.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ulbench.data.base import ImageDataset
from ulbench.data.sources import Source
from ulbench.data.transforms import DEFAULT_TRANSFORM, UnreadableImage, apply_transform, decode_rgb
from ulbench.errors import UserError
from ulbench.metrics.images import display_path


class FolderDataset(ImageDataset):
    def __init__(self, path: str | os.PathLike, resolution: int, transform: str = DEFAULT_TRANSFORM):
        self.source = Source(path)
        if not len(self.source):
            raise UserError(f"{path}: no images found (looked for .jpg .jpeg .png .webp .bmp)")
        self.name, self.resolution, self.transform = Path(path).name, resolution, transform
        labels = self.source.labels
        self.labels = np.zeros(len(self.source), np.int64) if labels is None else np.asarray(labels, np.int64)
        self.num_classes = int(self.labels.max()) + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        name = self.source.names[i]
        try:
            rgb, _ = decode_rgb(self.source.read(name), name)
        except (UnreadableImage, OSError) as e:  # OSError: a broken link, a link loop, a file gone since listing
            reason = e.reason if isinstance(e, UnreadableImage) else f"{type(e).__name__}: {e.strerror or e}"
            raise UserError(f"{display_path(self.source.path / name)}: {reason}. Remove the file, or prepare the "
                            "folder with `ulbench data prepare`, which names and skips unreadable files.") from None
        out = apply_transform(self.transform, rgb, self.resolution)
        if out is None:
            raise UserError(f"{display_path(self.source.path / name)}: too small for {self.transform} at "
                            f"{self.resolution}px")
        return torch.from_numpy(np.array(out)).permute(2, 0, 1), int(self.labels[i])

    def fingerprint(self) -> str:
        """A listing fingerprint (relative path, size, mtime of every file, the transform and resolution): a
        changed, added or removed image changes it without reading the tree; prepared sets hash their pixels."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256(f"folder:{self.transform}:{self.resolution}\n".encode())
            for name, label in zip(self.source.names, self.labels):
                st = (self.source.path / name).stat()
                h.update(f"{name}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint
