"""`ulbench report`: plots, tables and the self-contained HTML page from a synthetic run directory."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from ulbench.cli import main
from ulbench.errors import UserError
from ulbench.published import load_published
from ulbench.report import write_report

BUDGETS = [1.0e12, 2.0e12, 4.0e12]
STAGE1_FLOPS = {"ul-tiny": 5.0e11, "dit-b4": 3.0e11}
FID = {"ul-tiny": [150.2, 120.5, 98.75], "dit-b4": [170.4, 140.8, 110.3]}
KID = {"ul-tiny": [0.1234, 0.0987, 0.0765], "dit-b4": [0.1456, 0.1123, 0.0912]}
STAGE1 = {"ul-tiny": {"rfid": 45.17, "psnr": 24.31, "bits_per_pixel": 0.5125},
          "dit-b4": {"rfid": 60.25, "psnr": 22.75, "bits_per_pixel": 1.375}}
FP_FID = {"extractor": "inception-v3-compat", "resize": "legacy", "n": 200, "reference": "photos:1"}


def _row(method, point, rung, metric, base, value, ci95=None, std=None, guidance=None, grid=None, fingerprint=None):
    stage2 = 0.0 if rung is None else BUDGETS[rung]
    return {"suite": "tiny", "run": "t", "method": method, "kind": "ul", "preset": method, "point": point,
            "budget_index": rung, "budget_train_flops": None if rung is None else BUDGETS[rung], "metric": metric,
            "metric_base": base, "value": value, "ci95": ci95, "std": std, "n": 200,
            "higher_is_better": base == "psnr" if base != "bits_per_pixel" else None, "guidance": guidance,
            "train_flops": {"stage1": STAGE1_FLOPS[method], "stage2": stage2, "total": STAGE1_FLOPS[method] + stage2},
            "steps": {"stage1": 100, "stage2": 0 if rung is None else 10 * (rung + 1)}, "wall_s": 1.0,
            "fingerprint": fingerprint or {"metric": base, "n": 200}, "git_commit": "abc123", "versions": {},
            "finished_at": "2026-01-01T00:00:00+00:00", "grid": grid}


def _grid(run, rel, seed):
    rng = np.random.default_rng(seed)
    (run / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (34, 34, 3), dtype=np.uint8)).save(run / rel)
    return rel


@pytest.fixture
def make_run(tmp_path):
    def make(counts="stage2", published=None, mixed_fingerprints=False, name="run"):
        run = tmp_path / name
        run.mkdir()
        rows = []
        for mi, method in enumerate(FID):
            g1 = _grid(run, f"methods/{method}/points/stage1/grid.png", mi)
            for base, value in STAGE1[method].items():
                metric = f"{base}200" if base == "rfid" else base
                rows.append(_row(method, "stage1", None, metric, base, value, grid=g1,
                                 std=1.5 if base == "psnr" else None,
                                 ci95=[value - 2, value + 2] if base == "rfid" else None))
            for rung in range(3):
                grid = _grid(run, f"methods/{method}/points/b{rung}/grid_g1.png", 10 + mi) if rung == 2 else None
                fp = dict(FP_FID, resize="clean") if mixed_fingerprints and method == "dit-b4" else FP_FID
                v = FID[method][rung]
                rows.append(_row(method, f"b{rung}", rung, "fid200", "fid", v, ci95=[v - 5, v + 5], guidance=1.0,
                                 grid=grid, fingerprint=fp))
                k = KID[method][rung]
                rows.append(_row(method, f"b{rung}", rung, "kid200", "kid", k, ci95=[k - 0.01, k + 0.01],
                                 guidance=1.0, grid=grid, fingerprint=FP_FID))
        config = {"suite": "tiny", "suite_file": "suites/tiny.yaml", "git_commit": "abc123",
                  "created_at": "2026-01-01T00:00:00+00:00", "versions": {},
                  "methods": {m: {"kind": "ul", "preset": m} for m in FID},
                  "resolved": {"compute": {"counts": counts}, "report": {"published": published},
                               "dataset": {"name": "photos", "resolution": 32}, "evaluation": {}}}
        (run / "config.json").write_text(json.dumps(config))
        (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return run
    return make


def _table_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]


def test_report_files_plots_and_html(make_run, tmp_path):
    run = make_run()
    r = write_report(run, tmp_path / "out")
    pngs = {name: p for name, p in r["paths"].items() if name.endswith(".png")}
    assert {"compute_vs_fid.png", "compute_vs_kid.png", "rate_vs_quality.png"} <= set(pngs)
    assert {"grids/ul-tiny_stage1.png", "grids/ul-tiny_b2.png", "grids/dit-b4_stage1.png", "grids/dit-b4_b2.png"} \
        <= set(pngs)
    page = (tmp_path / "out" / "index.html").read_text()
    for name, path in pngs.items():
        data = path.read_bytes()
        assert len(data) > 0
        with Image.open(path) as im:
            im.load()
            w, h = im.size
        assert (w, h) == (34, 34) if name.startswith("grids/") else (w > 300 and h > 200)
        assert "data:image/png;base64," + base64.b64encode(data).decode("ascii") in page, name
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "<table" in page and "abc123" in page and "tiny" in page
    # the copied grid is the run's grid, byte for byte
    assert pngs["grids/ul-tiny_b2.png"].read_bytes() == (run / "methods/ul-tiny/points/b2/grid_g1.png").read_bytes()
    assert not r["warnings"] and "WARNING" not in (tmp_path / "out" / "summary.md").read_text()


def test_summary_one_row_per_method_point_with_values(make_run, tmp_path):
    r = write_report(make_run(), tmp_path / "out")
    md = r["paths"]["summary.md"].read_text()
    rows = _table_rows(md)
    assert sorted((c[0], c[1]) for c in rows) == sorted((m, p) for m in FID for p in ("stage1", "b0", "b1", "b2"))
    by_key = {(c[0], c[1]): " | ".join(c) for c in rows}
    assert "150.2 [145.2, 155.2]" in by_key[("ul-tiny", "b0")]
    assert "98.75 [93.75, 103.8]" in by_key[("ul-tiny", "b2")]
    assert "0.1456 [0.1356, 0.1556]" in by_key[("dit-b4", "b0")]
    assert "45.17 [43.17, 47.17]" in by_key[("ul-tiny", "stage1")]
    assert "24.31 ± 1.5" in by_key[("ul-tiny", "stage1")] and "1.375" in by_key[("dit-b4", "stage1")]
    assert "4.00e+12" in by_key[("ul-tiny", "b2")] and "4.50e+12" in by_key[("ul-tiny", "b2")]
    assert re.search(r"fid200: fingerprint .*inception-v3-compat", md)
    csv = r["paths"]["results.csv"].read_text().splitlines()
    assert len(csv) == 1 + 2 * (3 + 3 * 2)


@pytest.mark.parametrize("counts", ["stage2", "total"])
def test_x_axis_follows_counts(make_run, tmp_path, counts):
    r = write_report(make_run(counts=counts), tmp_path / "out")
    fid = r["plotted"][r["plotted"]["metric"] == "fid200"]
    assert len(fid) == 6 and len(r["plotted"]) == 12
    for _, p in fid.iterrows():
        stage2 = BUDGETS[int(p["point"][1:])]
        expected = stage2 if counts == "stage2" else stage2 + STAGE1_FLOPS[p["method"]]
        assert p["x_train_flops"] == expected
        assert p["value"] == FID[p["method"]][int(p["point"][1:])]
    assert ("autoencoder excluded" in r["x_label"]) == (counts == "stage2")


def test_published_reference_points():
    pub = load_published("imagenet512")
    assert pub["source"].map(lambda s: isinstance(s, str) and len(s) > 10).all()
    dit = pub[(pub["label"] == "DiT-XL/2") & (pub["note"] == "no CFG")].iloc[0]
    # baselines.md: DiT-XL/2 at 512^2, 524.6 G multiply-adds, batch 256, 3M steps; FLOPs = 2 x MACs, training = 3 x fwd
    assert dit["value"] == 12.03 and dit["metric"] == "fid50k"
    assert dit["train_flops"] == pytest.approx(2 * 3 * 524.6e9 * 256 * 3e6, rel=1e-12)
    edm2_s = pub[(pub["label"] == "EDM2-S") & (pub["note"] == "no guidance")].iloc[0]
    assert edm2_s["train_flops"] == pytest.approx(2 * 3 * 102e9 * 2147e6, rel=1e-12) and not edm2_s["approximate"]
    assert pub[pub["label"] == "EDM2-XS"]["approximate"].all()
    ul_fid = pub[(pub["method"] == "UL") & (pub["metric_base"] == "fid")]
    assert len(ul_fid) == 10 and ul_fid["train_flops"].isna().all()
    ul_rate = pub[(pub["method"] == "UL") & (pub["metric_base"].isin(["bits_per_pixel", "rfid", "psnr"]))]
    assert len(ul_rate) == 15
    k600 = load_published("kinetics600")  # baselines.md: Kinetics-600 5 -> 11 frame prediction, FVD
    assert (k600["metric_base"] == "fvd").all() and k600["train_flops"].isna().all() and len(k600) == 8
    fvd = dict(zip(k600["label"], k600["value"]))
    assert fvd["UL medium"] == 1.3 and fvd["UL small"] == 1.7 and fvd["W.A.L.T-L"] == 3.3 and fvd["TrIVD-GAN-FP"] == 25.7
    with pytest.raises(UserError, match="imagenet512"):
        load_published("imagenet256")


def test_published_markers_drawn(make_run, tmp_path):
    r = write_report(make_run(published="imagenet512"), tmp_path / "out")
    drawn = r["published_drawn"]
    assert "DiT-XL/2 (published, no CFG)" in drawn and "DiT-XL/2 (published, CFG 1.5)" in drawn
    assert "EDM2-XS (published, autoguidance)" in drawn and "EDM2-XXL (published, no guidance)" in drawn
    assert "UL-small 1.42 (published, c_lf 1.3; no training FLOPs given)" in drawn
    assert "UL-medium 1.31 (published, c_lf 1.5; no training FLOPs given)" in drawn
    assert "UL c_lf 1.5 (published)" in drawn
    page = r["paths"]["index.html"].read_text()
    assert "Published reference points" in page and "Peebles" in page
    assert "published, not measured" in r["paths"]["summary.md"].read_text()
    assert write_report(make_run(name="nopub"), tmp_path / "out2")["published_drawn"] == []


def test_mixed_fingerprints_warn(make_run, tmp_path):
    r = write_report(make_run(mixed_fingerprints=True), tmp_path / "out")
    md = r["paths"]["summary.md"].read_text()
    warn = [line for line in md.splitlines() if "WARNING" in line]
    assert len(warn) == 1 and "fid200" in warn[0] and "2 different" in warn[0]
    assert "WARNING" in r["paths"]["index.html"].read_text()


def test_bad_run_dirs(make_run, tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        write_report(tmp_path / "nope")
    run = make_run()
    lines = (run / "results.jsonl").read_text().splitlines()
    lines[2] = lines[2][:40]
    (run / "results.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"results\.jsonl:3: not a JSON line"):
        write_report(run, tmp_path / "out")
    (run / "results.jsonl").unlink()
    with pytest.raises(UserError, match=r"results\.jsonl: missing"):
        write_report(run, tmp_path / "out")


def test_cli_and_default_out_dir(make_run, tmp_path, monkeypatch, capsys):
    run, out = make_run(), tmp_path / "cli_out"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert (out / "index.html").is_file() and "index.html" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(run)]) == 0
    assert (tmp_path / "reports" / "tiny" / "index.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2


def _set_grid(run, index: int, grid: str) -> None:
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    rows[index]["grid"] = grid
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_reads_no_file_outside_the_run(make_run, tmp_path):
    """results.jsonl names its grids; a row naming ../x, an absolute path or a symlink that leads out of the run
    directory is skipped with a warning naming the row, and nothing of the file reaches the report."""
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(secret)
    secret_b64 = base64.b64encode(secret.read_bytes()).decode("ascii")
    run = make_run()
    (run / "methods/link.png").symlink_to(secret)
    for grid in ("../secret.png", str(secret), "methods/link.png"):
        _set_grid(run, 0, grid)  # row 1: ul-tiny/stage1
        r = write_report(run, tmp_path / "out")
        page = r["paths"]["index.html"].read_text()
        assert secret_b64 not in page, grid
        assert [w for w in r["warnings"] if "row 1 (ul-tiny/stage1)" in w and "outside the run directory" in w], \
            r["warnings"]
        assert all(p.read_bytes() != secret.read_bytes() for p in (tmp_path / "out" / "grids").iterdir())


def test_report_writes_stay_in_the_report_folder(make_run, tmp_path, monkeypatch):
    run = make_run()
    monkeypatch.chdir(tmp_path)
    config = json.loads((run / "config.json").read_text())
    for suite in ("../../escaped", "/tmp/escaped", ".."):
        (run / "config.json").write_text(json.dumps({**config, "suite": suite}))
        with pytest.raises(UserError, match="outside reports/"):
            write_report(run)
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "reports").exists()
    assert main(["report", str(run)]) == 2  # a UserError: one paragraph, exit 2
    # a grids/ folder that is a symlink out of the chosen folder is refused, not written through
    (run / "config.json").write_text(json.dumps(config))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "grids").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="outside the report folder"):
        write_report(run, tmp_path / "out")
    assert not any((tmp_path / "elsewhere").iterdir())
