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


SLURM_SCRIPTS = Path(__file__).parent / "slurm"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM cluster (munged, slurmctld, slurmd) for this session.

    tests/slurm/start.sh installs Debian's slurm-wlm and munge if missing, writes a slurm.conf for this host
    and starts the daemons with all their files in a tmp dir; tests/slurm/stop.sh stops exactly those pids at
    teardown. Yields a namespace: ``env`` (os.environ with SLURM_CONF set and other SLURM_* removed, for
    subprocess), ``conf`` (the slurm.conf path), ``state_dir`` and ``summary`` (start.sh's line).
    A requeued job waits ~11 s (cred_expire=10, + 1 s) before it starts again.
    """
    import shutil
    import subprocess
    from types import SimpleNamespace

    if os.geteuid() != 0:
        pytest.skip("slurm_cluster needs root (slurmd/slurmctld run as SlurmUser=root)")
    sbin_path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    have_slurm = all(shutil.which(b, path=sbin_path) for b in ("munged", "slurmctld", "slurmd", "sbatch"))
    if not have_slurm and shutil.which("apt-get") is None:
        pytest.fail("slurm_cluster: slurm/munge are not installed and apt-get is not available to install them")
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(SLURM_SCRIPTS / "start.sh"), str(state)],
                           capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    if start.returncode != 0:
        pytest.fail(f"tests/slurm/start.sh failed (exit {start.returncode}):\n{start.stdout}\n{start.stderr}")
    conf = state / "slurm.conf"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(conf), PATH=sbin_path)
    try:
        yield SimpleNamespace(env=env, conf=conf, state_dir=state, summary=start.stdout.strip())
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop.sh"), str(state)], timeout=120, stdin=subprocess.DEVNULL)
