"""Suite files: a corpus of malformed suites, each ending in one located SuiteError (file, key path, what is
allowed); includes, --set, numeric strings, defaults and the resolved dict on valid ones. No training."""
import json
from pathlib import Path

import pytest
from conftest import run_cli

from ulbench.cli import main
from ulbench.errors import UserError
from ulbench.suite import METRICS, SuiteError, check_paths, list_suites, load_suite

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {
    "version": "version: 1\n",
    "dataset": "dataset: {name: photos, resolution: 32}\n",
    "methods": "methods:\n  - {name: ul, preset: ul-tiny}\n",
    "compute": "compute: {ladder: [1.0e12, 2.0e12]}\n",
}


def doc(**sections: str | None) -> str:
    """A valid minimal suite with sections replaced (None: left out) or added."""
    return "".join(text for text in {**SECTIONS, **sections}.values() if text)


def method(extra: str) -> str:
    return f"methods:\n  - {{name: ul, preset: ul-tiny, {extra}}}\n"


def write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder / "suite.yaml"


# (id, files (suite.yaml is loaded), substrings the message must contain)
BAD = [
    ("resolution-string", {"suite.yaml": doc(dataset="dataset: {name: photos, resolution: large}\n")},
     ["suite.yaml: dataset.resolution: ", "expected an integer", "'large'"]),
    ("num-samples-bool", {"suite.yaml": doc(evaluation="evaluation: {num_samples: true}\n")},
     ["suite.yaml: evaluation.num_samples: ", "true (a boolean)"]),
    ("dataset-list", {"suite.yaml": doc(dataset="dataset: [photos, 32]\n")},
     ["suite.yaml: dataset: expected a mapping", "a list"]),
    ("unknown-top-key", {"suite.yaml": doc(methods=None, methds=SECTIONS["methods"].replace("methods", "methds"))},
     ["suite.yaml: methds: unknown key", "allowed: version, name,", "did you mean 'methods'?"]),
    ("unknown-nested-key", {"suite.yaml": doc(dataset="dataset: {name: photos, resolution: 32, resoluton: 32}\n")},
     ["suite.yaml: dataset.resoluton: unknown key", "did you mean 'resolution'?"]),
    ("missing-dataset", {"suite.yaml": doc(dataset=None)}, ["suite.yaml: dataset: missing (required)"]),
    ("missing-dataset-name", {"suite.yaml": doc(dataset="dataset: {resolution: 32}\n")},
     ["suite.yaml: dataset.name: missing"]),
    ("folder-without-path", {"suite.yaml": doc(dataset="dataset: {name: folder, resolution: 32}\n")},
     ["suite.yaml: dataset.path: missing"]),
    ("path-for-photos", {"suite.yaml": doc(dataset="dataset: {name: photos, path: /x, resolution: 32}\n")},
     ["suite.yaml: dataset.path: only for name: prepared or folder"]),
    ("resolution-not-multiple-of-8", {"suite.yaml": doc(dataset="dataset: {name: photos, resolution: 30}\n")},
     ["dataset.resolution: must be a multiple of 8"]),
    ("dataset-name", {"suite.yaml": doc(dataset="dataset: {name: fashion_mnist, resolution: 32}\n")},
     ["dataset.name: unknown value 'fashion_mnist'", "allowed: photos, fashion-mnist, prepared, folder",
      "did you mean 'fashion-mnist'?"]),
    ("negative-budget", {"suite.yaml": doc(compute="compute: {ladder: [-1.0e12, 2.0e12]}\n")},
     ["suite.yaml: compute.ladder[0]: must be > 0"]),
    ("ladder-not-increasing", {"suite.yaml": doc(compute="compute: {ladder: [2.0e12, 2.0e12]}\n")},
     ["suite.yaml: compute.ladder[1]: ", "strictly increasing"]),
    ("ladder-not-numeric", {"suite.yaml": doc(compute="compute: {ladder: [1e12, lots]}\n")},
     ["compute.ladder[1]: expected a number, got 'lots' (a string)"]),
    ("ladder-factor", {"suite.yaml": doc(compute="compute: {ladder: {start: 1.0e12, factor: 1, count: 3}}\n")},
     ["suite.yaml: compute.ladder.factor: must be > 1"]),
    ("ladder-mapping-key", {"suite.yaml": doc(compute="compute: {ladder: {start: 1.0e12, factr: 2, count: 3}}\n")},
     ["compute.ladder.factr: unknown key", "allowed: start, factor, count", "did you mean 'factor'?"]),
    ("unknown-preset", {"suite.yaml": doc(methods="methods:\n  - {name: ul, preset: ul-tinyy}\n")},
     ["suite.yaml: methods[0].preset: unknown value 'ul-tinyy'", "allowed: ul-tiny, ul-small, ul-medium",
      "did you mean 'ul-tiny'?"]),
    ("unknown-kind", {"suite.yaml": doc(methods="methods:\n  - {name: d, kind: ditt, preset: dit-b-4}\n")},
     ["suite.yaml: methods[0].kind: unknown value 'ditt'", "(allowed: ul, dit, edm2)", "did you mean 'dit'?"]),
    ("override-field", {"suite.yaml": doc(methods=method("overrides: {diffusion: {c_lff: 2.0}}"))},
     ["suite.yaml: methods[0].overrides.diffusion.c_lff: unknown field", "allowed: lambda_z0,", "c_lf",
      "did you mean 'c_lf'?"]),
    ("override-type", {"suite.yaml": doc(methods=method("overrides: {diffusion: {c_lf: strong}}"))},
     ["suite.yaml: methods[0].overrides.diffusion.c_lf: expected float"]),
    ("override-resolution", {"suite.yaml": doc(methods=method("overrides: {resolution: 64}"))},
     ["methods[0].overrides.resolution: comes from dataset.resolution"]),
    ("train-steps", {"suite.yaml": doc(methods=method("train: {stage1: {steps: 100, lr: 1.0e-3}}"))},
     ["suite.yaml: methods[0].train.stage1.steps: not settable", "compute.ladder"]),
    ("train-unknown-stage", {"suite.yaml": doc(methods=method("train: {stage_1: {lr: 1.0e-3}}"))},
     ["suite.yaml: methods[0].train.stage_1: unknown key (allowed: stage1, stage2); did you mean 'stage1'?"]),
    ("train-field", {"suite.yaml": doc(methods=method("train: {stage2: {batchsize: 8}}"))},
     ["methods[0].train.stage2.batchsize: unknown field", "did you mean 'batch_size'?"]),
    ("duplicate-method", {"suite.yaml": doc(methods="methods:\n  - {name: ul, preset: ul-tiny}\n"
                                                    "  - {name: ul, preset: ul-small}\n")},
     ["suite.yaml: methods[1].name: 'ul' is also the name of methods[0]"]),
    ("method-name", {"suite.yaml": doc(methods="methods:\n  - {name: My UL, preset: ul-tiny}\n")},
     ["methods[0].name: 'My UL' is not a valid name"]),
    ("unknown-metric", {"suite.yaml": doc(evaluation="evaluation: {metrics: [fid, psrn]}\n")},
     ["suite.yaml: evaluation.metrics[1]: unknown value 'psrn'",
      "allowed: fid, kid, class_acc, rfid, psnr, bits_per_pixel", "did you mean 'psnr'?"]),
    ("duplicate-metric", {"suite.yaml": doc(evaluation="evaluation: {metrics: [fid, fid]}\n")},
     ["evaluation.metrics[1]: 'fid' is listed twice"]),
    ("include-missing", {"suite.yaml": "include: nope.yaml\n" + doc()},
     ["suite.yaml: include: nope.yaml: no such file", "relative to the including file"]),
    ("include-cycle", {"suite.yaml": "include: other.yaml\n" + doc(), "other.yaml": "include: [suite.yaml]\n"},
     ["other.yaml (included from ", "include cycle: ", "suite.yaml -> ", "other.yaml -> "]),
    ("include-not-mapping", {"suite.yaml": "include: other.yaml\n" + doc(), "other.yaml": "- 1\n- 2\n"},
     ["other.yaml (included from ", "suite.yaml): top level: expected a mapping", "a list"]),
    ("error-in-included-file", {"suite.yaml": "include: other.yaml\n" + doc(),
                                "other.yaml": "evaluation: {num_samples: -5}\n"},
     ["other.yaml (included from ", "evaluation.num_samples: must be >= 1, got -5"]),
    ("yaml-syntax", {"suite.yaml": "version: 1\ndataset: {name: photos, resolution: 32\nmethods: []\n"},
     ["suite.yaml: line 3, column 8: invalid YAML: expected ',' or '}'"]),
    ("yaml-duplicate-key", {"suite.yaml": doc() + "compute: {ladder: [1.0]}\n"},
     ["suite.yaml: line 6, column 1: invalid YAML: key 'compute' is given twice"]),
    ("version-2", {"suite.yaml": doc(version="version: 2\n")},
     ["suite.yaml: version: unsupported suite format version 2 (allowed: 1)"]),
    ("version-missing", {"suite.yaml": doc(version=None)}, ["suite.yaml: version: missing (required)"]),
    ("stage1-fraction", {"suite.yaml": doc(compute="compute: {ladder: [1.0e12], stage1: {fraction: 1.5}}\n")},
     ["suite.yaml: compute.stage1.fraction: must be < 1, got 1.5"]),
    ("stage1-both", {"suite.yaml": doc(compute="compute: {ladder: [1.0e12], stage1: {fraction: 0.5, "
                                               "train_flops: 1.0e11}}\n")},
     ["compute.stage1: give exactly one of fraction", "fraction and train_flops"]),
    ("stage1-total", {"suite.yaml": doc(compute="compute: {ladder: [1.0e12, 2.0e12], counts: total, "
                                                "stage1: {train_flops: 1.0e12}}\n")},
     [("suite.yaml: compute.stage1: the stage-1 budget 1e+12 train FLOPs is not below the smallest rung "
      "compute.ladder[0] = 1e+12"), "counts: total"]),
    ("empty-methods", {"suite.yaml": doc(methods="methods: []\n")},
     ["suite.yaml: methods: expected a non-empty list"]),
    ("empty-file", {"suite.yaml": ""}, ["suite.yaml: top level: the file is empty"]),
    ("top-level-list", {"suite.yaml": "- version: 1\n"}, ["suite.yaml: top level: expected a mapping", "a list"]),
    ("device", {"suite.yaml": doc(device="device: gpu\n")},
     ["suite.yaml: device: ", "(allowed: auto, cpu, cuda, cuda:N)"]),
    ("sampler-steps", {"suite.yaml": doc(evaluation="evaluation: {sampler: {steps: 0}}\n")},
     ["evaluation.sampler.steps: must be >= 1, got 0"]),
    ("guidance-negative", {"suite.yaml": doc(evaluation="evaluation: {guidance: [1.0, -1]}\n")},
     ["evaluation.guidance[1]: must be >= 0"]),
    ("published", {"suite.yaml": doc(report="report: {published: imagenet256}\n")},
     ["report.published: unknown value 'imagenet256' (allowed: imagenet512, kinetics600)"]),
    # Each metric's least number of items: FID/KID/rFID need 2 (a covariance; KID's pairs), PSNR 1.
    ("one-sample", {"suite.yaml": doc(evaluation="evaluation: {num_samples: 1}\n")},
     ["suite.yaml: evaluation.num_samples: fid and kid need at least 2 samples", "covariance", "got 1"]),
    ("one-sample-kid", {"suite.yaml": doc(evaluation="evaluation: {metrics: [kid, psnr], num_samples: 1}\n")},
     ["suite.yaml: evaluation.num_samples: kid needs at least 2 samples (KID's unbiased estimate needs pairs)"]),
    ("one-reconstruction", {"suite.yaml": doc(evaluation="evaluation: {num_reconstructions: 1}\n")},
     ["suite.yaml: evaluation.num_reconstructions: rfid needs at least 2 reconstructions", "got 1"]),
    ("one-reference-image", {"suite.yaml": doc(evaluation="evaluation: {metrics: [fid], reference_size: 1}\n")},
     ["suite.yaml: evaluation.reference_size: fid needs at least 2 images"]),
    ("bootstrap-1", {"suite.yaml": doc(evaluation="evaluation: {bootstrap: 1}\n")},
     ["suite.yaml: evaluation.bootstrap: 0 (no interval) or at least 2 resamples", "got 1"]),
    ("kid-subset-1", {"suite.yaml": doc(evaluation="evaluation: {kid_subset_size: 1}\n")},
     ["suite.yaml: evaluation.kid_subset_size: must be >= 2, got 1"]),
    # Crashes the fuzzer (tests/test_fuzz_suites.py) found, or that its neighbourhood showed: each a located error.
    ("int-past-str-limit", {"suite.yaml": doc(evaluation="evaluation: {num_samples: " + "9" * 5000 + "}\n")},
     ["suite.yaml: line 6, column 27: invalid YAML: not a readable int"]),
    ("impossible-date", {"suite.yaml": doc(description="description: 2001-02-30\n")},
     ["suite.yaml: line 6, column 14: invalid YAML: not a readable timestamp: day is out of range"]),
    ("bad-float-tag", {"suite.yaml": doc(evaluation="evaluation: {num_samples: !!float abc}\n")},
     ["suite.yaml: line 6, column 27: invalid YAML: not a readable float"]),
    ("nested-thousands-deep", {"suite.yaml": doc(description="description: " + "[" * 3000 + "]" * 3000 + "\n")},
     ["suite.yaml: top level: nested too deeply to read"]),
    ("nested-past-limit", {"suite.yaml": doc(report="report: " + "{a: " * 40 + "1" + "}" * 40 + "\n")},
     ["suite.yaml: report: nests 41 levels deep; a suite nests at most 32 levels"]),
    ("recursive-alias", {"suite.yaml": doc(report="report: &r {published: [*r]}\n")},
     ["suite.yaml: report: contains itself (a recursive YAML alias)"]),
    ("ladder-overflow", {"suite.yaml": doc(compute="compute: {ladder: {start: 1.0e-300, factor: 1000, count: 200}}\n")},
     ["suite.yaml: compute.ladder: the last rung 1e-300 * 1000**199 is beyond a float's range"]),
    ("include-name-too-long", {"suite.yaml": "include: " + "x" * 300 + ".yaml\n" + doc()},
     ["suite.yaml: include: 'xxxxxxxx", "...' (a string): cannot be opened: File name too long"]),
    ("seed-past-int64", {"suite.yaml": doc(seeds="seeds: {train: 1.0e+30}\n")},
     ["suite.yaml: seeds.train: must be <= 9223372036854775807 (a 64-bit integer), got 1e+30"]),
]


@pytest.mark.parametrize("files,needles", [(f, n) for _, f, n in BAD], ids=[i for i, _, _ in BAD])
def test_bad_suite(tmp_path, files, needles):
    path = write(tmp_path, files)
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert str(tmp_path) in msg
    for needle in needles:
        assert needle in msg, msg


def test_train_allowed_fields_leave_out_steps(tmp_path):
    with pytest.raises(SuiteError) as e:
        load_suite(write(tmp_path, {"suite.yaml": doc(methods=method("train: {stage2: {batchsize: 8}}"))}))
    allowed = str(e.value).split("(allowed: ")[1].split(")")[0].split(", ")
    assert "batch_size" in allowed and "lr" in allowed and "steps" not in allowed


@pytest.mark.parametrize("case", ["unknown-top-key", "override-field", "include-cycle", "yaml-syntax", "empty-file"])
def test_cli_validate_bad(tmp_path, capsys, case):
    _, files, needles = next(b for b in BAD if b[0] == case)
    rc = main(["validate", str(write(tmp_path, files))])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.startswith("ulbench: error: ")
    for needle in needles:
        assert needle in err


def test_cli_validate_subprocess_no_traceback(tmp_path):
    good = write(tmp_path, {"suite.yaml": doc()})
    bad = tmp_path / "bad.yaml"
    bad.write_text(doc(compute="compute: {ladder: [2.0e12, 1.0e12]}\n"))
    proc = run_cli("validate", str(good), str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stdout == f"ok  {good}: 1 method(s), 2 budget(s) from 1.0e+12 to 2.0e+12 train FLOPs\n"
    assert f"{bad}: compute.ladder[1]: " in proc.stderr


def test_cli_validate_ok_and_set(tmp_path, capsys):
    path = write(tmp_path, {"suite.yaml": doc(), "_block.yaml": "version: 1\n"})
    assert main(["validate", str(path), str(tmp_path / "_block.yaml"), "--set", "compute.ladder=[1e12,2e12,4e12]"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok  {path}: 1 method(s), 3 budget(s) from 1.0e+12 to 4.0e+12 train FLOPs",
                   f"skip {tmp_path / '_block.yaml'}: an include block (the name starts with _), not a suite"]
    assert main(["validate", str(path), "--set", "evaluation.num_samples=many"]) == 2
    assert "(--set evaluation.num_samples=many): evaluation.num_samples: expected an integer" in capsys.readouterr().err


def test_include_merges_mappings_and_replaces_lists(tmp_path):
    base = """version: 1
description: from base
dataset: {name: photos, resolution: 32, class_conditional: true}
evaluation: {metrics: [fid, kid], num_samples: 50, guidance: [1.0, 2.0], sampler: {steps: 10}}
seeds: {train: 3}
"""
    top = """include: blocks/base.yaml
dataset: {split: test}
evaluation: {num_samples: 10, guidance: [3.0], sampler: {decoder_steps: 7}}
methods:
  - {name: ul, preset: ul-tiny}
compute: {ladder: [1.0e12]}
"""
    (tmp_path / "blocks").mkdir()
    path = write(tmp_path, {"blocks/base.yaml": base, "suite.yaml": top})
    s = load_suite(path)
    assert (s.name, s.description, s.file) == ("suite", "from base", path)
    assert (s.dataset.name, s.dataset.split, s.dataset.class_conditional) == ("photos", "test", True)
    ev = s.evaluation
    assert ev.metrics == ("fid", "kid") and ev.num_samples == 10 and ev.guidance == (3.0,)
    assert ev.sampler == {"method": "ancestral", "steps": 10, "decoder_steps": 7, "guidance_interval": None}
    assert (s.seeds.train, s.seeds.sample) == (3, 0)


def test_include_list_in_order_and_nested(tmp_path):
    files = {"a.yaml": "include: b.yaml\nevaluation: {num_samples: 4, bootstrap: 5}\n",
             "b.yaml": "evaluation: {num_samples: 2, bootstrap: 2, batch_size: 2}\n",
             "c.yaml": "evaluation: {num_samples: 3}\n",
             "suite.yaml": "include: [a.yaml, c.yaml]\n" + doc()}
    ev = load_suite(write(tmp_path, files)).evaluation
    assert (ev.num_samples, ev.bootstrap, ev.batch_size) == (3, 5, 2)


def test_numeric_strings_and_ladder_mapping(tmp_path):
    text = doc(methods=method("overrides: {diffusion: {c_lf: 2}}, train: {stage1: {lr: 1e-3, batch_size: 8}}"),
               compute="compute: {ladder: {start: 1e12, factor: 2, count: 3}, stage1: {fraction: 0.25}}\n")
    s = load_suite(write(tmp_path, {"suite.yaml": text}))
    assert s.budgets == (1e12, 2e12, 4e12) and all(type(b) is float for b in s.budgets)
    assert s.compute.stage1_budget() == 1e12 and s.compute.stage1_train_flops is None
    m = s.methods[0]
    assert m.train == {"stage1": {"lr": 1e-3, "batch_size": 8}} and type(m.train["stage1"]["lr"]) is float
    assert m.overrides == {"diffusion": {"c_lf": 2.0}}
    cfg = m.config()
    assert cfg.diffusion.c_lf == 2.0 and cfg.resolution == 32 and cfg.name == "ul-tiny"
    s = load_suite(write(tmp_path, {"suite.yaml": doc(compute='compute: {ladder: ["1e12", 2e12], '
                                                              "stage1: {train_flops: 5e11}}\n")}))
    assert s.budgets == (1e12, 2e12) and s.compute.stage1_budget() == 5e11


def test_set_overrides(tmp_path):
    path = write(tmp_path, {"suite.yaml": doc(methods="methods:\n  - {name: a, preset: ul-small}\n")})
    s = load_suite(path, ["evaluation.num_samples=10", "methods.0.preset=ul-tiny", "report.published=imagenet512",
                          "compute.ladder=[1e12, 3e12]", "dataset.subset=64", "seeds=null", "seeds.sample=5"])
    assert s.evaluation.num_samples == 10 and s.methods[0].preset == "ul-tiny"
    assert s.report.published == "imagenet512" and s.budgets == (1e12, 3e12) and s.dataset.subset == 64
    assert (s.seeds.train, s.seeds.sample) == (0, 5)


@pytest.mark.parametrize("assignment,needle", [
    ("evaluation", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("dataset.name.x=1", "dataset.name is 'photos' (a string), not a mapping"),
    ("methods.1.preset=ul-tiny", "methods is a list of 1; '1' is not an index 0..0"),
    ("methods.0.preset=ul-tinyy", "methods[0].preset: unknown value 'ul-tinyy'"),
    ("dataset.resolution=[32", "invalid YAML"),
    ("include=other.yaml", "include is read from the files only"),
    ("methods.\u00b2.preset=ul-tiny", "methods is a list of 1; '\u00b2' is not an index 0..0"),  # '²'.isdigit()
    ("description=" + "[" * 3000, "the value is nested too deeply to read"),
    ("seeds.train=" + "9" * 5000, "the value: line 1, column 1: invalid YAML: not a readable int"),
    ("report=&r [*r]", "the value contains itself (a recursive YAML alias)"),
])
def test_set_errors_name_the_set(tmp_path, assignment, needle):
    path = write(tmp_path, {"suite.yaml": doc()})
    with pytest.raises(SuiteError) as e:
        load_suite(path, [assignment])
    echo = assignment if len(assignment) <= 80 else assignment[:77] + "..."  # long ones are clipped
    assert f"--set {assignment}" in str(e.value) or f"--set '{echo}'" in str(e.value)
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)


def test_defaults_filled_and_to_dict_round_trips(tmp_path):
    s = load_suite(write(tmp_path, {"suite.yaml": doc()}))
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d == {
        "version": 1, "name": "suite", "description": "",
        "dataset": {"name": "photos", "path": None, "resolution": 32, "split": "train", "subset": None,
                    "class_conditional": False, "xflip": False, "workers": 0},
        "methods": [{"name": "ul", "kind": "ul", "preset": "ul-tiny", "overrides": {}, "train": {},
                     "sampler": {"method": "ancestral", "steps": 50, "decoder_steps": 50, "guidance_interval": None},
                     "guidance": [1.0]}],
        "compute": {"ladder": [1e12, 2e12], "counts": "stage2", "stage1": {"fraction": 0.5}},
        "evaluation": {"metrics": ["fid", "kid", "rfid", "psnr", "bits_per_pixel"], "num_samples": 200,
                       "num_reconstructions": 200, "reference": "dataset", "reference_size": None,
                       "sampler": {"method": "ancestral", "steps": 50, "decoder_steps": 50,
                                   "guidance_interval": None}, "guidance": [1.0],
                       "bootstrap": 0, "kid_subset_size": 100, "resize": "legacy", "batch_size": 50},
        "seeds": {"train": 0, "sample": 0}, "device": "auto", "precision": "auto", "report": {"published": None}}
    assert s.compute.stage1_budget() == 1e12


def test_to_dict_is_a_suite(tmp_path):
    """The resolved dict (config.json) loads back as the same suite: nothing is lost or re-defaulted."""
    text = doc(methods=method("overrides: {encoder: {channels: [16, 32]}}, train: {stage2: {betas: [0.9, 0.95]}}"),
               dataset="dataset: {name: folder, path: /data/x, resolution: 64, subset: 10}\n",
               compute="compute: {ladder: {start: 1e12, factor: 3, count: 2}, counts: total, "
                       "stage1: {train_flops: 1e11}}\n")
    d = load_suite(write(tmp_path, {"suite.yaml": text})).to_dict()
    assert d["methods"][0]["overrides"] == {"encoder": {"channels": [16, 32]}}
    assert d["methods"][0]["train"] == {"stage2": {"betas": [0.9, 0.95]}}
    (tmp_path / "resolved.json").write_text(json.dumps(d))
    again = load_suite(tmp_path / "resolved.json").to_dict()
    assert again == d


def test_check_paths(tmp_path):
    text = doc(dataset="dataset: {name: folder, path: /no/such/imagenet, resolution: 32}\n")
    s = load_suite(write(tmp_path, {"suite.yaml": text}))  # validates without the folder
    with pytest.raises(SuiteError, match=r"suite\.yaml: dataset\.path: /no/such/imagenet does not exist"):
        check_paths(s)
    (tmp_path / "imgs").mkdir()
    s = load_suite(tmp_path / "suite.yaml", [f"dataset.path={tmp_path / 'imgs'}", "evaluation.reference=/no/ref.npz"])
    with pytest.raises(SuiteError, match=r"evaluation\.reference: /no/ref\.npz does not exist"):
        check_paths(s)
    check_paths(load_suite(tmp_path / "suite.yaml", [f"dataset.path={tmp_path / 'imgs'}"]))


def test_list_suites(tmp_path):
    write(tmp_path, {"b.yaml": "name: bee\ndescription: the b suite\n" + doc(), "_block.yaml": "version: 1\n",
                     "a.yaml": doc(version="version: 3\n"), "notes.txt": "x"})
    rows = list_suites(tmp_path)
    assert [(n, f.name) for n, f, _ in rows] == [("a", "a.yaml"), ("bee", "b.yaml")]
    assert rows[0][2].startswith("INVALID: ") and rows[1][2] == "the b suite"
    with pytest.raises(SuiteError, match="no such folder"):
        list_suites(tmp_path / "nope")


def test_metric_registry():
    from ulbench.metrics.registry import metrics_for

    assert list(METRICS) == ["fid", "kid", "class_acc", "rfid", "psnr", "bits_per_pixel", "fvd", "pred_psnr", "rfvd",
                             "bits_per_frame", "fd_dinov2", "rlpips", "precision", "recall"]
    assert [METRICS[m].higher_is_better for m in METRICS] == [False, False, True, False, True, None, False, True, False,
                                                              None, False, False, True, True]
    assert {m: METRICS[m].needs for m in METRICS} == {
        "fid": "samples", "kid": "samples", "class_acc": "samples", "rfid": "reconstructions",
        "psnr": "reconstructions", "bits_per_pixel": "reconstructions", "fvd": "samples", "pred_psnr": "samples", "rfvd": "reconstructions",
        "bits_per_frame": "reconstructions", "fd_dinov2": "samples", "rlpips": "reconstructions", "precision": "samples",
        "recall": "samples"}
    assert metrics_for(video=False) == ["fid", "kid", "rfid", "psnr", "bits_per_pixel"]  # an image suite's default
    assert metrics_for(video=False, conditional=True) == ["fid", "kid", "class_acc", "rfid", "psnr", "bits_per_pixel"]
    assert metrics_for(video=True) == ["psnr", "bits_per_pixel", "fvd", "pred_psnr", "rfvd", "bits_per_frame"]
    # fd_dinov2 needs the user's weights file, rlpips the LPIPS network's cost, precision/recall reference images: a
    # suite lists them itself, they are never in the default list (images only)
    assert metrics_for(video=False, opt_in=True) == ["fid", "kid", "rfid", "psnr", "bits_per_pixel", "fd_dinov2",
                                                     "rlpips", "precision", "recall"]
    assert metrics_for(video=True, opt_in=True) == metrics_for(video=True)


def test_repo_suites_validate():
    files = sorted(p for p in (REPO / "suites").glob("*.yaml") if not p.name.startswith("_"))
    if not files:
        pytest.skip("no suite files in suites/")
    for f in files:
        s = load_suite(f)
        assert s.name == f.stem and s.budgets and s.methods


def test_fvd_needs_clips_of_nine_frames():
    # I3D's 8x temporal stride and 2-step logits pool: refused when the suite is read, not after training.
    with pytest.raises(SuiteError) as e:
        load_suite(REPO / "suites" / "video-smoke.yaml", ["dataset.frames=8"])
    assert "(--set dataset.frames=8): dataset.frames: fvd and rfvd embed clips with I3D, which needs at least 9 " \
           "frames" in str(e.value)


def test_null_sample_count_is_a_located_error():
    # found by benchmarks/fuzz_suites.py (3000 examples): `--set evaluation.num_samples=` gave a KeyError
    suite = Path(__file__).resolve().parents[1] / "suites" / "fashion-mnist.yaml"
    for key in ("num_samples", "num_reconstructions"):
        with pytest.raises(SuiteError, match=rf"--set evaluation\.{key}=\): evaluation\.{key}: expected an integer"):
            load_suite(suite, [f"evaluation.{key}="])


def test_per_image_metrics_need_reference_images(tmp_path):
    """kid / precision / recall against a statistics-only reference are refused when the suite is read; an ADM
    reference batch (mu, sigma and its images arr_0) is accepted."""
    import numpy as np

    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(tmp_path / "batch.npz", mu=np.zeros(2048), sigma=np.eye(2048), arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    for ref in ("stats.npz", "batch.npz"):
        write(tmp_path, {"suite.yaml": doc(evaluation=f"evaluation: {{metrics: [fid, precision], reference: "
                                                      f"{tmp_path / ref}}}\n")})
        if ref == "stats.npz":
            with pytest.raises(SuiteError, match=r"evaluation\.metrics\[1\]: precision need the reference images' "
                                                 r"features, and .*stats\.npz holds statistics \(mu, sigma\) only"):
                load_suite(tmp_path / "suite.yaml")
        else:
            assert load_suite(tmp_path / "suite.yaml").evaluation.reference == str(tmp_path / ref)
