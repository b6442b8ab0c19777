"""The KL-VAE's LDM recipe (L1 + LPIPS + KL, patch-GAN from disc_start): it trains on real images with finite,
decreasing loss; the GAN terms are off before disc_start and on after; the discriminator learns only from its own
hinge loss; the L1 + KL recipe (perceptual_weight 0, no discriminator) is the one `vae_losses` always computed."""
from __future__ import annotations

import math

import pytest
import torch

from baselines import kl_vae
from baselines.ldm_loss import LDMLoss, PatchDiscriminator, VAEWithDiscriminator, vae_state
from ulbench.data.builtin import photos
from ulbench.methods.ldm import stage1_model_and_loss, with_step

DISC_START = 4
STEPS = 8
BATCH = 4


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    ds = photos(32, n=BATCH)
    return torch.stack([ds[i][0] for i in range(BATCH)])  # (4, 3, 32, 32) real photo crops in [-1, 1]


def _disc_grad(model) -> float:
    return sum(float(p.grad.abs().sum()) for p in model.disc.parameters() if p.grad is not None)


def test_ldm_recipe_trains_with_the_gan_switched_on_at_disc_start(images, lpips_weights):
    torch.manual_seed(0)
    cfg = kl_vae.vae_preset("kl-f4-tiny", disc_start=DISC_START, disc_channels=8, disc_layers=2)
    assert (cfg.perceptual_weight, cfg.disc_weight, kl_vae.KLVAEConfig().disc_start) == (1.0, 0.5, 50001)  # LDM's
    model, loss = stage1_model_and_loss(cfg, kl_vae.build_vae(cfg))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    log = []
    for step in range(STEPS):
        terms = loss(model, images, step)
        opt.zero_grad(set_to_none=False)
        terms["loss"].mean().backward()
        log.append({k: float(v.detach().mean()) for k, v in terms.items()} | {"disc_grad": _disc_grad(model)})
        opt.step()
    assert all(math.isfinite(v) for row in log for v in row.values())
    before, after = log[:DISC_START], log[DISC_START:]
    assert all(r["d"] == 0 and r["d_weight"] == 0 and r["disc_grad"] == 0 for r in before)
    assert all(r["d"] > 0 and r["d_weight"] > 0 and r["disc_grad"] > 0 for r in after)
    assert before[-1]["loss"] < before[0]["loss"]  # L1 + LPIPS + KL goes down
    assert log[-1]["recon"] < log[0]["recon"] and log[-1]["lpips"] < log[0]["lpips"]


def test_discriminator_learns_only_from_its_hinge_loss(images):
    # LDM's two optimizers as one: the discriminator's gradient from the whole loss must be that of its hinge loss
    # alone; were the generator term's gradient to reach it, it would learn to score reconstructions as real.
    torch.manual_seed(0)
    cfg = kl_vae.vae_preset("kl-f4-tiny", disc_start=0, disc_channels=8, disc_layers=2, perceptual_weight=0.0)
    model = VAEWithDiscriminator(kl_vae.build_vae(cfg), cfg)
    params = list(model.disc.parameters())
    torch.manual_seed(1)
    terms = LDMLoss(cfg, None)(model, images, step=0)
    assert float(terms["d_weight"].mean()) > 0 and float(terms["g"].abs().mean()) > 0
    full = torch.autograd.grad(terms["loss"].mean(), params)
    torch.manual_seed(1)  # the same posterior sample, so the same reconstructions
    x_hat = model.vae.decode(model.vae.encode(images).latent_dist.sample()).sample.detach()
    real, fake = model.disc(images).flatten(1), model.disc(x_hat).flatten(1)
    hinge = 0.5 * (torch.relu(1 - real).mean(1) + torch.relu(1 + fake).mean(1))
    for got, want in zip(full, torch.autograd.grad(hinge.mean(), params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_l1_kl_recipe_is_vae_losses(images):
    cfg = kl_vae.vae_preset("kl-f4-tiny", perceptual_weight=0.0, disc_weight=0.0)
    assert not cfg.ldm_loss and kl_vae.vae_preset("kl-f4-tiny").ldm_loss
    vae = kl_vae.build_vae(cfg)
    torch.manual_seed(1)
    want = kl_vae.vae_losses(vae, cfg, images)
    torch.manual_seed(1)
    got = LDMLoss(cfg, None)(vae, images, step=10**6)
    for k in ("recon", "kl", "loss", "bits_per_pixel"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0)


def test_patch_discriminator_shape_and_checkpoint_keys():
    d = PatchDiscriminator(3, 64, 3)  # LDM's default: 2.77M parameters, 32x32 -> 2x2 patch logits
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    cfg = kl_vae.vae_preset("kl-f4-tiny", disc_channels=8)
    model = VAEWithDiscriminator(kl_vae.build_vae(cfg), cfg)
    bare = model.vae.state_dict()
    restored = vae_state(model.state_dict())
    assert restored.keys() == bare.keys() and vae_state(bare) is bare


def test_step_rides_along_the_batches():
    batches = with_step(lambda start: iter([(torch.zeros(3, 1), torch.zeros(3))] * 2))
    steps = [int(b[-1][0]) for b in batches(5)]
    assert steps == [5, 6]


def test_perceptual_term_is_lpips_per_value_of_the_summed_objective(images, lpips_weights):
    # LDM adds LPIPS to every value's L1 before summing: per sample / D, loss = L1 + w * LPIPS + kl_weight * KL / D
    from ulbench.metrics.lpips import load_lpips

    cfg = kl_vae.vae_preset("kl-f4-tiny", perceptual_weight=0.5, disc_weight=0.0)
    vae, lpips = kl_vae.build_vae(cfg), load_lpips("vgg")
    torch.manual_seed(2)
    got = LDMLoss(cfg, lpips)(vae, images, step=0)
    torch.manual_seed(2)
    base = kl_vae.vae_losses(vae, cfg, images)
    torch.manual_seed(2)
    x_hat = vae.decode(vae.encode(images).latent_dist.sample()).sample
    want_lpips = lpips(images, x_hat)
    torch.testing.assert_close(got["lpips"], want_lpips.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["loss"], base["loss"] + 0.5 * want_lpips, rtol=1e-5, atol=1e-6)


def test_fashion_mnist_suite_sd_dit_trains_the_ldm_recipe_and_reports_rlpips_and_psnr(tmp_path):
    """The fashion-mnist suite's sd-dit method as the file writes it (LDM recipe, no clipping, GAN from
    vae.disc_start) through the sweep, shrunk: bundled photo crops instead of the Debian package, batch 8, a stage-1
    budget of 8 steps with the GAN switched on at step 4; then its reconstructions scored (rLPIPS, PSNR)."""
    import json
    from pathlib import Path

    import yaml

    from ulbench.flops import method_flops
    from ulbench.run.directory import start_run

    suite = yaml.safe_load((Path(__file__).parents[1] / "suites" / "fashion-mnist.yaml").read_text())
    (method,) = [m for m in suite["methods"] if m["name"] == "sd-dit"]
    assert method["overrides"]["vae"].get("perceptual_weight", 1.0) > 0  # the suite trains LDM's recipe
    method["overrides"]["vae"]["disc_start"] = 4
    method["train"]["stage1"].update(batch_size=8, warmup_steps=2, checkpoint_every=0, log_every=1)
    per_image = method_flops("dit-tiny", resolution=32, overrides=method["overrides"])["stage1"]["train_flops_per_image"]
    suite.update(include=None, methods=[method], dataset={"name": "photos", "resolution": 32, "subset": 64},
                 compute={"ladder": [1.0e10], "stage1": {"train_flops": 8.5 * 8 * per_image}},
                 evaluation={"metrics": ["psnr", "rlpips"], "num_reconstructions": 8, "batch_size": 8})
    suite.pop("include")
    (tmp_path / "fm.yaml").write_text(yaml.safe_dump(suite))
    run = start_run(str(tmp_path / "fm.yaml"), [], tmp_path / "runs", "t", progress=False)

    log = [json.loads(line) for line in (run / "methods/sd-dit/stage1/metrics.jsonl").read_text().splitlines()]
    steps = json.loads((run / "config.json").read_text())["methods"]["sd-dit"]["stage1_steps"]
    assert 8 <= steps <= 9 and log[-1]["step"] == steps and all(math.isfinite(r["loss"]) for r in log)
    assert all(r["d_weight"] == 0 for r in log if r["step"] <= 4) and any(r["d_weight"] > 0 for r in log[4:])
    rows = {r["metric"]: r for r in map(json.loads, (run / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"psnr", "rlpips"} and rows["rlpips"]["point"] == rows["psnr"]["point"] == "stage1"
    assert 0 < rows["rlpips"]["value"] < 1 and 5 < rows["psnr"]["value"] < 40 and rows["rlpips"]["n"] == 8
