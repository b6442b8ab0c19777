"""Training compute: FLOPs of one real forward+backward step, counted by ``FlopCounterMode`` (the count follows code).

Units (protocols.md, "Training compute"): FLOPs = 2 x multiply-adds. DiT's and EDM2's published "Gflops" are
multiply-adds, so every number here says which unit it is in its name (``*_flops``, ``*_macs``).

Attention, one convention for every method and kernel: it is charged as the matmuls it is, forward S = QK^T and
O = PV (2 matmuls), backward dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q (4 matmuls, 2x forward); work a kernel
repeats (the fused kernels recompute S in the backward) is not charged. The math path (CPU with attention dropout,
the meta device, EDM2's own attention) counts its matmuls as such; the fused SDPA kernels (CPU flash; CUDA flash,
efficient, cuDNN) are counted by formula. torch has none for the CPU kernel (it counted 0): importing this module
registers torch's own for it (forward 2 matmuls, backward 5 as on CUDA), and ``counter()`` maps every fused attention
backward to 2x its forward, so a step counts the same on meta, CPU and CUDA, with or without attention dropout.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import functools

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ulbench.errors import UserError
from ulbench.methods.base import StepInputs

_aten = torch.ops.aten
CPU_SDPA_FORWARD = _aten._scaled_dot_product_flash_attention_for_cpu
CPU_SDPA_BACKWARD = _aten._scaled_dot_product_flash_attention_for_cpu_backward


@functools.cache
def attention_backward_ops() -> tuple:
    """Every attention backward torch has a formula for (all count per sequence with sdpa_backward_flop_count), and
    the CPU one registered below. Imported on first use: the variable-length and flex attention modules load
    torch._dynamo (~2 s), which every `ulbench` command would otherwise pay at start-up."""
    import torch.nn.attention.varlen  # noqa: F401  (registers torch's formula for its variable-length attention op)
    from torch._higher_order_ops.flex_attention import flex_attention_backward

    return (CPU_SDPA_BACKWARD, _aten._scaled_dot_product_flash_attention_backward,
            _aten._scaled_dot_product_efficient_attention_backward,
            _aten._scaled_dot_product_cudnn_attention_backward, _aten._flash_attention_backward,
            _aten._efficient_attention_backward, flex_attention_backward, torch.ops.torch_attn._varlen_attn_backward)


def _cpu_sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # (query, key, value, dropout_p, is_causal, *, attn_mask, scale) -> (output, logsumexp)
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    # (grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask, scale) -> (dq, dk, dv)
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def register_cpu_sdpa_formulas() -> None:
    """Register torch's SDPA formulas for the CPU kernel with FlopCounterMode, as torch counts the CUDA kernels
    (backward with the scores recomputed; ``counter()`` then applies this module's convention); idempotent."""
    for op, formula in ((CPU_SDPA_FORWARD, _cpu_sdpa_forward_flops), (CPU_SDPA_BACKWARD, _cpu_sdpa_backward_flops)):
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


register_cpu_sdpa_formulas()


def attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape) -> int:
    """Attention backward of one sequence batch: dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q, 2x the forward."""
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


def _without_recomputation(torch_formula: Callable[..., int]) -> Callable[..., int]:
    """torch's formula for an attention backward (it unpacks the op's arguments, nested and variable-length batches
    included, then counts each sequence batch with ``sdpa_backward_flop_count``), each batch counted without the
    recomputed scores: ``attention_backward_flops``."""

    def formula(*args, **kwargs) -> int:
        with mock.patch.object(flop_counter, "sdpa_backward_flop_count", attention_backward_flops):
            return torch_formula(*args, **kwargs)

    formula._get_raw = True  # takes the op's raw arguments, as torch's registered formula does
    return formula


def counter() -> FlopCounterMode:
    """A FlopCounterMode that counts attention by this module's one convention (module docstring)."""
    mapping = {op: _without_recomputation(flop_counter.flop_registry[op]) for op in attention_backward_ops()}
    return FlopCounterMode(display=False, custom_mapping=mapping)


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
    with counter() as forward_counter:
        loss = step.loss_fn(step.module, step.batch)["loss"]  # (N,) per-sample loss
    with counter() as backward_counter:
        loss.mean().backward()
    step.module.zero_grad(set_to_none=True)
    return StepFlops(batch_size, forward_counter.get_total_flops(), backward_counter.get_total_flops())


def measure_forward(run: Callable[[], object]) -> int:
    """FLOPs of ``run()``, a forward without gradients on meta tensors (a sampling or feature-extraction call),
    counted as ``measure_step`` counts a training forward."""
    with torch.no_grad(), counter() as forward_counter:
        run()
    return forward_counter.get_total_flops()


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


def _fits(preset: str, resolution: int) -> bool:
    try:
        method_flops(preset, resolution=resolution, batch_size=1)
    except (ValueError, RuntimeError):
        return False
    return True


def fitting_resolutions(preset: str, resolution: int, max_power: int = 10) -> list[int]:
    """The multiples of 2^k nearest ``resolution`` (below and above) for the smallest k at which both fit the
    preset (a meta-device step runs), found by bisection: multiples of 2^(k+1) are multiples of 2^k, so once
    they fit they keep fitting (patching and stride-2 stages need divisibility; a size floor cuts only below).
    [] if even multiples of 2^max_power do not fit."""

    def neighbours(k: int) -> list[int]:
        m = 2**k
        below, above = (resolution - 1) // m * m, (resolution // m + 1) * m  # strictly below and above
        return [r for r in (below, above) if r >= m]

    def ok(k: int) -> bool:
        return all(_fits(preset, r) for r in neighbours(k))

    lo, hi = 1, max_power
    if not ok(hi):
        return []
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return neighbours(lo)


EXAMPLES = """examples:
  ulbench flops ul-tiny                       # shapes only (meta device): no memory, about a second
  ulbench flops ul-small --resolution 512     # the paper's ImageNet-512 shapes
  ulbench flops ul-tiny --device cpu --json   # count on real CPU tensors (equal to meta)

units: GMACs = 1e9 multiply-adds (DiT's and EDM2's "Gflops"); GFLOPs = 2 x multiply-adds.
training = one forward + backward (about 3x forward), counted by FlopCounterMode on a real step;
attention is charged as its matmuls, backward 2x forward, for every method and kernel."""


def cmd_flops(args) -> None:
    from ulbench.methods import kind_of_preset

    try:
        kind_of_preset(args.preset)
    except KeyError as e:
        raise UserError(e.args[0]) from None
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: the counted step needs at least 1 sample")
    if args.resolution is not None and args.resolution < 1:
        raise UserError(f"--resolution {args.resolution}: must be a positive number of pixels")
    try:
        result = method_flops(args.preset, resolution=args.resolution, batch_size=args.batch_size,
                              device=args.device)
    except (ValueError, RuntimeError) as e:  # a config the networks reject, or shapes that do not fit
        if args.resolution is None:
            if isinstance(e, ValueError):
                raise UserError(f"{args.preset}: {e}") from None
            raise  # the preset's own shapes fail: a bug, not an input
        fitting = fitting_resolutions(args.preset, args.resolution)
        if not fitting:
            raise
        raise UserError(f"--resolution {args.resolution} does not fit {args.preset}'s patching and downsampling "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); the nearest that fit: "
                        f"{' or '.join(map(str, fitting))}") from None
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
