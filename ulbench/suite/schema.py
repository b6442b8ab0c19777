"""The suite format, version 1, section by section: each ``read_*`` takes the raw (merged) YAML value of its
section and returns the typed spec, or raises one located ``SuiteError``:
``{file}: {key.path}: {problem} (allowed: ...); did you mean '...'?``.

The file named is the one that set the key (an included file, or ``--set``), looked up in ``origins``.
"""
from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from ulbench.errors import UserError
from ulbench.metrics.registry import METRICS, metrics_for

Key = tuple  # a key path: mapping keys (str) and list indices (int), e.g. ("methods", 0, "preset")
INT64_MAX = 2**63 - 1  # integers are stored as int64 (torch seeds, step counts, sample indices)
MAX_SHOWN = 80  # characters of a bad value quoted in an error


class SuiteError(UserError):
    """A suite file (or a --set) that cannot be loaded: the message names the file, the key and what is allowed."""


def dotted(path: Key) -> str:
    """("methods", 0, "overrides", "diffusion") -> "methods[0].overrides.diffusion"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "top level"


def show(value: Any) -> str:
    """A value as the user wrote it in YAML, with its type where that is the point."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"'{value if len(value) <= MAX_SHOWN else value[:MAX_SHOWN - 3] + '...'}' (a string)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def did_you_mean(word: Any, choices: Sequence[str]) -> str | None:
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return matches[0] if matches else None


def to_float(value: Any) -> float | None:
    """A finite number from an int, a float or a numeric string (PyYAML reads ``1e12`` as a string); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    try:
        x = float(value) if isinstance(value, (int, float)) else math.nan
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


class Checker:
    """Typed reads of a merged suite mapping; every failure names the file that set the key."""

    def __init__(self, file: Path, origins: dict[Key, str]):
        self.file, self.origins = file, origins

    def where(self, path: Key) -> str:
        for n in range(len(path), 0, -1):
            if tuple(path[:n]) in self.origins:
                return self.origins[tuple(path[:n])]
        return str(self.file)

    def fail(self, path: Key, problem: str, allowed: Sequence[Any] | None = None, got: Any = None) -> NoReturn:
        msg = f"{self.where(path)}: {dotted(path)}: {problem}"
        if allowed:
            msg += f" (allowed: {', '.join(str(a) for a in allowed)})"
        guess = did_you_mean(got, allowed) if allowed and got is not None else None
        if guess is not None:
            msg += f"; did you mean '{guess}'?"
        raise SuiteError(msg)

    def mapping(self, value: Any, path: Key, allowed: Sequence[str], required: Sequence[str] = ()) -> dict:
        """A mapping whose keys are all in ``allowed`` and include ``required``."""
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping (keys: {', '.join(allowed)}), got {show(value)}")
        for key in value:
            if key not in allowed:
                self.fail((*path, str(key)), "unknown key", allowed, got=key)
        for key in required:
            if key not in value:
                self.fail((*path, key), "missing (required)")
        return value

    def integer(self, value: Any, path: Key, minimum: int, maximum: int = INT64_MAX) -> int:
        """An int in [``minimum``, ``maximum``]; integral floats and numeric strings ("5e4") are accepted, booleans
        are not."""
        x = to_float(value)
        if x is None or x != int(x):
            self.fail(path, f"expected an integer >= {minimum}, got {show(value)}")
        if x < minimum:
            self.fail(path, f"must be >= {minimum}, got {int(x)}")
        if x > maximum:
            self.fail(path, f"must be <= {maximum}{' (a 64-bit integer)' if maximum == INT64_MAX else ''}, got "
                      f"{show(value)}")
        return int(x)

    def number(self, value: Any, path: Key, above: float | None = None, below: float | None = None,
               at_least: float | None = None) -> float:
        """A finite float (numeric strings accepted) in the open/closed bounds given."""
        x = to_float(value)
        if x is None:
            self.fail(path, f"expected a number, got {show(value)}")
        if above is not None and not x > above:
            self.fail(path, f"must be > {above:g}, got {x:g}")
        if below is not None and not x < below:
            self.fail(path, f"must be < {below:g}, got {x:g}")
        if at_least is not None and not x >= at_least:
            self.fail(path, f"must be >= {at_least:g}, got {x:g}")
        return x

    def string(self, value: Any, path: Key, pattern: str | None = None) -> str:
        if not isinstance(value, str) or not value:
            self.fail(path, f"expected a non-empty string, got {show(value)}")
        if pattern is not None and not re.fullmatch(pattern, value):
            self.fail(path, f"'{value}' is not a valid name: it must match {pattern}")
        return value

    def choice(self, value: Any, path: Key, choices: Sequence[str]) -> str:
        if isinstance(value, str) and value not in choices:
            self.fail(path, f"unknown value '{value}'", choices, got=value)
        if not isinstance(value, str):
            self.fail(path, f"expected a name, got {show(value)}", choices)
        return value

    def boolean(self, value: Any, path: Key) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {show(value)}")
        return value

    def sequence(self, value: Any, path: Key, what: str) -> list:
        """A non-empty list."""
        if not isinstance(value, list):
            self.fail(path, f"expected a list of {what}, got {show(value)}")
        if not value:
            self.fail(path, f"expected a non-empty list of {what}, got []")
        return value


VIDEO_DATASETS = ("clips", "videos", "kinetics", "clip-array", "prepared-clips")
DATASETS = ("photos", "fashion-mnist", "prepared", "folder", *VIDEO_DATASETS)
PATH_DATASETS = ("prepared", "folder", "videos", "kinetics", "clip-array", "prepared-clips")  # read from dataset.path
PATH_WANTS = {  # what dataset.path holds, per dataset name
    "prepared": "a folder or .zip written by `ulbench data prepare`",
    "folder": "the images of this folder (ImageFolder layout), ADM-cropped on the fly",
    "videos": "a folder of videos (labels from its sub-folders)",
    "kinetics": "the folder of Kinetics clips ({youtube_id}_{start:06d}_{end:06d}.mp4, flat or in class folders)",
    "clip-array": "an .npz of uint8 clips (arr_0: N x T x H x W x C)",
    "prepared-clips": "a folder written by `ulbench data prepare-clips`",
}
# Keys of video datasets only (image datasets keep DatasetSpec's defaults for them, frames 0).
VIDEO_DEFAULTS = {"frames": 16, "stride": 1, "fps": None, "clips_per_video": None, "hop": None, "annotations": None}
EVAL_DATASET_KEYS = ("path", "annotations", "split", "subset", "clips_per_video", "hop")
METHOD_NAME = r"[a-z0-9][a-z0-9_-]*"
MAX_RUNGS = 1000  # a {start, factor, count} ladder longer than this is a typo, not a sweep
MAX_LOG10_FLOPS = 300  # a ladder's rungs stay well inside a float's range (1.8e308)
# Items a metric needs at least: a Frechet distance needs a covariance, KID's unbiased MMD pairs of items; the
# others are per-item means (1).
MIN_ITEMS = {"fid": 2, "kid": 2, "rfid": 2, "fvd": 2, "rfvd": 2, "precision": 4, "recall": 4}  # PR: k=3 neighbours
MIN_BOOTSTRAP = 2  # evaluation.bootstrap: 0 (no interval) or at least 2 resamples for a percentile interval
MIN_KID_SUBSET = 2
# Defaults of the optional keys of the sections (required: dataset.name, dataset.resolution, methods[].name,
# methods[].preset, compute.ladder; dataset.path when dataset.name is prepared or folder).
DATASET_DEFAULTS = {"path": None, "split": "train", "subset": None, "class_conditional": False, "xflip": False,
                    "workers": 0, **VIDEO_DEFAULTS}
METHOD_DEFAULTS = {"kind": "ul", "overrides": {}, "train": {}, "sampler": {}, "guidance": None}
STAGE1_DEFAULT = {"fraction": 0.5}
SAMPLER_DEFAULTS = {"method": "ancestral", "steps": 50, "decoder_steps": 50, "guidance_interval": None}
SAMPLER_METHODS = ("ancestral", "ddim")
EVAL_DEFAULTS = {"metrics": None, "num_samples": 200, "num_reconstructions": 200, "reference": "dataset",
                 "reference_size": None, "sampler": SAMPLER_DEFAULTS, "guidance": [1.0], "bootstrap": 0,
                 "kid_subset_size": 100, "resize": "legacy", "batch_size": 50, "dataset": None,
                 "dinov2_weights": None}


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # photos | fashion-mnist | prepared | folder; clips: clips | videos | kinetics | clip-array | prepared-clips
    path: str | None  # what PATH_WANTS says, per name
    resolution: int
    split: str  # train | test (kinetics: train | val | test)
    subset: int | None  # use the first N images
    class_conditional: bool
    xflip: bool  # train on mirrored copies too (EDM2's xflip: 2N images; latent caches keep both)
    workers: int  # DataLoader worker processes for training batches and latent caching (0: in the main process)
    frames: int = 0  # clips: T frames (0: an image dataset)
    stride: int = 1  # clips: every stride-th source frame ...
    fps: float | None = None  # ... or frames resampled to this rate
    clips_per_video: int | None = None  # clips: windows per video (None: every window)
    hop: int | None = None  # clips: source frames between window starts (None: one clip span)
    annotations: str | None = None  # kinetics: the official annotation CSV

    @property
    def video(self) -> bool:
        return self.frames > 0

    def to_dict(self) -> dict:
        """Plain fields; an image dataset leaves out the clip keys (they keep their image values)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in d.items() if self.video or k not in VIDEO_DEFAULTS}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str  # a key of ulbench.methods.KINDS
    preset: str
    overrides: dict  # nested, checked against the preset's config; values as the config holds them (lists for tuples)
    train: dict  # stage -> {TrainConfig field: value}; never steps (they follow from the compute budgets)
    resolution: int  # the dataset's: config() resolves the preset at it
    # How it samples, resolved: the kind's published sampler (or the suite's evaluation.sampler when none is
    # published), then methods[].sampler; only the kind's sampler_keys.
    sampler: dict = field(default_factory=dict)
    guidance: tuple[float, ...] = (1.0,)  # methods[].guidance, else evaluation.guidance

    def config(self) -> Any:
        from ulbench.methods import get_kind

        return get_kind(self.kind).resolve(self.preset, self.overrides, resolution=self.resolution)


@dataclass(frozen=True)
class ComputeSpec:
    ladder: tuple[float, ...]  # train FLOPs of each rung, strictly increasing
    counts: str  # stage2: a rung's budget is final-stage FLOPs (the paper's figure); total: stage 1 included
    stage1_fraction: float | None  # of the largest rung; exactly one of this and stage1_train_flops is set
    stage1_train_flops: float | None

    def stage1_budget(self) -> float:
        """Stage-1 train FLOPs: trained once per method and shared by every rung."""
        if self.stage1_train_flops is not None:
            return self.stage1_train_flops
        return self.stage1_fraction * self.ladder[-1]


@dataclass(frozen=True)
class EvalSpec:
    metrics: tuple[str, ...]  # keys of METRICS
    num_samples: int  # generated samples for fid/kid
    num_reconstructions: int  # dataset images reconstructed for rfid/psnr/bits_per_pixel
    reference: str  # "dataset" or a path (ADM .npz statistics or an image folder)
    reference_size: int | None  # dataset images for the reference statistics; None: num_samples
    sampler: dict  # UL's (SAMPLER_DEFAULTS); a kind with a published sampler uses that (MethodSpec.sampler)
    guidance: tuple[float, ...]
    bootstrap: int  # bootstrap repetitions for FID 95% CIs (0: none)
    kid_subset_size: int
    resize: str  # legacy | clean
    batch_size: int  # feature extraction
    dataset: DatasetSpec | None = None  # clips: the evaluation set (the dataset with evaluation.dataset's keys)
    dinov2_weights: str | None = None  # fd_dinov2: the official DINOv2 ViT-L/14 file (None: $ULBENCH_DINOV2_WEIGHTS)


@dataclass(frozen=True)
class SeedSpec:
    train: int
    sample: int  # sample i is drawn from seed sample + i


@dataclass(frozen=True)
class ReportSpec:
    published: str | None  # published-points file to overlay, one of PUBLISHED


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def read_dataset(ck: Checker, raw: Any, p: Key = ("dataset",)) -> DatasetSpec:
    d = {**DATASET_DEFAULTS, **ck.mapping(raw, p, ("name", *DATASET_DEFAULTS, "resolution"), ("name", "resolution"))}
    name = ck.choice(d["name"], (*p, "name"), DATASETS)
    video = name in VIDEO_DATASETS
    resolution = ck.integer(d["resolution"], (*p, "resolution"), 1)
    if resolution % 8:
        ck.fail((*p, "resolution"), f"must be a multiple of 8, got {resolution}")
    if name in PATH_DATASETS and d["path"] is None:
        ck.fail((*p, "path"), f"missing: name: {name} reads {PATH_WANTS[name]}")
    if name not in PATH_DATASETS and d["path"] is not None:
        ck.fail((*p, "path"), f"only for name: {' or '.join(PATH_DATASETS)} ({name} needs no path); remove it or "
                "set it to null")
    if not video:
        for key in VIDEO_DEFAULTS:
            if key in raw:
                ck.fail((*p, key), f"only for clip datasets ({', '.join(VIDEO_DATASETS)}); {name} holds images")
    if (name == "kinetics") != (d["annotations"] is not None):
        ck.fail((*p, "annotations"), "name: kinetics needs the official annotation CSV here (e.g. validate.csv)"
                if name == "kinetics" else f"only for name: kinetics, not {name}")
    splits = ("train", "val", "test") if name == "kinetics" else ("train", "test")
    if name == "kinetics" and isinstance(d["split"], str):  # the annotation CSVs' spellings (validate, validation)
        from ulbench.data.video import SPLIT_SPELLINGS

        d["split"] = SPLIT_SPELLINGS.get(d["split"], d["split"])
    spec = DatasetSpec(name, None if d["path"] is None else ck.string(d["path"], (*p, "path")), resolution,
                       ck.choice(d["split"], (*p, "split"), splits),
                       None if d["subset"] is None else ck.integer(d["subset"], (*p, "subset"), 1),
                       ck.boolean(d["class_conditional"], (*p, "class_conditional")),
                       ck.boolean(d["xflip"], (*p, "xflip")), ck.integer(d["workers"], (*p, "workers"), 0))
    if not video:
        return spec
    return replace(spec, frames=ck.integer(d["frames"], (*p, "frames"), 2),
                   stride=ck.integer(d["stride"], (*p, "stride"), 1),
                   fps=None if d["fps"] is None else ck.number(d["fps"], (*p, "fps"), above=0),
                   clips_per_video=None if d["clips_per_video"] is None else
                   ck.integer(d["clips_per_video"], (*p, "clips_per_video"), 1),
                   hop=None if d["hop"] is None else ck.integer(d["hop"], (*p, "hop"), 1),
                   annotations=None if d["annotations"] is None else ck.string(d["annotations"], (*p, "annotations")))


def read_eval_dataset(ck: Checker, raw: Any, dataset: DatasetSpec) -> DatasetSpec | None:
    """``evaluation.dataset``: the keys of the training dataset that differ for the evaluation clips (e.g. another
    annotation CSV and split); clips only. Unset: the training dataset itself."""
    p = ("evaluation", "dataset")
    if raw is None:
        return None
    if not dataset.video:
        ck.fail(p, "only for clip datasets: image suites evaluate against evaluation.reference")
    ck.mapping(raw, p, EVAL_DATASET_KEYS)  # not frames or resolution: the evaluation clips are the model's shape
    return read_dataset(ck, {**dataset.to_dict(), **raw}, p)


def read_methods(ck: Checker, raw: Any, dataset: DatasetSpec, evaluation: EvalSpec) -> tuple[MethodSpec, ...]:
    """Every method's preset must take the dataset's items (clips of ``dataset.frames``, or images)."""
    methods: list[MethodSpec] = []
    frames = dataset.frames
    for i, item in enumerate(ck.sequence(raw, ("methods",), "methods (mappings with name, kind, preset)")):
        m = _read_method(ck, item, ("methods", i), dataset, evaluation)
        preset_frames = getattr(m.config(), "frames", 0)
        if preset_frames != frames:
            what = lambda t: f"clips of {t} frames" if t else "images"  # noqa: E731
            ck.fail(("methods", i, "preset"), f"{m.preset} models {what(preset_frames)}, but the dataset holds "
                    f"{what(frames)}; choose a {'video' if frames else 'image'} preset or set dataset.frames")
        first = next((j for j, other in enumerate(methods) if other.name == m.name), None)
        if first is not None:
            ck.fail(("methods", i, "name"), f"'{m.name}' is also the name of methods[{first}]; names must be unique")
        methods.append(m)
    return tuple(methods)


def _read_method(ck: Checker, raw: Any, p: Key, dataset: DatasetSpec, evaluation: EvalSpec) -> MethodSpec:
    from ulbench.methods import KINDS

    d = {**METHOD_DEFAULTS, **ck.mapping(raw, p, ("name", *METHOD_DEFAULTS, "preset"), ("name", "preset"))}
    name = ck.string(d["name"], (*p, "name"), METHOD_NAME)
    kind = KINDS[ck.choice(d["kind"], (*p, "kind"), list(KINDS))]
    preset = ck.choice(d["preset"], (*p, "preset"), list(kind.presets()))
    resolution = dataset.resolution
    overrides = _read_overrides(ck, d["overrides"], (*p, "overrides"), kind, preset, resolution)
    spec = MethodSpec(name, kind.name, preset, overrides, _read_train(ck, d["train"], (*p, "train"), kind),
                      resolution)
    config = spec.config()
    published = kind.sampler_recipe(config)
    base = published or {k: v for k, v in evaluation.sampler.items() if k in kind.sampler_keys}
    sampler = read_sampler(ck, {**base, **ck.mapping(d["sampler"], (*p, "sampler"), kind.sampler_keys)},
                           (*p, "sampler"))
    if d["guidance"] is None:
        guidance, where = evaluation.guidance, ("evaluation", "guidance")
    else:
        guidance, where = read_guidance(ck, d["guidance"], (*p, "guidance")), (*p, "guidance")
    for i, g in enumerate(guidance):
        if g == 1.0:
            continue
        if not dataset.class_conditional:
            ck.fail((*where, i), f"guidance {g:g} needs class labels, but dataset.class_conditional is false; use "
                    "guidance [1.0] or a class-conditional dataset")
        if not kind.trains_unconditional(config):
            dropout = "diffusion" if kind.name == "ul" else "backbone"
            ck.fail((*where, i), f"guidance {g:g} for method '{name}' ({preset}) would sample its unconditional "
                    "branch, which it never trains (label dropout 0); give the method `guidance: [1.0]`, or train "
                    f"the null class with `overrides: {{{dropout}: {{label_dropout: 0.1}}}}`")
    return replace(spec, sampler=sampler, guidance=guidance)


def read_sampler(ck: Checker, s: dict, p: Key) -> dict:
    """Sampler settings (any of SAMPLER_DEFAULTS' keys), each checked; ``guidance_interval`` is [lo, hi] in
    log-SNR (lo < hi) or null."""
    out = {}
    for key, value in s.items():
        if key == "method":
            out[key] = ck.choice(value, (*p, key), SAMPLER_METHODS)
        elif key in ("steps", "decoder_steps"):
            out[key] = ck.integer(value, (*p, key), 1)
        elif key == "guidance_interval":
            if value is not None:
                pair = ck.sequence(value, (*p, key), "log-SNR bounds [lo, hi]")
                if len(pair) != 2:
                    ck.fail((*p, key), f"expected [lo, hi] in log-SNR, got {show(value)}")
                lo, hi = (ck.number(v, (*p, key, j)) for j, v in enumerate(pair))
                if not lo < hi:
                    ck.fail((*p, key), f"lo {lo:g} is not below hi {hi:g}")
                value = [lo, hi]
            out[key] = value
    return out


def read_guidance(ck: Checker, raw: Any, p: Key) -> tuple[float, ...]:
    return tuple(ck.number(g, (*p, i), at_least=0) for i, g in enumerate(ck.sequence(raw, p, "guidance scales")))


def _read_overrides(ck: Checker, raw: Any, p: Key, kind: Any, preset: str, resolution: int) -> dict:
    from ulbench.methods.base import OverrideError

    if not isinstance(raw, dict):
        ck.fail(p, f"expected a mapping of {preset}'s config fields, got {show(raw)}")
    if "resolution" in raw:
        ck.fail((*p, "resolution"), "comes from dataset.resolution; remove it here")
    raw = _numbers_like(kind.presets()[preset], raw)
    try:
        config = kind.resolve(preset, raw, resolution=resolution)
    except OverrideError as e:
        _override_fail(ck, p, e)
    except (ValueError, TypeError) as e:  # the kind's own check of the resolved config
        ck.fail(p, str(e))
    return _canonical(config, raw)


def _read_train(ck: Checker, raw: Any, p: Key, kind: Any) -> dict:
    from ul_model.train import TrainConfig
    from ulbench.methods.base import OverrideError, apply_overrides

    out = {}
    for stage, settings in ck.mapping(raw, p, kind.stages).items():
        if isinstance(settings, dict) and "steps" in settings:
            ck.fail((*p, stage, "steps"), "not settable: each stage's steps follow from compute.ladder and "
                    "compute.stage1 (train FLOPs / measured FLOPs per step)")
        settings = _numbers_like(TrainConfig(), settings)
        try:
            out[stage] = _canonical(apply_overrides(TrainConfig(), settings), settings)
        except OverrideError as e:
            e.allowed = [a for a in e.allowed if a != "steps"]
            _override_fail(ck, (*p, stage), e)
    return out


def _override_fail(ck: Checker, prefix: Key, e: Any) -> NoReturn:
    parts = tuple(e.key.split(".")) if e.key != "overrides" else ()
    ck.fail((*prefix, *parts), e.problem, e.allowed, got=parts[-1] if e.allowed and parts else None)


def _numbers_like(config: Any, overrides: Any) -> Any:
    """``overrides`` with numeric strings (YAML reads ``1e-3`` as a string) turned into the int or float that the
    config's field holds; anything else is left for apply_overrides to judge."""
    if not (is_dataclass(config) and isinstance(overrides, dict)):
        return overrides
    names = {f.name for f in fields(config)}
    out = {}
    for key, value in overrides.items():
        current = getattr(config, key) if key in names else None
        if is_dataclass(current):
            out[key] = _numbers_like(current, value)
        elif isinstance(current, tuple) and current and isinstance(value, list):
            out[key] = [_number_like(v, current[0]) for v in value]
        else:
            out[key] = _number_like(value, current)
    return out


def _number_like(value: Any, current: Any) -> Any:
    if not isinstance(value, str) or isinstance(current, bool) or not isinstance(current, (int, float)):
        return value
    x = to_float(value)
    if x is None:
        return value
    return x if isinstance(current, float) else (int(x) if x == int(x) else value)


def _canonical(config: Any, overrides: dict) -> dict:
    """The overridden fields as the resolved config holds them (floats for float fields; lists for tuples)."""
    return {k: _canonical(getattr(config, k), v) if is_dataclass(getattr(config, k)) else plain(getattr(config, k))
            for k, v in overrides.items()}


def read_compute(ck: Checker, raw: Any) -> ComputeSpec:
    p = ("compute",)
    d = ck.mapping(raw, p, ("ladder", "counts", "stage1"), required=("ladder",))
    ladder = _read_ladder(ck, d["ladder"], (*p, "ladder"))
    counts = ck.choice(d.get("counts", "stage2"), (*p, "counts"), ("stage2", "total"))
    s1 = ck.mapping(d.get("stage1", STAGE1_DEFAULT), (*p, "stage1"), ("fraction", "train_flops"))
    if len(s1) != 1:
        ck.fail((*p, "stage1"), f"give exactly one of fraction (of the largest rung) or train_flops, got "
                f"{' and '.join(s1) or 'neither'}")
    spec = ComputeSpec(ladder, counts,
                       ck.number(s1["fraction"], (*p, "stage1", "fraction"), above=0, below=1)
                       if "fraction" in s1 else None,
                       ck.number(s1["train_flops"], (*p, "stage1", "train_flops"), above=0)
                       if "train_flops" in s1 else None)
    if counts == "total" and spec.stage1_budget() >= ladder[0]:
        ck.fail((*p, "stage1"), f"the stage-1 budget {spec.stage1_budget():.3g} train FLOPs is not below the smallest "
                f"rung compute.ladder[0] = {ladder[0]:.3g}; with counts: total every rung includes stage 1, so "
                "lower compute.stage1 or use counts: stage2")
    return spec


def _read_ladder(ck: Checker, raw: Any, p: Key) -> tuple[float, ...]:
    """A list of budgets, or {start, factor, count} -> start * factor**i for i < count."""
    if isinstance(raw, dict):
        d = ck.mapping(raw, p, ("start", "factor", "count"), required=("start", "factor", "count"))
        start = ck.number(d["start"], (*p, "start"), above=0)
        factor = ck.number(d["factor"], (*p, "factor"), above=1)
        count = ck.integer(d["count"], (*p, "count"), 1)
        if count > MAX_RUNGS:
            ck.fail((*p, "count"), f"must be <= {MAX_RUNGS}, got {count}")
        growth = (count - 1) * math.log10(factor)  # factor**(count - 1) itself must be a float, too
        if growth > MAX_LOG10_FLOPS or math.log10(start) + growth > MAX_LOG10_FLOPS:
            ck.fail(p, f"the last rung {start:g} * {factor:g}**{count - 1} is beyond a float's range")
        return tuple(start * factor**i for i in range(count))
    items = ck.sequence(raw, p, "train FLOP budgets (or a mapping {start, factor, count})")
    budgets = tuple(ck.number(x, (*p, i), above=0) for i, x in enumerate(items))
    for i in range(1, len(budgets)):
        if budgets[i] <= budgets[i - 1]:
            ck.fail((*p, i), f"{budgets[i]:.3g} is not above compute.ladder[{i - 1}] = {budgets[i - 1]:.3g}; the "
                    "ladder must be strictly increasing")
    return budgets


def read_evaluation(ck: Checker, raw: Any, dataset: DatasetSpec) -> EvalSpec:
    p = ("evaluation",)
    d = {**EVAL_DEFAULTS, **ck.mapping(raw, p, tuple(EVAL_DEFAULTS))}
    allowed = metrics_for(dataset.video, dataset.class_conditional, opt_in=True)
    metrics = metrics_for(dataset.video, dataset.class_conditional) if d["metrics"] is None else \
        ck.sequence(d["metrics"], (*p, "metrics"), "metric names")
    for i, m in enumerate(metrics):
        ck.choice(m, (*p, "metrics", i), list(METRICS))
        if m not in allowed and METRICS[m].conditional and not dataset.class_conditional:
            ck.fail((*p, "metrics", i), f"'{m}' needs class labels: set dataset.class_conditional: true")
        if m not in allowed:
            ck.fail((*p, "metrics", i), f"'{m}' is not defined on {'clips' if dataset.video else 'images'} "
                    f"(dataset {dataset.name})", allowed)
        if m in metrics[:i]:
            ck.fail((*p, "metrics", i), f"'{m}' is listed twice")
    if "class_acc" in metrics and d["reference"] != "dataset":
        ck.fail((*p, "metrics", list(metrics).index("class_acc")), "class_acc needs labelled reference images: "
                "reference: dataset (a statistics file or folder has no labels)")
    needs_images = [m for m in metrics if m in ("kid", "precision", "recall")]
    if needs_images and isinstance(d["reference"], str) and d["reference"] != "dataset" \
            and _is_stats_only(d["reference"]):
        ck.fail((*p, "metrics", list(metrics).index(needs_images[0])), f"{' and '.join(needs_images)} need the "
                f"reference images' features, and {d['reference']} holds statistics (mu, sigma) only: give an image "
                "folder, .npz of images or ADM reference batch (mu, sigma and arr_0) as evaluation.reference, "
                "reference: dataset, or leave them out")
    sampler = read_sampler(ck, {**SAMPLER_DEFAULTS, **ck.mapping(d["sampler"], (*p, "sampler"),
                                                                 tuple(SAMPLER_DEFAULTS))}, (*p, "sampler"))
    counts = {key: _read_count(ck, d[key], (*p, key), metrics, needs, dataset)
              for key, needs in (("num_samples", "samples"), ("reference_size", "samples"),
                                 ("num_reconstructions", "reconstructions"))
              if d[key] is not None or key != "reference_size"}  # only reference_size may be null (= num_samples)
    bootstrap = ck.integer(d["bootstrap"], (*p, "bootstrap"), 0)
    if 0 < bootstrap < MIN_BOOTSTRAP:
        ck.fail((*p, "bootstrap"), f"0 (no interval) or at least {MIN_BOOTSTRAP} resamples (20 or more for a "
                f"stable interval), got {bootstrap}")
    fvds = [m for m in metrics if m in ("fvd", "rfvd")]
    if fvds:
        from ulbench.metrics.i3d import MIN_FRAMES

        if dataset.frames < MIN_FRAMES:
            ck.fail(("dataset", "frames"), f"{' and '.join(fvds)} embed clips with I3D, which needs at least "
                    f"{MIN_FRAMES} frames (16 is the FVD protocol's length), got {dataset.frames}; use longer clips or "
                    "leave them out of evaluation.metrics")
    dinov2_weights = None if d["dinov2_weights"] is None else ck.string(d["dinov2_weights"], (*p, "dinov2_weights"))
    if "fd_dinov2" in metrics:  # the user's file, never downloaded: a missing one is named now, not after training
        from ulbench.metrics.dinov2 import resolve_weights

        try:
            resolve_weights(dinov2_weights, "evaluation.dinov2_weights")
        except UserError as e:
            ck.fail((*p, "dinov2_weights"), str(e))
    if "rlpips" in metrics:
        from ulbench.metrics.lpips import BACKBONES

        if dataset.resolution < BACKBONES["vgg"].min_size:
            ck.fail((*p, "metrics", list(metrics).index("rlpips")), f"rlpips (LPIPS-VGG) needs images of at least "
                    f"{BACKBONES['vgg'].min_size}x{BACKBONES['vgg'].min_size} pixels, dataset.resolution is "
                    f"{dataset.resolution}; leave it out of evaluation.metrics")
    return EvalSpec(
        metrics=tuple(metrics), num_samples=counts["num_samples"], num_reconstructions=counts["num_reconstructions"],
        reference=ck.string(d["reference"], (*p, "reference")), reference_size=counts.get("reference_size"),
        sampler=sampler, guidance=read_guidance(ck, d["guidance"], (*p, "guidance")), bootstrap=bootstrap,
        kid_subset_size=ck.integer(d["kid_subset_size"], (*p, "kid_subset_size"), MIN_KID_SUBSET),
        resize=ck.choice(d["resize"], (*p, "resize"), ("legacy", "clean")),
        batch_size=ck.integer(d["batch_size"], (*p, "batch_size"), 1),
        dataset=read_eval_dataset(ck, d["dataset"], dataset), dinov2_weights=dinov2_weights)


def _is_stats_only(path: str) -> bool:
    """A statistics file without images (an ADM reference batch holds both)."""
    from ulbench.metrics.stats import is_stats_only  # here: numpy and torch only when a suite names a file

    return is_stats_only(Path(path).expanduser())


def _read_count(ck: Checker, raw: Any, p: Key, metrics: Sequence[str], needs: str, dataset: DatasetSpec) -> int:
    """num_samples, num_reconstructions or reference_size: at least what each metric using it needs (MIN_ITEMS)."""
    n = ck.integer(raw, p, 1)
    short = [m for m in metrics if METRICS[m].needs == needs and MIN_ITEMS.get(m, 1) > n]
    if short:
        items = ("clips" if dataset.video else "images") if p[-1] == "reference_size" else \
            ("clips" if dataset.video else needs)
        why = [w for w, ok in (("a Frechet distance needs a covariance", set(short) - {"kid", "precision", "recall"}),
                               ("KID's unbiased estimate needs pairs", "kid" in short),
                               ("each image needs 3 nearest neighbours", {"precision", "recall"} & set(short)))
               if ok]
        ck.fail(p, f"{' and '.join(short)} need{'s' if len(short) == 1 else ''} at least "
                f"{max(MIN_ITEMS[m] for m in short)} {items} ({'; '.join(why)}), got {n}")
    return n
