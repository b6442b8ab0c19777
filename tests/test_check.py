"""`ulbench baseline --spread`: per-metric tolerances from the measured seed-to-seed spread, used by `ulbench check`
in the metric's bad direction only."""
import json
from pathlib import Path

from conftest import run_cli

from ulbench.report.check import compare, write_baseline


def _run(root: Path, name: str, fid: float, psnr: float, fid_b1: float = 90.0) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"suite": "s", "git_commit": None, "created_at": None}))
    rows = [{"method": "m", "point": "b0", "metric": "fid200", "metric_base": "fid", "guidance": 1.0, "value": fid,
             "higher_is_better": False, "fingerprint": {"id": "f"}},
            {"method": "m", "point": "b1", "metric": "fid200", "metric_base": "fid", "guidance": 1.0,
             "value": fid_b1, "higher_is_better": False, "fingerprint": {"id": "f"}},
            {"method": "m", "point": "stage1", "metric": "psnr", "metric_base": "psnr", "guidance": None,
             "value": psnr, "higher_is_better": True, "fingerprint": {"id": "p"}}]
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_tolerances_from_the_seed_spread(tmp_path):
    base = _run(tmp_path, "s0", fid=100.0, psnr=20.0)
    s1, s2 = _run(tmp_path, "s1", 104.0, 19.9), _run(tmp_path, "s2", 97.0, 20.2)
    out = tmp_path / "baseline.json"
    b = write_baseline(base, out, spread=[s1, s2], factor=3.0)
    allowed = {(m["point"], m["metric"]): m["allowed"] for m in b["metrics"]}
    # 3 x the largest deviation of the metric, its points pooled (b1 agreed across seeds; b0 moved by up to 4)
    assert allowed["b0", "fid200"] == allowed["b1", "fid200"] == 12.0 and abs(allowed["stage1", "psnr"] - 0.6) < 1e-9
    for run in (s1, s2):  # the seeds it was measured on pass
        assert compare(run, out)[0]
    worse = _run(tmp_path, "worse", 100.0, 19.3)  # PSNR 0.7 dB down: past 0.6
    passed, entries = compare(worse, out)
    assert not passed and [e["metric"] for e in entries if e["status"] == "REGRESSED"] == ["psnr"]
    better = _run(tmp_path, "better", 80.0, 21.0)  # only the bad direction fails
    assert compare(better, out)[0]
    r = run_cli("baseline", str(base), "-o", str(tmp_path / "cli.json"), "--spread", str(s1), str(s2))
    assert r.returncode == 0 and "3 x the spread of 2 other seeds" in r.stdout
    assert json.loads((tmp_path / "cli.json").read_text())["metrics"][0]["allowed"] == 12.0


def test_nan_and_inf_values_fail_the_check(tmp_path):
    """Every comparison with NaN is false: without an explicit test a NaN metric would pass as 'ok'."""
    out = tmp_path / "baseline.json"
    write_baseline(_run(tmp_path, "s0", fid=100.0, psnr=20.0), out)
    for name, fid in (("nan", float("nan")), ("inf", float("inf")), ("ninf", float("-inf"))):
        passed, entries = compare(_run(tmp_path, name, fid=fid, psnr=20.0), out)
        assert not passed and [e["status"] for e in entries if e["point"] == "b0"] == ["NONFINITE"], entries
        r = run_cli("check", str(tmp_path / name), "--baseline", str(out))
        assert r.returncode == 1 and "NONFINITE" in r.stdout and "check FAILED" in r.stdout


def test_a_baseline_is_never_made_from_nan(tmp_path):
    r = run_cli("baseline", str(_run(tmp_path, "nan", fid=float("nan"), psnr=20.0)), "-o", str(tmp_path / "b.json"))
    assert r.returncode == 2 and "non-finite" in r.stderr and "m/b0/fid200" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "b.json").exists()


def test_check_of_a_path_that_is_no_run_is_a_user_error(tmp_path):
    out = tmp_path / "baseline.json"
    write_baseline(_run(tmp_path, "s0", fid=100.0, psnr=20.0), out)
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "nowhere"):
        r = run_cli("check", str(path), "--baseline", str(out))
        assert r.returncode == 2, r.stdout
        assert str(path) in r.stderr and "ulbench run" in r.stderr and "Traceback" not in r.stderr
        assert "MISSING" not in r.stdout
