"""Features -> statistics -> Fréchet distance, shared by FID and FVD.

Stages (named after what they map, as in torch-fidelity): ``FeatureStats`` accumulates a float64 mean and
covariance from a stream of feature batches; ``frechet_distance`` maps two statistics to the metric. Reference
statistics use the ADM / guided-diffusion ``.npz`` layout (``mu``, ``sigma``) so published references plug in.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ulbench.errors import UserError
from ulbench.io import atomic_write

# What numpy and zipfile raise on a truncated, corrupt or foreign ".npz": no central directory (BadZipFile), a cut
# member (EOFError, zlib.error, ValueError), a member's CRC (BadZipFile), a compression numpy cannot read
# (NotImplementedError), a pickle refused without allow_pickle (ValueError), I/O (OSError).
NPZ_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, NotImplementedError)


@contextlib.contextmanager
def read_npz(path: str | os.PathLike, fix: str) -> Iterator[np.lib.npyio.NpzFile]:
    """``np.load(path)`` of an ``.npz`` archive; any failure to read it (on opening or reading a member inside the
    ``with`` body) is a ``UserError`` naming ``path`` and ending with ``fix``."""
    try:
        archive = np.load(path, allow_pickle=False)
    except NPZ_READ_ERRORS as e:
        raise UserError(f"{path}: cannot read this .npz ({type(e).__name__}: {e}): the file is truncated, corrupt "
                        f"or not an .npz archive. {fix}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: a single .npy array, not an .npz archive. {fix}")
    with archive:
        try:
            yield archive
        except NPZ_READ_ERRORS as e:
            raise UserError(f"{path}: cannot read an array of this .npz ({type(e).__name__}: {e}): the file is "
                            f"truncated or corrupt. {fix}") from None


class FeatureStats:
    """Streaming float64 first and second moments of (N, D) feature batches; never holds all features."""

    def __init__(self, dim: int | None = None, keep_features: bool = False):
        self.dim = dim
        self.n = 0
        self._sum = None  # (D,) float64
        self._sum_outer = None  # (D, D) float64
        self.keep_features = keep_features
        self._kept: list[torch.Tensor] = []

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        x = torch.as_tensor(features).detach().to("cpu", torch.float64)  # (N, D)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
        if self._sum is None:
            self.dim = self.dim or x.shape[1]
            self._sum = torch.zeros(self.dim, dtype=torch.float64)
            self._sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        if x.shape[1] != self.dim:
            raise ValueError(f"feature dimension changed from {self.dim} to {x.shape[1]}")
        self.n += x.shape[0]
        self._sum += x.sum(0)
        self._sum_outer += x.T @ x
        if self.keep_features:
            self._kept.append(x.to(torch.float32))

    def reduce(self) -> "FeatureStats":
        """Combine the ranks' statistics (torchrun): float64 sums and counts are all-reduced, so every rank holds
        the moments of the whole set; kept features (KID, bootstrap) are gathered, in rank order, on rank 0 only."""
        from ulbench import dist

        if dist.rank_world()[1] == 1:
            return self
        if self._sum is None:  # a rank with no share of a small set
            self._sum = torch.zeros(self.dim, dtype=torch.float64)
            self._sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self.n = int(dist.all_reduce_sum(torch.tensor([self.n], dtype=torch.float64)).item())
        self._sum, self._sum_outer = dist.all_reduce_sum(self._sum), dist.all_reduce_sum(self._sum_outer)
        if self.keep_features:
            parts = dist.gather_to_main(self._kept)
            self._kept = [t for part in parts for t in part] if parts is not None else []
        return self

    @property
    def features(self) -> torch.Tensor:
        """All features seen (float32, (N, D)); only with ``keep_features=True`` (KID, bootstrap)."""
        if not self.keep_features:
            raise RuntimeError("features were not kept; construct FeatureStats(keep_features=True)")
        return torch.cat(self._kept) if self._kept else torch.zeros(0, self.dim or 0)

    def moments(self) -> "Moments":
        if self.n < 2:
            raise UserError(f"need at least 2 samples to estimate a covariance, got {self.n}")
        mu = self._sum / self.n
        # Unbiased covariance, the same estimator as np.cov(rowvar=False) used by torch-fidelity and ADM.
        sigma = (self._sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return Moments(mu=mu.numpy(), sigma=sigma.numpy(), n=self.n)


@dataclass
class Moments:
    """Mean and covariance of a feature set (float64) and the number of samples behind them (0 if unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int = 0

    def save_npz(self, path: str | os.PathLike, **extra: object) -> None:
        """Write the ADM layout (``mu``, ``sigma``) plus ``n`` and string metadata, atomically."""
        meta = {k: np.asarray(str(v)) for k, v in extra.items()}
        with atomic_write(path, "wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, n=np.asarray(self.n), **meta)

    @staticmethod
    def load_npz(path: str | os.PathLike) -> "Moments":
        fix = f"Write it again with `ulbench eval stats FOLDER -o {path}`."
        with read_npz(path, fix) as z:
            if "mu" not in z or "sigma" not in z:
                raise UserError(f"{path}: not a statistics file: expected arrays 'mu' and 'sigma' (ADM layout), "
                                f"found {sorted(z.files)}. {fix}")
            mu = np.asarray(z["mu"], dtype=np.float64)
            sigma = np.asarray(z["sigma"], dtype=np.float64)
            n = z["n"] if "n" in z else np.asarray(0)
        count = n.item() if n.size == 1 and n.dtype.kind in "iuf" else -1
        if not (count >= 0 and float(count).is_integer()):
            raise UserError(f"{path}: 'n' must be the sample count, a non-negative integer; got {n.dtype} {n.shape} "
                            f"{n.ravel()[:3]}")
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UserError(f"{path}: 'mu' has shape {mu.shape} and 'sigma' {sigma.shape}; expected (D,) and (D, D)")
        for name, x in (("mu", mu), ("sigma", sigma)):
            if not np.isfinite(x).all():
                raise UserError(f"{path}: '{name}' holds {int((~np.isfinite(x)).sum())} NaN or infinite value(s): "
                                f"the statistics were computed from bad features. {fix}")
        return Moments(mu=mu, sigma=sigma, n=int(count))


def _npz_members(spec: object) -> list[str]:
    """The member names of an existing, readable ``.npz`` (else none)."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).endswith(".npz") or not os.path.isfile(spec):
        return []
    try:
        archive = np.load(spec, allow_pickle=False)
    except NPZ_READ_ERRORS:  # unreadable: the image or clip reader names the file and the problem
        return []
    if not isinstance(archive, np.lib.npyio.NpzFile):
        return []
    with archive:
        return list(archive.files)


def is_stats_file(spec: object) -> bool:
    """True for an existing ``.npz`` holding ``mu`` (a statistics file rather than images or clips)."""
    return "mu" in _npz_members(spec)


def is_stats_only(spec: object) -> bool:
    """True for a statistics file without images. An ADM reference batch (``VIRTUAL_imagenet512.npz``) holds both
    statistics (``mu``, ``sigma``) and images (``arr_0``): as in ADM's evaluator, its statistics give the Frechet
    distance and its images the per-image features (precision/recall, KID)."""
    members = _npz_members(spec)
    return "mu" in members and "arr_0" not in members


def _clip_noise(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off removed: those below D * eps * max are set to 0.

    A covariance from N < D samples has D - N + 1 exact zeros that eigh returns as +-1e-16 * max; their square
    roots (1e-8 * sqrt(max) each, times thousands) would otherwise add ~1e-4 to FID(A, A).
    """
    tol = w.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix from its eigendecomposition."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(_clip_noise(w))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, sqrt_sigma1: np.ndarray | None = None) -> float:
    """tr((S1^1/2 S2 S1^1/2)^1/2) from the eigenvalues of a symmetric PSD product (no scipy.linalg.sqrtm)."""
    s1h = _psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
    m = s1h @ sigma2 @ s1h
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_clip_noise(eig)).sum())


def _trace_sqrt_gram(xc: np.ndarray, sigma2: np.ndarray, dof: int) -> float:
    """tr((S1^1/2 S2 S1^1/2)^1/2) for S1 = xc^T xc / dof given by its N centred rows (N <= D).

    With A = S2^1/2 xc^T, S2^1/2 S1 S2^1/2 = A A^T / dof has the same non-zero eigenvalues as A^T A / dof =
    xc S2 xc^T / dof, an N x N matrix: the same trace as ``trace_sqrt_product`` without a D x D product or
    decomposition.
    """
    g = xc @ sigma2 @ xc.T / dof
    return float(np.sqrt(_clip_noise(np.linalg.eigvalsh((g + g.T) / 2))).sum())


def frechet_distance(a: Moments, b: Moments, features_a: torch.Tensor | np.ndarray | None = None) -> float:
    """|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64 (protocols.md, FID).

    With ``features_a`` (the N rows ``a`` was computed from) and N <= D, the cross term comes from the N x N Gram
    form (``_trace_sqrt_gram``: the same value to ~1e-12 relative, without the two D x D eigendecompositions that
    cost ~3 s per call at D = 2048 on one CPU core); the other terms always come from the moments."""
    if a.mu.shape != b.mu.shape:
        raise UserError(f"statistics have different feature dimensions: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    diff = a.mu.astype(np.float64) - b.mu.astype(np.float64)
    s1, s2 = a.sigma.astype(np.float64), b.sigma.astype(np.float64)
    if features_a is not None and 2 <= len(features_a) <= s1.shape[0] and len(features_a) == a.n:
        x = np.asarray(features_a, dtype=np.float64)
        cross = _trace_sqrt_gram(x - x.mean(0), s2, len(x) - 1)
    else:
        cross = trace_sqrt_product(s1, s2)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * cross)


def bootstrap_frechet(
    features: torch.Tensor, reference: Moments, reps: int, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Bootstrap interval of the Fréchet distance at this N, resampling the (N, D) ``features`` with replacement.

    Resampling with replacement duplicates images, which by itself inflates FID (by tens of points at small N), so
    the raw percentile interval can miss the point estimate altogether. We report the percentile interval shifted
    by the bootstrap's estimate of that bias, ``b = mean(FID*) - FID``: ``[q_lo - b, q_hi - b]``. It measures the
    sampling spread of FID at this N, not the distance to the infinite-N value. Returns (lo, hi, b).
    The reference side is held fixed (usually a large precomputed set). With N <= D (the usual case at small N)
    each repetition costs an N x N eigendecomposition (``_trace_sqrt_gram``), otherwise the reference's square
    root is computed once and each repetition decomposes a D x D matrix.
    """
    if reps < 2:
        raise UserError(f"bootstrap repetitions = {reps}: a percentile interval needs at least 2 (use 0 for none)")
    x = features.to(torch.float64).numpy()
    n, d = x.shape
    rng = np.random.default_rng(seed)
    s_ref = reference.sigma.astype(np.float64)
    tr_ref = float(np.trace(s_ref))
    s_ref_half = None if n <= d else _psd_sqrt(s_ref)

    def distance(xs: np.ndarray) -> float:
        mu = xs.mean(0)
        xc = xs - mu
        diff = mu - reference.mu
        tr_sigma = float(np.einsum("ij,ij->", xc, xc)) / (n - 1)
        if s_ref_half is None:  # N <= D: the N x N form below, exact and ~(D/N)^2 times cheaper than D x D
            cross = _trace_sqrt_gram(xc, s_ref, n - 1)
        else:
            cross = trace_sqrt_product(s_ref, xc.T @ xc / (n - 1), s_ref_half)
        return float(diff @ diff + tr_sigma + tr_ref - 2 * cross)

    point = distance(x)
    values = np.array([distance(x[rng.integers(0, n, n)]) for _ in range(reps)])
    bias = float(values.mean() - point)
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo - bias), float(hi - bias), bias


def nearest_centroid_accuracy(features: torch.Tensor | np.ndarray, labels, reference: torch.Tensor | np.ndarray,
                              reference_labels) -> float:
    """Fraction of ``features`` (N, D) whose nearest class centroid (Euclidean, float64) among the means of
    ``reference`` (M, D) per label is their own label: whether class-conditional samples look like their class. A
    class absent from the reference counts as a miss for its samples."""
    f, r = (torch.as_tensor(np.asarray(x), dtype=torch.float64) for x in (features, reference))
    y, ry = (torch.as_tensor(np.asarray(x), dtype=torch.long) for x in (labels, reference_labels))
    classes = torch.unique(ry)
    centroids = torch.stack([r[ry == c].mean(0) for c in classes])  # (K, D)
    nearest = classes[torch.cdist(f, centroids).argmin(1)]  # (N,)
    return float((nearest == y).double().mean())
