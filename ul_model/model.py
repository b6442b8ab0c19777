"""Unified Latents: the three stage-1 networks, the stage-2 base model, and the losses and generation that tie them.

Stage 1 (section 2): ``L = L_z + L_x`` with ``z_0 = alpha_0 E(x) + sigma_0 eps`` feeding the decoder and the prior
regressing ``z_clean``; all three networks train together. Stage 2 (section 3): a base model on frozen latents with
sigmoid weighting. Generation (Alg. 2): base model -> final clean prediction ``z_hat`` -> decoder -> image.

Clips (``cfg.frames > 0``, frame prediction with ``cfg.context_frames`` given; docs/video.md) [choice]: stage 1 is
the same autoencoder on whole clips. The base model is conditioned on the context latent ``E(context_clip(x))`` (the
clip with its last given frame repeated to the end), concatenated as input channels, and its loss covers every
latent position (each latent frame sees future frames through the encoder). The decoder keeps the given frames by
replacement (Video Diffusion Models' reconstruction-free "replacement" sampling): after every step the context
frames of x_s are set to the real frames noised to lambda_s, and the output's context frames are the real ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ul_model import losses
from ul_model.config import ULConfig
from ul_model.networks import BaseModel, Decoder, Encoder, LatentViT
from ul_model.sampling import SampleNoise, guided, sample
from ul_model.schedules import LogSNRSchedule, resolution_shift


@dataclass
class Stage1Terms:
    """Per-sample stage-1 terms in nats (VDM style: logged separately, reduced once outside)."""

    prior_diffusion: torch.Tensor
    prior_kl: torch.Tensor
    decoder: torch.Tensor
    bits_per_pixel: torch.Tensor

    @property
    def l_z(self) -> torch.Tensor:
        return self.prior_diffusion + self.prior_kl

    @property
    def total(self) -> torch.Tensor:
        return self.l_z + self.decoder


def context_clip(x: torch.Tensor, k: int) -> torch.Tensor:
    """The clip (N, C, T, H, W) as far as its first k frames tell: frame k-1 repeated over frames k..T-1 (also the
    "repeat the last context frame" control of frame prediction)."""
    return torch.cat([x[:, :, :k], x[:, :, k - 1: k].expand(-1, -1, x.shape[2] - k, -1, -1)], dim=2)


def drop_labels(labels: torch.Tensor | None, p: float, num_classes: int) -> torch.Tensor | None:
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    if labels is None or p <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


class UnifiedLatents(nn.Module):
    def __init__(self, cfg: ULConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.diffusion
        if cfg.video and not 0 < cfg.context_frames < cfg.frames:
            raise ValueError(f"context_frames={cfg.context_frames}: clips of {cfg.frames} frames need 1 .. "
                             f"{cfg.frames - 1} given frames")
        self.encoder = Encoder(cfg.encoder, cfg.image_channels, dims=3 if cfg.video else 2)
        self.prior = LatentViT(cfg.prior, cfg.latent_shape)  # unconditional: the rate is that of the latent alone
        self.decoder = Decoder(cfg.decoder, cfg.resolution, cfg.latent_shape, cfg.image_channels, frames=cfg.frames)
        self.base = BaseModel(cfg.base, cfg.latent_shape, cfg.num_classes, context=cfg.video)
        self.prior_schedule = LogSNRSchedule(d.prior_lambda_min, d.lambda_z0)
        shift = resolution_shift(cfg.resolution, d.decoder_shift_ref)
        shift_end = None if d.decoder_interp_ref is None else resolution_shift(cfg.resolution, d.decoder_interp_ref)
        self.decoder_schedule = LogSNRSchedule(d.decoder_lambda_min, d.decoder_lambda_max, shift, shift_end)
        self.base_schedule = LogSNRSchedule(d.base_lambda_min, d.lambda_z0)

    def encode(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z_clean = self.encoder(x)
        return z_clean, losses.encode_z0(z_clean, self.cfg.diffusion.lambda_z0, eps)

    def stage1_terms(self, x: torch.Tensor) -> Stage1Terms:
        d = self.cfg.diffusion
        z_clean, z0 = self.encode(x)
        z_prior = z_clean.detach() if d.stop_prior_grad else z_clean
        prior = losses.prior_loss(z_prior, lambda z_t, lam: self.prior(z_t, lam), self.prior_schedule)
        dec = losses.decoder_loss(x, lambda x_t, lam: self.decoder(x_t, lam, z0), self.decoder_schedule,
                                  c_lf=d.c_lf, b=d.sigmoid_bias)
        bpp = losses.bits_per_pixel(prior.total, self.cfg.resolution, self.cfg.resolution, max(self.cfg.frames, 1))
        return Stage1Terms(prior.diffusion, prior.endpoint_kl, dec, bpp.detach())

    def stage2_latents(self, x: torch.Tensor) -> torch.Tensor:
        """What stage 2 trains on (cached once): z_clean, and for clips the context latent as C more channels."""
        if not self.cfg.video:
            return self.encoder(x)
        return torch.cat([self.encoder(x), self.encoder(context_clip(x, self.cfg.context_frames))], dim=1)

    def base_terms(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        d = self.cfg.diffusion
        labels = drop_labels(labels, d.label_dropout if self.training else 0.0, self.cfg.num_classes)
        z, z_ctx = z.chunk(2, dim=1) if self.cfg.video else (z, None)  # clips: (z_clean, context latent)
        return losses.base_loss(z, lambda z_t, lam: self.base(z_t, lam, labels, z_ctx), self.base_schedule,
                                b=d.base_sigmoid_bias)

    def set_stage(self, stage: int) -> "UnifiedLatents":
        """Freeze what the stage does not train: stage 1 trains encoder, prior and decoder; stage 2 the base."""
        for name in ("encoder", "prior", "decoder"):
            getattr(self, name).requires_grad_(stage == 1)
        self.base.requires_grad_(stage == 2)
        self.stage = stage
        return self

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training step terms for the current stage (images for stage 1, cached latents for stage 2), per sample.

        The terms are nats summed over the sample; ``loss``, what the optimizer minimises, is that total divided by
        the dims it sums over (pixel values in stage 1, latent dims in stage 2), so gradient norms are O(1) at any
        resolution and a clip threshold means the same at 32 and 512 px. Measured (ul-tiny, Fashion-MNIST, 300
        steps): the nats sums gave norms of 950-14000 in stage 1 and 9-196 in stage 2, every step clipped at 1;
        per dim, stage 1 median 1.1 and p99 4.5, stage 2 median 0.11 and max 0.75."""
        if getattr(self, "stage", 1) == 1:
            t = self.stage1_terms(x)
            return {"loss": t.total / math.prod(self.cfg.data_shape), "total_nats": t.total,
                    "prior_diffusion": t.prior_diffusion, "prior_kl": t.prior_kl, "decoder": t.decoder, "l_z": t.l_z,
                    "bits_per_pixel": t.bits_per_pixel}
        base = self.base_terms(x, labels)
        return {"loss": base / math.prod(self.cfg.latent_shape), "base": base}

    def known_frames(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clips, mask) for replacement sampling: the given frames of ``context`` (N, C, T, H, W) are known."""
        mask = torch.zeros(1, 1, self.cfg.frames, 1, 1, dtype=torch.bool, device=context.device)
        mask[:, :, : self.cfg.context_frames] = True
        return context, mask

    @torch.no_grad()
    def decode(self, z: torch.Tensor, seeds, steps: int, method: str = "ancestral",
               context: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder diffusion conditioned on z (a z_0 or a base-model z_hat) -> images (clips) in [-1, 1]; clips
        given ``context`` keep its first ``context_frames`` frames (replacement)."""
        noise = SampleNoise(seeds, self.cfg.data_shape, z.dtype, z.device)
        known = None if context is None else self.known_frames(context.to(z.dtype))
        return sample(lambda x_t, lam: self.decoder(x_t, lam, z), self.decoder_schedule, steps, noise, method,
                      clip_x=1.0, known=known)

    @torch.no_grad()
    def generate(self, seeds, labels: torch.Tensor | None, steps: int = 250, decoder_steps: int = 250,
                 guidance: float = 1.0, guidance_interval: tuple[float, float] | None = None,
                 method: str = "ancestral", context: torch.Tensor | None = None) -> torch.Tensor:
        """Alg. 2: z_1 ~ N(0, I) -> base model down to lambda 5 -> z_hat -> decoder -> image in [-1, 1]. Guidance
        applies at the base model's steps whose log-SNR lies in ``guidance_interval`` = (lo, hi) [SiD2] (None: all).
        Clips: ``context`` (N, C, T, H, W) in [-1, 1] gives the first ``context_frames`` frames (the rest ignored)."""
        device = next(self.parameters()).device
        base = self.base
        if self.cfg.video:
            if context is None or tuple(context.shape[1:]) != self.cfg.data_shape:
                raise ValueError(f"frame prediction needs context clips shaped (N, {self.cfg.data_shape}), got "
                                 f"{None if context is None else tuple(context.shape)}")
            context = context.to(device)
            z_ctx = self.encoder(context_clip(context, self.cfg.context_frames))
            base = lambda z_t, lam, y: self.base(z_t, lam, y, z_ctx)  # noqa: E731
        latent_seeds = [s + 2**31 for s in seeds]  # latent and pixel noise come from different per-sample streams
        noise = SampleNoise(latent_seeds, self.cfg.latent_shape, torch.float32, device)
        z_hat = sample(guided(base, labels, guidance, guidance_interval), self.base_schedule, steps, noise, method)
        return self.decode(z_hat, seeds, decoder_steps, method, context)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, seeds, steps: int = 250, method: str = "ancestral") -> torch.Tensor:
        """encode -> z_0 (fixed noise from the seeds) -> decoder."""
        eps = SampleNoise([s + 2**31 for s in seeds], self.cfg.latent_shape, x.dtype, x.device).draw()  # z_0's noise
        _, z0 = self.encode(x, eps)
        return self.decode(z0, seeds, steps, method)


def bits_ceiling_per_pixel(cfg: ULConfig) -> float:
    """0.5 log2(1 + e^lambda_z0) bits per latent dim, times latent dims per pixel (section 2.7)."""
    return 0.5 * math.log2(1 + math.exp(cfg.diffusion.lambda_z0)) * math.prod(cfg.latent_shape) / cfg.pixels
