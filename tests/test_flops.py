"""FLOP accounting: attention counted on CPU as its matmuls (backward 2x forward) on every path and for every kind,
closed forms for SDPA and a DiT-like stack, meta = CPU, the CLI."""
import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ul_model.networks import TransformerBlock
from ulbench import flops
from ulbench.flops import StepFlops, measure_step, method_flops
from ulbench.methods import kind_of_preset
from ulbench.methods.base import StepInputs


def _sum_of_squares_step(module: nn.Module, batch: tuple) -> StepInputs:
    return StepInputs(module, lambda net, b: {"loss": net(*b).pow(2).flatten(1).sum(1)}, batch)


class Attention(nn.Module):
    def __init__(self, dropout_p: float = 0.0):
        super().__init__()
        self.dropout_p = dropout_p

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p)


# CPU runs the fused flash kernel without attention dropout and the math path (explicit matmuls) with it; meta always
# takes the math path. Every one must be charged the same: the matmuls, backward 2x forward.
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_attention_is_counted_as_its_matmuls_on_every_path(device, dropout_p):
    b, h, l_q, l_k, d = 2, 3, 6, 10, 8  # cross-attention shapes: a swapped L_q/L_k or D would change the counts
    q = torch.randn(b, h, l_q, d, device=device, requires_grad=True)
    k, v = (torch.randn(b, h, l_k, d, device=device, requires_grad=True) for _ in range(2))
    counted = measure_step(_sum_of_squares_step(Attention(dropout_p), (q, k, v)))
    # forward: S = Q K^T and O = P V, each B*H*L_q*L_k*D multiply-adds, 2 FLOPs each
    assert counted.forward_flops == 2 * (2 * b * h * l_q * l_k * d) > 0
    # backward: dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q, four matmuls of the same size; the fused kernels'
    # recomputation of S (torch's formula: five, 2.5x) is not charged
    assert counted.backward_flops == 2 * counted.forward_flops


def test_cpu_kernel_is_what_gets_counted():
    q = torch.randn(2, 3, 6, 8, requires_grad=True)
    matmul_flops = 2 * (2 * 3 * 6 * 6 * 8)  # one of Q K^T, P V, ...: 2 x B*H*L*L*D multiply-adds
    with FlopCounterMode(display=False) as counter:  # torch's own formulas, registered by ulbench.flops
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    assert counter.get_flop_counts()["Global"] == {flops.CPU_SDPA_FORWARD: 2 * matmul_flops,
                                                   flops.CPU_SDPA_BACKWARD: 5 * matmul_flops}
    with flops.counter() as counter:  # the convention: the same kernel, its backward charged 4 matmuls
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    assert counter.get_flop_counts()["Global"] == {flops.CPU_SDPA_FORWARD: 2 * matmul_flops,
                                                   flops.CPU_SDPA_BACKWARD: 4 * matmul_flops}


def _meta(*shape):
    return torch.empty(shape, device="meta")


def test_every_attention_backward_torch_counts_is_charged_2x_forward():
    import torch.nn.attention.varlen  # noqa: F401  (registers its op's formulas)
    from torch._higher_order_ops.flex_attention import flex_attention_backward
    from torch.utils.flop_counter import flop_registry, sdpa_flop_count

    torch_backward_ops = {op for op in flop_registry if "backward" in str(op)} - {torch.ops.aten.convolution_backward}
    assert torch_backward_ops == set(flops.attention_backward_ops())
    # One shape for every layout ((B, H, L, D) for SDPA, (B, L, H, D) for flash and efficient): H = L.
    t, forward_flops = _meta(2, 4, 4, 8), sdpa_flop_count((2, 4, 4, 8), (2, 4, 4, 8), (2, 4, 4, 8))
    lse = _meta(2, 4, 4)
    args = {  # grad_out, q, k, v first, then what the formula reads; flex: q, k, v, out, logsumexp, grad_out
        torch.ops.aten._flash_attention_backward: (t, t, t, t, t, lse, None, None, 4, 4),
        torch.ops.aten._efficient_attention_backward: (t, t, t, t, None, t, None, None, 4, 4),
        torch.ops.torch_attn._varlen_attn_backward: (t, t, t, t, t, lse, None, None, 4, 4),
        flex_attention_backward: (t, t, t, t, lse, t),
    }
    mapping = flops.counter().flop_registry
    for op in flops.attention_backward_ops():
        op_args = args.get(op, (t, t, t, t))
        assert flop_registry[op](*op_args, out_val=None) == 5 * forward_flops // 2, op  # torch: S recomputed
        assert mapping[op](*op_args, out_val=None) == 2 * forward_flops, op


def test_without_the_registered_formula_cpu_attention_counts_zero(monkeypatch):
    # The hole this module fills (torch 2.14): if this starts failing, torch counts the CPU kernel itself.
    from torch.utils import flop_counter

    monkeypatch.delitem(flop_counter.flop_registry, flops.CPU_SDPA_FORWARD)
    q = torch.randn(2, 3, 6, 8)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 0


def test_registration_is_idempotent():
    importlib.reload(flops)
    flops.register_cpu_sdpa_formulas()
    from torch.utils.flop_counter import flop_registry

    assert flops.CPU_SDPA_FORWARD in flop_registry and flops.CPU_SDPA_BACKWARD in flop_registry


def test_dit_like_stack_matches_the_analytic_multiply_adds():
    n, tokens, width, heads, mlp_ratio, depth = 2, 128, 32, 4, 4.0, 3  # attention is ~half the count at L = 4d
    blocks = nn.Sequential(*(TransformerBlock(width, heads, mlp_ratio, cond_dim=width) for _ in range(depth)))

    class Stack(nn.Module):
        def forward(self, x, c):
            for block in blocks:
                x = block(x, c)
            return x

    x, c = torch.randn(n, tokens, width), torch.randn(n, width)
    counted = measure_step(_sum_of_squares_step(Stack(), (x, c)))
    hidden = int(width * mlp_ratio)
    # Per block and image, multiply-adds of the block's layers (norms, gates and GELU are not matmuls):
    linear_macs = (width * 6 * width  # ada: Linear(cond_dim, 6d) once per image (scale, shift, gate x 2)
                   + tokens * width * 3 * width  # qkv: Linear(d, 3d) per token
                   + tokens * width * width  # proj: Linear(d, d)
                   + tokens * 2 * width * hidden)  # mlp: Linear(d, mlp_ratio d), Linear(mlp_ratio d, d)
    attention_macs = 2 * tokens * tokens * width  # Q K^T and P V over all heads
    assert counted.forward_macs_per_image == pytest.approx(depth * (linear_macs + attention_macs), rel=0.01)
    # Backward: 2x a linear layer (input and weight gradients; the ada input c needs none, so ada counts 1x) and
    # 2x attention (its four backward matmuls).
    ada_macs = width * 6 * width
    backward_macs = depth * (2 * linear_macs - ada_macs + 2 * attention_macs)
    assert counted.backward_flops / 2 / n == pytest.approx(backward_macs, rel=0.01)


def _steps(preset: str, device: str, overrides: dict | None = None) -> dict[str, StepFlops]:
    kind = kind_of_preset(preset)
    config = kind.resolve(preset, overrides or {})
    torch.manual_seed(0)
    return {stage: measure_step(kind.step_inputs(config, stage, 2, device)) for stage in kind.stages_for(config)}


ATTENTION_DROPOUT = {"base": {"dropout": 0.1}, "decoder": {"middle": {"dropout": 0.1}}}


# Attention dropout makes CPU take SDPA's math path instead of the fused kernel; meta takes the math path always.
@pytest.mark.parametrize("overrides", [{}, ATTENTION_DROPOUT], ids=["fused-attention", "attention-dropout"])
def test_meta_counts_equal_cpu_counts(overrides):
    meta, cpu = _steps("ul-tiny", "meta", overrides), _steps("ul-tiny", "cpu", overrides)
    assert meta == cpu
    assert all(s.forward_flops > 0 and s.backward_flops > 0 for s in cpu.values())


def test_attention_dropout_changes_no_count():
    # dropout is element-wise: switching UL's attention to the math path must not change what a step is charged
    assert _steps("ul-tiny", "meta", ATTENTION_DROPOUT) == _steps("ul-tiny", "meta")


# One convention across kinds: every stage of each has attention (UL: decoder middle and base model; DiT: VAE middle
# and DiT blocks, fused SDPA; EDM2: VAE middle, and its own attention as explicit matmuls). Counting the real step
# (CPU flash kernel) must give what the same step gives with SDPA forced to the math path, and the meta count.
@pytest.mark.parametrize("preset", ["ul-tiny", "dit-tiny", "edm2-tiny"])
def test_one_attention_convention_for_every_method_kind(preset):
    cpu = _steps(preset, "cpu")
    with sdpa_kernel(SDPBackend.MATH):
        math_path = _steps(preset, "cpu")
    assert cpu == math_path == _steps(preset, "meta")
    assert set(cpu) == {"stage1", "stage2"}


def test_training_is_about_three_forwards_and_stage1_costs_more():
    r = method_flops("ul-tiny")
    for stage in ("stage1", "stage2"):
        assert 2.5 < r[stage]["train_flops_per_image"] / r[stage]["forward_flops_per_image"] < 3.5
        assert r[stage]["train_flops_per_image"] == 2 * r[stage]["train_macs_per_image"]
        assert r[stage]["trainable_params"] > 0
    assert r["stage1"]["train_flops_per_image"] > r["stage2"]["train_flops_per_image"]
    assert r["total"]["train_flops_per_image"] == r["stage1"]["train_flops_per_image"] + r["stage2"][
        "train_flops_per_image"]


def test_cli_json_and_unknown_preset(capsys):
    from ulbench.cli import main

    assert main(["flops", "ul-tiny", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) == {"stage1", "stage2", "total"}
    assert all(v > 0 for stage in r.values() for v in stage.values())
    assert main(["flops", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "ul-tiny" in err


def test_ul_small_at_512_base_model_matches_the_analytic_count(capsys):
    # 711M parameters, counted on the meta device (no memory). Stage 2 trains the base model on the 32x32x32 latent:
    # stage-1 blocks at 1024 tokens of width 512, stage-2 blocks at 256 merged tokens of width 1024.
    from ulbench.cli import main

    assert main(["flops", "ul-small", "--resolution", "512", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    (w1, w2), (d1, d2), c = (512, 1024), (6, 16), 32

    def block_macs(tokens, width, cond_dim=w2):  # per image, as in the DiT-like stack test
        return width * 6 * cond_dim + tokens * 12 * width**2 + 2 * tokens**2 * width

    io_macs = 2 * 1024 * c * w1 + 2 * 256 * 4 * w1 * w2  # inp, out; merge, split
    base_macs = d1 * block_macs(1024, w1) + d2 * block_macs(256, w2) + io_macs
    assert r["stage2"]["forward_macs_per_image"] == pytest.approx(base_macs, rel=0.01)  # about 80.7 G
    assert r["total"]["trainable_params"] == pytest.approx(711e6, rel=0.01)
    assert r["stage1"]["forward_macs_per_image"] > r["stage2"]["forward_macs_per_image"]
