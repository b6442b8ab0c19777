"""Parameter averages kept during training: the classic exponential EMA and EDM2's power-function EMA.

Both keep float copies of the model's state dict (buffers copied as they are) and name what they hold, so a
checkpoint stores each average as ``<name>.safetensors``; ``ema`` is always the one sampled from.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _blend(shadow: dict[str, torch.Tensor], model: nn.Module, beta: float) -> None:
    """shadow = beta * shadow + (1 - beta) * params; integer buffers copied."""
    state = model.state_dict()
    floats = [k for k, v in state.items() if v.dtype.is_floating_point]
    # one call for all tensors: the same lerp per element, without ~200 Python-level calls per step
    torch._foreach_lerp_([shadow[k] for k in floats], [state[k] for k in floats], 1 - beta)
    for k, v in state.items():
        if not v.dtype.is_floating_point:
            shadow[k].copy_(v)


class EMA:
    """Exponential moving average of parameters: ema = d * ema + (1 - d) * param, once per step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = _copy_state(model)

    def update(self, model: nn.Module, nimg: float = 0, batch_size: int = 0) -> None:
        _blend(self.shadow, model, self.decay)

    def averages(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"ema": self.shadow}

    def load(self, averages: dict[str, dict[str, torch.Tensor]]) -> None:
        self.shadow = averages["ema"]


# gamma from sigma_rel: the largest real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + 12 - sigma_rel^-2
# (EDM2 eq. 126 / Algorithm 2).
def std_to_exp(sigma_rel: float) -> float:
    t = sigma_rel**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


# sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), EDM2 eq. 123.
def exp_to_std(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_ema_beta(std: float, nimg: float, batch_size: int) -> float:
    """EDM2 eq. 127: beta = (1 - batch / t)^(gamma + 1), t the images seen after this step's update."""
    return (1 - batch_size / nimg) ** (std_to_exp(std) + 1)


class PowerFunctionEMA:
    """EDM2's power-function EMA (section 3.1, appendix C): one average per relative width sigma_rel, time counted
    in training images, so the profile is independent of when the average is read. The first std is the one
    sampled from (named ``ema``); the others are named ``ema-std<std>`` (kept for post-hoc reconstruction)."""

    def __init__(self, model: nn.Module, stds: Sequence[float]):
        if not stds:
            raise ValueError("PowerFunctionEMA needs at least one std")
        self.stds = tuple(stds)
        self.shadows = [_copy_state(model) for _ in self.stds]

    def update(self, model: nn.Module, nimg: float, batch_size: int) -> None:
        for std, shadow in zip(self.stds, self.shadows):
            _blend(shadow, model, power_ema_beta(std, nimg, batch_size))

    def averages(self) -> dict[str, dict[str, torch.Tensor]]:
        rest = {f"ema-std{std:.3f}": s for std, s in zip(self.stds[1:], self.shadows[1:])}
        return {"ema": self.shadows[0], **rest}

    def load(self, averages: dict[str, dict[str, torch.Tensor]]) -> None:
        self.shadows = [averages["ema"], *(averages[f"ema-std{std:.3f}"] for std in self.stds[1:])]


def make_ema(model: nn.Module, decay: float, stds: Sequence[float] = ()) -> EMA | PowerFunctionEMA:
    """Power-function EMA when ``stds`` are given (EDM2), else the exponential one at ``decay``."""
    return PowerFunctionEMA(model, stds) if stds else EMA(model, decay)
