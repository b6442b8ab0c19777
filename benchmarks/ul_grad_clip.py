"""Pre-clip gradient norms of ul-tiny stage 1 and stage 2 on Fashion-MNIST with the fashion-mnist suite's
hyper-parameters, logged every step: how often a clip threshold fires (benchmarks/RESULTS.md, "UL gradient clipping").

    OMP_NUM_THREADS=1 python benchmarks/ul_grad_clip.py OUT STAGE1_STEPS STAGE2_STEPS [GRAD_CLIP]
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ul_model.config import PRESETS
from ul_model.stages import image_input, stage2_model, train_stage1, train_stage2
from ul_model.train import TrainConfig
from ulbench.data import load_dataset
from ulbench.data.loader import train_batches

out, steps1, steps2 = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
clip = float(sys.argv[4]) if len(sys.argv) > 4 else TrainConfig().grad_clip
ds = load_dataset("fashion-mnist", 32)
c1 = TrainConfig(steps=steps1, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.999, log_every=1,
                 checkpoint_every=steps1, grad_clip=clip)
t0 = time.time()
train_stage1(PRESETS["ul-tiny"], lambda s: train_batches(ds, c1.batch_size, c1.seed, s), c1, out / "s1", progress=False)
print("stage1 s", time.time() - t0, flush=True)
model = stage2_model(out / "s1")
with torch.no_grad():
    xs, ys = [], []
    it = train_batches(ds, 512, 0, 0)
    for _ in range(16):  # 8192 images
        x, y = next(it)
        xs.append(model.encoder(image_input(x)))
        ys.append(y)
    z, y = torch.cat(xs), torch.cat(ys)
c2 = TrainConfig(steps=steps2, batch_size=128, lr=1e-3, warmup_steps=100, ema_decay=0.999, log_every=1,
                 checkpoint_every=0, grad_clip=clip)


def b2(start):
    g = torch.Generator().manual_seed(start)
    while True:
        i = torch.randint(len(z), (c2.batch_size,), generator=g)
        yield z[i], y[i]
t0 = time.time()
train_stage2(model, b2, c2, out / "s2", out / "s1", progress=False)
print("stage2 s", time.time() - t0, flush=True)


def rows(p):
    return [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]



res = {}
for st in ("s1", "s2"):
    r = rows(out / st)
    g = np.array([x["grad_norm"] for x in r])
    nats = [x["l_z"] + x["decoder"] if st == "s1" else x["base"] for x in r]
    res[st] = {"frac_gt_1": float((g > 1.0).mean()), "median": float(np.median(g)), "p90": float(np.percentile(g, 90)),
               "p99": float(np.percentile(g, 99)), "max": float(g.max()), "min": float(g.min()),
               "nats_at": {s: float(np.mean(nats[max(0, s - 10):s])) for s in (50, 100, 200, 300) if s <= len(nats)},
               "bpp_last": float(np.mean([x.get("bits_per_pixel", 0) for x in r[-20:]]))}
print(json.dumps(res, indent=1))
(out / "summary.json").write_text(json.dumps(res, indent=1))
