"""The sweep: train each method along the compute ladder, evaluate at every crossing, store one row per metric.

What a run directory holds and how runs start and resume: ``ulbench.run.directory``; the rows: ``ulbench.run.results``.
Points whose rows are stored are skipped; training continues from the latest checkpoint.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ulbench.data.base import to_float, to_uint8
from ulbench.errors import UserError
from ulbench.io import atomic_write
from ulbench.methods import get_kind
from ulbench.methods.base import TrainData, keep_checkpoints_at
from ulbench.metrics.images import quantize_images
from ulbench.metrics.registry import needs_of
from ulbench.run.directory import absolute_paths, git_commit, versions
from ulbench.run.plan import OFFICIAL_POINT, MethodPlan, resolve_device
from ulbench.run.results import ResultsStore
from ulbench.suite import METRICS

SAMPLE_BATCH = 32
GRID_IMAGES = 64
log = logging.getLogger("ulbench.run")  # one logger for the run: directory events and sweep progress


def save_grid(images_uint8: np.ndarray, path: Path) -> None:
    from PIL import Image
    from torchvision.utils import make_grid

    x = torch.from_numpy(np.array(images_uint8[:GRID_IMAGES])).permute(0, 3, 1, 2)
    grid = make_grid(x, nrow=int(np.ceil(np.sqrt(len(x)))), padding=1).permute(1, 2, 0).numpy()
    with atomic_write(path, "wb") as f:
        Image.fromarray(grid).save(f, format="png")


def stable_fingerprint(fp: dict, reference: str) -> dict:
    """A metric's fingerprint with the reference named by what it is (``reference``) rather than by a file path
    inside this run directory, so two runs of one suite carry the same protocol id."""
    fp = {**fp, "reference": reference, "inputs": [fp.get("inputs", ["?"])[0], reference]}
    fp["id"] = hashlib.sha256(json.dumps({k: v for k, v in fp.items() if k not in ("inputs", "id")}, sort_keys=True,
                                         default=str).encode()).hexdigest()[:16]
    return fp


def _sample_labels(n: int, first: int, suite, num_classes: int) -> torch.Tensor:
    """Class-conditional suites draw class ``i mod classes`` for sample i (balanced). Unconditional suites train
    every image under the one label 0 (``load_suite_dataset``), so they sample under it too."""
    if not suite.dataset.class_conditional:
        return torch.zeros(n, dtype=torch.long)
    return torch.arange(first, first + n) % num_classes


@dataclass
class SuiteTrainData(TrainData):
    """TrainData that records, beside the spec string, the suite's whole dataset section (name, absolute path,
    split, subset, resolution, ...) in each stage's config.json: ``ulbench reconstruct`` reopens exactly the images
    the run trained on (the spec alone loses the split and the kind of path)."""

    suite_dataset: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {**super().record(), "suite_dataset": self.suite_dataset}


class Sweep:
    def __init__(self, suite, run_dir: Path, progress: bool = True):
        from ulbench.data import load_suite_dataset

        self.suite, self.run_dir, self.progress = suite, Path(run_dir), progress
        self.device = resolve_device(suite.device)
        self.store = ResultsStore(self.run_dir / "results.jsonl")
        self.data = load_suite_dataset(suite)
        self._evaluator = None
        self._dinov2_evaluator = None
        self.clip_eval = None  # clip suites: a video_eval.ClipEvaluation, made by run_controls
        self.commit, self.versions = git_commit(), versions()

    @property
    def evaluator(self):
        if self._evaluator is None:
            from ulbench.metrics.fid import ImageEvaluator

            ev = self.suite.evaluation
            self._evaluator = ImageEvaluator(resize=ev.resize, batch_size=ev.batch_size, progress=self.progress,
                                             device=self.device)
        return self._evaluator

    @property
    def dinov2_evaluator(self):
        """fd_dinov2's evaluator: the same pipeline with DINOv2 features (evaluation.dinov2_weights)."""
        if self._dinov2_evaluator is None:
            from ulbench.metrics.fid import ImageEvaluator

            ev = self.suite.evaluation
            self._dinov2_evaluator = ImageEvaluator(resize=ev.resize, batch_size=ev.batch_size, progress=self.progress,
                                                    features="dinov2", dinov2_weights=ev.dinov2_weights,
                                                    device=self.device)
        return self._dinov2_evaluator

    def reference(self) -> str:
        """The reference set for gFID/KID: a user's path, or the first ``reference_size`` dataset images."""
        ev = self.suite.evaluation
        if ev.reference != "dataset":
            return ev.reference
        return self.dataset_images(ev.reference_size or ev.num_samples)

    def fingerprint(self, fp: dict, n: int | None = None) -> dict:
        """A metric's fingerprint; a reference drawn from the dataset (the first n images, n defaulting to the
        reference size) is named by the dataset's content fingerprint and the count, not by a path, so reruns
        compare and a changed image does not. A user's reference file keeps the evaluator's description."""
        ev, d = self.suite.evaluation, self.suite.dataset
        if n is None and ev.reference != "dataset":
            return fp
        n = n or ev.reference_size or ev.num_samples
        return stable_fingerprint(fp, f"dataset {d.name} sha256:{self.data.fingerprint()[:16]} {d.split} first {n} "
                                      f"at {d.resolution}px")

    def dataset_images(self, n: int):
        """The first n dataset images, streamed (reference set, rFID originals); their Inception statistics are
        cached by the dataset's fingerprint, once for every method, rung and run."""
        from ulbench.metrics.images import dataset_source

        if n > len(self.data):
            raise UserError(f"{self.suite.file}: evaluation asks for the first {n} dataset images, "
                            f"{self.data.name} has {len(self.data)}")
        return dataset_source(self.data, n)

    def row(self, plan: MethodPlan, point: str, rung: int | None, metric: str, value: float, n: int,
            fingerprint: dict, wall_s: float, ci95=None, std=None, guidance=None, grid=None) -> dict:
        info = METRICS[metric]
        name = f"{metric}{n}" if metric in ("fid", "kid", "rfid", "fvd", "rfvd") else \
            f"{metric}_{n}" if metric == "fd_dinov2" else metric  # fd_dinov2_200: N in the name, readably
        if rung is not None:  # generated at a rung: how it was sampled is part of what was measured
            fingerprint = {**fingerprint, "sampler": plan.sampler}
        official = plan.official is not None  # a released checkpoint: at its published training, on no rung
        return {"suite": self.suite.name, "run": self.run_dir.name, "method": plan.name, "kind": plan.kind,
                "preset": plan.preset, "point": point, "budget_index": None if official else rung,
                "budget_train_flops": None if rung is None or official else self.suite.budgets[rung],
                "official_checkpoint": self.official_record(plan) if official else None, "metric": name,
                "metric_base": metric, "value": float(value), "ci95": ci95, "std": std, "n": n,
                "higher_is_better": info.higher_is_better, "guidance": guidance, "train_flops": plan.train_flops(rung),
                "steps": plan.steps(rung), "wall_s": wall_s, "fingerprint": fingerprint, "git_commit": self.commit,
                "versions": self.versions, "grid": grid,
                "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def sharded_images(self, path: Path, n: int, produce, desc: str) -> tuple[np.ndarray, dict | None]:
        """Items 0..n-1 made in ``SAMPLE_BATCH`` batches by ``produce(lo, hi)`` -> (uint8 NCHW images or NCTHW clips,
        dict of per-item arrays), rank r making its contiguous share of the batches (the same batches, and so the same
        bytes, under any world size) into a part file; rank 0 joins the parts into the ADM ``.npz`` ``path``.
        Returns the images as a memory map on every rank and, on rank 0, the per-image arrays in index order."""
        from ulbench import dist
        from ulbench.io import open_npz_array, write_npz_from_parts

        rank, world = dist.rank_world()
        starts = dist.shard(n, SAMPLE_BATCH)
        part = path.with_name(f"{path.stem}.part{rank}of{world}.npy")
        tmp = part.with_name(part.name + ".tmp")  # renamed when complete: a killed rank leaves no partial part
        path.parent.mkdir(parents=True, exist_ok=True)
        extras: dict[str, list[np.ndarray]] = {}
        mm = None
        for lo in tqdm(starts, desc=desc, disable=not self.progress or rank != 0):
            hi = min(lo + SAMPLE_BATCH, n)
            images, extra = produce(lo, hi)
            images = images.movedim(1, -1).cpu().numpy()  # (N, [T,] H, W, C)
            if mm is None:
                first, stop = dist.span(starts, n, SAMPLE_BATCH)
                count = stop - first
                mm = np.lib.format.open_memmap(tmp, "w+", np.uint8, (count, *images.shape[1:]))
            mm[lo - starts[0]: hi - starts[0]] = images
            for k, v in extra.items():
                extras.setdefault(k, []).append(np.asarray(v))
        if mm is None:  # more ranks than batches: an empty share
            with open(tmp, "wb") as f:
                np.save(f, np.zeros((0,), np.uint8))
        else:
            mm.flush()
            del mm
        os.replace(tmp, part)
        gathered = dist.gather_to_main({k: np.concatenate(v) for k, v in extras.items()})
        if rank == 0:
            parts = [path.with_name(f"{path.stem}.part{r}of{world}.npy") for r in range(world)]
            write_npz_from_parts(path, parts)
            for p in parts:
                p.unlink()
            keys = sorted({k for g in gathered for k in g})  # a rank with an empty share sent none
            extras = {k: np.concatenate([g[k] for g in gathered if k in g]) for k in keys}
        dist.barrier()
        return open_npz_array(path), (extras if rank == 0 else None)

    def official_record(self, plan: MethodPlan) -> dict:
        """What a released checkpoint's rows say of it: the file (and its sha256, hashed once per run), its
        published training and how its train_flops were computed."""
        from ulbench.assets import sha256_file

        if "sha256" not in plan.official:
            plan.official = {**plan.official, "sha256": sha256_file(Path(plan.official["path"]))}
        return {**plan.official, "train_flops_formula": "published train_steps x batch_size x measured training "
                                                        "FLOPs per image (ulbench.flops)"}

    def evaluate_reconstructions(self, plan: MethodPlan, runner) -> list[dict]:
        """rFID, PSNR and bits/pixel of the stage-1 autoencoder on the first N dataset images."""
        from ulbench import dist
        from ulbench.metrics.lpips import lpips_per_image, rlpips_network
        from ulbench.metrics.psnr import psnr_per_image

        ev, wanted = self.suite.evaluation, set(self.suite.evaluation.metrics)
        t0, n = time.perf_counter(), ev.num_reconstructions
        folder = self.run_dir / "methods" / plan.name / "points" / "stage1"
        lpips_model = rlpips_network(self.device) if "rlpips" in wanted else None

        def produce(lo: int, hi: int):
            xb = to_float(next(self.data.batches(hi, SAMPLE_BATCH, lo))[0])
            seeds = [self.suite.seeds.sample + i for i in range(lo, hi)]
            recon = quantize_images(runner.reconstruct(xb, seeds, plan.sampler)).cpu()
            originals, recon_hwc = to_uint8(xb).permute(0, 2, 3, 1).numpy(), recon.permute(0, 2, 3, 1).numpy()
            extra = {"psnr": psnr_per_image(originals, recon_hwc),
                     "bits": runner.bits_per_pixel(xb, self.suite.seeds.sample + lo).numpy()}
            if "rlpips" in wanted:
                extra["rlpips"] = lpips_per_image(originals, recon_hwc, lpips_model)
            return recon, extra

        recon, per_image = self.sharded_images(folder / "reconstructions.npz", n, produce, f"{plan.name} reconstruct")
        rfid = None
        if "rfid" in wanted:
            rfid = self.evaluator.fid(recon, self.dataset_images(n), bootstrap=ev.bootstrap,
                                      seed=self.suite.seeds.sample)
        if not dist.is_main():
            return []
        originals = next(self.data.batches(GRID_IMAGES // 2, GRID_IMAGES // 2))[0]
        originals = to_uint8(to_float(originals)).permute(0, 2, 3, 1).numpy()
        save_grid(np.concatenate([originals, recon[:GRID_IMAGES // 2]]), folder / "grid.png")
        grid = str((folder / "grid.png").relative_to(self.run_dir))
        rows = []
        if rfid is not None:
            fp = self.fingerprint(rfid["fingerprint"], n)
            rows.append(self.row(plan, "stage1", None, "rfid", rfid["fid"], rfid["n"], fp,
                                 time.perf_counter() - t0, ci95=rfid.get("fid_ci95"), grid=grid))
        if "psnr" in wanted:
            p = per_image["psnr"]
            fp = {"metric": "psnr", "data_range": 255, "quantized": "uint8", "reduction": "per-image mean", "n": n}
            rows.append(self.row(plan, "stage1", None, "psnr", float(np.mean(p)), n, fp, time.perf_counter() - t0,
                                 std=float(np.std(p)), grid=grid))
        if "rlpips" in wanted:
            d = per_image["rlpips"]
            fp = {"metric": "rlpips", **lpips_model.fingerprint(), "reduction": "per-image mean", "n": n}
            rows.append(self.row(plan, "stage1", None, "rlpips", float(np.mean(d)), n, fp, time.perf_counter() - t0,
                                 std=float(np.std(d)), grid=grid))
        if "bits_per_pixel" in wanted:
            b = per_image["bits"]
            fp = {"metric": "bits_per_pixel", "estimator": "prior L_z / (ln 2 H W), seeded Monte Carlo", "n": n}
            rows.append(self.row(plan, "stage1", None, "bits_per_pixel", float(b.mean()), n, fp,
                                 time.perf_counter() - t0, std=float(b.std()), grid=grid))
        return rows

    def generate(self, plan: MethodPlan, runner, guidance: float, path: Path) -> np.ndarray:
        """num_samples images with per-sample seeds (seed + i), stored as an ADM .npz (reused when present) and
        returned as a memory map; under torchrun each rank samples its share of the batches."""
        from ulbench import dist
        from ulbench.io import open_npz_array

        if dist.all_true(path.is_file()):
            return open_npz_array(path)
        ev = self.suite.evaluation

        def produce(lo: int, hi: int):
            seeds = [self.suite.seeds.sample + i for i in range(lo, hi)]
            labels = _sample_labels(len(seeds), lo, self.suite, self.data.num_classes)
            return quantize_images(runner.sample(seeds, labels, plan.sampler, guidance)).cpu(), {}

        return self.sharded_images(path, ev.num_samples, produce, f"{plan.name} sample g={guidance}")[0]

    def evaluate_samples(self, plan: MethodPlan, runner, rung: int) -> list[dict]:
        from ulbench import dist

        ev, wanted = self.suite.evaluation, self.suite.evaluation.metrics
        point = OFFICIAL_POINT if plan.official is not None else f"b{rung}"
        folder = self.run_dir / "methods" / plan.name / "points" / point
        rows = []
        for g in plan.guidance:
            t0 = time.perf_counter()
            images = self.generate(plan, runner, g, folder / f"samples_g{g:g}.npz")
            # Inception once per sample set: FID, KID, class_acc and precision/recall all come from these features
            # and the reference's
            if {"fid", "kid", "class_acc", "precision", "recall"} & set(wanted):
                a = self.evaluator.set_stats(images, keep_features=True)
                b = self.evaluator.set_stats(self.reference(), keep_features=bool({"kid", "class_acc", "precision",
                                                                                   "recall"} & set(wanted)))
            if not dist.is_main():
                continue
            save_grid(images, folder / f"grid_g{g:g}.png")
            grid = str((folder / f"grid_g{g:g}.png").relative_to(self.run_dir))
            if "fid" in wanted:
                r = self.evaluator.fid_from_stats(a, b, bootstrap=ev.bootstrap, seed=self.suite.seeds.sample)
                fp = self.fingerprint(r["fingerprint"])
                rows.append(self.row(plan, point, rung, "fid", r["fid"], r["n"], fp,
                                     time.perf_counter() - t0, ci95=r.get("fid_ci95"), guidance=g, grid=grid))
            if "kid" in wanted:
                r = self.evaluator.kid_from_stats(a, b, subset_size=ev.kid_subset_size)
                fp = self.fingerprint(r["fingerprint"])
                rows.append(self.row(plan, point, rung, "kid", r["kid_mean"], r["n"], fp,
                                     time.perf_counter() - t0, std=r["kid_std"], guidance=g, grid=grid))
            if {"precision", "recall"} & set(wanted):
                r = self.evaluator.pr_from_stats(a, b)
                fp = self.fingerprint(r["fingerprint"])
                rows.extend(self.row(plan, point, rung, m, r[m], r["n"], fp, time.perf_counter() - t0, guidance=g,
                                     grid=grid) for m in ("precision", "recall") if m in wanted)
            if "class_acc" in wanted:
                rows.append(self.class_accuracy(plan, rung, a.features, b.features, g, time.perf_counter() - t0, grid,
                                                point))
        if "fd_dinov2" in wanted:
            rows += self.fd_dinov2_rows(plan, rung, folder, point)
        return rows

    def fd_dinov2_rows(self, plan: MethodPlan, rung: int, folder: Path, point: str) -> list[dict]:
        """fd_dinov2 of each guidance's samples (already made and stored by ``generate``) vs the reference."""
        from ulbench import dist
        from ulbench.io import open_npz_array

        ev, rows = self.suite.evaluation, []
        for g in plan.guidance:
            t0 = time.perf_counter()
            images = open_npz_array(folder / f"samples_g{g:g}.npz")  # made by evaluate_samples (generate)
            a = self.dinov2_evaluator.set_stats(images, keep_features=ev.bootstrap > 0)
            b = self.dinov2_evaluator.set_stats(self.reference())
            if not dist.is_main():
                continue
            r = self.dinov2_evaluator.fid_from_stats(a, b, bootstrap=ev.bootstrap, seed=self.suite.seeds.sample)
            rows.append(self.row(plan, point, rung, "fd_dinov2", r["fd_dinov2"], r["n"],
                                 self.fingerprint(r["fingerprint"]), time.perf_counter() - t0,
                                 ci95=r.get("fd_dinov2_ci95"), guidance=g,
                                 grid=str((folder / f"grid_g{g:g}.png").relative_to(self.run_dir))))
        return rows

    def class_accuracy(self, plan: MethodPlan, rung: int, features, reference, guidance: float, wall_s: float,
                       grid: str, point: str) -> dict:
        """class_acc: sample i was drawn for class i mod classes (``_sample_labels``); the reference images (the
        first reference_size dataset images) carry their dataset labels."""
        from ulbench.metrics.stats import nearest_centroid_accuracy

        labels = _sample_labels(len(features), 0, self.suite, self.data.num_classes)
        ref_labels = np.asarray(self.data.labels)[:len(reference)]
        acc = nearest_centroid_accuracy(features, labels, reference, ref_labels)
        fp = self.fingerprint({"metric": "class_acc", "features": "inception-v3-compat pool3 (FID's)",
                               "rule": "nearest class mean, Euclidean", "n": len(features),
                               "classes": self.data.num_classes})
        return self.row(plan, point, rung, "class_acc", acc, len(features), fp, wall_s, guidance=guidance,
                        grid=grid)

    def done(self, method: str, point: str) -> bool:
        """Whether a point's rows are stored, as rank 0 sees it (every rank takes the same branch)."""
        from ulbench import dist

        return dist.broadcast_from_main(self.store.done(method, point))

    def add(self, rows: list[dict]) -> None:
        from ulbench import dist

        if dist.is_main():
            self.store.add(rows)
        dist.barrier()

    def run_method(self, plan: MethodPlan) -> None:
        kind = get_kind(plan.kind)
        workdir = self.run_dir / "methods" / plan.name
        d = self.suite.dataset
        data = SuiteTrainData(self.data, xflip=d.xflip, workers=d.workers,
                              source=str(Path(d.path).expanduser().resolve()) if d.path else d.name,
                              suite_dataset=absolute_paths({"dataset": d.to_dict()})["dataset"])
        if not data.source:
            raise UserError(f"{self.suite.file}: dataset: no dataset spec to record (name {d.name!r}, path "
                            f"{d.path!r}); a run must say what it trained on: set dataset.name (and dataset.path)")
        if plan.official is not None:
            self.run_official(plan, kind, data)
            return
        ends = {"stage1": [plan.stage1_steps or 0], plan.final_stage: plan.rung_steps}  # rung ends: kept
        runner = kind.runner(plan.config, keep_checkpoints_at(plan.train, ends), workdir, self.device,
                             self.suite.precision, data, self.progress)
        if plan.stage1_steps:
            log.info("%s: stage1 to step %d", plan.name, plan.stage1_steps)
            runner.train("stage1", plan.stage1_steps, resume=True)
            wants_recon = kind.reconstructs and "reconstructions" in needs_of(self.suite.evaluation.metrics)
            if wants_recon and not self.done(plan.name, "stage1"):
                self.add(self.clip_eval.reconstructions(plan, runner) if self.clip_eval
                         else self.evaluate_reconstructions(plan, runner))
                log.info("%s: stage1 evaluated", plan.name)
            elif wants_recon:
                log.info("%s: stage1 point already stored, skipped", plan.name)
        wants_samples = "samples" in needs_of(self.suite.evaluation.metrics)
        for rung, steps in enumerate(plan.rung_steps if wants_samples else []):
            if self.done(plan.name, f"b{rung}"):
                log.info("%s: b%d already stored, skipped", plan.name, rung)
                continue
            log.info("%s: %s to step %d (rung b%d)", plan.name, plan.final_stage, steps, rung)
            runner.train(plan.final_stage, steps, resume=True)
            self.add(self.clip_eval.predictions(plan, runner, rung) if self.clip_eval
                     else self.evaluate_samples(plan, runner, rung))
            log.info("%s: b%d evaluated", plan.name, rung)

    def run_official(self, plan: MethodPlan, kind, data: TrainData) -> None:
        """A released checkpoint: nothing trained; its samples evaluated once (point ``official``), by the protocol
        and sampler of every other method."""
        if self.clip_eval is not None:
            raise UserError(f"{self.suite.file}: {plan.name}: a released image checkpoint in a clip suite")
        if "samples" not in needs_of(self.suite.evaluation.metrics):
            return
        if self.done(plan.name, OFFICIAL_POINT):
            log.info("%s: %s point already stored, skipped", plan.name, OFFICIAL_POINT)
            return
        runner = kind.runner(plan.config, {}, self.run_dir / "methods" / plan.name, self.device,
                             self.suite.precision, data, self.progress)
        log.info("%s: official checkpoint %s, evaluated untrained", plan.name, plan.official["path"])
        self.add(self.evaluate_samples(plan, runner, 0))

    def run_controls(self, plans: list[MethodPlan]) -> None:
        """Clip suites: the evaluation clips, and the frame-prediction controls scored once per run."""
        from ulbench.run.video_eval import CONTROLS, ClipEvaluation

        self.clip_eval = ClipEvaluation(self, plans)
        wanted = "samples" in needs_of(self.suite.evaluation.metrics)  # fvd, pred_psnr: what the controls score
        if wanted and not all(self.done(c, "control") for c in CONTROLS):
            self.add(self.clip_eval.controls())
            log.info("controls (%s) evaluated", ", ".join(CONTROLS))

    def run(self, plans: list[MethodPlan]) -> None:
        """Every plan in order, holding the run directory's lock of each method (rank 0) while it runs."""
        from ulbench import dist
        from ulbench.run.lock import RunLock

        lock = RunLock(self.run_dir)
        try:
            if dist.is_main():
                for plan in plans:
                    lock.acquire(plan.name)
            dist.barrier()
            if self.suite.dataset.video:
                self.run_controls(plans)
            for plan in plans:
                self.run_method(plan)
        finally:
            lock.release()
