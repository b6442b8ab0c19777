"""Training batches from any dataset: a step-indexed, rank-split batch sampler behind ``torch.utils.data.DataLoader``.

Global batch k is slice k of the concatenation of per-epoch permutations, each seeded by (seed, epoch), so it is a
function of k alone: a run resumed at step k sees exactly batches k, k+1, ... of the uninterrupted run, and under
``world`` ranks rank r takes the r-th contiguous share of every global batch, so the global batch sequence does
not depend on the world size. Items are read by DataLoader workers (pinned memory on CUDA); nothing is held but
the current batches.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

EPOCH_SEED_STRIDE = 100003  # permutation of epoch e is seeded by seed * stride + e


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch))


def rank_share(batch_size: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of a global batch (the global batch must split evenly)."""
    if batch_size % world:
        raise ValueError(f"global batch {batch_size} does not split evenly across {world} ranks")
    per_rank = batch_size // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


class StepBatchSampler(torch.utils.data.Sampler):
    """Infinite: yields this rank's indices of global batches ``start``, ``start + 1``, ... (one epoch
    permutation is computed per epoch, not per batch)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        if n <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.share = rank_share(batch_size, rank, world)

    def __iter__(self) -> Iterator[list[int]]:
        step, cached = self.start, (None, None)
        while True:
            first, idx = step * self.batch_size, []
            while len(idx) < self.batch_size:
                epoch, offset = divmod(first + len(idx), self.n)
                if cached[0] != epoch:
                    cached = (epoch, epoch_permutation(self.n, self.seed, epoch))
                idx.extend(cached[1][offset: offset + self.batch_size - len(idx)].tolist())
            yield idx[self.share]
            step += 1


def train_batches(dataset, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1,
                  workers: int = 0, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of this rank's share of global batches ``start``, ``start + 1``, ... (infinite)."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start, rank, world)
    if workers == 0 and hasattr(dataset, "images"):  # in memory: index the tensor, no per-item collation
        return ((dataset.images[idx], dataset.labels_tensor[idx]) for idx in sampler)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         pin_memory=pin_memory, persistent_workers=False,
                                         prefetch_factor=4 if workers else None)
    return iter(loader)
