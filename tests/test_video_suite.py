"""Clip suites end to end on real clips: the schema (located errors), every clip source as a training set, the
frame-prediction protocol (per-frame PSNR closed form, controls, given frames kept in the stored predictions, FVD
rows and fingerprints), resume, report and check; `ulbench train --data clips`."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from ulbench.errors import UserError
from ulbench.suite import SuiteError, load_suite
from ulbench.run.video_eval import PSNR_CAP_DB, evaluation_indices, psnr_per_frame

SUITES = Path(__file__).resolve().parent.parent / "suites"
# The video-smoke suite shrunk to a test: 8 clips, a few training steps, 4 sampling steps.
MICRO_SETS = ["evaluation.num_samples=8", "evaluation.num_reconstructions=8", "compute.stage1.train_flops=3e10",
              "compute.ladder=[3e9, 6e9]", "evaluation.sampler.steps=3", "evaluation.sampler.decoder_steps=3",
              "methods.0.train.stage1.batch_size=2", "methods.0.train.stage2.batch_size=4",
              "methods.0.train.stage1.checkpoint_every=0", "methods.0.train.stage2.checkpoint_every=0"]


def test_both_clip_suites_validate_and_dry_run():
    for name in ("video-smoke", "kinetics600"):
        r = run_cli("run", str(SUITES / f"{name}.yaml"), "--dry-run", "--no-timing")
        assert r.returncode == 0, r.stderr
    r = run_cli("run", str(SUITES / "kinetics600.yaml"), "--dry-run", "--no-timing", "--gpu", "h100", "--gpus", "64")
    assert r.returncode == 0, r.stderr
    # evaluation: the context encoding, base model and decoder calls, and I3D (not Inception) per clip
    assert "encoder (context) 1 x" in r.stdout and "I3D 1 x" in r.stdout and "Inception" not in r.stdout
    assert "I3D on 150000 dataset clips (2 controls included)" in r.stdout
    k600 = load_suite(SUITES / "kinetics600.yaml")
    assert k600.dataset.frames == 16 and k600.dataset.resolution == 128
    assert k600.evaluation.dataset.path.endswith("k600-val-16x128") and k600.evaluation.dataset.frames == 16
    assert {m.preset for m in k600.methods} == {"video-ul-small", "video-ul-medium"}
    assert load_suite(SUITES / "video-smoke.yaml").evaluation.metrics[0] == "fvd"


@pytest.mark.parametrize("sets, where, says", [
    (["methods.0.preset=ul-tiny"], "methods[0].preset", "models images"),
    (["evaluation.metrics=[fid]"], "evaluation.metrics[0]", "not defined on clips"),
    (["dataset.name=kinetics", "dataset.path=/x"], "dataset.annotations", "annotation CSV"),
    (["dataset.frames=1"], "dataset.frames", ">= 2"),
    (["evaluation.dataset={frames: 8}"], "evaluation.dataset.frames", "unknown key"),
])
def test_clip_suite_errors_name_the_key(sets, where, says):
    with pytest.raises(SuiteError) as e:
        load_suite(SUITES / "video-smoke.yaml", sets)
    assert where in str(e.value) and says in str(e.value)


def test_image_suites_refuse_clip_keys_and_metrics():
    with pytest.raises(SuiteError, match=r"dataset\.frames: only for clip datasets"):
        load_suite(SUITES / "smoke.yaml", ["dataset.frames=16"])
    with pytest.raises(SuiteError, match=r"evaluation\.metrics\[0\]: 'fvd' is not defined on images"):
        load_suite(SUITES / "smoke.yaml", ["evaluation.metrics=[fvd]"])
    r = run_cli("validate", str(SUITES / "smoke.yaml"), "--set", "methods.0.preset=video-ul-tiny")
    assert r.returncode == 2 and "clips of 16 frames" in r.stderr and "Traceback" not in r.stderr


def test_per_frame_psnr_closed_form_and_cap():
    rng = np.random.default_rng(0)
    a = rng.integers(10, 240, (2, 3, 4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 1] += 5  # one frame off by 5 everywhere: MSE 25
    p = psnr_per_frame(a, b)
    assert p.shape == (2, 3)
    assert p[0, 1] == pytest.approx(10 * np.log10(255**2 / 25))
    assert (np.delete(p.ravel(), 1) == PSNR_CAP_DB).all()  # identical frames: the cap, never +inf
    assert evaluation_indices(4, 143) == [0, 35, 71, 107]


@pytest.fixture(scope="module")
def clip_sources(tmp_path_factory):
    """The bundled clips as each source a suite can name: prepared clip shards, a video folder, an .npz array."""
    import shutil

    from ulbench.data.prepared_video import prepare_clips
    from ulbench.data.video import ClipSampling, VideoDataset, bundled_clips, bundled_clips_dir

    root = tmp_path_factory.mktemp("clip-sources")
    sampling = ClipSampling(frames=16, resolution=32)
    ds = VideoDataset(bundled_clips(), sampling, clips_per_video=None, hop=32)
    prepare_clips(ds, root / "prepared", shard_size=5, progress=False)
    (root / "videos" / "a").mkdir(parents=True)
    shutil.copy(bundled_clips_dir() / "carphone_pristine.mp4", root / "videos" / "a" / "x.mp4")
    first = np.stack([ds[i][0].permute(1, 2, 3, 0).numpy() for i in range(6)])  # (N, T, H, W, C)
    np.savez(root / "clips.npz", first)
    return root, ds


@pytest.mark.parametrize("name", ["prepared-clips", "videos", "clip-array"])
def test_every_clip_source_loads_as_a_suite_dataset(clip_sources, name):
    import torch

    from ulbench.data import load_suite_dataset

    root, ds = clip_sources
    path = {"prepared-clips": root / "prepared", "videos": root / "videos", "clip-array": root / "clips.npz"}[name]
    suite = load_suite(SUITES / "video-smoke.yaml", [f"dataset.name={name}", f"dataset.path={path}", "dataset.hop=32"])
    loaded = load_suite_dataset(suite)
    x, label = loaded[0]
    assert x.shape == (3, 16, 32, 32) and label == 0  # unconditional suite: one label
    if name != "videos":  # the first clip of the bundled set, exactly
        assert torch.equal(x, ds[0][0])
    assert len(loaded) == {"prepared-clips": len(ds), "videos": 4, "clip-array": 6}[name]  # 120 frames: 4 windows
    assert loaded.fingerprint() == load_suite_dataset(suite).fingerprint()


@pytest.mark.slow
def test_train_stage1_and_stage2_cli_on_clips(tmp_path):
    common = ["--steps", "2", "--batch-size", "2", "--warmup", "1", "--log-every", "1", "--checkpoint-every", "2"]
    r = run_cli("train", "stage1", "--preset", "video-ul-tiny", "--data", "clips", "--out", str(tmp_path / "s1"),
                *common)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "s1" / "config.json").read_text())
    assert meta["model"]["frames"] == 16 and meta["data"]["n"] == 143
    r = run_cli("train", "stage2", "--stage1", str(tmp_path / "s1"), "--out", str(tmp_path / "s2"), *common)
    assert r.returncode == 0, r.stderr
    bad = run_cli("sample", "--run", str(tmp_path / "s2"), "--n", "1", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "video run" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("train", "stage1", "--preset", "video-ul-tiny", "--data", str(tmp_path / "none"),
                  "--out", str(tmp_path / "s3"), *common)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    from ulbench.run.directory import start_run

    runs = tmp_path_factory.mktemp("video-runs")
    run = start_run(str(SUITES / "video-smoke.yaml"), MICRO_SETS, runs, "micro", progress=False)
    return run


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.xdist_group("video-run")  # one worker builds the module's run once
def test_video_sweep_rows_controls_and_given_frames(video_run):
    from ulbench.io import open_npz_array

    rows = _rows(video_run)
    got = {(r["method"], r["point"], r["metric"]) for r in rows}
    for control in ("last-frame", "other-clips"):
        assert {(control, "control", "fvd8"), (control, "control", "pred_psnr")} <= got
    assert {("ul", "stage1", m) for m in ("rfvd8", "psnr", "bits_per_pixel", "bits_per_frame")} <= got
    assert {("ul", p, m) for p in ("b0", "b1") for m in ("fvd8", "pred_psnr")} <= got
    for r in rows:
        assert np.isfinite(r["value"]), r
    fvd = [r for r in rows if r["metric_base"] == "fvd"]
    assert len({r["fingerprint"]["id"] for r in fvd}) == 1  # one protocol for the controls and every rung
    assert fvd[0]["fingerprint"]["context_frames"] == 5 and fvd[0]["fingerprint"]["n"] == 8
    by = {(r["method"], r["point"], r["metric"]): r for r in rows}
    assert len(by[("ul", "b0", "pred_psnr")]["per_frame"]) == 11  # frames 6..16
    last = by[("last-frame", "control", "pred_psnr")]["per_frame"]
    assert last[0] > last[-1]  # the repeated frame drifts away from the truth
    bpf = by[("ul", "stage1", "bits_per_frame")]["value"] / by[("ul", "stage1", "bits_per_pixel")]["value"]
    assert bpf == pytest.approx(32 * 32)
    real = open_npz_array(video_run / "evaluation" / "real_8.npz")
    pred = open_npz_array(video_run / "methods" / "ul" / "points" / "b1" / "predictions_g1.npz")
    assert pred.shape == real.shape == (8, 16, 32, 32, 3)
    assert np.array_equal(pred[:, :5], real[:, :5])  # the 5 given frames, exactly
    assert not np.array_equal(pred[:, 5:], real[:, 5:])
    control = open_npz_array(video_run / "evaluation" / "control_last-frame.npz")
    assert np.array_equal(control[:, 5:], np.repeat(real[:, 4:5], 11, axis=1))


@pytest.mark.xdist_group("video-run")
def test_video_sweep_resumes_reports_and_checks(video_run, tmp_path):
    from ulbench.report.check import write_baseline
    from ulbench.report import write_report
    from ulbench.run.directory import resume_run

    before = (video_run / "results.jsonl").read_bytes()
    resume_run(video_run, progress=False)  # every point stored: nothing is recomputed
    assert (video_run / "results.jsonl").read_bytes() == before
    r = write_report(video_run, tmp_path / "report")
    for name in ("compute_vs_fvd.png", "compute_vs_pred_psnr.png", "psnr_per_frame.png", "rate_vs_quality.png"):
        assert (tmp_path / "report" / name).is_file(), name
    assert any("control last-frame" in d for d in r["published_drawn"])
    assert set(r["plotted"]["point"]) == {"b0", "b1"}
    page = (tmp_path / "report" / "index.html").read_text()
    assert "framed green were given" in page and "grids/ul_b1.png" in page
    write_baseline(video_run, tmp_path / "base.json")
    ok = run_cli("check", str(video_run), "--baseline", str(tmp_path / "base.json"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    base = json.loads((tmp_path / "base.json").read_text())
    for m in base["metrics"]:
        if m["metric_base"] == "pred_psnr" and m["method"] == "ul":
            m["value"] += 5.0  # a regression of 5 dB
    (tmp_path / "worse.json").write_text(json.dumps(base))
    bad = run_cli("check", str(video_run), "--baseline", str(tmp_path / "worse.json"))
    assert bad.returncode == 1 and "pred_psnr" in bad.stdout


def test_too_many_evaluation_clips_is_a_clear_error(tmp_path):
    from ulbench.run.directory import start_run

    with pytest.raises(UserError, match="num_samples: 500 clips asked for"):
        start_run(str(SUITES / "video-smoke.yaml"), [*MICRO_SETS, "evaluation.num_samples=500"], tmp_path, "x",
                  progress=False)


def test_kinetics_clips_in_a_suite_and_in_train(tmp_path):
    """The official CSV + a clip folder: as a suite dataset (skipped videos counted) and as `train --data`."""
    import shutil

    from ulbench.data import load_suite_dataset
    from ulbench.data.video import bundled_clips_dir

    (tmp_path / "clips" / "abseiling").mkdir(parents=True)
    shutil.copy(bundled_clips_dir() / "carphone_pristine.mp4", tmp_path / "clips" / "abseiling" / "a_000010_000020.mp4")
    shutil.copy(bundled_clips_dir() / "bikes.mp4", tmp_path / "clips" / "b_000000_000010.mp4")
    (tmp_path / "clips" / "d_000003_000013.mp4").write_bytes(b"")
    (tmp_path / "validate.csv").write_text("label,youtube_id,time_start,time_end,split\nabseiling,a,10,20,validate\n"
                                           "zumba,b,0,10,val\nzumba,c,5,15,val\nzumba,d,3,13,val\n")
    suite = load_suite(SUITES / "video-smoke.yaml", ["dataset.name=kinetics", f"dataset.path={tmp_path / 'clips'}",
                                                     f"dataset.annotations={tmp_path / 'validate.csv'}",
                                                     "dataset.split=validate", "dataset.clips_per_video=2"])
    assert suite.dataset.split == "val"
    ds = load_suite_dataset(suite)
    assert len(ds) == 4 and ds.skipped == {"missing": ["c_000005_000015.mp4"], "empty": ["d_000003_000013.mp4"],
                                           "unreadable": [], "too_short": []}
    r = run_cli("train", "stage1", "--preset", "video-ul-tiny", "--data", str(tmp_path / "clips"), "--kinetics-csv",
                str(tmp_path / "validate.csv"), "--split", "val", "--out", str(tmp_path / "s1"), "--steps", "1",
                "--batch-size", "2", "--warmup", "1", "--log-every", "1", "--checkpoint-every", "1")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "s1" / "config.json").read_text())
    assert meta["data"]["n"] == 7 + 15 and meta["data"]["name"] == "kinetics:validate"  # every window: 120, 250 frames
