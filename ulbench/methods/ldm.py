"""SD-latent baselines as harness methods: a KL-VAE (stage 1) and a diffusion backbone on its latents (stage 2).

``dit`` puts DiT on the latents (DiT's single scale 0.18215 by default), ``edm2`` the EDM2 magnitude-preserving U-Net
(EDM2's per-channel standardization). Stage 1 trains the VAE, or loads a user's diffusers ``AutoencoderKL`` folder
(``vae.pretrained``) frozen, in which case the method has no stage 1 and no stage-1 FLOPs. Stage 2 encodes the
training images once (posterior mean and std, cached) and samples a latent per image and step, as LDM does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from ulbench.methods.base import StepInputs, apply_overrides, stage_train_config

ENCODE_BATCH = 64


@dataclass(frozen=True)
class LDMConfig:
    name: str
    resolution: int  # image side; the backbone's latent side is resolution / vae.downsample
    vae: Any  # baselines.kl_vae.KLVAEConfig
    backbone: Any  # baselines.dit.DiTConfig | baselines.edm2.EDM2Config

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        r = self.resolution // self.vae.downsample
        return (self.vae.latent_channels, r, r)

    @property
    def num_classes(self) -> int:
        return _num_classes(self.backbone)


def _num_classes(backbone) -> int:
    return backbone.num_classes if hasattr(backbone, "num_classes") else backbone.label_dim


def _with_classes(backbone, n: int):
    return replace(backbone, **{"num_classes" if hasattr(backbone, "num_classes") else "label_dim": n})


class LDM:
    """One kind per backbone family; presets are the family's (``dit-xl-2``, ``edm2-s``, ...) with a VAE."""

    stages = ("stage1", "stage2")
    reconstructs = True

    def __init__(self, name: str, family: str, default_vae: str, tiny_vae: str, latent_norm: str):
        self.name, self.family = name, family
        self.default_vae, self.tiny_vae, self.latent_norm = default_vae, tiny_vae, latent_norm

    def _module(self):
        import importlib

        return importlib.import_module(f"baselines.{self.family}")

    def presets(self) -> dict[str, LDMConfig]:
        from baselines.kl_vae import VAE_PRESETS

        fam = self._module()
        backbones = getattr(fam, f"{self.family.upper()}_PRESETS")
        out = {}
        for name, bb in backbones.items():
            tiny = name.endswith("tiny")
            vae = replace(VAE_PRESETS[self.tiny_vae if tiny else self.default_vae], latent_norm=self.latent_norm)
            out[name] = LDMConfig(name, bb.latent_resolution * vae.downsample, vae, bb)
        return out

    def resolve(self, preset: str, overrides: dict, resolution: int | None = None,
                num_classes: int | None = None) -> LDMConfig:
        cfg = apply_overrides(self.presets()[preset], overrides or {})
        if cfg.vae.pretrained and Path(cfg.vae.pretrained).expanduser().is_dir():
            # a user's folder fixes the VAE's shape and scale; the suite keeps its choice of normalization
            from baselines.kl_vae import config_for_folder

            cfg = replace(cfg, vae=config_for_folder(cfg.vae.pretrained, latent_norm=cfg.vae.latent_norm))
        if resolution is not None:
            cfg = replace(cfg, resolution=resolution)
        if cfg.resolution % cfg.vae.downsample:
            raise ValueError(f"resolution {cfg.resolution} is not a multiple of the VAE's {cfg.vae.downsample}x "
                             "downsampling")
        bb = replace(cfg.backbone, latent_resolution=cfg.resolution // cfg.vae.downsample,
                     latent_channels=cfg.vae.latent_channels)
        if num_classes is not None:
            bb = _with_classes(bb, num_classes)
        return replace(cfg, backbone=bb)

    def check_files(self, config: LDMConfig) -> None:
        """Before any training: a user's VAE folder must exist and hold a save_pretrained layout."""
        if config.vae.pretrained:
            from baselines.kl_vae import _check_folder

            _check_folder(Path(config.vae.pretrained).expanduser())

    def stages_for(self, config: LDMConfig) -> tuple[str, ...]:
        return ("stage2",) if config.vae.pretrained else self.stages

    def step_inputs(self, config: LDMConfig, stage: str, batch_size: int, device) -> StepInputs:
        from baselines import kl_vae

        fam = self._module()
        with torch.device(device):
            labels = torch.zeros(batch_size, dtype=torch.long)
            if stage == "stage1":
                vae = kl_vae.build_vae(replace(config.vae, pretrained=None))
                x = torch.rand(batch_size, config.vae.in_channels, config.resolution, config.resolution) * 2 - 1
                return StepInputs(vae, lambda net, b: kl_vae.vae_losses(net, config.vae, b[0]), (x,))
            model = fam.build(config.backbone)
            z = torch.randn(batch_size, *config.latent_shape)
            return StepInputs(model, lambda net, b: fam.training_losses(net, config.backbone, b[0], b[1]), (z, labels))

    def runner(self, config: LDMConfig, train: dict[str, dict], workdir: Path, device: str, precision: str,
               images: torch.Tensor, labels: torch.Tensor, progress: bool) -> LDMRunner:
        return LDMRunner(self, config, train, workdir, device, precision, images, labels, progress)


def _latest_weights(out: Path, which: str = "ema") -> dict:
    ckpt = out / json.loads((out / "latest.json").read_text())["checkpoint"]
    return load_file(str(ckpt / f"{which}.safetensors"))


class LDMRunner:
    """Stage 1 (VAE) in ``workdir/stage1``, stage 2 (backbone on cached latents) in ``workdir/stage2``."""

    def __init__(self, kind: LDM, config: LDMConfig, train: dict[str, dict], workdir: Path, device: str,
                 precision: str, images: torch.Tensor, labels: torch.Tensor, progress: bool):
        self.kind, self.config, self.train_overrides, self.workdir = kind, config, train, Path(workdir)
        self.device, self.precision, self.progress = device, precision, progress
        self.images, self.labels = images, labels
        self._vae = self._backbone = None

    def train_config(self, stage: str, steps: int):
        return stage_train_config(self.train_overrides, stage, steps, self.precision)

    def trained_steps(self, stage: str) -> int:
        latest = self.workdir / stage / "latest.json"
        return json.loads(latest.read_text())["step"] if latest.is_file() else 0

    def vae(self):
        """The frozen VAE: a user's folder, or stage 1's EMA weights."""
        from baselines import kl_vae

        if self._vae is None:
            if self.config.vae.pretrained:
                vae = kl_vae.load_vae_folder(self.config.vae.pretrained)
            else:
                vae = kl_vae.build_vae(self.config.vae)
                vae.load_state_dict(_latest_weights(self.workdir / "stage1"))
            self._vae = vae.to(self.device).eval().requires_grad_(False)
        return self._vae

    def backbone(self):
        if self._backbone is None:
            model = self.kind._module().build(self.config.backbone)
            model.load_state_dict(_latest_weights(self.workdir / "stage2"))
            self._backbone = model.to(self.device).eval()
        return self._backbone

    def train(self, stage: str, steps: int, resume: bool = True) -> None:
        from baselines import kl_vae
        from ul_model.train import step_batches, train

        tcfg = self.train_config(stage, steps)
        out = self.workdir / stage
        torch.manual_seed(tcfg.seed)
        if stage == "stage1":
            model = kl_vae.build_vae(self.config.vae)
            loss_fn = lambda net, b: kl_vae.vae_losses(net, self.config.vae, b[0])
            data = (self.images, self.labels)
        else:
            fam = self.kind._module()
            model = fam.build(self.config.backbone)
            mean, std = self.latent_moments()
            norm = self.latent_norm()

            def loss_fn(net, b):
                m, s = b[0].unbind(1)  # posterior mean and std, (B, C, h, w) each
                # one posterior sample per image and step (LDM), then the baseline's latent normalization
                return fam.training_losses(net, self.config.backbone, norm.normalize(m + s * torch.randn_like(m)),
                                           b[1])

            data = (torch.stack([mean, std], 1), self.labels)
        batches = lambda start: step_batches(*data, tcfg.batch_size, tcfg.seed, start)
        train(model, loss_fn, batches, tcfg, out, resume=resume, device=self.device, progress=self.progress)
        self._vae = None if stage == "stage1" else self._vae
        self._backbone = None

    @torch.no_grad()
    def latent_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of every training image, computed once and cached beside stage 2's checkpoints."""
        path = self.workdir / "stage2" / "latents.safetensors"
        if path.is_file():
            cached = load_file(str(path))
            if cached["mean"].shape[0] == len(self.images):
                return cached["mean"], cached["std"]
        from ul_model.io import atomic_bytes

        vae, means, stds = self.vae(), [], []
        for i in tqdm(range(0, len(self.images), ENCODE_BATCH), desc="encode latents", disable=not self.progress):
            post = vae.encode(self.images[i: i + ENCODE_BATCH].to(self.device)).latent_dist
            means.append(post.mean.float().cpu())
            stds.append(post.std.float().cpu())
        mean, std = torch.cat(means).contiguous(), torch.cat(stds).contiguous()
        atomic_bytes(path, save({"mean": mean, "std": std}))
        return mean, std

    def latent_norm(self):
        """The baseline's latent normalization. A user's VAE keeps its configured statistics (SD: 0.18215; EDM2's
        per-channel mean/std); for a VAE the harness trained they are measured on its training latents the way SD
        derived 0.18215 (one over the latents' std) and EDM2 its per-channel mean and std."""
        from baselines import kl_vae

        cfg = self.config.vae
        if cfg.trainable:
            mean, _ = self.latent_moments()
            per_channel = mean.transpose(0, 1).flatten(1)  # (c, N*h*w) posterior means
            cfg = replace(cfg, scale_factor=float(1 / mean.std()), raw_mean=tuple(per_channel.mean(1).tolist()),
                          raw_std=tuple(per_channel.std(1).tolist()))
        return kl_vae.LatentNorm(cfg)

    def sample(self, seeds: list[int], labels: torch.Tensor | None, sampler: dict, guidance: float) -> torch.Tensor:
        from baselines import kl_vae

        labels = None if labels is None else labels.to(self.device)
        z = self.kind._module().generate(self.backbone(), self.config.backbone, seeds, labels, guidance,
                                         sampler["steps"])
        return kl_vae.decode(self.vae(), self.latent_norm().denormalize(z))

    def reconstruct(self, x: torch.Tensor, seeds: list[int], sampler: dict) -> torch.Tensor:
        from baselines import kl_vae

        return kl_vae.decode(self.vae(), kl_vae.encode(self.vae(), x.to(self.device)))

    @torch.no_grad()
    def bits_per_pixel(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """The VAE's KL term in bits per pixel (protocols.md: reported like UL's rate)."""
        from baselines import kl_vae

        return kl_vae.kl_bits_per_pixel(self.vae(), x.to(self.device)).float().cpu()


def kinds() -> list[LDM]:
    return [LDM("dit", "dit", "kl-f8", "kl-f4-tiny", "scale"), LDM("edm2", "edm2", "kl-f8", "kl-f4-tiny", "standardize")]

