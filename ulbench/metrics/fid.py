"""FID, KID and FD-DINOv2: images -> features (Inception, or DINOv2 ViT-L/14) -> statistics -> metric, cached.

Cache points follow style.md: statistics (and, when asked for, the features behind them) are cached under
``$ULBENCH_CACHE/stats`` keyed by the source's identity and the protocol fingerprint (extractor, weights sha256,
resize mode), so the same reference folder is never run through Inception twice.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ulbench import assets, dist
from ulbench.errors import UserError
from ulbench.io import atomic_write
from ulbench.metrics.device import eval_device, exact_float32
from ulbench.metrics.images import ImageSource, check_limit, prepare_batch, resolve_source
from ulbench.metrics.inception import EXTRACTOR_NAME, FEATURE_DIM, InceptionFeatures
from ulbench.metrics.precision_recall import PR_K, check_k, precision_recall
from ulbench.metrics.stats import (NPZ_READ_ERRORS, FeatureStats, Moments, bootstrap_frechet, frechet_distance,
                                   is_stats_file, is_stats_only)

EXTRACTOR_ID = f"torch-fidelity/{EXTRACTOR_NAME}/pool3-{FEATURE_DIM}"
KID_SUBSETS = 100  # torch-fidelity defaults
KID_SUBSET_SIZE = 1000
FEATURES = ("inception", "dinov2")  # the extractor: FID's Inception-v3, or FD-DINOv2's DINOv2 (metrics/dinov2.py)


def check_bootstrap(reps: int) -> None:
    """0 (no interval) or at least 2 repetitions: a percentile interval of one resample is no interval."""
    if not isinstance(reps, numbers.Integral) or reps < 0 or reps == 1:
        raise UserError(f"bootstrap={reps!r}: give 0 for no interval, or at least 2 repetitions (20 or more for a "
                        "usable 95% interval)")


def check_kid(subsets: int, subset_size: int) -> None:
    if subsets < 1 or subset_size < 2:
        raise UserError(f"KID subsets={subsets}, subset size={subset_size}: need at least 1 subset of at least 2 "
                        "images (the unbiased MMD estimate pairs distinct images)")


@dataclass
class SetStats:
    """Statistics of one input set, its provenance, and its features when they were kept."""

    moments: Moments
    name: str
    resolution: tuple[int, int] | None
    features: torch.Tensor | None = None
    stats_file_sha256: str | None = None


class ImageEvaluator:
    """Runs FID/KID/statistics for any image inputs under one protocol (extractor, weights, resize mode).

    ``features="dinov2"`` swaps Inception for DINOv2 ViT-L/14 (the user's ``dinov2_weights`` file, see
    metrics/dinov2.py): the same streaming statistics, Fréchet distance and cache, reported as ``fd_dinov2``; the
    extractor and the file's sha256 are in the protocol, so the two kinds of statistics never share a cache entry.
    """

    def __init__(self, inception_weights: str | os.PathLike | None = None, resize: str = "legacy",
                 batch_size: int = 50, progress: bool = True, use_cache: bool = True, fast: bool = True,
                 features: str = "inception", dinov2_weights: str | os.PathLike | None = None,
                 device: str | torch.device | None = None):
        self.device = eval_device(device)  # named before any network loads
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if features not in FEATURES:
            raise UserError(f"features '{features}' unknown; choose one of {FEATURES}")
        self.resize = resize
        self.batch_size = batch_size
        self.progress = progress
        self.use_cache = use_cache
        self.features_name = features
        if features == "dinov2":
            from ulbench.metrics import dinov2

            path = dinov2.resolve_weights(dinov2_weights)  # a missing file is named before anything loads
            self._prepare = dinov2.prepare_dinov2_batch
            self._prepare([np.zeros((2, 2, 3), np.uint8)], resize)  # validate the mode before any long work
            self.net = dinov2.DINOv2Features(path).to(self.device)
            self.metric, self.feature_dim = "fd_dinov2", self.net.feature_dim
            self._protocol = {"extractor": dinov2.extractor_id(self.net.shape), "weights_sha256": assets.sha256_file(
                path), "resize": resize, "preprocess": dinov2.RESIZE_IMPL[resize] + ", ImageNet mean/std"}
            return
        self._prepare = prepare_batch
        self.net = InceptionFeatures(assets.converted_path(assets.INCEPTION, inception_weights),
                                     fast=fast).to(self.device)
        prepare_batch([np.zeros((2, 2, 3), np.uint8)], resize)  # validate the mode before any long work
        self.metric, self.feature_dim = "fid", FEATURE_DIM
        self._protocol = {"extractor": EXTRACTOR_ID, "weights_sha256": assets.INCEPTION.sha256, "resize": resize}

    def protocol(self) -> dict:
        return dict(self._protocol)

    # images -> features
    def features(self, source: ImageSource, keep_features: bool = False) -> FeatureStats:
        """Inception statistics of ``source``; under torchrun each rank embeds its contiguous share of the
        ``batch_size`` batches and the float64 sums are all-reduced (features gathered on rank 0 if kept)."""
        rank, world = dist.rank_world()
        start, stop = 0, source.count
        if world > 1:
            if source.count is None:
                raise UserError(f"{source.name}: a stream of unknown length cannot be split across ranks")
            start, stop = dist.span(dist.shard(source.count, self.batch_size), source.count, self.batch_size)
        stats = FeatureStats(self.feature_dim, keep_features=keep_features)
        total = None if stop is None else stop - start
        bar = tqdm(total=total, unit="img", desc=f"{self.features_name} {Path(source.name).name}",
                   disable=not self.progress or rank != 0, leave=False)
        for batch in (source.batches(self.batch_size, start, stop) if stop != start else []):
            with exact_float32():
                stats.update(self.net(self._prepare(batch, self.resize).to(self.device)).float().cpu())
            bar.update(len(batch))
        bar.close()
        stats.reduce()
        if stats.n == 0:
            raise UserError(f"{source.name}: no images")
        return stats

    # images -> statistics, through the cache
    def set_stats(self, spec, keep_features: bool = False, limit: int | None = None) -> SetStats:
        """Statistics of an input (and its per-image features when ``keep_features``). A statistics file gives its
        own ``mu``/``sigma``; an ADM reference batch also has images (``arr_0``), whose features it then gives."""
        if is_stats_file(spec):
            features = None
            if keep_features:
                _check_has_images(spec, "KID, precision/recall and the bootstrap interval need")
                features = self._image_stats(spec, True, limit).features
            moments = self._check_stats_file(spec, Moments.load_npz(spec))
            return SetStats(moments, str(spec), None, features, stats_file_sha256=assets.sha256_file(Path(spec)))
        return self._image_stats(spec, keep_features, limit)

    def _image_stats(self, spec, keep_features: bool, limit: int | None) -> SetStats:
        source = resolve_source(spec, limit)
        # Sets of at most D images keep their features anyway (<= 16 MB): frechet_distance then takes the N x N
        # Gram form instead of two D x D eigendecompositions (~3 s per FID on one core).
        keep_features = keep_features or (source.count is not None and source.count <= self.feature_dim)
        cache = self._cache_path(source)
        hit = _read_cache(cache, keep_features, self.feature_dim) if cache is not None and cache.is_file() else None
        if dist.all_true(hit is not None):  # all ranks take the cached statistics, or all compute them
            return SetStats(hit[0], source.name, source.resolution, hit[1])
        fs = self.features(source, keep_features)
        main = dist.is_main()
        out = SetStats(fs.moments(), source.name, source.resolution,
                       fs.features if keep_features and main else None)
        if cache is not None and main:
            _write_cache(cache, out)
        dist.barrier()  # the cache entry exists for every rank's next look-up
        return out

    def _check_stats_file(self, spec, moments: Moments) -> Moments:
        """A statistics file of another extractor (written by ``eval stats`` with its protocol, or of another width:
        Inception's 2048 vs DINOv2's 1024) is named, never compared."""
        with np.load(spec, allow_pickle=False) as z:
            theirs = str(z["extractor"]) if "extractor" in z.files else None
        ours = self._protocol["extractor"]
        if moments.mu.shape[0] != self.feature_dim or (theirs is not None and theirs != ours):
            raise UserError(f"{spec}: statistics of {theirs or f'{moments.mu.shape[0]}-d features'}, but this "
                            f"evaluation ({self.metric}) uses {ours} ({self.feature_dim}-d); write statistics with "
                            f"the same extractor (`ulbench eval stats FOLDER -o ref.npz"
                            f"{' --features dinov2' if self.metric == 'fd_dinov2' else ''}`)")
        return moments

    def _cache_path(self, source: ImageSource) -> Path | None:
        if not self.use_cache or source.identity is None:
            return None
        key = hashlib.sha256(json.dumps([source.identity, self.protocol()], sort_keys=True).encode()).hexdigest()
        return assets.cache_dir() / "stats" / f"{key[:32]}.npz"

    def fingerprint(self, a: SetStats, b: SetStats) -> dict:
        ref = b.name if b.stats_file_sha256 is None else f"{b.name} (sha256 {b.stats_file_sha256[:16]})"
        fp = {**self.protocol(), "resolution": [a.resolution, b.resolution], "n": [a.moments.n, b.moments.n],
              "inputs": [a.name, b.name], "reference": ref}
        fp["id"] = hashlib.sha256(json.dumps({k: v for k, v in fp.items() if k != "inputs"}, sort_keys=True,
                                             default=str).encode()).hexdigest()[:16]
        return fp

    # statistics -> metric
    def fid(self, spec_a, spec_b, bootstrap: int = 0, seed: int = 0, limit: int | None = None) -> dict:
        check_bootstrap(bootstrap)  # before any image is embedded
        check_limit(limit)
        if bootstrap and is_stats_file(spec_a):  # its images are not the set its mu/sigma describe
            raise UserError(f"{spec_a}: --bootstrap resamples the images of A; A is a statistics file. Give A as "
                            "images (a folder, an .npz of images, or --generator)")
        a = self.set_stats(spec_a, keep_features=bootstrap > 0, limit=limit)
        b = self.set_stats(spec_b, limit=limit)
        return self.fid_from_stats(a, b, bootstrap, seed)

    def fid_from_stats(self, a: SetStats, b: SetStats, bootstrap: int = 0, seed: int = 0) -> dict:
        check_bootstrap(bootstrap)
        name = self.metric  # "fid", or "fd_dinov2" (the same distance in DINOv2 feature space)
        rows = a.features if a.stats_file_sha256 is None else None  # a reference batch's images are not its mu
        out = {name: frechet_distance(a.moments, b.moments, rows), "n": a.moments.n,
               "fingerprint": self.fingerprint(a, b)}
        if bootstrap > 0 and dist.is_main():  # the features are on rank 0 only (torchrun)
            lo, hi, bias = bootstrap_frechet(a.features, b.moments, bootstrap, seed=seed)
            out[f"{name}_ci95"] = [lo, hi]
            out["bootstrap_bias"] = bias
            out["bootstrap_reps"] = bootstrap
        return out

    def kid(self, spec_a, spec_b, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
            seed: int = 2020, limit: int | None = None) -> dict:
        check_kid(subsets, subset_size)
        check_limit(limit)
        a = self.set_stats(spec_a, keep_features=True, limit=limit)
        b = self.set_stats(spec_b, keep_features=True, limit=limit)
        return self.kid_from_stats(a, b, subsets, subset_size, seed)

    def kid_from_stats(self, a: SetStats, b: SetStats, subsets: int = KID_SUBSETS,
                       subset_size: int = KID_SUBSET_SIZE, seed: int = 2020) -> dict:
        size = min(subset_size, a.moments.n, b.moments.n)
        # torch-fidelity's own KID (polynomial kernel, degree 3, unbiased MMD over random subsets).
        from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

        m = kid_features_to_metric(a.features, b.features, kid_subsets=subsets, kid_subset_size=size,
                                   verbose=False, rng_seed=seed, kid_kernel="poly", kid_kernel_poly_degree=3,
                                   kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
        fp = self.fingerprint(a, b) | {"kid_subsets": subsets, "kid_subset_size": size}
        return {"kid_mean": m[KEY_METRIC_KID_MEAN], "kid_std": m[KEY_METRIC_KID_STD],
                "n": a.moments.n, "fingerprint": fp}

    def precision_recall(self, spec_a, spec_b, k: int = PR_K, limit: int | None = None) -> dict | None:
        """Improved precision and recall (k-NN manifolds, Kynkäänniemi et al. 2019) of A (samples) against B (the
        reference), from the same Inception features as FID; both sides need images. None on ranks other than 0."""
        check_k(k)
        check_limit(limit)
        for spec in (spec_a, spec_b):  # before any image is embedded
            _check_has_images(spec, "precision and recall need")
        a = self.set_stats(spec_a, keep_features=True, limit=limit)
        b = self.set_stats(spec_b, keep_features=True, limit=limit)
        return self.pr_from_stats(a, b, k) if dist.is_main() else None

    def pr_from_stats(self, a: SetStats, b: SetStats, k: int = PR_K) -> dict:
        r = precision_recall(a.features, b.features, k=k)
        return r | {"fingerprint": self.fingerprint(a, b) | {"pr_k": k}}


def _check_has_images(spec, need: str) -> None:
    if is_stats_only(spec):
        raise UserError(f"{spec}: a statistics file (mu, sigma) has no per-image features; {need} the images (a "
                        "folder, an .npz of images (arr_0), an ADM reference batch holding arr_0, or --generator)")


def _read_cache(path: Path, need_features: bool, dim: int = FEATURE_DIM):
    """(Moments, features or None) of a cache entry; None if it lacks the features asked for. A damaged entry
    (truncated by a killed writer on another file system, corrupt, or holding non-finite or misshapen moments) is
    deleted with a warning and recomputed: the cache is ours to rebuild, so it is never the user's error."""
    try:
        with np.load(path, allow_pickle=False) as z:
            feats = torch.from_numpy(z["features"]) if need_features and "features" in z.files else None
            moments = Moments(z["mu"], z["sigma"], int(z["n"]))
        ok = (moments.mu.shape == (dim,) and moments.sigma.shape == (dim, dim)
              and np.isfinite(moments.mu).all() and np.isfinite(moments.sigma).all()
              and (feats is None or feats.shape == (moments.n, dim)))
        problem = None if ok else "unexpected shapes or non-finite values"
    except (*NPZ_READ_ERRORS, KeyError, TypeError, AttributeError) as e:  # AttributeError: a bare .npy
        problem = f"{type(e).__name__}: {e}"
    if problem is None:
        return None if need_features and feats is None else (moments, feats)  # None: computed again, with them
    if dist.is_main():
        warnings.warn(f"statistics cache entry {path} is damaged ({problem}); deleted, recomputing it", stacklevel=3)
        path.unlink(missing_ok=True)
    return None


def _write_cache(path: Path, s: SetStats) -> None:
    arrays = {"mu": s.moments.mu, "sigma": s.moments.sigma, "n": np.asarray(s.moments.n)}
    if s.features is not None:
        arrays["features"] = s.features.numpy()
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
