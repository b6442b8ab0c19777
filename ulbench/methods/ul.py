"""Unified Latents as a harness method: stage 1 (encoder, prior, decoder) then stage 2 (base model on latents)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ul_model.stages import image_input
from ulbench.methods.base import NetworkCall, RunnerBase, StepInputs, TrainData, apply_overrides


def stage2_latent_name(cfg) -> str:
    """What a UL latent cache holds (part of its key): z_clean, and for clips the context latent beside it."""
    return f"ul z_clean + context latent ({cfg.context_frames} frames)" if cfg.video else "ul z_clean"


def _interval(sampler: dict) -> tuple[float, float] | None:
    """The sampler's guidance interval [lo, hi] in log-SNR (None: guidance at every step)."""
    interval = sampler.get("guidance_interval")
    return None if interval is None else (float(interval[0]), float(interval[1]))


class UL:
    name = "ul"
    stages = ("stage1", "stage2")
    reconstructs = True
    # ul_model.sampling: ancestral | ddim, base-model and decoder steps, guidance only inside a log-SNR interval
    sampler_keys = ("method", "steps", "decoder_steps", "guidance_interval")
    path_overrides = ()

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

    def stages_for(self, config: Any) -> tuple[str, ...]:
        return self.stages

    def train_recipe(self, config: Any, stage: str) -> dict:
        return {}  # the paper states no optimizer settings (ul-method.md section 4): TrainConfig's [choice] values

    def sampler_recipe(self, config: Any) -> dict:
        return {}  # the paper's step counts are not stated: the suite's evaluation.sampler

    def trains_unconditional(self, config: Any) -> bool:
        return config.diffusion.label_dropout > 0

    def step_inputs(self, config: Any, stage: str, batch_size: int, device: str | torch.device) -> StepInputs:
        """A real training step of one stage on random inputs of the right shape (stage 2: latents + labels)."""
        from ul_model.model import UnifiedLatents

        with torch.device(device):
            model = UnifiedLatents(config).set_stage(1 if stage == "stage1" else 2)
            labels = torch.zeros(batch_size, dtype=torch.long)
            if stage == "stage1":
                x = torch.rand(batch_size, *config.data_shape) * 2 - 1
                return StepInputs(model, lambda net, b: net(b[0]), (x, labels))
            c, *grid = config.latent_shape  # clips: stage 2 trains on (z_clean, context latent) channels
            z = torch.randn(batch_size, 2 * c if config.video else c, *grid)
            return StepInputs(model, lambda net, b: net(b[0], b[1]), (z, labels))

    def evaluation_calls(self, config: Any, sampler: dict, batch_size: int,
                         device: str | torch.device) -> dict[str, list[NetworkCall]]:
        """The networks ``ULRunner.sample`` and ``reconstruct`` (with ``bits_per_pixel``) run per image."""
        from ul_model.model import UnifiedLatents

        with torch.device(device):
            model = UnifiedLatents(config).eval()
            x = torch.zeros(batch_size, *config.data_shape)
            z = torch.zeros(batch_size, *config.latent_shape)
            lam, labels = torch.zeros(batch_size), torch.zeros(batch_size, dtype=torch.long)
        # ul_model.sampling.sample: one prediction per step, then the final clean one
        decoder = NetworkCall("decoder", sampler["decoder_steps"] + 1, lambda: model.decoder(x, lam, z))
        context = [NetworkCall("encoder (context)", 1, lambda: model.encoder(x))] if config.video else []
        z_ctx = z if config.video else None
        return {"sample": [*context, NetworkCall("base model", sampler["steps"] + 1,
                                                 lambda: model.base(z, lam, labels, z_ctx), guided=True), decoder],
                "reconstruct": [NetworkCall("encoder", 1, lambda: model.encoder(x)), decoder,
                                NetworkCall("bits/pixel (stage-1 terms)", 1, lambda: model.stage1_terms(x))]}

    def runner(self, config: Any, train: dict[str, dict], workdir: Path, device: str, precision: str,
               data: TrainData, progress: bool) -> ULRunner:
        return ULRunner(config, train, workdir, device, precision, data, progress)


class ULRunner(RunnerBase):
    """UL trained in ``workdir/stage1`` and ``workdir/stage2`` (ul_model.stages run directories)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._models: dict[str, Any] = {}

    def train(self, stage: str, steps: int, resume: bool = True) -> None:
        """Train ``stage`` up to ``steps`` in total: continues from the stage's latest checkpoint when there is one."""
        from ul_model.stages import stage2_model, train_stage1, train_stage2
        from ulbench.assets import sha256_file

        tcfg = self.train_config(stage, steps)
        out, data = self.workdir / stage, self.data.record()
        if stage == "stage1":
            train_stage1(self.config, self.batches(self.image_set(), tcfg), tcfg, out, resume=resume,
                         device=self.device, progress=self.progress, data=data)
        else:
            model = stage2_model(self.workdir / "stage1", self.config.base, seed=tcfg.seed)
            model.encoder.to(self.device).eval()
            latents = self.latent_set(stage2_latent_name(model.cfg), sha256_file(self.checkpoint_file("stage1")),
                                      lambda x: model.stage2_latents(image_input(x.to(self.device))))
            train_stage2(model, self.batches(latents, tcfg), tcfg, out, self.workdir / "stage1", resume=resume,
                         device=self.device, progress=self.progress, data=data)
        self._models.pop(stage, None)

    def _model(self, stage: str):
        from ul_model.stages import load_run

        if stage not in self._models:
            self._models[stage] = load_run(self.workdir / stage, "ema")[0].to(self.device)
        return self._models[stage]

    def sample(self, seeds: list[int], labels: torch.Tensor | None, sampler: dict, guidance: float) -> torch.Tensor:
        """Alg. 2 with per-sample seeds; images in [-1, 1]."""
        labels = None if labels is None else labels.to(self.device)
        return self._model("stage2").generate(seeds, labels, steps=sampler["steps"],
                                              decoder_steps=sampler["decoder_steps"], guidance=guidance,
                                              guidance_interval=_interval(sampler), method=sampler["method"])

    def predict(self, context: torch.Tensor, seeds: list[int], labels: torch.Tensor | None, sampler: dict,
                guidance: float) -> torch.Tensor:
        """Frame prediction: clips (N, 3, T, R, R) in [-1, 1] whose first ``context_frames`` frames are given."""
        labels = None if labels is None else labels.to(self.device)
        return self._model("stage2").generate(seeds, labels, steps=sampler["steps"],
                                              decoder_steps=sampler["decoder_steps"], guidance=guidance,
                                              guidance_interval=_interval(sampler), method=sampler["method"],
                                              context=context.to(self.device))

    def reconstruct(self, x: torch.Tensor, seeds: list[int], sampler: dict) -> torch.Tensor:
        return self._model("stage1").reconstruct(x.to(self.device), seeds, steps=sampler["decoder_steps"],
                                                 method=sampler["method"])

    @torch.no_grad()
    def bits_per_pixel(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """Per-image rate: the prior's L_z in bits per pixel (section 2.7), a seeded Monte-Carlo estimate."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._model("stage1").stage1_terms(x.to(self.device)).bits_per_pixel.float().cpu()
