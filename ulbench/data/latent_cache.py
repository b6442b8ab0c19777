"""Sharded, memory-mapped latent caches for every stage 2 (UL's z_clean, a KL-VAE's posterior mean and std).

A cache folder holds ``meta.json`` (its key, item count, field shapes, shard size) and per shard one ``.npy`` per
field (``latent``, and ``latent_xflip`` when the images' mirror copies are kept too, as MAR keeps them), read with
``np.load(mmap_mode="r")``. The key is a sha256 over the encoder checkpoint's sha256, the dataset fingerprint and
the transform: retraining stage 1 or changing a source image gives another key, and the cache is rebuilt. A
shard is written to a temporary name and renamed when complete, so a killed build resumes at the first missing
shard and ends with the same bytes. Under ``world`` ranks rank r encodes shards r, r + world, ...
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ulbench.data.base import ImageDataset
from ulbench.io import write_json

SHARD_SIZE = 4096  # items per shard [choice]: 64 MB of KL-f8 moments at 256px, few files at ImageNet scale
FORMAT = 1
log = logging.getLogger("ulbench.data")


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _shard_file(root: Path, field: str, shard: int) -> Path:
    return root / f"{field}-{shard:05d}.npy"


def _read_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@torch.no_grad()
def build_latent_cache(root: str | os.PathLike, key_parts: dict, dataset: ImageDataset,
                       encode: Callable[[torch.Tensor], torch.Tensor], xflip: bool = False, batch_size: int = 64,
                       shard_size: int = SHARD_SIZE, progress: bool = True, rank: int = 0, world: int = 1,
                       workers: int = 0) -> LatentCache:
    """Encode every item of ``dataset`` once (``encode``: a batch as the dataset yields it -> (B, *shape)); reuse
    a complete cache with the same key, resume an incomplete one, rebuild one with another key."""
    root, key = Path(root), cache_key(key_parts)
    meta = _read_meta(root)
    if meta is not None and meta["key"] == key and meta.get("complete"):
        return LatentCache(root)
    n = len(dataset)
    fields = ("latent", "latent_xflip") if xflip else ("latent",)
    header = {"format": FORMAT, "key": key, "key_parts": key_parts, "n": n, "shard_size": shard_size,
              "fields": list(fields)}
    if rank == 0:
        if meta is not None and meta["key"] != key:
            log.info("%s: encoder or data changed (key %s -> %s): rebuilding the latent cache", root,
                     meta["key"][:12], key[:12])
            shutil.rmtree(root)
        if meta is None or meta["key"] != key:  # the key goes first: shards never outlive the key they were made for
            write_json(root / "meta.json", {**header, "complete": False})
    _barrier()
    num_shards = -(-n // shard_size)
    shards = [s for s in range(num_shards) if s % world == rank]
    todo = [s for s in shards if not all(_shard_file(root, f, s).is_file() for f in fields)]
    shape = None
    bar = tqdm(total=sum(min(shard_size, n - s * shard_size) for s in todo), desc="encode latents", unit="img",
               disable=not progress or rank != 0)
    root.mkdir(parents=True, exist_ok=True)
    for s in todo:
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch_size,
                                             num_workers=workers)
        parts: dict[str, list[np.ndarray]] = {f: [] for f in fields}
        for x, _ in loader:
            parts["latent"].append(encode(x).float().cpu().numpy())
            if xflip:
                parts["latent_xflip"].append(encode(x.flip(-1)).float().cpu().numpy())
            bar.update(len(x))
        for f in fields:
            arr = np.concatenate(parts[f])
            shape = arr.shape[1:]
            tmp = _shard_file(root, f, s).with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, _shard_file(root, f, s))
    bar.close()
    _barrier()
    if rank == 0:
        missing = [s for s in range(num_shards) if not all(_shard_file(root, f, s).is_file() for f in fields)]
        if missing:
            raise RuntimeError(f"{root}: shards {missing} are missing after every rank finished (a rank failed?); "
                               "rerun to encode them")
        if shape is None:  # nothing left to encode here: take the shape from a finished shard
            shape = np.load(_shard_file(root, "latent", 0), mmap_mode="r").shape[1:]
        write_json(root / "meta.json", {**header, "shape": list(shape), "complete": True})
    _barrier()
    return LatentCache(root)


class LatentCache:
    """A complete cache folder: ``field(name, i)`` reads one item through per-process memory maps."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta = _read_meta(self.root)
        if meta is None or not meta.get("complete"):
            raise FileNotFoundError(f"{self.root}: no complete latent cache")
        self.meta, self.n, self.shard_size = meta, meta["n"], meta["shard_size"]
        self.shape, self.fields = tuple(meta["shape"]), tuple(meta["fields"])
        self._maps: dict[tuple[str, int], np.ndarray] = {}

    def field(self, name: str, i: int) -> np.ndarray:
        s, off = divmod(i, self.shard_size)
        if (name, s) not in self._maps:
            self._maps[(name, s)] = np.load(_shard_file(self.root, name, s), mmap_mode="r")
        return np.array(self._maps[(name, s)][off])

    def __getstate__(self) -> dict:  # DataLoader workers open their own maps
        return {**self.__dict__, "_maps": {}}


class LatentDataset(torch.utils.data.Dataset):
    """Stage 2's training set: item i is (latent, label); with ``xflip`` items N + i are the mirrored images'
    latents (the image dataset's ``XFlip`` order)."""

    def __init__(self, cache: LatentCache, labels: np.ndarray, xflip: bool = False):
        if xflip and "latent_xflip" not in cache.fields:
            raise ValueError(f"{cache.root}: built without xflip latents")
        if len(labels) != cache.n:
            raise ValueError(f"{cache.root}: {cache.n} latents for {len(labels)} labels")
        self.cache, self.xflip = cache, xflip
        self.labels = np.concatenate([labels, labels]) if xflip else np.asarray(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        field = "latent_xflip" if i >= self.cache.n else "latent"
        return torch.from_numpy(self.cache.field(field, i % self.cache.n)), int(self.labels[i])
