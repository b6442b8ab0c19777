"""Stage 1 and Stage 2 runs: a run directory holds config.json, checkpoints and metrics.jsonl.

Both stages take their data as ``batches(start_step)``, any iterator of batches (ul_model knows no datasets): stage 1
(images, labels), stage 2 (z_clean, labels) of the frozen stage-1 encoder, which the caller caches once
(``stage2_model`` gives the model whose ``encoder`` to use).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from ul_model.config import BaseModelConfig, DecoderConfig, DiffusionConfig, EncoderConfig, TransformerConfig, ULConfig
from ul_model.io import atomic_write
from ul_model.model import UnifiedLatents
from ul_model.train import TrainConfig, train


def _config_from_dict(d: dict) -> ULConfig:
    dec = dict(d["decoder"])
    dec["middle"] = TransformerConfig(**dec["middle"])
    tup = lambda cfg: {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}  # noqa: E731
    return ULConfig(name=d["name"], resolution=d["resolution"], image_channels=d["image_channels"],
                    num_classes=d["num_classes"], encoder=EncoderConfig(**tup(d["encoder"])),
                    prior=TransformerConfig(**d["prior"]), decoder=DecoderConfig(**tup(dec)),
                    base=BaseModelConfig(**tup(d["base"])), diffusion=DiffusionConfig(**d["diffusion"]),
                    frames=d.get("frames", 0), context_frames=d.get("context_frames", 0))


def write_run_config(out: Path, cfg: ULConfig, stage: int, extra: dict) -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # rank 0 writes the run directory
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


def image_input(x: torch.Tensor) -> torch.Tensor:
    """Training images as the networks take them: uint8 batches (streamed datasets) map to [-1, 1] on the device."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x


def train_stage1(cfg: ULConfig, batches: Callable[[int], Iterator[tuple]], tcfg: TrainConfig, out: str | Path,
                 resume: bool = False, device: str = "cpu", progress: bool = True, data: dict | None = None
                 ) -> list[dict]:
    """``batches(start_step)`` yields (images, labels) from that step on: images (B, 3, R, R) uint8 or in [-1, 1]."""
    out = Path(out)
    torch.manual_seed(tcfg.seed)
    model = UnifiedLatents(cfg).set_stage(1)
    write_run_config(out, cfg, 1, {"train": asdict(tcfg), "data": data or {}})
    return train(model, lambda net, b: net(image_input(b[0])), batches, tcfg, out, resume=resume, device=device,
                 progress=progress)


def stage2_model(stage1_run: str | Path, base: BaseModelConfig | None = None, seed: int = 0) -> UnifiedLatents:
    """A stage-2 model: the stage-1 run's EMA encoder, prior and decoder (frozen) and a fresh base model."""
    stage1, _ = load_run(stage1_run, "ema")
    cfg = replace(stage1.cfg, base=base) if base is not None else stage1.cfg
    torch.manual_seed(seed)
    model = UnifiedLatents(cfg)
    model.load_state_dict({k: v for k, v in stage1.state_dict().items() if not k.startswith("base.")}, strict=False)
    return model.set_stage(2)


def train_stage2(model: UnifiedLatents, batches: Callable[[int], Iterator[tuple]], tcfg: TrainConfig,
                 out: str | Path, stage1_run: str | Path, resume: bool = False, device: str = "cpu",
                 progress: bool = True, data: dict | None = None) -> list[dict]:
    """``batches(start_step)`` yields (z_clean, labels): latents of the frozen encoder (``model.encoder``)."""
    out = Path(out)
    write_run_config(out, model.cfg, 2, {"train": asdict(tcfg), "stage1": str(stage1_run), "data": data or {}})
    return train(model, lambda net, b: net(b[0], b[1]), batches, tcfg, out, resume=resume, device=device,
                 progress=progress)
