"""CPU cost of metric stages and start-up CI pays for on every run (numbers in benchmarks/RESULTS.md):

1. the FID bootstrap (the smoke suite asks for 20 resamples of 200 samples in Inception's 2048-d space): each
   resample through the D x D product (``trace_sqrt_product``) vs the N x N Gram form ``bootstrap_frechet`` takes
   when N <= D; the two give the same interval (tests/test_stats.py);
2. the FVD feature network: I3D with its batch norms as separate layers vs folded into the convolutions at load
   (``load_i3d``), on real clips' shape (16 frames at 224 x 224);
3. one FID of N <= D samples: the two D x D eigendecompositions vs the N x N Gram form ``frechet_distance`` takes
   from the samples' features;
4. start-up of the ``ulbench`` command (``ulbench --help`` in a fresh process; every test that calls the CLI pays it).

    python benchmarks/metric_speed.py --json benchmarks/metric_speed.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bootstrap_cost(n: int, d: int, reps: int, repeats: int) -> dict:
    from ulbench.metrics.stats import Moments, bootstrap_frechet, frechet_distance

    rng = np.random.default_rng(0)
    ref_x = rng.standard_normal((4 * d, d))
    ref = Moments(ref_x.mean(0), np.cov(ref_x, rowvar=False), 4 * d)
    x = rng.standard_normal((n, d)) + 0.1

    def dxd():  # what every resample cost before: a D x D covariance, product and eigendecomposition
        draws = np.random.default_rng(0)
        for _ in range(reps):
            xb = x[draws.integers(0, n, n)]
            frechet_distance(Moments(xb.mean(0), np.cov(xb, rowvar=False), n), ref)

    feats = torch.from_numpy(x)
    return {"n": n, "d": d, "reps": reps, "dxd_s": _best_of(dxd, repeats),
            "gram_s": _best_of(lambda: bootstrap_frechet(feats, ref, reps), repeats)}


def fid_cost(n: int, d: int, repeats: int) -> dict:
    from ulbench.metrics.stats import FeatureStats, Moments, frechet_distance

    rng = np.random.default_rng(1)
    ref_x = rng.standard_normal((4 * d, d))
    ref = Moments(ref_x.mean(0), np.cov(ref_x, rowvar=False), 4 * d)
    fs = FeatureStats(d, keep_features=True)
    fs.update(torch.from_numpy(rng.standard_normal((n, d)) + 0.1).float())
    a = fs.moments()
    return {"n": n, "d": d, "dxd_s": _best_of(lambda: frechet_distance(a, ref), repeats),
            "gram_s": _best_of(lambda: frechet_distance(a, ref, fs.features), repeats),
            "abs_diff": abs(frechet_distance(a, ref) - frechet_distance(a, ref, fs.features))}


def cli_startup(repeats: int) -> dict:
    import subprocess
    import sys

    def start():
        subprocess.run([sys.executable, "-m", "ulbench.cli", "--help"], check=True, capture_output=True)

    return {"help_s": _best_of(start, repeats),
            "import_torch_s": _best_of(lambda: subprocess.run([sys.executable, "-c", "import torch"], check=True),
                                       repeats)}


def i3d_cost(clips: int, frames: int, repeats: int) -> dict:
    from safetensors.torch import load_file

    from ulbench import assets
    from ulbench.metrics.i3d import I3D, load_i3d

    path = assets.converted_path(assets.I3D)
    unfolded = I3D()
    unfolded.load_state_dict(load_file(str(path)))
    unfolded.eval().requires_grad_(False)
    folded = load_i3d(path)
    x = torch.rand(clips, 3, frames, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        out = {}
        for name, model in (("unfolded", unfolded), ("folded", folded)):
            model(x[:1])  # warm-up
            out[f"{name}_s"] = _best_of(lambda m=model: m(x), repeats)
        rel = float((folded(x) - unfolded(x)).abs().max() / unfolded(x).abs().max())
    return {"clips": clips, "frames": frames, **out, "max_rel_diff": rel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    r = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
         "torch": torch.__version__, "bootstrap": bootstrap_cost(200, 2048, 20, args.repeats),
         "i3d": i3d_cost(4, 16, args.repeats), "fid": fid_cost(200, 2048, args.repeats),
         "cli_startup": cli_startup(args.repeats)}
    print(json.dumps(r, indent=2))
    if args.json:
        from ulbench.io import write_json

        write_json(args.json, r)


if __name__ == "__main__":
    main()
