"""FID/KID on real photo crops: parity with torch-fidelity and clean-fid, invariances, reference statistics."""
import numpy as np
import pytest
import torch

from conftest import N_PARITY
from ulbench.metrics.images import folder_source, prepare_batch


@pytest.fixture(scope="session")
def torch_fidelity_result(photo_dirs, tf_weights_pt):
    import torch_fidelity

    a, b = photo_dirs
    return torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), fid=True, kid=True, kid_subset_size=N_PARITY, cuda=False, cache=False,
        verbose=False, feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(tf_weights_pt))


@pytest.fixture(scope="session")
def folder_fid(evaluator, photo_dirs):
    """FID of the two photo folders, computed once: the value every other input form must reproduce."""
    return evaluator.fid(photo_dirs[0], photo_dirs[1])


@pytest.fixture(scope="session")
def ref_npz(evaluator, photo_dirs, tmp_path_factory):
    """The second folder's statistics as a reference .npz (with the protocol that made them)."""
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    evaluator.set_stats(photo_dirs[1]).moments.save_npz(path, **evaluator.protocol())
    return path


@pytest.mark.slow
def test_fid_matches_torch_fidelity(folder_fid, torch_fidelity_result):
    ours = folder_fid
    ref = torch_fidelity_result["frechet_inception_distance"]
    assert ours["fid"] == pytest.approx(ref, rel=1e-4)
    assert ours["n"] == N_PARITY and ours["fid"] > 10  # different crops: clearly non-zero


def test_kid_matches_torch_fidelity(evaluator, photo_dirs, torch_fidelity_result):
    ours = evaluator.kid(photo_dirs[0], photo_dirs[1], subset_size=N_PARITY)
    assert ours["kid_mean"] == pytest.approx(torch_fidelity_result["kernel_inception_distance_mean"], rel=1e-3)


@pytest.mark.slow
def test_clean_mode_matches_clean_fid(photo_dirs, inception_weights):
    from cleanfid import fid as cleanfid

    from ulbench.metrics.fid import ImageEvaluator
    from ulbench.metrics.inception import InceptionFeatures

    net = InceptionFeatures(inception_weights)  # the same network, given to clean-fid as its extractor
    ref = cleanfid.compute_fid(str(photo_dirs[0]), str(photo_dirs[1]), mode="clean", custom_feat_extractor=net,
                               device=torch.device("cpu"), num_workers=0, batch_size=25, verbose=False,
                               use_dataparallel=False)
    ours = ImageEvaluator(resize="clean", progress=False, use_cache=False).fid(photo_dirs[0], photo_dirs[1])
    assert ours["fid"] == pytest.approx(ref, rel=1e-3)
    assert ours["fingerprint"]["resize"] == "clean"


def test_fid_with_itself_is_zero(evaluator, photo_dirs):
    assert abs(evaluator.fid(photo_dirs[0], photo_dirs[0])["fid"]) < 1e-6


def test_features_do_not_depend_on_batch_size(evaluator, photo_dirs):
    src = folder_source(photo_dirs[0])  # all N_PARITY = 50 images: batch 1 vs batch 50
    images = [img for batch in src.batches(N_PARITY) for img in batch]
    whole = evaluator.net(prepare_batch(images, "legacy"))
    single = torch.cat([evaluator.net(prepare_batch([img], "legacy")) for img in images])
    rel = (whole - single).abs().max() / whole.abs().max()
    assert rel <= 1e-5


def test_mixed_sizes_give_each_image_its_own_features(evaluator, photo_dirs):
    src = folder_source(photo_dirs[0], limit=2)
    a, b = [img for batch in src.batches(2) for img in batch]
    b_small = b[:96, :80]
    mixed = evaluator.net(prepare_batch([a, b_small], "legacy"))
    alone = evaluator.net(prepare_batch([b_small], "legacy"))
    assert torch.allclose(mixed[1], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_reference_stats_give_same_fid_as_folder(evaluator, photo_dirs, folder_fid, ref_npz):
    from_stats = evaluator.fid(photo_dirs[0], ref_npz)
    assert from_stats["fid"] == pytest.approx(folder_fid["fid"], rel=1e-12)
    assert "sha256" in from_stats["fingerprint"]["reference"]


@pytest.mark.slow
def test_npz_tensor_and_generator_inputs_agree_with_folder(evaluator, folder_fid, ref_npz, tmp_path):
    from ulbench.metrics.images import photo_crops

    arr = photo_crops(0, N_PARITY)  # the same pixels the folder fixture holds as PNG (lossless)
    np.savez(tmp_path / "samples.npz", arr_0=arr)
    ref = folder_fid["fid"]  # against the reference statistics (equal to the folder's to 1e-12, test above)
    assert evaluator.fid(tmp_path / "samples.npz", ref_npz)["fid"] == pytest.approx(ref, rel=1e-9)
    nchw = torch.from_numpy(arr).permute(0, 3, 1, 2)
    assert evaluator.fid(nchw, ref_npz)["fid"] == pytest.approx(ref, rel=1e-9)
    gen = (nchw[i: i + 7] for i in range(0, N_PARITY, 7))  # odd batch size: re-batched internally
    assert evaluator.fid(gen, ref_npz)["fid"] == pytest.approx(ref, rel=1e-6)


def test_float_samples_are_refused_with_the_fix(evaluator, photo_dirs):
    from ulbench.errors import UserError

    with pytest.raises(UserError, match="quantize_images"):
        evaluator.fid(torch.rand(4, 3, 32, 32) * 2 - 1, photo_dirs[1])


def test_statistics_cache_is_keyed_by_protocol(photo_dirs, tmp_path, monkeypatch, inception_weights):
    from ulbench.metrics.fid import ImageEvaluator

    monkeypatch.setenv("ULBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ULBENCH_INCEPTION_WEIGHTS", str(_source_of(inception_weights)))
    legacy = ImageEvaluator(progress=False)
    first = legacy.fid(photo_dirs[0], photo_dirs[1])
    cached = list((tmp_path / "cache" / "stats").glob("*.npz"))
    assert len(cached) == 2
    calls = []
    legacy.features = lambda *a, **k: calls.append(1)  # a cache hit must not run Inception again
    assert legacy.fid(photo_dirs[0], photo_dirs[1])["fid"] == first["fid"] and not calls
    clean = ImageEvaluator(resize="clean", progress=False)
    assert clean._cache_path(folder_source(photo_dirs[0])) != legacy._cache_path(folder_source(photo_dirs[0]))


@pytest.mark.slow
def test_bootstrap_interval_on_real_features(evaluator, photo_dirs):
    r = evaluator.fid(photo_dirs[0], photo_dirs[1], bootstrap=20)
    lo, hi = r["fid_ci95"]
    assert lo < r["fid"] < hi


def _source_of(_converted):
    from ulbench import assets

    return assets.source_path(assets.INCEPTION)
