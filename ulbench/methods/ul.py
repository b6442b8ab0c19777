"""Unified Latents as a harness method: stage 1 (encoder, prior, decoder) then stage 2 (base model on latents)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ulbench.methods.base import StepInputs, apply_overrides


class UL:
    name = "ul"
    stages = ("stage1", "stage2")
    reconstructs = True

    def presets(self) -> dict[str, Any]:
        from ul_model.config import PRESETS

        return PRESETS

    def resolve(self, preset: str, overrides: dict, resolution: int | None = None,
                num_classes: int | None = None) -> Any:
        cfg = apply_overrides(self.presets()[preset], overrides or {})
        if resolution is not None:
            cfg = replace(cfg, resolution=resolution)
        if num_classes is not None:
            cfg = replace(cfg, num_classes=num_classes)
        return cfg

    def step_inputs(self, config: Any, stage: str, batch_size: int, device: str | torch.device) -> StepInputs:
        """A real training step of one stage on random inputs of the right shape (stage 2: latents + labels)."""
        from ul_model.model import UnifiedLatents

        with torch.device(device):
            model = UnifiedLatents(config).set_stage(1 if stage == "stage1" else 2)
            labels = torch.zeros(batch_size, dtype=torch.long)
            if stage == "stage1":
                x = torch.rand(batch_size, config.image_channels, config.resolution, config.resolution) * 2 - 1
                return StepInputs(model, lambda net, b: net(b[0]), (x, labels))
            z = torch.randn(batch_size, *config.latent_shape)
            return StepInputs(model, lambda net, b: net(b[0], b[1]), (z, labels))

    def runner(self, config, train, workdir: Path, device, precision, images, labels, progress):
        raise NotImplementedError  # filled in by the sweep work (same session)
