"""Samplers in log-SNR space: ancestral (VDM) and DDIM, with classifier-free guidance and per-sample seeds.

Every function here has one signature style (k-diffusion): a ``denoise(z_t, logsnr) -> v_hat`` callable, a
schedule, a step count and a ``SampleNoise``. A sampler walks t from 1 (noise) to 0 (``lambda_max``) and returns the
model's final clean prediction at t = 0 (UL Alg. 2: the base model's ``z_hat``, not a re-noised ``z_0``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ul_model.parametrization import eps_from_v, eps_from_x, x_from_v
from ul_model.schedules import LogSNRSchedule, alpha_sigma

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SampleNoise:
    """Gaussian noise drawn per sample from its own generator (seed = base seed + sample index).

    Sample i sees the same sequence of draws whatever the batch it is in or the number of processes, so generated
    images do not depend on batch size or world size (protocols.md, seeds). Draws are made on the CPU.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)

    def __len__(self) -> int:
        return len(self.generators)

    def draw(self) -> torch.Tensor:
        x = torch.stack([torch.randn(self.shape, generator=g, dtype=torch.float64) for g in self.generators])
        return x.to(self.device, self.dtype)  # (N, *shape)


def guided(cond: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
           labels: torch.Tensor | None, scale: float, interval: tuple[float, float] | None = None) -> Denoiser:
    """Classifier-free guidance: v = v_u + w (v_c - v_u), applied only where lambda lies in ``interval`` [SiD2].

    ``cond(z_t, logsnr, labels)`` is the conditional network; ``labels=None`` asks it for the unconditional output.
    ``scale = 1``, and every step whose lambda is outside ``interval`` = (lo, hi), is plain conditional sampling (one
    network evaluation); ``interval=None`` guides at every step.
    """

    lo, hi = interval if interval is not None else (-math.inf, math.inf)

    def denoise(z_t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        v_c = cond(z_t, lam, labels)
        inside = ((lam >= lo) & (lam <= hi)).reshape(-1, *([1] * (z_t.ndim - 1)))
        if scale == 1.0 or labels is None or not inside.any():
            return v_c  # outside the interval the conditional prediction alone: one network pass
        v_u = cond(z_t, lam, None)
        w = torch.full_like(lam, scale).reshape(-1, *([1] * (z_t.ndim - 1)))
        return torch.where(inside, v_u + w * (v_c - v_u), v_c)

    return denoise


def _predict(denoise: Denoiser, z: torch.Tensor, lam: torch.Tensor):
    alpha, sigma = (a.reshape(-1, *([1] * (z.ndim - 1))) for a in alpha_sigma(lam))
    v = denoise(z, lam)
    return x_from_v(z, v, alpha, sigma), eps_from_v(z, v, alpha, sigma)


def replace_known(z: torch.Tensor, known: tuple[torch.Tensor, torch.Tensor] | None, alpha: float = 1.0,
                  sigma: float = 0.0, noise: SampleNoise | None = None) -> torch.Tensor:
    # replacement [Video Diffusion Models]: where mask, z_s = alpha_s x_known + sigma_s eps (x_known at the clean end)
    if known is None:
        return z
    x, mask = known
    value = alpha * x if noise is None else alpha * x + sigma * noise.draw()
    return torch.where(mask, value, z)


@torch.no_grad()
def sample(denoise: Denoiser, schedule: LogSNRSchedule, steps: int, noise: SampleNoise,
           method: str = "ancestral", clip_x: float | None = None,
           known: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Walk ``steps`` uniform steps in t from 1 to 0, then return x_hat at t = 0 (lambda_max). ``known`` = (x, mask):
    the entries under the boolean mask are given (frame prediction's context frames) and replaced after each step."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if method not in ("ancestral", "ddim"):
        raise ValueError(f"unknown sampler '{method}': choose 'ancestral' or 'ddim'")
    z = noise.draw()  # z_1 ~ N(0, I)
    n = z.shape[0]
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    for t, s in zip(ts[:-1], ts[1:]):
        lam_t = schedule.logsnr(t).expand(n)  # noisier
        lam_s = schedule.logsnr(s).expand(n)  # cleaner
        a_t, s_t = (float(v[0]) for v in alpha_sigma(lam_t))
        a_s, s_s = (float(v[0]) for v in alpha_sigma(lam_s))
        x_hat, eps_hat = _predict(denoise, z, lam_t.to(z.dtype))
        if clip_x is not None:
            x_hat = x_hat.clamp(-clip_x, clip_x)
            eps_hat = eps_from_x(z, x_hat, a_t, s_t)  # DDIM steps with a pair that still gives z_t = a_t x + s_t eps
        if method == "ddim":
            z = a_s * x_hat + s_s * eps_hat  # z_s = alpha_s x_hat + sigma_s eps_hat
        else:
            # q(z_s | z_t, x) [VDM]: alpha_ts = alpha_t/alpha_s, sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2
            a_ts = a_t / a_s
            var_ts = s_t**2 - a_ts**2 * s_s**2
            mean = (a_ts * s_s**2 / s_t**2) * z + (a_s * var_ts / s_t**2) * x_hat
            z = mean + (var_ts * s_s**2 / s_t**2) ** 0.5 * noise.draw()
        z = replace_known(z, known, a_s, s_s, noise)
    lam_0 = schedule.logsnr(ts[-1]).expand(n).to(z.dtype)
    x_hat, _ = _predict(denoise, z, lam_0)  # the final clean prediction
    x_hat = x_hat.clamp(-clip_x, clip_x) if clip_x is not None else x_hat
    return replace_known(x_hat, known)
