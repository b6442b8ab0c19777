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


def test_suite_metrics_precision_recall(tmp_path):
    from ulbench.metrics.stats import Moments
    from ulbench.suite import load_suite
    from ulbench.suite.schema import SuiteError

    Moments(np.zeros(4), np.eye(4), 10).save_npz(tmp_path / "stats.npz")
    path = tmp_path / "s.yaml"
    text = ("version: 1\ndataset: {name: photos, resolution: 32}\nmethods: [{name: m, preset: ul-tiny}]\n"
            "compute: {ladder: [1.0e12]}\nevaluation: {%s}\n")
    path.write_text(text % "metrics: [fid, precision, recall]")
    assert load_suite(path).evaluation.metrics == ("fid", "precision", "recall")
    path.write_text(text % "num_samples: 8")
    assert not {"precision", "recall"} & set(load_suite(path).evaluation.metrics)  # optional: by name only
    path.write_text(text % f"metrics: [fid, recall], reference: {tmp_path / 'stats.npz'}")
    with pytest.raises(SuiteError, match=r"evaluation.metrics\[1\]: recall need the reference images' features"):
        load_suite(path)
    path.write_text(text % "metrics: [precision], num_samples: 3")
    with pytest.raises(SuiteError, match="precision needs at least 4 samples .each image needs 3 nearest neighbours"):
        load_suite(path)


def test_sweep_rows_come_from_the_fid_features(tmp_path):
    """Sweep.evaluate_samples: precision and recall rows from the very features FID uses (samples and reference)."""
    from types import SimpleNamespace

    from ulbench.metrics.fid import ImageEvaluator, SetStats
    from ulbench.metrics.stats import FeatureStats
    from ulbench.suite import load_suite
    from ulbench.run.sweep import Sweep

    g = torch.Generator().manual_seed(3)
    feats = {"samples": torch.randn(30, 4, generator=g) * 0.6 + 0.8, "reference": torch.randn(20, 4, generator=g)}
    kept = {}

    class Features(ImageEvaluator):  # the evaluator's own statistics -> metric stages on hand-made features
        def __init__(self):
            self.resize, self.metric = "legacy", "fid"
            self._protocol = {"extractor": "test", "resize": "legacy"}

        def set_stats(self, spec, keep_features=False, limit=None):
            name = spec if isinstance(spec, str) else "samples"  # the samples come as an array of images
            kept[name] = keep_features
            fs = FeatureStats()
            fs.update(feats[name])
            return SetStats(fs.moments(), name, (8, 8), feats[name].float() if keep_features else None)

    (tmp_path / "s.yaml").write_text("version: 1\ndataset: {name: photos, resolution: 32}\nmethods: [{name: m, preset: "
                                     "ul-tiny}]\ncompute: {ladder: [1.0e12]}\nevaluation: {metrics: [fid, recall, "
                                     "precision], num_samples: 30}\n")
    fake = SimpleNamespace(suite=load_suite(tmp_path / "s.yaml"), run_dir=tmp_path, evaluator=Features(),
                           generate=lambda *a: np.zeros((30, 8, 8, 3), np.uint8), reference=lambda: "reference",
                           fingerprint=lambda fp, n=None: fp,
                           row=lambda *a, **kw: dict(zip(("metric", "value"), a[3:5])))
    rows = Sweep.evaluate_samples(fake, SimpleNamespace(name="m", guidance=[1.0], official=None), None, 0)
    expected = precision_recall(feats["samples"], feats["reference"], device="cpu")
    assert kept == {"samples": True, "reference": True}
    assert [r["metric"] for r in rows] == ["fid", "precision", "recall"]
    assert (rows[1]["value"], rows[2]["value"]) == (expected["precision"], expected["recall"])
    assert 0 < expected["precision"] < 1 and 0 < expected["recall"] < 1
