"""UL from the command line: train both stages, sample PNGs, reconstruct, presets; dataset errors."""
import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from ulbench.data import fashion_mnist
from ulbench.errors import UserError


@pytest.mark.slow
def test_train_sample_reconstruct_cli(tmp_path):
    common = ["--steps", "4", "--batch-size", "8", "--lr", "1e-3", "--warmup", "1", "--log-every", "2",
              "--checkpoint-every", "2", "--device", "cpu"]
    r = run_cli("train", "stage1", "--preset", "ul-tiny", "--data", "photos", "--out", str(tmp_path / "s1"), *common)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "prior_diffusion", "prior_kl", "decoder", "bits_per_pixel", "grad_norm", "images_per_s",
            "lr"} <= rows[-1].keys()
    assert sorted(p.name for p in (tmp_path / "s1").glob("checkpoint-*")) == ["checkpoint-00000002",
                                                                              "checkpoint-00000004"]
    again = run_cli("train", "stage1", "--preset", "ul-tiny", "--data", "photos", "--out", str(tmp_path / "s1"),
                    *common)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    r = run_cli("train", "stage2", "--stage1", str(tmp_path / "s1"), "--out", str(tmp_path / "s2"), *common,
                "--keep-checkpoints", "1")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in (tmp_path / "s2").glob("checkpoint-*")] == ["checkpoint-00000004"]
    r = run_cli("sample", "--run", str(tmp_path / "s2"), "--n", "3", "--out", str(tmp_path / "samples"),
                "--steps", "2", "--decoder-steps", "2")
    assert r.returncode == 0, r.stderr
    pngs = sorted((tmp_path / "samples").glob("*.png"))
    assert len(pngs) == 3 and Image.open(pngs[0]).size == (32, 32) and Image.open(pngs[0]).mode == "RGB"
    r = run_cli("reconstruct", "--run", str(tmp_path / "s1"), "--n", "2", "--out", str(tmp_path / "rec"),
                "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "rec" / "reconstructions").glob("*.png"))) == 2
    bad = run_cli("sample", "--run", str(tmp_path / "s1"), "--n", "1", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "stage-2" in bad.stderr


def test_ls_presets_prints_parameter_counts():
    r = run_cli("ls", "presets")
    assert r.returncode == 0
    lines = {line.split()[1]: line for line in r.stdout.splitlines()}
    assert {"ul-tiny", "ul-small", "ul-medium", "dit-xl-2", "edm2-s"} <= lines.keys()
    assert "32x32x32" in lines["ul-small"] and "total 711.09M" in lines["ul-small"]
    assert "4x64x64" in lines["edm2-s"] and "stage2 280.21M" in lines["edm2-s"]


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_idx_files(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5]))
    ds = fashion_mnist("train", tmp_path)
    assert ds.images.shape == (5, 3, 32, 32) and ds.labels.tolist() == [3, 1, 4, 1, 5]
    np.testing.assert_array_equal(ds.uint8(5)[:, 2:30, 2:30, 0], imgs)  # padded by 2, values preserved
    assert (ds.uint8(5)[:, :2] == 0).all()


def test_missing_fashion_mnist_names_the_install_command(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", tmp_path / "absent")


@pytest.mark.slow
def test_samples_do_not_depend_on_the_number_of_processes(tmp_path):
    import subprocess
    import sys

    common = ["--steps", "2", "--batch-size", "4", "--checkpoint-every", "2", "--device", "cpu"]
    assert run_cli("train", "stage1", "--preset", "ul-tiny", "--data", "photos", "--out", str(tmp_path / "s1"),
                   *common).returncode == 0
    assert run_cli("train", "stage2", "--stage1", str(tmp_path / "s1"), "--out", str(tmp_path / "s2"),
                   *common).returncode == 0
    flags = ["--num-samples", "20", "--steps", "2", "--decoder-steps", "2", "--device", "cpu"]
    assert run_cli("sample", "--run", str(tmp_path / "s2"), "--out", str(tmp_path / "one"), *flags).returncode == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "ulbench.cli",
                          "sample", "--run-dir", str(tmp_path / "s2"), "--out", str(tmp_path / "two"), *flags],
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = sorted((tmp_path / "one").glob("*.png")), sorted((tmp_path / "two").glob("*.png"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 20
    assert all(np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y))) for x, y in zip(a, b))
