"""DiT's released checkpoints (facebookresearch/DiT, ``DiT-XL-2-512x512.pt``, ``DiT-XL-2-256x256.pt``) into our DiT.

A released file is a plain state dict (the EMA weights) of the official ``models.DiT``. It is read with
``torch.load(weights_only=True)``: tensors only, no code runs. Our DiT (baselines/dit.py) names its parameters as the
official model does, so the key mapping is the identity; what this module adds is a strict check of the file against
the official layout, which ``official_layout`` derives from a DiTConfig on its own (not from our module tree): every
missing key, unexpected key and shape mismatch is named in one UserError, with what a mismatch means (another
resolution, preset or number of classes). Nothing is inferred from the file: the suite's preset and resolution say
what it must hold. ``pos_embed`` (the fixed 2-D sin-cos table, stored in the file) must equal ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from baselines.dit import DiT, DiTConfig, sincos_2d
from ulbench.errors import UserError

POS_EMBED_ATOL = 1e-4  # the file's table (float32 of a float64 computation) against ours


@dataclass(frozen=True)
class Release:
    """A released checkpoint's training, as published: the point is drawn at train_steps x batch_size x our
    measured training FLOPs per image of the same network (ulbench.run.plan)."""

    preset: str
    image_resolution: int
    train_steps: int
    batch_size: int
    source: str


_PAPER = "Peebles & Xie 2023 (arXiv 2212.09748), section 5 / ImageNet benchmark tables; shared/design/baselines.md"
RELEASES = {  # file name as released -> its published training
    "DiT-XL-2-512x512.pt": Release("dit-xl-2", 512, 3_000_000, 256, _PAPER),
    "DiT-XL-2-256x256.pt": Release("dit-xl-2", 256, 7_000_000, 256, _PAPER),
}


def official_layout(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the official ``models.DiT`` built with cfg's sizes (timm PatchEmbed, Attention with
    qkv bias, Mlp; LayerNorms without affine hold no parameters; the label table has a null-class row when the
    label dropout is > 0; ``pos_embed`` is a frozen parameter and so in the state dict)."""
    D, p, C = cfg.hidden, cfg.patch, cfg.latent_channels
    mlp = int(D * cfg.mlp_ratio)
    out = {"x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
           "pos_embed": (1, cfg.num_patches, D),
           "t_embedder.mlp.0.weight": (D, cfg.frequency_embedding_size), "t_embedder.mlp.0.bias": (D,),
           "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
           "y_embedder.embedding_table.weight": (cfg.num_classes + int(cfg.label_dropout > 0), D)}
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        out.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                    b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                    b + "mlp.fc1.weight": (mlp, D), b + "mlp.fc1.bias": (mlp,),
                    b + "mlp.fc2.weight": (D, mlp), b + "mlp.fc2.bias": (D,),
                    b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,)})
    out.update({"final_layer.linear.weight": (p * p * cfg.out_channels, D),
                "final_layer.linear.bias": (p * p * cfg.out_channels,),
                "final_layer.adaLN_modulation.1.weight": (2 * D, D),
                "final_layer.adaLN_modulation.1.bias": (2 * D,)})
    return out


def read_state_dict(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The file's tensors, loaded with ``weights_only=True`` (a pickle that holds code or objects is refused)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"DiT checkpoint {path}: no such file (overrides.checkpoint: a released "
                        f"{' or '.join(RELEASES)} or a state dict in their layout)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ... for a bad file
        raise UserError(f"DiT checkpoint {path}: not readable as a plain state dict with torch.load(weights_only="
                        f"True) ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the released "
                        "files are; a train.py checkpoint also pickles its argparse args: save its 'ema' entry "
                        "alone with torch.save") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise UserError(f"DiT checkpoint {path}: expected a dict of tensors (a state dict), got {keys}; from a "
                        "train.py checkpoint save its 'ema' entry alone")
    return state


def _hints(cfg: DiTConfig, state: dict, expected: dict) -> list[str]:
    """What the commonest shape mismatches mean."""
    hints = []
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape[1] != expected["pos_embed"][1]:
        grid = round(pos.shape[1] ** 0.5)
        hints.append(f"pos_embed holds {pos.shape[1]} tokens = a {grid}x{grid} grid of patches: latents "
                     f"{grid * cfg.patch}x{grid * cfg.patch} if the patch is {cfg.patch}, not the suite's "
                     f"{cfg.latent_resolution}x{cfg.latent_resolution} (another image resolution or patch size?)")
    table = state.get("y_embedder.embedding_table.weight")
    key = "y_embedder.embedding_table.weight"
    if table is not None and table.ndim == 2 and table.shape[0] != expected[key][0]:
        hints.append(f"the label table has {table.shape[0]} rows ({table.shape[0] - 1} classes + the null class), "
                     f"the suite's model {expected[key][0]}: the dataset's number of classes must be the checkpoint's")
    width = state.get("x_embedder.proj.weight")
    if width is not None and width.ndim == 4 and width.shape[0] != cfg.hidden:
        hints.append(f"hidden width {width.shape[0]} in the file, {cfg.hidden} in preset {cfg.name}: another preset")
    return hints


def check_layout(state: dict[str, torch.Tensor], cfg: DiTConfig, where: str) -> None:
    """UserError naming every missing key, unexpected key and shape mismatch against ``official_layout(cfg)``."""
    expected = official_layout(cfg)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)}, {cfg.name} {v}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != v]
    if not (missing or unexpected or shapes):
        return

    def listed(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

    parts = [f"{len(missing)} missing key(s): {listed(missing)}" if missing else "",
             f"{len(unexpected)} unexpected key(s): {listed(unexpected)}" if unexpected else "",
             f"{len(shapes)} shape mismatch(es): {listed(shapes)}" if shapes else ""]
    hints = _hints(cfg, state, expected)
    raise UserError(f"{where}: not a DiT state dict of {cfg.name} at latent {cfg.latent_resolution}x"
                    f"{cfg.latent_resolution} ({cfg.num_classes} classes): " + "; ".join(p for p in parts if p)
                    + (". " + "; ".join(hints) if hints else ""))


def check_pos_embed(state: dict[str, torch.Tensor], cfg: DiTConfig, where: str) -> None:
    grid = cfg.latent_resolution // cfg.patch
    ours = sincos_2d(cfg.hidden, grid, cfg.max_period)[None]  # (1, T, D)
    err = (state["pos_embed"].float() - ours).abs().max().item()
    if err > POS_EMBED_ATOL:
        raise UserError(f"{where}: pos_embed differs from the fixed 2-D sin-cos table of a {grid}x{grid} grid by "
                        f"{err:.3g} (> {POS_EMBED_ATOL}); not a DiT checkpoint of this layout")


def load_official(path: str | Path, cfg: DiTConfig) -> DiT:
    """Our DiT in eval mode holding the released weights at ``path``, checked strictly against cfg."""
    where = f"DiT checkpoint {Path(path).expanduser()}"
    state = read_state_dict(path)
    check_layout(state, cfg, where)
    check_pos_embed(state, cfg, where)
    with torch.device("meta"):
        model = DiT(cfg)
    model.load_state_dict(state, strict=True, assign=True)  # same names by construction (module docstring)
    return model.float().eval()
