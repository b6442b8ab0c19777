"""FD-DINOv2: the loader of the official DINOv2 weights layout, parity with an independent forward of the official
block structure, EDM2 / dgm-eval preprocessing, the evaluator, CLI and suite plumbing.

The official ViT-L/14 file is 1.2 GB and on no registry, so the forward tests use a small random ViT saved in the same
official layout (the loader reads depth and width from the file); ViT-L/14's own key/shape list is checked without
tensors (meta device).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ulbench.errors import UserError
from ulbench.metrics import dinov2 as d
from ulbench.metrics.images import photo_crops

SMALL = d.ViTShape(patch=14, dim=128, depth=2, mlp_hidden=512, grid=37)  # the official 518-px grid, tiny width


def random_official(shape: d.ViTShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the official layout, scaled so every part (LayerScale, norms, pos-embed) shows in the
    output."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in d.official_shapes(shape).items():
        x = torch.randn(s, generator=g)
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            x = 1 + 0.2 * x
        elif k.endswith("gamma"):
            x = 0.5 * x
        elif k.endswith("weight"):
            x = x / math.sqrt(s[1] * (s[2] * s[3] if len(s) == 4 else 1))
        else:
            x = 0.3 * x
        sd[k] = x
    return sd


@pytest.fixture(scope="session")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / d.OFFICIAL_FILE
    torch.save(random_official(SMALL), path)
    return path


@pytest.fixture(scope="session")
def extractor(small_file):
    return d.DINOv2Features(small_file)


# ------------------------------------------------------------------ an independent forward of the official model


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, pos_resize: str = "official") -> torch.Tensor:
    """DINOv2's forward written from its block structure with plain tensor ops: (N, 3, 224, 224) normalized -> CLS.

    patch embed (conv, stride = patch) -> [cls] + patches -> + position embeddings (the 37 x 37 grid interpolated to
    the input's grid) -> per block: x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x)) -> final norm -> token 0.
    """
    dim = sd["cls_token"].shape[-1]
    heads, patch = dim // 64, sd["patch_embed.proj.weight"].shape[-1]
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    side = tokens.shape[-1]
    tokens = tokens.flatten(2).transpose(1, 2)  # N x side^2 x D
    tokens = torch.cat([sd["cls_token"].expand(len(x), 1, dim), tokens], dim=1)
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    pos = sd["pos_embed"][:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    if pos_resize == "official":  # dinov2 interpolate_pos_encoding: offset 0.1, scale factor, no antialias
        pos = F.interpolate(pos, scale_factor=((side + 0.1) / grid,) * 2, mode="bicubic", antialias=False)
    else:  # what timm's checkpoint filter would do
        pos = F.interpolate(pos, size=(side, side), mode="bicubic", antialias=True)
    pos = torch.cat([sd["pos_embed"][:, :1], pos.flatten(2).transpose(1, 2)], dim=1)
    h = tokens + pos
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(n_blocks):
        b = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        y = F.layer_norm(h, (dim,), b["norm1.weight"], b["norm1.bias"], eps=1e-6)
        q, k, v = F.linear(y, b["attn.qkv.weight"], b["attn.qkv.bias"]).reshape(len(x), -1, 3, heads, 64).unbind(2)
        att = torch.softmax(torch.einsum("nqhc,nkhc->nhqk", q, k) / 8.0, dim=-1)  # 1 / sqrt(64)
        y = torch.einsum("nhqk,nkhc->nqhc", att, v).reshape(len(x), -1, dim)
        h = h + b["ls1.gamma"] * F.linear(y, b["attn.proj.weight"], b["attn.proj.bias"])
        y = F.layer_norm(h, (dim,), b["norm2.weight"], b["norm2.bias"], eps=1e-6)
        y = F.gelu(F.linear(y, b["mlp.fc1.weight"], b["mlp.fc1.bias"]))  # exact GELU, as nn.GELU()
        y = F.linear(y, b["mlp.fc2.weight"], b["mlp.fc2.bias"])
        h = h + b["ls2.gamma"] * y
    return F.layer_norm(h, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


def edm2_input(images: np.ndarray) -> torch.Tensor:
    """EDM2's DINOv2Detector preprocessing ('torch' mode): bicubic+antialias to 224, /255, ImageNet mean/std."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


@pytest.fixture(scope="session")
def crops():
    return photo_crops(7, n=4, size=64)


def test_features_equal_the_reference_forward(small_file, extractor, crops):
    sd = random_official(SMALL)
    with torch.no_grad():
        want = reference_forward(sd, edm2_input(crops))
        timm_pos = reference_forward(sd, edm2_input(crops), pos_resize="timm")
    got = extractor(d.prepare_dinov2_batch(list(crops), "legacy"))
    assert got.shape == (4, SMALL.dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the position-embedding resampling matters: timm's own (size=16, antialias) would give other features
    assert (timm_pos - want).abs().max() > 1e-3


def test_a_mismapped_key_is_caught(small_file, crops):
    """Swapping ls1/ls2 (both (D,)) passes any key/shape check: only parity with the reference catches it."""
    wrong = d.DINOv2Features(small_file)
    blk = wrong.net.blocks[0]
    blk.ls1.gamma.data, blk.ls2.gamma.data = blk.ls2.gamma.data.clone(), blk.ls1.gamma.data.clone()
    with torch.no_grad():
        want = reference_forward(random_official(SMALL), edm2_input(crops))
    assert (wrong(d.prepare_dinov2_batch(list(crops), "legacy")) - want).abs().max() > 1e-3


def test_vitl14_official_layout_is_accepted_as_timms_dinov2():
    """ViT-L/14's official key/shape list (no tensors: meta device) is read as ViT-L/14 and maps key for key and shape
    for shape onto timm's ``vit_large_patch14_dinov2`` at 224 px."""
    import timm

    official = {k: torch.empty(s, device="meta") for k, s in d.official_shapes(d.VITL14).items()}
    assert len(official) == 5 + 24 * 14 + 2 and official["pos_embed"].shape == (1, 37 * 37 + 1, 1024)
    shape = d.infer_shape(official, "vitl14")
    assert shape == d.VITL14 and shape.heads == 16
    assert d.extractor_id(shape).startswith("dinov2-vitl14/")
    ours = {k: tuple(v.shape) for k, v in d.to_timm(official, shape).items()}
    with torch.device("meta"):
        preset = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=224)
    assert ours == {k: tuple(v.shape) for k, v in preset.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in d.build_vit(shape, device="meta").state_dict().items()}


@pytest.mark.parametrize("change, needles", [
    (lambda sd: sd.pop("blocks.1.ls2.gamma"), ["missing: blocks.1.ls2.gamma (1)"]),
    (lambda sd: sd.update(register_tokens=torch.zeros(1, 4, 128)), ["unexpected: register_tokens (1)"]),
    (lambda sd: sd.update({"blocks.0.mlp.w12.weight": sd.pop("blocks.0.mlp.fc1.weight")}),
     ["missing: blocks.0.mlp.fc1.weight", "unexpected: blocks.0.mlp.w12.weight"]),
    (lambda sd: sd.update({"blocks.0.attn.qkv.weight": torch.zeros(128, 128)}),
     ["wrong shape: blocks.0.attn.qkv.weight (128, 128) (expected (384, 128))"]),
    (lambda sd: sd.pop("cls_token"), ["not a DINOv2 ViT state dict (no 'cls_token')"]),
])
def test_layout_errors_name_the_keys(tmp_path, change, needles):
    sd = random_official(SMALL)
    change(sd)
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(d.DINOv2LayoutError) as e:
        d.load_dinov2(tmp_path / "w.pth")
    for needle in needles:
        assert needle in str(e.value)
    assert "official facebookresearch/dinov2 layout" in str(e.value)


def test_file_that_is_not_a_state_dict(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(d.DINOv2LayoutError, match="cannot be read as a PyTorch state dict"):
        d.load_dinov2(tmp_path / "junk.pth")
    torch.save({"model": {"cls_token": torch.zeros(1)}}, tmp_path / "nested.pth")
    with pytest.raises(d.DINOv2LayoutError, match="flat dict of tensors"):
        d.load_dinov2(tmp_path / "nested.pth")


def test_pil_mode_is_dgm_evals_transform(extractor, crops):
    """``clean``: dgm-eval's torchvision Resize((224, 224), BICUBIC) on the PIL image + ToTensor + Normalize."""
    import torchvision.transforms as T
    from PIL import Image

    tf = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ref = torch.stack([tf(Image.fromarray(a)) for a in crops])
    got_pixels = d.prepare_dinov2_batch(list(crops), "clean")
    assert got_pixels.dtype == torch.uint8 and got_pixels.shape == (4, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(extractor(got_pixels), extractor.net(ref), atol=1e-5, rtol=1e-5)


def test_batch_and_mixed_sizes_do_not_change_features(extractor, crops):
    batch = extractor(d.prepare_dinov2_batch(list(crops), "legacy"))
    one = torch.cat([extractor(d.prepare_dinov2_batch([a], "legacy")) for a in crops])
    mixed = extractor(d.prepare_dinov2_batch([crops[0], crops[1][:48, :40]], "legacy"))
    torch.testing.assert_close(batch, one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], batch[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ weights resolution, evaluator, CLI, suites


def test_weights_resolution(tmp_path, small_file, monkeypatch):
    monkeypatch.delenv(d.WEIGHTS_ENV, raising=False)
    assert d.resolve_weights(small_file) == small_file
    assert d.resolve_weights(small_file.parent) == small_file
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / d.OFFICIAL_FILE).symlink_to(small_file)
    for given in (tmp_path / "torch", tmp_path / "torch" / "hub", hub):  # $TORCH_HOME, torch.hub's dir, checkpoints/
        assert d.resolve_weights(given) == hub / d.OFFICIAL_FILE
    monkeypatch.setenv(d.WEIGHTS_ENV, str(tmp_path / "torch"))
    assert d.resolve_weights(None) == hub / d.OFFICIAL_FILE
    with pytest.raises(UserError, match=r"--dinov2-weights=.*nope: no such file.*dl\.fbaipublicfiles\.com"):
        d.resolve_weights(tmp_path / "nope")
    with pytest.raises(UserError, match=f"a directory without {d.OFFICIAL_FILE}"):
        d.resolve_weights(tmp_path)


def test_cli_without_weights_exits_2_before_loading(monkeypatch, capsys):
    from ulbench.cli import main

    monkeypatch.delenv(d.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(d.DINOv2Features, "__init__", lambda *a, **k: pytest.fail("the network was loaded"))
    assert main(["eval", "fd-dinov2", "photos:0", "photos:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ulbench: error: FD-DINOv2 needs the official DINOv2 ViT-L/14 weights")
    for needle in (d.OFFICIAL_FILE, d.OFFICIAL_URL, "--dinov2-weights PATH", f"${d.WEIGHTS_ENV}=PATH"):
        assert needle in err
    assert "Traceback" not in err


def test_fd_dinov2_cli_stats_and_cache(tmp_path, small_file, monkeypatch, capsys):
    """Same pipeline as FID: fd(A, A) = 0, a stats file gives the value the images give, the cache is keyed by the
    weights' sha256 (another file: other entries, another value), and Inception-sized statistics are refused."""
    import json

    from ulbench.assets import sha256_file
    from ulbench.cli import main
    from ulbench.metrics.stats import Moments

    monkeypatch.setenv("ULBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(d.WEIGHTS_ENV, str(small_file))

    def run(*args):
        assert main(["eval", *args, "--limit", "6", "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    same = run("fd-dinov2", "photos:0", "photos:0")
    assert abs(same["fd_dinov2"]) < 1e-8
    r = run("fd-dinov2", "photos:0", "photos:1")
    fp = r["fingerprint"]
    assert r["fd_dinov2"] > 0 and fp["weights_sha256"] == sha256_file(small_file)
    assert fp["extractor"] == "dinov2-vit-p14-128x2/timm-VisionTransformer/cls-128@224"
    assert len(list((tmp_path / "cache" / "stats").glob("*.npz"))) == 2
    stats = run("stats", "photos:1", "-o", str(tmp_path / "ref.npz"), "--features", "dinov2")
    assert stats["fingerprint"]["extractor"] == fp["extractor"]
    assert run("fd-dinov2", "photos:0", str(tmp_path / "ref.npz"))["fd_dinov2"] == pytest.approx(r["fd_dinov2"])

    other = tmp_path / "other" / d.OFFICIAL_FILE
    other.parent.mkdir()
    torch.save(random_official(SMALL, seed=1), other)
    r2 = run("fd-dinov2", "photos:0", "photos:1", "--dinov2-weights", str(other))
    assert r2["fingerprint"]["weights_sha256"] != fp["weights_sha256"] and r2["fd_dinov2"] != r["fd_dinov2"]
    assert len(list((tmp_path / "cache" / "stats").glob("*.npz"))) == 4

    Moments(np.zeros(2048), np.eye(2048), 10).save_npz(tmp_path / "inception.npz")
    assert main(["eval", "fd-dinov2", "photos:0", str(tmp_path / "inception.npz"), "--limit", "6"]) == 2
    assert "statistics of 2048-d features, but this evaluation (fd_dinov2) uses dinov2-" in capsys.readouterr().err


SUITE = """version: 1
dataset: {{name: photos, resolution: 32}}
methods:
  - {{name: ul, preset: ul-tiny}}
compute: {{ladder: [1.0e12, 2.0e12]}}
evaluation: {{num_samples: 6, {extra}}}
"""


def test_suite_metric_needs_weights_at_validate_time(tmp_path, small_file, monkeypatch):
    from pathlib import Path

    from ulbench.suite import SuiteError, load_suite

    monkeypatch.delenv(d.WEIGHTS_ENV, raising=False)
    f = tmp_path / "s.yaml"
    f.write_text(SUITE.format(extra="metrics: [fid, fd_dinov2]"))
    with pytest.raises(SuiteError, match=r"s\.yaml: evaluation\.dinov2_weights: FD-DINOv2 needs the official"):
        load_suite(f)
    f.write_text(SUITE.format(extra=f"metrics: [fid, fd_dinov2], dinov2_weights: {tmp_path / 'missing.pth'}"))
    with pytest.raises(SuiteError, match=r"evaluation\.dinov2_weights: evaluation\.dinov2_weights=.*missing\.pth: no "):
        load_suite(f)
    f.write_text(SUITE.format(extra=f"metrics: [fid, fd_dinov2], dinov2_weights: {small_file}"))
    s = load_suite(f)
    assert s.evaluation.dinov2_weights == str(small_file)
    assert s.to_dict()["evaluation"]["dinov2_weights"] == str(small_file)
    f.write_text(SUITE.format(extra="batch_size: 8"))  # the default list leaves the opt-in metric out
    assert "fd_dinov2" not in load_suite(f).evaluation.metrics
    repo = Path(__file__).resolve().parents[1] / "suites"
    for name in ("smoke.yaml", "video-smoke.yaml"):
        assert "fd_dinov2" not in load_suite(repo / name).evaluation.metrics


def test_sweep_rows(tmp_path, small_file, monkeypatch):
    """The sweep's fd_dinov2 rows: the stored samples vs the dataset reference, N in the name, lower is better."""
    from types import SimpleNamespace

    from ulbench.suite import load_suite
    from ulbench.run.sweep import Sweep

    monkeypatch.setenv("ULBENCH_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "s.yaml"
    f.write_text(SUITE.format(extra=f"metrics: [fd_dinov2], reference_size: 8, dinov2_weights: {small_file}"))
    sweep = Sweep(load_suite(f), tmp_path / "run", progress=False)
    folder = tmp_path / "run" / "methods" / "ul" / "points" / "b0"
    folder.mkdir(parents=True)
    np.savez(folder / "samples_g1.npz", photo_crops(3, n=6, size=32))  # the ADM layout: N x H x W x 3
    plan = SimpleNamespace(name="ul", kind="ul", preset="ul-tiny", guidance=(1.0,), sampler={}, official=None,
                           train_flops=lambda rung: 1.0, steps=lambda rung: 1)
    (row,) = sweep.fd_dinov2_rows(plan, 0, folder, "b0")
    assert row["metric"] == "fd_dinov2_6" and row["metric_base"] == "fd_dinov2" and row["n"] == 6
    assert row["higher_is_better"] is False and row["value"] > 0
    assert row["fingerprint"]["extractor"].startswith("dinov2-") and "first 8" in row["fingerprint"]["reference"]
