"""Regression checks: a run's metrics against a committed baseline file with stated tolerances.

``ulbench baseline RUN -o FILE`` writes the baseline from a real run (values are measured, never typed in; with
``--spread RUN2 RUN3`` each metric's tolerance is set from the measured seed-to-seed spread);
``ulbench check RUN --baseline FILE`` fails (exit 1) with a readable table when a metric moved past its tolerance
in the bad direction (``higher_is_better``; two-sided when it is null), is missing, is not a finite number (NaN,
inf), or was measured under another protocol fingerprint. A path that is no run directory is a UserError (exit 2).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ulbench.errors import UserError
from ulbench.io import fingerprint_id, read_json, write_json
from ulbench.run.results import ResultsStore

# Allowed movement per metric: max(abs, rel * |baseline|). Sized for CPU float differences between machines on the
# smoke suite's small N; a broken sampler or a wrong loss weight moves these by far more (tests/test_check.py).
DEFAULT_TOLERANCES = {"fid": {"rel": 0.15, "abs": 0.0}, "kid": {"rel": 0.3, "abs": 0.005},
                      "rfid": {"rel": 0.15, "abs": 0.0}, "psnr": {"rel": 0.0, "abs": 0.75},
                      "bits_per_pixel": {"rel": 0.15, "abs": 0.0}, "fvd": {"rel": 0.15, "abs": 0.0},
                      "rfvd": {"rel": 0.15, "abs": 0.0}, "pred_psnr": {"rel": 0.0, "abs": 0.75},
                      "bits_per_frame": {"rel": 0.15, "abs": 0.0}, "fd_dinov2": {"rel": 0.15, "abs": 0.0},
                      "rlpips": {"rel": 0.15, "abs": 0.01},
                      "precision": {"rel": 0.0, "abs": 0.1}, "recall": {"rel": 0.0, "abs": 0.1}}


def _key(row: dict) -> tuple:
    return row["method"], row["point"], row["metric"], row.get("guidance")


def _fingerprint_id(row: dict) -> str:
    return fingerprint_id(row.get("fingerprint"))


SPREAD_FACTOR = 3.0  # allowed = this x the largest seed-to-seed deviation measured (--spread) [choice]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _run_rows(run_dir: Path) -> list[dict]:
    """The rows of a run directory; a path that is no run (no config.json, no results.jsonl) is a UserError, not a
    table of MISSING entries."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory; give a directory made by `ulbench run` "
                        "(runs/<suite>/<name>)")
    if not (run_dir / "config.json").is_file() and not (run_dir / "results.jsonl").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.json, no results.jsonl); give a directory made "
                        "by `ulbench run` (runs/<suite>/<name>)")
    return ResultsStore(run_dir / "results.jsonl").rows


def _rows_of(run_dir: Path) -> list[dict]:
    rows = _run_rows(run_dir)
    if not rows:
        raise UserError(f"{run_dir / 'results.jsonl'}: no results to make a baseline from")
    bad = [f"{r.get('method')}/{r.get('point')}/{r.get('metric')} = {r.get('value')}" for r in rows
           if not _finite(r.get("value"))]
    if bad:
        raise UserError(f"{run_dir / 'results.jsonl'}: non-finite values ({'; '.join(bad)}); a baseline must hold "
                        "measured numbers: rerun those points or use another run")
    return rows


def write_baseline(run_dir: str | Path, out: str | Path, tolerances: dict | None = None,
                   spread: list[str | Path] = (), factor: float = SPREAD_FACTOR) -> dict:
    """The baseline file of a run. ``spread``: runs of the same suite under other seeds. Each metric then gets its
    allowed movement from them: ``factor`` x the largest deviation from this run among the method's entries of the
    same metric (its points pooled: with a few seeds, one entry's deviations alone are a poor estimate of the
    spread; methods are not pooled, their spreads differ by orders of magnitude); every spread run must have every
    entry."""
    run_dir = Path(run_dir)
    rows = _rows_of(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    others = [{_key(r): r for r in _rows_of(Path(s))} for s in spread]
    deviations: dict[tuple[str, str], list[float]] = {}
    for r in rows if others else []:
        missing = [str(s) for s, o in zip(spread, others) if _key(r) not in o]
        if missing:
            raise UserError(f"{', '.join(missing)}: no {r['method']}/{r['point']}/{r['metric']}; spread runs must "
                            f"be of the same suite as {run_dir}")
        deviations.setdefault((r["method"], r["metric_base"]), []).extend(abs(o[_key(r)]["value"] - r["value"])
                                                                          for o in others)
    metrics = []
    for r in rows:
        entry = {"method": r["method"], "point": r["point"], "metric": r["metric"], "metric_base": r["metric_base"],
                 "guidance": r.get("guidance"), "value": r["value"], "higher_is_better": r["higher_is_better"],
                 "fingerprint_id": _fingerprint_id(r)}
        if others:
            pooled = deviations[r["method"], r["metric_base"]]
            spread_of_metric = max(pooled)
            entry["spread"] = {"max_deviation": spread_of_metric, "deviations": len(pooled), "factor": factor}
            # a floor of 0.1% of the value: float differences between machines, were the seeds to agree by chance
            entry["allowed"] = max(factor * spread_of_metric, 1e-3 * abs(r["value"]))
        metrics.append(entry)
    baseline = {"suite": config["suite"], "made_from": {"run": str(run_dir), "git_commit": config.get("git_commit"),
                                                        "created_at": config.get("created_at"),
                                                        "spread_runs": [str(s) for s in spread]},
                "tolerances": tolerances or DEFAULT_TOLERANCES, "metrics": metrics}
    write_json(out, baseline)
    return baseline


def _load_baseline(path: Path) -> dict:
    baseline = read_json(path, f"no such baseline file; make one with `ulbench baseline RUN -o {path}`")
    for key in ("tolerances", "metrics"):
        if key not in baseline:
            raise UserError(f"{path}: missing '{key}'")
    return baseline


def compare(run_dir: str | Path, baseline_path: str | Path) -> tuple[bool, list[dict]]:
    """(passed, one entry per baseline metric with status ok / improved / REGRESSED / MISSING / PROTOCOL /
    NONFINITE). A NaN or infinite value fails: every comparison with NaN is false, so it would otherwise pass."""
    current = {_key(r): r for r in _run_rows(Path(run_dir))}
    baseline = _load_baseline(Path(baseline_path))
    out = []
    for b in baseline["metrics"]:
        if "allowed" in b:  # measured from the seed-to-seed spread (write_baseline's spread runs)
            allowed = b["allowed"]
        else:
            tol = baseline["tolerances"].get(b["metric_base"])
            if tol is None:
                raise UserError(f"{baseline_path}: no tolerance for metric '{b['metric_base']}' under 'tolerances'")
            allowed = max(tol.get("abs", 0.0), tol.get("rel", 0.0) * abs(b["value"]))
        entry = {**{k: b[k] for k in ("method", "point", "metric", "guidance")}, "baseline": b["value"],
                 "allowed": allowed}
        r = current.get(_key(b))
        if r is None:
            out.append(entry | {"current": None, "delta": None, "status": "MISSING"})
            continue
        if not _finite(r["value"]) or not _finite(b["value"]):
            out.append(entry | {"current": r["value"], "delta": None, "status": "NONFINITE"})
            continue
        delta = r["value"] - b["value"]
        worse = {True: -delta, False: delta, None: abs(delta)}[b["higher_is_better"]]
        if _fingerprint_id(r) != b["fingerprint_id"]:
            status = "PROTOCOL"
        elif worse > allowed:
            status = "REGRESSED"
        elif -worse > allowed:
            status = "improved"
        else:
            status = "ok"
        out.append(entry | {"current": r["value"], "delta": delta, "status": status})
    return all(e["status"] in ("ok", "improved") for e in out), out


def format_comparison(entries: list[dict]) -> str:
    head = f"{'method':10s} {'point':7s} {'metric':16s} {'baseline':>11s} {'current':>11s} {'delta':>10s} " \
           f"{'allowed':>9s}  status"
    lines = [head, "-" * len(head)]
    num = lambda v: "-" if v is None else f"{v:.4g}"
    for e in entries:
        g = "" if e["guidance"] is None else f" g={e['guidance']:g}"
        lines.append(f"{e['method']:10s} {e['point']:7s} {e['metric'] + g:16s} {num(e['baseline']):>11s} "
                     f"{num(e['current']):>11s} {num(e['delta']):>10s} {num(e['allowed']):>9s}  {e['status']}")
    return "\n".join(lines)
