"""Conversions between x-, eps- and v-predictions (ul-method.md section 1, [prior]: VDM / progressive distillation).

With ``z_t = alpha x + sigma eps`` and ``v = alpha eps - sigma x``:
``x = alpha z_t - sigma v``, ``eps = sigma z_t + alpha v``, ``x = (z_t - sigma eps) / alpha``.
Errors relate as ``|eps - eps_hat|^2 = exp(lambda) |x - x_hat|^2 = alpha^2 |v - v_hat|^2`` (checked in the tests).
"""
from __future__ import annotations

import torch


def v_target(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # v = alpha eps - sigma x
    return alpha * eps - sigma * x


def x_from_v(z_t: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # x_hat = alpha z_t - sigma v_hat
    return alpha * z_t - sigma * v


def eps_from_v(z_t: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # eps_hat = sigma z_t + alpha v_hat
    return sigma * z_t + alpha * v


def x_from_eps(z_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # x_hat = (z_t - sigma eps_hat) / alpha
    return (z_t - sigma * eps) / alpha


def eps_from_x(z_t: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # eps_hat = (z_t - alpha x_hat) / sigma
    return (z_t - alpha * x) / sigma


def v_from_x(z_t: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # v_hat = (alpha z_t - x_hat) / sigma
    return (alpha * z_t - x) / sigma
