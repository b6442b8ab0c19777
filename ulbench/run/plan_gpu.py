"""A suite's plan in GPU-hours: training per rung and evaluation per rung on a named GPU (``--dry-run --gpu``).

GPU-hours = FLOPs / (peak FLOP/s x MFU) / 3600, FLOPs counted by FlopCounterMode (2 x multiply-adds): training from
the plan's measured step, evaluation from the network calls one sample and one reconstruction make
(``MethodKind.evaluation_calls``) and the feature network (Inception for FID, I3D for FVD of clip suites), each
counted once on the meta device. Peaks are the
dense bf16 tensor-core figures of NVIDIA's datasheets (``published/gpus.yaml``); the MFU is the user's to give.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

import torch
import yaml

from ulbench.errors import UserError
from ulbench.methods import get_kind
from ulbench.metrics.registry import needing
from ulbench.run.plan import FLOP_COUNT_BATCH, OFFICIAL_POINT, MethodPlan

# An assumption, not a measurement: override it with what your own runs achieve, MFU = the plan's training FLOPs per
# step x steps per second (a short run's logs) / (GPUs x peak). Sampling at small batches often achieves less.
DEFAULT_MFU = 0.4
DISTANCES = {"rfid", "rfvd"}  # reconstruction metrics that embed the reconstructions with the feature network
SAMPLE_METRICS, RECONSTRUCTION_METRICS = needing("samples"), needing("reconstructions")


@dataclass(frozen=True)
class GPU:
    name: str
    model: str
    peak_flops: float  # dense (no sparsity) bf16 tensor-core peak, FLOP/s
    source: str


def load_gpus() -> dict[str, GPU]:
    doc = yaml.safe_load((resources.files("ulbench") / "published" / "gpus.yaml").read_text())
    return {name: GPU(name, g["model"], float(g["bf16_dense_tflops"]) * 1e12, g["source"])
            for name, g in doc["gpus"].items()}


@dataclass(frozen=True)
class GPUOptions:
    gpu: GPU
    gpus: int
    mfu: float

    # GPU-hours = FLOPs / (peak x MFU) / 3600
    def gpu_hours(self, flops: float) -> float:
        return flops / (self.gpu.peak_flops * self.mfu) / 3600

    def wall_hours(self, flops: float) -> float:
        return self.gpu_hours(flops) / self.gpus


def gpu_options(gpu: str | None, gpus: int | None, mfu: float | None) -> GPUOptions | None:
    """``--gpu``, ``--gpus``, ``--mfu`` checked; None without ``--gpu`` (the dry run prints no GPU-hours)."""
    if gpu is None:
        if gpus is not None or mfu is not None:
            raise UserError(f"--gpus and --mfu need --gpu NAME (one of {', '.join(load_gpus())})")
        return None
    known = load_gpus()
    if gpu not in known:
        raise UserError(f"--gpu {gpu}: unknown GPU; known: {', '.join(known)} (ulbench/published/gpus.yaml)")
    gpus = 1 if gpus is None else gpus
    mfu = DEFAULT_MFU if mfu is None else mfu
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: give at least 1 GPU")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu:g}: the model FLOP utilization is a fraction of the peak, 0 < MFU <= 1")
    return GPUOptions(known[gpu], gpus, mfu)


def call_flops(run) -> float:
    """FLOPs per image of one network call made on a batch of FLOP_COUNT_BATCH meta tensors."""
    from ulbench.flops import measure_forward

    return measure_forward(run) / FLOP_COUNT_BATCH


@dataclass(frozen=True)
class Extractor:
    """The feature network of a suite's distances and its FLOPs per image (or clip)."""

    name: str
    flops: float


def feature_extractor(suite) -> Extractor:
    if not suite.dataset.video:
        return Extractor("Inception", inception_flops(suite.dataset.resolution))
    return Extractor("I3D", i3d_flops(suite.dataset.frames))


def i3d_flops(frames: int) -> float:
    """FLOPs per clip of the FVD I3D (clips are resized to 224x224 first; the count follows the frame count)."""
    from ulbench.metrics.i3d import I3D

    with torch.device("meta"):
        net = I3D()
        x = torch.zeros(FLOP_COUNT_BATCH, 3, frames, 224, 224)
    return call_flops(lambda: net(x))


def inception_flops(resolution: int) -> float:
    """FLOPs per image of the FID feature extractor, the network ``ulbench.metrics.inception`` loads weights into
    (its input is resized to 299 first, so the count does not depend on the resolution)."""
    from ulbench.metrics.inception import _skeleton

    with torch.device("meta"):
        net = _skeleton()
        x = torch.zeros(FLOP_COUNT_BATCH, 3, resolution, resolution, dtype=torch.uint8)
    return call_flops(lambda: net(x))


@dataclass
class Point:
    point: str  # stage1, b0, b1, ...
    steps: str  # the steps this point trains, "from -> to"
    train_flops: float  # of this point's increment
    eval_flops: float


@dataclass
class MethodHours:
    name: str
    points: list[Point]
    per_sample: dict[float, float]  # evaluation FLOPs per generated image, by guidance scale
    per_reconstruction: float  # evaluation FLOPs per stage-1 reconstruction (0: none made)
    lines: list[str]  # how each per-image figure is formed

    @property
    def train_flops(self) -> float:
        return sum(p.train_flops for p in self.points)

    @property
    def eval_flops(self) -> float:
        return sum(p.eval_flops for p in self.points)


def _per_image(what: str, terms: list[tuple[str, tuple[int, ...], float]]) -> tuple[float, str]:
    """Sum of (network, call counts to multiply, FLOPs per call) terms, and a line that shows how it is formed."""
    total = sum(math.prod(calls) * flops for _, calls, flops in terms)
    shown = " + ".join(f"{name} {' x '.join(map(str, calls))} x {_gflops(flops)}" for name, calls, flops in terms)
    return total, f"{what}: {shown} = {_gflops(total)} GFLOPs"


def _gflops(flops: float) -> str:
    return f"{flops / 1e9:,.0f}" if flops >= 1e12 else f"{flops / 1e9:.4g}"


def method_hours(suite, plan: MethodPlan, extractor: Extractor) -> MethodHours:
    """Training FLOPs of each point's increment and evaluation FLOPs of each point. A rung, per guidance scale:
    num_samples x (sum over sampling calls of calls per image x FLOPs, doubled for the guided network when
    guidance != 1 [CFG: a conditional and an unconditional pass] + the feature network). Stage 1:
    num_reconstructions x (encoder + decoder steps + the rate's forward + the feature network for rFID / rFVD)."""
    ev, wanted, kind = suite.evaluation, set(suite.evaluation.metrics), get_kind(plan.kind)
    calls = kind.evaluation_calls(plan.config, plan.sampler, FLOP_COUNT_BATCH, "meta")
    counted: dict[str, float] = {}

    def flops(call) -> float:
        if call.name not in counted:
            counted[call.name] = call_flops(call.run)
        return counted[call.name]

    lines, points, per_sample, per_reconstruction = [], [], {}, 0.0
    if plan.stage1_steps:
        if kind.reconstructs and wanted & RECONSTRUCTION_METRICS:
            terms = [(c.name, (c.per_image,), flops(c)) for c in calls["reconstruct"]]
            terms += [(extractor.name, (1,), extractor.flops)] if wanted & DISTANCES else []
            per_reconstruction, line = _per_image("per reconstruction", terms)
            lines.append(line)
        points.append(Point("stage1", f"0 -> {plan.stage1_steps}", plan.train_flops(None)["stage1"],
                            ev.num_reconstructions * per_reconstruction))
    if wanted & SAMPLE_METRICS:
        for g in plan.guidance:
            terms = [(c.name, (2, c.per_image) if c.guided and g != 1 else (c.per_image,), flops(c))
                     for c in calls["sample"]]
            per_sample[g], line = _per_image(f"per sample at guidance {g:g}",
                                             terms + [(extractor.name, (1,), extractor.flops)])
            lines.append(line)
    rung_eval = ev.num_samples * sum(per_sample.values())
    step_flops, previous = plan.flops_per_step(plan.final_stage), 0
    if plan.official is not None:  # a released checkpoint: evaluated once, not trained
        points.append(Point(OFFICIAL_POINT, "not trained", 0.0, rung_eval))
    for i, steps in enumerate(plan.rung_steps if plan.official is None else ()):
        points.append(Point(f"b{i}", f"{previous} -> {steps}", step_flops * (steps - previous), rung_eval))
        previous = steps
    return MethodHours(plan.name, points, per_sample, per_reconstruction, lines)


def shared_eval_flops(suite, plans: list[MethodPlan], extractor: Extractor) -> tuple[float, str]:
    """Features computed once per suite (their statistics are cached by fingerprint): a reference drawn from the
    dataset and the originals rFID / rFVD compares reconstructions with, each the first n dataset items; clip suites
    also embed the two frame-prediction controls (num_samples clips each)."""
    ev, wanted = suite.evaluation, set(suite.evaluation.metrics)
    counts, notes, controls = set(), [], 0
    if wanted & SAMPLE_METRICS:
        if ev.reference == "dataset":
            counts.add(ev.reference_size or ev.num_samples)
        else:
            notes.append(f"reference {ev.reference}: " + ("statistics, no features to extract"
                                                          if ev.reference.endswith(".npz") else "not counted"))
        controls = 2 * ev.num_samples if suite.dataset.video and "fvd" in wanted else 0
    if wanted & DISTANCES and any(p.stage1_steps and get_kind(p.kind).reconstructs for p in plans):
        counts.add(ev.num_reconstructions)
    items = sum(counts) + controls
    what = "clips" if suite.dataset.video else "images"
    notes.insert(0, f"{extractor.name} on {items} dataset {what}{' (2 controls included)' if controls else ''} x "
                    f"{_gflops(extractor.flops)} GFLOPs")
    return items * extractor.flops, "; ".join(notes)


def _ratio(evaluation: float, train: float) -> str:
    return f"{evaluation / train:.2f}" if train > 0 else "-"  # a released checkpoint: nothing trained


def _h(hours: float) -> str:
    return f"{hours:,.1f}" if hours >= 10 else f"{hours:.3g}"


def format_gpu_plan(suite, plans: list[MethodPlan], opts: GPUOptions) -> str:
    extractor = feature_extractor(suite)
    methods = [method_hours(suite, p, extractor) for p in plans]
    shared, shared_note = shared_eval_flops(suite, plans, extractor)
    g, ev, h = opts.gpu, suite.evaluation, opts.gpu_hours
    assumed = (" (the default, an assumption: measure yours, FLOPs per step x steps/s / (GPUs x peak), and give "
               "--mfu)") if opts.mfu == DEFAULT_MFU else ""
    lines = [f"GPU plan on {g.name}: {g.model}, {g.peak_flops / 1e12:g} TFLOP/s dense bf16 peak",
             f"  source: {g.source}",
             f"  GPU-hours = FLOPs / (peak x MFU) / 3600, MFU {opts.mfu:g}{assumed}",
             f"  wall-clock hours = GPU-hours / {opts.gpus} GPUs (perfect scaling assumed)",
             f"  evaluation of every rung: {ev.num_samples} samples at each guidance scale {list(ev.guidance)} and "
             f"their {extractor.name} features; of stage 1, once: {ev.num_reconstructions} reconstructions"]
    row = "  {:<7} {:>21} {:>13} {:>17} {:>12} {:>10}"
    for m in methods:
        lines += [f"method {m.name}: evaluation FLOPs per image = network calls x GFLOPs per call"]
        lines += [f"    {line}" for line in m.lines]
        lines.append(row.format("point", "steps", "train GPU-h", "cum. train GPU-h", "eval GPU-h", "eval/train"))
        cumulative = 0.0
        for p in m.points:
            cumulative += p.train_flops
            lines.append(row.format(p.point, p.steps, _h(h(p.train_flops)), _h(h(cumulative)), _h(h(p.eval_flops)),
                                    _ratio(p.eval_flops, p.train_flops)))
        lines.append(row.format("total", "", _h(h(m.train_flops)), "", _h(h(m.eval_flops)),
                                _ratio(m.eval_flops, m.train_flops)))
    row = "  {:<16} {:>13} {:>12} {:>13} {:>26}"
    lines += ["totals", row.format("", "train GPU-h", "eval GPU-h", "total GPU-h", f"wall-clock h on {opts.gpus} GPUs")]
    totals = [(m.name, m.train_flops, m.eval_flops) for m in methods] + [("shared eval", 0.0, shared)]
    totals.append(("all", sum(t[1] for t in totals), sum(t[2] for t in totals)))
    for name, train, evaluation in totals:
        lines.append(row.format(name, _h(h(train)), _h(h(evaluation)), _h(h(train + evaluation)),
                                _h(opts.wall_hours(train + evaluation))))
    lines.append(f"  shared eval, once per suite: {shared_note}")
    return "\n".join(lines)
