"""`ulbench run --launcher slurm` on the real single-node SLURM of tests/slurm/start.sh: the micro suite as one job
of two tasks (DDP over gloo), preempted during stage-2 training (SIGUSR2 from `scancel --signal`, SLURM's
preemption/timeout signal), requeued by submitit and resumed, ends with the rows of the local one-process run."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ULBENCH = [sys.executable, "-m", "ulbench"]


def _status(run: Path, env: dict) -> dict:
    r = subprocess.run([*ULBENCH, "status", str(run), "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _rows(run: Path) -> dict[tuple, float]:
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    return {(r["method"], r["point"], r["metric"]): r["value"] for r in rows}


@pytest.mark.slow
def test_slurm_job_preempted_requeued_and_resumed_equals_local_run(slurm_cluster, micro, clean_run, tmp_path):
    env = {**slurm_cluster.env, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*ULBENCH, "run", str(micro), "--runs-dir", str(tmp_path), "--name", "s",
                             "--launcher", "slurm", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "30",
                             "--wait", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    run = tmp_path / "micro" / "s"
    deadline = time.time() + 600
    while time.time() < deadline and not (run / "methods/ul/stage2/latest.json").is_file():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    job = json.loads((run / "slurm/jobs.json").read_text())["ul"]["job_id"]
    assert _status(run, env)["methods"]["ul"]["state"] == "running"
    subprocess.run(["scancel", "--signal=USR2", job], check=True, env=env)  # preemption
    seen = set()
    while time.time() < deadline and proc.poll() is None:
        seen.add(_status(run, env)["methods"]["ul"]["state"])
        if "queued" in seen:
            break
        time.sleep(0.5)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    assert "queued" in seen  # requeued, waiting to start again
    log = "".join((run / "slurm/ul" / f"{job}_0_log.{ext}").read_text() for ext in ("out", "err"))
    assert "this job is preempted" in log and log.count("Starting with JobEnvironment") == 2
    clean = _rows(clean_run)
    rows = _rows(run)
    assert sorted(rows) == sorted(clean)
    for key, value in rows.items():
        assert value == pytest.approx(clean[key], rel=1e-6), key
    status = _status(run, env)
    assert status["methods"]["ul"]["state"] == "done"
    assert {p["state"] for p in status["points"]} == {"done"}


def test_wait_exits_nonzero_and_status_names_the_error_of_a_failed_job(slurm_cluster, micro, tmp_path):
    env = {**slurm_cluster.env, "OMP_NUM_THREADS": "1"}
    # a micro-batch of 16 fits one process (share 16) but not a rank's share of two tasks (8): the job fails
    r = subprocess.run([*ULBENCH, "run", str(micro), "--runs-dir", str(tmp_path), "--name", "f",
                        "--set", "methods.0.train.stage1.micro_batch=16", "--launcher", "slurm",
                        "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10", "--wait", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    status = _status(tmp_path / "micro" / "f", env)
    ul = status["methods"]["ul"]
    assert ul["state"] == "failed" and "micro_batch 16 must divide" in ul["error"]
    assert status["points"][0] == {"method": "ul", "point": "stage1", "state": "failed"}
