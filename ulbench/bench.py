"""`ulbench bench features`: our FID feature pipeline vs torch-fidelity's `calculate_metrics`, same folder.

Each pipeline runs in its own fresh process (so peak RSS is its own and neither warms the other's caches) and
computes FID of the folder against itself, i.e. features for 2N images, as `calculate_metrics(fid=True)` does.
The features of both are saved and compared; the ratio is images/s (ours) / images/s (torch-fidelity).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ulbench import assets
from ulbench.errors import UserError
from ulbench.metrics.images import list_images, photo_crops, resolve_source


def _write_folder(spec: str, n: int, folder: Path) -> Path:
    from PIL import Image

    arr = photo_crops(int(spec.split(":", 1)[1]), n=n)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:05d}.png")
    return folder


def _child_ours(folder: str, batch_size: int, weights: str, out: str) -> dict:
    # weights: the user's original file ("" = resolve as usual), verified by the evaluator itself
    from ulbench.metrics.fid import ImageEvaluator

    ev = ImageEvaluator(weights or None, batch_size=batch_size, progress=False, use_cache=False)
    t0 = time.perf_counter()
    ev.fid(folder, folder)
    seconds = time.perf_counter() - t0
    np.save(out, ev.features(resolve_source(folder), keep_features=True).features.numpy())  # untimed
    return {"seconds": seconds}


def _child_torch_fidelity(folder: str, batch_size: int, weights: str, out: str) -> dict:
    # weights: our converted safetensors, so both pipelines run the same numbers
    import torch_fidelity
    from safetensors.torch import load_file
    from torch_fidelity.datasets import ImagesPathDataset
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    pt = Path(out).with_suffix(".pt")
    torch.save(load_file(weights), pt)  # its loader wants a torch pickle; this one holds plain tensors we wrote
    kw = dict(feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(pt), cuda=False,
              batch_size=batch_size, cache=False, verbose=False)
    t0 = time.perf_counter()
    torch_fidelity.calculate_metrics(input1=folder, input2=folder, fid=True, **kw)
    seconds = time.perf_counter() - t0
    ex = create_feature_extractor("inception-v3-compat", ["2048"], **kw)
    files = [str(p) for p in list_images(Path(folder))]
    feats = get_featuresdict_from_dataset(ImagesPathDataset(files), ex, batch_size, False, False, False)["2048"]
    np.save(out, feats.numpy())  # untimed
    return {"seconds": seconds}


def _run_child(which: str, folder: Path, batch_size: int, weights: Path, out: Path) -> dict:
    code = ("import json,resource,sys; from ulbench import bench; "
            f"r = bench._child_{which}(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]); "
            "r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; print(json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(batch_size), str(weights), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child '{which}' failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_features(spec: str, n: int = 200, batch_size: int = 50, inception_weights: str | None = None) -> dict:
    weights = assets.converted_path(assets.INCEPTION, inception_weights)
    with tempfile.TemporaryDirectory(prefix="ulbench-bench-") as tmp:
        tmp = Path(tmp)
        if spec.startswith("photos:"):
            (tmp / "images").mkdir()
            folder = _write_folder(spec, n, tmp / "images")
        else:
            folder = Path(spec)
            if len(list_images(folder)) < 2:
                raise UserError(f"{folder}: need at least 2 images to benchmark")
        n_images = len(list_images(folder))
        tf = _run_child("torch_fidelity", folder, batch_size, weights, tmp / "tf.npy")
        ours = _run_child("ours", folder, batch_size, inception_weights or "", tmp / "ours.npy")
        f_tf, f_ours = np.load(tmp / "tf.npy"), np.load(tmp / "ours.npy")
    rel = float(np.abs(f_ours - f_tf).max() / np.abs(f_tf).max())
    ips_tf, ips_ours = 2 * n_images / tf["seconds"], 2 * n_images / ours["seconds"]
    return {
        "images": n_images, "batch_size": batch_size, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "torch_fidelity_img_per_s": round(ips_tf, 3), "ours_img_per_s": round(ips_ours, 3),
        "ratio": round(ips_ours / ips_tf, 3), "max_rel_feature_diff": rel,
        "torch_fidelity_peak_rss_mb": round(tf["peak_rss_mb"], 1), "ours_peak_rss_mb": round(ours["peak_rss_mb"], 1),
    }
