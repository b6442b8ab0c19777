"""Magnitude-preserving layers of EDM2 config G (Karras et al. 2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models", appendix B): every layer maps unit-magnitude inputs to unit-magnitude outputs, where the
magnitude of a tensor is its root mean square, sqrt(mean(x^2)) (not its standard deviation).

Equation numbers refer to the EDM2 paper. Written from the paper; facts checked against NVlabs/edm2.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-4  # numerical floor of normalize(); the value EDM2 uses
SILU_MAGNITUDE = 0.596  # sqrt(E[silu(x)^2]) for x ~ N(0, 1), eq. 81
FOURIER_MAGNITUDE = math.sqrt(2.0)  # 1 / sqrt(E[cos^2]) for a uniformly random phase, eq. 75


# Unit magnitude over every dim but the first (eq. 66's normalize): x / (eps + ||x|| / sqrt(N)).
def normalize(x: torch.Tensor, dim: int | tuple[int, ...] | None = None, eps: float = NORM_EPS) -> torch.Tensor:
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    N = x.numel() / norm.numel()  # elements per normalized slice
    return x / (eps + norm / math.sqrt(N)).to(x.dtype)


# Pixel norm (EDM2 config G, Fig. 21): unit magnitude across channels at every pixel.
def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    return normalize(x, dim=1)


# Magnitude-preserving SiLU, eq. 81.
def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / SILU_MAGNITUDE


# Magnitude-preserving sum, eq. 88: ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2).
def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


# Magnitude-preserving concatenation, eq. 103: each part weighted by its share t and its channel count.
def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    N_a, N_b = a.shape[dim], b.shape[dim]
    C = math.sqrt((N_a + N_b) / ((1 - t) ** 2 + t ** 2))
    w_a = C * (1 - t) / math.sqrt(N_a)
    w_b = C * t / math.sqrt(N_b)
    return torch.cat([w_a * a, w_b * b], dim=dim)


# 2x resampling with the box filter [1, 1] (EDM2 default): average pooling down, nearest-neighbour up.
def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    if mode == "keep":
        return x
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got '{mode}'")


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features, eq. 75: sqrt(2) cos(2 pi (f x + phi)), f ~ N(0, 1), phi ~ U(0, 1)."""

    def __init__(self, channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * bandwidth * torch.randn(channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))

    # Eq. 75.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.float().flatten(), self.freqs.float()) + self.phases.float()  # (B, channels)
        return (FOURIER_MAGNITUDE * y.cos()).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution or linear layer (eq. 47) with forced weight normalization (eq. 66), no bias.

    In training mode every forward first writes normalize(w) back into the stored weight (forced normalization,
    so the weight's magnitude cannot grow under Adam); the forward then uses normalize(w) / sqrt(fan_in) * gain.
    ``kernel=()`` makes a linear layer on (B, C_in); ``kernel=(k, k)`` a same-padded conv on (B, C_in, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] = ()):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    # Eqs. 47 and 66.
    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.weight.float()
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalization, eq. 66
        w = normalize(w)  # the gradient still sees the normalization (standard weight normalization)
        fan_in = w[0].numel()
        w = (w * (gain / math.sqrt(fan_in))).to(x.dtype)  # magnitude-preserving scale, eq. 47
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """U-Net encoder or decoder block of EDM2 config G (Fig. 21): resample, residual branch modulated by the
    embedding, MP-sum with the main branch, optional cosine-attention, activation clipping.

    Encoder blocks project the input with ``conv_skip`` and pixel-normalize it before the residual branch; decoder
    blocks receive the MP-concatenated skip and project it only where the main branch joins the residual.
    An attention block has out_channels // channels_per_head heads, at least 1 (EDM2 would silently drop attention
    below channels_per_head channels; no published size is affected).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256.0):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', got '{flavor}'")
        self.in_channels, self.out_channels, self.flavor = in_channels, out_channels, flavor
        self.resample_mode, self.dropout, self.clip_act = resample_mode, dropout, clip_act
        self.res_balance, self.attn_balance = res_balance, attn_balance
        self.num_heads = max(out_channels // channels_per_head, 1) if attention else 0
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, 3 * out_channels, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    # Fig. 21: x <- mp_sum(x, res(x, emb), t_res); x <- mp_sum(x, attn(x), t_attn).
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)  # (B, C_in, H', W')
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)  # (B, C_out, H', W')
            x = pixel_norm(x)
        y = self.conv_res0(mp_silu(x))  # (B, C_out, H', W')
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # (B, C_out): modulation, 1 at init
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout > 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)  # (B, C_out, H', W')
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)  # (B, C_out, H', W')
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self.attention(x), t=self.attn_balance)
        return x.clamp(-self.clip_act, self.clip_act) if self.clip_act is not None else x

    # Cosine attention (config G): q, k, v pixel-normalized per head, softmax(q k^T / sqrt(c_head)) v.
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.attn_qkv(x).reshape(B, self.num_heads, C // self.num_heads, 3, H * W)  # EDM2's channel layout
        q, k, v = normalize(qkv, dim=2).permute(3, 0, 1, 4, 2).unbind(0)  # 3 x (B, heads, HW, c_head)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, c_head)
        return self.attn_proj(y.permute(0, 1, 3, 2).reshape(B, C, H, W))  # (B, C, H, W)
