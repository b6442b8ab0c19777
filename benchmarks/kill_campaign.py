"""kill -9 campaign: does a sweep lose or change results when it is killed at random times and resumed?

    python benchmarks/kill_campaign.py                                   # suites/smoke.yaml, 20 kills, seed 0
    python benchmarks/kill_campaign.py --reuse runs/smoke/s0             # compare with this uninterrupted run
    python benchmarks/kill_campaign.py --suite suites/smoke.yaml --kills 20 --seed 1 --delay 20 240

Starts ``ulbench run SUITE`` (in its own process group), sends SIGKILL to the whole group at a random time, then
``ulbench run --resume RUN``, again and again: ``--kills`` times in all. Each kill aims at a phase (training,
latent caching, sampling, evaluation, report: drawn in turn, so that every phase is aimed at): it lands a random
``[0, --jitter]`` seconds after the phase shows in the run directory, or at a random ``--delay A B`` seconds after the
start if the phase does not show before then. The phase a kill actually hit is read from the run directory at that
moment (``logs/run.log`` and the files of the current step). Kills left once the sweep is finished go to
``ulbench report``. Then the run is completed (resumes without kills) and its ``results.jsonl`` compared in values
(value, CI, std, n, steps, FLOPs, protocol fingerprint) with an uninterrupted run of the same suite (``--reuse DIR``,
else one is run first): rows lost (must be 0), rows duplicated, rows added, rows differing.

Writes ``benchmarks/kill_campaign.json`` (``--out``) and prints a Markdown table (one line per kill). Exit status 1
when a row is lost, duplicated, added or differs. Threads: the clean run and the campaign must run under the same
``OMP_NUM_THREADS`` (thread counts change float sums), which ``--threads`` sets for every process it starts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("training", "latent caching", "sampling", "evaluation", "report")
# What must be equal between a resumed run and an uninterrupted one (wall_s, finished_at, run: not results)
VALUE_FIELDS = ("value", "ci95", "std", "n", "steps", "train_flops", "budget_train_flops", "higher_is_better",
                "guidance", "per_frame")


# ---------------------------------------------------------------------------------------------- comparison

def row_key(row: dict) -> tuple:
    return row["method"], row["point"], row["metric"], row.get("guidance")


def read_rows(run: Path) -> list[dict]:
    path = Path(run) / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _same(a, b, rel: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if math.isnan(a) or math.isnan(b):
            return False  # a NaN is never a result to agree on
        return a == b or abs(a - b) <= rel * max(abs(a), abs(b))
    return a == b


def compare_rows(reference: list[dict], rows: list[dict], rel: float = 0.0) -> dict:
    """Rows of a resumed run against an uninterrupted run's: ``lost`` (keys missing), ``duplicated`` (keys stored
    more than once), ``added`` (keys the reference lacks), ``differing`` (key, field, reference, got)."""
    from ulbench.io import fingerprint_id

    ref = {row_key(r): r for r in reference}
    counts = Counter(row_key(r) for r in rows)
    got = {row_key(r): r for r in rows}
    differing = []
    for key in ref.keys() & got.keys():
        a, b = ref[key], got[key]
        for f in VALUE_FIELDS:
            if not _same(a.get(f), b.get(f), rel):
                differing.append({"key": list(key), "field": f, "reference": a.get(f), "got": b.get(f)})
        if fingerprint_id(a.get("fingerprint")) != fingerprint_id(b.get("fingerprint")):
            differing.append({"key": list(key), "field": "fingerprint", "reference": a.get("fingerprint"),
                              "got": b.get("fingerprint")})
    return {"reference_rows": len(reference), "rows": len(rows),
            "lost": sorted(map(list, ref.keys() - got.keys())),
            "duplicated": sorted([*k, n] for k, n in counts.items() if n > 1),
            "added": sorted(map(list, got.keys() - ref.keys())), "differing": differing}


def clean(comparison: dict) -> bool:
    return not any(comparison[k] for k in ("lost", "duplicated", "added", "differing"))


# ---------------------------------------------------------------------------------------------- phases

def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def log_size(run: Path | None) -> int:
    try:
        return (run / "logs" / "run.log").stat().st_size if run is not None else 0
    except OSError:
        return 0


def _last_step_line(run: Path, since: int) -> str:
    """The last line the current process logged (``since``: run.log's size when it started; a resumed run appends)."""
    try:
        with open(run / "logs" / "run.log", "rb") as f:
            f.seek(since)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return lines[-1].split(" ", 2)[-1] if lines else ""


def observe_phase(run: Path, since: int = 0, started: float = 0.0) -> str:
    """What a running sweep is doing now, read from its run directory: ``startup`` (loading, planning), ``training``,
    ``latent caching``, ``sampling`` (samples, reconstructions), ``evaluation`` (Inception features, metrics, rows).
    Reads only files the sweep writes anyway (logs/run.log, latest.json, a latent cache's meta.json, samples).
    ``since``: run.log's size and ``started``: the time when the current process started (a resume appends to the
    log, and recomputes stage-1 reconstructions over the previous attempt's file)."""
    import re

    line = _last_step_line(run, since)
    m = re.match(r"(\S+): (stage\d) to step (\d+)(?: \(rung b(\d+)\))?", line)
    if not m:
        return "startup" if not line or "evaluated" not in line and "skipped" not in line else "training"
    method, stage, steps, rung = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    workdir = run / "methods" / method
    if stage != "stage1":
        metas = list((workdir / stage / "latents").glob("**/meta.json"))
        if not metas or not all((_json(p) or {}).get("complete") for p in metas):
            return "latent caching"
    latest = _json(workdir / stage / "latest.json") or {}
    if latest.get("step", 0) < steps:
        return "training"
    point = workdir / "points" / ("stage1" if rung is None else f"b{rung}")
    if rung is None:  # reconstructions are made again on every attempt: only this attempt's file counts
        recon = point / "reconstructions.npz"
        return "evaluation" if recon.is_file() and recon.stat().st_mtime >= started else "sampling"
    return "evaluation" if list(point.glob("samples_g*.npz")) and not list(point.glob("*.part*")) else "sampling"


# ---------------------------------------------------------------------------------------------- processes

def _env(threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _ulbench(*args: str) -> list[str]:
    return [sys.executable, "-m", "ulbench.cli", *args]


def _start(cmd: list[str], env: dict, log) -> subprocess.Popen:
    # its own session: SIGKILL goes to the whole group (a sweep's DataLoader workers, torchrun's ranks)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_clean(suite: str, sets: list[str], runs_dir: Path, name: str, env: dict, log) -> Path:
    cmd = _ulbench("run", suite, "--runs-dir", str(runs_dir), "--name", name, "--no-progress",
                   *[a for s in sets for a in ("--set", s)])
    if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode != 0:
        raise SystemExit(f"the uninterrupted run failed; see {log.name}")
    return _run_dir(runs_dir, name)


def _run_dir(runs_dir: Path, name: str) -> Path:
    found = [p for p in Path(runs_dir).glob(f"*/{name}") if (p / "config.json").is_file()]
    if len(found) != 1:
        raise SystemExit(f"{runs_dir}: expected one run named {name}, found {found}")
    return found[0]


def campaign(args) -> dict:
    rng = random.Random(args.seed)
    env = _env(args.threads)
    root = Path(args.work).resolve()
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "campaign.log", "a")
    t_start = time.time()
    if args.reuse:
        reference_run = Path(args.reuse).resolve()
    else:
        print(f"uninterrupted run of {args.suite} (reuse it next time with --reuse) ...", flush=True)
        reference_run = run_clean(args.suite, args.set, root / "runs", f"clean-{args.seed}", env, log)
    reference = read_rows(reference_run)
    if not reference:
        raise SystemExit(f"{reference_run}: no results.jsonl rows to compare with")
    name = f"killed-{args.seed}"
    create = _ulbench("run", args.suite, "--runs-dir", str(root / "runs"), "--name", name, "--no-progress",
                      *[a for s in args.set for a in ("--set", s)])
    run: Path | None = None
    kills, finished = [], False
    targets = [PHASES[i % len(PHASES)] for i in range(args.kills)]
    rng.shuffle(targets)
    report_out = root / "report"
    for i, target in enumerate(targets):
        finished = finished or (run is not None and _sweep_done(run))
        since = log_size(run)
        if finished:  # the sweep is complete: what is left to kill is the report
            target = "report"
            cmd, phase_of = _ulbench("report", str(run), "--out", str(report_out)), (lambda: "report")
        else:
            cmd = create if run is None else _ulbench("run", "--resume", str(run), "--no-progress")
            phase_of = (lambda: observe_phase(run, since, t0)) if run is not None else (lambda: "startup")
        delay = rng.uniform(*args.delay)
        t0 = time.time()
        proc = _start(cmd, env, log)
        aimed_at, phase = None, "startup"
        while proc.poll() is None:
            if run is None:
                try:
                    run = _run_dir(root / "runs", name)
                    phase_of = lambda: observe_phase(run, since, t0)  # noqa: E731
                except SystemExit:
                    pass
            phase = phase_of()
            now = time.time()
            if aimed_at is None and phase == target:
                aimed_at = now + rng.uniform(0, args.jitter)
            if (aimed_at is not None and now >= aimed_at) or now - t0 >= delay:
                phase = phase_of()  # the phase at the moment of the kill
                _kill_group(proc)
                break
            time.sleep(0.05)
        rc = proc.wait()
        killed = rc == -signal.SIGKILL
        entry = {"kill": i + 1, "aimed_at": target, "phase": phase if killed else None,
                 "after_s": round(time.time() - t0, 1), "killed": killed, "exit": rc,
                 "rows_then": len(read_rows(run)) if run else 0}
        if not killed and rc != 0:
            entry["error"] = f"exit {rc}; see {log.name}"
        kills.append(entry)
        print(f"kill {i + 1}/{len(targets)}: aimed at {target}, hit {entry['phase'] or '(finished first)'} after "
              f"{entry['after_s']} s; {entry['rows_then']} rows stored", flush=True)
        if run is None:
            run = _run_dir(root / "runs", name)
        if not killed and rc != 0:
            break
    # complete the run without kills, then compare
    resume = subprocess.run(_ulbench("run", "--resume", str(run), "--no-progress"), stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=REPO)
    report = subprocess.run(_ulbench("report", str(run), "--out", str(report_out)), stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=REPO)
    comparison = compare_rows(reference, read_rows(run), args.rel)
    return {"suite": args.suite, "sets": args.set, "seed": args.seed, "kills_requested": args.kills,
            "delay_s": list(args.delay), "jitter_s": args.jitter, "threads": args.threads, "rel_tolerance": args.rel,
            "reference_run": str(reference_run), "run": str(run), "final_resume_exit": resume.returncode,
            "final_report_exit": report.returncode, "kills": kills,
            "phases_hit": dict(Counter(k["phase"] for k in kills if k["killed"])),
            "comparison": comparison, "ok": clean(comparison) and resume.returncode == 0,
            "wall_s": round(time.time() - t_start, 1)}


def _sweep_done(run: Path) -> bool:
    """Whether every point the run plans is stored (then the next phase is the report)."""
    config = _json(run / "config.json") or {}
    stored = {(r["method"], r["point"]) for r in read_rows(run)}
    needs = set((config.get("resolved") or {}).get("evaluation", {}).get("metrics", []))
    for method, m in (config.get("methods") or {}).items():
        points = [f"b{i}" for i in range(len(m.get("rung_steps") or []))] if needs & {"fid", "kid", "class_acc",
                                                                                        "fvd", "pred_psnr"} else []
        if m.get("stage1_steps") and needs & {"rfid", "psnr", "bits_per_pixel", "rfvd", "bits_per_frame"}:
            points.append("stage1")
        if any((method, p) not in stored for p in points):
            return False
    return bool(config)


def markdown(summary: dict) -> str:
    c = summary["comparison"]
    lines = ["| kill | aimed at | phase hit | after (s) | rows stored then |", "|---|---|---|---|---|"]
    for k in summary["kills"]:
        lines.append(f"| {k['kill']} | {k['aimed_at']} | {k['phase'] or 'finished first'} | {k['after_s']} | "
                     f"{k['rows_then']} |")
    lines += ["", f"kills landed: {sum(k['killed'] for k in summary['kills'])} of {len(summary['kills'])}; phases hit: "
              + ", ".join(f"{p} {n}" for p, n in sorted(summary["phases_hit"].items())), "",
              "| rows (reference) | rows (resumed) | lost | duplicated | added | differing |", "|---|---|---|---|---|---|",
              f"| {c['reference_rows']} | {c['rows']} | {len(c['lost'])} | {len(c['duplicated'])} | {len(c['added'])} | "
              f"{len({tuple(d['key']) for d in c['differing']})} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="suites/smoke.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="suite overrides, for both runs")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    # [choice] up to 240 s: the smoke suite checkpoints UL's stage 1 every 200 steps (~60-90 s here); kills that all
    # land within 60 s of a start (the first default) kept the sweep in stage 1 for 8 kills in a row
    p.add_argument("--delay", type=float, nargs=2, default=(20.0, 240.0), metavar=("A", "B"),
                   help="kill at a uniform time in [A, B] s after a start when the aimed-at phase has not shown")
    p.add_argument("--jitter", type=float, default=2.0, help="seconds after the aimed-at phase shows (uniform)")
    p.add_argument("--reuse", metavar="RUN", help="an uninterrupted run directory of the same suite to compare with")
    p.add_argument("--work", default="runs/kill-campaign", help="where the campaign's runs go")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every process (default: inherit)")
    p.add_argument("--rel", type=float, default=0.0, help="relative tolerance on values (default 0: exact)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "kill_campaign.json"))
    args = p.parse_args(argv)
    if args.kills < 1 or args.delay[0] < 0 or args.delay[1] < args.delay[0]:
        p.error("--kills must be >= 1 and --delay A B with 0 <= A <= B")
    summary = campaign(args)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown(summary))
    print(f"wrote {args.out}; {'OK' if summary['ok'] else 'FAILED'}: rows lost {len(summary['comparison']['lost'])}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
