"""Shared fixtures: real weights (fetched into the user's cache on first use) and real photo crops on disk."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ulbench import assets
from ulbench.metrics.images import photo_crops

N_PARITY = 50  # images per side in parity tests: ~10 s of Inception per side on 2 CPU cores


def write_pngs(arr: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="session")
def inception_weights() -> Path:
    return assets.converted_path(assets.INCEPTION)


@pytest.fixture(scope="session")
def inception_source() -> Path:
    return assets.source_path(assets.INCEPTION)


@pytest.fixture(scope="session")
def photo_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Two folders of real 128x128 photo crops (different seeds), PNG, as a user's sample folders would be."""
    root = tmp_path_factory.mktemp("photos")
    return (write_pngs(photo_crops(0, N_PARITY), root / "a"), write_pngs(photo_crops(1, N_PARITY), root / "b"))


@pytest.fixture(scope="session")
def evaluator(inception_weights):
    from ulbench.metrics.fid import ImageEvaluator

    return ImageEvaluator(progress=False, use_cache=False)


@pytest.fixture(scope="session")
def tf_weights_pt(tmp_path_factory, inception_weights) -> Path:
    """Our converted weights as the torch pickle that torch-fidelity's loader expects (plain tensors we wrote)."""
    import torch
    from safetensors.torch import load_file

    path = tmp_path_factory.mktemp("tfw") / "inception.pt"
    torch.save(load_file(str(inception_weights)), path)
    return path


def run_cli(*args: str, env: dict | None = None):
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ulbench.cli", *args], capture_output=True, text=True, env=full_env)


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny models: on 2 shared cores two threads measured 10-50x slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
