"""Frame prediction in a clip suite's sweep: fixed evaluation clips, two controls, FVD / rFVD, per-frame PSNR, strips.

Protocol (protocols.md, FVD; docs/video.md): N evaluation clips spread evenly over the evaluation set (clip
``i * len // N``). A model is given each clip's first K frames and predicts the rest; the K given frames plus the
predicted ones are scored as whole clips by I3D against the N real clips (FVD), and the predicted frames against the
real ones by PSNR per frame (uint8, range 255; identical frames count as ``PSNR_CAP_DB``). rFVD scores stage-1
reconstructions of the first ``num_reconstructions`` evaluation clips the same way. Two controls, computed once per
run and drawn on every video plot: ``last-frame`` (the last given frame repeated: what a model must beat) and
``other-clips`` (real clips from elsewhere in the set, clip ``(j + len // 2) mod len``: the floor of FVD at this N).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ul_model.model import context_clip
from ulbench.data.base import to_float, to_uint8
from ulbench.errors import UserError
from ulbench.metrics.images import quantize_images
from ulbench.metrics.psnr import DATA_RANGE

PSNR_CAP_DB = 100.0  # an exactly repeated frame (a static shot under the last-frame control) would be +inf
STRIP_CLIPS = 4
CONTEXT_RGB, PREDICTED_RGB = (0, 200, 0), (220, 0, 0)  # frame borders in strips: given / predicted
CONTROLS = ("last-frame", "other-clips")


def psnr_per_frame(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, T, H, W, C) uint8 pairs -> (N, T) PSNR in dB per frame, capped at ``PSNR_CAP_DB``."""
    if a.dtype != np.uint8 or b.dtype != np.uint8 or a.shape != b.shape:
        raise ValueError(f"per-frame PSNR takes two uint8 clip arrays of one shape, got {a.dtype} {a.shape} and "
                         f"{b.dtype} {b.shape}")
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(2, 3, 4))  # (N, T)
    floor = DATA_RANGE**2 / 10 ** (PSNR_CAP_DB / 10)
    return 10.0 * np.log10(DATA_RANGE**2 / np.maximum(mse, floor))


def evaluation_indices(n: int, size: int) -> list[int]:
    """n clips spread evenly over a set of ``size`` (the first n would all come from the first videos)."""
    return [i * size // n for i in range(n)]


@dataclass(frozen=True)
class ControlPlan:
    """What ``Sweep.row`` reads of a method, for a control (no training, no budget)."""

    name: str
    kind: str = "control"
    preset: str | None = None
    official: dict | None = None  # never a released checkpoint

    def train_flops(self, rung):
        return None

    def steps(self, rung):
        return None


def save_strip(real: np.ndarray, predicted: np.ndarray, k: int, path: Path) -> None:
    """Rows of frames: each clip's real frames, then its predicted clip; given frames framed green, predicted red."""
    from PIL import Image

    from ulbench.io import atomic_write

    def framed(clip: np.ndarray, mark: bool) -> np.ndarray:  # (T, H, W, C) -> (H + 2, T (W + 2), C)
        out = np.zeros((clip.shape[0], clip.shape[1] + 2, clip.shape[2] + 2, 3), np.uint8) + 255
        for t in range(clip.shape[0]):
            if mark:
                out[t] = CONTEXT_RGB if t < k else PREDICTED_RGB
            out[t, 1:-1, 1:-1] = clip[t]
        return np.concatenate(list(out), axis=1)

    rows = []
    for r, p in zip(real[:STRIP_CLIPS], predicted[:STRIP_CLIPS]):
        rows += [framed(np.asarray(r), False), framed(np.asarray(p), True)]
    with atomic_write(path, "wb") as f:
        Image.fromarray(np.concatenate(rows, axis=0)).save(f, format="png")


class ClipEvaluation:
    """A clip suite's evaluation inside a ``Sweep``: the evaluation clips, their I3D statistics, the controls."""

    def __init__(self, sweep, plans):
        from ulbench.data import load_suite_dataset

        self.sweep, self.suite = sweep, sweep.suite
        ev = self.suite.evaluation
        self.data = sweep.data if ev.dataset is None else \
            load_suite_dataset(self.suite, ev.dataset, "evaluation.dataset")
        for key, n in (("num_samples", ev.num_samples), ("num_reconstructions", ev.num_reconstructions)):
            if n > len(self.data):
                raise UserError(f"{self.suite.file}: evaluation.{key}: {n} clips asked for, the evaluation set "
                                f"{self.data.name} has {len(self.data)}")
        given = {p.config.context_frames for p in plans}
        if len(given) > 1:
            raise UserError(f"{self.suite.file}: methods give {sorted(given)} context frames; one suite scores one "
                            "frame-prediction task: set the same context_frames for every method")
        self.k = given.pop() if given else 5
        self.folder = sweep.run_dir / "evaluation"
        self._i3d, self._real = None, {}

    @property
    def i3d(self):
        if self._i3d is None:
            from ulbench.metrics.fvd import VideoEvaluator

            self._i3d = VideoEvaluator(batch_size=8, progress=self.sweep.progress, device=self.sweep.device)
        return self._i3d

    def reference_name(self, n: int) -> str:
        d = self.suite.evaluation.dataset or self.suite.dataset
        return (f"clips {d.name} sha256:{self.data.fingerprint()[:16]} {d.split} {n} evenly spaced of "
                f"{len(self.data)} at {d.frames}x{d.resolution}px")

    def clips(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation clips (n, 3, T, R, R) in [-1, 1] and their labels."""
        items = [self.data[i] for i in indices]
        return to_float(torch.stack([x for x, _ in items])), torch.tensor([y for _, y in items])

    def real(self, n: int):
        """The first n evaluation clips as a stored uint8 (n, T, H, W, C) array and their I3D moments (once)."""
        if n not in self._real:
            idx = evaluation_indices(n, len(self.data))
            arr, _ = self.sweep.sharded_images(self.folder / f"real_{n}.npz", n,
                                               lambda lo, hi: (to_uint8(self.clips(idx[lo:hi])[0]), {}), "real clips")
            self._real[n] = (arr, self.i3d_moments(arr))
        return self._real[n]

    def i3d_moments(self, clips):
        from ulbench.metrics.fvd import clip_moments

        return clip_moments(self.i3d.model, clips, self.i3d.batch_size, self.sweep.progress)

    def fvd_fingerprint(self, n: int, what: str) -> dict:
        from ulbench.run.sweep import stable_fingerprint

        fp = {**self.i3d.protocol(), "metric": "fvd", "n": n, "clips": what, "context_frames": self.k,
              "skipped_videos": {r: len(v) for r, v in getattr(self.data, "skipped", {}).items() if v}}
        return stable_fingerprint(fp, self.reference_name(n))

    def psnr_fingerprint(self, n: int, frames: str) -> dict:
        return {"metric": "psnr", "data_range": 255, "quantized": "uint8", "frames": frames, "n": n,
                "reduction": f"per frame, capped at {PSNR_CAP_DB:g} dB, mean over frames then clips",
                "reference": self.reference_name(n)}

    def score_predictions(self, plan, point: str, rung, clips, per_frame: np.ndarray, t0: float, guidance=None,
                          grid=None) -> list[dict]:
        """fvd and pred_psnr rows of one set of predicted clips (the given frames included)."""
        from ulbench import dist
        from ulbench.metrics.stats import frechet_distance

        n, wanted, rows = len(clips), self.suite.evaluation.metrics, []
        fvd = frechet_distance(self.i3d_moments(clips), self.real(n)[1]) if "fvd" in wanted else None
        if not dist.is_main():
            return []
        if fvd is not None:
            rows.append(self.sweep.row(plan, point, rung, "fvd", fvd, n, self.fvd_fingerprint(n, "given + predicted"),
                                       time.perf_counter() - t0, guidance=guidance, grid=grid))
        if "pred_psnr" in wanted:
            row = self.sweep.row(plan, point, rung, "pred_psnr", float(per_frame.mean()), n,
                                 self.psnr_fingerprint(n, f"predicted ({self.k + 1}..)"), time.perf_counter() - t0,
                                 std=float(per_frame.mean(axis=1).std()), guidance=guidance, grid=grid)
            rows.append({**row, "per_frame": per_frame.mean(axis=0).tolist()})  # the PSNR-vs-frame curve
        return rows

    def controls(self) -> list[dict]:
        """Rows of the two controls (each a ``point: control`` with no budget)."""
        n = self.suite.evaluation.num_samples
        size, real = len(self.data), self.real(n)[0]
        other = [(j + size // 2) % size for j in evaluation_indices(n, size)]
        makers = {"last-frame": lambda lo, hi: to_uint8(context_clip(to_float(torch.from_numpy(
                      np.array(real[lo:hi])).permute(0, 4, 1, 2, 3)), self.k)),  # a copy: the memmap is read-only
                  "other-clips": lambda lo, hi: to_uint8(self.clips(other[lo:hi])[0])}
        rows = []
        for name in CONTROLS:
            t0 = time.perf_counter()
            clips, _ = self.sweep.sharded_images(self.folder / f"control_{name}.npz", n,
                                                 lambda lo, hi, f=makers[name]: (f(lo, hi), {}), f"control {name}")
            per_frame = psnr_per_frame(np.asarray(clips[:, self.k:]), np.asarray(real[:, self.k:]))
            rows += self.score_predictions(ControlPlan(name), "control", None, clips, per_frame, t0)
        return rows

    def predictions(self, plan, runner, rung: int) -> list[dict]:
        """Frame prediction at one rung: N clips from their K given frames, per guidance scale."""
        ev, point = self.suite.evaluation, f"b{rung}"
        n, folder = ev.num_samples, self.sweep.run_dir / "methods" / plan.name / "points" / point
        idx, real = evaluation_indices(n, len(self.data)), self.real(n)[0]
        rows = []
        for g in plan.guidance:
            t0 = time.perf_counter()

            def produce(lo: int, hi: int):
                x, labels = self.clips(idx[lo:hi])
                labels = labels if self.suite.dataset.class_conditional else torch.zeros_like(labels)
                seeds = [self.suite.seeds.sample + i for i in range(lo, hi)]
                out = quantize_images(runner.predict(x, seeds, labels, plan.sampler, g)).cpu()
                future = (out[:, :, self.k:].permute(0, 2, 3, 4, 1).numpy(), np.asarray(real[lo:hi, self.k:]))
                return out, {"psnr": psnr_per_frame(*future)}

            clips, extra = self.sweep.sharded_images(folder / f"predictions_g{g:g}.npz", n, produce,
                                                     f"{plan.name} predict g={g:g}")
            grid = None
            from ulbench import dist

            if dist.is_main():
                save_strip(real, clips, self.k, folder / f"strip_g{g:g}.png")
                grid = str((folder / f"strip_g{g:g}.png").relative_to(self.sweep.run_dir))
            rows += self.score_predictions(plan, point, rung, clips, extra["psnr"] if extra else None, t0, g, grid)
        return rows

    def reconstructions(self, plan, runner) -> list[dict]:
        """rFVD, per-frame PSNR, bits per pixel and per frame of the stage-1 autoencoder."""
        from ulbench import dist
        from ulbench.metrics.stats import frechet_distance

        ev, wanted, t0 = self.suite.evaluation, set(self.suite.evaluation.metrics), time.perf_counter()
        n, folder = ev.num_reconstructions, self.sweep.run_dir / "methods" / plan.name / "points" / "stage1"
        idx, real = evaluation_indices(n, len(self.data)), self.real(n)[0]

        def produce(lo: int, hi: int):
            x, _ = self.clips(idx[lo:hi])
            seeds = [self.suite.seeds.sample + i for i in range(lo, hi)]
            recon = quantize_images(runner.reconstruct(x, seeds, plan.sampler)).cpu()
            psnr = psnr_per_frame(recon.permute(0, 2, 3, 4, 1).numpy(), np.asarray(real[lo:hi]))
            return recon, {"psnr": psnr, "bits": runner.bits_per_pixel(x, self.suite.seeds.sample + lo).numpy()}

        recon, extra = self.sweep.sharded_images(folder / "reconstructions.npz", n, produce, f"{plan.name} reconstruct")
        rfvd = frechet_distance(self.i3d_moments(recon), self.real(n)[1]) if "rfvd" in wanted else None
        if not dist.is_main():
            return []
        save_strip(real, recon, 0, folder / "strip.png")
        grid, rows = str((folder / "strip.png").relative_to(self.sweep.run_dir)), []
        row = lambda metric, value, fp, **kw: self.sweep.row(  # noqa: E731
            plan, "stage1", None, metric, value, n, fp, time.perf_counter() - t0, grid=grid, **kw)
        if rfvd is not None:
            rows.append(row("rfvd", rfvd, self.fvd_fingerprint(n, "reconstructions")))
        if "psnr" in wanted:
            p = extra["psnr"]
            rows.append({**row("psnr", float(p.mean()), self.psnr_fingerprint(n, "all"), std=float(p.mean(1).std())),
                         "per_frame": p.mean(axis=0).tolist()})
        bits = extra["bits"]
        pixels_per_frame = self.suite.dataset.resolution**2
        estimator = "prior L_z / (ln 2 T H W), seeded Monte Carlo"
        if "bits_per_pixel" in wanted:
            rows.append(row("bits_per_pixel", float(bits.mean()), {"metric": "bits_per_pixel", "estimator": estimator,
                                                                   "n": n}, std=float(bits.std())))
        if "bits_per_frame" in wanted:
            b = bits * pixels_per_frame
            rows.append(row("bits_per_frame", float(b.mean()), {"metric": "bits_per_frame", "estimator": estimator +
                                                                " x H W", "n": n}, std=float(b.std())))
        return rows
