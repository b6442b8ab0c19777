"""`ulbench bench data`: the prepared-dataset training loader vs the ImageFolder + DataLoader a user would write.

For each resolution R a JPEG ImageFolder tree of real photo crops (sides in about [1.1 R, 1.7 R], ``write_photo_tree``)
is written (or reused from ``workdir``) and prepared to a zip (``prepare``, timed). Each loader then runs in its own
fresh process (so its peak RSS is its own and neither warms the other's imports), with the same workers and batch
size: (a) ``PreparedDataset`` + ``train_batches``, (b) ``torchvision.datasets.ImageFolder`` on the JPEG tree with
ADM's centre crop (our ``center_crop_dhariwal`` on the PIL-decoded RGB image, then a uint8 CHW tensor) in a plain
shuffled ``DataLoader``. Both are timed over ``batches`` batches after ``warmup`` batches; the ratio is images/s
(prepared) / images/s (JPEG), target >= 3.

Memory: peak RSS of a training-like process (batches converted to the model's float input) iterating the prepared
loader for a fixed number of batches over prepared sets of different sizes (the first N images of one tree, at the
smallest resolution); target: the largest within 10% of the smallest. Latent cache: images/s of
``build_latent_cache`` with the SD-style KL-f8 VAE encoder (random init: the cost does not depend on the weights),
posterior mean and std as ``ulbench.methods.ldm`` caches them.

Peak RSS: ``ru_maxrss`` of RUSAGE_SELF (the main process) and RUSAGE_CHILDREN (the largest DataLoader worker, which
counts the pages it shares with the main process it was forked from), read in each child after its workers exit.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ulbench.errors import UserError

SIDE_RANGE = (1.1, 1.7)  # JPEG sides in [1.1 R, 1.7 R]: ImageNet-like, larger than R so the crop downsamples
CLASSES = 2
TREE_SEED = 0
JPEG_QUALITY = 90
LOADER_SEED = 0
TARGET_RATIO = 3.0
TARGET_MEMORY_RATIO = 1.10
VAE_PRESET = "kl-f8"
CHILD_STDERR_TAIL = 3000


# ---- run in fresh child processes (keep this module's top-level imports light: each child imports its own) ----

def _shutdown(it) -> None:
    """Join a DataLoader iterator's workers now, so RUSAGE_CHILDREN counts them."""
    stop = getattr(it, "_shutdown_workers", None)
    if stop is not None:
        stop()


def _time_batches(next_batch, warmup: int, batches: int, float_input: bool, desc: str, progress: bool) -> dict:
    """``warmup`` untimed batches, then ``batches`` timed ones: images, seconds, shape and dtype of a batch."""
    import torch
    from tqdm import tqdm

    from ulbench.data.base import to_float

    x = None
    for _ in range(warmup):
        x, _y = next_batch()
    images, checksum = 0, 0.0
    bar = tqdm(total=batches, desc=desc, unit="batch", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    for _ in range(batches):
        x, _y = next_batch()
        if float_input:  # what a training step does first: the model's input, float in [-1, 1]
            checksum += float(to_float(x).mean())
        images += len(x)
        bar.update(1)
    seconds = time.perf_counter() - t0
    bar.close()
    return {"images": images, "seconds": seconds, "img_per_s": images / seconds, "shape": list(x.shape[1:]),
            "dtype": str(x.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            **({"mean_input": checksum / batches} if float_input else {})}


def _child_prepared(path: str, workers: int, batch_size: int, warmup: int, batches: int, float_input: bool = False,
                    progress: bool = False) -> dict:
    from ulbench.data.loader import train_batches
    from ulbench.data.prepared import PreparedDataset

    ds = PreparedDataset(path)
    it = train_batches(ds, batch_size, seed=LOADER_SEED, workers=workers)
    r = _time_batches(lambda: next(it), warmup, batches, float_input, f"prepared {Path(path).name}", progress)
    _shutdown(it)
    return r | {"dataset_images": len(ds)}


class AdmCrop:
    """The baseline's transform: ADM's centre crop of the PIL-decoded RGB image, then a uint8 (3, R, R) tensor."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, img):
        import numpy as np
        import torch

        from ulbench.data.transforms import center_crop_dhariwal

        rgb = center_crop_dhariwal(np.asarray(img.convert("RGB")), self.resolution)
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # a writable copy of the crop


def _child_jpeg(path: str, resolution: int, workers: int, batch_size: int, warmup: int, batches: int,
                progress: bool = False) -> dict:
    import torch
    import torchvision

    ds = torchvision.datasets.ImageFolder(path, transform=AdmCrop(resolution))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, generator=torch.Generator().manual_seed(LOADER_SEED))
    state = {"it": iter(loader)}

    def next_batch():  # a new epoch (and, as a user's loop would, new workers) when one runs out
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    r = _time_batches(next_batch, warmup, batches, False, f"jpeg {Path(path).name}", progress)
    _shutdown(state["it"])
    return r | {"dataset_images": len(ds)}


def _child_encode(path: str, images: int, batch_size: int, workers: int, root: str, device: str,
                  progress: bool = False) -> dict:
    import torch

    from baselines.kl_vae import build_vae, vae_preset
    from ulbench.data.base import Subset, to_float
    from ulbench.data.latent_cache import build_latent_cache
    from ulbench.data.prepared import PreparedDataset

    torch.manual_seed(0)
    vae = build_vae(vae_preset(VAE_PRESET)).to(device).eval().requires_grad_(False)
    ds = PreparedDataset(path)
    ds = Subset(ds, min(images, len(ds)))

    def encode(x):  # ulbench.methods.ldm: posterior mean and std, items (2, C, h, w)
        post = vae.encode(to_float(x.to(device))).latent_dist
        return torch.stack([post.mean, post.std], 1)

    with torch.no_grad():  # untimed warm-up batch (allocator, kernels)
        encode(torch.stack([ds[i][0] for i in range(min(batch_size, len(ds)))])).cpu()
    t0 = time.perf_counter()
    cache = build_latent_cache(root, {"bench": "ulbench bench data", "encoder": f"{VAE_PRESET} random init",
                                      "dataset": ds.fingerprint()}, ds, encode, batch_size=batch_size,
                               progress=progress, workers=workers)
    seconds = time.perf_counter() - t0
    return {"images": cache.n, "seconds": seconds, "img_per_s": cache.n / seconds, "latent_shape": list(cache.shape),
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda")
            else "cpu", "threads": torch.get_num_threads(),
            "parameters_encoder": sum(p.numel() for n, p in vae.named_parameters() if n.startswith(("encoder",
                                                                                                 "quant_conv")))}


_CHILDREN = {"prepared": _child_prepared, "jpeg": _child_jpeg, "encode": _child_encode}


def _run_child(which: str, progress: bool, **kwargs) -> dict:
    code = ("import json,resource,sys; from ulbench import bench_data as b; "
            "r = b._CHILDREN[sys.argv[1]](**json.loads(sys.argv[2])); "
            "r['main_peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
            "r['workers_peak_rss_mb'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024; "
            "print(json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code, which, json.dumps(kwargs | {"progress": progress})],
                          stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "")[-CHILD_STDERR_TAIL:] or "(its stderr is above)"
        raise RuntimeError(f"benchmark child '{which}' failed (exit {proc.returncode}):\n{tail}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}


# ---- the benchmark ----

def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"ulbench bench data: {msg}", file=sys.stderr, flush=True)


def _tree(workdir: Path, resolution: int, n: int, progress: bool) -> tuple[Path, float | None]:
    """The JPEG tree of n crops for ``resolution`` (reused when complete: written to .partial, then renamed)."""
    from ulbench.data.builtin import write_photo_tree

    out = workdir / f"jpeg-r{resolution}-n{n}"
    if out.is_dir():
        return out, None
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    lo, hi = round(SIDE_RANGE[0] * resolution), round(SIDE_RANGE[1] * resolution)
    _log(progress, f"writing {n} JPEG crops, sides {lo}..{hi}, to {out}")
    t0 = time.perf_counter()
    write_photo_tree(staging, n, lo, hi, classes=CLASSES, seed=TREE_SEED, quality=JPEG_QUALITY)
    seconds = time.perf_counter() - t0
    os.rename(staging, out)
    return out, seconds


def _prepare(tree: Path, out: Path, resolution: int, workers: int, max_images: int | None, progress: bool) -> dict:
    """``prepare`` to a zip, timed (None when a complete zip with the same arguments was reused)."""
    from ulbench.data.prepared import prepare

    reused = out.is_file()
    t0 = time.perf_counter()
    s = prepare(tree, out, resolution, workers=max(1, workers), max_images=max_images, progress=progress)
    seconds = time.perf_counter() - t0
    skipped = sum(s["skipped"].values())
    return {"path": str(out), "images": s["images"], "skipped": skipped, "num_classes": s["num_classes"],
            "reused": reused, "seconds": None if reused else round(seconds, 3),
            "img_per_s": None if reused else round((s["images"] + skipped) / seconds, 3),
            "zip_mb": round(out.stat().st_size / 2**20, 1), "workers": max(1, workers)}


def _rss(r: dict) -> dict:
    return {"main": r["main_peak_rss_mb"], "workers": r["workers_peak_rss_mb"]}


def _check(n: int, resolutions, workers: int, batch_size: int, batches: int | None, warmup: int, memory_sizes,
           memory_batches: int | None, encode_images: int, encode_batch_size: int) -> None:
    for name, v, lo in (("--n", n, 1), ("--workers", workers, 0), ("--batch-size", batch_size, 1),
                        ("--warmup", warmup, 0), ("--encode-images", encode_images, 0),
                        ("--encode-batch-size", encode_batch_size, 1)):
        if v < lo:
            raise UserError(f"{name} must be at least {lo}, got {v}")
    for name, v in (("--batches", batches), ("--memory-batches", memory_batches)):
        if v is not None and v < 1:
            raise UserError(f"{name} must be at least 1, got {v}")
    if not resolutions or min(resolutions) < 8:
        raise UserError(f"--resolutions: give one or more sides of at least 8 pixels, got {list(resolutions)}")
    if not memory_sizes or min(memory_sizes) < 1:
        raise UserError(f"--memory-sizes: give one or more positive image counts, got {list(memory_sizes)}")
    if n < batch_size:
        raise UserError(f"--n {n} is smaller than --batch-size {batch_size}: the JPEG baseline (drop_last) would "
                        "yield no batch")


def bench_data(n: int = 5000, resolutions=(256, 512), workers: int = 2, batch_size: int = 64,
               batches: int | None = None, warmup: int = 3, memory_sizes=(1000, 10000),
               memory_batches: int | None = None, encode_images: int = 64, encode_batch_size: int = 16,
               device: str | None = None, workdir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Run the whole benchmark; returns one dict (see the module docstring; ``format_result`` prints it).

    ``batches`` defaults to one epoch of n less the warm-up, ``memory_batches`` to ``batches``. ``workdir`` keeps
    the JPEG trees and prepared zips for a rerun (they are reused; timings of reused prepares are None); without
    it everything goes to a temporary folder removed at the end. ``encode_images=0`` skips the latent cache.
    """
    import torch

    _check(n, resolutions, workers, batch_size, batches, warmup, memory_sizes, memory_batches, encode_images,
           encode_batch_size)
    resolutions, memory_sizes = sorted(set(resolutions)), sorted(set(memory_sizes))
    batches = batches or max(1, n // batch_size - warmup)
    memory_batches = memory_batches or batches
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = None if workdir is not None else tempfile.mkdtemp(prefix="ulbench-bench-data-")
    root = Path(workdir if workdir is not None else tmp).absolute()
    root.mkdir(parents=True, exist_ok=True)
    try:
        loaders = []
        for R in resolutions:
            tree, tree_seconds = _tree(root, R, n, progress)
            prep = _prepare(tree, root / f"prepared-r{R}-n{n}.zip", R, workers, None, progress)
            common = dict(workers=workers, batch_size=batch_size, warmup=warmup, batches=batches)
            _log(progress, f"{R}px: timing the prepared loader and the JPEG baseline ({batches} batches each)")
            a = _run_child("prepared", progress, path=prep["path"], **common)
            b = _run_child("jpeg", progress, path=str(tree), resolution=R, **common)
            loaders.append({
                "resolution": R, "jpeg_tree": str(tree), "jpeg_images": b["dataset_images"],
                "tree_seconds": None if tree_seconds is None else round(tree_seconds, 3), "prepare": prep,
                "prepared": a | {"peak_rss_mb": _rss(a)}, "jpeg": b | {"peak_rss_mb": _rss(b)},
                "ratio": round(a["img_per_s"] / b["img_per_s"], 3), "target_ratio": TARGET_RATIO,
            })

        R = resolutions[0]
        mem_tree = _tree(root, R, max(n, memory_sizes[-1]), progress)[0]
        sizes = []
        for m in memory_sizes:
            prep = _prepare(mem_tree, root / f"memory-r{R}-n{m}.zip", R, workers, m, progress)
            _log(progress, f"memory: {prep['images']} prepared images, {memory_batches} training-like batches")
            r = _run_child("prepared", progress, path=prep["path"], workers=workers, batch_size=batch_size,
                           warmup=0, batches=memory_batches, float_input=True)
            sizes.append({"images": prep["images"], "prepare": prep, "loader": r, "peak_rss_mb": _rss(r)})
        memory = {"resolution": R, "batches": memory_batches, "batch_size": batch_size, "workers": workers,
                  "sizes": sizes, "target_ratio": TARGET_MEMORY_RATIO,
                  "ratio": {k: round(sizes[-1]["peak_rss_mb"][k] / sizes[0]["peak_rss_mb"][k], 3)
                            if sizes[0]["peak_rss_mb"][k] else None for k in ("main", "workers")}}

        latent = None
        if encode_images:
            cache_root = root / f"latents-r{R}"
            shutil.rmtree(cache_root, ignore_errors=True)  # a reused complete cache would time nothing
            _log(progress, f"latent cache: encoding {encode_images} images with {VAE_PRESET} on {device}")
            latent = _run_child("encode", progress, path=loaders[0]["prepare"]["path"], images=encode_images,
                                batch_size=encode_batch_size, workers=workers, root=str(cache_root), device=device)
            latent |= {"resolution": R, "batch_size": encode_batch_size, "encoder": f"{VAE_PRESET} (random init)",
                       "peak_rss_mb": _rss(latent)}
            shutil.rmtree(cache_root, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    import torchvision

    return {
        "config": {"n": n, "resolutions": resolutions, "workers": workers, "batch_size": batch_size,
                   "batches": batches, "warmup": warmup, "memory_sizes": memory_sizes,
                   "memory_batches": memory_batches, "encode_images": encode_images,
                   "encode_batch_size": encode_batch_size, "device": device, "cpu_count": os.cpu_count(),
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
                   "torchvision": torchvision.__version__, "workdir": None if tmp is not None else str(root)},
        "loaders": loaders, "memory": memory, "latent_cache": latent,
    }


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def format_result(r: dict) -> str:
    c = r["config"]
    out = [f"training loader: {c['batches']} batches of {c['batch_size']} after {c['warmup']} warm-up, "
           f"{c['workers']} workers, {c['cpu_count']} CPUs, torch {c['torch']}, torchvision {c['torchvision']}"]
    rows = [[L["resolution"], L["prepare"]["images"], L["prepare"]["skipped"], L["prepare"]["img_per_s"],
             L["prepared"]["img_per_s"], L["jpeg"]["img_per_s"], f"{L['ratio']:.2f}x",
             f"{L['prepared']['peak_rss_mb']['main']:.0f} / {L['prepared']['peak_rss_mb']['workers']:.0f}",
             f"{L['jpeg']['peak_rss_mb']['main']:.0f} / {L['jpeg']['peak_rss_mb']['workers']:.0f}"]
            for L in r["loaders"]]
    out.append(_table(["R", "prepared", "skipped", "prepare img/s", "prepared img/s", "jpeg img/s",
                       f"ratio (target >= {TARGET_RATIO:g}x)", "prepared RSS MB main / worker",
                       "jpeg RSS MB main / worker"], rows))
    m = r["memory"]
    out += ["", f"memory: training-like process, prepared loader at {m['resolution']}px, {m['batches']} batches of "
            f"{m['batch_size']}, {m['workers']} workers"]
    rows = [[s["images"], s["loader"]["img_per_s"], f"{s['peak_rss_mb']['main']:.1f}",
             f"{s['peak_rss_mb']['workers']:.1f}"] for s in m["sizes"]]
    out.append(_table(["images", "img/s", "main peak RSS MB", "worker peak RSS MB"], rows))
    ratio = m["ratio"]
    out.append(f"largest / smallest: main {ratio['main']}, workers {ratio['workers']} (target <= "
               f"{TARGET_MEMORY_RATIO:g})")
    lc = r["latent_cache"]
    if lc is not None:
        out += ["", f"latent cache: build_latent_cache, {lc['encoder']} encoder (posterior mean + std), "
                f"{lc['images']} images at {lc['resolution']}px, batch {lc['batch_size']}, device {lc['device']} "
                f"({lc['device_name']}): {lc['img_per_s']} img/s, latents {lc['latent_shape']}, peak RSS "
                f"{lc['peak_rss_mb']['main']:.0f} MB"]
    if c["workdir"]:
        out += ["", f"workdir (kept): {c['workdir']}"]
    return "\n".join(out)
