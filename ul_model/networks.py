"""UL networks (ul-method.md section 4): encoder (ResNet), prior (ViT), decoder (U-ViT), base model (2-stage ViT).

Diffusion networks take ``(x_t, logsnr, labels)`` and return the v-prediction; ``labels=None`` (or the null class)
is the unconditional branch used by classifier-free guidance.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ul_model.config import BaseModelConfig, DecoderConfig, EncoderConfig, TransformerConfig

LOGSNR_SCALE = 1.0 / 16.0  # log-SNR spans about [-15, 15]: scaled to ~[-1, 1] before the Fourier features
FOURIER_MAX_PERIOD = 1e4


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding (h*w, dim), as in MAE/DiT."""
    if dim % 4:
        raise ValueError(f"position embedding width must be a multiple of 4, got {dim}")
    freqs = 1.0 / FOURIER_MAX_PERIOD ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    parts = [f(c.reshape(-1, 1) * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


class ConditionEmbed(nn.Module):
    """log-SNR Fourier features (+ class embedding with a null class for CFG) -> conditioning vector."""

    def __init__(self, dim: int, num_classes: int = 0):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.classes = nn.Embedding(num_classes + 1, dim) if num_classes else None  # row num_classes = null

    def forward(self, logsnr: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(FOURIER_MAX_PERIOD) * torch.arange(half, device=logsnr.device) / half)
        arg = (logsnr.float() * LOGSNR_SCALE * 1000.0)[:, None] * freqs[None]  # (N, dim/2)
        c = self.mlp(torch.cat([torch.cos(arg), torch.sin(arg)], dim=1))  # (N, dim)
        if self.classes is not None:
            if labels is None:
                labels = torch.full((logsnr.shape[0],), self.num_classes, device=logsnr.device, dtype=torch.long)
            c = c + self.classes(labels)
        return c


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with a residual; optional conditioning as a per-channel scale and shift."""

    def __init__(self, cin: int, cout: int, cond_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.cond = nn.Linear(cond_dim, 2 * cout) if cond_dim else None
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, cout, H, W)
        h = self.norm2(h)
        if self.cond is not None:
            scale, shift = self.cond(c)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class TransformerBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero conditioning (scale, shift, gate per sub-layer)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, cond_dim: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(hidden, width))
        self.ada = nn.Linear(cond_dim, 6 * width)
        nn.init.zeros_(self.ada.weight), nn.init.zeros_(self.ada.bias)  # each block starts as the identity
        self.dropout = dropout

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape  # (N, tokens, width)
        s1, b1, g1, s2, b2, g2 = self.ada(c)[:, None].chunk(6, dim=2)  # each (N, 1, width)
        h = self.norm1(x) * (1 + s1) + b1
        q, k, v = self.qkv(h).reshape(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + g1 * self.proj(a.transpose(1, 2).reshape(n, t, w))
        return x + g2 * self.mlp(self.norm2(x) * (1 + s2) + b2)


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, cond_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cond_dim, cfg.dropout)
                                    for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, c)
        return x


class Encoder(nn.Module):
    """Deterministic encoder z_clean = E(x): 2x2 patching, ResNet stages downsampling 2x between them [paper]."""

    def __init__(self, cfg: EncoderConfig, image_channels: int = 3):
        super().__init__()
        ch = cfg.channels
        self.patchify = nn.Conv2d(image_channels, ch[0], cfg.patch, stride=cfg.patch)
        layers: list[nn.Module] = []
        for i, (c, n) in enumerate(zip(ch, cfg.blocks)):
            cin = ch[max(i - 1, 0)]
            if i > 0:
                layers.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))  # downsample 2x
            layers += [ResBlock(cin if j == 0 else c, c) for j in range(n)]
        self.stages = nn.Sequential(*layers)
        self.out = nn.Sequential(group_norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.stages(self.patchify(x)))  # (N, 3, H, W) -> (N, C_z, H/16, W/16)


class LatentViT(nn.Module):
    """ViT on a (C, h, w) latent with patch size 1: the stage-1 prior."""

    def __init__(self, cfg: TransformerConfig, latent_shape: tuple[int, int, int], num_classes: int = 0):
        super().__init__()
        c, h, w = latent_shape
        self.cond = ConditionEmbed(cfg.width, num_classes)
        self.inp, self.out_norm = nn.Linear(c, cfg.width), nn.LayerNorm(cfg.width)
        self.register_buffer("pos", sincos_2d(h, w, cfg.width), persistent=False)
        self.body = Transformer(cfg, cfg.width)
        self.out = nn.Linear(cfg.width, c)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def forward(self, z_t: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = z_t.shape
        x = self.inp(z_t.flatten(2).transpose(1, 2)) + self.pos  # (N, h*w, width)
        x = self.out_norm(self.body(x, self.cond(logsnr, labels)))
        return self.out(x).transpose(1, 2).reshape(n, c, h, w)  # v_hat


class Decoder(nn.Module):
    """U-ViT on pixels conditioned on z_0: conv stages down, transformer at the latent's resolution, conv stages up."""

    def __init__(self, cfg: DecoderConfig, resolution: int, latent_shape: tuple[int, int, int],
                 image_channels: int = 3, num_classes: int = 0):
        super().__init__()
        self.cfg, self.latent_channels = cfg, latent_shape[0]
        width, ch = cfg.middle.width, cfg.channels
        cond_dim = width
        self.cond = ConditionEmbed(cond_dim, num_classes)
        extra = self.latent_channels if cfg.z_injection in ("input", "both") else 0
        self.patchify = nn.Conv2d(image_channels + extra, ch[0], cfg.patch, stride=cfg.patch)
        self.down = nn.ModuleList()
        for i, c in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            self.down.append(nn.ModuleList([ResBlock(cin if j == 0 else c, c, cond_dim)
                                            for j in range(cfg.blocks_per_stage)]))
        self.downsample = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in ch)
        side = resolution // cfg.patch // 2 ** len(ch)
        if side != latent_shape[1]:
            raise ValueError(f"decoder middle resolution {side} != latent resolution {latent_shape[1]}: "
                             f"use {len(ch)} conv stages with patch {cfg.patch} for a {resolution}px image")
        self.to_tokens = nn.Linear(ch[-1], width)
        self.z_tokens = nn.Linear(self.latent_channels, width) if cfg.z_injection in ("tokens", "both") else None
        self.register_buffer("pos", sincos_2d(side, side, width), persistent=False)
        self.middle = Transformer(cfg.middle, cond_dim)
        self.from_tokens = nn.Linear(width, ch[-1])
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(c, c, 2, stride=2) for c in ch)
        self.up = nn.ModuleList()
        for i in reversed(range(len(ch))):
            cout = ch[max(i - 1, 0)]
            self.up.append(nn.ModuleList([ResBlock(2 * ch[i] if j == 0 else cout, cout, cond_dim)
                                          for j in range(cfg.blocks_per_stage)]))
        self.out = nn.Sequential(group_norm(ch[0]), nn.SiLU(),
                                 nn.ConvTranspose2d(ch[0], image_channels, cfg.patch, stride=cfg.patch))
        nn.init.zeros_(self.out[-1].weight), nn.init.zeros_(self.out[-1].bias)

    def forward(self, x_t: torch.Tensor, logsnr: torch.Tensor, z0: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cond(logsnr, labels)
        if self.cfg.z_injection in ("input", "both"):
            x_t = torch.cat([x_t, F.interpolate(z0, size=x_t.shape[-2:], mode="nearest")], dim=1)
        h = self.patchify(x_t)  # (N, ch0, H/2, W/2)
        skips = []
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, c)
            skips.append(h)
            h = down(h)
        n, ch, s, _ = h.shape  # (N, ch[-1], h_z, w_z)
        tok = self.to_tokens(h.flatten(2).transpose(1, 2)) + self.pos  # (N, h_z*w_z, width)
        if self.z_tokens is not None:
            tok = tok + self.z_tokens(z0.flatten(2).transpose(1, 2))
        h = self.from_tokens(self.middle(tok, c)).transpose(1, 2).reshape(n, ch, s, s)
        for blocks, up, skip in zip(self.up, reversed(self.upsample), reversed(skips)):
            h = torch.cat([up(h), skip], dim=1)
            for block in blocks:
                h = block(h, c)
        return self.out(h)  # v_hat, (N, 3, H, W)


class BaseModel(nn.Module):
    """2-stage ViT on the latent, patch 1 [paper]: stage-1 tokens at full resolution around a stage-2 body on
    2x2-merged tokens (U-ViT style, with a skip across stage 2)."""

    def __init__(self, cfg: BaseModelConfig, latent_shape: tuple[int, int, int], num_classes: int = 0):
        super().__init__()
        c, h, w = latent_shape
        (w1, w2), (d1, d2) = cfg.widths, cfg.depths
        self.cond = ConditionEmbed(w2, num_classes)
        self.inp = nn.Linear(c, w1)
        self.register_buffer("pos", sincos_2d(h, w, w1), persistent=False)
        mk = lambda width, depth: Transformer(TransformerConfig(width, depth, cfg.heads, 4.0, cfg.dropout), w2)  # noqa: E731
        self.stage1_down, self.stage1_up = mk(w1, d1 // 2), mk(w1, d1 - d1 // 2)
        self.merge, self.stage2, self.split = nn.Linear(4 * w1, w2), mk(w2, d2), nn.Linear(w2, 4 * w1)
        self.out_norm, self.out = nn.LayerNorm(w1), nn.Linear(w1, c)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def forward(self, z_t: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = z_t.shape
        cond = self.cond(logsnr, labels)
        x = self.stage1_down(self.inp(z_t.flatten(2).transpose(1, 2)) + self.pos, cond)  # (N, h*w, w1)
        w1 = x.shape[-1]
        g = x.reshape(n, h // 2, 2, w // 2, 2, w1).permute(0, 1, 3, 2, 4, 5).reshape(n, h * w // 4, 4 * w1)
        g = self.split(self.stage2(self.merge(g), cond))  # (N, h*w/4, 4*w1)
        g = g.reshape(n, h // 2, w // 2, 2, 2, w1).permute(0, 1, 3, 2, 4, 5).reshape(n, h * w, w1)
        x = self.stage1_up(x + g, cond)
        return self.out(self.out_norm(x)).transpose(1, 2).reshape(n, c, h, w)  # v_hat
