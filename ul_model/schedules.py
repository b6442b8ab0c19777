"""Noise schedules in log-SNR space (ul-method.md section 1), pure functions of t in [0, 1].

Variance preserving: ``x_t = alpha_t x + sigma_t eps`` with ``alpha^2 = sigmoid(lambda)``,
``sigma^2 = sigmoid(-lambda)``; t = 0 is the cleanest end (``lambda_max``), t = 1 pure noise (``lambda_min``).
The unweighted ELBO depends only on the endpoint log-SNRs; the schedule only changes the estimator's variance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _t_bounds(lambda_min: float, lambda_max: float) -> tuple[float, float]:
    # t_min = atan(exp(-lambda_max / 2)), t_max = atan(exp(-lambda_min / 2))  (simple diffusion, truncated cosine)
    if not lambda_min < lambda_max:
        raise ValueError(f"need lambda_min < lambda_max, got {lambda_min} and {lambda_max}")
    return math.atan(math.exp(-lambda_max / 2)), math.atan(math.exp(-lambda_min / 2))


def resolution_shift(d: float, d_ref: float) -> float:
    # shift = 2 log(d_ref / d): a d x d input gets the noise of a d_ref x d_ref one at the same t
    return 2.0 * math.log(d_ref / d)


def logsnr_cosine(t: torch.Tensor, lambda_min: float, lambda_max: float, shift: float = 0.0) -> torch.Tensor:
    # lambda(t) = -2 log tan(t_min + t (t_max - t_min)) + shift
    t_min, t_max = _t_bounds(lambda_min, lambda_max)
    return -2.0 * torch.log(torch.tan(t_min + t * (t_max - t_min))) + shift


def dlogsnr_cosine_dt(t: torch.Tensor, lambda_min: float, lambda_max: float) -> torch.Tensor:
    # d lambda / dt = -4 (t_max - t_min) / sin(2 u), u = t_min + t (t_max - t_min); negative, shift-free
    t_min, t_max = _t_bounds(lambda_min, lambda_max)
    u = t_min + t * (t_max - t_min)
    return -4.0 * (t_max - t_min) / torch.sin(2.0 * u)


def logsnr_interpolated(t: torch.Tensor, lambda_min: float, lambda_max: float, shift_low: float,
                        shift_high: float) -> torch.Tensor:
    # lambda(t) = t * lambda_shift(d_low)(t) + (1 - t) * lambda_shift(d_high)(t)  (simple diffusion, interpolated)
    base = logsnr_cosine(t, lambda_min, lambda_max)
    return base + t * shift_low + (1.0 - t) * shift_high


def dlogsnr_interpolated_dt(t: torch.Tensor, lambda_min: float, lambda_max: float, shift_low: float,
                            shift_high: float) -> torch.Tensor:
    # derivative of the above: the base slope plus (shift_low - shift_high)
    return dlogsnr_cosine_dt(t, lambda_min, lambda_max) + (shift_low - shift_high)


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda))
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


@dataclass(frozen=True)
class LogSNRSchedule:
    """Truncated-cosine log-SNR from ``lambda_max`` (t = 0) to ``lambda_min`` (t = 1), plus a resolution shift.

    ``shift_end=None``: the shifted schedule (constant ``shift``). Otherwise the interpolated one: ``shift`` at
    t = 0 (the high-resolution shift) moving linearly to ``shift_end`` at t = 1 (the low-resolution shift).
    """

    lambda_min: float
    lambda_max: float
    shift: float = 0.0
    shift_end: float | None = None

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        if self.shift_end is None:
            return logsnr_cosine(t, self.lambda_min, self.lambda_max, self.shift)
        return logsnr_interpolated(t, self.lambda_min, self.lambda_max, self.shift_end, self.shift)

    def dlogsnr_dt(self, t: torch.Tensor) -> torch.Tensor:
        if self.shift_end is None:
            return dlogsnr_cosine_dt(t, self.lambda_min, self.lambda_max)
        return dlogsnr_interpolated_dt(t, self.lambda_min, self.lambda_max, self.shift_end, self.shift)
