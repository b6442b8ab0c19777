"""GPU check of the metric networks (Inception for FID/KID/precision-recall, I3D for FVD): the features on the GPU
against the same images' features on the CPU, and the GPU's throughput. Prepared to run as one command on a lent GPU:

    python benchmarks/gpu_eval_check.py --n 500 --clips 16 --json gpu_eval.json

It reports, per network: max |gpu - cpu| / max |cpu| over the features, the Fréchet distance between the two feature
sets' statistics (0 up to round-off when the GPU computes what the CPU does: TF32 is off inside the forward), and
images (clips) per second on each device at the given batch size. On a machine without CUDA it compares the CPU with
itself (smallest real case: ``--device cpu --n 8 --clips 2``).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _timed(fn) -> tuple[torch.Tensor, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _compare(cpu: torch.Tensor, dev: torch.Tensor, n: int, cpu_s: float, dev_s: float) -> dict:
    from ulbench.metrics.stats import FeatureStats, frechet_distance

    def moments(f):
        s = FeatureStats(f.shape[1])
        s.update(f)
        return s.moments()

    return {"n": n, "max_rel_diff": float((dev - cpu).abs().max() / cpu.abs().max()),
            "frechet_cpu_vs_device": frechet_distance(moments(cpu), moments(dev)),
            "cpu_per_s": n / cpu_s, "device_per_s": n / dev_s}


def inception_check(n: int, batch_size: int, device: torch.device) -> dict:
    from ulbench import assets
    from ulbench.metrics.device import exact_float32
    from ulbench.metrics.images import photo_crops, prepare_batch
    from ulbench.metrics.inception import InceptionFeatures

    images = list(photo_crops(0, n, size=64))
    weights = assets.converted_path(assets.INCEPTION)
    nets = {d: InceptionFeatures(weights).to(d) for d in ("cpu", device)}

    def run(d):
        with exact_float32():
            return torch.cat([nets[d](prepare_batch(images[i:i + batch_size], "legacy").to(d)).float().cpu()
                              for i in range(0, n, batch_size)])

    run(device)  # warm-up (cuDNN picks its kernels)
    (cpu, cpu_s), (dev, dev_s) = _timed(lambda: run("cpu")), _timed(lambda: run(device))
    return {"network": "inception-v3-compat", "batch_size": batch_size, **_compare(cpu, dev, n, cpu_s, dev_s)}


def i3d_check(clips: int, batch_size: int, device: torch.device) -> dict:
    from ulbench import assets
    from ulbench.metrics.fvd import clip_features
    from ulbench.metrics.i3d import load_i3d

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (clips, 16, 64, 64, 3), dtype=np.uint8)  # (N, T, H, W, C) clips
    weights = assets.converted_path(assets.I3D)
    nets = {d: load_i3d(weights).to(d) for d in ("cpu", device)}
    run = {d: (lambda d=d: clip_features(nets[d], list(data), batch_size=batch_size, progress=False))
           for d in nets}
    run[device]()  # warm-up
    (cpu, cpu_s), (dev, dev_s) = _timed(run["cpu"]), _timed(run[device])
    return {"network": "i3d-kinetics-400", "batch_size": batch_size, **_compare(cpu, dev, clips, cpu_s, dev_s)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--n", type=int, default=500, help="images through Inception on each device")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--clips", type=int, default=16, help="16-frame clips through I3D on each device (0: skip)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    from ulbench.metrics.device import eval_device

    device = eval_device(args.device)
    r = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
         "inception": inception_check(args.n, args.batch_size, device)}
    if args.clips:
        r["i3d"] = i3d_check(args.clips, min(args.batch_size, 8), device)
    print(json.dumps(r, indent=2))
    if args.json:
        from ulbench.io import write_json

        write_json(args.json, r)
    return r


if __name__ == "__main__":
    main()
