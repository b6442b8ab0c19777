"""GPU check for any method the harness trains (UL, DiT, EDM2): a few training steps per stage, images/s, peak
memory and MFU, through the same method interface as `ulbench run` (ulbench.methods).

Prepared to run as one command on a lent GPU (bf16 autocast, optional torch.compile, DDP with one process):
    torchrun --nproc-per-node 1 benchmarks/gpu_check.py --preset ul-small --batch-size 8 --steps 10 --compile
    torchrun --nproc-per-node 1 benchmarks/gpu_check.py --preset dit-xl-2 --resolution 512 --stages stage2
    torchrun --nproc-per-node 1 benchmarks/gpu_check.py --preset edm2-s --resolution 512 --stages stage2
    torchrun --nproc-per-node 1 benchmarks/gpu_check.py --preset video-ul-small --batch-size 4 --steps 10 --compile
(video presets: "images" are 16x128x128 clips, so images_per_s reads clips/s)
On CPU it runs the same code on the smallest real case (used by the tests):
    python benchmarks/gpu_check.py --preset ul-tiny --device cpu --steps 3 --batch-size 4
MFU = measured training FLOPs per step (ulbench.flops.measure_step: FlopCounterMode on a real forward+backward,
attention included) x steps / time / peak FLOP/s.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch

from ul_model.train import TrainConfig, distributed, train
from ulbench.flops import measure_step
from ulbench.methods import kind_of_preset
from ulbench.methods.base import StepInputs

# Dense bf16 peak FLOP/s by device name (vendor datasheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def train_flops_per_step(step: StepInputs, device: torch.device, precision: str) -> int:
    """FLOPs of one real forward+backward step: ulbench.flops.measure_step (FlopCounterMode, attention counted)."""
    from ul_model.train import autocast

    def loss_fn(net, b):
        with autocast(device, precision):
            return {"loss": step.loss_fn(net, b)["loss"].float()}

    return measure_step(StepInputs(step.module, loss_fn, step.batch)).train_flops


def check_stage(stage: str, args, device: torch.device) -> dict:
    kind = kind_of_preset(args.preset)
    cfg = kind.resolve(args.preset, {}, resolution=args.resolution)
    torch.manual_seed(0)
    step = kind.step_inputs(cfg, stage, args.batch_size, device)  # the real model on batches of the right shape
    model, batch = step.module, step.batch
    flops = train_flops_per_step(step, device, args.precision)

    def batches(start):
        while True:
            yield batch

    tcfg = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch_size, warmup_steps=1, log_every=1,
                       checkpoint_every=0, precision=args.precision, compile=args.compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as out:
        log = train(model, step.loss_fn, batches, tcfg, out, device=device, progress=False)
    first, last = log[args.warmup - 1], log[-1]  # time only the steps after warm-up (and compilation)
    seconds = last["elapsed_s"] - first["elapsed_s"]
    _, world = distributed()
    images_per_s = args.batch_size * world * args.steps / seconds
    peak = peak_flops(device, args.peak_tflops)
    return {"stage": stage, "preset": args.preset, "kind": kind.name, "resolution": cfg.resolution, "batch_size": args.batch_size,
            "world_size": world, "precision": args.precision, "compile": args.compile,
            "train_flops_per_image": flops / args.batch_size, "images_per_s": images_per_s,
            "mfu": flops / args.batch_size * images_per_s / world / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "loss_first": log[0]["loss"], "loss_last": last["loss"],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ul-small", help="any preset of `ulbench ls presets`")
    ap.add_argument("--resolution", type=int, default=None, help="image resolution (default: the preset's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup steps)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak bf16 TFLOP/s")
    ap.add_argument("--stages", default=None, help="comma-separated, e.g. stage2 (default: every stage)")
    args = ap.parse_args(argv)
    rank, _ = distributed()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    kind = kind_of_preset(args.preset)
    stages = args.stages.split(",") if args.stages else kind.stages_for(kind.resolve(args.preset, {}, args.resolution))
    results = [check_stage(s, args, device) for s in stages]
    if rank == 0:
        for r in results:
            print(json.dumps(r))
    return results


if __name__ == "__main__":
    main()
