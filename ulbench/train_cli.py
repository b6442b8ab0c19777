"""`ulbench train stage1|stage2`, `sample`, `reconstruct`, `ls presets`: thin wrappers over ul_model."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ulbench.data.base import XFlip
from ulbench.errors import UserError
from ulbench.methods.base import TrainData, latest_checkpoint_file, latent_training_set, training_batches
from ulbench.methods.ul import stage2_latent_name

SAMPLE_BATCH = 16


def _train_config(args):
    from ul_model.train import TrainConfig, distributed, micro_batches

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                      log_every=args.log_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
                      ema_decay=args.ema, precision=args.precision, compile=args.compile, micro_batch=args.micro_batch,
                      keep_checkpoints=args.keep_checkpoints, max_nonfinite_steps=args.max_nonfinite_steps)
    try:
        micro_batches(cfg, distributed()[1])
    except ValueError as e:
        raise UserError(f"--batch-size/--micro-batch: {e}") from None
    return cfg


def _preset(name: str):
    from ul_model.config import PRESETS

    if name not in PRESETS:
        raise UserError(f"--preset '{name}' unknown; available: {', '.join(PRESETS)} (see `ulbench ls presets`)")
    return PRESETS[name]


def _check_out(out: Path, resume: bool) -> None:
    if (out / "latest.json").exists() and not resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")


def _train_data(spec: str, resolution: int, args, frames: int = 0) -> TrainData:
    from ulbench.data import load_dataset

    if not spec:
        raise UserError("no dataset: pass --data (photos, fashion-mnist, a prepared dataset or an image folder; "
                        "video presets: clips, prepared clips, an .npz of clips or a folder of videos)")
    if args.kinetics_csv and not frames:
        raise UserError("--kinetics-csv reads video clips: use a video preset (video-ul-tiny, video-ul-small, ...)")
    ds = load_dataset(spec, resolution, frames, kinetics=(args.kinetics_csv, args.split) if args.kinetics_csv else None)
    source = spec if spec in ("photos", "fashion-mnist", "clips") else str(Path(spec).expanduser().resolve())
    return TrainData(ds, xflip=args.xflip, workers=args.workers, source=source)


def _recorded_spec(meta: dict) -> str:
    """The dataset spec a run directory recorded (older runs stored the spec string itself)."""
    data = meta.get("data") or ""
    return data.get("spec", "") if isinstance(data, dict) else data


def _recorded_dataset(run: str, meta: dict, cfg):
    """The images a run trained on, from what its config.json recorded: a sweep's stage records the suite's whole
    dataset section (split, subset, absolute path), reopened as the sweep opened it; `ulbench train` runs record the
    ``--data`` spec. Nothing recorded (or an empty spec) is an error: never a default that reads whatever is here."""
    from types import SimpleNamespace

    from ulbench.data import load_dataset, load_suite_dataset
    from ulbench.suite.schema import DatasetSpec

    where = Path(run) / "config.json"
    data = meta.get("data") or {}
    section = data.get("suite_dataset") if isinstance(data, dict) else None
    if section:
        try:
            spec = DatasetSpec(**section)
        except TypeError as e:
            raise UserError(f"{where}: data.suite_dataset is not a dataset section ({e}); pass --data") from None
        ds = load_suite_dataset(SimpleNamespace(file=where), spec, "data.suite_dataset")
    else:
        spec = _recorded_spec(meta)
        if not spec or not str(spec).strip():
            raise UserError(f"{where}: records no dataset (data.spec is empty); pass --data with the images it "
                            "trained on (photos, fashion-mnist, a prepared dataset or an image folder)")
        ds = load_dataset(spec, cfg.resolution)
    if ds.resolution != cfg.resolution:
        raise UserError(f"{where}: the recorded dataset is {ds.resolution}px, the model {cfg.resolution}px; pass --data")
    return ds


def cmd_train_stage1(args) -> None:
    from ul_model.stages import train_stage1

    cfg = _preset(args.preset)
    data = _train_data(args.data, cfg.resolution, args, cfg.frames)
    _check_out(Path(args.out), args.resume)
    if data.dataset.num_classes > cfg.num_classes:
        raise UserError(f"{args.data} has {data.dataset.num_classes} classes but preset {cfg.name} embeds "
                        f"{cfg.num_classes}")
    tcfg = _train_config(args)
    images = XFlip(data.dataset) if data.xflip else data.dataset
    log = train_stage1(cfg, training_batches(images, tcfg, data.workers, args.device), tcfg, args.out,
                       resume=args.resume, device=args.device, data=data.record())
    print(json.dumps(log[-1] if log else {"step": "already finished"}))


def cmd_train_stage2(args) -> None:
    from ul_model.stages import image_input, load_run, stage2_model, train_stage2
    from ulbench.assets import sha256_file

    try:
        _, meta = load_run(args.stage1)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    data = _train_data(args.data or _recorded_spec(meta), meta["model"]["resolution"], args,
                       meta["model"].get("frames", 0))
    _check_out(Path(args.out), args.resume)
    tcfg = _train_config(args)
    model = stage2_model(args.stage1, _preset(args.preset).base if args.preset else None, seed=tcfg.seed)
    model.encoder.to(args.device).eval()
    latents = latent_training_set(Path(args.out) / "latents", stage2_latent_name(model.cfg),
                                  sha256_file(latest_checkpoint_file(Path(args.stage1))),
                                  lambda x: model.stage2_latents(image_input(x.to(args.device))), data, progress=True)
    log = train_stage2(model, training_batches(latents, tcfg, data.workers, args.device), tcfg, args.out,
                       args.stage1, resume=args.resume, device=args.device, data=data.record())
    print(json.dumps(log[-1] if log else {"step": "already finished"}))


def _save_pngs(images: torch.Tensor, out: Path, start: int) -> None:
    from PIL import Image

    from ulbench.metrics.images import quantize_images

    out.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(quantize_images(images).permute(0, 2, 3, 1).cpu().numpy()):
        Image.fromarray(a).save(out / f"{start + i:06d}.png")


def _load(run: str, device: str):
    from ul_model.stages import load_run

    try:
        model, meta = load_run(run)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    return model.to(device), meta


def _images_only(model, run: str, verb: str) -> None:
    if model.cfg.video:
        raise UserError(f"{run} is a video run ({model.cfg.name}); `ulbench {verb}` writes PNG images. Evaluate clips "
                        "with a clip suite (e.g. `ulbench run suites/video-smoke.yaml`), which stores predictions, "
                        "reconstructions and strips")


def cmd_sample(args) -> None:
    """Under torchrun each rank takes every world-th batch; sample i always uses seed + i, so the images do not
    depend on batch size or on the number of processes."""
    from tqdm.auto import tqdm

    from ul_model.train import distributed

    rank, world = distributed()
    model, meta = _load(args.run, args.device)
    _images_only(model, args.run, "sample")
    if meta["stage"] != 2:
        raise UserError(f"{args.run} is a stage-{meta['stage']} run; sampling needs a stage-2 run (base model)")
    out = Path(args.out)
    for lo in tqdm(range(rank * SAMPLE_BATCH, args.n, world * SAMPLE_BATCH), desc="sample", unit="batch",
                   disable=rank != 0):
        seeds = [args.seed + i for i in range(lo, min(lo + SAMPLE_BATCH, args.n))]
        labels = None
        if args.label is not None:
            labels = torch.full((len(seeds),), args.label, dtype=torch.long, device=args.device)
        x = model.generate(seeds, labels, steps=args.steps, decoder_steps=args.decoder_steps,
                           guidance=args.guidance, method=args.sampler)
        _save_pngs(x, out, lo)
    if rank == 0:
        print(json.dumps({"n": args.n, "out": str(out)}))


def cmd_reconstruct(args) -> None:
    from ulbench.data import load_dataset
    from ulbench.data.base import to_float

    model, meta = _load(args.run, args.device)
    _images_only(model, args.run, "reconstruct")
    ds = load_dataset(args.data, model.cfg.resolution) if args.data else _recorded_dataset(args.run, meta, model.cfg)
    out = Path(args.out)
    for lo, (x, _) in zip(range(0, args.n, SAMPLE_BATCH), ds.batches(args.n, SAMPLE_BATCH)):
        x = to_float(x).to(args.device)
        r = model.reconstruct(x, [args.seed + i for i in range(lo, lo + len(x))], steps=args.steps)
        _save_pngs(x, out / "originals", lo)
        _save_pngs(r, out / "reconstructions", lo)
    print(json.dumps({"n": args.n, "originals": str(out / "originals"), "reconstructions": str(out / "reconstructions")}))


def cmd_ls_presets(args) -> None:
    """Every kind's presets: image resolution, latent shape, trainable parameters per stage (built on meta)."""
    from ulbench.flops import trainable_params
    from ulbench.methods import KINDS

    for kind in KINDS.values():
        for name in kind.presets():
            cfg = kind.resolve(name, {})
            params = {s: trainable_params(kind.step_inputs(cfg, s, 1, "meta").module) for s in kind.stages_for(cfg)}
            parts = "  ".join(f"{s} {v / 1e6:.2f}M" for s, v in params.items())
            print(f"{kind.name:5s} {name:10s} {cfg.resolution:4d}px latent {'x'.join(map(str, cfg.latent_shape)):9s} "
                  f"{parts}  total {sum(params.values()) / 1e6:.2f}M")


def add_train_args(p) -> None:
    from ul_model.train import TrainConfig

    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split across torchrun ranks)")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="per-rank micro-batch, gradient accumulation (default 0: a rank's whole share)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--keep-checkpoints", type=int, default=TrainConfig.keep_checkpoints, metavar="K",
                   help="keep the newest K checkpoints, delete older ones (0: keep every one; default %(default)s)")
    p.add_argument("--max-nonfinite-steps", type=int, default=TrainConfig.max_nonfinite_steps, metavar="N",
                   help="skip up to N steps with a NaN/inf loss or gradient, then stop with an error (default "
                        "%(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--xflip", action="store_true", help="train on mirrored copies too (EDM2's xflip)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0: main process)")
    p.add_argument("--kinetics-csv", default=None, metavar="CSV",
                   help="video presets: the official Kinetics annotation CSV; --data is then the folder of its clips")
    p.add_argument("--split", default="train", help="with --kinetics-csv: train, val (validate) or test")


