"""The suite runner end to end on a micro suite (real UL training on real photo crops, real Inception FID and KID):
nested budgets, the regression check against an injected sampler bug, dry runs of every suite (kill -9 and resume
under torchrun: tests/test_distributed.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from ulbench.report.check import compare, write_baseline
from ulbench.run.directory import start_run

SUITES = Path(__file__).parents[1] / "suites"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def _keys(rows: list[dict]) -> list[tuple]:
    return [(r["method"], r["point"], r["metric"], r["guidance"]) for r in rows]


def test_sweep_writes_every_point_with_nested_budgets(clean_run):
    rows = _rows(clean_run)
    assert sorted(_keys(rows)) == sorted(
        [("ul", "stage1", "psnr", None), ("ul", "stage1", "bits_per_pixel", None)]
        + [("ul", f"b{i}", m, 1.0) for i in range(2) for m in ("fid48", "kid48")])
    config = json.loads((clean_run / "config.json").read_text())
    plan = config["methods"]["ul"]
    fid = sorted((r for r in rows if r["metric_base"] == "fid"), key=lambda r: r["budget_index"])
    for i, r in enumerate(fid):
        # each rung trained on from the previous one: stage-2 FLOPs are the steps reached x measured FLOPs/step
        assert r["steps"]["stage2"] == plan["rung_steps"][i]
        per_step = plan["flops_per_image"]["stage2"] * plan["batch_size"]["stage2"]
        assert r["train_flops"]["stage2"] == pytest.approx(per_step * plan["rung_steps"][i])
        assert r["train_flops"]["stage2"] >= r["budget_train_flops"] > r["train_flops"]["stage2"] - per_step
        assert r["train_flops"]["total"] == pytest.approx(r["train_flops"]["stage1"] + r["train_flops"]["stage2"])
        assert r["fingerprint"]["n"][0] == 48 and r["git_commit"] is not None and "torch" in r["versions"]
        assert (clean_run / r["grid"]).stat().st_size > 0
    # one stage-2 run serves all rungs: its checkpoints sit at the rung steps, no per-rung restarts
    ckpts = sorted(p.name for p in (clean_run / "methods/ul/stage2").glob("checkpoint-*"))
    assert [int(c.split("-")[1]) for c in ckpts if int(c.split("-")[1]) in plan["rung_steps"]] == plan["rung_steps"]
    with np.load(clean_run / "methods/ul/points/b1/samples_g1.npz") as z:
        assert z["arr_0"].shape == (48, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    bpp = next(r for r in rows if r["metric"] == "bits_per_pixel")
    assert 0 < bpp["value"] < 1


@pytest.mark.slow
def test_regression_check_catches_a_sampler_bug_and_passes_a_rerun(micro, clean_run, torchrun_run, tmp_path,
                                                                    monkeypatch):
    baseline = tmp_path / "micro.json"
    write_baseline(clean_run, baseline)
    rerun = torchrun_run.run  # the same suite again: two ranks, killed once and resumed
    passed, entries = compare(rerun, baseline)
    assert passed, entries
    assert run_cli("check", str(rerun), "--baseline", str(baseline)).returncode == 0

    # A sign error in the sampler's clean-image prediction (x = alpha z + sigma v instead of alpha z - sigma v).
    import ul_model.sampling

    monkeypatch.setattr(ul_model.sampling, "x_from_v", lambda z, v, alpha, sigma: alpha * z + sigma * v)
    # The broken run stops at the first rung: the same budget, steps, seeds and training as the baseline's b0 (what
    # differs is the sampler); the later rungs are MISSING, so the two measured points must be REGRESSED by value.
    broken = start_run(str(micro), ["compute.ladder=[1.0e11]"], tmp_path / "runs", "broken", progress=False)
    passed, entries = compare(broken, baseline)
    assert not passed
    measured = {(e["point"], e["metric"]): e for e in entries if e["status"] != "MISSING"}
    assert set(measured) == {("stage1", "psnr"), ("stage1", "bits_per_pixel"), ("b0", "fid48"), ("b0", "kid48")}
    # reconstructions go through the same sampler: PSNR falls past its tolerance; FID rises past its own (measured:
    # the micro suite's UL learns enough for samples to show it)
    assert measured["stage1", "psnr"]["status"] == "REGRESSED"
    assert measured["b0", "fid48"]["status"] == "REGRESSED" and measured["b0", "fid48"]["delta"] > 0
    r = run_cli("check", str(broken), "--baseline", str(baseline))
    assert r.returncode == 1 and "REGRESSED" in r.stdout and "Traceback" not in r.stderr


def test_every_suite_validates():
    r = run_cli("validate", *sorted(str(p) for p in SUITES.glob("*.yaml") if not p.name.startswith("_")))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("suite", ["smoke", "fashion-mnist", "imagenet512"])
def test_every_suite_dry_runs(suite, tmp_path):
    # one suite times a real step for the wall-time estimate; the others plan from counted FLOPs (CI time)
    timing = [] if suite == "smoke" else ["--no-timing"]
    r = run_cli("run", str(SUITES / f"{suite}.yaml"), "--dry-run", *timing, "--no-progress", "--runs-dir",
                str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    assert "rung b0" in r.stdout and ("estimated training wall time" in r.stdout or timing)
    assert not (tmp_path / "runs").exists()  # a dry run trains and writes nothing


def test_report_of_a_real_run_embeds_its_plots(clean_run, tmp_path):
    import base64

    from ulbench.report import write_report

    out = write_report(clean_run, tmp_path / "report")
    html = (tmp_path / "report" / "index.html").read_text()
    pngs = [p for p in out["paths"].values() if str(p).endswith(".png")]
    assert {"compute_vs_fid.png", "compute_vs_kid.png", "rate_vs_quality.png"} <= {p.name for p in pngs}
    for p in pngs:
        data = p.read_bytes()
        assert len(data) > 1000 and base64.b64encode(data).decode() in html
    assert sorted(out["plotted"]["metric"]) == ["fid48"] * 2 + ["kid48"] * 2  # one FID and one KID point per rung


def _folder_suite(folder: Path) -> Path:
    """The micro suite on an image folder given by a path relative to ``folder`` (the working directory)."""
    from conftest import MICRO, write_pngs

    from ulbench.metrics.images import photo_crops

    write_pngs(photo_crops(0, 6, size=32), folder / "imgs" / "a")
    suite = folder / "suites" / "micro-folder.yaml"
    suite.parent.mkdir()
    suite.write_text(MICRO.replace("dataset: {name: photos, resolution: 32, subset: 512}",
                                   "dataset: {name: folder, path: imgs, resolution: 32}"))
    return suite


def test_resume_from_another_directory_reads_the_same_files(tmp_path, monkeypatch):
    """`ulbench run` read dataset.path relative to its working directory; a resume (or a SLURM job) started
    elsewhere reads the same folder: the run's suite stores it absolute."""
    from ulbench.data import load_suite_dataset
    from ulbench.run.directory import create_run, load_run_plans

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    _folder_suite(start)
    monkeypatch.chdir(start)
    run = create_run("suites/micro-folder.yaml", [], Path("runs"), "x").resolve()
    config = json.loads((run / "config.json").read_text())
    assert config["suite_file"] == str(start / "suites" / "micro-folder.yaml")
    assert config["resolved"]["dataset"]["path"] == str(start / "imgs")
    monkeypatch.chdir(elsewhere)
    (elsewhere / "imgs").mkdir()  # a folder of the same name here must not be what the run reads
    suite, _, _ = load_run_plans(run)
    ds = load_suite_dataset(suite)
    assert len(ds) == 6 and suite.dataset.path == str(start / "imgs")


def test_resume_runs_the_suite_copy_it_started_with(tmp_path, monkeypatch, caplog):
    """The run stores its resolved suite (suite.yaml) and the suite file's sha256: an edited, moved or deleted
    suite file does not change what a resume measures; an edited copy is refused."""
    import hashlib
    import logging

    from ulbench.errors import UserError
    from ulbench.run.directory import create_run, load_run_plans

    monkeypatch.chdir(tmp_path)
    suite_file = _folder_suite(tmp_path)
    original = suite_file.read_bytes()
    run = create_run(str(suite_file), ["evaluation.num_samples=40"], tmp_path / "runs", "x")
    config = json.loads((run / "config.json").read_text())
    assert config["suite_sha256"] == hashlib.sha256(original).hexdigest()
    assert config["resolved"]["evaluation"]["num_samples"] == 40
    suite_file.write_text(original.decode().replace("num_samples: 48", "num_samples: 24"))
    with caplog.at_level(logging.WARNING, logger="ulbench.run"):
        suite, plans, _ = load_run_plans(run)
    assert suite.evaluation.num_samples == 40 and suite.to_dict() == config["resolved"]
    new_hash = hashlib.sha256(suite_file.read_bytes()).hexdigest()
    assert any(config["suite_sha256"][:16] in m and new_hash[:16] in m and str(suite_file) in m
               for m in caplog.messages), caplog.messages
    suite_file.unlink()
    assert load_run_plans(run)[0].evaluation.num_samples == 40
    copy = run / "suite.yaml"
    copy.write_text(copy.read_text().replace("num_samples: 40", "num_samples: 8"))
    with pytest.raises(UserError, match="differs from the suite stored in"):
        load_run_plans(run)
    copy.unlink()  # rewritten from config.json
    assert load_run_plans(run)[0].evaluation.num_samples == 40 and copy.is_file()


@pytest.mark.parametrize("name", ["", " ", "../x", "a/b", "..", ".", "a\\b"])
def test_run_name_is_one_folder_name(name, micro, tmp_path):
    from ulbench.errors import UserError
    from ulbench.run.directory import create_run

    with pytest.raises(UserError, match="a run name is one folder name"):
        create_run(str(micro), [], tmp_path / "runs", name)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_run_name_cli_error(micro, tmp_path):
    r = run_cli("run", str(micro), "--runs-dir", str(tmp_path / "runs"), "--name", "../escaped", "--no-progress")
    assert r.returncode == 2 and "--name '../escaped'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "runs").exists()
