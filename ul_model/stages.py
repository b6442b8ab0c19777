"""Stage 1 and Stage 2 runs: a run directory holds config.json, checkpoints and metrics.jsonl.

Stage 2 loads the stage-1 run's EMA weights, freezes encoder and decoder, encodes the training images once into
``latents.safetensors`` (z_clean and labels) and trains the base model on those cached latents.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from ul_model.config import BaseModelConfig, DecoderConfig, DiffusionConfig, EncoderConfig, TransformerConfig, ULConfig
from ul_model.io import atomic_bytes, atomic_write
from ul_model.model import UnifiedLatents
from ul_model.train import TrainConfig, step_batches, train

ENCODE_BATCH = 64


def _config_from_dict(d: dict) -> ULConfig:
    dec = dict(d["decoder"])
    dec["middle"] = TransformerConfig(**dec["middle"])
    tup = lambda cfg: {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}  # noqa: E731
    return ULConfig(name=d["name"], resolution=d["resolution"], image_channels=d["image_channels"],
                    num_classes=d["num_classes"], encoder=EncoderConfig(**tup(d["encoder"])),
                    prior=TransformerConfig(**d["prior"]), decoder=DecoderConfig(**tup(dec)),
                    base=BaseModelConfig(**tup(d["base"])), diffusion=DiffusionConfig(**d["diffusion"]))


def write_run_config(out: Path, cfg: ULConfig, stage: int, extra: dict) -> None:
    with atomic_write(out / "config.json") as f:
        json.dump({"stage": stage, "model": cfg.to_dict(), **extra}, f, indent=2)


def load_run(run: str | Path, weights: str = "ema") -> tuple[UnifiedLatents, dict]:
    """The model of a run directory, from its latest checkpoint (``ema`` or raw ``weights``)."""
    run = Path(run)
    if not (run / "config.json").is_file() or not (run / "latest.json").is_file():
        raise FileNotFoundError(f"{run}: not a finished or checkpointed run (no config.json / latest.json)")
    meta = json.loads((run / "config.json").read_text())
    model = UnifiedLatents(_config_from_dict(meta["model"]))
    ckpt = run / json.loads((run / "latest.json").read_text())["checkpoint"]
    model.load_state_dict(load_file(str(ckpt / f"{weights}.safetensors")))
    return model.eval(), meta


def train_stage1(cfg: ULConfig, images: torch.Tensor, labels: torch.Tensor, tcfg: TrainConfig, out: str | Path,
                 resume: bool = False, device: str = "cpu", progress: bool = True, data_name: str = "") -> list[dict]:
    out = Path(out)
    torch.manual_seed(tcfg.seed)
    model = UnifiedLatents(cfg).set_stage(1)
    write_run_config(out, cfg, 1, {"train": asdict(tcfg), "data": data_name})
    return train(model, lambda net, b: net(b[0]),
                 lambda start: step_batches(images, labels, tcfg.batch_size, tcfg.seed, start),
                 tcfg, out, resume=resume, device=device, progress=progress)


@torch.no_grad()
def cache_latents(model: UnifiedLatents, images: torch.Tensor, labels: torch.Tensor, path: Path,
                  device: str = "cpu", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """z_clean of every training image, computed once and stored as safetensors (reused if present)."""
    if path.is_file():
        cached = load_file(str(path))
        if cached["z"].shape[0] == images.shape[0]:
            return cached["z"], cached["labels"]
    enc = model.encoder.to(device).eval()
    zs = [enc(images[i: i + ENCODE_BATCH].to(device)).cpu()
          for i in tqdm(range(0, len(images), ENCODE_BATCH), disable=not progress, desc="encode latents")]
    z = torch.cat(zs).contiguous()
    atomic_bytes(path, save({"z": z, "labels": labels.contiguous()}))
    return z, labels


def train_stage2(stage1_run: str | Path, images: torch.Tensor, labels: torch.Tensor, tcfg: TrainConfig,
                 out: str | Path, base: BaseModelConfig | None = None, resume: bool = False, device: str = "cpu",
                 progress: bool = True, data_name: str = "") -> list[dict]:
    out = Path(out)
    stage1, _ = load_run(stage1_run, "ema")
    cfg = replace(stage1.cfg, base=base) if base is not None else stage1.cfg
    torch.manual_seed(tcfg.seed)
    model = UnifiedLatents(cfg)
    model.load_state_dict({k: v for k, v in stage1.state_dict().items() if not k.startswith("base.")}, strict=False)
    model.set_stage(2)
    z, y = cache_latents(model, images, labels, out / "latents.safetensors", device, progress)
    write_run_config(out, cfg, 2, {"train": asdict(tcfg), "stage1": str(stage1_run), "data": data_name})
    return train(model, lambda net, b: net(b[0], b[1]),
                 lambda start: step_batches(z, y, tcfg.batch_size, tcfg.seed, start),
                 tcfg, out, resume=resume, device=device, progress=progress)
