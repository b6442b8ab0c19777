"""Launchers: where a run directory's methods run. ``local`` runs them in this process group (one process, or
``torchrun``'s); ``slurm`` submits one job per method through submitit. Both end in ``ulbench.run.directory.resume_run``.

SLURM layout in the run directory: ``slurm/jobs.json`` (method -> job id, log files, submission), and per method
``slurm/<method>/`` holding submitit's files (``<job>_submitted.pkl``, ``<job>_<task>_log.out|err``) and our
``state.json`` (running / done / failed, written by the job itself). A job is requeued by submitit when SLURM
signals a timeout or a preemption (SIGUSR2), and the requeued job resumes the method from its checkpoints.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ulbench.errors import UserError
from ulbench.io import write_json


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class SlurmOptions:
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # processes per node; default: one per GPU (one on a CPU node)
    cpus_per_task: int | None = None
    time_min: int = 60 * 24
    account: str | None = None
    qos: str | None = None

    def check(self) -> None:
        for name in ("nodes", "time_min"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_min', '').replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "tasks_per_node", "cpus_per_task"):
            v = getattr(self, name)
            if v is not None and v < (0 if name == "gpus_per_node" else 1):
                raise UserError(f"--{name.replace('_', '-')} must be >= {0 if name == 'gpus_per_node' else 1}, got {v}")

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


class MethodJob:
    """What a SLURM job runs: one method of a run directory, data-parallel over the job's tasks."""

    def __init__(self, run_dir: str, method: str):
        self.run_dir, self.method = str(Path(run_dir).resolve()), method

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # torch.distributed's env:// variables for this task (devices chosen by LOCAL_RANK)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        state = Path(self.run_dir) / "slurm" / self.method / "state.json"
        main = env.global_rank == 0
        if main:
            write_json(state, {"state": "running", "job_id": env.job_id, "host": socket.gethostname(),
                               "pid": os.getpid(), "since": _now()})
        from ulbench.run.directory import resume_run

        try:
            resume_run(self.run_dir, progress=main, methods=[self.method])
        except BaseException as e:
            if main and not isinstance(e, SystemExit):  # SystemExit: submitit requeues after a signal
                write_json(state, {"state": "failed", "job_id": env.job_id, "error": f"{type(e).__name__}: {e}",
                                   "at": _now()})
            raise
        if main:
            write_json(state, {"state": "done", "job_id": env.job_id, "at": _now()})
        return "done"

    def checkpoint(self):  # submitit calls this on timeout/preemption: requeue the same method; it resumes
        import submitit

        return submitit.helpers.DelayedSubmission(MethodJob(self.run_dir, self.method))


def submit_slurm(run_dir: Path, methods: list[str], opts: SlurmOptions) -> dict:
    """One job per method; their ids and log files go to ``slurm/jobs.json``."""
    import submitit

    opts.check()
    jobs = {}
    for method in methods:
        folder = run_dir / "slurm" / method
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=30)
        # --kill-on-bad-exit: a task that dies takes the job's other tasks with it at once (srun's default leaves
        # them waiting in a collective until the distributed timeout)
        params = {"job_name": f"ulbench-{run_dir.parent.name}-{method}", "nodes": opts.nodes,
                  "ntasks_per_node": opts.tasks, "time": opts.time_min, "srun_args": ["--kill-on-bad-exit=1"]}
        for key, value in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos),
                           ("cpus_per_task", opts.cpus_per_task),
                           ("gpus_per_node", opts.gpus_per_node or None)):
            if value is not None:
                params[key] = value
        ex.update_parameters(**params)
        try:
            job = ex.submit(MethodJob(str(run_dir), method))
        except (FileNotFoundError, subprocess.CalledProcessError, RuntimeError) as e:
            raise UserError(f"sbatch failed for method {method}: {e}. Is SLURM reachable here (sinfo)?") from None
        jobs[method] = {"job_id": job.job_id, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
                        "folder": str(folder), "submitted_at": _now(), "options": vars(opts)}
        write_json(run_dir / "slurm" / "jobs.json", jobs)
    return jobs


def _squeue_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM's view of jobs that are queued or running (finished jobs leave squeue)."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True,
                             text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)


def _last_line(*paths: str) -> str:
    best = ""
    for p in sorted((Path(p) for p in paths if p and Path(p).is_file()), key=lambda p: p.stat().st_mtime):
        with open(p, "rb") as f:
            f.seek(max(0, p.stat().st_size - 8192))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").replace("\r", "\n").splitlines()]
        best = next((ln for ln in reversed(lines) if ln), best)
    return best[:160]


def method_states(run_dir: Path) -> dict[str, dict]:
    """Per method: state (done / running / queued / failed / not started) and the last log line."""
    from ulbench.run.lock import RunLock

    jobs_file = run_dir / "slurm" / "jobs.json"
    jobs = json.loads(jobs_file.read_text()) if jobs_file.is_file() else {}
    squeue = _squeue_states([j["job_id"] for j in jobs.values()])
    config = json.loads((run_dir / "config.json").read_text())
    out = {}
    for method in config["methods"]:
        job = jobs.get(method)
        state_file = run_dir / "slurm" / method / "state.json"
        own = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if job is None:  # local launcher: running while a process holds the method's lock
            state = "running" if RunLock(run_dir).held_by_other(method) else "not running"
            out[method] = {"state": state, "job_id": None, "log": _last_line(str(run_dir / "logs" / "run.log"))}
            continue
        sq = squeue.get(job["job_id"])
        if sq in ("PENDING", "REQUEUED", "CONFIGURING", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED"):
            state = "queued"
        elif sq in ("RUNNING", "COMPLETING"):
            state = "running"
        elif own.get("state") == "done":
            state = "done"
        else:  # neither queued nor running, and never finished: failed (own error, cancelled, node lost)
            state = "failed"
        out[method] = {"state": state, "job_id": job["job_id"], "slurm": sq, "error": own.get("error"),
                       "log": _last_line(job["stdout"], job["stderr"])}
    return out


def run_status(run_dir: str | Path) -> tuple[list[dict], dict[str, dict]]:
    """(rows per method and point, method states) for ``ulbench status``."""
    from ulbench.run.results import ResultsStore

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir}: no config.json; not a run directory made by `ulbench run`")
    config = json.loads((run_dir / "config.json").read_text())
    store = ResultsStore(run_dir / "results.jsonl")
    states = method_states(run_dir)
    from ulbench.metrics.registry import needs_of

    needs = needs_of(config["resolved"]["evaluation"]["metrics"])
    rows = []
    for method, m in config["methods"].items():
        points = (["stage1"] if m["stage1_steps"] and "reconstructions" in needs else [])
        rungs = ["official"] if m.get("official") else [f"b{i}" for i in range(len(m["rung_steps"]))]
        points += rungs if "samples" in needs else []
        active = states[method]["state"]
        first_open = True
        for point in points:
            if store.done(method, point):
                state = "done"
            elif first_open:
                state = {"running": "running", "failed": "failed", "done": "failed"}.get(active, "queued")
                first_open = False
            else:
                state = "queued" if active != "failed" else "not run"
            rows.append({"method": method, "point": point, "state": state})
    return rows, states


def format_status(run_dir: Path, rows: list[dict], states: dict[str, dict]) -> str:
    lines = [f"run {run_dir}"]
    for method, s in states.items():
        job = f" (SLURM job {s['job_id']}: {s.get('slurm') or 'gone'})" if s.get("job_id") else ""
        lines.append(f"{method}: {s['state']}{job}")
        for r in (r for r in rows if r["method"] == method):
            lines.append(f"  {r['point']:8s} {r['state']}")
        if s.get("error"):
            lines.append(f"  error: {s['error']}")
        if s.get("log"):
            lines.append(f"  last log line: {s['log']}")
    return "\n".join(lines)


def wait_for_jobs(run_dir: Path, poll_s: float = 5.0, progress: bool = True) -> bool:
    """Block until every submitted method is done or failed; True when all are done."""
    while True:
        states = method_states(run_dir)
        pending = [m for m, s in states.items() if s["state"] in ("queued", "running")]
        if not pending:
            failed = [m for m, s in states.items() if s["state"] != "done"]
            for m in failed:
                print(f"ulbench: job of method {m} failed: {states[m].get('error') or states[m]['log']}")
            return not failed
        if progress:
            waiting = ", ".join(f"{m} ({states[m]['state']})" for m in pending)
            print(f"{time.strftime('%H:%M:%S')} waiting for {waiting}", flush=True)
        time.sleep(poll_s)
