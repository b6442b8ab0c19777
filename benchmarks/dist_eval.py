"""Sampling + FID/KID/PSNR of one sweep in one process and under ``torchrun --nproc-per-node N``: wall time, and
whether the results and the sample files are the same (on a 2-core CPU this checks correctness, not speed).

    python benchmarks/dist_eval.py --ranks 2 --samples 256 --out /tmp/dist-eval

Trains a tiny UL (ul-tiny on the bundled photos, micro-batches fixed so both runs train identically), then compares
the two run directories: every result value, and the bytes of every ``.npz`` of samples and reconstructions.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SUITE = """
version: 1
name: dist-eval
dataset: {{name: photos, resolution: 32, subset: 512}}
methods:
  - name: ul
    preset: ul-tiny
    train:
      stage1: {{batch_size: 16, micro_batch: 8, lr: 1.0e-3, warmup_steps: 5, ema_decay: 0.9}}
      stage2: {{batch_size: 32, micro_batch: 16, lr: 1.0e-3, warmup_steps: 5, ema_decay: 0.9}}
compute:
  ladder: [1.0e11]
  stage1: {{train_flops: 5.0e11}}
evaluation:
  metrics: [fid, kid, psnr, bits_per_pixel]
  num_samples: {samples}
  num_reconstructions: {samples}
  kid_subset_size: 100
  sampler: {{method: ancestral, steps: 16, decoder_steps: 16}}
"""


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    suite = args.out / "dist-eval.yaml"
    suite.write_text(SUITE.format(samples=args.samples))
    from ulbench import assets

    # a statistics cache of our own, emptied between the runs, so that both compute the reference's features
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "ULBENCH_CACHE": str(args.out / "cache"),
           "ULBENCH_INCEPTION_WEIGHTS": str(assets.source_path(assets.INCEPTION))}
    common = ["-m", "ulbench", "run", str(suite), "--runs-dir", str(args.out / "runs"), "--no-progress"]
    t1 = run([sys.executable, *common, "--name", "one"], env)
    shutil.rmtree(args.out / "cache" / "stats")
    tn = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks),
              *common[1:], "--name", f"ranks{args.ranks}"], env)
    one, many = args.out / "runs/dist-eval/one", args.out / f"runs/dist-eval/ranks{args.ranks}"
    rows = [{(r["point"], r["metric"]): r["value"] for r in map(json.loads, (d / "results.jsonl").open())}
            for d in (one, many)]
    npz = sorted(p.relative_to(one) for p in one.glob("methods/*/points/*/*.npz"))
    result = {"ranks": args.ranks, "samples": args.samples, "wall_s_1": round(t1, 1), f"wall_s_{args.ranks}": round(tn, 1),
              "values_1": {f"{k[0]}/{k[1]}": v for k, v in rows[0].items()},
              "max_rel_diff": max(abs(rows[1][k] - v) / max(abs(v), 1e-300) for k, v in rows[0].items()),
              "npz_identical": all((one / p).read_bytes() == (many / p).read_bytes() for p in npz),
              "npz_files": [str(p) for p in npz]}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
