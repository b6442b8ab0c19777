"""FD-DINOv2's network: DINOv2 ViT-L/14 from the official weights file the user supplies, run by timm.

What we follow (read for facts, our own code):
- Network and output: facebookresearch/dinov2's hub model ``dinov2_vitl14`` (``_make_dinov2_model``: img_size 518,
  patch 14, LayerScale, ``block_chunks=0`` so the keys are ``blocks.N.*``, no register tokens,
  ``interpolate_antialias=False``, ``interpolate_offset=0.1``). Its ``forward`` returns ``x_norm_clstoken``: the CLS
  token after the final LayerNorm (eps 1e-6). That is the 1024-d feature EDM2 and dgm-eval use.
- Preprocessing: EDM2's ``calculate_metrics.py`` ``DINOv2Detector`` (modelled on layer6ai-labs/dgm-eval): uint8
  images resized to 224 x 224 bicubic, /255, ImageNet mean/std. EDM2's default ``resize_mode='torch'`` is
  ``F.interpolate(float, 224, bicubic, antialias=True)`` (our ``legacy``, the default); its ``'pil'`` mode, which
  "matches dgm-eval exactly", is PIL BICUBIC on the uint8 image, requantized to uint8 (our ``clean``).
- Position embeddings: the file holds them for 518 px (37 x 37 + 1). At 224 px the official model interpolates the
  37 x 37 grid to 16 x 16 on every forward with ``F.interpolate(mode="bicubic", antialias=False,
  scale_factor=(16 + 0.1) / 37)``: the 0.1 offset makes the sampling positions differ slightly from ``size=16``.
  We do exactly that once at load time (the input size is fixed). timm's own checkpoint filter resamples with
  ``size=`` and ``antialias=True``, which gives different embeddings, so we do not use it for this step; its only
  other DINOv2 step, dropping ``mask_token`` (unused at inference), we do here too.
- Network: timm's ``VisionTransformer`` (the class of its ``vit_large_patch14_dinov2``: same key names as the
  official file, pre-norm blocks with LayerScale ``ls1.gamma``/``ls2.gamma``, GELU MLP, LayerNorm eps 1e-6). It is
  built with ``pretrained=False``: nothing is ever downloaded. Depth, width, patch size and MLP width are read from
  the file (so tests use a small random file of the same layout); heads = width / 64, as in every official
  DINOv2 ViT (S 6, B 12, L 16, g 24 heads of 64).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ulbench.errors import UserError

OFFICIAL_FILE = "dinov2_vitl14_pretrain.pth"
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
WEIGHTS_ENV = "ULBENCH_DINOV2_WEIGHTS"
INPUT_SIZE = 224  # EDM2 / dgm-eval resize every image to 224 x 224
HEAD_DIM = 64  # every official DINOv2 ViT
POS_OFFSET = 0.1  # the official interpolate_offset
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_IMPL = {"legacy": "torch-bicubic-antialias-224 (EDM2 default)", "clean": "pil-bicubic-uint8-224 (dgm-eval)"}
_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
               "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
               "mlp.fc2.bias", "ls2.gamma")


class DINOv2LayoutError(UserError):
    """The weights file is not a DINOv2 ViT state dict in the official (facebookresearch/dinov2) layout."""


def missing_weights_message(flag: str = "--dinov2-weights") -> str:
    how = f"{flag}: PATH in the suite file" if flag.startswith("evaluation.") else f"{flag} PATH"
    return (f"FD-DINOv2 needs the official DINOv2 ViT-L/14 weights, which no package registry carries and ulbench "
            f"never downloads. Get {OFFICIAL_FILE} (1.2 GB) from {OFFICIAL_URL} (linked from the facebookresearch/"
            f"dinov2 README) and give its path with {how} or ${WEIGHTS_ENV}=PATH. A torch hub cache that already "
            f"holds it works too: the file, or the directory ($TORCH_HOME, usually ~/.cache/torch, or its hub/ or "
            f"hub/checkpoints/).")


def resolve_weights(path: str | os.PathLike | None, flag: str = "--dinov2-weights") -> Path:
    """The weights file from a flag / suite value, else $ULBENCH_DINOV2_WEIGHTS: the file itself, or a directory
    holding it directly, in ``checkpoints/`` (torch hub's dir) or in ``hub/checkpoints/`` ($TORCH_HOME)."""
    where = flag
    if path is None or str(path) == "":
        path, where = os.environ.get(WEIGHTS_ENV) or None, f"${WEIGHTS_ENV}"
    if path is None:
        raise UserError(missing_weights_message(flag))
    p = Path(path).expanduser()
    if p.is_dir():
        for cand in (p / OFFICIAL_FILE, p / "checkpoints" / OFFICIAL_FILE, p / "hub" / "checkpoints" / OFFICIAL_FILE):
            if cand.is_file():
                return cand
        raise UserError(f"{where}={p}: a directory without {OFFICIAL_FILE} in it, in checkpoints/ or in "
                        f"hub/checkpoints/. " + missing_weights_message(flag))
    if not p.is_file():
        raise UserError(f"{where}={p}: no such file. " + missing_weights_message(flag))
    return p


@dataclass(frozen=True)
class ViTShape:
    """What the official file says about its ViT: patch size, width, depth, MLP width, pretraining grid side."""

    patch: int
    dim: int
    depth: int
    mlp_hidden: int
    grid: int

    @property
    def heads(self) -> int:
        return self.dim // HEAD_DIM


VITL14 = ViTShape(patch=14, dim=1024, depth=24, mlp_hidden=4096, grid=37)  # dinov2_vitl14: 518 px, 37 x 37 patches


def extractor_id(shape: ViTShape) -> str:
    """The fingerprint's extractor: network, implementation, output and input size (the weights' sha256 is next)."""
    name = "dinov2-vitl14" if shape == VITL14 else f"dinov2-vit-p{shape.patch}-{shape.dim}x{shape.depth}"
    return f"{name}/timm-VisionTransformer/cls-{shape.dim}@{INPUT_SIZE}"


def official_shapes(s: ViTShape) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official DINOv2 state dict (hub ``dinov2_vit*14``, no registers, MLP FFN)."""
    d, h = s.dim, s.mlp_hidden
    out = {"cls_token": (1, 1, d), "pos_embed": (1, s.grid * s.grid + 1, d), "mask_token": (1, d),
           "patch_embed.proj.weight": (d, 3, s.patch, s.patch), "patch_embed.proj.bias": (d,)}
    block = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
             "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "ls1.gamma": (d,), "norm2.weight": (d,),
             "norm2.bias": (d,), "mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,), "mlp.fc2.weight": (d, h),
             "mlp.fc2.bias": (d,), "ls2.gamma": (d,)}
    for i in range(s.depth):
        out.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return out | {"norm.weight": (d,), "norm.bias": (d,)}


def infer_shape(sd: dict[str, torch.Tensor], where: object) -> ViTShape:
    """Read the architecture from the file and check every key and shape against the official layout; a
    ``DINOv2LayoutError`` lists the missing, unexpected and misshapen keys."""
    hint = (f"expected the official facebookresearch/dinov2 layout of {OFFICIAL_FILE} (cls_token, pos_embed, "
            "mask_token, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, "
            "ls2.gamma}, norm)")
    try:
        dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    except (KeyError, IndexError, AttributeError) as e:
        raise DINOv2LayoutError(f"{where}: not a DINOv2 ViT state dict (no {e}); {hint}") from None
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise DINOv2LayoutError(f"{where}: no transformer blocks (keys blocks.N.*); {hint}")
    # the MLP width as the file gives it (4 x width in every official MLP model); missing, the check below names it
    hidden = next((v.shape[0] for k, v in sd.items() if k.endswith(".mlp.fc1.weight")), 4 * dim)
    shape = ViTShape(int(patch), int(dim), depth, int(hidden), grid)
    want = official_shapes(shape)
    missing = sorted(set(want) - set(sd), key=_natural)
    unexpected = sorted(set(sd) - set(want), key=_natural)
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {want[k]})" for k in want if k in sd
             and tuple(sd[k].shape) != want[k]]
    if missing or unexpected or wrong or dim % HEAD_DIM:
        parts = [f"{label}: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        if dim % HEAD_DIM:
            parts.append(f"width {dim} is not a multiple of the {HEAD_DIM}-d heads of every DINOv2 ViT")
        raise DINOv2LayoutError(f"{where}: {'; '.join(parts)}; {hint}")
    return shape


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def load_official(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: tensors and containers only, no code runs from the file."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: name it, not a pickle traceback
        raise DINOv2LayoutError(f"{path}: cannot be read as a PyTorch state dict ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}). " + missing_weights_message()) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DINOv2LayoutError(f"{path}: expected a flat dict of tensors (the official state dict), got "
                                f"{type(sd).__name__}")
    return sd


def pos_embed_at(pos_embed: torch.Tensor, grid: int, side: int) -> torch.Tensor:
    """(1, grid^2 + 1, D) -> (1, side^2 + 1, D) exactly as the official ``interpolate_pos_encoding`` does for a
    side x side patch grid: bicubic, no antialias, scale factor (side + 0.1) / grid, in float32."""
    if side == grid:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    d = pos_embed.shape[-1]
    scale = (side + POS_OFFSET) / grid
    x = patch_pos.reshape(1, grid, grid, d).permute(0, 3, 1, 2)  # 1 x D x grid x grid
    x = F.interpolate(x, scale_factor=(scale, scale), mode="bicubic", antialias=False)  # 1 x D x side x side
    assert x.shape[-2:] == (side, side), x.shape
    return torch.cat([cls_pos, x.permute(0, 2, 3, 1).reshape(1, side * side, d)], dim=1).to(pos_embed.dtype)


def build_vit(shape: ViTShape, img_size: int = INPUT_SIZE, device: str | torch.device = "cpu"):
    """timm's VisionTransformer with the DINOv2 arguments (for ViT-L/14 those of timm's
    ``vit_large_patch14_dinov2``), random init, no download; CLS token after the final norm as output."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device(device):
        return VisionTransformer(img_size=img_size, patch_size=shape.patch, embed_dim=shape.dim, depth=shape.depth,
                                 num_heads=shape.heads, mlp_ratio=shape.mlp_hidden / shape.dim, init_values=1e-5,
                                 num_classes=0, global_pool="token", class_token=True)


def to_timm(sd: dict[str, torch.Tensor], shape: ViTShape, img_size: int = INPUT_SIZE) -> dict[str, torch.Tensor]:
    """Official keys -> timm's: the same names, minus ``mask_token``, position embeddings at ``img_size``."""
    out = {k: v for k, v in sd.items() if k != "mask_token"}
    out["pos_embed"] = pos_embed_at(sd["pos_embed"], shape.grid, img_size // shape.patch)
    return out


def load_dinov2(path: Path):
    """(timm model in eval mode with the file's weights, ViTShape)."""
    sd = load_official(path)
    shape = infer_shape(sd, path)
    model = build_vit(shape, device="meta")  # no random init of 300M weights: the file's tensors are assigned
    model.load_state_dict(to_timm(sd, shape), strict=True, assign=True)
    return model.eval().requires_grad_(False), shape


def resize_pil(images: list[np.ndarray]) -> torch.Tensor:
    """dgm-eval's resize (= EDM2's 'pil' mode): PIL BICUBIC of each uint8 image to 224 x 224 -> uint8 NCHW."""
    from PIL import Image

    out = [np.asarray(Image.fromarray(a, "RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC))
           for a in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def resize_torch(x: torch.Tensor) -> torch.Tensor:
    """EDM2's default 'torch' mode: float bicubic with antialias to 224 x 224 (values stay in [0, 255] floats)."""
    return F.interpolate(x.to(torch.float32), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)


def prepare_dinov2_batch(images: list[np.ndarray], mode: str) -> torch.Tensor:
    """uint8 HWC images -> DINOv2Features input: uint8 NCHW (resized inside) or 224 x 224 (mixed sizes, one
    image at a time, so each image's features are those it gets alone)."""
    if mode == "clean":
        return resize_pil(images)
    if mode != "legacy":
        raise UserError(f"resize mode '{mode}' unknown; choose one of {tuple(RESIZE_IMPL)}")
    if len({a.shape for a in images}) == 1:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return torch.cat([resize_torch(torch.from_numpy(a).permute(2, 0, 1)[None]) for a in images])


class DINOv2Features(torch.nn.Module):
    """uint8 images (N, 3, H, W) at any size, or (N, 3, 224, 224) in [0, 255] -> (N, D) CLS features (D = 1024
    for ViT-L/14), EDM2's FD-DINOv2 feature."""

    def __init__(self, weights: Path):
        super().__init__()
        self.net, self.shape = load_dinov2(weights)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_dim(self) -> int:
        return self.shape.dim

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)  # N x 3 x H x W in [0, 255]
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_torch(x)  # N x 3 x 224 x 224
        x = (x / 255 - self.mean) / self.std  # ImageNet normalization
        return self.net(x).to(torch.float32)  # N x D: CLS token after the final norm
