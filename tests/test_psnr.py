"""PSNR: parity with scikit-image per image, the [-1, 1] / range-1 mistake, paired folders."""
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from conftest import write_pngs
from ulbench.errors import UserError
from ulbench.metrics.images import photo_crops, quantize_images
from ulbench.metrics.psnr import psnr_paired, psnr_per_image


def _noisy(arr, sigma, seed):
    rng = np.random.default_rng(seed)
    return np.clip(arr + rng.normal(0, sigma, arr.shape), 0, 255).round().astype(np.uint8)


def test_per_image_psnr_equals_scikit_image():
    a = photo_crops(3, 12)
    b = _noisy(a.astype(np.float64), 8.0, 0)
    ours = psnr_per_image(a, b)
    ref = [peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_float_inputs_are_refused_and_the_range_mistake_is_6_dB():
    import torch

    a = photo_crops(4, 4)
    b = _noisy(a.astype(np.float64), 6.0, 1)
    right = psnr_per_image(a, b)
    # The mistake: [-1, 1] floats with data range 1 (instead of 2, or uint8 with 255) is off by 20*log10(2) dB.
    # (protocols.md calls it an inflation; measured, it reads 6.02 dB *low*: the MSE is 4x the range-1 scale.)
    af, bf = a / 127.5 - 1, b / 127.5 - 1
    wrong = np.array([peak_signal_noise_ratio(x, y, data_range=1) for x, y in zip(af, bf)])
    np.testing.assert_allclose(right - wrong, 20 * np.log10(2), atol=1e-6)
    with pytest.raises(UserError, match="uint8"):
        psnr_per_image(af, bf)
    # The supported path: quantize floats like a saved PNG, then measure; it gives the right value.
    qa = quantize_images(torch.from_numpy(af).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    qb = quantize_images(torch.from_numpy(bf).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(psnr_per_image(qa, qb), right, atol=1e-9)


def test_paired_folders_mean_and_std(tmp_path):
    a = photo_crops(5, 6)
    b = _noisy(a.astype(np.float64), 10.0, 2)
    r = psnr_paired(write_pngs(a, tmp_path / "a"), write_pngs(b, tmp_path / "b"))
    ref = np.array([peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b)])
    assert r["n"] == 6
    assert r["psnr_mean"] == pytest.approx(ref.mean(), rel=1e-12)
    assert r["psnr_std"] == pytest.approx(ref.std(), rel=1e-9)


def test_unequal_sets_are_named(tmp_path):
    a = photo_crops(5, 3)
    with pytest.raises(UserError, match="has 3 images.*has 2"):
        psnr_paired(write_pngs(a, tmp_path / "a"), write_pngs(a[:2], tmp_path / "b"))
