"""Run directories: create one from a suite file, resume one from any working directory, and what each records.

Run directory ``runs/<suite>/<name>/``: ``config.json`` (resolved suite, plan, versions, the suite file's absolute path
and sha256), ``suite.yaml`` (the resolved suite, what ``--resume`` runs), ``results.jsonl`` (rewritten
atomically, all rows of a point at once; ``ulbench.run.results``), ``methods/<method>/<stage>/`` (training runs with
checkpoints), ``methods/<method>/points/<point>/`` (samples as ADM ``.npz``, ``grid.png``), ``logs/run.log``.
``--resume`` skips points whose rows are stored and continues training from the latest checkpoint
(``ulbench.run.sweep``).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
from pathlib import Path

from ulbench.errors import UserError
from ulbench.io import atomic_write, read_json, write_json
from ulbench.methods import get_kind
from ulbench.run.plan import MethodPlan, make_plan
from ulbench.suite import load_suite

log = logging.getLogger("ulbench.run")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import importlib.metadata as md

    names = ("ulbench", "torch", "torchvision", "torch-fidelity", "numpy", "scipy")
    return {n: md.version(n) for n in names}


def _setup_logging(run_dir: Path) -> None:
    """Rank 0 logs to ``logs/run.log`` and the terminal; other ranks (torchrun) only their warnings."""
    from ulbench import dist

    if not dist.is_main():
        log.handlers[:] = [logging.StreamHandler()]
        log.setLevel(logging.WARNING)
        return
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.handlers[:] = [handler, logging.StreamHandler()]
    log.setLevel(logging.INFO)


def check_method_files(suite, plans: list[MethodPlan]) -> None:
    """Files a method needs (e.g. a user's VAE folder) are checked before anything trains."""
    for i, p in enumerate(plans):
        check = getattr(get_kind(p.kind), "check_files", None)
        if check is not None:
            try:
                check(p.config)
            except UserError as e:
                raise UserError(f"{suite.file}: methods[{i}] ({p.name}): {e}") from None


SUITE_COPY = "suite.yaml"  # the resolved suite a run was started with, beside its config.json


def check_run_name(name: str) -> str:
    """``--name``: one plain folder name under ``runs/<suite>/`` (a separator or ``..`` would put the run elsewhere)."""
    if not name or not name.strip() or name in (".", "..") or any(c in name for c in "/\\") or \
            any(ord(c) < 32 for c in name) or name.startswith("-"):
        raise UserError(f"--name {name!r}: a run name is one folder name (e.g. ci, seed1, 2026-01-31): not empty, "
                        "no '/' or '\\', not '.' or '..', no leading '-'; --runs-dir sets where runs go")
    return name


_PATH_KEYS = ("path", "annotations")  # dataset keys that name files, in `dataset` and `evaluation.dataset`


def _absolute(path: str) -> str:
    """A relative path as the process that read the suite saw it (relative to its working directory); ``~`` kept."""
    return path if Path(path).expanduser().is_absolute() else os.path.abspath(path)


def absolute_paths(resolved: dict) -> dict:
    """The resolved suite with its relative file paths (dataset, evaluation dataset, reference, DINOv2 weights, the
    overrides a method kind names in ``path_overrides``) made absolute: ``ulbench run`` read them relative to its
    working directory, and a resumed run or a SLURM job may start in another. An override is made absolute only when
    it names an existing file or folder: ``vae.pretrained`` may also be a release's name."""
    out = json.loads(json.dumps(resolved))
    sections = [out.get("dataset") or {}, (out.get("evaluation") or {}).get("dataset") or {}]
    for section in sections:
        for key in _PATH_KEYS:
            if isinstance(section.get(key), str) and section[key]:
                section[key] = _absolute(section[key])
    ev = out.get("evaluation") or {}
    if isinstance(ev.get("reference"), str) and ev["reference"] != "dataset":
        ev["reference"] = _absolute(ev["reference"])
    if isinstance(ev.get("dinov2_weights"), str) and ev["dinov2_weights"]:
        ev["dinov2_weights"] = _absolute(ev["dinov2_weights"])
    for method in out.get("methods") or []:
        for dotted in getattr(get_kind(method["kind"]), "path_overrides", ()):
            *parents, key = dotted.split(".")
            section = method.get("overrides") or {}
            for name in parents:
                section = section.get(name) if isinstance(section, dict) else None
            if isinstance(section, dict) and isinstance(section.get(key), str) and Path(section[key]).exists():
                section[key] = _absolute(section[key])
    return out


def _sha256(path: Path) -> str | None:
    """The file's sha256, or None when it cannot be read (a suite file moved or deleted since)."""
    from ulbench.assets import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return None


def create_run(suite_file: str, sets: list[str], runs_root: Path, name: str | None) -> Path:
    """A new run directory holding its config.json (resolved suite, plan, versions) and ``suite.yaml`` (the resolved
    suite itself, what ``--resume`` runs); nothing trained yet."""
    import yaml

    from ulbench import dist
    from ulbench.suite import check_paths

    if name is not None:
        check_run_name(name)
    suite = load_suite(suite_file, sets)
    check_paths(suite)
    name = dist.broadcast_from_main(name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(runs_root) / suite.name / name
    if (run_dir / "config.json").exists():
        raise UserError(f"{run_dir} already holds a run; continue it with `ulbench run --resume {run_dir}` or "
                        "pass another --name")
    plans = make_plan(suite)
    check_method_files(suite, plans)
    dist.barrier()  # every rank has checked the run directory before rank 0 creates it
    # Resuming reads the run's own copy of the resolved suite (SUITE_COPY), not the suite file: the protocol a run
    # measures is fixed when it starts, whatever happens to the file later (edited, moved, deleted) and whatever
    # directory a resume or a SLURM job starts in (relative paths are stored absolute). The file's absolute path and
    # sha256 are kept as provenance; a resume notes when the file has changed since.
    resolved = absolute_paths(suite.to_dict())
    suite_path = Path(suite_file).resolve()
    config = {"suite": suite.name, "suite_file": str(suite_path), "suite_sha256": _sha256(suite_path),
              "suite_copy": SUITE_COPY, "sets": list(sets), "resolved": resolved,
              "methods": {p.name: {"kind": p.kind, "preset": p.preset, "config": _jsonable(p.config),
                                   "train": p.train, "sampler": p.sampler, "guidance": list(p.guidance),
                                   "published": published_recipe(p), "flops_per_image": p.flops_per_image,
                                   "forward_macs_per_image": p.forward_macs_per_image, "params": p.params,
                                   "batch_size": p.batch_size, "stage1_steps": p.stage1_steps,
                                   "rung_steps": p.rung_steps, "official": p.official} for p in plans},
              "git_commit": git_commit(), "versions": versions(),
              "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if dist.is_main():
        with atomic_write(run_dir / SUITE_COPY) as f:
            f.write(f"# The resolved suite of this run (from {json.dumps(str(suite_path))}, sha256 "
                    f"{config['suite_sha256']}, --set {json.dumps(list(sets))}): what `ulbench run --resume` runs. "
                    "Do not edit.\n")
            yaml.safe_dump(resolved, f, sort_keys=False, allow_unicode=True)
        write_json(run_dir / "config.json", config)  # last: a config.json means a complete run directory
    dist.barrier()
    return run_dir


def start_run(suite_file: str, sets: list[str], runs_root: Path, name: str | None, progress: bool = True) -> Path:
    """A new run directory, then the sweep of every method in this process group."""
    return resume_run(create_run(suite_file, sets, runs_root, name), progress=progress)


def _run_suite(run_dir: Path, config: dict):
    """The suite a run was started with: its copy ``suite.yaml`` (written from config.json's ``resolved`` for runs
    made before copies were kept), checked against ``resolved``."""
    from ulbench.suite import SuiteError

    copy = run_dir / config.get("suite_copy", SUITE_COPY)
    if not copy.is_file():
        import yaml

        with atomic_write(copy) as f:
            f.write("# The resolved suite of this run, from config.json: what `ulbench run --resume` runs.\n")
            yaml.safe_dump(config["resolved"], f, sort_keys=False, allow_unicode=True)
    try:
        suite = load_suite(copy)
    except SuiteError as e:
        raise UserError(f"{run_dir}: its suite copy is damaged ({e}); restore {copy} or start a new run") from None
    if json.loads(json.dumps(suite.to_dict())) != config["resolved"]:
        raise UserError(f"{copy} differs from the suite stored in {run_dir / 'config.json'} (edited?); resuming would "
                        f"mix two protocols. Delete {copy} (it is rewritten from config.json) or start a new run.")
    file, recorded = Path(config.get("suite_file", "")), config.get("suite_sha256")
    current = _sha256(file) if config.get("suite_file") else None
    if recorded and current != recorded:
        log.warning("note: %s %s since %s started (sha256 %s then, %s now); the run continues with its own copy %s",
                    file, "changed" if current else "is gone", run_dir, recorded[:16],
                    current[:16] if current else "-", copy)
    return suite


def load_run_plans(run_dir: str | Path):
    """(suite, plans, config) of a run directory, checked against what it was started with."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json", "missing; not a run directory made by `ulbench run`")
    suite = _run_suite(run_dir, config)
    plans = make_plan(suite)
    for p in plans:
        if p.rung_steps != config["methods"][p.name]["rung_steps"]:
            raise UserError(f"{run_dir}: the measured FLOPs of {p.name} changed (code changed?): steps "
                            f"{p.rung_steps} vs {config['methods'][p.name]['rung_steps']}; start a new run")
    return suite, plans, config


def resume_run(run_dir: str | Path, progress: bool = True, methods: list[str] | None = None) -> Path:
    """Run (or continue) the sweep of a run directory: finished points skipped, training from the last checkpoint.
    ``methods``: only these (a SLURM job runs one); the launchers all come through here."""
    run_dir = Path(run_dir)
    suite, plans, _ = load_run_plans(run_dir)
    if methods is not None:
        unknown = sorted(set(methods) - {p.name for p in plans})
        if unknown:
            raise UserError(f"{run_dir}: no method {unknown} in this run; it has {[p.name for p in plans]}")
        plans = [p for p in plans if p.name in methods]
    _setup_logging(run_dir)
    from ulbench.run.sweep import Sweep

    Sweep(suite, run_dir, progress).run(plans)
    return run_dir


def published_recipe(plan: MethodPlan) -> dict:
    """What the method's authors published of its recipe, as TrainConfig fields per stage and sampler settings
    (empty where nothing is published: the harness's defaults apply); the report sets the run's recipe beside it."""
    from ulbench.suite.schema import plain

    kind = get_kind(plan.kind)
    return plain({"train": {stage: kind.train_recipe(plan.config, stage) for stage in plan.stages},
                  "sampler": kind.sampler_recipe(plan.config)})


def _jsonable(config) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(config) if is_dataclass(config) else dict(config)
