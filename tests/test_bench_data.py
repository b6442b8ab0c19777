"""`ulbench bench data` on a tiny case: every section runs in its own child process and reports real numbers."""
from __future__ import annotations

import json

import pytest

from ulbench.bench_data import _prepare, _tree, bench_data, format_result
from ulbench.cli import build_parser

N, R, BATCH, BATCHES = 40, 32, 8, 3


@pytest.mark.slow
def test_bench_data_tiny_case_reports_every_section(tmp_path):
    work = tmp_path / "work"
    r = bench_data(n=N, resolutions=[R], workers=1, batch_size=BATCH, batches=BATCHES, warmup=1,
                   memory_sizes=[40, 20], memory_batches=BATCHES, encode_images=8, encode_batch_size=4,
                   workdir=work, progress=False)
    json.dumps(r)  # the --json output is one JSON object

    (L,) = r["loaders"]
    prep = L["prepare"]
    assert L["resolution"] == R and L["jpeg_images"] == N
    assert prep["images"] == N - prep["skipped"] == L["prepared"]["dataset_images"] and prep["num_classes"] == 2
    assert not prep["reused"] and prep["img_per_s"] > 0 and prep["zip_mb"] > 0
    for kind in ("prepared", "jpeg"):
        a = L[kind]
        assert a["img_per_s"] > 0 and a["seconds"] > 0
        assert a["images"] == BATCHES * BATCH  # full batches from both loaders, the same number of images
        assert a["shape"] == [3, R, R] and a["dtype"] == "uint8"
        assert a["peak_rss_mb"]["main"] > 0 and a["peak_rss_mb"]["workers"] > 0  # workers were joined
    assert L["ratio"] == round(L["prepared"]["img_per_s"] / L["jpeg"]["img_per_s"], 3)

    m = r["memory"]
    assert [s["images"] for s in m["sizes"]] == [20, 40]  # the first N of one tree, smallest first
    for s in m["sizes"]:
        assert s["loader"]["images"] == BATCHES * BATCH and -1 <= s["loader"]["mean_input"] <= 1
        assert s["peak_rss_mb"]["main"] > 0 and s["peak_rss_mb"]["workers"] > 0
    assert m["ratio"]["main"] > 0 and m["ratio"]["workers"] > 0

    lc = r["latent_cache"]
    assert lc["images"] == 8 and lc["img_per_s"] > 0 and lc["latent_shape"] == [2, 4, R // 8, R // 8]
    assert lc["device"] in ("cpu", "cuda") and lc["peak_rss_mb"]["main"] > 0
    assert "ratio" in format_result(r)

    # the workdir keeps the tree and zips (and only them); a rerun reuses them without writing or preparing again
    assert sorted(p.name for p in work.iterdir()) == ["jpeg-r32-n40", "memory-r32-n20.zip", "memory-r32-n40.zip",
                                                      "prepared-r32-n40.zip"]
    tree, seconds = _tree(work, R, N, progress=False)
    assert tree.name == "jpeg-r32-n40" and seconds is None
    again = _prepare(tree, work / "prepared-r32-n40.zip", R, workers=1, max_images=None, progress=False)
    assert again["reused"] and again["img_per_s"] is None and again["images"] == prep["images"]


def test_bench_data_is_registered():
    args = build_parser().parse_args(["bench", "data", "--n", "40", "--resolutions", "32", "48", "--json"])
    assert (args.n, args.resolutions, args.json) == (40, [32, 48], True)
    assert (args.memory_sizes, args.workers, args.batch_size, args.workdir) == ([1000, 10000], 2, 64, None)
