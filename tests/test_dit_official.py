"""DiT's released checkpoints: a random state dict in the official layout loads into our DiT, whose forward equals an
independent reference of the official computation; bad files are named; a released checkpoint goes through a suite
untrained, at its published training FLOPs, and the compute-vs-FID plot marks it."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.dit import DIT_PRESETS, DiT
from baselines.dit_official import check_layout, check_pos_embed, load_official, official_layout, read_state_dict
from ulbench.errors import UserError

TINY = replace(DIT_PRESETS["dit-tiny"], latent_resolution=8)  # 16 tokens of width 128, 4 blocks, 10 classes


def reference_pos_embed(dim: int, grid: int) -> np.ndarray:
    # official get_2d_sincos_pos_embed (MAE): meshgrid(w, h) "xy", first half from grid[0] (the column index)
    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), 0)

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], 1)

    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], 1)


def official_state(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights named and shaped as the official file (adaLN layers not zero), pos_embed as it stores it."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=gen) / math.sqrt(shape[-1]) for k, shape in
             official_layout(cfg).items()}
    grid = cfg.latent_resolution // cfg.patch
    state["pos_embed"] = torch.from_numpy(reference_pos_embed(cfg.hidden, grid)).float()[None]
    state["y_embedder.embedding_table.weight"] *= math.sqrt(cfg.hidden)  # embeddings of order 1, like t's
    return state


def reference_forward(sd: dict, cfg, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The official DiT.forward written out from its state dict, with plain tensor ops."""
    D, p, H = cfg.hidden, cfg.patch, cfg.heads

    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(h):
        return F.layer_norm(h, (D,), eps=1e-6)

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)  # (B, D, G, G)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B, T, D)
    half = 128  # frequency_embedding_size 256: [cos, sin] of t * exp(-ln(1e4) i / half)
    args = t.float()[:, None] * torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    c = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]  # (B, D)
    B, T, _ = h.shape
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        s1, c1, g1, s2, c2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, 1)
        a = ln(h) * (1 + c1[:, None]) + s1[:, None]
        q, k, v = lin(a, b + "attn.qkv").reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), -1)
        h = h + g1[:, None] * lin((w @ v).transpose(1, 2).reshape(B, T, D), b + "attn.proj")
        m = ln(h) * (1 + c2[:, None]) + s2[:, None]
        h = h + g2[:, None] * lin(F.gelu(lin(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, 1)
    h = lin(ln(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")  # (B, T, p*p*C_out)
    G, C = cfg.latent_resolution // p, cfg.out_channels
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(B, G, G, p, p, C))
    return h.reshape(B, C, G * p, G * p)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "tiny-official.pt"
    torch.save(official_state(TINY), path)
    return path


def test_loaded_official_weights_give_the_reference_forward(tiny_file):
    model = load_official(tiny_file, TINY)
    sd = torch.load(tiny_file, weights_only=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    t, y = torch.tensor([0, 437, 999]), torch.tensor([2, 9, TINY.null_class])  # incl. the CFG null class
    with torch.no_grad():
        ours, ref = model(x, t, y), reference_forward(sd, TINY, x, t, y)
    assert ours.shape == (3, 8, 8, 8) and ref.abs().mean() > 0.05  # learn_sigma: 2C channels, not a zero output
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_our_tree_is_the_official_layout_and_xl2_512_fits():
    # shape-only for DiT-XL/2 at 512^2 (latent 64): no forward, meta tensors
    xl = replace(DIT_PRESETS["dit-xl-2"], latent_resolution=64)
    for cfg in (TINY, xl):
        with torch.device("meta"):
            ours = {k: tuple(v.shape) for k, v in DiT(cfg).state_dict().items()}
        assert ours == official_layout(cfg)
    layout = official_layout(xl)
    assert layout["pos_embed"] == (1, 1024, 1152) and layout["y_embedder.embedding_table.weight"] == (1001, 1152)
    assert layout["final_layer.linear.weight"] == (2 * 2 * 8, 1152) and len(layout) == 8 + 28 * 10 + 4
    meta = {k: torch.empty(s, device="meta") for k, s in layout.items()}
    check_layout(meta, xl, "XL/2-512")  # passes
    with pytest.raises(UserError, match=r"pos_embed: file \(1, 1024, 1152\).*32x32 grid of patches"):
        check_layout(meta, replace(xl, latent_resolution=32), "XL/2-512 as 256")


def test_mismapped_keys_and_wrong_files_are_named(tiny_file, tmp_path):
    state = torch.load(tiny_file, weights_only=True)
    bad = dict(state)
    bad["blocks.1.mlp.fc_1.weight"] = bad.pop("blocks.1.mlp.fc1.weight")  # a mis-mapped key
    bad["blocks.2.mlp.fc1.weight"], bad["blocks.2.mlp.fc2.weight"] = (bad["blocks.2.mlp.fc2.weight"],
                                                                      bad["blocks.2.mlp.fc1.weight"])
    with pytest.raises(UserError) as e:
        check_layout(bad, TINY, "f")
    msg = str(e.value)
    assert "1 missing key(s): blocks.1.mlp.fc1.weight" in msg and "unexpected key(s): blocks.1.mlp.fc_1.weight" in msg
    assert "blocks.2.mlp.fc1.weight: file (128, 512)" in msg
    with pytest.raises(UserError, match="label table has 11 rows"):
        check_layout(state, replace(TINY, num_classes=1000), "f")
    swapped = {**state, "pos_embed": state["pos_embed"].reshape(1, 4, 4, 128).transpose(1, 2).reshape(1, 16, 128)}
    with pytest.raises(UserError, match="pos_embed differs"):
        check_pos_embed(swapped, TINY, "f")  # row and column exchanged: caught even though the shapes agree
    import argparse

    torch.save({"ema": state, "args": argparse.Namespace(lr=1)}, tmp_path / "train-ckpt.pt")
    with pytest.raises(UserError, match="weights_only"):
        read_state_dict(tmp_path / "train-ckpt.pt")  # a pickled object: refused, not unpickled


SUITE = """
version: 1
name: official
dataset: {{name: photos, resolution: 16, subset: 64}}
methods:
  - name: dit-released
    kind: dit
    preset: dit-tiny
    overrides: {{checkpoint: {ckpt}, checkpoint_train_steps: 1000, checkpoint_batch_size: 8,
                vae: {{pretrained: {vae}}}}}
    sampler: {{steps: 3}}
compute: {{ladder: [1.0e9, 2.0e9]}}
evaluation: {{metrics: [kid], num_samples: 8, kid_subset_size: 8, batch_size: 8,
             sampler: {{method: ancestral, steps: 3}}}}
"""


def test_a_released_checkpoint_is_evaluated_untrained_at_its_training_flops(tiny_file, tmp_path, one_thread):
    from diffusers import AutoencoderKL

    from ulbench.run.plan import format_plan
    from ulbench.report import write_report
    from ulbench.run.directory import load_run_plans, start_run

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                  norm_num_groups=4).save_pretrained(tmp_path / "vae")  # 2x: 16 px images -> 8x8 latents
    (tmp_path / "s.yaml").write_text(SUITE.format(ckpt=tiny_file, vae=tmp_path / "vae"))
    run = start_run(str(tmp_path / "s.yaml"), [], tmp_path / "runs", "r", progress=False)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    config = json.loads((run / "config.json").read_text())["methods"]["dit-released"]
    assert [(r["point"], r["metric_base"]) for r in rows] == [("official", "kid")]
    r = rows[0]
    assert r["budget_index"] is None and r["steps"] == {"stage1": 0, "stage2": 1000}
    assert r["train_flops"]["total"] == pytest.approx(1000 * 8 * config["flops_per_image"]["stage2"])
    assert r["official_checkpoint"]["train_steps"] == 1000 and len(r["official_checkpoint"]["sha256"]) == 64
    assert not (run / "methods" / "dit-released" / "stage2").exists()  # nothing trained
    suite, plans, _ = load_run_plans(run)
    assert "official checkpoint" in format_plan(suite, plans, "cpu") and plans[0].estimated_seconds() == 0
    # KID, not FID, to keep the test short (FID's 2048^2 matrix square root: ~6 s here); the compute-vs-FID and
    # compute-vs-KID plots are one function (report.plot_compute), which marks the official point
    report = write_report(run, tmp_path / "report")
    plotted = report["plotted"]
    assert plotted["official_checkpoint"].eq(True).all() and len(plotted) == 1
    assert plotted["x_train_flops"].iloc[0] == pytest.approx(r["train_flops"]["stage2"])
    assert "dit-released: official checkpoint" in report["published_drawn"]


def test_released_file_names_carry_their_published_training(tmp_path):
    from ulbench.methods import get_kind

    kind = get_kind("dit")
    cfg = kind.resolve("dit-xl-2", {"checkpoint": str(tmp_path / "DiT-XL-2-512x512.pt"),
                                    "vae": {"pretrained": str(tmp_path / "sd-vae")}}, resolution=512)
    official = kind.official_checkpoint(cfg)
    assert (official["train_steps"], official["batch_size"], official["release"]) == (3_000_000, 256, True)
    with pytest.raises(UserError, match="released as dit-xl-2 at 512px"):
        kind.official_checkpoint(replace(cfg, resolution=256))
    with pytest.raises(UserError, match="checkpoint_train_steps"):
        kind.official_checkpoint(replace(cfg, checkpoint=str(tmp_path / "mine.pt")))
    with pytest.raises(UserError, match="vae.pretrained"):
        kind.official_checkpoint(replace(cfg, vae=replace(cfg.vae, pretrained=None)))
    with pytest.raises(UserError, match="pickled code"):
        get_kind("edm2").official_checkpoint(replace(cfg, checkpoint="edm2-img512-xs.pkl"))
