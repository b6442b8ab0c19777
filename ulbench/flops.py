"""Training compute: FLOPs of one real forward+backward step, counted by ``FlopCounterMode`` (the count follows code).

Units (protocols.md, "Training compute"): FLOPs = 2 x multiply-adds. DiT's and EDM2's published "Gflops" are
multiply-adds, so every number here says which unit it is in its name (``*_flops``, ``*_macs``).

Attention: torch counts the CUDA SDPA kernels (flash, efficient, cuDNN) but not the CPU one
(``aten._scaled_dot_product_flash_attention_for_cpu``), which counted 0. Importing this module registers torch's
own formulas for it: forward QK^T and AV (2 matmuls), backward with the scores recomputed (5 matmuls, 2.5x forward),
as the fused kernels do. CPU picks the math path instead when attention dropout is on (training with dropout > 0):
its matmuls are counted as such, and the backward reuses the stored scores (4 matmuls). The meta device always takes
the math path; ``measure_step`` routes meta SDPA through the kernel CPU would pick, so meta counts equal CPU counts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ulbench.errors import UserError
from ulbench.methods.base import StepInputs

_aten = torch.ops.aten
CPU_SDPA_FORWARD = _aten._scaled_dot_product_flash_attention_for_cpu
CPU_SDPA_BACKWARD = _aten._scaled_dot_product_flash_attention_for_cpu_backward


def _cpu_sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # (query, key, value, dropout_p, is_causal, *, attn_mask, scale) -> (output, logsumexp)
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    # (grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask, scale) -> (dq, dk, dv)
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def register_cpu_sdpa_formulas() -> None:
    """Register the CPU SDPA formulas with FlopCounterMode; a no-op when they are there already (idempotent)."""
    for op, formula in ((CPU_SDPA_FORWARD, _cpu_sdpa_forward_flops), (CPU_SDPA_BACKWARD, _cpu_sdpa_backward_flops)):
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


register_cpu_sdpa_formulas()


class _SdpaAsOnCpu(TorchFunctionMode):
    """Runs ``F.scaled_dot_product_attention`` on meta tensors through the kernel CPU would pick for the same
    arguments (the fused kernel has a meta implementation), so that a meta-device step counts attention exactly as
    the CPU step does. Without it meta always takes the math fallback (4 backward matmuls instead of 5)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_arguments(*args, **kwargs)
            backend = _cpu_sdpa_backend(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            if backend == SDPBackend.FLASH_ATTENTION:
                return CPU_SDPA_FORWARD(q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        return func(*args, **kwargs)


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def _cpu_sdpa_backend(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> SDPBackend:
    """The backend CPU SDPA picks for tensors shaped like these (its selector reads metadata, never the storage)."""

    def on_cpu(t):
        return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")

    choice = _aten._fused_sdp_choice(on_cpu(q), on_cpu(k), on_cpu(v), on_cpu(attn_mask), dropout_p, is_causal,
                                     scale=scale, enable_gqa=enable_gqa)
    return SDPBackend(choice)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs (2 x multiply-adds) of one training step on ``batch_size`` samples."""

    batch_size: int
    forward_flops: int
    backward_flops: int

    @property
    def train_flops(self) -> int:
        return self.forward_flops + self.backward_flops

    @property
    def forward_flops_per_image(self) -> float:
        return self.forward_flops / self.batch_size

    @property
    def train_flops_per_image(self) -> float:
        return self.train_flops / self.batch_size

    @property
    def forward_macs_per_image(self) -> float:
        return self.forward_flops_per_image / 2

    @property
    def train_macs_per_image(self) -> float:
        return self.train_flops_per_image / 2


def measure_step(step: StepInputs) -> StepFlops:
    """Count the loss's forward, then ``loss.mean().backward()``, each under its own FlopCounterMode.

    Works on real devices and on "meta" (shapes only: no memory, no time); parameter gradients are cleared after.
    """
    batch_size = next(t for t in step.batch if isinstance(t, torch.Tensor)).shape[0]
    on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in step.batch)
    with _SdpaAsOnCpu() if on_meta else contextlib.nullcontext():
        with FlopCounterMode(display=False) as forward_counter:
            loss = step.loss_fn(step.module, step.batch)["loss"]  # (N,) per-sample loss
        with FlopCounterMode(display=False) as backward_counter:
            loss.mean().backward()
    step.module.zero_grad(set_to_none=True)
    return StepFlops(batch_size, forward_counter.get_total_flops(), backward_counter.get_total_flops())


def measure_forward(run: Callable[[], object]) -> int:
    """FLOPs of ``run()``, a forward without gradients on meta tensors (a sampling or feature-extraction call),
    counted as ``measure_step`` counts a training forward."""
    with torch.no_grad(), _SdpaAsOnCpu(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def trainable_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


STAGE_KEYS = ("forward_macs_per_image", "forward_flops_per_image", "train_flops_per_image", "train_macs_per_image",
              "trainable_params")


def method_flops(preset: str, resolution: int | None = None, overrides: dict | None = None, batch_size: int = 2,
                 device: str = "meta") -> dict[str, dict]:
    """Per stage of the preset's kind: forward/training FLOPs and multiply-adds per image, trainable parameters;
    plus "total", the sum over stages (the paper's training-compute figure is stage 2's alone)."""
    from ulbench.methods import kind_of_preset

    kind = kind_of_preset(preset)
    config = kind.resolve(preset, overrides or {}, resolution=resolution)
    result: dict[str, dict] = {}
    stages = kind.stages_for(config)
    for stage in stages:
        torch.manual_seed(0)
        step = kind.step_inputs(config, stage, batch_size, device)
        counts = measure_step(step)
        result[stage] = {key: getattr(counts, key) for key in STAGE_KEYS[:-1]}
        result[stage]["trainable_params"] = trainable_params(step.module)
    result["total"] = {key: sum(result[s][key] for s in stages) for key in STAGE_KEYS}
    return result


EXAMPLES = """examples:
  ulbench flops ul-tiny                       # shapes only (meta device): no memory, about a second
  ulbench flops ul-small --resolution 512     # the paper's ImageNet-512 shapes
  ulbench flops ul-tiny --device cpu --json   # count on real CPU tensors (equal to meta)

units: GMACs = 1e9 multiply-adds (DiT's and EDM2's "Gflops"); GFLOPs = 2 x multiply-adds.
training = one forward + backward (about 3x forward), counted by FlopCounterMode on a real step."""


def cmd_flops(args) -> None:
    from ulbench.methods import kind_of_preset

    try:
        kind_of_preset(args.preset)
    except KeyError as e:
        raise UserError(e.args[0]) from None
    try:
        result = method_flops(args.preset, resolution=args.resolution, batch_size=args.batch_size,
                              device=args.device)
    except ValueError as e:  # a config the networks reject (e.g. a resolution the decoder cannot reach)
        raise UserError(f"{args.preset}: {e}") from None
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.preset}: per image, batch {args.batch_size} on {args.device}")
    print(f"{'stage':<8} {'forward GMACs (multiply-adds)':>30} {'trainable params (M)':>21} "
          f"{'train GFLOPs (= 2 x multiply-adds)':>35}")
    for stage, r in result.items():
        print(f"{stage:<8} {r['forward_macs_per_image'] / 1e9:>30.4g} {r['trainable_params'] / 1e6:>21.4g} "
              f"{r['train_flops_per_image'] / 1e9:>35.4g}")


def register(sub) -> None:
    """Add ``ulbench flops`` to the CLI's subparsers."""
    help_text = "Training FLOPs and multiply-adds per image of each stage of a preset (FlopCounterMode)"
    p = sub.add_parser("flops", help=help_text, description=help_text, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", help="a method preset, e.g. ul-tiny (see: ulbench ls presets)")
    p.add_argument("--resolution", type=int, default=None, help="image resolution (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the counted step (counts are per image)")
    p.add_argument("--device", choices=("meta", "cpu"), default="meta",
                   help="meta: shapes only, no memory (default); cpu: real tensors")
    p.add_argument("--json", action="store_true", help="print one line of JSON")
    p.set_defaults(func=cmd_flops)
