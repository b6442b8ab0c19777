"""Fuzzing the suite loader with hypothesis: random mutations of the committed suites (and of the include block
they share) and random ``--set`` strings. Every outcome must be a valid Suite (whose resolved dict loads back to
the same suite) or a UserError that starts with the file that set the key and the key; never another exception.

Derandomized (the same examples on every run, so CI is reproducible) and bounded: ~200 examples per test. The
campaign (benchmarks/fuzz_suites.py) runs the same properties with more, random examples: ULBENCH_FUZZ_EXAMPLES,
ULBENCH_FUZZ_SEED, and ULBENCH_FUZZ_OUTCOMES (a JSON file the outcome counts are added to)."""
from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ul_model.train import TrainConfig
from ulbench.errors import UserError
from ulbench.methods import KINDS
from ulbench.suite import MAX_SHOWN, TOP_KEYS, load_suite
from ulbench.suite.schema import DATASET_DEFAULTS, EVAL_DEFAULTS, SAMPLER_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
SUITES = sorted(p.name for p in (REPO / "suites").glob("*.yaml") if not p.name.startswith("_"))
BLOCKS = sorted(p.name for p in (REPO / "suites").glob("_*.yaml"))
CAMPAIGN_SEED = os.environ.get("ULBENCH_FUZZ_SEED")
FUZZ = settings(max_examples=int(os.environ.get("ULBENCH_FUZZ_EXAMPLES", 200)), deadline=None,
                derandomize=CAMPAIGN_SEED is None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def campaign_seed(test):
    return seed(int(CAMPAIGN_SEED))(test) if CAMPAIGN_SEED is not None else test


OUTCOMES: Counter = Counter()  # "<test>: valid" / "<test>: UserError", for the campaign's table

# Values a user might plausibly (or implausibly) write: other fields' valid values, numeric strings, specials.
WORDS = ["", " ", "1e12", "-1", "0", "1", "2", "nan", "inf", "-inf", ".inf", ".nan", "1e400", "0x10", "yes", "~",
         "null", "true", "auto", "cpu", "cuda:99", "fid", "kid", "fvd", "class_acc", "ul-tiny", "video-ul-tiny",
         "dit-tiny", "edm2", "photos", "clips", "kinetics", "folder", "stage1", "stage2", "total", "train", "test",
         "val", "ancestral", "ddim", "legacy", "clean", "dataset", "imagenet512", "../x", "/dev/null", "a.b",
         "methods.0", "é", "\t", "a: b", "- x", "{x: 1}", "²", "١", "01", "x" * 300, "9" * 400]
# Spliced into the dumped YAML as raw text: what yaml.safe_dump cannot write (huge literals, deep nesting, aliases).
RAW = ["9" * 5000, "[" * 600 + "]" * 600, "[" * 400 + "]" * 400, "&loop [*loop]", "2001-02-30", "!!float abc",
       "!!int 0x", "!!binary ==", "{" * 40 + "}" * 40, "!!python/object/apply:os.system ['true']"]
NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, 7, 8, 9, -8, 16, 2**31, 10**30]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 0.5, 1.0, 1e308]))
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, st.sampled_from(WORDS))
RAW_MARKS = st.sampled_from([f"RAW{i}RAW" for i in range(len(RAW))])
KNOWN = sorted({*TOP_KEYS, *DATASET_DEFAULTS, "name", "resolution", *EVAL_DEFAULTS, *SAMPLER_DEFAULTS, "preset",
                "kind", "overrides", "train", "sampler", "guidance", "ladder", "counts", "stage1", "stage2", "start",
                "factor", "count", "fraction", "train_flops", "published", "sample", *(f.name for f in
                                                                                      fields(TrainConfig))})
KEYS = st.one_of(TEXT, st.sampled_from(WORDS), st.sampled_from(KNOWN), st.integers(-3, 3), st.none(), st.booleans())
GARBAGE = st.recursive(st.one_of(SCALARS, RAW_MARKS),
                       lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
                       max_leaves=6)


def field_paths(config, prefix=()):
    """Every field of a (nested) config dataclass as a key path, with its default."""
    for f in fields(config):
        value = getattr(config, f.name)
        yield (*prefix, f.name), value
        if is_dataclass(value):
            yield from field_paths(value, (*prefix, f.name))


def near(data: st.DataObject, value):
    """A value near a valid one: another sign or scale, the wrong type, or garbage."""
    options = [[value], str(value), None]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        options += [-value, 0, value * 1000, value / 3, value + 1, math.inf]
    if isinstance(value, tuple):
        options += [list(value)[:-1], list(value) * 2, []]
    return data.draw(st.one_of(st.sampled_from(options), GARBAGE), label="near value")
BAD_YAML = ["[", "{a", "a: b: c", "&a *b", "!!python/object/apply:os.system ['true']", "'", '"', "- [", "@x", "%",
            "{a: 1, a: 2}", "*x", "!!binary x", "? [a]\n: 1", "\t1"]


def paths(node, prefix=()):
    """Every (path, value) in a YAML document, the root included."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, (*prefix, i))


def get(doc, path):
    for part in path:
        doc = doc[part]
    return doc


def mutate(data: st.DataObject, doc):
    """One random edit of ``doc``: delete, replace (garbage, a nearby number, the wrong type), insert a key."""
    path, value = data.draw(st.sampled_from(list(paths(doc))), label="where")
    ops = ["replace", "wrap", "raw"]
    ops += ["delete"] if path else []
    ops += ["insert"] if isinstance(value, dict) else []
    ops += ["empty"] if isinstance(value, (list, dict)) else []
    ops += ["nudge"] if isinstance(value, (int, float)) and not isinstance(value, bool) else []
    method = len(path) == 2 and path[0] == "methods" and isinstance(value, dict)
    preset = KINDS.get(str(value.get("kind", "ul")), KINDS["ul"]).presets().get(value.get("preset")) \
        if method and isinstance(value.get("preset"), str) else None
    ops += ["override", "override", "train"] if preset is not None else []
    op = data.draw(st.sampled_from(ops), label="op")
    if op in ("override", "train"):  # a real config field (deep in the schema) set to something near-valid
        config, section = (preset, ["overrides"]) if op == "override" else \
            (TrainConfig(), ["train", data.draw(st.sampled_from(["stage1", "stage2"]), label="stage")])
        where, default = data.draw(st.sampled_from(list(field_paths(config))), label="field")
        node = value
        for part in section + list(where[:-1]):
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict) or part not in node else {}
        node[where[-1]] = near(data, default)
        return doc
    if op == "insert":
        value[data.draw(KEYS, label="key")] = data.draw(GARBAGE, label="value")
        return doc
    if op == "delete":
        parent = get(doc, path[:-1])
        del parent[path[-1]]
        return doc
    new = {"replace": lambda: data.draw(GARBAGE, label="value"), "raw": lambda: data.draw(RAW_MARKS, label="raw"),
           "wrap": lambda: data.draw(st.sampled_from([[value], {"x": value}, str(value)]), label="wrapped"),
           "empty": lambda: type(value)(),
           "nudge": lambda: data.draw(st.sampled_from([-value, 0, value - 1, value + 1, value * 1e300, value / 3,
                                                       math.nan, math.inf]), label="nudged")}[op]()
    if not path:
        return new
    get(doc, path[:-1])[path[-1]] = new
    return doc


def dump(doc, **flow) -> str:
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False, width=10**6, **flow)
    for i, raw in enumerate(RAW):
        text = text.replace(f"RAW{i}RAW", raw)
    return text


def check_outcome(file: Path, sets: list[str], docs: list, make, labels: list[str]) -> None:
    """``make()`` returns a valid Suite, or raises a UserError naming the file (or --set) and the key."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
    try:
        suite = make()
    except UserError as e:
        OUTCOMES[f"{test}: UserError"] += 1
        msg = str(e)
        roots = set(TOP_KEYS) | {"top level"} | {str(k) for d in docs if isinstance(d, dict) for k in d}
        roots |= {s.partition("=")[0].strip().split(".")[0] for s in sets}
        rest = next((msg[len(label) + 2:] for label in sorted(labels, key=len, reverse=True)
                     if msg.startswith(label + ": ")), None)
        assert rest is not None, f"the error does not start with the file that set the key: {msg!r}"
        if rest.startswith("--set '"):  # a --set that cannot be applied: its key and value are the location
            shown = [s if len(s) <= MAX_SHOWN else s[:MAX_SHOWN - 3] + "..." for s in sets]  # long ones clipped
            assert any(rest.startswith(f"--set '{s}': ") for s in shown), msg
            return
        if rest.startswith("line "):  # YAML the parser refuses: the line and column are the location
            assert rest.split(": ", 1)[0].replace(",", "").split()[::2] == ["line", "column"], msg
            return
        assert any(rest.startswith((f"{r}: ", f"{r}.", f"{r}[", f"[{r}]")) for r in roots), \
            f"the error names no key of the suite: {msg!r}"
        return
    OUTCOMES[f"{test}: valid"] += 1
    again = file.with_name("resolved.yaml")
    again.write_text(yaml.safe_dump(suite.to_dict(), allow_unicode=True, sort_keys=False))
    assert load_suite(again).to_dict() == {**suite.to_dict(), "name": suite.name}  # to_dict() is itself a suite


@pytest.fixture(scope="module", autouse=True)
def outcome_counts():
    yield
    path = os.environ.get("ULBENCH_FUZZ_OUTCOMES")
    if path:
        Path(path).write_text(json.dumps(dict(sorted(OUTCOMES.items())), indent=2) + "\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz")
    for name in [*SUITES, *BLOCKS]:
        shutil.copy(REPO / "suites" / name, out / name)
    return out


def read(name: str):
    return yaml.safe_load((REPO / "suites" / name).read_text())


@campaign_seed
@FUZZ
@given(data=st.data())
def test_mutated_suites_load_or_fail_located(folder, data):
    name = data.draw(st.sampled_from(SUITES), label="suite")
    doc, block = read(name), None
    edit_block = bool(BLOCKS) and "include" in doc and data.draw(st.booleans(), label="edit the include block")
    if edit_block:  # the included file is the broken one: the error must name it
        block = read(BLOCKS[0])
        doc["include"] = "_fuzzed-block.yaml"
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        if edit_block:
            block = mutate(data, block)
        else:
            doc = mutate(data, doc)
    file = folder / "fuzzed.yaml"
    file.write_text(dump(doc))
    labels = [str(file)]
    if edit_block:  # written even when the edits made it null: a block left from an earlier example must not count
        (folder / "_fuzzed-block.yaml").write_text(dump(block))
        labels.append(f"{folder / '_fuzzed-block.yaml'} (included from {file})")
    elif isinstance(doc, dict) and isinstance(doc.get("include"), str):
        labels.append(f"{folder / doc['include']} (included from {file})")
    check_outcome(file, [], [doc, block, *(read(b) for b in BLOCKS)], lambda: load_suite(file), labels)


def set_key(data: st.DataObject, doc) -> str:
    """An existing key path (list items by index), one with a random tail, or random text."""
    existing = [".".join(str(p) for p in path) for path, _ in paths(doc) if path]
    kind = data.draw(st.sampled_from(["existing", "tail", "random"]), label="key kind")
    if kind == "random":
        return data.draw(st.one_of(TEXT, st.sampled_from(["", ".", "a..b", "methods.9", "methods.-1", "include",
                                                          "version", "=", "methods.0.x.y"])), label="key")
    key = data.draw(st.sampled_from(existing), label="key")
    return key + "." + data.draw(st.one_of(TEXT, st.sampled_from(["0", "1", "x", "name", *WORDS])), label="tail") \
        if kind == "tail" else key


@campaign_seed
@FUZZ
@given(data=st.data())
def test_random_set_strings_load_or_fail_located(folder, data):
    name = data.draw(st.sampled_from(SUITES), label="suite")
    doc = read(name)
    sets = []
    for _ in range(data.draw(st.integers(1, 3), label="sets")):
        value = data.draw(st.one_of(
            GARBAGE.map(lambda v: dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
            st.sampled_from(BAD_YAML + WORDS + RAW), TEXT), label="value")
        form = data.draw(st.sampled_from(["k=v", "k=v", "k=v", "k", "=v", "k==v"]), label="form")
        key = set_key(data, doc)
        sets.append({"k=v": f"{key}={value}", "k": key, "=v": f"={value}", "k==v": f"{key}=={value}"}[form])
    file = folder / name
    labels = [str(file), *(f"{file} (--set {s})" for s in sets)]
    if isinstance(doc.get("include"), str):
        labels.append(f"{folder / doc['include']} (included from {file})")
    check_outcome(file, sets, [doc, *(read(b) for b in BLOCKS)], lambda: load_suite(file, sets), labels)


def test_committed_suites_are_the_fuzzer_seeds():
    # The fuzzer mutates what is committed: it must find every suite and the include block they share.
    assert len(SUITES) >= 5 and BLOCKS == ["_cpu-defaults.yaml"]
    for name in SUITES:
        load_suite(REPO / "suites" / name)
