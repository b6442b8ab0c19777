"""Improved precision and recall (Kynkäänniemi et al. 2019) of generated vs reference Inception features.

Each set's manifold is the union of balls around its points, the radius of a point being the distance to its k-th
nearest neighbour in its own set (itself excluded; k = 3, as ADM's evaluator reports them). Precision is the fraction
of samples inside the reference manifold, recall the fraction of reference points inside the sample manifold. A
point on a ball's surface is inside (``<=``, as in the paper's code and ADM's). Distances are float64 ``torch.cdist``
blocks of at most ``block_bytes``, so 50k x 50k pairs never sit in memory at once.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from ulbench.errors import UserError

PR_K = 3  # neighbourhood size of ADM's evaluator (Kynkäänniemi et al. 2019 use k = 3 too)
BLOCK_BYTES = 256 * 2**20  # one block of float64 distances [choice]


def _rows_per_block(n_cols: int, block_bytes: int) -> int:
    return max(1, block_bytes // (8 * max(n_cols, 1)))


def _as_features(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise UserError(f"{name}: features must be (N, D), got shape {tuple(t.shape)}")
    return t.to(torch.float64)


def check_k(k: int, *counts_and_names: tuple[int, str]) -> None:
    """k >= 1, and each set holds more than k points (a k-th neighbour other than the point itself)."""
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
        raise UserError(f"k={k!r}: the neighbourhood size must be an integer >= 1 (ADM and the paper use 3)")
    for n, name in counts_and_names:
        if n <= k:
            raise UserError(f"{name}: {n} images, but precision/recall with k={k} needs at least {k + 1} (each "
                            "point's k-th nearest neighbour other than itself); give more images or a smaller k")


def manifold_radii(features: torch.Tensor, k: int = PR_K, block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
    """(N,) distance of each point to its k-th nearest neighbour in ``features`` (N, D), itself excluded."""
    n = len(features)
    rows = _rows_per_block(n, block_bytes)
    radii = torch.empty(n, dtype=torch.float64, device=features.device)
    for lo in range(0, n, rows):
        d = torch.cdist(features[lo: lo + rows], features)  # (b, N); the point itself is at 0, the 1st smallest
        radii[lo: lo + rows] = d.kthvalue(k + 1, dim=1).values  # Sec. 2: |phi' - NN_k(phi')|
    return radii


def precision_recall(samples, reference, k: int = PR_K, device: str | torch.device | None = None,
                     block_bytes: int = BLOCK_BYTES) -> dict:
    """{"precision", "recall", "k", "n", "n_reference"} of sample features (N, D) against reference features (M, D).

    ``device``: where the distances are computed (default: CUDA when available, float64 either way)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    phi_g, phi_r = _as_features(samples, "samples").to(device), _as_features(reference, "reference").to(device)
    check_k(k, (len(phi_g), "samples"), (len(phi_r), "reference"))
    if phi_g.shape[1] != phi_r.shape[1]:
        raise UserError(f"feature dimensions differ: samples {phi_g.shape[1]}, reference {phi_r.shape[1]}")
    r_r = manifold_radii(phi_r, k, block_bytes)  # (M,)
    r_g = manifold_radii(phi_g, k, block_bytes)  # (N,)
    g_in_r = torch.zeros(len(phi_g), dtype=torch.bool, device=device)  # f(phi_g, Phi_r) of eq. (1)
    r_in_g = torch.zeros(len(phi_r), dtype=torch.bool, device=device)  # f(phi_r, Phi_g)
    rows = _rows_per_block(len(phi_r), block_bytes)
    for lo in range(0, len(phi_g), rows):
        d = torch.cdist(phi_g[lo: lo + rows], phi_r)  # (b, M): each block serves both directions
        g_in_r[lo: lo + rows] = (d <= r_r[None, :]).any(dim=1)
        r_in_g |= (d <= r_g[lo: lo + rows, None]).any(dim=0)
    # Sec. 2 eq. (2): precision = mean over samples of f(phi_g, Phi_r); recall = mean over reference of f(phi_r, Phi_g)
    return {"precision": float(g_in_r.double().mean()), "recall": float(r_in_g.double().mean()), "k": k,
            "n": len(phi_g), "n_reference": len(phi_r)}
