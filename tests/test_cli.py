"""The command line: JSON keys, and bad input ending in one named error without a traceback."""
import json

import numpy as np
import pytest

from conftest import run_cli, write_pngs
from ulbench.metrics.images import photo_crops


def _assert_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return write_pngs(photo_crops(7, 6), root / "a"), write_pngs(photo_crops(8, 6), root / "b")


@pytest.mark.slow
def test_fid_kid_stats_psnr_json(small_dirs, tmp_path, inception_weights):
    a, b = small_dirs
    fid = json.loads(run_cli("eval", "fid", str(a), str(b), "--json", "--no-cache").stdout)
    assert {"fid", "n", "fingerprint"} <= fid.keys() and fid["n"] == 6 and fid["fid"] > 0
    assert fid["fingerprint"]["weights_sha256"].startswith("7ff4a85c")
    kid = json.loads(run_cli("eval", "kid", str(a), str(b), "--json", "--no-cache", "--subset-size", "6").stdout)
    assert {"kid_mean", "kid_std", "n", "fingerprint"} <= kid.keys()
    st = run_cli("eval", "stats", str(b), "-o", str(tmp_path / "ref.npz"), "--json", "--no-cache")
    assert json.loads(st.stdout)["n"] == 6
    fid_ref = json.loads(run_cli("eval", "fid", str(a), str(tmp_path / "ref.npz"), "--json", "--no-cache").stdout)
    assert fid_ref["fid"] == pytest.approx(fid["fid"], rel=1e-9)
    ps = json.loads(run_cli("eval", "psnr", str(a), str(a), "--json").stdout)
    assert ps["n"] == 6 and ps["psnr_mean"] == float("inf")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_clean_error(run_cli("eval", "fid", str(tmp_path / "empty"), "photos:0", "--json"), "no images found",
                        str(tmp_path / "empty"))


def test_unreadable_image(small_dirs, tmp_path):
    bad = write_pngs(photo_crops(9, 2), tmp_path / "bad")
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _assert_clean_error(run_cli("eval", "fid", str(bad), str(small_dirs[1]), "--json", "--no-cache"),
                        "cannot read image", "broken.png")


def test_zero_byte_video_alone(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "empty.mp4").write_bytes(b"")
    _assert_clean_error(run_cli("eval", "fvd", str(tmp_path / "v"), str(tmp_path / "v"), "--json"),
                        str(tmp_path / "v"))


def test_wrong_hash_weights(small_dirs, tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"x" * 100)
    _assert_clean_error(run_cli("eval", "fid", str(small_dirs[0]), str(small_dirs[1]), "--inception-weights", str(fake)),
                        "sha256", str(fake), "ulbench assets fetch inception")


def test_missing_weights_offline(small_dirs, tmp_path):
    env = {"ULBENCH_CACHE": str(tmp_path / "nothing"), "ULBENCH_OFFLINE": "1"}
    _assert_clean_error(run_cli("eval", "fid", str(small_dirs[0]), str(small_dirs[1]), env=env),
                        "not found", "ulbench assets fetch inception", "--inception-weights")


def test_missing_input_and_bad_npz(tmp_path):
    _assert_clean_error(run_cli("eval", "fid", str(tmp_path / "nope"), "photos:0"), "no such folder or file")
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    _assert_clean_error(run_cli("eval", "fid", str(tmp_path / "floats.npz"), "photos:0"), "uint8")
