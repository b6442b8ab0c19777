"""Bad inputs (issue 13): every file of tests/bad_files.py decodes to the right pixels or ends in one named
UserError (exit 2, no traceback); corrupt .npz, bad flag values, PSNR's name pairing, 16-bit and alpha images."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bad_files import CASES, Fails, Listed, Pixels, faststart_mp4
from conftest import write_pngs
from ulbench.cli import main
from ulbench.errors import UserError
from ulbench.metrics.images import DecodeNotes, _decode, folder_source, list_images, resolve_source

BY_NAME = {c.name: c for c in CASES}


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``ulbench ARGV`` in this process: (exit code, stdout, stderr); an exception escaping main fails the test."""
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # asserted where they matter, not what the CLI tests look at
        rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_named_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("ulbench: error: ")
    for needle in needles:
        assert needle in err, err


def _only_file(folder: Path) -> Path:
    (name,) = os.listdir(os.fsencode(folder))
    return folder / os.fsdecode(name)


@pytest.fixture(scope="module")
def video_evaluator():
    from ulbench.metrics.fvd import VideoEvaluator

    return VideoEvaluator(progress=False)


# --- the catalogue of bad files: library ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "image"], ids=lambda c: c.name)
def test_bad_image_decodes_right_or_is_named(case, tmp_path):
    folder = case.write(tmp_path)
    path = _only_file(folder)
    if isinstance(case.expect, Fails):
        with pytest.raises(UserError) as e:
            _decode(path)
        assert case.expect.needle in str(e.value) and case.file in str(e.value)
        with pytest.raises(UserError) as e:  # the FID path: listing, the size from the header, decoding
            next(folder_source(folder).batches(4))
        assert case.file in str(e.value)
        return
    want: Pixels = case.expect
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rgb = _decode(path, DecodeNotes(folder))
    ours = [str(w.message) for w in caught if str(folder) in str(w.message)]
    assert rgb.dtype == np.uint8 and rgb.shape == want.rgb.shape
    np.testing.assert_allclose(rgb.astype(int), want.rgb.astype(int), atol=want.tol, rtol=0)
    if want.warns is None:
        assert not ours, ours
    else:
        assert any(want.warns in m for m in ours) and all(m.startswith(str(folder)) for m in ours), ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (batch,) = folder_source(folder).batches(4)
    np.testing.assert_array_equal(batch[0], rgb)


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "folder"], ids=lambda c: c.name)
def test_bad_folder_lists_right_or_is_named(case, tmp_path):
    from ulbench.data.sources import Source

    folder = case.write(tmp_path)
    if isinstance(case.expect, Fails):
        with pytest.raises(UserError) as e:
            list_images(folder)
        assert case.expect.needle in str(e.value) and case.file in str(e.value)
        return
    assert len(list_images(folder)) == case.expect.n
    assert len(Source(folder).names) == case.expect.n  # `data prepare` lists each image once too


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "video"], ids=lambda c: c.name)
def test_bad_video_is_named(case, tmp_path):
    from ulbench.metrics.video import index_video_clips

    folder = case.write(tmp_path)
    with pytest.warns(UserWarning, match=re.escape(case.file)), pytest.raises(UserError) as e:
        index_video_clips(folder)
    assert case.expect.needle in str(e.value) and str(folder) in str(e.value)


@pytest.mark.parametrize("case", [c for c in CASES if c.kind.endswith("npz")], ids=lambda c: c.name)
def test_bad_npz_is_named(case, tmp_path, video_evaluator):
    from ulbench.metrics.stats import Moments

    path = case.write(tmp_path)
    read = {"images_npz": resolve_source, "stats_npz": Moments.load_npz,
            "clips_npz": video_evaluator.set_moments}[case.kind]
    video_evaluator.model = None  # set_moments must refuse the clips before I3D sees them
    with pytest.raises(UserError) as e:
        read(path)
    assert case.expect.needle in str(e.value) and str(path) in str(e.value)


# --- the catalogue through the CLI: exit 2 and one named paragraph, or a result ---------------------------------------

def _cli_argv(case, path: Path) -> list[str]:
    if case.kind in ("image", "folder", "images_npz"):
        return ["eval", "psnr", path, path, "--json"]
    if case.kind == "stats_npz":
        return ["eval", "fid", path, path, "--json", "--no-cache"]
    return ["eval", "fvd", path, path, "--json"]  # clips_npz, video


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_file_through_the_cli(case, tmp_path, capsys):
    path = case.write(tmp_path)
    rc, out, err = _cli(capsys, *_cli_argv(case, path))
    if isinstance(case.expect, Fails):
        _assert_named_error(rc, err, case.expect.needle, case.file)
    else:
        assert rc == 0, err
        r = json.loads(out)
        assert r["n"] == (case.expect.n if isinstance(case.expect, Listed) else 1)
        assert r["psnr_mean"] == float("inf")


def test_bad_files_in_a_real_process(tmp_path):
    """Three of them through `python -m ulbench` (real stderr encoding: the non-UTF-8 name must still print)."""
    for name in ("non_utf8_name_zero_byte", "decompression_bomb_png", "npz_truncated"):
        case = BY_NAME[name]
        (tmp_path / name).mkdir()
        path = case.write(tmp_path / name)
        proc = subprocess.run([sys.executable, "-m", "ulbench", "eval", "psnr", str(path), str(path)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert case.file in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- corrupt .npz in each image command; the statistics cache ---------------------------------------------------------

@pytest.mark.parametrize("command", ["fid", "kid", "stats", "psnr"])
def test_truncated_npz_in_each_image_command(command, tmp_path, capsys):
    np.savez(tmp_path / "good.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    extra = {"stats": ["-o", tmp_path / "out.npz"], "psnr": [tmp_path / "cut.npz"]}.get(command, ["photos:0"])
    rc, _, err = _cli(capsys, "eval", command, tmp_path / "cut.npz", *extra)
    _assert_named_error(rc, err, str(tmp_path / "cut.npz"), "truncated")
    assert not (tmp_path / "out.npz").exists()


def test_corrupt_statistics_cache_is_deleted_and_rebuilt(tmp_path, monkeypatch):
    from ulbench import assets
    from ulbench.metrics.fid import ImageEvaluator

    ev = ImageEvaluator(progress=False, use_cache=True)
    monkeypatch.setattr(assets, "cache_dir", lambda: tmp_path / "cache")
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", arr_0=images)
    first = ev.set_stats(tmp_path / "x.npz")
    (entry,) = (tmp_path / "cache" / "stats").glob("*.npz")
    good = entry.read_bytes()
    for damage in (good[: len(good) // 2], b"", b"not a zip"):
        entry.write_bytes(damage)
        with pytest.warns(UserWarning, match=re.escape(str(entry)) + ".*damaged.*recomputing"):
            again = ev.set_stats(tmp_path / "x.npz")
        np.testing.assert_array_equal(again.moments.mu, first.moments.mu)
        assert entry.read_bytes() == good  # rewritten whole
    np.savez(entry, mu=np.full(2048, np.nan), sigma=np.eye(2048), n=3)  # readable, but not statistics
    with pytest.warns(UserWarning, match="damaged"):
        assert np.isfinite(ev.set_stats(tmp_path / "x.npz").moments.mu).all()


# --- flag values ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["eval", "fid", "photos:0", "photos:1", "--limit", "0"], "--limit 0"),
    (["eval", "fid", "photos:0", "photos:1", "--limit", "-3"], "--limit -3"),
    (["eval", "kid", "photos:0", "photos:1", "--limit", "0"], "--limit 0"),
    (["eval", "stats", "photos:0", "-o", "s.npz", "--limit", "0"], "--limit 0"),
    (["eval", "fid", "photos:0", "photos:1", "--bootstrap", "1"], "--bootstrap 1"),
    (["eval", "fid", "photos:0", "photos:1", "--bootstrap", "-2"], "--bootstrap -2"),
    (["eval", "fid", "photos:0", "photos:1", "--batch-size", "0"], "--batch-size 0"),
    (["eval", "kid", "photos:0", "photos:1", "--subset-size", "1"], "--subset-size 1"),
    (["eval", "fvd", "clips.npz", "clips.npz", "--frames", "8"], "at least 9 frames"),
    (["eval", "fvd", "clips.npz", "clips.npz", "--stride", "0"], "--stride 0"),
    (["flops", "ul-tiny", "--batch-size", "0"], "--batch-size 0"),
    (["flops", "ul-tiny", "--resolution", "0"], "--resolution 0"),
])
def test_bad_flag_values_are_refused_before_any_work(argv, needle, capsys, monkeypatch):
    from ulbench.metrics import fid, fvd

    def no_network(*a, **k):
        raise AssertionError("a network was loaded for an invalid command")

    monkeypatch.setattr(fid, "InceptionFeatures", no_network)
    monkeypatch.setattr(fvd, "load_i3d", no_network)
    rc, _, err = _cli(capsys, *argv)
    _assert_named_error(rc, err, needle)


def test_limit_in_the_library(tmp_path):
    np.savez(tmp_path / "x.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    for spec in (tmp_path / "x.npz", "photos:0", np.zeros((4, 8, 8, 3), np.uint8)):
        for limit in (0, -1):
            with pytest.raises(UserError, match="limit"):
                resolve_source(spec, limit)
    assert resolve_source(tmp_path / "x.npz", 3).count == 3


def test_bootstrap_of_one_is_refused_before_embedding(evaluator, monkeypatch):
    monkeypatch.setattr(evaluator, "features", lambda *a, **k: pytest.fail("images were embedded"))
    with pytest.raises(UserError, match="bootstrap"):
        evaluator.fid("photos:0", "photos:1", bootstrap=1)


def test_fvd_refuses_short_clips_before_i3d(tmp_path):
    from ulbench.metrics.fvd import VideoEvaluator, clip_moments

    class Unused(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("I3D ran on clips it cannot take")

    model = torch.nn.Sequential(torch.nn.Linear(1, 1), Unused())
    for clips in (np.zeros((2, 8, 16, 16, 3), np.uint8), [np.zeros((8, 16, 16, 3), np.uint8)]):
        with pytest.raises(UserError, match="at least 9 frames"):
            clip_moments(model, clips)
    with pytest.raises(UserError, match="at least 9 frames"):
        VideoEvaluator(i3d_weights=tmp_path / "not-needed.ckpt", frames=8)


def test_flops_resolution_the_patching_cannot_divide(capsys):
    """ul-tiny (32 px) patches 2x2 and downsamples twice: 36 px gives an odd 9 x 9 latent (meta device, ~10 s)."""
    rc, _, err = _cli(capsys, "flops", "ul-tiny", "--resolution", "36")
    _assert_named_error(rc, err, "--resolution 36", "patching", "32 or 40")


# --- PSNR pairs by name -----------------------------------------------------------------------------------------------

def _imgs(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_psnr_names_that_differ_are_an_error(tmp_path, capsys):
    a, b = write_pngs(_imgs(0), tmp_path / "a"), write_pngs(_imgs(1), tmp_path / "b")
    (b / "00002.png").rename(b / "recon_2.png")  # same count, one name differs: position pairing would go on
    rc, _, err = _cli(capsys, "eval", "psnr", a, b)
    _assert_named_error(rc, err, "by file name", f"only in {a}: 00002", f"only in {b}: recon_2")


def test_psnr_pairs_by_relative_path_without_extension(tmp_path):
    from ulbench.metrics.psnr import psnr_paired

    x = _imgs(2, 2)
    for side in ("a", "b"):
        (tmp_path / side / "cls").mkdir(parents=True)
        Image.fromarray(x[0]).save(tmp_path / side / "zeta.png")
        Image.fromarray(x[1]).save(tmp_path / side / "cls" / "alpha.png")
    assert psnr_paired(tmp_path / "a", tmp_path / "b")["psnr_mean"] == float("inf")
    # originals stored as .jpg pair with reconstructions saved as .png (here PNG bytes, so the pixels agree)
    (tmp_path / "b" / "zeta.png").rename(tmp_path / "b" / "zeta.jpg")
    with pytest.warns(UserWarning, match="PNG data"):
        r = psnr_paired(tmp_path / "a", tmp_path / "b")
    assert r["n"] == 2 and r["psnr_mean"] == float("inf")
    (tmp_path / "a" / "zeta.jpg").write_bytes((tmp_path / "a" / "zeta.png").read_bytes())
    with pytest.raises(UserError, match="zeta.jpg.*same name|zeta.png.*same name"):
        psnr_paired(tmp_path / "a", tmp_path / "b")


def test_psnr_pairs_arrays_by_index_and_not_a_folder_with_an_array(tmp_path, capsys):
    x = _imgs(3)
    np.savez(tmp_path / "a.npz", arr_0=x)
    np.savez(tmp_path / "b.npz", arr_0=x)
    rc, out, _ = _cli(capsys, "eval", "psnr", tmp_path / "a.npz", tmp_path / "b.npz", "--json")
    assert rc == 0 and json.loads(out)["n"] == 3
    rc, _, err = _cli(capsys, "eval", "psnr", write_pngs(x, tmp_path / "f"), tmp_path / "b.npz")
    _assert_named_error(rc, err, "two folders or two .npz")


# --- 16-bit and alpha -------------------------------------------------------------------------------------------------

def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path, capsys):
    """The CLI sees the same 8-bit values as an 8-bit copy written with round(v / 257)."""
    from bad_files import V8, V16

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(V16.reshape(2, 4)).save(tmp_path / "a" / "x.png")  # mode I;16
    Image.fromarray(V8.reshape(2, 4)).save(tmp_path / "b" / "x.png")
    rc, out, err = _cli(capsys, "eval", "psnr", tmp_path / "a", tmp_path / "b", "--json")
    assert rc == 0 and json.loads(out)["psnr_mean"] == float("inf"), err


def test_alpha_is_dropped_with_one_warning_per_input(tmp_path):
    rgba = np.concatenate([_imgs(4), np.full((3, 8, 8, 1), 7, np.uint8)], axis=-1)
    folder = tmp_path / "rgba"
    folder.mkdir()
    for i, a in enumerate(rgba):
        Image.fromarray(a, "RGBA").save(folder / f"{i}.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (batch,) = folder_source(folder).batches(8)
    alpha = [str(w.message) for w in caught if "alpha" in str(w.message)]
    assert len(alpha) == 1 and str(folder / "0.png") in alpha[0]
    np.testing.assert_array_equal(np.stack(batch), rgba[..., :3])


# --- the data side: a link loop in a training folder, a truncated video in a training set -----------------------------

def test_training_folder_with_a_link_loop_names_the_link(tmp_path):
    from ulbench.data.folder import FolderDataset

    folder = BY_NAME["symlink_loop"].write(tmp_path)
    ds = FolderDataset(folder, 4)
    bad = ds.source.names.index("loop1.png")
    with pytest.raises(UserError, match=re.escape(str(folder / "loop1.png"))):
        ds[bad]


def test_truncated_video_in_a_training_set_is_counted_unreadable(tmp_path):
    from ulbench.data.video import ClipSampling, VideoDataset, read_video_folder

    data, header = faststart_mp4()
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "good.mp4").write_bytes(data)
    (tmp_path / "v" / "cut.mp4").write_bytes(data[: header + (len(data) - header) // 2])
    ds = VideoDataset(read_video_folder(tmp_path / "v"), ClipSampling(frames=4, resolution=8))
    assert ds.skipped["unreadable"] == ["cut.mp4"] and len(ds) == 1
    assert ds[0][0].shape == (3, 4, 8, 8)
