"""Suite files, format version 1: declarative YAML -> a frozen, fully validated ``Suite``.

Loading: each file is read with a safe loader (``yaml.safe_load``, plus: a key given twice is an error); the files
it ``include:``s come first (in order, recursively, paths relative to the including file), then the file itself on
top: mappings merge key by key, lists and scalars replace. Then ``--set dotted.key=value`` (value read as YAML, list
items by index: ``methods.0.preset``). Then every key is checked by its section's ``read_*`` in ``ulbench.suite.schema``;
an error names the file that set the key, the key path and what is allowed. Nothing here looks at the disk beyond
the suite files: ``check_paths`` (called by ``ulbench run``) checks the dataset folder and the reference.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ulbench.metrics.registry import METRICS, MetricInfo
from ulbench.suite.schema import (
    MAX_SHOWN,
    Checker,
    ComputeSpec,
    DatasetSpec,
    EvalSpec,
    Key,
    MethodSpec,
    ReportSpec,
    SeedSpec,
    SuiteError,
    dotted,
    plain,
    read_compute,
    read_dataset,
    read_evaluation,
    read_methods,
    show,
)

SUPPORTED_VERSIONS = (1,)
TOP_KEYS = ("version", "name", "description", "include", "dataset", "methods", "compute", "evaluation", "seeds",
            "device", "precision", "report")
PUBLISHED = ("imagenet512", "kinetics600")  # published-points files a report can overlay
SUITE_NAME = r"[a-z0-9][a-z0-9_.-]*"
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
MAX_NESTING = 32  # levels of mappings/lists: the suite format uses ~8 (methods[0].overrides.<section>.<field>[i])

__all__ = [
    "METRICS",
    "ComputeSpec",
    "DatasetSpec",
    "EvalSpec",
    "MethodSpec",
    "MetricInfo",
    "ReportSpec",
    "SeedSpec",
    "Suite",
    "SuiteError",
    "check_paths",
    "list_suites",
    "load_suite",
    "register",
]


@dataclass(frozen=True)
class Suite:
    version: int
    name: str
    description: str
    file: Path
    dataset: DatasetSpec
    methods: tuple[MethodSpec, ...]
    compute: ComputeSpec
    evaluation: EvalSpec
    seeds: SeedSpec
    device: str  # auto | cpu | cuda | cuda:N
    precision: str  # auto | fp32 | bf16
    report: ReportSpec

    @property
    def budgets(self) -> tuple[float, ...]:
        return self.compute.ladder

    def to_dict(self) -> dict:
        """The resolved suite in plain JSON types, defaults filled and the ladder expanded: itself a valid suite."""
        c = self.compute
        stage1 = {"fraction": c.stage1_fraction} if c.stage1_fraction is not None else {
            "train_flops": c.stage1_train_flops}
        methods = [{"name": m.name, "kind": m.kind, "preset": m.preset, "overrides": m.overrides, "train": m.train,
                    "sampler": m.sampler, "guidance": m.guidance} for m in self.methods]
        return plain({"version": self.version, "name": self.name, "description": self.description,
                       "dataset": self.dataset.to_dict(), "methods": methods,
                       "compute": {"ladder": c.ladder, "counts": c.counts, "stage1": stage1},
                       "evaluation": self._evaluation_dict(), "seeds": asdict(self.seeds), "device": self.device,
                       "precision": self.precision, "report": asdict(self.report)})

    def _evaluation_dict(self) -> dict:
        d = asdict(self.evaluation)
        if d["dinov2_weights"] is None:
            d.pop("dinov2_weights")  # only fd_dinov2 uses it: resolved suites without it read as before
        if self.evaluation.dataset is None:
            d.pop("dataset")  # image suites, and clip suites evaluating on their training set
        else:
            train = self.dataset.to_dict()
            d["dataset"] = {k: v for k, v in self.evaluation.dataset.to_dict().items() if train[k] != v}  # changes
        return d


# ---------------------------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key given twice in one mapping is an error (PyYAML keeps the last),
    and a scalar that its type cannot hold (a 5000-digit int, 2001-02-30, ``!!float abc``) is a located YAML error
    instead of the ValueError PyYAML lets through."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as e:
            kind = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(None, None, f"not a readable {kind}: {str(e)[:120]}",
                                                    node.start_mark) from None


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (str, int, float, bool)) or key is None:
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice in this mapping",
                                                        key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    return f"{where}invalid YAML: {problem}" + (f" ({context})" if context else "")


def _check_version(value: Any, label: str) -> int:
    if type(value) is not int or value not in SUPPORTED_VERSIONS:
        raise SuiteError(f"{label}: version: unsupported suite format version {show(value)} "
                         f"(allowed: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    return value


def _nesting(value: Any) -> int | None:
    """Levels of mappings and lists in ``value`` (0: a scalar); None if it contains itself (a recursive YAML alias).
    Iterative and once per node (aliases make a graph, not a tree), so no input can exhaust the stack or the clock."""
    heights: dict[int, int] = {}
    active: set[int] = set()
    stack = [(value, False)]
    while stack:
        node, finished = stack.pop()
        if not isinstance(node, (dict, list)) or (not finished and id(node) in heights):
            continue
        children = [c for c in (node.values() if isinstance(node, dict) else node) if isinstance(c, (dict, list))]
        if finished:
            active.discard(id(node))
            heights[id(node)] = 1 + max((heights[id(c)] for c in children), default=0)
        elif id(node) in active:
            return None
        else:
            active.add(id(node))
            stack += [(node, True), *((c, False) for c in children)]
    return heights.get(id(value), 0)


def _check_nesting(data: dict, label: str) -> None:
    for key, value in data.items():
        depth = _nesting(value)
        if depth is None or 1 + depth > MAX_NESTING:
            what = "contains itself (a recursive YAML alias)" if depth is None else f"nests {1 + depth} levels deep"
            raise SuiteError(f"{label}: {dotted((key,))}: {what}; a suite nests at most {MAX_NESTING} levels")


def _parse(text: str) -> Any:
    """YAML text -> plain data with ``_Loader``; yaml.YAMLError, or RecursionError for a document nested thousands
    of levels deep (PyYAML's parser recurses per level)."""
    return yaml.load(text, Loader=_Loader)


def _read_file(path: Path, label: str) -> dict:
    try:
        data = _parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteError(f"{label}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SuiteError(f"{label}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        raise SuiteError(f"{label}: {_yaml_problem(e)}") from None
    except RecursionError:
        raise SuiteError(f"{label}: top level: nested too deeply to read; a suite nests at most {MAX_NESTING} "
                         "levels") from None
    if data is None:
        raise SuiteError(f"{label}: top level: the file is empty; a suite is a YAML mapping that starts with "
                         "`version: 1`")
    if not isinstance(data, dict):
        raise SuiteError(f"{label}: top level: expected a mapping of keys (version, dataset, methods, ...), "
                         f"got {show(data)}")
    if "version" in data:
        _check_version(data["version"], label)
    _check_nesting(data, label)
    return data


def _layers(path: Path, label: str, chain: tuple[tuple[Path, str], ...]) -> list[tuple[str, dict]]:
    """(file label, mapping) in merge order: the included files first (in order, recursively), then this file."""
    data = _read_file(path, label)
    include = data.pop("include", None)
    if isinstance(include, str):
        include = [include]
    if include is not None and not (isinstance(include, list) and all(isinstance(i, str) and i for i in include)):
        raise SuiteError(f"{label}: include: expected a file name or a list of file names, got {show(include)}")
    layers = []
    for name in include or []:
        target = Path(os.path.normpath(path.parent / name))
        try:
            found = target.is_file()
        except OSError as e:  # e.g. a name longer than the file system allows
            raise SuiteError(f"{label}: include: {show(name)}: cannot be opened: {e.strerror or e}") from None
        if not found:
            raise SuiteError(f"{label}: include: {name}: no such file: {target} (include paths are relative to the "
                             "including file)")
        if any(target.resolve() == seen for seen, _ in chain):
            cycle = " -> ".join([p for _, p in chain] + [str(target)])
            raise SuiteError(f"{label}: include: {name}: include cycle: {cycle}")
        layers += _layers(target, f"{target} (included from {path})", (*chain, (target.resolve(), str(target))))
    return [*layers, (label, data)]


def _forget(origins: dict, path: Key) -> None:
    for key in [k for k in origins if k[: len(path)] == path]:
        del origins[key]


def _merge(base: dict, top: dict, origins: dict, label: str, prefix: Key = ()) -> None:
    """``top`` onto ``base`` in place: mappings merge key by key, anything else replaces; ``origins`` records who set
    each key path."""
    for key, value in top.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, origins, label, path)
        else:
            base[key] = copy.deepcopy(value)
            _forget(origins, path)
        origins[path] = label


def _clip(text: str, limit: int = MAX_SHOWN) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _apply_set(data: dict, origins: dict, assignment: str, label: str) -> None:
    """One ``--set dotted.key=value``: the value is YAML; list items by index (``methods.0.preset``)."""
    where = f"{label}: --set '{_clip(assignment)}'"
    key, sep, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise SuiteError(f"{where}: expected KEY=VALUE with a dotted key, e.g. --set evaluation.num_samples=10")
    if parts[0] == "include":
        raise SuiteError(f"{where}: include is read from the files only; put it in the suite file")
    try:
        value = _parse(text)
    except yaml.YAMLError as e:
        raise SuiteError(f"{where}: the value: {_yaml_problem(e)}") from None
    except RecursionError:
        raise SuiteError(f"{where}: the value is nested too deeply to read") from None
    depth = _nesting(value)
    if depth is None:
        raise SuiteError(f"{where}: the value contains itself (a recursive YAML alias)")
    if len(parts) + depth > MAX_NESTING:
        raise SuiteError(f"{where}: the key and value nest {len(parts) + depth} levels deep; a suite nests at most "
                         f"{MAX_NESTING}")
    node, path = data, ()
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, dict):
            step = part
            if not last and node.get(part) is None:
                node[part] = {}
        elif isinstance(node, list) and re.fullmatch("[0-9]+", part) and int(part) < len(node):
            step = int(part)
        elif isinstance(node, list):
            raise SuiteError(f"{where}: {'.'.join(parts[:i]) or key} is a list of {len(node)}; '{part}' is not an "
                             f"index 0..{len(node) - 1}")
        else:
            raise SuiteError(f"{where}: {'.'.join(parts[:i])} is {show(node)}, not a mapping; cannot set '{part}' "
                             "inside it")
        path = (*path, step)
        if last:
            node[step] = value
        else:
            node = node[step]
    _forget(origins, path)
    origins[path] = f"{label} (--set {assignment})"


def load_suite(path: str | Path, sets: Sequence[str] = ()) -> Suite:
    """A suite file -> Suite: includes merged, ``sets`` applied, every key validated (SuiteError otherwise)."""
    file = Path(path)
    data: dict = {}
    origins: dict[Key, str] = {}
    for label, layer in _layers(file, str(file), ((file.resolve(), str(file)),)):
        _merge(data, layer, origins, label)
    for assignment in [sets] if isinstance(sets, str) else sets or ():
        _apply_set(data, origins, assignment, str(file))
    return _read_suite(Checker(file, origins), data)


# ---------------------------------------------------------------------------------------------- validation


def _read_suite(ck: Checker, data: dict) -> Suite:
    if "version" not in data:
        ck.fail(("version",), "missing (required): the first line of a suite is `version: 1`")
    version = _check_version(data["version"], ck.where(("version",)))
    ck.mapping(data, (), TOP_KEYS, required=("dataset", "methods", "compute"))
    name = data.get("name", ck.file.stem)
    if "name" not in data and not re.fullmatch(SUITE_NAME, name):
        ck.fail(("name",), f"not set, and the file name '{name}' is not a valid suite name ({SUITE_NAME}); set name:")
    dataset = read_dataset(ck, data["dataset"])
    seeds = ck.mapping(data.get("seeds", {}), ("seeds",), ("train", "sample"))
    device = data.get("device", "auto")
    if not (isinstance(device, str) and re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", device)):
        ck.fail(("device",), f"got {show(device)}", DEVICES, got=device if isinstance(device, str) else None)
    report = ck.mapping(data.get("report", {}), ("report",), ("published",))
    published = report.get("published")
    description = data.get("description", "")
    if not isinstance(description, str):
        ck.fail(("description",), f"expected a string, got {show(description)}")
    evaluation = read_evaluation(ck, data.get("evaluation", {}), dataset)
    return Suite(
        version=version, name=ck.string(name, ("name",), SUITE_NAME), description=description, file=ck.file,
        dataset=dataset, methods=read_methods(ck, data["methods"], dataset, evaluation),
        compute=read_compute(ck, data["compute"]), evaluation=evaluation,
        seeds=SeedSpec(*(ck.integer(seeds.get(k, 0), ("seeds", k), 0) for k in ("train", "sample"))),
        device=device, precision=ck.choice(data.get("precision", "auto"), ("precision",), ("auto", "fp32", "bf16")),
        report=ReportSpec(None if published is None else ck.choice(published, ("report", "published"), PUBLISHED)))


# ---------------------------------------------------------------------------------------------- use


def check_paths(suite: Suite) -> None:
    """The dataset folder and a reference path exist here (``ulbench run`` checks this before training)."""
    from ulbench.suite.schema import PATH_WANTS

    d, e = suite.dataset, suite.evaluation.dataset
    checks = [("dataset.path", d.path, PATH_WANTS[d.name])] if d.path else []
    checks += [("dataset.annotations", d.annotations, "the official Kinetics annotation CSV")] if d.annotations else []
    if e is not None:
        checks += [("evaluation.dataset.path", e.path, PATH_WANTS[e.name])] if e.path and e.path != d.path else []
        checks += [("evaluation.dataset.annotations", e.annotations, "the official Kinetics annotation CSV")] \
            if e.annotations and e.annotations != d.annotations else []
    if suite.evaluation.reference != "dataset":
        checks.append(("evaluation.reference", suite.evaluation.reference,
                       "ADM .npz statistics or an image folder, or reference: dataset"))
    for key, value, want in checks:
        if not Path(value).expanduser().exists():
            raise SuiteError(f"{suite.file}: {key}: {value} does not exist on this machine; point it at {want}, "
                             f"e.g. --set {key}=...")


def list_suites(folder: str | Path) -> list[tuple[str, Path, str]]:
    """(name, file, description) of each suite file in ``folder``; ``_*.yaml`` are include blocks, not suites."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SuiteError(f"{folder}: no such folder of suite files")
    out = []
    for file in sorted(f for f in folder.iterdir() if f.suffix in (".yaml", ".yml") and not f.name.startswith("_")):
        try:
            suite = load_suite(file)
            out.append((suite.name, file, suite.description))
        except SuiteError as e:
            out.append((file.stem, file, f"INVALID: {e}"))
    return out


VALIDATE_EXAMPLES = """examples:
  ulbench validate suites/smoke.yaml
  ulbench validate suites/*.yaml                      # include blocks (_*.yaml) are skipped
  ulbench validate suites/imagenet512.yaml --set dataset.path=/data/imagenet/train --set methods.0.preset=ul-medium
  ulbench validate my.yaml --set compute.ladder=[1.0e12,4.0e12] --set evaluation.num_samples=10"""


def cmd_validate(args) -> None:
    for f in args.suites:
        if Path(f).name.startswith("_"):
            print(f"skip {f}: an include block (the name starts with _), not a suite")
            continue
        suite = load_suite(f, args.set)
        b = suite.budgets
        print(f"ok  {f}: {len(suite.methods)} method(s), {len(b)} budget(s) from {b[0]:.1e} to {b[-1]:.1e} train FLOPs")


def register(sub) -> None:
    """``ulbench validate``."""
    p = sub.add_parser("validate", help="check suite files: every key, type and value; trains nothing",
                       description="Load suite files (includes, --set) and check every key; the first bad one ends\n"
                       "with its file, key and what is allowed. Paths (dataset.path, a reference file) are checked by\n"
                       "`ulbench run`, not here.", epilog=VALIDATE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="+", metavar="SUITE", help="suite YAML files")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key after includes (value read as YAML; list items by index: methods.0.preset)")
    p.set_defaults(func=cmd_validate)
