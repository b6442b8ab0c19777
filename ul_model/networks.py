"""UL networks (ul-method.md section 4): encoder (ResNet), prior (ViT), decoder (U-ViT), base model (2-stage ViT).

Diffusion networks take ``(x_t, logsnr, labels)`` and return the v-prediction; ``labels=None`` (or the null class)
is the unconditional branch used by classifier-free guidance.

Every network takes images (N, C, H, W) or clips (N, C, T, H, W): ``dims`` 2 or 3 picks Conv2d or Conv3d, and the
transformers run on the flattened (t, h, w) token grid with full or factorized (space, time alternating) attention.
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


def conv_nd(dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[dims]


def conv_transpose_nd(dims: int) -> type[nn.Module]:
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]


def kernel(dims: int, space: int, time: int = 1) -> int | tuple[int, int, int]:
    """A conv kernel or stride: ``space`` on H and W, and ``time`` on T for clips."""
    return space if dims == 2 else (time, space, space)


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """Fixed 1D sine-cosine embedding (n, dim) of positions 0..n-1."""
    freqs = 1.0 / FOURIER_MAX_PERIOD ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    arg = torch.arange(n, dtype=torch.float64)[:, None] * freqs
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1).float()


def grid_pos(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Position embedding of a token grid (h, w) or (t, h, w), tokens in row-major order: 2D sine-cosine in space,
    plus a 1D one over frames for clips (separate space and time embeddings, added: ViViT, Latte)."""
    pos = sincos_2d(grid[-2], grid[-1], dim)  # (h*w, dim)
    if len(grid) == 2:
        return pos
    return (sincos_1d(grid[0], dim)[:, None, :] + pos[None]).reshape(-1, dim)  # (t*h*w, dim)


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

    def __init__(self, cin: int, cout: int, cond_dim: int = 0, dropout: float = 0.0, dims: int = 2):
        super().__init__()
        conv = conv_nd(dims)
        self.norm1, self.conv1 = group_norm(cin), conv(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), conv(cout, cout, 3, padding=1)
        self.cond = nn.Linear(cond_dim, 2 * cout) if cond_dim else None
        self.dropout = nn.Dropout(dropout)
        self.skip = conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, cout, [T,] H, W)
        h = self.norm2(h)
        if self.cond is not None:
            scale, shift = self.cond(c).reshape(*c.shape[:1], -1, *[1] * (x.ndim - 2)).chunk(2, dim=1)
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

    def forward(self, x: torch.Tensor, c: torch.Tensor, frames: int = 1, axis: str = "all") -> torch.Tensor:
        """``axis``: attend over all tokens, or (factorized attention on ``frames`` x space tokens) only within a
        frame ("space") or only across frames at one position ("time")."""
        n, t, w = x.shape  # (N, tokens, width)
        s1, b1, g1, s2, b2, g2 = self.ada(c)[:, None].chunk(6, dim=2)  # each (N, 1, width)
        h = self.norm1(x) * (1 + s1) + b1
        q, k, v = self.qkv(h).reshape(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # (N, h, t, d)
        p = self.dropout if self.training else 0.0
        if axis == "all":
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # sequences of one frame (space) or one position (time), folded into the batch: (N*T|N*S, h, S|T, d)
            order = (0, 2, 1, 3, 4) if axis == "space" else (0, 3, 1, 2, 4)
            fold = lambda z: z.reshape(n, self.heads, frames, t // frames, -1).permute(order)  # noqa: E731
            q, k, v = (fold(z) for z in (q, k, v))
            folded = q.shape
            a = F.scaled_dot_product_attention(*(z.reshape(-1, *folded[2:]) for z in (q, k, v)), dropout_p=p)
            inverse = (0, 2, 1, 3, 4) if axis == "space" else (0, 2, 3, 1, 4)
            a = a.reshape(folded).permute(inverse).reshape(n, self.heads, t, -1)  # back to (N, h, T*S, d)
        x = x + g1 * self.proj(a.transpose(1, 2).reshape(n, t, w))
        return x + g2 * self.mlp(self.norm2(x) * (1 + s2) + b2)


ATTENTION_LAYOUTS = ("full", "factorized")


class Transformer(nn.Module):
    """Blocks on tokens of a ``frames`` x space grid: "full" attention, or "factorized" (block 2i attends within
    frames, block 2i + 1 across them; images have one frame, so only space)."""

    def __init__(self, cfg: TransformerConfig, cond_dim: int, frames: int = 1):
        super().__init__()
        if cfg.attention not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention '{cfg.attention}': choose one of {', '.join(ATTENTION_LAYOUTS)}")
        self.blocks = nn.ModuleList(TransformerBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cond_dim, cfg.dropout)
                                    for _ in range(cfg.depth))
        self.frames = frames
        factorized = cfg.attention == "factorized" and frames > 1
        self.axes = [("space", "time")[i % 2] if factorized else "all" for i in range(cfg.depth)]

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block, axis in zip(self.blocks, self.axes):
            x = block(x, c, self.frames, axis)
        return x


def _time_strides(strides: tuple[int, ...], n: int, what: str) -> tuple[int, ...]:
    if not strides:
        return (1,) * n
    if len(strides) != n:
        raise ValueError(f"{what}.time_strides has {len(strides)} entries, needs {n} (one per downsampling)")
    return tuple(strides)


class Encoder(nn.Module):
    """Deterministic encoder z_clean = E(x): 2x2 patching, ResNet stages downsampling 2x between them [paper]; clips
    (``dims=3``) are patched ``time_patch`` x 2 x 2 and downsampled ``time_strides`` x 2 x 2."""

    def __init__(self, cfg: EncoderConfig, image_channels: int = 3, dims: int = 2):
        super().__init__()
        ch, conv = cfg.channels, conv_nd(dims)
        ts = _time_strides(cfg.time_strides, len(ch) - 1, "encoder")
        self.patchify = conv(image_channels, ch[0], kernel(dims, cfg.patch, cfg.time_patch),
                             stride=kernel(dims, cfg.patch, cfg.time_patch))
        layers: list[nn.Module] = []
        for i, (c, n) in enumerate(zip(ch, cfg.blocks)):
            cin = ch[max(i - 1, 0)]
            if i > 0:
                layers.append(conv(cin, cin, 3, stride=kernel(dims, 2, ts[i - 1]), padding=1))  # downsample 2x
            layers += [ResBlock(cin if j == 0 else c, c, dims=dims) for j in range(n)]
        self.stages = nn.Sequential(*layers)
        self.out = nn.Sequential(group_norm(ch[-1]), nn.SiLU(), conv(ch[-1], cfg.latent_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.stages(self.patchify(x)))  # (N, 3, [T,] H, W) -> (N, C_z, [T/4,] H/16, W/16)


def tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (N, C, [t,] h, w) -> (N, [t*]h*w, C)


def untokens(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return x.transpose(1, 2).reshape(shape)  # (N, tokens, C) -> (N, C, [t,] h, w)


class LatentViT(nn.Module):
    """ViT on a (C, [t,] h, w) latent with patch size 1: the stage-1 prior."""

    def __init__(self, cfg: TransformerConfig, latent_shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        c, grid = latent_shape[0], latent_shape[1:]
        self.cond = ConditionEmbed(cfg.width, num_classes)
        self.inp, self.out_norm = nn.Linear(c, cfg.width), nn.LayerNorm(cfg.width)
        self.register_buffer("pos", grid_pos(grid, cfg.width), persistent=False)
        self.body = Transformer(cfg, cfg.width, frames=grid[0] if len(grid) == 3 else 1)
        self.out = nn.Linear(cfg.width, c)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def forward(self, z_t: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inp(tokens(z_t)) + self.pos  # (N, [t*]h*w, width)
        x = self.out_norm(self.body(x, self.cond(logsnr, labels)))
        return untokens(self.out(x), z_t.shape)  # v_hat


class Decoder(nn.Module):
    """U-ViT on pixels conditioned on z_0: conv stages down, transformer at the latent's resolution, conv stages up.
    Clips: Conv3d stages, ``time_patch`` and ``time_strides`` bring T down to the latent's frames."""

    def __init__(self, cfg: DecoderConfig, resolution: int, latent_shape: tuple[int, ...],
                 image_channels: int = 3, num_classes: int = 0, frames: int = 0):
        super().__init__()
        self.cfg, self.latent_channels = cfg, latent_shape[0]
        dims = 3 if frames else 2
        conv, up_conv = conv_nd(dims), conv_transpose_nd(dims)
        width, ch = cfg.middle.width, cfg.channels
        ts = _time_strides(cfg.time_strides, len(ch), "decoder")
        cond_dim = width
        self.cond = ConditionEmbed(cond_dim, num_classes)
        extra = self.latent_channels if cfg.z_injection in ("input", "both") else 0
        patch = kernel(dims, cfg.patch, cfg.time_patch)
        self.patchify = conv(image_channels + extra, ch[0], patch, stride=patch)
        self.down = nn.ModuleList()
        for i, c in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            self.down.append(nn.ModuleList([ResBlock(cin if j == 0 else c, c, cond_dim, dims=dims)
                                            for j in range(cfg.blocks_per_stage)]))
        self.downsample = nn.ModuleList(conv(c, c, 3, stride=kernel(dims, 2, t), padding=1) for c, t in zip(ch, ts))
        side = resolution // cfg.patch // 2 ** len(ch)
        if side != latent_shape[-1]:
            raise ValueError(f"decoder middle resolution {side} != latent resolution {latent_shape[-1]}: "
                             f"use {len(ch)} conv stages with patch {cfg.patch} for a {resolution}px image")
        grid = (side, side)
        if frames:
            grid = (frames // cfg.time_patch // math.prod(ts), side, side)
            if grid[0] != latent_shape[1]:
                raise ValueError(f"decoder middle frames {grid[0]} != latent frames {latent_shape[1]}: set "
                                 f"decoder.time_patch x prod(decoder.time_strides) = {frames // latent_shape[1]}")
        self.to_tokens = nn.Linear(ch[-1], width)
        self.z_tokens = nn.Linear(self.latent_channels, width) if cfg.z_injection in ("tokens", "both") else None
        self.register_buffer("pos", grid_pos(grid, width), persistent=False)
        self.middle = Transformer(cfg.middle, cond_dim, frames=grid[0] if frames else 1)
        self.from_tokens = nn.Linear(width, ch[-1])
        self.upsample = nn.ModuleList(up_conv(c, c, kernel(dims, 2, t), stride=kernel(dims, 2, t))
                                      for c, t in zip(ch, ts))
        self.up = nn.ModuleList()
        for i in reversed(range(len(ch))):
            cout = ch[max(i - 1, 0)]
            self.up.append(nn.ModuleList([ResBlock(2 * ch[i] if j == 0 else cout, cout, cond_dim, dims=dims)
                                          for j in range(cfg.blocks_per_stage)]))
        self.out = nn.Sequential(group_norm(ch[0]), nn.SiLU(), up_conv(ch[0], image_channels, patch, stride=patch))
        nn.init.zeros_(self.out[-1].weight), nn.init.zeros_(self.out[-1].bias)

    def forward(self, x_t: torch.Tensor, logsnr: torch.Tensor, z0: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cond(logsnr, labels)
        if self.cfg.z_injection in ("input", "both"):
            x_t = torch.cat([x_t, F.interpolate(z0, size=x_t.shape[2:], mode="nearest")], dim=1)
        h = self.patchify(x_t)  # (N, ch0, [T/tp,] H/2, W/2)
        skips = []
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, c)
            skips.append(h)
            h = down(h)
        shape = h.shape  # (N, ch[-1], [t_z,] h_z, w_z)
        tok = self.to_tokens(tokens(h)) + self.pos  # (N, [t_z*]h_z*w_z, width)
        if self.z_tokens is not None:
            tok = tok + self.z_tokens(tokens(z0))
        h = untokens(self.from_tokens(self.middle(tok, c)), shape)
        for blocks, up, skip in zip(self.up, reversed(self.upsample), reversed(skips)):
            h = torch.cat([up(h), skip], dim=1)
            for block in blocks:
                h = block(h, c)
        return self.out(h)  # v_hat, (N, 3, [T,] H, W)


class BaseModel(nn.Module):
    """2-stage ViT on the latent, patch 1 [paper]: stage-1 tokens at full resolution around a stage-2 body on
    2x2-merged tokens (U-ViT style, with a skip across stage 2). Clips: tokens on the (t, h, w) grid, 2x2 merged
    within each frame; ``context=True`` takes the context latent as extra input channels (frame prediction)."""

    def __init__(self, cfg: BaseModelConfig, latent_shape: tuple[int, ...], num_classes: int = 0,
                 context: bool = False):
        super().__init__()
        c, grid = latent_shape[0], latent_shape[1:]
        frames = grid[0] if len(grid) == 3 else 1
        (w1, w2), (d1, d2) = cfg.widths, cfg.depths
        self.cond = ConditionEmbed(w2, num_classes)
        self.inp = nn.Linear(2 * c if context else c, w1)
        self.register_buffer("pos", grid_pos(grid, w1), persistent=False)
        mk = lambda width, depth: Transformer(  # noqa: E731
            TransformerConfig(width, depth, cfg.heads, 4.0, cfg.dropout, cfg.attention), w2, frames)
        self.stage1_down, self.stage1_up = mk(w1, d1 // 2), mk(w1, d1 - d1 // 2)
        self.merge, self.stage2, self.split = nn.Linear(4 * w1, w2), mk(w2, d2), nn.Linear(w2, 4 * w1)
        self.out_norm, self.out = nn.LayerNorm(w1), nn.Linear(w1, c)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def forward(self, z_t: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        n, h, w = z_t.shape[0], z_t.shape[-2], z_t.shape[-1]
        t = z_t.shape[2] if z_t.ndim == 5 else 1
        cond = self.cond(logsnr, labels)
        inp = z_t if context is None else torch.cat([z_t, context], dim=1)  # (N, [2]C, [t,] h, w)
        x = self.stage1_down(self.inp(tokens(inp)) + self.pos, cond)  # (N, t*h*w, w1)
        w1 = x.shape[-1]
        g = x.reshape(n, t, h // 2, 2, w // 2, 2, w1).permute(0, 1, 2, 4, 3, 5, 6).reshape(n, t * h * w // 4, 4 * w1)
        g = self.split(self.stage2(self.merge(g), cond))  # (N, t*h*w/4, 4*w1)
        g = g.reshape(n, t, h // 2, w // 2, 2, 2, w1).permute(0, 1, 2, 4, 3, 5, 6).reshape(n, t * h * w, w1)
        x = self.stage1_up(x + g, cond)
        return untokens(self.out(self.out_norm(x)), z_t.shape)  # v_hat
