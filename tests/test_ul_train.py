"""UL training loops: bit-exact resume, and a tiny end-to-end run on real photos (stage 1, stage 2, sample)."""
import json

import numpy as np
import pytest
import torch

from ul_model.config import PRESETS
from ul_model.stages import image_input, load_run, stage2_model, train_stage1, train_stage2
from ul_model.train import TrainConfig, train
from ulbench.data import MemoryDataset, load_dataset
from ulbench.data.loader import train_batches
from ulbench.methods.base import TrainData, latent_training_set


def _batches(ds, cfg):
    return lambda start: train_batches(ds, cfg.batch_size, cfg.seed, start)


@pytest.fixture(scope="module")
def photos():
    return load_dataset("photos", 32)


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_batches_are_deterministic_in_the_step(photos):
    it = train_batches(photos, 700, seed=3)
    batches = [next(it)[0] for _ in range(5)]  # crosses epoch boundaries (2048 images)
    again = next(train_batches(photos, 700, seed=3, start=3))[0]
    assert torch.equal(batches[3], again)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(photos, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, log_every=1, checkpoint_every=3, ema_decay=0.9)
    ds = MemoryDataset("photos", photos.images[:64], photos.labels_tensor[:64], 1)
    train_stage1(PRESETS["ul-tiny"], _batches(ds, cfg), cfg, tmp_path / "straight", progress=False)
    # Interrupted: the first run stops at step 3 (its checkpoint), then a new process-like call resumes.
    from dataclasses import replace

    train_stage1(PRESETS["ul-tiny"], _batches(ds, cfg), replace(cfg, steps=3), tmp_path / "split", progress=False)
    train_stage1(PRESETS["ul-tiny"], _batches(ds, cfg), cfg, tmp_path / "split", resume=True, progress=False)
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=0)
    wa = load_run(tmp_path / "straight")[0].state_dict()
    wb = load_run(tmp_path / "split")[0].state_dict()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-6, atol=1e-7) for k in wa)


@pytest.mark.slow
def test_tiny_end_to_end_on_real_photos(photos, tmp_path):
    """Stage 1 (briefly), its latent cache, stage 2, samples. That stage 1 learns is the smoke suite's check: its
    ~570 stage-1 steps reconstruct at ~18 dB (12 dB for a decoder that ignores its latent), a regression-checked
    number (reports/baselines/smoke.json); here 60 steps only have to lower the loss."""
    cfg1 = TrainConfig(steps=60, batch_size=32, lr=1e-3, warmup_steps=20, log_every=20, checkpoint_every=60,
                       ema_decay=0.99)
    log = train_stage1(PRESETS["ul-tiny"], _batches(photos, cfg1), cfg1, tmp_path / "s1", progress=False)
    assert log[-1]["total_nats"] < 0.8 * log[0]["total_nats"]
    assert all(0 < r["bits_per_pixel"] for r in log)
    cfg2 = TrainConfig(steps=100, batch_size=64, lr=1e-3, warmup_steps=10, log_every=25, checkpoint_every=100,
                       ema_decay=0.99)
    model = stage2_model(tmp_path / "s1", seed=cfg2.seed)
    ckpt = tmp_path / "s1" / json.loads((tmp_path / "s1" / "latest.json").read_text())["checkpoint"]
    from ulbench.assets import sha256_file

    latents = latent_training_set(tmp_path / "s2" / "latents", "ul z_clean", sha256_file(ckpt / "ema.safetensors"),
                                  lambda x: model.encoder(image_input(x)), TrainData(photos), progress=False)
    with torch.no_grad():  # the cache holds exactly the frozen encoder's z_clean of each image
        torch.testing.assert_close(latents[5][0], model.encoder(photos.images[5:6])[0], rtol=1e-5, atol=1e-6)
    log2 = train_stage2(model, _batches(latents, cfg2), cfg2, tmp_path / "s2", tmp_path / "s1", progress=False)
    assert log2[-1]["loss"] < log2[0]["loss"]
    model, meta = load_run(tmp_path / "s2")
    assert meta["stage"] == 2
    x = model.generate([0, 1, 2, 3], None, steps=20, decoder_steps=20)
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.05


@pytest.mark.parametrize("preset", ["ul-tiny", "video-ul-tiny"])
def test_gpu_check_script_runs_on_the_smallest_case(preset):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = mod.main(["--preset", preset, "--device", "cpu", "--steps", "2", "--warmup", "1",
                        "--batch-size", "2", "--peak-tflops", "1"])
    assert [r["stage"] for r in results] == ["stage1", "stage2"]
    for r in results:
        assert r["images_per_s"] > 0 and r["train_flops_per_image"] > 0 and 0 < r["mfu"] < 1
    # Stage 1 trains three networks on 32x32 images (clips); stage 2 one network on the latent: more FLOPs per item.
    assert results[0]["train_flops_per_image"] > results[1]["train_flops_per_image"]


def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    # torch.compile (inductor on CPU, about a minute) must train the same model to the same losses. Inductor draws
    # random numbers with its own generator unless told to fall back to eager's, which the comparison needs.
    from dataclasses import replace

    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)

    from ul_model.model import UnifiedLatents

    cfg = PRESETS["ul-tiny"]
    z = torch.randn(16, *cfg.latent_shape, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, cfg.num_classes, (16,), generator=torch.Generator().manual_seed(1))
    tcfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, checkpoint_every=0)
    losses = {}
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = UnifiedLatents(cfg).set_stage(2)
        ds = MemoryDataset("latents", z, y, cfg.num_classes)
        log = train(model, lambda net, b: net(*b), lambda s: train_batches(ds, 8, 0, s),
                    replace(tcfg, compile=compile_), tmp_path / str(compile_), progress=False)
        losses[compile_] = [r["loss"] for r in log]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
