"""UL networks and model: shapes, presets, gradient paths, bitrate bounds, generation shapes."""
import math

import pytest
import torch

from ul_model.config import PRESETS
from ul_model.model import UnifiedLatents, bits_ceiling_per_pixel


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UnifiedLatents(PRESETS["ul-tiny"])


def _images(n=4, seed=0):
    from ulbench.metrics.images import photo_crops  # real photo crops, resized to 32x32, in [-1, 1]

    x = torch.from_numpy(photo_crops(seed, n, size=128)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return torch.nn.functional.interpolate(x, size=32, mode="area")


@pytest.mark.parametrize("path", ["prior", "decoder"])
def test_gradient_reaches_encoder_through_each_path(path):
    torch.manual_seed(1)
    m = UnifiedLatents(PRESETS["ul-tiny"])
    with torch.no_grad():  # output layers start at zero (identity-like init); give them weights so gradient flows
        for p in [*m.decoder.out[-1].parameters(), *m.prior.out.parameters()]:
            p.normal_(0, 0.02)
    terms = m.stage1_terms(_images())
    (terms.l_z if path == "prior" else terms.decoder).mean().backward()
    assert sum(p.grad.abs().sum() for p in m.encoder.parameters() if p.grad is not None) > 0
    other = m.decoder if path == "prior" else m.prior
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in other.parameters())


def test_stop_prior_grad_ablation_cuts_the_prior_path():
    from dataclasses import replace

    cfg = PRESETS["ul-tiny"]
    torch.manual_seed(1)
    m = UnifiedLatents(replace(cfg, diffusion=replace(cfg.diffusion, stop_prior_grad=True)))
    with torch.no_grad():
        for p in m.prior.out.parameters():
            p.normal_(0, 0.02)
    m.stage1_terms(_images()).l_z.mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.encoder.parameters())
    assert sum(p.grad.abs().sum() for p in m.prior.parameters() if p.grad is not None) > 0


def test_interpolated_decoder_schedule_runs_from_high_to_low_shift():
    from dataclasses import replace

    cfg = PRESETS["ul-small"]
    with torch.device("meta"):
        m = UnifiedLatents(replace(cfg, diffusion=replace(cfg.diffusion, decoder_interp_ref=32)))
    sch = m.decoder_schedule
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    lam = sch.logsnr(t)
    assert lam[0].item() == pytest.approx(cfg.diffusion.decoder_lambda_max + 2 * math.log(64 / 512))
    assert lam[1].item() == pytest.approx(cfg.diffusion.decoder_lambda_min + 2 * math.log(32 / 512))
    tt = torch.rand(5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(sch.logsnr(tt).sum(), tt)
    torch.testing.assert_close(g, sch.dlogsnr_dt(tt.detach()))


def test_bits_per_pixel_positive_and_below_ceiling(tiny):
    torch.manual_seed(2)
    with torch.no_grad():
        terms = tiny.stage1_terms(_images(16))
    bpp = terms.bits_per_pixel.mean().item()
    assert 0 < bpp < bits_ceiling_per_pixel(tiny.cfg)


def test_generate_and_reconstruct_shapes_and_range(tiny):
    tiny.eval()
    x = tiny.generate([0, 1], torch.tensor([3, 4]), steps=3, decoder_steps=3, guidance=2.0)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    r = tiny.reconstruct(_images(2), [0, 1], steps=3)
    assert r.shape == (2, 3, 32, 32) and r.min() >= -1 and r.max() <= 1


def test_paper_presets_build_on_meta_with_parameter_counts():
    counts = {}
    for name in ("ul-small", "ul-medium"):
        with torch.device("meta"):
            m = UnifiedLatents(PRESETS[name])
        counts[name] = {k: sum(p.numel() for p in getattr(m, k).parameters())
                        for k in ("encoder", "prior", "decoder", "base")}
        assert m.cfg.latent_shape == (32, 32, 32)
    assert counts["ul-medium"]["base"] > 2 * counts["ul-small"]["base"]
    assert counts["ul-small"]["encoder"] == counts["ul-medium"]["encoder"]


def test_ul_small_forward_at_512_shapes():
    """Every network of ul-small at 512 px, on the meta device (shapes only; a real CPU forward took ~40 s of CI:
    real forwards of this size are the GPU check's, benchmarks/gpu_check.py)."""
    with torch.device("meta"), torch.no_grad():
        m = UnifiedLatents(PRESETS["ul-small"])
        x = torch.empty(1, 3, 512, 512)
        z_clean, z0 = m.encode(x)
        v = m.decoder(x, torch.zeros(1), z0)
        vz = m.base(z0, torch.zeros(1), torch.tensor([7]))
    assert z_clean.shape == (1, 32, 32, 32) and v.shape == x.shape and vz.shape == z0.shape


def test_generation_does_not_depend_on_batch_size(tiny):
    tiny.eval()
    seeds = [5, 6, 7, 8]
    labels = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        for p in tiny.base.out.parameters():  # a non-trivial base model output, so the latent path matters
            p.normal_(0, 0.05)
    batch = tiny.generate(seeds, labels, steps=4, decoder_steps=4, guidance=1.5)
    singles = torch.cat([tiny.generate([s], labels[i: i + 1], steps=4, decoder_steps=4, guidance=1.5)
                         for i, s in enumerate(seeds)])
    torch.testing.assert_close(batch, singles, rtol=1e-4, atol=1e-4)


def test_optimizer_loss_is_nats_per_dimension_and_reported_terms_stay_in_nats():
    # The optimizer minimises the nats total per data dim (a sum of ~1e3-1e4 nats gave gradient norms of ~4e3, so a
    # clip at 1 rescaled every step); the logged terms, bits/pixel included, stay the per-sample nats of before.
    torch.manual_seed(3)
    m = UnifiedLatents(PRESETS["ul-tiny"]).set_stage(1)
    x = _images(16)
    terms = m(x)
    assert torch.equal(terms["total_nats"], terms["l_z"] + terms["decoder"])
    assert torch.equal(terms["loss"], terms["total_nats"] / (3 * 32 * 32))
    torch.testing.assert_close(terms["bits_per_pixel"], terms["l_z"].detach() / (math.log(2) * 32 * 32))
    params = [p for p in m.parameters() if p.requires_grad]
    norm = lambda loss: torch.linalg.vector_norm(torch.stack([g.norm() for g in torch.autograd.grad(  # noqa: E731
        loss, params, retain_graph=True, allow_unused=True) if g is not None]))
    g_loss, g_nats = norm(terms["loss"].mean()), norm(terms["total_nats"].mean())
    torch.testing.assert_close(g_loss, g_nats / (3 * 32 * 32))
    assert 0.1 < g_loss < 10 and g_nats > 1000  # a fresh model on real photos: O(1) for the optimizer
    m.set_stage(2)
    z, labels = torch.randn(16, *m.cfg.latent_shape), torch.arange(16) % 10
    terms = m(z, labels)
    assert torch.equal(terms["loss"], terms["base"] / math.prod(m.cfg.latent_shape))


def test_stage1_terms_are_float32_under_bf16_autocast(tiny):
    # The networks run in bf16; the fixed-noise encoding and the loss terms must not (alpha_0 came out 0.99609).
    eps = torch.zeros(4, *tiny.cfg.latent_shape)
    x = _images(4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z_clean, z0 = tiny.encode(x, eps)
        terms = tiny.stage1_terms(x)
    assert z_clean.dtype == torch.bfloat16 and z0.dtype == torch.float32
    torch.testing.assert_close(z0, math.sqrt(1 / (1 + math.exp(-5.0))) * z_clean.float(), rtol=1e-6, atol=0)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in vars(terms).values())


def test_generate_guidance_interval():
    torch.manual_seed(4)
    m = UnifiedLatents(PRESETS["ul-tiny"]).eval()
    with torch.no_grad():  # zero-initialised layers (adaLN, outputs) would make labels and latents irrelevant
        for p in [*m.base.parameters(), *m.decoder.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    labels = torch.tensor([1, 2])
    run = lambda guidance, interval: m.generate([0, 1], labels, steps=4, decoder_steps=3,  # noqa: E731
                                                guidance=guidance, guidance_interval=interval)
    plain, everywhere = run(1.0, None), run(3.0, None)
    assert not torch.equal(plain, everywhere)
    assert torch.equal(run(3.0, (6.0, 9.0)), plain)  # no base-model step has lambda in (6, 9): plain conditional
    assert torch.equal(run(3.0, (-math.inf, math.inf)), everywhere)
    partial = run(3.0, (-3.0, 3.0))
    assert not torch.equal(partial, plain) and not torch.equal(partial, everywhere)
