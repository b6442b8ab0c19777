"""Video clips for FVD: read fixed-length uint8 clips from video files (decord) or from an ``.npz`` array.

Clip sampling is part of the FVD protocol (protocols.md, FVD): ``frames`` frames, ``stride`` apart, starting at
frame ``start``; a video yields up to ``clips_per_video`` consecutive, non-overlapping clips. Videos too short
for one clip are skipped and counted, unreadable files are named in a warning and counted; only "no clip at
all" is an error. Frames are RGB uint8, shaped (T, H, W, C) per clip.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ulbench.errors import UserError
from ulbench.io import open_npz_array

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
DEFAULT_FRAMES = 16  # FVD clip length (protocols.md)
CLIP_NDIM = 5  # (N, T, H, W, C)
RGB_CHANNELS = 3
UINT8_MAX = 255


@dataclass
class ClipSet:
    """Clips read from videos, and what was left out.

    ``clips`` is one uint8 array (N, T, H, W, C) when all clips share a frame size (always, when ``size`` was
    given), else a list of (T, H, W, C) arrays: FVD resizes every frame to 224x224 anyway, so we do not add a
    second resize just to stack them. ``sources`` gives (file, first frame) per clip.
    """

    clips: np.ndarray | list[np.ndarray] | Sequence[np.ndarray]
    sources: list[tuple[str, int]] = field(default_factory=list)
    skipped_short: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    n_videos: int = 0

    def __len__(self) -> int:
        return len(self.clips)


def _list_videos(root: Path, exts: tuple[str, ...]) -> list[Path]:
    """Video files under ``root`` (recursively, sorted for a stable order), or ``root`` itself if it is a file."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise UserError(f"{root}: no such file or folder; pass a video file or a folder of videos")
    exts = tuple(e.lower() for e in exts)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise UserError(f"{root}: no video files found (looked for {', '.join(exts)}, recursively); "
                        f"point at a folder holding videos, or convert them to .mp4")
    return files


def _resize_clip(clip: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, H, W, C) uint8 -> (T, size[0], size[1], C) uint8; torch bilinear, align_corners=False, no antialias."""
    if clip.shape[1:3] == tuple(size):
        return clip
    x = torch.from_numpy(clip).permute(0, 3, 1, 2).float()  # (T, C, H, W)
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=False)
    return x.round().clamp(0, UINT8_MAX).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def probe_video(path: Path) -> tuple[int, float]:
    """Frame count and average fps of a video file. Raises RuntimeError if it is empty or cannot be decoded."""
    import decord  # imported lazily: only video reading needs it

    if path.stat().st_size == 0:
        raise RuntimeError("zero-byte file")
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        n_frames, fps = len(reader), float(reader.get_avg_fps())
    except decord.DECORDError as e:  # not a RuntimeError: callers catch RuntimeError for every decoding failure
        raise RuntimeError(_decord_reason(e)) from None
    if n_frames < 1:
        raise RuntimeError("no video frames")
    return n_frames, fps


def _decord_reason(e: BaseException) -> str:
    """decord's message without its C++ source location: the first line that says something."""
    lines = [ln.split(": ", 1)[-1] if ln.startswith("[") else ln for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def read_frames(path: Path, idx: list[int]) -> np.ndarray:
    """Frames ``idx`` of a video as (T, H, W, C) uint8 RGB; a file that fails to decode (truncated, changed since
    it was probed) is a ``UserError`` naming it."""
    import decord

    try:
        return decord.VideoReader(str(path), num_threads=1).get_batch(idx).asnumpy()
    except (decord.DECORDError, RuntimeError, OSError) as e:
        raise UserError(f"{path}: cannot decode frames {idx[0]}..{idx[-1]} ({_decord_reason(e)}): the video is "
                        "truncated or corrupt. Remove it or re-encode it (e.g. `ffmpeg -i in.mp4 -c:v libx264 "
                        "out.mp4`).") from None


class StreamedClips(Sequence):
    """Clips decoded on demand (index or slice), so a set of any size is never held in memory: (T, H, W, C) uint8
    each, every ``stride``-th frame from each window's first frame, frames resized to ``size`` if given."""

    def __init__(self, windows: list[tuple[Path, int]], frames: int, stride: int, size: tuple[int, int] | None):
        self.windows, self.frames, self.stride, self.size = windows, frames, stride, size

    def __len__(self) -> int:
        return len(self.windows)

    def _clip(self, i: int) -> np.ndarray:
        path, first = self.windows[i]
        idx = list(range(first, first + (self.frames - 1) * self.stride + 1, self.stride))
        clip = read_frames(path, idx)  # (T, H, W, C) uint8 RGB
        return clip if self.size is None else _resize_clip(clip, self.size)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._clip(k) for k in range(*i.indices(len(self)))]
        return self._clip(range(len(self))[i])


def index_video_clips(
    folder_or_file: str | os.PathLike,
    frames: int = DEFAULT_FRAMES,
    stride: int = 1,
    start: int = 0,
    clips_per_video: int = 1,
    exts: tuple[str, ...] = VIDEO_EXTS,
    size: tuple[int, int] | None = None,
) -> ClipSet:
    """The clips ``read_video_clips`` reads, as a ``ClipSet`` whose ``clips`` are ``StreamedClips`` (decoded when
    indexed): every video is probed for its length once; too short and unreadable ones are counted here."""
    if frames < 1 or stride < 1 or start < 0 or clips_per_video < 1:
        raise UserError(f"invalid clip sampling frames={frames}, stride={stride}, start={start}, "
                        f"clips_per_video={clips_per_video}: frames, stride and clips_per_video must be >= 1, "
                        f"start >= 0")
    root = Path(folder_or_file)
    files = _list_videos(root, exts)
    result = ClipSet(clips=[], n_videos=len(files))
    span = (frames - 1) * stride + 1  # frames one clip covers
    windows = []
    for path in files:
        try:
            n_frames, _ = probe_video(path)
        except (RuntimeError, OSError) as e:  # decord raises RuntimeError (DECORDError) on bad input
            warnings.warn(f"{path}: unreadable video, skipped ({str(e).splitlines()[0][:200]})", stacklevel=2)
            result.unreadable.append(str(path))
            continue
        firsts = [start + k * frames * stride for k in range(clips_per_video)]  # consecutive, non-overlapping
        firsts = [f for f in firsts if f + span <= n_frames]
        if not firsts:
            result.skipped_short.append(str(path))
        windows += [(path, f) for f in firsts]
    if not windows:
        named = "".join(f" ({what}: {', '.join(Path(p).name for p in paths[:3])}{', ...' if len(paths) > 3 else ''})"
                        for what, paths in (("unreadable", result.unreadable), ("short", result.skipped_short))
                        if paths)
        raise UserError(
            f"{root}: no clip could be read: {len(files)} video file(s) found, {len(result.unreadable)} unreadable, "
            f"{len(result.skipped_short)} shorter than the {start + span} frames one clip needs{named} "
            f"(start={start}, frames={frames}, stride={stride}). Use longer videos, a smaller start/stride/frames, "
            f"or re-encode unreadable files (e.g. `ffmpeg -i in.mp4 -c:v libx264 out.mp4`)."
        )
    result.clips = StreamedClips(windows, frames, stride, size)
    result.sources = [(str(p), f) for p, f in windows]
    return result


def read_video_clips(
    folder_or_file: str | os.PathLike,
    frames: int = DEFAULT_FRAMES,
    stride: int = 1,
    start: int = 0,
    clips_per_video: int = 1,
    exts: tuple[str, ...] = VIDEO_EXTS,
    size: tuple[int, int] | None = None,
) -> ClipSet:
    """Read clips of ``frames`` frames (every ``stride``-th, from frame ``start``) from a video file or folder into
    memory (small sets; ``index_video_clips`` streams them).

    A video shorter than ``start + (frames - 1) * stride + 1`` frames is listed in ``skipped_short``; one that
    cannot be decoded (zero bytes, corrupt) is named in a warning and listed in ``unreadable``. ``size=(H, W)``
    resizes every frame (bilinear, as ``preprocess_clips``) so that ``clips`` is always one array.
    """
    result = index_video_clips(folder_or_file, frames, stride, start, clips_per_video, exts, size)
    clips = result.clips[:]
    shapes = {c.shape for c in clips}
    result.clips = np.stack(clips) if len(shapes) == 1 else clips
    return result


def load_clip_array(path: str | os.PathLike) -> np.ndarray:
    """Read uint8 clips (N, T, H, W, 3) from an ``.npz`` (``arr_0``, as ``np.savez(path, clips)`` writes it)."""
    from ulbench.metrics.stats import NPZ_READ_ERRORS, read_npz

    fix = "Save clips with `np.savez(path, clips)` where clips is uint8 RGB shaped (N, T, H, W, 3)."
    with read_npz(path, fix) as archive:
        if "arr_0" not in archive.files:
            raise UserError(f"{path}: no array 'arr_0' (found {sorted(archive.files)}). {fix}")
    try:  # a stored (uncompressed) archive is memory-mapped, a compressed one read whole
        clips = open_npz_array(path)
    except (*NPZ_READ_ERRORS, KeyError) as e:  # an object array (refused without pickle), data cut short, ...
        raise UserError(f"{path}: cannot read arr_0 ({type(e).__name__}: {e}). {fix}") from None
    if clips.dtype != np.uint8:
        raise UserError(f"{path}: arr_0 has dtype {clips.dtype}, expected uint8 (0..255). {fix}")
    if clips.ndim != CLIP_NDIM or clips.shape[-1] != RGB_CHANNELS or 0 in clips.shape:
        hint = " It looks channels-first: save clips.transpose(0, 1, 3, 4, 2)." if (
            clips.ndim == CLIP_NDIM and clips.shape[2] == RGB_CHANNELS) else ""
        raise UserError(f"{path}: arr_0 has shape {clips.shape}, expected non-empty (N, T, H, W, 3).{hint} {fix}")
    return clips
