"""The paper-scale data path end to end at toy size: a real JPEG tree of photo crops -> `ulbench data prepare`
(zip) -> `suites/photos-prepared.yaml` (streamed DataLoader workers, xflip, latent caches for UL and the KL-VAE)
-> results whose fingerprints name the dataset's content fingerprint."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ulbench.data.builtin import write_photo_tree
from ulbench.data.prepared import PreparedDataset, prepare
from ulbench.run.directory import start_run

SUITE = Path(__file__).parents[1] / "suites" / "photos-prepared.yaml"


@pytest.mark.slow
def test_prepared_photos_suite_runs_end_to_end(tmp_path):
    tree = write_photo_tree(tmp_path / "tree", 96, 36, 90, classes=2, seed=4)
    prepare(tree, tmp_path / "photos-32.zip", 32, workers=1, progress=False)
    ds = PreparedDataset(tmp_path / "photos-32.zip")
    assert len(ds) == 96 and ds.num_classes == 2
    # the data path is under test, not learning: the suite's budgets cut to a few steps per stage
    shrink = ["compute.stage1.train_flops=1.0e11", "compute.ladder=[5.0e10]", "evaluation.num_samples=16",
              "evaluation.num_reconstructions=16", "evaluation.reference_size=32"]
    run = start_run(str(SUITE), [f"dataset.path={tmp_path / 'photos-32.zip'}", *shrink], tmp_path / "runs", "t",
                    progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    got = {(r["method"], r["metric"]) for r in rows}
    for method in ("ul", "sd-dit"):
        assert {(method, m) for m in ("fid16", "rfid16", "psnr", "bits_per_pixel")} <= got
    assert all(math.isfinite(r["value"]) for r in rows)
    fid = next(r for r in rows if r["metric"] == "fid16")
    assert f"sha256:{ds.fingerprint()[:16]}" in fid["fingerprint"]["reference"]
    for method in ("ul", "sd-dit"):  # each stage 2 read a latent cache of the 96 images and their mirrors
        meta = json.loads((run / "methods" / method / "stage2" / "latents" / "meta.json").read_text())
        assert meta["complete"] and meta["n"] == 96 and meta["fields"] == ["latent", "latent_xflip"]
        assert meta["key_parts"]["dataset"] == ds.fingerprint() and meta["key_parts"]["xflip"] is True
    from ulbench.assets import sha256_file

    stage1 = run / "methods" / "ul" / "stage1"
    ema = stage1 / json.loads((stage1 / "latest.json").read_text())["checkpoint"] / "ema.safetensors"
    meta = json.loads((run / "methods" / "ul" / "stage2" / "latents" / "meta.json").read_text())
    assert meta["key_parts"]["encoder_sha256"] == sha256_file(ema)  # retraining stage 1 changes the key
    recorded = json.loads((run / "methods" / "ul" / "stage1" / "config.json").read_text())["data"]
    assert recorded["spec"] == str((tmp_path / "photos-32.zip").resolve()) and recorded["n"] == 96
    # the UL cache holds the stage-1 encoder's latents of image 0 and of its mirror image
    from ul_model.stages import image_input, load_run

    enc = load_run(run / "methods" / "ul" / "stage1")[0].encoder
    x = ds[0][0][None]
    lat = [np.load(run / "methods" / "ul" / "stage2" / "latents" / f"{f}-00000.npy")[0]
           for f in ("latent", "latent_xflip")]
    import torch

    with torch.no_grad():
        np.testing.assert_allclose(lat[0], enc(image_input(x))[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(lat[1], enc(image_input(x.flip(-1)))[0].numpy(), atol=1e-5)


def test_reference_statistics_stream_a_prepared_zip(tmp_path, evaluator):
    """`ulbench eval stats DEST` on a prepared zip: the statistics of exactly its images, in index order."""
    from conftest import run_cli

    tree = write_photo_tree(tmp_path / "tree", 24, 40, 70, classes=3, seed=5)
    prepare(tree, tmp_path / "p.zip", 32, workers=1, progress=False)
    ds = PreparedDataset(tmp_path / "p.zip")
    direct = evaluator.set_stats(ds.uint8(len(ds))).moments
    r = run_cli("eval", "stats", str(tmp_path / "p.zip"), "-o", str(tmp_path / "ref.npz"), "--json", "--no-cache")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 24
    with np.load(tmp_path / "ref.npz") as z:
        np.testing.assert_allclose(z["mu"], direct.mu, rtol=0, atol=1e-5)
        np.testing.assert_allclose(z["sigma"], direct.sigma, rtol=0, atol=1e-5)
    fid = evaluator.fid(str(tmp_path / "p.zip"), str(tmp_path / "ref.npz"))
    assert abs(fid["fid"]) < 1e-3
