"""Training integrity (issue 13): non-finite steps are skipped, counted and stopped at a limit, never checkpointed;
metrics.jsonl survives kills; old checkpoints are pruned (rung ends kept) without breaking bit-exact resume; a full
disk leaves nothing half-written and reaches the user as one paragraph."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ul_model.io
from ul_model.io import DiskFullError, append_line, atomic_bytes
from ul_model.train import TrainConfig, prune_checkpoints, save_checkpoint, train

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get(
    "PYTHONPATH"))))}
CFG = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1, checkpoint_every=1, ema_decay=0.5,
                  keep_checkpoints=0)


def _batches(start: int, steps: int = 12):
    """Batch s: fixed inputs and the step index (so a loss can misbehave at a chosen step)."""
    for s in range(start, steps):
        g = torch.Generator().manual_seed(s)
        yield torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g), torch.full((4,), s + 1)


def _loss(nan_at: dict[int, str] | None = None):
    """Squared error (``loss``) and its square root (``rmse``, logged only); at 1-based step s, ``nan_at[s]`` names
    the term that becomes NaN."""
    nan_at = nan_at or {}

    def loss_fn(net, b):
        err = (net(b[0]) - b[1]).pow(2).mean(1)
        terms = {"loss": err, "rmse": err.detach().sqrt()}
        bad = nan_at.get(int(b[2][0]))
        if bad:
            terms[bad] = terms[bad] * float("nan")
        return terms

    return loss_fn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 1)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _checkpoint(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = run / f"checkpoint-{step:08d}"
    return {f.stem: load_file(str(f)) for f in ckpt.glob("*.safetensors")}


def _all_finite(run: Path) -> bool:
    return all(torch.isfinite(t).all() for ckpt in run.glob("checkpoint-*") for f in ckpt.glob("*.safetensors")
               for t in load_file(str(f)).values())


def _checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))


# --- non-finite steps --------------------------------------------------------------------------------------------

def test_a_nan_loss_step_is_skipped_counted_and_never_checkpointed(tmp_path):
    train(_model(), _loss({3: "loss"}), _batches, CFG, tmp_path, progress=False)
    before, at = _checkpoint(tmp_path, 2), _checkpoint(tmp_path, 3)
    for name in ("weights", "ema"):  # step 3 changed neither the weights nor the average
        assert all(torch.equal(before[name][k], at[name][k]) for k in before[name]), name
    after = _checkpoint(tmp_path, 4)
    assert not torch.equal(after["weights"]["weight"], at["weights"]["weight"])  # training went on
    rows = _rows(tmp_path)
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert rows[2]["loss"] is None and rows[2]["grad_norm"] is None and rows[3]["loss"] is not None
    assert _all_finite(tmp_path)


def test_a_nan_in_a_logged_term_alone_also_skips_the_step(tmp_path):
    train(_model(), _loss({2: "rmse"}), _batches, dataclasses.replace(CFG, steps=3), tmp_path, progress=False)
    assert torch.equal(_checkpoint(tmp_path, 1)["weights"]["weight"], _checkpoint(tmp_path, 2)["weights"]["weight"])
    assert _rows(tmp_path)[1]["nonfinite_steps"] == 1


def test_past_the_limit_the_run_stops_naming_step_and_term(tmp_path):
    cfg = dataclasses.replace(CFG, max_nonfinite_steps=0)
    with pytest.raises(FloatingPointError, match=r"step 3: non-finite rmse \(NaN"):
        train(_model(), _loss({3: "rmse"}), _batches, cfg, tmp_path / "a", progress=False)
    with pytest.raises(FloatingPointError, match=r"step 3: non-finite loss, grad_norm \(NaN"):
        train(_model(), _loss({3: "loss"}), _batches, cfg, tmp_path / "b", progress=False)
    for run in (tmp_path / "a", tmp_path / "b"):
        assert json.loads((run / "latest.json").read_text())["step"] == 2 and _all_finite(run)


def test_the_count_survives_resume_and_a_skipping_run_resumes_bit_for_bit(tmp_path):
    cfg = dataclasses.replace(CFG, max_nonfinite_steps=1)
    loss_fn = _loss({2: "loss", 5: "loss"})
    with pytest.raises(FloatingPointError, match=r"step 5: non-finite loss.*2 non-finite step"):
        train(_model(), loss_fn, _batches, cfg, tmp_path / "straight", progress=False)
    train(_model(), loss_fn, _batches, dataclasses.replace(cfg, steps=3), tmp_path / "split", progress=False)
    with pytest.raises(FloatingPointError, match=r"step 5: non-finite loss.*2 non-finite step"):
        train(_model(), loss_fn, _batches, cfg, tmp_path / "split", resume=True, progress=False)
    a, b = _checkpoint(tmp_path / "straight", 4), _checkpoint(tmp_path / "split", 4)
    assert all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    logged = [[(r["step"], r["loss"], r["grad_norm"], r["nonfinite_steps"]) for r in _rows(tmp_path / run)]
              for run in ("straight", "split")]
    assert logged[0] == logged[1] and [r[3] for r in logged[0]] == [0, 1, 1, 1]


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    from ul_model.ema import make_ema

    model = _model()
    ema = make_ema(model, 0.9)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, ema, opt, 1)
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"checkpoint-00000002: not written.*weights/weight"):
        save_checkpoint(tmp_path, model, ema, opt, 2)
    assert _checkpoint_steps(tmp_path) == [1] and json.loads((tmp_path / "latest.json").read_text())["step"] == 1


DDP_WORKER = """
import json, sys, torch
from torch import nn
from ul_model.train import TrainConfig, distributed, train
torch.set_num_threads(1)
rank, world = distributed()
torch.manual_seed(0)
model = nn.Linear(3, 1)
def batches(start):
    for s in range(start, 4):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)
        yield x[rank * 2:(rank + 1) * 2], y[rank * 2:(rank + 1) * 2], torch.full((2,), s + 1)
def loss_fn(net, b):
    err = (net(b[0]) - b[1]).pow(2).mean(1)
    nan = int(b[2][0]) == 2 and rank == 1  # only rank 1 sees a NaN, in a logged term
    return {"loss": err, "rmse": err.detach().sqrt() * (float("nan") if nan else 1.0)}
cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1, checkpoint_every=0)
log = train(model, loss_fn, batches, cfg, sys.argv[1], progress=False)
torch.save(model.state_dict(), f"{sys.argv[1]}/final-{rank}.pt")
if rank == 0:
    json.dump(log, open(f"{sys.argv[1]}/log.json", "w"))
"""


def test_ddp_ranks_skip_a_step_together_when_one_rank_sees_a_nan(tmp_path):
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        str(tmp_path / "worker.py"), str(tmp_path)], capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"final-{i}.pt") for i in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same decision on both ranks: the same weights
    log = json.loads((tmp_path / "log.json").read_text())
    assert [row["nonfinite_steps"] for row in log] == [0, 1, 1, 1] and log[1]["rmse"] is None


# --- metrics.jsonl -----------------------------------------------------------------------------------------------

def test_a_torn_last_metrics_line_does_not_break_resume(tmp_path):
    train(_model(), _loss(), _batches, CFG, tmp_path / "straight", progress=False)
    split = tmp_path / "split"
    train(_model(), _loss(), _batches, dataclasses.replace(CFG, steps=3), split, progress=False)
    with open(split / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lr": 0.0')  # killed while writing the row after its last checkpoint
    train(_model(), _loss(), _batches, CFG, split, resume=True, progress=False)
    rows = _rows(split)  # every line decodes
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in _rows(tmp_path / "straight")]


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    train(_model(), _loss(), _batches, dataclasses.replace(CFG, steps=3, checkpoint_every=0), tmp_path,
          progress=False)  # no checkpoint: as if killed before the first one
    assert not (tmp_path / "latest.json").exists() and len(_rows(tmp_path)) == 3
    train(_model(), _loss(), _batches, dataclasses.replace(CFG, steps=3), tmp_path, resume=True, progress=False)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]


def test_rows_past_the_resumed_checkpoint_and_garbage_are_dropped(tmp_path):
    train(_model(), _loss(), _batches, dataclasses.replace(CFG, steps=4, checkpoint_every=2), tmp_path,
          progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join([*lines[:2], "\x00garbage", *lines[2:]]) + "\n")
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "checkpoint-00000002", "step": 2}))
    train(_model(), _loss(), _batches, dataclasses.replace(CFG, steps=4, checkpoint_every=2), tmp_path, resume=True,
          progress=False)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]


# --- checkpoint pruning ------------------------------------------------------------------------------------------

def test_old_checkpoints_are_pruned_keeping_the_last_k_and_keep_steps_and_resume_is_bit_exact(tmp_path):
    cfg = dataclasses.replace(CFG, keep_checkpoints=2, keep_steps=(3,))
    train(_model(), _loss(), _batches, cfg, tmp_path / "straight", progress=False)
    train(_model(), _loss(), _batches, dataclasses.replace(cfg, steps=4), tmp_path / "split", progress=False)
    assert _checkpoint_steps(tmp_path / "split") == [3, 4]
    train(_model(), _loss(), _batches, cfg, tmp_path / "split", resume=True, progress=False)
    for run in ("straight", "split"):
        assert _checkpoint_steps(tmp_path / run) == [3, 5, 6], run
        assert not list((tmp_path / run).glob(".deleting-*"))
    a, b = _checkpoint(tmp_path / "straight", 6), _checkpoint(tmp_path / "split", 6)
    assert sorted(a) == ["ema", "weights"] and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    sa, sb = (torch.load(tmp_path / r / "checkpoint-00000006" / "state.pt") for r in ("straight", "split"))
    assert all(torch.equal(sa["optimizer"]["state"][0][k], sb["optimizer"]["state"][0][k]) for k in ("exp_avg",
                                                                                                      "exp_avg_sq"))


def test_pruning_never_deletes_the_latest_nor_checkpoints_past_it(tmp_path):
    for s in range(1, 6):
        (tmp_path / f"checkpoint-{s:08d}").mkdir()
    (tmp_path / ".deleting-checkpoint-00000000").mkdir()  # a deletion that a kill interrupted
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "checkpoint-00000003", "step": 3}))
    prune_checkpoints(tmp_path, 1)
    assert _checkpoint_steps(tmp_path) == [3, 4, 5] and not list(tmp_path.glob(".deleting-*"))
    prune_checkpoints(tmp_path, 0)  # keep all
    assert _checkpoint_steps(tmp_path) == [3, 4, 5]


def test_suites_accept_keep_checkpoints_and_the_sweep_keeps_rung_ends(tmp_path, monkeypatch):
    from ulbench.run import sweep
    from ulbench.methods.base import stage_train_config
    from ulbench.suite import load_suite

    # psnr only: the fake kind below reconstructs nothing, so run_method trains and evaluates nothing itself
    suite = load_suite(str(ROOT / "suites" / "smoke.yaml"),
                       ["methods.0.train.stage2.keep_checkpoints=3", "evaluation.metrics=[psnr]"])
    assert suite.methods[0].train["stage2"]["keep_checkpoints"] == 3

    seen = {}

    class Kind:
        reconstructs = False

        def runner(self, config, train, *args):
            seen["train"] = train
            return SimpleNamespace(train=lambda stage, steps, resume: None)

    monkeypatch.setattr(sweep, "get_kind", lambda name: Kind())
    plan = SimpleNamespace(kind="ul", name="ul", config=None, stage1_steps=7, final_stage="stage2", official=None,
                           rung_steps=[10, 20, 40], train={"stage1": {"keep_checkpoints": 2, "keep_steps": []},
                                                           "stage2": {"keep_checkpoints": 3, "keep_steps": [15]}})
    runs = sweep.Sweep.__new__(sweep.Sweep)  # what run_method reads of a Sweep, without loading the dataset
    runs.suite, runs.run_dir, runs.device, runs.progress, runs.data = suite, tmp_path, "cpu", False, None
    runs.run_method(plan)
    cfg = stage_train_config(seen["train"], "stage2", 40, "fp32")
    assert cfg.keep_steps == (10, 15, 20, 40) and cfg.keep_checkpoints == 3
    assert stage_train_config(seen["train"], "stage1", 7, "fp32").keep_steps == (7,)


# --- full disk ---------------------------------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_the_previous_file_and_names_file_and_bytes(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    atomic_bytes(target, b"old")
    monkeypatch.setattr(ul_model.io.os, "fsync", _enospc)
    with pytest.raises(DiskFullError) as e:
        atomic_bytes(target, b"x" * 5000)
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    message = str(e.value)
    assert str(target) in message and "5000 bytes to write" in message and "free there" in message
    assert "\n" not in message and "Free space" in message
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_full_disk_mid_append_leaves_no_partial_line(tmp_path, monkeypatch):
    journal = tmp_path / "metrics.jsonl"
    append_line(journal, '{"step": 1}')
    real_write = os.write

    def write_some(fd, data):  # part of the row lands, then the disk is full
        real_write(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ul_model.io.os, "write", write_some)
    with pytest.raises(DiskFullError, match="metrics.jsonl: no space left"):
        append_line(journal, '{"step": 2}')
    assert journal.read_text() == '{"step": 1}\n'


def test_a_full_disk_during_a_checkpoint_removes_it_and_keeps_the_previous(tmp_path, monkeypatch):
    cfg = dataclasses.replace(CFG, steps=3)
    train(_model(), _loss(), _batches, dataclasses.replace(cfg, steps=2), tmp_path, progress=False)
    real_replace = os.replace

    def full_on_state(src, dst):
        if str(dst).endswith("state.pt"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_replace(src, dst)

    monkeypatch.setattr(ul_model.io.os, "replace", full_on_state)
    with pytest.raises(DiskFullError, match=r"state.pt: disk quota exceeded .* to write for the whole checkpoint"):
        train(_model(), _loss(), _batches, cfg, tmp_path, resume=True, progress=False)
    monkeypatch.undo()
    assert _checkpoint_steps(tmp_path) == [1, 2] and not list(tmp_path.rglob("*.tmp"))
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2


CLI_FULL_DISK = """
import errno, os, sys
real_fsync = os.fsync
def fsync(fd):  # the disk fills up when the first checkpoint's weights are written
    if "weights.safetensors" in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_fsync(fd)
os.fsync = fsync
from ulbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the file being written")
def test_the_cli_reports_a_full_disk_in_one_paragraph_with_exit_2(tmp_path):
    out = tmp_path / "s1"
    r = subprocess.run([sys.executable, "-c", CLI_FULL_DISK, "train", "stage1", "--preset", "ul-tiny", "--data",
                        "photos", "--out", str(out), "--steps", "1", "--batch-size", "2", "--warmup", "1",
                        "--checkpoint-every", "1", "--device", "cpu"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("ulbench: error:")]  # one paragraph
    assert len(error) == 1 and "weights.safetensors: no space left on the device" in error[0]
    assert "bytes) to write for the whole checkpoint" in error[0] and re.search(r"\d+ bytes\)? free there", error[0])
    assert not (out / "checkpoint-00000001").exists() and not (out / "latest.json").exists()


def test_the_cli_reports_divergence_in_one_paragraph_with_exit_1(monkeypatch, capsys):
    import ulbench.cli as cli

    def diverged(args):
        raise FloatingPointError("step 7: non-finite loss (NaN or inf); 11 non-finite step(s) in this run")

    monkeypatch.setattr(cli, "cmd_psnr", diverged)  # any command that trains would raise the same way
    assert cli.main(["eval", "psnr", "a", "b"]) == 1
    err = capsys.readouterr().err
    assert "step 7: non-finite loss" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_the_results_store_refuses_a_non_finite_row_and_keeps_the_others(tmp_path, bad):
    from ulbench.run.results import ResultsStore

    store = ResultsStore(tmp_path / "results.jsonl")
    good = {"method": "ul", "point": "b0", "metric": "fid10", "value": 12.5}
    store.add([good])
    before = (tmp_path / "results.jsonl").read_bytes()
    rows = [{**good, "point": "b1"}, {**good, "point": "b1", "metric": "kid10", "value": bad}]
    with pytest.raises(FloatingPointError, match=r"ul b1 kid10 = (nan|inf)"):
        store.add(rows)
    assert (tmp_path / "results.jsonl").read_bytes() == before  # the point's rows are stored together or not at all
    assert not ResultsStore(tmp_path / "results.jsonl").done("ul", "b1")  # --resume evaluates it again
