"""Nothing lost, nothing changed: a sweep SIGKILLed at a set point (during training, during evaluation, while its
results are written) and resumed ends with exactly the rows, in values, of an uninterrupted run of the same suite.

The suite is the micro suite (tests/conftest.py) made smaller with ``--set`` (two rungs, shorter stage 1, 32 samples;
the test split of the photos, which the reconstruct test below needs) so that each test stays near a minute on one
core. Each kill is real (SIGKILL of the process itself) at a point reached deterministically: a small driver
(``DRIVER``) wraps one function of the harness in the child process and kills when it is reached. The random-time
campaign on the smoke suite is benchmarks/kill_campaign.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MICRO

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("kill_campaign", REPO / "benchmarks" / "kill_campaign.py")
kill_campaign = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kill_campaign)

# one worker under pytest-xdist (--dist loadgroup): the module's uninterrupted run is made once, not once per worker
pytestmark = pytest.mark.xdist_group("run-integrity")

SETS = ["compute.ladder=[5.0e10,1.0e11]", "compute.stage1.train_flops=3.0e11", "evaluation.num_samples=32",
        "evaluation.kid_subset_size=16", "evaluation.num_reconstructions=16", "dataset.split=test"]
KILL_AT_STEP = 25  # stage 2 runs 0 -> 18 (rung b0) -> 35 (rung b1), checkpoints every 10 and at rung ends

# The child process: wraps one harness function so that reaching KILL_AT sends SIGKILL to the process itself.
DRIVER = r"""
import contextlib, os, signal, sys
from pathlib import Path

def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)

point = os.environ["KILL_AT"]
if point.startswith("train:"):  # stage 2, just before the batch of this step (between two checkpoints)
    from ulbench.methods import base, ul
    step, stage = int(point.split(":")[1]), {}
    train, batches = ul.ULRunner.train, base.RunnerBase.batches
    def tracked_train(self, name, *args, **kwargs):
        stage["now"] = name
        return train(self, name, *args, **kwargs)
    def killing_batches(self, dataset, tcfg):
        make = batches(self, dataset, tcfg)
        def from_step(start):
            for i, batch in enumerate(make(start)):
                if stage.get("now") == "stage2" and start + i == step:
                    die()
                yield batch
        return from_step
    ul.ULRunner.train, base.RunnerBase.batches = tracked_train, killing_batches
elif point == "evaluate":  # the first Inception pass over generated samples (rung b0: samples stored, rows not)
    from ulbench.metrics.fid import ImageEvaluator
    def killing_set_stats(self, *args, **kwargs):
        die()
    ImageEvaluator.set_stats = killing_set_stats
elif point.startswith("results:"):  # inside the atomic write of results.jsonl for the n-th point, before its rename
    import ulbench.run.results as results
    atomic_write, calls = results.atomic_write, []
    @contextlib.contextmanager
    def killing_atomic_write(path, *args, **kwargs):
        with atomic_write(path, *args, **kwargs) as f:
            yield f
            if Path(path).name == "results.jsonl":
                calls.append(path)
                if len(calls) == int(point.split(":")[1]):
                    f.flush()
                    die()
    results.atomic_write = killing_atomic_write
from ulbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _sets() -> list[str]:
    return [a for s in SETS for a in ("--set", s)]


def _ulbench(args: list[str], cwd: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = _env() | ({"KILL_AT": kill_at} if kill_at else {})
    cmd = [sys.executable, "-c", DRIVER, *args] if kill_at else [sys.executable, "-m", "ulbench.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("integrity")
    (folder / "micro.yaml").write_text(MICRO)
    return folder


@pytest.fixture(scope="module")
def uninterrupted(suite_dir) -> Path:
    """The reduced micro suite run once without a kill, in a subprocess under one thread, like the killed runs."""
    r = _ulbench(["run", "micro.yaml", "--runs-dir", "runs", "--name", "clean", "--no-progress", *_sets()], suite_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    return suite_dir / "runs" / "micro" / "clean"


def _killed(suite_dir: Path, name: str, kill_at: str) -> Path:
    r = _ulbench(["run", "micro.yaml", "--runs-dir", "runs", "--name", name, "--no-progress", *_sets()], suite_dir,
                 kill_at)
    assert r.returncode == -signal.SIGKILL, f"not killed at {kill_at} (exit {r.returncode}):\n{r.stderr[-3000:]}"
    return suite_dir / "runs" / "micro" / name


def _resume(run: Path, cwd: Path) -> list[dict]:
    r = _ulbench(["run", "--resume", str(run), "--no-progress"], cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return kill_campaign.read_rows(run)


def _assert_same_results(uninterrupted: Path, rows: list[dict]) -> None:
    c = kill_campaign.compare_rows(kill_campaign.read_rows(uninterrupted), rows)
    assert c["rows"] == c["reference_rows"] == 2 + 2 * 2  # stage1: psnr, bits/pixel; b0, b1: fid, kid
    assert not c["lost"] and not c["duplicated"] and not c["added"], c
    assert not c["differing"], c["differing"]


def _points(rows: list[dict]) -> set[str]:
    return {r["point"] for r in rows}


@pytest.mark.slow
def test_killed_during_training_resumes_to_the_same_results(suite_dir, uninterrupted, tmp_path):
    run = _killed(suite_dir, "train", f"train:{KILL_AT_STEP}")
    # killed in rung b1's training, between the checkpoints of steps 20 and 30: stage 1 and b0 are stored
    assert _points(kill_campaign.read_rows(run)) == {"stage1", "b0"}
    assert json.loads((run / "methods/ul/stage2/latest.json").read_text())["step"] == 20
    # resumed from another working directory (the run keeps its suite and paths absolute)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _assert_same_results(uninterrupted, _resume(run.resolve(), elsewhere))


@pytest.mark.slow
def test_killed_during_evaluation_resumes_to_the_same_results(suite_dir, uninterrupted):
    run = _killed(suite_dir, "evaluate", "evaluate")
    assert _points(kill_campaign.read_rows(run)) == {"stage1"}
    assert (run / "methods/ul/points/b0/samples_g1.npz").is_file()  # sampled, not yet scored
    _assert_same_results(uninterrupted, _resume(run, suite_dir))


@pytest.mark.slow
def test_killed_while_writing_results_resumes_to_the_same_results(suite_dir, uninterrupted, tmp_path):
    run = _killed(suite_dir, "results", "results:1")
    # stage 1's rows (the first point) were in the temp file, never renamed over results.jsonl
    assert not (run / "results.jsonl").exists() and list(run.glob(".results.jsonl.*.tmp"))
    # the suite file is edited after the start: the run goes on with its own copy of the suite it started with
    suite = suite_dir / "micro.yaml"
    original = suite.read_text()
    try:
        edited = original.replace("sampler: {method: ancestral, steps: 8,", "sampler: {method: ancestral, steps: 6,")
        assert edited != original
        suite.write_text(edited)
        rows = _resume(run, suite_dir)
    finally:
        suite.write_text(original)
    _assert_same_results(uninterrupted, rows)


@pytest.mark.slow
def test_reconstruct_reopens_the_dataset_the_sweep_trained_on(suite_dir, uninterrupted, tmp_path):
    """A sweep's stage records its dataset section (here the photos' test split); `ulbench reconstruct` reads
    those images, not the train split that the spec 'photos' alone would give."""
    from PIL import Image

    from ulbench.data import load_suite_dataset
    from ulbench.data.base import to_float, to_uint8
    from ulbench.suite import load_suite

    stage1 = uninterrupted / "methods/ul/stage1"
    r = _ulbench(["reconstruct", "--run", str(stage1), "--n", "4", "--out", str(tmp_path / "rec"), "--device", "cpu",
                  "--steps", "2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    suite = load_suite(suite_dir / "micro.yaml", SETS)
    x = next(load_suite_dataset(suite).batches(4, 4))[0]
    expected = to_uint8(to_float(x)).permute(0, 2, 3, 1).numpy()
    got = np.stack([np.asarray(Image.open(tmp_path / "rec" / "originals" / f"{i:06d}.png")) for i in range(4)])
    assert np.array_equal(got, expected)
    recorded = json.loads((stage1 / "config.json").read_text())["data"]
    assert recorded["suite_dataset"]["split"] == "test" and recorded["suite_dataset"]["subset"] == 512

    # a stage whose config records no dataset is refused, naming the file and --data; nothing is read from here
    broken = tmp_path / "stage1"
    broken.mkdir()
    for p in stage1.iterdir():
        (broken / p.name).symlink_to(p)
    (broken / "config.json").unlink()
    meta = json.loads((stage1 / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**meta, "data": {"spec": ""}}))
    r = _ulbench(["reconstruct", "--run", str(broken), "--n", "2", "--out", str(tmp_path / "rec2"), "--device", "cpu"],
                 tmp_path)
    assert r.returncode == 2 and "records no dataset" in r.stderr and "--data" in r.stderr
    assert str(broken / "config.json") in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "rec2").exists()


def test_the_comparison_sees_lost_duplicated_added_and_changed_rows():
    """The campaign's comparison (used above) is able to fail."""
    row = {"method": "m", "point": "b0", "metric": "fid32", "guidance": 1.0, "value": 10.0, "ci95": [9.0, 11.0],
           "std": None, "n": 32, "steps": {"stage2": 18}, "fingerprint": {"id": "f"}}
    other = {**row, "point": "b1"}
    assert kill_campaign.clean(kill_campaign.compare_rows([row, other], [other, row]))
    c = kill_campaign.compare_rows([row, other], [row, row, {**row, "point": "b2"}])
    assert c["lost"] == [["m", "b1", "fid32", 1.0]] and c["duplicated"] == [["m", "b0", "fid32", 1.0, 2]]
    assert c["added"] == [["m", "b2", "fid32", 1.0]]
    changed = [{**row, "value": 10.0 + 1e-9}, {**other, "ci95": [9.0, 11.5], "fingerprint": {"id": "g"}}]
    c = kill_campaign.compare_rows([row, other], changed)
    assert sorted((d["key"][1], d["field"]) for d in c["differing"]) == [("b0", "value"), ("b1", "ci95"),
                                                                         ("b1", "fingerprint")]
    assert not kill_campaign.compare_rows([row], [{**row, "value": 10.0 + 1e-9}], rel=1e-6)["differing"]
    nan = {**row, "value": float("nan")}
    assert kill_campaign.compare_rows([nan], [nan])["differing"]  # NaN is never a result to agree on


def test_run_keeps_every_file_path_absolute(tmp_path, monkeypatch):
    """A run resumed (or a SLURM job started) in another directory reads the same files: the dataset, the reference,
    the DINOv2 weights and the file overrides of a method kind are stored absolute; a release name stays a name."""
    from ulbench.run.directory import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    (tmp_path / "vae").mkdir()
    resolved = {"dataset": {"path": "data"}, "evaluation": {"reference": "ref.npz", "dinov2_weights": "d.pth"},
                "methods": [{"kind": "dit", "overrides": {"checkpoint": "ckpt.pt", "vae": {"pretrained": "vae"}}},
                            {"kind": "dit", "overrides": {"vae": {"pretrained": "sd-vae-ft-ema"}}},
                            {"kind": "ul", "overrides": {}}]}
    out = absolute_paths(resolved)
    assert out["dataset"]["path"] == str(tmp_path / "data")
    assert out["evaluation"]["reference"] == str(tmp_path / "ref.npz")
    assert out["evaluation"]["dinov2_weights"] == str(tmp_path / "d.pth")
    assert out["methods"][0]["overrides"] == {"checkpoint": str(tmp_path / "ckpt.pt"),
                                              "vae": {"pretrained": str(tmp_path / "vae")}}
    assert out["methods"][1]["overrides"] == {"vae": {"pretrained": "sd-vae-ft-ema"}}
    assert resolved["methods"][0]["overrides"]["checkpoint"] == "ckpt.pt"  # the input is not changed
