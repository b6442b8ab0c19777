"""Training batches and latent caches: world-size invariance, exact resume, killed builds, cache keys, memory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ulbench.data import MemoryDataset, XFlip
from ulbench.data.base import to_float
from ulbench.data.folder import FolderDataset
from ulbench.data.latent_cache import LatentCache, LatentDataset, build_latent_cache
from ulbench.data.loader import StepBatchSampler, train_batches

N, BATCH, SEED = 50, 12, 7  # 12 does not divide 50: batches straddle epochs


def _global_batches(world: int, steps: int, start: int = 0) -> list[list[int]]:
    """Global batches as the union of simulated ranks' shares, in rank order."""
    ranks = [iter(StepBatchSampler(N, BATCH, SEED, start, rank=r, world=world)) for r in range(world)]
    return [sum((next(it) for it in ranks), []) for _ in range(steps)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_index_once_per_epoch_and_global_batches_do_not_depend_on_world_size(world):
    steps = -(-3 * N // BATCH)  # at least three epochs
    batches = _global_batches(world, steps)
    assert batches == _global_batches(1, steps)
    flat = sum(batches, [])
    for epoch in range(3):
        assert sorted(flat[epoch * N: (epoch + 1) * N]) == list(range(N))
    assert len({tuple(b) for b in batches}) == len(batches)  # not the same batch over and over


def test_resume_at_step_k_reproduces_the_rest_of_the_run():
    images = torch.arange(N, dtype=torch.float32).view(N, 1, 1, 1).expand(N, 3, 2, 2).contiguous()
    ds = MemoryDataset("ids", images, torch.arange(N) % 3, 3)
    straight = train_batches(ds, BATCH, SEED)
    run = [next(straight) for _ in range(10)]
    resumed = train_batches(ds, BATCH, SEED, start=6)
    for k in range(6, 10):
        x, y = next(resumed)
        assert torch.equal(x, run[k][0]) and torch.equal(y, run[k][1])
    # the same through DataLoader workers (the streamed path) as through the in-memory fast path
    xw, yw = next(train_batches(XFlip(ds), BATCH, SEED, start=6, workers=2))
    xs, ys = next(train_batches(XFlip(ds), BATCH, SEED, start=6))
    assert torch.equal(xw, xs) and torch.equal(yw, ys)


def test_uneven_world_split_is_refused():
    with pytest.raises(ValueError, match="does not split evenly"):
        StepBatchSampler(N, 10, 0, world=3)


def test_xflip_doubles_the_set_with_mirrored_copies():
    x = torch.randn(4, 3, 5, 5)
    ds = XFlip(MemoryDataset("r", x, torch.arange(4), 4))
    assert len(ds) == 8 and ds.labels.tolist() == [0, 1, 2, 3] * 2
    assert torch.equal(ds[6][0], x[2].flip(-1)) and torch.equal(ds[2][0], x[2]) and ds[6][1] == 2


def _pool(x):  # a deterministic "encoder": 4x average pooling of the [-1, 1] image
    return torch.nn.functional.avg_pool2d(to_float(x), 4)


def _photo_set(n=40):
    from ulbench.data import photos

    return photos(32, n=n)


def test_latent_cache_holds_the_encoder_output_and_its_mirror(tmp_path):
    ds = _photo_set()
    latents = LatentDataset(build_latent_cache(tmp_path / "c", {"k": 1}, ds, _pool, xflip=True, batch_size=7,
                                               shard_size=16, progress=False), ds.labels, xflip=True)
    assert len(latents) == 80 and len(list((tmp_path / "c").glob("latent-*.npy"))) == 3
    torch.testing.assert_close(latents[17][0], _pool(ds.images[17:18])[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(latents[40 + 17][0], _pool(ds.images[17:18].flip(-1))[0], rtol=0, atol=1e-6)
    x, y = next(train_batches(latents, 8, 0))
    assert x.shape == (8, 3, 8, 8) and y.dtype == torch.long


def test_latent_cache_rebuilds_for_another_encoder_or_changed_image(tmp_path):
    from PIL import Image

    from ulbench.data.builtin import write_photo_tree

    tree = write_photo_tree(tmp_path / "tree", 12, 40, 60, classes=2, seed=1)
    ds = FolderDataset(tree, 32)
    key = lambda enc: {"encoder_sha256": enc, "dataset": ds.fingerprint()}  # noqa: E731
    build_latent_cache(tmp_path / "c", key("a"), ds, _pool, progress=False)
    stamp = (tmp_path / "c" / "latent-00000.npy").stat().st_mtime_ns
    build_latent_cache(tmp_path / "c", key("a"), ds, _pool, progress=False)  # same key: reused, not rewritten
    assert (tmp_path / "c" / "latent-00000.npy").stat().st_mtime_ns == stamp
    cache = build_latent_cache(tmp_path / "c", key("b"), ds, lambda x: 2 * _pool(x), progress=False)  # retrained
    np.testing.assert_allclose(cache.field("latent", 3), 2 * _pool(ds[3][0][None])[0].numpy(), atol=1e-6)
    # one source image changed: another dataset fingerprint, the cache follows the new pixels
    victim = sorted(tree.rglob("*.jpg"))[5]
    Image.fromarray(np.full((50, 50, 3), 200, np.uint8)).save(victim)
    ds2 = FolderDataset(tree, 32)
    assert ds2.fingerprint() != ds.fingerprint()
    cache = build_latent_cache(tmp_path / "c", {"encoder_sha256": "b", "dataset": ds2.fingerprint()}, ds2,
                               lambda x: 2 * _pool(x), progress=False)
    index = ds2.source.names.index(victim.relative_to(tree).as_posix())
    np.testing.assert_allclose(cache.field("latent", index), 2 * _pool(ds2[index][0][None])[0].numpy(), atol=1e-6)
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["key_parts"]["dataset"] == ds2.fingerprint()


BUILD = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_data_loader import _photo_set, _pool
from ulbench.data.latent_cache import build_latent_cache
def slow(x):
    time.sleep(0.05)
    return _pool(x)
build_latent_cache({out!r}, {{"k": 1}}, _photo_set(200), slow, xflip=True, batch_size=8, shard_size=24,
                   progress=False)
"""


def test_a_killed_latent_cache_build_resumes_to_identical_shards(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    build_latent_cache(ref, {"k": 1}, _photo_set(200), _pool, xflip=True, batch_size=8, shard_size=24,
                       progress=False)
    out = tmp_path / "killed"
    code = BUILD.format(tests=str(Path(__file__).parent), out=str(out))
    rng = np.random.default_rng(0)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 120  # kill once a few shards exist, at a random moment
    while time.time() < deadline and len(list(out.glob("latent-*.npy"))) < 2 + rng.integers(0, 3):
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "meta.json").is_file() or not json.loads((out / "meta.json").read_text())["complete"]
    with pytest.raises(FileNotFoundError):
        LatentCache(out)  # an incomplete cache is never read as a complete one
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    files = sorted(p.name for p in ref.iterdir())
    assert files == sorted(p.name for p in out.iterdir())
    for name in files:
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name


RSS_PROBE = """
import sys, torch
from ulbench.data.prepared import PreparedDataset
from ulbench.data.loader import train_batches
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
torch.set_num_threads(1)
ds = PreparedDataset(sys.argv[1])
it = train_batches(ds, 50, 0)
seen, marks = 0, {}
while seen < len(ds):
    x, _ = next(it)
    seen += len(x)
    if seen in (1000, len(ds)):
        marks[seen] = rss_mb()
print(marks[1000], marks[len(ds)])
"""


def test_iterating_a_prepared_set_keeps_memory_bounded(tmp_path):
    """One epoch over 4,000 prepared 128x128 images (196 MB of pixels) grows RSS by < 50 MB after the first
    1,000: nothing is cached per image (a decoded-image cache would grow by ~150 MB)."""
    from PIL import Image

    from ulbench.metrics.images import photo_crops

    n, root = 4000, tmp_path / "edm2"
    crops = photo_crops(3, n=200)
    for i in range(n):  # EDM2's layout, uncompressed PNGs
        path = root / f"{i:08d}"[:5] / f"img{i:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crops[i % 200] if i < 200 else crops[i % 200][:, ::-1].copy()).save(path, compress_level=0)
    (root / "dataset.json").write_text(json.dumps({"labels": None}))
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(root)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    at_1k, at_4k = map(float, out.stdout.split())
    assert at_4k - at_1k < 50, (at_1k, at_4k)


def test_latent_cache_split_across_ranks_equals_one_process(tmp_path):
    """Ranks encode disjoint shards (rank r: shards r, r + world, ...); simulated one after the other, two ranks
    leave the same files as one process, and rank 0 never marks a cache complete with a shard missing."""
    ds = _photo_set(70)
    one = tmp_path / "one"
    build_latent_cache(one, {"k": 1}, ds, _pool, shard_size=16, progress=False)
    with pytest.raises(RuntimeError, match=r"shards \[1, 3\] are missing"):
        build_latent_cache(tmp_path / "alone", {"k": 1}, ds, _pool, shard_size=16, progress=False, rank=0, world=2)
    two = tmp_path / "two"
    with pytest.raises(FileNotFoundError):  # rank 1 done, rank 0 not yet: no complete cache to read
        build_latent_cache(two, {"k": 1}, ds, _pool, shard_size=16, progress=False, rank=1, world=2)
    assert sorted(p.name for p in two.glob("latent-*.npy")) == ["latent-00001.npy", "latent-00003.npy"]
    build_latent_cache(two, {"k": 1}, ds, _pool, shard_size=16, progress=False, rank=0, world=2)
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for f in sorted(one.iterdir()):
        assert (two / f.name).read_bytes() == f.read_bytes(), f.name
