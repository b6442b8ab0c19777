"""Regression checks: a run's metrics against a committed baseline file with stated tolerances.

``ulbench baseline RUN -o FILE`` writes the baseline from a real run (values are measured, never typed in);
``ulbench check RUN --baseline FILE`` fails (exit 1) with a readable table when a metric moved past its tolerance
in the bad direction (``higher_is_better``; two-sided when it is null), is missing, or was measured under another
protocol fingerprint.
"""
from __future__ import annotations

import json
from pathlib import Path

from ulbench.errors import UserError
from ulbench.io import fingerprint_id, write_json
from ulbench.sweep import ResultsStore

# Allowed movement per metric: max(abs, rel * |baseline|). Sized for CPU float differences between machines on the
# smoke suite's small N; a broken sampler or a wrong loss weight moves these by far more (tests/test_check.py).
DEFAULT_TOLERANCES = {"fid": {"rel": 0.15, "abs": 0.0}, "kid": {"rel": 0.3, "abs": 0.005},
                      "rfid": {"rel": 0.15, "abs": 0.0}, "psnr": {"rel": 0.0, "abs": 0.75},
                      "bits_per_pixel": {"rel": 0.15, "abs": 0.0}, "fvd": {"rel": 0.15, "abs": 0.0},
                      "rfvd": {"rel": 0.15, "abs": 0.0}, "pred_psnr": {"rel": 0.0, "abs": 0.75},
                      "bits_per_frame": {"rel": 0.15, "abs": 0.0}}


def _key(row: dict) -> tuple:
    return row["method"], row["point"], row["metric"], row.get("guidance")


def _fingerprint_id(row: dict) -> str:
    return fingerprint_id(row.get("fingerprint"))


def write_baseline(run_dir: str | Path, out: str | Path, tolerances: dict | None = None) -> dict:
    run_dir = Path(run_dir)
    rows = ResultsStore(run_dir / "results.jsonl").rows
    if not rows:
        raise UserError(f"{run_dir / 'results.jsonl'}: no results to make a baseline from")
    config = json.loads((run_dir / "config.json").read_text())
    baseline = {"suite": config["suite"], "made_from": {"run": str(run_dir), "git_commit": config.get("git_commit"),
                                                        "created_at": config.get("created_at")},
                "tolerances": tolerances or DEFAULT_TOLERANCES,
                "metrics": [{"method": r["method"], "point": r["point"], "metric": r["metric"],
                             "metric_base": r["metric_base"], "guidance": r.get("guidance"), "value": r["value"],
                             "higher_is_better": r["higher_is_better"], "fingerprint_id": _fingerprint_id(r)}
                            for r in rows]}
    write_json(out, baseline)
    return baseline


def _load_baseline(path: Path) -> dict:
    try:
        baseline = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such baseline file; make one with `ulbench baseline RUN -o {path}`") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    for key in ("tolerances", "metrics"):
        if key not in baseline:
            raise UserError(f"{path}: missing '{key}'")
    return baseline


def compare(run_dir: str | Path, baseline_path: str | Path) -> tuple[bool, list[dict]]:
    """(passed, one entry per baseline metric with status ok / improved / REGRESSED / MISSING / PROTOCOL)."""
    baseline = _load_baseline(Path(baseline_path))
    current = {_key(r): r for r in ResultsStore(Path(run_dir) / "results.jsonl").rows}
    out = []
    for b in baseline["metrics"]:
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
