"""Unified Latents losses (ul-method.md sections 2-3), unreduced: one value per sample, summed over its dims.

Every denoiser here is a callable ``denoise(z_t, logsnr) -> v_hat`` (v-prediction, [choice]); losses are computed
in eps-space. Each loss draws its own ``t`` and ``eps`` unless given (the decoder's are independent of the prior's).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ul_model.parametrization import eps_from_v
from ul_model.schedules import LogSNRSchedule, alpha_sigma

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def _fp32(x: torch.Tensor) -> torch.Tensor:
    # Loss math in float32 (float64 kept): under bf16 autocast the networks' outputs are bf16, and a schedule
    # evaluated in their dtype is off in the third digit (alpha_0 = 0.99609 instead of 0.99665).
    return x if x.dtype == torch.float64 else x.float()


def encode_z0(z_clean: torch.Tensor, lambda_z0: float = 5.0, eps: torch.Tensor | None = None) -> torch.Tensor:
    # z_0 = alpha_0 z_clean + sigma_0 eps_z, lambda_z(0) = 5  (fixed-noise encoding, section 2.2)
    z_clean = _fp32(z_clean)
    alpha0, sigma0 = alpha_sigma(torch.tensor(lambda_z0, dtype=z_clean.dtype))
    eps = torch.randn_like(z_clean) if eps is None else eps
    return alpha0 * z_clean + sigma0 * eps


def weighted_eps_loss(x: torch.Tensor, denoise: Denoiser, schedule: LogSNRSchedule,
                      weight: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor | None = None,
                      eps: torch.Tensor | None = None) -> torch.Tensor:
    # E_t,eps[ 0.5 (-dlambda/dt) w(lambda) |eps - eps_hat(x_t, lambda)|^2 ]  (one-sample estimate per example)
    x = _fp32(x)
    t = torch.rand(x.shape[0], dtype=x.dtype, device=x.device) if t is None else t
    eps = torch.randn_like(x) if eps is None else eps
    lam = schedule.logsnr(t)  # (N,)
    alpha, sigma = (_bcast(a, x) for a in alpha_sigma(lam))
    x_t = alpha * x + sigma * eps
    eps_hat = eps_from_v(x_t, _fp32(denoise(x_t, lam)), alpha, sigma)
    return 0.5 * (-schedule.dlogsnr_dt(t)) * weight(lam) * _per_sample((eps - eps_hat) ** 2)


def endpoint_kl(z_clean: torch.Tensor, lambda_min: float) -> torch.Tensor:
    # KL(q(z_1 | z_clean) || N(0, I)) = 0.5 sum(alpha_1^2 z^2 + sigma_1^2 - log sigma_1^2 - 1)  [VDM]
    z_clean = _fp32(z_clean)
    alpha1_sq = torch.sigmoid(torch.tensor(lambda_min, dtype=z_clean.dtype))
    sigma1_sq = 1 - alpha1_sq
    return 0.5 * _per_sample(alpha1_sq * z_clean**2 + sigma1_sq - torch.log(sigma1_sq) - 1)


@dataclass
class PriorTerms:
    """Per-sample prior terms in nats: ``diffusion + endpoint_kl = L_z`` (the latent's rate bound)."""

    diffusion: torch.Tensor
    endpoint_kl: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.diffusion + self.endpoint_kl


def prior_loss(z_clean: torch.Tensor, denoise: Denoiser, schedule: LogSNRSchedule,
               t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> PriorTerms:
    # L_z: unweighted ELBO from lambda_max (= lambda_z(0) = 5) down to lambda_min, target z_clean (section 2.3)
    ones = lambda lam: torch.ones_like(lam)  # noqa: E731 - weight 1: any other weight lets the encoder hide bits
    return PriorTerms(weighted_eps_loss(z_clean, denoise, schedule, ones, t, eps),
                      endpoint_kl(z_clean, schedule.lambda_min))


def decoder_loss(x: torch.Tensor, denoise: Denoiser, schedule: LogSNRSchedule, c_lf: float = 1.5, b: float = 0.0,
                 t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
    # L_x: c_lf * sigmoid(b - lambda) weighted ELBO, no x_1 KL term (section 2.4)
    return weighted_eps_loss(x, denoise, schedule, lambda lam: c_lf * torch.sigmoid(b - lam), t, eps)


def base_loss(z: torch.Tensor, denoise: Denoiser, schedule: LogSNRSchedule, b: float = 0.0,
              t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
    # Stage 2: sigmoid(b - lambda) weighting, same maximum log-SNR (5) as the prior (section 3)
    return weighted_eps_loss(z, denoise, schedule, lambda lam: torch.sigmoid(b - lam), t, eps)


def bits_per_pixel(l_z_nats: torch.Tensor, height: int, width: int, frames: int = 1) -> torch.Tensor:
    # bits/pixel = L_z / (ln 2 * H * W)  (section 2.7); a clip's pixels are T * H * W
    return l_z_nats / (math.log(2) * frames * height * width)


def bits_per_latent_dim(l_z_nats: torch.Tensor, latent_dims: int) -> torch.Tensor:
    return l_z_nats / (math.log(2) * latent_dims)
