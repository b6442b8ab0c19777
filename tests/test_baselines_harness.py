"""Baselines through the harness's one interface: presets and FLOPs via `ulbench flops`, a suite that trains UL,
SD-latent+DiT and SD-latent+EDM2 side by side on real photo crops, and a user's diffusers VAE folder as a frozen
first stage."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from ulbench.data import MemoryDataset
from ulbench.flops import method_flops
from ulbench.methods import KINDS, kind_of_preset
from ulbench.methods.base import TrainData
from ulbench.run.directory import start_run

SUITE = """
version: 1
name: side-by-side
dataset: {name: photos, resolution: 32, subset: 256}
methods:
  - {name: ul, kind: ul, preset: ul-tiny,
     train: {stage1: {batch_size: 16, lr: 1.0e-3, warmup_steps: 5, ema_decay: 0.9, checkpoint_every: 0, log_every: 1},
             stage2: {batch_size: 32, lr: 1.0e-3, warmup_steps: 5, ema_decay: 0.9, checkpoint_every: 0, log_every: 1}}}
  - {name: sd-dit, kind: dit, preset: dit-tiny, overrides: {vae: {perceptual_weight: 0, disc_weight: 0}},
     train: {stage1: {batch_size: 16, lr: 1.0e-3, warmup_steps: 5, ema_decay: 0.9, checkpoint_every: 0, log_every: 1},
             stage2: {batch_size: 32, lr: 1.0e-3, warmup_steps: 5, ema_decay: 0.9, checkpoint_every: 0, log_every: 1}}}
  - {name: sd-edm2, kind: edm2, preset: edm2-tiny, overrides: {vae: {perceptual_weight: 0, disc_weight: 0}},
     train: {stage1: {batch_size: 16, lr: 1.0e-3, warmup_steps: 5, ema_decay: 0.9, checkpoint_every: 0, log_every: 1},
             stage2: {batch_size: 32, lr: 1.0e-2, warmup_steps: 5, ema_decay: 0.9, checkpoint_every: 0, log_every: 1}}}
compute:
  ladder: [5.0e10, 1.0e11]
  stage1: {train_flops: 2.0e11}
evaluation:
  metrics: [fid, psnr, bits_per_pixel]
  num_samples: 16
  num_reconstructions: 16
  sampler: {method: ancestral, steps: 6, decoder_steps: 6}
"""


def test_every_kind_is_registered_with_its_presets():
    assert {"ul", "dit", "edm2"} <= set(KINDS)
    assert kind_of_preset("dit-xl-2").name == "dit" and kind_of_preset("edm2-s").name == "edm2"
    r = run_cli("ls", "presets")
    assert r.returncode == 0 and "dit-xl-2" in r.stdout and "edm2-xxl" in r.stdout


def test_flops_cli_reproduces_dit_xl2_published_forward_cost():
    # DiT's published 118.64 G multiply-adds per forward at 256x256 (latent 32x32x4), through the harness's path
    stage2 = method_flops("dit-xl-2", resolution=256)["stage2"]
    assert stage2["forward_macs_per_image"] / 1e9 == pytest.approx(118.64, rel=0.01)
    r = run_cli("flops", "dit-xl-2", "--resolution", "256", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stage2"]["forward_macs_per_image"] / 1e9 == pytest.approx(118.64, rel=0.01)


@pytest.mark.slow
def test_suite_trains_ul_and_both_baselines_side_by_side(tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE)
    run = start_run(str(tmp_path / "s.yaml"), [], tmp_path / "runs", "r", progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    for method in ("ul", "sd-dit", "sd-edm2"):
        mine = [r for r in rows if r["method"] == method]
        assert {(r["point"], r["metric_base"]) for r in mine} == {
            ("stage1", "psnr"), ("stage1", "bits_per_pixel"), ("b0", "fid"), ("b1", "fid")}, method
        assert all(torch.isfinite(torch.tensor(r["value"])) for r in mine)
        b1 = next(r for r in mine if r["point"] == "b1")
        assert b1["train_flops"]["stage1"] > 0 and b1["train_flops"]["stage2"] >= 1.0e11
        # each baseline's own training reduced its loss: mean of the last third of the logged steps vs the first
        # third. EDM2's per-step loss (log-normal sigmas, learned uncertainty) scatters by ~0.15 around ~1.6, so a
        # third's mean carries ~3% noise: a loop that does not learn stays near 1.0, this one measured ~0.8.
        for stage in ("stage1", "stage2") if method != "ul" else ():
            log = [json.loads(line)["loss"] for line in (run / "methods" / method / stage / "metrics.jsonl")
                   .read_text().splitlines()]
            k = len(log) // 3
            assert sum(log[-k:]) < 0.9 * sum(log[:k]), (method, stage, log)
    import numpy as np

    with np.load(run / "methods/sd-dit/points/b1/samples_g1.npz") as z:
        assert z["arr_0"].shape == (16, 32, 32, 3) and z["arr_0"].dtype == np.uint8 and z["arr_0"].std() > 1


def test_a_users_diffusers_vae_folder_is_a_frozen_first_stage(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=32,
                        layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    kind = kind_of_preset("dit-tiny")
    cfg = kind.resolve("dit-tiny", {"vae": {"pretrained": str(tmp_path / "vae")}}, resolution=32)
    assert kind.stages_for(cfg) == ("stage2",)  # nothing to train in stage 1, no stage-1 FLOPs
    data = TrainData(MemoryDataset("zeros", torch.zeros(2, 3, 32, 32), torch.zeros(2), 1))
    runner = kind.runner(cfg, {}, tmp_path / "w", "cpu", "fp32", data, False)
    loaded = runner.vae()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert runner.reconstruct(x, [0, 1], {}).shape == x.shape


def test_edm2_standardizes_a_pretrained_vae_as_edm2_measured_it(tmp_path, one_thread):
    """EDM2's raw_mean/raw_std describe SD-VAE latents of images fed in [0, 1]. A VAE saved locally, its raw
    statistics measured that way by the test (float64 over real photo crops), given to the edm2 kind the way EDM2's
    published numbers are: the standardized latents the harness trains on (its latent cache, then the kind's
    normalization) have per-channel mean ~0 and std ~0.5 (within 10% of 0.5). Fed [-1, 1] (the harness's own
    range, as before), the same statistics miss by far more."""
    from diffusers import AutoencoderKL

    from baselines import kl_vae
    from ulbench.data import photos

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=1,
                        layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")  # one GroupNorm group: the input's offset and scale reach the latents
    images = photos(32).images[:512]  # (N, 3, 32, 32) in [-1, 1]
    with torch.no_grad():
        raw = vae.encode((images + 1) / 2).latent_dist.mode().double()  # EDM2's input: x / 255
    raw_mean, raw_std = raw.mean((0, 2, 3)).tolist(), raw.std((0, 2, 3)).tolist()
    kind = kind_of_preset("edm2-s")
    cfg = kind.resolve("edm2-s", {"vae": {"pretrained": str(tmp_path / "vae"), "raw_mean": raw_mean,
                                          "raw_std": raw_std}}, resolution=32)
    assert cfg.vae.input_range == (0.0, 1.0) and cfg.vae.raw_mean == tuple(raw_mean)
    data = TrainData(MemoryDataset("photos", images, torch.zeros(len(images)), 1))
    runner = kind.runner(cfg, {}, tmp_path / "w", "cpu", "fp32", data, False)
    cached = torch.stack([runner.latents()[i][0][0] for i in range(len(images))])  # posterior means (N, 4, 8, 8)
    z = runner.latent_norm().normalize(cached.double())
    assert z.mean((0, 2, 3)).abs().max() < 0.05 and (z.std((0, 2, 3)) / 0.5 - 1).abs().max() < 0.1
    old = runner.latent_norm().normalize(kl_vae.encode(runner.vae(), images).double())  # fed [-1, 1]
    miss = torch.maximum(old.mean((0, 2, 3)).abs() / 0.5, (old.std((0, 2, 3)) / 0.5 - 1).abs()).max()
    assert miss > 0.2, miss  # measured 0.27: outside the 10% the fed-as-measured latents meet


def test_a_missing_vae_folder_is_reported_before_anything_trains(tmp_path):
    from ulbench.errors import UserError

    suite = SUITE.replace("{name: sd-dit, kind: dit, preset: dit-tiny, overrides: {vae: {perceptual_weight: 0, ",
                          "{name: sd-dit, kind: dit, preset: dit-tiny, overrides: {vae: {pretrained: /no/such/vae, "
                          "perceptual_weight: 0, ")
    (tmp_path / "s.yaml").write_text(suite)
    with pytest.raises(UserError, match=r"s\.yaml: methods\[1\] \(sd-dit\): VAE folder /no/such/vae"):
        start_run(str(tmp_path / "s.yaml"), [], tmp_path / "runs", "r", progress=False)
    assert not (tmp_path / "runs" / "side-by-side" / "r" / "methods").exists()
