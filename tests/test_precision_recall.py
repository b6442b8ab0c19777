"""Improved precision and recall: closed forms on hand-made feature sets (no network)."""
import numpy as np
import pytest
import torch

from ulbench.errors import UserError
from ulbench.metrics.precision_recall import manifold_radii, precision_recall


def _on_a_line(xs, dim: int = 3) -> torch.Tensor:
    """Points x along the first axis of R^dim."""
    out = torch.zeros(len(xs), dim, dtype=torch.float64)
    out[:, 0] = torch.tensor(xs, dtype=torch.float64)
    return out


def test_identical_sets_give_one_and_one():
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    r = precision_recall(x, x.clone(), device="cpu")
    assert (r["precision"], r["recall"], r["k"], r["n"], r["n_reference"]) == (1.0, 1.0, 3, 40, 40)


def test_far_disjoint_sets_give_zero_and_zero():
    g = torch.Generator().manual_seed(1)
    r = precision_recall(torch.randn(30, 16, generator=g) + 1000.0, torch.randn(40, 16, generator=g), device="cpu")
    assert (r["precision"], r["recall"]) == (0.0, 0.0)


def test_points_on_a_line_k3():
    # Reference 0..4, k=3: radii 3, 2, 2, 2, 3 -> balls [-3,3] [-1,3] [0,4] [1,5] [1,7], union [-3, 7].
    # Samples 5, 7, 8, 9, 30: radii 4, 2, 3, 4, 23 -> balls [1,9] [5,9] [5,11] [5,13] [7,53], union [1, 53].
    # Precision: 5 and 7 (on the surface: inside) of 5 samples = 0.4. Recall: 1 (on the surface), 2, 3, 4 = 0.8.
    ref, gen = _on_a_line([0, 1, 2, 3, 4]), _on_a_line([5, 7, 8, 9, 30])
    assert manifold_radii(ref).tolist() == [3, 2, 2, 2, 3]
    assert manifold_radii(gen).tolist() == [4, 2, 3, 4, 23]
    r = precision_recall(gen, ref, device="cpu")
    assert (r["precision"], r["recall"]) == (0.4, 0.8)


def test_points_on_a_line_k1():
    # Reference 0, 2, 4, 20 (radii 2, 2, 2, 16); samples 1, 10, 40, 60 (radii 9, 9, 20, 20).
    # Precision: 1 (in [-2, 2]) and 10 (in [4, 36]) = 0.5; recall: 0, 2, 4 (in [-8, 10]) and 20 (surface of 40's) = 1.
    r = precision_recall(_on_a_line([1, 10, 40, 60]), _on_a_line([0, 2, 4, 20]), k=1, device="cpu")
    assert (r["precision"], r["recall"]) == (0.5, 1.0)


def test_blocks_do_not_change_the_result():
    g = torch.Generator().manual_seed(2)
    gen, ref = torch.randn(70, 8, generator=g) * 1.3 + 0.4, torch.randn(50, 8, generator=g)
    whole = precision_recall(gen, ref, device="cpu")
    assert 0 < whole["precision"] < 1 and 0 < whole["recall"] < 1
    assert precision_recall(gen.numpy(), ref.float(), device="cpu", block_bytes=8 * 50 * 7) == whole  # 7-row blocks


@pytest.mark.parametrize("k, gen, ref, needle", [
    (0, np.zeros((5, 2)), np.zeros((5, 2)), "k=0"),
    (3, np.zeros((3, 2)), np.zeros((5, 2)), "samples: 3 images, but precision/recall with k=3 needs at least 4"),
    (3, np.zeros((5, 2)), np.zeros((5, 3)), "feature dimensions differ"),
])
def test_bad_input_is_named(k, gen, ref, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        precision_recall(gen, ref, k=k, device="cpu")
