"""Fréchet Video Distance: I3D logits of uint8 clips -> float64 moments -> Fréchet distance (protocols.md, FVD).

Clips -> ``preprocess_clips`` (bilinear to 224x224, [-1, 1]) -> ``I3D`` (400 Kinetics logits, the features) ->
``FeatureStats`` / ``frechet_distance`` from ``ulbench.metrics.stats``, the same statistics code as FID.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ulbench import assets
from ulbench.errors import UserError
from ulbench.metrics.device import eval_device, exact_float32
from ulbench.metrics.i3d import MIN_FRAMES, NUM_CLASSES, load_i3d, preprocess_clips
from ulbench.metrics.stats import FeatureStats, Moments, frechet_distance, is_stats_file
from ulbench.metrics.video import ClipSet, StreamedClips, index_video_clips, load_clip_array

DEFAULT_BATCH_SIZE = 8  # clips per I3D forward; results do not depend on it beyond float tolerance

# Clips: one uint8 (N, T, H, W, C) array/tensor, a list of (T, H, W, C) clips (frame sizes may differ), or a ClipSet.
Clips = np.ndarray | torch.Tensor | Sequence[np.ndarray] | ClipSet


def _as_clip_list(clips: Clips) -> Sequence[np.ndarray | torch.Tensor]:
    """Normalize the accepted clip containers to an indexable sequence of (T, H, W, C) uint8 clips."""
    if isinstance(clips, ClipSet):
        clips = clips.clips
    if isinstance(clips, (np.ndarray, torch.Tensor)) and clips.ndim != 5:
        raise UserError(f"clips must be uint8 shaped (N, T, H, W, 3), got shape {tuple(clips.shape)}")
    if len(clips) == 0:
        raise UserError("no clips to embed: the clip set is empty")
    lengths = {clips.frames} if isinstance(clips, StreamedClips) else (
        {clips.shape[1]} if isinstance(clips, (np.ndarray, torch.Tensor)) else {len(c) for c in clips})
    check_clip_frames(min(lengths), "clips")
    return clips


def check_clip_frames(frames: int, where: str) -> None:
    """I3D's temporal downsampling (8x) and VALID logits pool need at least MIN_FRAMES (9) frames per clip: checked
    before any clip is decoded or embedded."""
    if frames < MIN_FRAMES:
        raise UserError(f"{where}: clips of {frames} frame(s); FVD's I3D needs at least {MIN_FRAMES} frames per clip "
                        "(16 is the protocol's length). Use longer clips (--frames 16).")


def _feature_batches(model: torch.nn.Module, clips: Clips, batch_size: int, progress: bool,
                     sharded: bool = False) -> Iterator[torch.Tensor]:
    """Yield float32 (B, 400) CPU logits per batch of clips; each clip is resized on its own (sizes may differ).
    ``sharded``: only this rank's contiguous share of the batches (torchrun)."""
    from ulbench import dist

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    seq = _as_clip_list(clips)
    device = next(model.parameters()).device
    model.eval()
    starts = dist.shard(len(seq), batch_size) if sharded else range(0, len(seq), batch_size)
    bar = tqdm(total=len(seq), desc="I3D features", unit="clip", disable=not progress or not dist.is_main())
    with torch.inference_mode():
        for lo in starts:
            # a read-only memmap clip is copied (torch takes no non-writable arrays)
            batch = [preprocess_clips(torch.as_tensor(np.array(c) if isinstance(c, np.ndarray) else c)[None])
                     for c in seq[lo:lo + batch_size]]
            x = torch.cat(batch).to(device)  # (B, 3, T, 224, 224) in [-1, 1]
            with exact_float32():
                logits = model(x)  # (B, 400)
            bar.update(x.shape[0])
            yield logits.float().cpu()
    bar.close()


def clip_features(model: torch.nn.Module, clips: Clips, batch_size: int = DEFAULT_BATCH_SIZE,
                  progress: bool = True) -> torch.Tensor:
    """I3D logits of every clip: float32 (N, 400) on the CPU (the FVD features)."""
    feats = torch.cat(list(_feature_batches(model, clips, batch_size, progress)))
    if feats.shape[1] != NUM_CLASSES:
        raise ValueError(f"the model returned {feats.shape[1]} features per clip, expected {NUM_CLASSES}")
    return feats


def clip_moments(model: torch.nn.Module, clips: Clips, batch_size: int = DEFAULT_BATCH_SIZE,
                 progress: bool = True) -> Moments:
    """Float64 mean and covariance of the clips' I3D logits, streamed through ``FeatureStats`` (under torchrun
    each rank embeds its share and the sums are all-reduced)."""
    stats = FeatureStats(dim=NUM_CLASSES)
    for feats in _feature_batches(model, clips, batch_size, progress, sharded=True):
        stats.update(feats)
    return stats.reduce().moments()


def fvd_from_clips(model: torch.nn.Module, clips_a: Clips | Moments, clips_b: Clips | Moments,
                   batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> float:
    """FVD between two clip sets; either side may be precomputed ``Moments`` (e.g. reference statistics)."""
    a = clips_a if isinstance(clips_a, Moments) else clip_moments(model, clips_a, batch_size, progress)
    b = clips_b if isinstance(clips_b, Moments) else clip_moments(model, clips_b, batch_size, progress)
    return frechet_distance(a, b)


class VideoEvaluator:
    """FVD between clip sets given as video folders/files, .npz clip arrays or .npz statistics, under one protocol.
    Clips are streamed: videos decoded per I3D batch, stored .npz clip arrays memory-mapped."""

    def __init__(self, i3d_weights=None, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                 frames: int = 16, stride: int = 1, start: int = 0, clips_per_video: int = 1,
                 device: str | torch.device | None = None):
        # Checked before the network loads; the sampling again where it is used (index_video_clips).
        device = eval_device(device)
        check_clip_frames(frames, f"frames={frames}")
        if batch_size < 1 or stride < 1 or start < 0 or clips_per_video < 1:
            raise UserError(f"batch_size={batch_size}, stride={stride}, start={start}, clips_per_video="
                            f"{clips_per_video}: batch size, stride and clips per video must be >= 1, start >= 0")
        self.model = load_i3d(assets.converted_path(assets.I3D, i3d_weights)).to(device)
        self.batch_size, self.progress = batch_size, progress
        self.sampling = {"frames": frames, "stride": stride, "start": start, "clips_per_video": clips_per_video}

    def protocol(self) -> dict:
        return {"extractor": "i3d-kinetics-400/logits-400", "weights_sha256": assets.I3D.sha256,
                "resize": "bilinear-224 (align_corners=False, no antialias)", "scale": "[-1, 1]", **self.sampling}

    def set_moments(self, spec) -> tuple[Moments, dict]:
        """Moments of one input and what was read: a stats .npz, a clip .npz (arr_0) or a video folder/file."""
        path = Path(spec)
        if is_stats_file(path):
            return Moments.load_npz(path), {"input": str(path), "kind": "statistics"}
        if path.suffix == ".npz" and path.is_file():
            clips = load_clip_array(path)
            check_clip_frames(clips.shape[1], str(path))
            return clip_moments(self.model, clips, self.batch_size, self.progress), {"input": str(path), "clips": len(clips)}
        s = self.sampling
        cs = index_video_clips(path, s["frames"], s["stride"], s["start"], s["clips_per_video"])  # decoded per batch
        info = {"input": str(path), "clips": len(cs), "videos": cs.n_videos, "skipped_short": len(cs.skipped_short),
                "unreadable": len(cs.unreadable)}
        return clip_moments(self.model, cs, self.batch_size, self.progress), info

    def fvd(self, spec_a, spec_b) -> dict:
        a, info_a = self.set_moments(spec_a)
        b, info_b = self.set_moments(spec_b)
        fp = {**self.protocol(), "n": [a.n, b.n], "inputs": [info_a, info_b], "reference": str(spec_b)}
        return {"fvd": frechet_distance(a, b), "n": a.n, "fingerprint": fp}
