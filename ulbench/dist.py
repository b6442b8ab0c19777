"""Data parallelism for every harness stage under ``torchrun``: who does which share, and how shares combine.

Work over N items is cut into fixed batches of the item index (sample i keeps seed + i), and rank r takes the r-th
contiguous run of batches, so each batch, and each item's output, is the same under any world size. Statistics
combine as sums (``all_reduce``), small per-item values and the rare feature sets as rank-ordered gathers on rank 0.
Rank 0 alone writes files. The process group comes from ``ul_model.train.distributed`` (NCCL on CUDA, gloo on CPU,
``$DIST_TIMEOUT_S``); without ``torchrun`` every function here is the one-process identity.
"""
from __future__ import annotations

import torch


def rank_world() -> tuple[int, int]:
    from ul_model.train import distributed

    return distributed()


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``x`` (returned on x's device; x itself is left as it was)."""
    if rank_world()[1] == 1:
        return x
    y = x.to(_comm_device(), copy=True)
    torch.distributed.all_reduce(y)
    return y.to(x.device)


def all_true(flag: bool) -> bool:
    """True on every rank when ``flag`` holds on every rank: a decision all ranks take together (e.g. use a
    cache file) so that no rank skips a collective the others enter."""
    return bool(all_reduce_sum(torch.tensor([0.0 if flag else 1.0], dtype=torch.float64)).item() == 0)


def gather_to_main(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere (pickled; for small or rare payloads)."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int, batch_size: int) -> range:
    """This rank's item-index batch starts over ``n`` items: a contiguous run of the ``ceil(n / batch_size)``
    batches, balanced to within one batch."""
    rank, world = rank_world()
    num = -(-n // batch_size)
    lo, hi = num * rank // world, num * (rank + 1) // world
    return range(lo * batch_size, min(n, hi * batch_size), batch_size)


def span(starts: range, n: int, batch_size: int) -> tuple[int, int]:
    """The item range [start, stop) that the batch starts of ``shard(n, batch_size)`` cover ((0, 0) when empty)."""
    return (starts[0], min(n, starts[-1] + batch_size)) if starts else (0, 0)
