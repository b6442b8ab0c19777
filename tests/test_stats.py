"""Closed forms for the statistics and the Fréchet distance (no network needed)."""
import numpy as np
import pytest
import torch

from ulbench.errors import UserError
from ulbench.metrics.stats import FeatureStats, Moments, bootstrap_frechet, frechet_distance, trace_sqrt_product


def _random_cov(rng, d, n=None):
    x = rng.standard_normal((n or 2 * d, d))
    return np.cov(x, rowvar=False)


def test_streaming_moments_equal_numpy_in_any_batching():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((257, 16)) * 3 + 5
    one, many = FeatureStats(), FeatureStats()
    one.update(torch.from_numpy(x))
    for chunk in np.array_split(x, 13):
        many.update(torch.from_numpy(chunk))
    for s in (one, many):
        m = s.moments()
        np.testing.assert_allclose(m.mu, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(m.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
        assert m.n == 257


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    m = Moments(rng.standard_normal(64), _random_cov(rng, 64))
    assert abs(frechet_distance(m, m)) < 1e-6


def test_equal_covariances_give_squared_mean_difference():
    rng = np.random.default_rng(2)
    sigma = _random_cov(rng, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    got = frechet_distance(Moments(mu1, sigma), Moments(mu2, sigma))
    assert got == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9, abs=1e-9)


def test_ill_conditioned_covariances_match_closed_form():
    # Commuting covariances S1 = U diag(a) U^T, S2 = U diag(b) U^T: tr sqrt(S1^1/2 S2 S1^1/2) = sum sqrt(a b) exactly.
    # Eigenvalues span 14 decades and a quarter are exactly zero: the singular, ill-conditioned product on which
    # scipy.linalg.sqrtm returns complex values (and, in some scipy versions, garbage).
    rng = np.random.default_rng(3)
    d = 256
    u, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = np.concatenate([np.logspace(-12, 2, d - 64), np.zeros(64)])
    b = np.concatenate([np.logspace(-10, 1, d - 64), np.zeros(64)])
    s1, s2 = (u * a) @ u.T, (u * b) @ u.T
    expected = np.sqrt(a * b).sum()
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-6)
    fid = frechet_distance(Moments(np.zeros(d), s1), Moments(np.zeros(d), s2))
    assert isinstance(fid, float) and np.isfinite(fid)
    assert fid == pytest.approx(a.sum() + b.sum() - 2 * expected, rel=1e-6)


def test_rank_deficient_covariances_are_handled():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((10, 128)), rng.standard_normal((10, 128)) + 0.5  # rank 9 covariances
    ma = Moments(x.mean(0), np.cov(x, rowvar=False))
    mb = Moments(y.mean(0), np.cov(y, rowvar=False))
    fid = frechet_distance(ma, mb)
    # reference: torch-fidelity's formula (complex eigenvalues of the non-symmetric product)
    ref_tr = np.sum(np.sqrt(np.linalg.eigvals(ma.sigma @ mb.sigma).astype(complex)).real)
    ref = np.sum((ma.mu - mb.mu) ** 2) + np.trace(ma.sigma) + np.trace(mb.sigma) - 2 * ref_tr
    assert fid == pytest.approx(ref, rel=1e-6)  # both differ only in round-off on the ~zero eigenvalues


def test_adm_npz_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    m = Moments(rng.standard_normal(8), _random_cov(rng, 8), n=16)
    m.save_npz(tmp_path / "ref.npz", resize="legacy")
    with np.load(tmp_path / "ref.npz") as z:  # the ADM layout: plain arrays 'mu' and 'sigma'
        assert set(z.files) >= {"mu", "sigma"}
        np.testing.assert_array_equal(z["mu"], m.mu)
    back = Moments.load_npz(tmp_path / "ref.npz")
    np.testing.assert_array_equal(back.sigma, m.sigma)
    assert back.n == 16 and frechet_distance(back, m) == pytest.approx(0, abs=1e-9)


def test_bad_stats_file_is_named(tmp_path):
    np.savez(tmp_path / "x.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(UserError, match=r"x\.npz.*'mu' and 'sigma'"):
        Moments.load_npz(tmp_path / "x.npz")


def test_bootstrap_interval_covers_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(6)
    d = 8
    ref = Moments(np.zeros(d), np.eye(d))
    widths = []
    for n in (50, 800):
        x = torch.from_numpy(rng.standard_normal((n, d)) + 0.3)
        point = frechet_distance(Moments(x.numpy().mean(0), np.cov(x.numpy(), rowvar=False), n), ref)
        lo, hi, bias = bootstrap_frechet(x, ref, reps=200, seed=0)
        assert lo <= point <= hi
        assert bias > 0  # resampling with replacement inflates FID
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_bootstrap_small_n_form_equals_the_full_product():
    """N <= D takes the N x N Gram form: its trace equals the D x D product's, and the whole interval equals a
    bootstrap written out with frechet_distance on the same draws."""
    from ulbench.metrics.stats import _trace_sqrt_gram

    rng = np.random.default_rng(7)
    d, n = 96, 30
    ref_x = rng.standard_normal((400, d)) * np.linspace(0.1, 3, d)
    ref = Moments(ref_x.mean(0), np.cov(ref_x, rowvar=False), 400)
    x = rng.standard_normal((n, d)) + 0.2
    xc = x - x.mean(0)
    assert _trace_sqrt_gram(xc, ref.sigma, n - 1) == pytest.approx(
        trace_sqrt_product(ref.sigma, xc.T @ xc / (n - 1)), rel=1e-10)
    lo, hi, bias = bootstrap_frechet(torch.from_numpy(x), ref, reps=25, seed=3)
    draws = np.random.default_rng(3)
    full = [frechet_distance(Moments(xb.mean(0), np.cov(xb, rowvar=False), n), ref)
            for xb in (x[draws.integers(0, n, n)] for _ in range(25))]
    point = frechet_distance(Moments(x.mean(0), np.cov(x, rowvar=False), n), ref)
    want_bias = np.mean(full) - point
    want = np.quantile(full, [0.025, 0.975]) - want_bias
    assert bias == pytest.approx(want_bias, rel=1e-9)
    assert (lo, hi) == pytest.approx(tuple(want), rel=1e-9)


def test_frechet_distance_from_rows_equals_the_moments_form():
    """Given the N <= D rows of A, the cross term comes from the N x N Gram form: the same distance as the D x D
    eigendecompositions (to 1e-10), on FeatureStats' own float64 moments; more rows than D, or rows that are not
    A's (a count that differs), take the moments form."""
    rng = np.random.default_rng(11)
    d = 64
    ref_x = rng.standard_normal((300, d)) * np.linspace(0.2, 2, d)
    ref = Moments(ref_x.mean(0), np.cov(ref_x, rowvar=False), 300)
    for n in (5, 40, d):
        fs = FeatureStats(d, keep_features=True)
        fs.update(torch.from_numpy(rng.standard_normal((n, d)) * 1.5 + 0.3).float())
        a = fs.moments()
        want = frechet_distance(a, ref)
        assert want > 1 and frechet_distance(a, ref, fs.features) == pytest.approx(want, rel=1e-10)
    assert frechet_distance(a, ref, fs.features[:-1]) == want  # not A's rows: the moments form, bit for bit
    big = rng.standard_normal((2 * d, d))
    m = Moments(big.mean(0), np.cov(big, rowvar=False), 2 * d)
    assert frechet_distance(m, ref, big) == frechet_distance(m, ref)


def test_nearest_centroid_accuracy_closed_form():
    """Two well separated classes: samples drawn at their own class mean score 1, at the other class's mean 0, half
    and half 0.5; a class the reference lacks counts as a miss."""
    from ulbench.metrics.stats import nearest_centroid_accuracy

    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.normal(0, 1, (50, 8)), rng.normal(10, 1, (50, 8))])
    ref_labels = np.repeat([0, 1], 50)
    samples = np.concatenate([rng.normal(0, 1, (20, 8)), rng.normal(10, 1, (20, 8))])
    assert nearest_centroid_accuracy(samples, np.repeat([0, 1], 20), ref, ref_labels) == 1.0
    assert nearest_centroid_accuracy(samples, np.repeat([1, 0], 20), ref, ref_labels) == 0.0
    assert nearest_centroid_accuracy(samples, np.tile([0, 1], 20), ref, ref_labels) == 0.5
    assert nearest_centroid_accuracy(samples[:4], np.array([0, 0, 2, 2]), ref, ref_labels) == 0.5


def test_photos_are_labelled_by_their_source_photo():
    """The bundled-photo crops carry the photo they were cut from (9 classes); the same pixels as before."""
    from ulbench.data import photos
    from ulbench.metrics.images import BUNDLED_PHOTOS, photo_crops

    ds = photos(32, n=64)
    crops, sources = photo_crops(12345, 64, size=128, sources=True)
    assert ds.num_classes == len(BUNDLED_PHOTOS) == 9 and ds.labels.tolist() == sources.tolist()
    assert len(set(sources.tolist())) > 5 and np.array_equal(crops, photo_crops(12345, 64, size=128))
