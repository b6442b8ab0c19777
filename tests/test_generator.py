"""Evaluating a generator without writing images (--generator MODULE:FUNCTION): the same numbers as its samples
written as PNGs, the same images under any batch size and world size, bad specs as named errors (exit 2)."""
import json

import numpy as np
import pytest
import torch

from conftest import write_pngs
from ulbench.cli import main
from ulbench.errors import UserError
from ulbench.metrics.generator import generator_source, parse_seeds
from ulbench.metrics.images import photo_crops
from ulbench.metrics.fid import SetStats
from ulbench.metrics.stats import Moments

N, SIZE, CROPS_SEED = 12, 32, 3
SAMPLER = f"""
import torch
from ulbench.metrics.images import photo_crops

CROPS = torch.from_numpy(photo_crops({CROPS_SEED}, 40, size={SIZE})).permute(0, 3, 1, 2)  # real photo crop per seed

def make_sampler():
    return lambda seeds, labels: CROPS[seeds]

def make_float():
    return lambda seeds, labels: CROPS[seeds].float()

def make_wrong_count():
    return lambda seeds, labels: CROPS[:1]

def make_nothing():
    return None

NOT_A_FUNCTION = 3
"""


@pytest.fixture(scope="module")
def gen_files(tmp_path_factory):
    """sampler.py (a photo crop per seed), the same N crops as PNGs, and reference statistics (no images)."""
    root = tmp_path_factory.mktemp("generator")
    (root / "sampler.py").write_text(SAMPLER)
    folder = write_pngs(photo_crops(CROPS_SEED, 40, size=SIZE)[:N], root / "pngs")
    rng = np.random.default_rng(0)
    Moments(rng.random(2048), np.diag(rng.random(2048)), 100).save_npz(root / "ref.npz")
    return root, folder


def _json_of(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def evaluator5(inception_weights):
    from ulbench.metrics.fid import ImageEvaluator

    return ImageEvaluator(batch_size=5, progress=False, use_cache=False)


@pytest.fixture(scope="module")
def folder_stats(gen_files, evaluator5):
    return evaluator5.set_stats(str(gen_files[1]), keep_features=True)


def test_generator_equals_its_samples_written_as_pngs(gen_files, evaluator5, folder_stats):
    """The acceptance check: the same float64 sums (so the same FID, KID, ... bit for bit) as the PNG folder."""
    root, _ = gen_files
    gen = evaluator5.set_stats(generator_source(f"{root}/sampler.py:make_sampler", num_samples=N), keep_features=True)
    assert torch.equal(gen.features, folder_stats.features)
    assert np.array_equal(gen.moments.mu, folder_stats.moments.mu)
    assert np.array_equal(gen.moments.sigma, folder_stats.moments.sigma)
    assert gen.resolution == folder_stats.resolution == (SIZE, SIZE)
    ref = SetStats(Moments.load_npz(root / "ref.npz"), "ref", None)
    assert evaluator5.fingerprint(gen, ref)["id"] == evaluator5.fingerprint(folder_stats, ref)["id"]  # one table
    pr = evaluator5.pr_from_stats(gen, folder_stats)
    assert (pr["precision"], pr["recall"], pr["n"]) == (1.0, 1.0, N)  # identical sets, real Inception features


def test_cli_stats_of_a_generator_equal_the_folders(gen_files, folder_stats, capsys, tmp_path):
    root, _ = gen_files
    out = tmp_path / "gen.npz"
    r = _json_of(capsys, ["eval", "stats", "--generator", f"{root}/sampler.py:make_sampler", "--num-samples", str(N),
                          "--batch-size", "5", "-o", str(out), "--json", "--no-cache"])
    assert r["n"] == N
    m = Moments.load_npz(out)
    assert np.array_equal(m.mu, folder_stats.moments.mu) and np.array_equal(m.sigma, folder_stats.moments.sigma)


def test_cli_pr_of_a_generator(gen_files, capsys, monkeypatch, tmp_path, inception_weights):
    root, _ = gen_files
    first5 = write_pngs(photo_crops(CROPS_SEED, 40, size=SIZE)[:5], tmp_path / "first5")
    monkeypatch.chdir(root)  # the dotted form: the current directory comes first on sys.path
    r = _json_of(capsys, ["eval", "pr", "--generator", "sampler:make_sampler", "--seeds", "0-4", str(first5),
                          "--json", "--no-cache"])
    assert (r["precision"], r["recall"], r["k"], r["n"], r["n_reference"]) == (1.0, 1.0, 3, 5, 5)


def test_images_do_not_depend_on_batch_size_or_world_size(monkeypatch):
    from ulbench import dist

    calls = []
    crops = torch.from_numpy(photo_crops(CROPS_SEED, 40, size=8)).permute(0, 3, 1, 2)

    def sample(seeds, labels):
        calls.append((seeds.tolist(), labels.tolist()))
        return crops[seeds]

    seeds = parse_seeds("3-9,20,30-35")
    assert seeds == [3, 4, 5, 6, 7, 8, 9, 20, 30, 31, 32, 33, 34, 35]
    src = generator_source(sample, seeds=seeds, num_classes=4)
    assert calls == [([3], [3])]  # the first seed once, to check the output and learn the resolution
    one = [a for b in src.batches(5) for a in b]
    assert all(lab == [s % 4 for s in ss] for ss, lab in calls)  # label of seed s: s mod K
    assert np.array_equal(np.stack(one), crops[seeds].permute(0, 2, 3, 1).numpy())
    for batch_size in (1, 3, 14):
        assert all(np.array_equal(x, y) for x, y in zip(one, [a for b in src.batches(batch_size) for a in b]))
    for world in (2, 3):  # each rank's share as ImageEvaluator.features takes it, joined in rank order
        shares = []
        for rank in range(world):
            monkeypatch.setattr(dist, "rank_world", lambda r=rank: (r, world))
            start, stop = dist.span(dist.shard(src.count, 4), src.count, 4)
            shares += [a for b in src.batches(4, start, stop) for a in b] if stop > start else []
        assert len(shares) == len(one) and all(np.array_equal(x, y) for x, y in zip(one, shares))


REF = "{root}/ref.npz"


@pytest.mark.parametrize("argv, needle", [
    (["--generator", "sampler", REF], "expected MODULE:FUNCTION"),
    (["--generator", "no_such_module_xyz:make", "--num-samples", "2", REF], "no module named 'no_such_module_xyz'"),
    (["--generator", "{root}/nope.py:make", "--num-samples", "2", REF], "no such file"),
    (["--generator", "sampler:missing", "--num-samples", "2", REF],
     "has no attribute 'missing' (its callables: make_float, make_nothing"),
    (["--generator", "sampler:NOT_A_FUNCTION", "--num-samples", "2", REF], "'NOT_A_FUNCTION' is a int, not a function"),
    (["--generator", "sampler:make_nothing", "--num-samples", "2", REF], "make_nothing() returned a NoneType"),
    (["--generator", "sampler:make_float", "--num-samples", "2", REF],
     "sample() returned torch.float32 (1, 3, 32, 32); it must return uint8"),
    (["--generator", "sampler:make_wrong_count", "--num-samples", "3", "--batch-size", "3", "--no-cache", REF],
     "sample() returned shape (1, 3, 32, 32) for 3 seeds"),
    (["--generator", "sampler:make_sampler", REF], "--num-samples None: give the number of samples (>= 1) or --seeds"),
    (["--generator", "sampler:make_sampler", "--num-samples", "0", REF], "--num-samples 0: must be >= 1"),
    (["--generator", "sampler:make_sampler", "--num-samples", "4", "--seeds", "0-2", REF], "disagree"),
    (["--generator", "sampler:make_sampler", "--seeds", "5-2", REF], "not a seed or an increasing range"),
    (["--generator", "sampler:make_sampler", "--num-samples", "2", "--num-classes", "0", REF],
     "--num-classes 0: must be >= 1"),
    (["--generator", "sampler:make_sampler", "--num-samples", "4", "{root}/pngs", REF], "give only the reference"),
    (["{root}/pngs", REF, "--num-samples", "4"], "--num-samples goes with --generator"),
    ([REF], "give 2 input(s)"),
])
def test_bad_generator_specs_exit_2(gen_files, capsys, monkeypatch, argv, needle):
    root, _ = gen_files
    monkeypatch.chdir(root)
    assert main(["eval", "fid", *(a.replace("{root}", str(root)) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_pr_refuses_a_statistics_reference(gen_files, capsys, inception_weights):
    root, folder = gen_files
    assert main(["eval", "pr", str(folder), str(root / "ref.npz"), "--no-cache"]) == 2
    assert "has no per-image features; precision and recall need the images" in capsys.readouterr().err


def test_python_api_takes_a_callable_and_checks_it():
    with pytest.raises(UserError, match="give the number of samples"):
        generator_source(lambda s, y: None)
    with pytest.raises(UserError, match="returned a ndarray"):
        generator_source(lambda s, y: np.zeros((len(s), 3, 4, 4), np.uint8), num_samples=2)
    src = generator_source(lambda s, y: torch.zeros(len(s), 1, 5, 6, dtype=torch.uint8), num_samples=3, limit=2)
    assert (src.count, src.resolution) == (2, (5, 6))  # gray is expanded to RGB; --limit caps the seeds
    assert next(src.batches(8))[0].shape == (5, 6, 3)


def test_adm_reference_batch_gives_its_statistics_and_its_images(gen_files, evaluator5, folder_stats, tmp_path):
    """ADM's reference batches (VIRTUAL_imagenet512.npz) hold mu/sigma and images (arr_0). As ADM's evaluator does,
    the Frechet distance uses the file's statistics and precision/recall (and KID) its images' features."""
    _, folder = gen_files
    rng = np.random.default_rng(1)
    mu, sigma = rng.random(2048), np.diag(rng.random(2048) + 0.5)  # not the statistics of the images
    np.savez(tmp_path / "VIRTUAL.npz", arr_0=photo_crops(CROPS_SEED, 40, size=SIZE)[:N], mu=mu, sigma=sigma)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    batch, stats_only = str(tmp_path / "VIRTUAL.npz"), str(tmp_path / "stats.npz")
    b = evaluator5.set_stats(batch, keep_features=True)
    assert np.array_equal(b.moments.mu, mu) and torch.equal(b.features, folder_stats.features)
    assert evaluator5.fid(str(folder), batch)["fid"] == evaluator5.fid(str(folder), stats_only)["fid"]
    pr = evaluator5.precision_recall(str(folder), batch)
    assert (pr["precision"], pr["recall"], pr["n_reference"]) == (1.0, 1.0, N)
    with pytest.raises(UserError, match="no per-image features; precision and recall need"):
        evaluator5.precision_recall(str(folder), stats_only)
    with pytest.raises(UserError, match="--bootstrap resamples the images of A"):
        evaluator5.fid(batch, str(folder), bootstrap=2)
