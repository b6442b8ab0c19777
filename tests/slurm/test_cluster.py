"""The session's real single-node SLURM cluster (tests/slurm/start.sh) runs and requeues batch jobs."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path


def slurm(cluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=cluster.env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def wait_for(predicate, timeout: float, what: str, cluster=None, jobid: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    detail = slurm(cluster, "scontrol", "show", "job", jobid).stdout if cluster and jobid else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{detail}")


def job_state(cluster, jobid: str) -> str:
    return slurm(cluster, "squeue", "-h", "-j", jobid, "-o", "%T").stdout.strip()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_sbatch_wait_runs_a_job(slurm_cluster, tmp_path):
    out = tmp_path / "hello.txt"
    r = slurm(slurm_cluster, "sbatch", "--wait", "--parsable", "-D", str(tmp_path), "-o", str(tmp_path / "job.log"),
              "--wrap", f"echo hello from job $SLURM_JOB_ID on $SLURMD_NODENAME > {out}")
    assert r.returncode == 0, r.stderr
    jobid = r.stdout.strip().split(";")[0]
    assert out.read_text().strip().startswith(f"hello from job {jobid} on ")
    # finished jobs stay visible (MinJobAge=300)
    show = slurm(slurm_cluster, "scontrol", "show", "job", jobid)
    assert "JobState=COMPLETED" in show.stdout, show.stdout + show.stderr


def test_scontrol_requeue_restarts_a_running_job(slurm_cluster, tmp_path):
    starts = tmp_path / "starts.txt"
    script = tmp_path / "job.sh"
    script.write_text(f'#!/bin/bash\necho "start ${{SLURM_RESTART_COUNT:-0}}" >> {starts}\nexec sleep 300\n')
    r = slurm(slurm_cluster, "sbatch", "--parsable", "--requeue", "-D", str(tmp_path), "-o", str(tmp_path / "job.log"),
              str(script))
    assert r.returncode == 0, r.stderr
    jobid = r.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: job_state(slurm_cluster, jobid) == "RUNNING" and len(lines(starts)) == 1, 30,
                 "first start", slurm_cluster, jobid)
        rq = slurm(slurm_cluster, "scontrol", "requeue", jobid)
        assert rq.returncode == 0, rq.stderr
        # held pending (Reason=BeginTime) for cred_expire + 1 s = 11 s, then scheduled within sched_interval=2
        t0 = time.monotonic()
        wait_for(lambda: len(lines(starts)) >= 2, 40, "second start after requeue", slurm_cluster, jobid)
        assert lines(starts) == ["start 0", "start 1"]
        assert time.monotonic() - t0 < 30
        wait_for(lambda: job_state(slurm_cluster, jobid) == "RUNNING", 10, "RUNNING again", slurm_cluster, jobid)
        assert "Restarts=1" in slurm(slurm_cluster, "scontrol", "show", "job", jobid).stdout
    finally:
        slurm(slurm_cluster, "scancel", jobid)
