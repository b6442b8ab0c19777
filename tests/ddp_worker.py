"""Run by tests/test_distributed.py, in one process or under torchrun: 5 real training steps of ul-tiny (stage 1)
and dit-tiny (stage 2) on a fixed stream of inputs, for several micro-batch settings; rank 0 writes each run's
logged losses as JSON to argv[1]."""
import json
import sys
from pathlib import Path

import torch

from ul_model.train import TrainConfig, distributed, micro_batches, train
from ulbench.methods import get_kind

BATCH, STEPS = 8, 5


def main(out: str, micros: list[int]) -> None:
    torch.set_num_threads(1)
    rank, world = distributed()
    results = {}
    for kind, preset, stage in (("ul", "ul-tiny", "stage1"), ("dit", "dit-tiny", "stage2")):
        k = get_kind(kind)
        config = k.resolve(preset, {}, resolution=32)
        for micro in micros:
            torch.manual_seed(0)  # the same initial weights on every rank and in every process
            step = k.step_inputs(config, stage, BATCH, "cpu")
            cfg = TrainConfig(steps=STEPS, batch_size=BATCH, micro_batch=micro, lr=1e-3, warmup_steps=1,
                              log_every=1, checkpoint_every=0, seed=3)
            share, _ = micro_batches(cfg, world)

            def batches(start, step=step, share=share):  # global batch s: fixed inputs, this rank's share
                for s in range(start, STEPS):
                    g = torch.Generator().manual_seed(1000 + s)
                    full = [torch.randn(b.shape, generator=g) if b.is_floating_point() else
                            torch.randint(0, 10, b.shape, generator=g) for b in step.batch]
                    yield tuple(b[rank * share:(rank + 1) * share] for b in full)

            log = train(step.module, step.loss_fn, batches, cfg, Path(out).parent / f"run-{kind}-{micro}-{rank}",
                        progress=False)
            results[f"{kind}/micro{micro}"] = [row["loss"] for row in log]
    if rank == 0:
        Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], [int(m) for m in sys.argv[2].split(",")])
