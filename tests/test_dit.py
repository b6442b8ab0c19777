"""DiT baseline: the published compute table, adaLN-Zero init, the ADM diffusion closed forms, seed-exact sampling, and a
tiny real-data training run."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence
from torch.utils.flop_counter import FlopCounterMode

import ulbench.flops  # noqa: F401  (registers the CPU SDPA formulas with FlopCounterMode)
from baselines.dit import DIT_PRESETS, GaussianDiffusion, build, generate, spaced_timesteps, training_losses

# DiT Table 4 "Gflops" (multiply-adds per forward at 256^2, latent 4x32x32).
PUBLISHED_GMACS = {
    "dit-s-8": 0.36, "dit-s-4": 1.41, "dit-s-2": 6.06, "dit-b-8": 1.42, "dit-b-4": 5.56, "dit-b-2": 23.01,
    "dit-l-8": 5.01, "dit-l-4": 19.70, "dit-l-2": 80.71, "dit-xl-8": 7.39, "dit-xl-4": 29.05, "dit-xl-2": 118.64,
}
# Parameters as DiT counts them (sum over model.parameters(), which includes its frozen pos_embed Parameter; ours
# is a buffer): the closed form dit_params below, from DiT's definition; the /2 values round to the published 33.0M,
# 130.5M, 458.1M, 675.1M.
PUBLISHED_PARAMS_M = {"dit-s-2": 33.0, "dit-b-2": 130.5, "dit-l-2": 458.1, "dit-xl-2": 675.1}


def dit_params(d: int, depth: int, p: int, c: int = 4, classes: int = 1000, latent: int = 32) -> int:
    """DiT's parameter count in closed form: blocks (qkv, proj, fc1, fc2, adaLN: 18 d^2 + 15 d), patch conv, timestep
    MLP (256 -> d -> d), label table with the null class, final adaLN + linear to p^2 2C, pos_embed (T x d)."""
    blocks = depth * (18 * d * d + 15 * d)
    embed = p * p * c * d + d + (256 * d + d + d * d + d) + (classes + 1) * d
    final = 2 * d * d + 2 * d + d * p * p * 2 * c + p * p * 2 * c
    return blocks + embed + final + (latent // p) ** 2 * d


def forward_macs(cfg) -> tuple[float, int, int]:
    """Multiply-adds of one image's forward (FlopCounterMode FLOPs / 2), on the meta device: no memory, no time."""
    with torch.device("meta"):
        model = build(cfg)
        r = cfg.latent_resolution
        x, t, y = torch.empty(1, cfg.latent_channels, r, r), torch.zeros(1, dtype=torch.long), torch.zeros(1).long()
    with FlopCounterMode(display=False) as counter:
        model(x, t, y)
    params = sum(p.numel() for p in model.parameters())
    return counter.get_total_flops() / 2, params, model.pos_embed.numel()


def test_published_compute_and_params():
    # Convention: every matmul counts, i.e. the block linears, the attention matmuls QK^T and AV, the adaLN
    # regressions, the timestep MLP, the patch conv and the final layer; element-wise ops, norms and softmax do not.
    # That reproduces all 12 published entries within 0.1%, except where the table prints few digits (S/8 0.358 vs
    # 0.36: -0.6%; S/4, B/8: 0.2%); XL/2 gives 118.62 vs 118.64, 512^2 524.54 vs 524.6. The table counts attention
    # (without QK^T and AV XL/2 would be 114.39, -3.6%) and adaLN (without it S/8 would be 0.347, -3.6%); fvcore's
    # LayerNorm estimate (4 per element) would add 0.06% and is within the rounding of the table either way.
    assert len(PUBLISHED_GMACS) == 12
    for name, published in PUBLISHED_GMACS.items():
        cfg = DIT_PRESETS[name]
        macs, params, pos = forward_macs(cfg)
        assert macs / 1e9 == pytest.approx(published, rel=0.01), name
        assert params + pos == dit_params(cfg.hidden, cfg.depth, cfg.patch), name
        if name in PUBLISHED_PARAMS_M:
            assert (params + pos) / 1e6 == pytest.approx(PUBLISHED_PARAMS_M[name], rel=0.01), name
    # 512^2 (latent 64x64): DiT's XL/2 at 524.6 G multiply-adds.
    macs, _, _ = forward_macs(dataclasses.replace(DIT_PRESETS["dit-xl-2"], latent_resolution=64))
    assert macs / 1e9 == pytest.approx(524.6, rel=0.01)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_step_flops_on_meta():
    # the harness counts a real training step (ulbench.flops.measure_step); the loss adds no matmuls to the forward
    from ulbench.flops import measure_step
    from ulbench.methods.base import StepInputs

    cfg = DIT_PRESETS["dit-b-4"]
    with torch.device("meta"):
        model = build(cfg)
        batch = (torch.empty(2, 4, 32, 32), torch.zeros(2, dtype=torch.long))
    counts = measure_step(StepInputs(model, lambda m, b: training_losses(m, cfg, *b), batch))
    assert counts.forward_macs_per_image == forward_macs(cfg)[0]
    # weights + inputs, attention backward 2x (one convention, ulbench.flops); the patch embedding needs no input grad
    assert 1.99 <= counts.backward_flops / counts.forward_flops <= 2.0


def random_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Replace adaLN-Zero's zeros (and only those) by small random weights: the output then depends on x, t and y."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_inputs(cfg, n: int = 3):
    g = torch.Generator().manual_seed(1)
    r = cfg.latent_resolution
    return (torch.randn(n, cfg.latent_channels, r, r, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, cfg.num_classes, (n,), generator=g))


def test_zero_init_output_and_shapes():
    cfg = DIT_PRESETS["dit-tiny"]
    torch.manual_seed(0)
    model = build(cfg)
    x, t, y = tiny_inputs(cfg)
    identity = []  # adaLN-Zero: every block starts as the identity (its gates are zero)
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: identity.append(torch.equal(out, args[0])))
    out = model(x, t, y)
    assert out.shape == (3, 2 * cfg.latent_channels, 8, 8)
    assert torch.equal(out, torch.zeros_like(out)) and identity == [True] * cfg.depth  # and the final layer is zero
    # the table holds the null class; trunk weights are not all zero (only the adaLN and output layers are)
    assert model.y_embedder.embedding_table.num_embeddings == cfg.num_classes + 1
    assert model.blocks[0].attn.qkv.weight.abs().sum() > 0 and model.x_embedder.proj.weight.abs().sum() > 0
    random_weights(model)
    assert model(x, t, y).abs().mean() > 1e-3


def test_unpatchify_inverts_patch_layout_and_positions():
    cfg = DIT_PRESETS["dit-tiny"]
    model = build(dataclasses.replace(cfg, learn_sigma=False))
    p, g = cfg.patch, cfg.latent_resolution // cfg.patch
    x = torch.randn(2, cfg.latent_channels, 8, 8)
    # token (i, j) holds its p x p x C patch in (p, q, c) order: what the final linear's outputs mean
    tokens = x.reshape(2, cfg.latent_channels, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, -1)
    assert torch.equal(model.unpatchify(tokens), x)
    # fixed 2-D sin-cos: the first half of the channels depends on the column only, the second half on the row
    pos = model.pos_embed[0].reshape(g, g, cfg.hidden)  # (row, col, D)
    half = cfg.hidden // 2
    assert torch.allclose(pos[0, :, :half], pos[-1, :, :half]) and torch.allclose(pos[:, 0, half:], pos[:, -1, half:])
    assert not torch.allclose(pos[:, 0, :half], pos[:, -1, :half])
    quarter = cfg.hidden // 4  # token (row 0, col 1): [sin(w_i), cos(w_i)], w_i = 10000^(-i / (D/4)), for the column
    w = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    assert torch.allclose(pos[0, 1, :half], torch.cat([torch.sin(w), torch.cos(w)]).float())


def test_label_dropout_only_in_training():
    cfg = DIT_PRESETS["dit-tiny"]
    emb = build(cfg).y_embedder
    y = torch.zeros(20000, dtype=torch.long)
    null = emb.embedding_table.weight[cfg.num_classes]
    torch.manual_seed(0)
    emb.train()
    dropped = (emb(y) == null).all(dim=1).float().mean().item()
    assert dropped == pytest.approx(cfg.label_dropout, abs=0.01)
    emb.eval()
    assert not (emb(y) == null).all(dim=1).any()


# ------------------------------------------------------------------------------------------------ diffusion


def test_schedule_closed_forms():
    cfg = DIT_PRESETS["dit-tiny"]
    d = GaussianDiffusion(cfg)
    betas = np.linspace(1e-4, 0.02, 1000)
    assert torch.allclose(d.alphas_cumprod, torch.from_numpy(np.cumprod(1 - betas)), rtol=1e-12)
    assert d.alphas_cumprod[-1].item() == pytest.approx(4.035e-5, rel=1e-3)  # alpha-bar_T of DDPM's schedule
    # respaced (ADM SpacedDiffusion): 250 kept steps, both ends kept, alpha-bar unchanged where kept
    kept = spaced_timesteps(1000, 250)
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999 and all(np.diff(kept) > 0)
    spaced = GaussianDiffusion(cfg, kept)
    assert torch.equal(spaced.alphas_cumprod, d.alphas_cumprod[kept])
    assert torch.allclose(torch.cumprod(1 - spaced.betas, 0), spaced.alphas_cumprod, rtol=1e-12)


def test_q_sample_moments():
    d = GaussianDiffusion(DIT_PRESETS["dit-tiny"])
    torch.manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    t = torch.full((200_000,), 300)
    x_t = d.q_sample(x0, t, torch.randn_like(x0))
    a = d.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.006)
    assert x_t.var().item() == pytest.approx(1 - a, rel=0.01)


def _case(t: int, n: int = 6, seed: int = 0):
    cfg = DIT_PRESETS["dit-tiny"]
    g = torch.Generator().manual_seed(seed)
    x0 = torch.tanh(2 * torch.randn(n, 4, 8, 8, generator=g))
    x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0  # the open-ended edge bins
    eps = torch.randn(n, 4, 8, 8, generator=g)
    out = torch.cat([eps + 0.3 * torch.randn(n, 4, 8, 8, generator=g), torch.rand(n, 4, 8, 8, generator=g) * 2 - 1], 1)
    return cfg, GaussianDiffusion(cfg), x0, eps, out, torch.full((n,), t)


def test_vb_at_t0_is_decoder_nll():
    _, d, x0, eps, out, t = _case(0)
    x_t = d.q_sample(x0, t, eps)
    vb = d.vb_terms_bits(out, x0, x_t, t)
    # independently: mean = predicted x0 (posterior coefficients at t=0 are 1 and 0), variance from v [iDDPM eq. 15]
    a = d.alphas_cumprod[0].item()
    mean = (x_t - math.sqrt(1 - a) * out[:, :4]) / math.sqrt(a)
    frac = (out[:, 4:] + 1) / 2
    log_var = frac * math.log(d.betas[0].item()) + (1 - frac) * math.log(d.posterior_variance[1].item())
    dist = Normal(mean.double(), (0.5 * log_var).exp().double())
    upper, lower = dist.cdf(x0.double() + 1 / 255), dist.cdf(x0.double() - 1 / 255)
    prob = torch.where(x0 < -0.999, upper, torch.where(x0 > 0.999, 1 - lower, upper - lower))  # edge bins open
    expected = -prob.clamp(min=1e-12).log().mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(vb.double(), expected, rtol=1e-4)
    assert (vb > 0).all()


def test_vb_at_t_positive_is_gaussian_kl_and_mean_gradient_stops():
    _, d, x0, eps, out, t = _case(400)
    x_t = d.q_sample(x0, t, eps)
    out.requires_grad_(True)
    terms = d.losses(out, x0, x_t, t, eps)
    # KL(q(x_{t-1}|x_t,x_0) || p) with the posterior from DDPM eq. 7 written out
    ab, ab_prev = d.alphas_cumprod[400].item(), d.alphas_cumprod[399].item()
    beta = 1 - ab / ab_prev
    q_mean = math.sqrt(ab_prev) * beta / (1 - ab) * x0 + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * x_t
    q_var = (1 - ab_prev) / (1 - ab) * beta
    x0_hat = (x_t - math.sqrt(1 - ab) * out[:, :4].detach()) / math.sqrt(ab)
    p_mean = math.sqrt(ab_prev) * beta / (1 - ab) * x0_hat + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * x_t
    frac = (out[:, 4:].detach() + 1) / 2
    p_var = torch.exp(frac * math.log(beta) + (1 - frac) * math.log(q_var))
    kl = kl_divergence(Normal(q_mean, math.sqrt(q_var)), Normal(p_mean, p_var.sqrt())).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["vb"].detach(), kl / math.log(2), rtol=1e-4)
    assert torch.allclose(terms["mse"].detach(), ((eps - out[:, :4].detach()) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(terms["loss"], terms["mse"] + terms["vb"])
    # the VLB term trains only the variance: its gradient w.r.t. the eps channels is zero
    (grad,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert torch.equal(grad[:, :4], torch.zeros_like(grad[:, :4])) and grad[:, 4:].abs().sum() > 0


def test_oracle_model_has_zero_mse_and_kl():
    cfg = DIT_PRESETS["dit-tiny"]
    d = GaussianDiffusion(cfg)
    x0 = torch.tanh(torch.randn(64, 4, 8, 8))

    def oracle(x_t, t, y):  # returns the true eps (recovered from x_t and x0) and v = -1 (variance = beta~_t)
        a = d.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        return torch.cat([(x_t - a.sqrt() * x0) / (1 - a).sqrt(), -torch.ones_like(x_t)], 1)

    torch.manual_seed(0)
    terms = training_losses(oracle, cfg, x0, torch.zeros(64, dtype=torch.long))
    assert set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (64,)
    assert terms["mse"].max() < 1e-8
    t = torch.linspace(1, 999, 64).long()  # t > 0: the KL branch, KL(q || q) = 0
    x_t = d.q_sample(x0, t, torch.randn_like(x0))
    assert d.vb_terms_bits(oracle(x_t, t, None), x0, x_t, t).abs().max() < 1e-5


# -------------------------------------------------------------------------------------------------- sampling


def _sampler_model():
    cfg = DIT_PRESETS["dit-tiny"]
    torch.manual_seed(0)
    return cfg, random_weights(build(cfg)).eval()


def test_generate_batch_independent_shape_and_guidance():
    cfg, model = _sampler_model()
    labels = torch.tensor([1, 2, 3, 4])
    both = generate(model, cfg, [0, 1, 2, 3], labels, guidance=1.5, steps=10)
    alone = generate(model, cfg, [2, 3], labels[2:], guidance=1.5, steps=10)
    assert both.shape == (4, 4, 8, 8) and torch.isfinite(both).all()
    assert torch.allclose(both[2:], alone, rtol=1e-4, atol=1e-5)  # equal up to float reassociation
    assert not torch.allclose(both[:2], both[2:], atol=0.1)  # different seeds, different samples
    plain = generate(model, cfg, [2, 3], labels[2:], guidance=1.0, steps=10)
    assert (plain - alone).abs().max() > 1e-3
    uncond = generate(model, cfg, [2, 3], None, guidance=1.0, steps=10)
    assert (uncond - plain).abs().max() > 1e-3
    assert torch.equal(uncond, generate(model, cfg, [2, 3], torch.full((2,), cfg.num_classes), 1.0, 10))


def test_generate_forward_count():
    cfg, model = _sampler_model()
    batches = []
    model.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    generate(model, cfg, [0, 1, 2], torch.tensor([0, 1, 2]), guidance=1.0, steps=7)
    assert batches == [3] * 7  # no unconditional pass at guidance 1
    batches.clear()
    generate(model, cfg, [0, 1, 2], torch.tensor([0, 1, 2]), guidance=4.0, steps=7)
    assert batches == [6] * 7  # conditional and unconditional in one batched pass per step


# ------------------------------------------------------------------------------------------------- real data


def photo_latents() -> tuple[torch.Tensor, torch.Tensor]:
    """Real photo crops as 4x8x8 "latents": 32x32 RGB area-pooled 4x, luminance as the 4th channel; 10 classes by
    brightness decile (a real, learnable label)."""
    from ulbench.data import photos

    x = F.avg_pool2d(photos(32).images, 4)  # (N, 3, 8, 8) in [-1, 1]
    x = torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1)  # (N, 4, 8, 8)
    brightness = x.mean(dim=(1, 2, 3))
    y = torch.bucketize(brightness, torch.quantile(brightness, torch.linspace(0, 1, 11)[1:-1]))
    return x, y


def eval_loss(model, cfg, x, y) -> float:
    model.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1234)  # same t and eps before and after training
        loss = training_losses(model, cfg, x, y)["loss"].mean().item()
    model.train()
    return loss


def test_tiny_dit_trains_on_real_photo_latents():
    cfg = DIT_PRESETS["dit-tiny"]
    x, y = photo_latents()
    torch.manual_seed(0)
    model = build(cfg)
    held_x, held_y = x[-256:], y[-256:]
    before = eval_loss(model, cfg, held_x, held_y)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(x) - 256, (32,), generator=g)
        loss = training_losses(model, cfg, x[idx], y[idx])["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = eval_loss(model, cfg, held_x, held_y)
    # observed: 1.02 -> 0.084 (12x) on held-out crops (zero-init starts at mse = 1 exactly); samples std 0.50 vs 0.48
    assert after < before / 5, (before, after)
    samples = generate(model, cfg, list(range(8)), y[:8], guidance=1.5, steps=50)
    assert samples.shape == (8, 4, 8, 8) and torch.isfinite(samples).all()
    assert x.std() / 3 < samples.std() < 3 * x.std()
