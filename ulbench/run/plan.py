"""From a suite to a training plan: per-stage FLOPs measured on a real step, steps for each budget on the ladder.

A method with an autoencoder trains ``stage1`` once, to the suite's stage-1 budget, and ``stage2`` continues across
the ladder: rung i is reached by training on from rung i-1, so the sweep costs the largest budget, not the sum.
``compute.counts`` says whether a rung's budget measures stage-2 compute alone (the paper's figure) or the total.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ulbench.errors import UserError
from ulbench.methods import get_kind

FLOP_COUNT_BATCH = 2  # images per counted step; counts are per image (FLOPs are linear in the batch)
CALIBRATION_PRESET = "ul-tiny"  # real step timed on this machine when a method is too large to time here
MAX_TIMED_PARAMS = 50_000_000
OFFICIAL_POINT = "official"  # the one evaluation point of a released checkpoint (MethodPlan.official)  # larger models are not stepped on the CPU just to estimate a wall time


@dataclass
class MethodPlan:
    name: str
    kind: str
    preset: str
    config: Any
    train: dict[str, dict]
    stages: tuple[str, ...]
    flops_per_image: dict[str, float]  # measured training FLOPs (forward + backward) per image, per stage
    forward_macs_per_image: dict[str, float]
    params: dict[str, int]  # trainable parameters per stage
    batch_size: dict[str, int]
    stage1_steps: int | None  # None for single-stage methods
    rung_steps: list[int]  # final-stage steps at each rung
    sampler: dict = field(default_factory=dict)  # resolved (MethodSpec.sampler)
    guidance: tuple[float, ...] = (1.0,)
    seconds_per_step: dict[str, float] = field(default_factory=dict)
    timing_note: str = ""
    # a released checkpoint evaluated once, untrained (MethodKind.official_checkpoint): its path, published
    # train_steps and batch_size; rung_steps is then [train_steps], so train_flops(0) is its published training
    official: dict | None = None

    @property
    def final_stage(self) -> str:
        return self.stages[-1]

    def flops_per_step(self, stage: str) -> float:
        return self.flops_per_image[stage] * self.batch_size[stage]

    def train_flops(self, rung: int | None) -> dict[str, float]:
        """Training FLOPs by stage spent when rung ``rung`` (None: stage 1 only) is evaluated, and their sum."""
        s1 = self.flops_per_step("stage1") * self.stage1_steps if self.stage1_steps else 0.0
        s2 = 0.0 if rung is None else self.flops_per_step(self.final_stage) * self.rung_steps[rung]
        return {"stage1": s1, "stage2": s2, "total": s1 + s2}

    def steps(self, rung: int | None) -> dict[str, int]:
        return {"stage1": self.stage1_steps or 0, "stage2": 0 if rung is None else self.rung_steps[rung]}

    def estimated_seconds(self) -> float | None:
        if self.official is not None:
            return 0.0  # not trained
        if not self.seconds_per_step:
            return None
        s1 = self.seconds_per_step.get("stage1", 0.0) * (self.stage1_steps or 0)
        return s1 + self.seconds_per_step[self.final_stage] * self.rung_steps[-1]


def _steps_for(budget: float, flops_per_step: float) -> int:
    return max(1, math.ceil(budget / flops_per_step))


def plan_method(suite, method) -> MethodPlan:
    from ulbench.flops import measure_step, trainable_params
    from ulbench.methods.base import recipe

    kind = get_kind(method.kind)
    config = method.config()
    stages = kind.stages_for(config)
    runner_train = {stage: recipe(kind, config, stage, method.train.get(stage, {}), suite.seeds.train)
                    for stage in stages}
    flops, macs, params, batch = {}, {}, {}, {}
    for stage in stages:
        step = kind.step_inputs(config, stage, FLOP_COUNT_BATCH, "meta")
        counted = measure_step(step)
        flops[stage], macs[stage] = counted.train_flops_per_image, counted.forward_macs_per_image
        params[stage] = trainable_params(step.module)
        batch[stage] = runner_train[stage]["batch_size"]
    try:
        official = getattr(kind, "official_checkpoint", lambda c: None)(config)
    except UserError as e:
        raise UserError(f"{suite.file}: method {method.name}: {e}") from None
    if official is not None:  # evaluated once at its published training: steps x batch x measured FLOPs/image
        batch[stages[-1]] = official["batch_size"]
        return MethodPlan(method.name, method.kind, method.preset, config, {}, tuple(stages), flops, macs, params,
                          batch, None, [official["train_steps"]], method.sampler, method.guidance, official=official)
    budgets = list(suite.budgets)
    stage1_steps = None
    s1_flops = 0.0
    if "stage1" in stages:
        stage1_steps = _steps_for(suite.compute.stage1_budget(), flops["stage1"] * batch["stage1"])
        s1_flops = stage1_steps * flops["stage1"] * batch["stage1"]
    final = stages[-1]
    rung_steps = []
    for i, b in enumerate(budgets):
        b2 = b - s1_flops if suite.compute.counts == "total" else b
        if b2 <= 0:
            raise UserError(f"{suite.file}: compute.ladder[{i}]: budget {b:.3g} FLOPs leaves nothing for {final} "
                            f"after stage 1's {s1_flops:.3g} FLOPs ({method.name}); raise the rung or lower "
                            "compute.stage1")
        rung_steps.append(_steps_for(b2, flops[final] * batch[final]))
    for i in range(1, len(rung_steps)):
        if rung_steps[i] <= rung_steps[i - 1]:
            raise UserError(f"{suite.file}: compute.ladder[{i}]: budgets {budgets[i - 1]:.3g} and {budgets[i]:.3g} "
                            f"both round to {rung_steps[i]} steps of {method.name} (batch {batch[final]}); spread "
                            "the ladder or lower the batch size")
    return MethodPlan(method.name, method.kind, method.preset, config, runner_train, tuple(stages), flops,
                      macs, params, batch, stage1_steps, rung_steps, method.sampler, method.guidance)


def make_plan(suite) -> list[MethodPlan]:
    return [plan_method(suite, m) for m in suite.methods]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but torch sees no CUDA device; use device: cpu or auto")
    return device


def time_step(kind_name: str, config: Any, stage: str, batch_size: int, device: str, repeats: int = 2) -> float:
    """Seconds per real training step (forward, backward, AdamW update) at ``batch_size``, after one warm-up."""
    kind = get_kind(kind_name)
    step = kind.step_inputs(config, stage, batch_size, device)
    params = [p for p in step.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step.loss_fn(step.module, step.batch)["loss"].float().mean().backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def estimate_times(plans: list[MethodPlan], device: str) -> None:
    """Fill each plan's seconds per step: timed on its own model when small enough, else scaled by FLOPs from a
    timed ``ul-tiny`` step (the machine's measured FLOP/s), which the plan's note says."""
    calibration = None
    for p in plans:
        for stage in p.stages if p.official is None else ():  # a released checkpoint is not trained
            if p.params[stage] <= MAX_TIMED_PARAMS or device.startswith("cuda"):
                p.seconds_per_step[stage] = time_step(p.kind, p.config, stage, p.batch_size[stage], device)
                p.timing_note = "timed on its own model"
                continue
            if calibration is None:
                tiny = get_kind("ul").presets()[CALIBRATION_PRESET]
                from ulbench.flops import measure_step

                per_image = measure_step(get_kind("ul").step_inputs(tiny, "stage1", FLOP_COUNT_BATCH, "meta"))
                secs = time_step("ul", tiny, "stage1", 16, device)
                calibration = per_image.train_flops_per_image * 16 / secs
            p.seconds_per_step[stage] = p.flops_per_step(stage) / calibration
            p.timing_note = f"scaled from a timed {CALIBRATION_PRESET} step ({calibration / 1e9:.1f} GFLOP/s here)"


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def format_plan(suite, plans: list[MethodPlan], device: str) -> str:
    ev = suite.evaluation
    lines = [(f"suite {suite.name} ({suite.file}): dataset {suite.dataset.name} {suite.dataset.resolution}px, "
             f"device {device}, precision {suite.precision}"),
             f"ladder ({suite.compute.counts} training FLOPs): " + ", ".join(f"{b:.3g}" for b in suite.budgets),
             (f"evaluation: {', '.join(ev.metrics)}; {ev.num_samples} samples, {ev.num_reconstructions} "
             f"reconstructions, reference {ev.reference}")]
    for p in plans:
        lines.append(f"method {p.name}: kind {p.kind}, preset {p.preset}; sampler "
                     + ", ".join(f"{k} {v}" for k, v in p.sampler.items()) + f"; guidance {list(p.guidance)}")
        if p.official is not None:
            o, s = p.official, p.final_stage
            lines.append(f"  official checkpoint {o['path']}: not trained, evaluated once; drawn at its published "
                         f"training {o['train_steps']} steps x batch {o['batch_size']} x "
                         f"{p.flops_per_image[s] / 1e9:.4g} GFLOPs/image (measured) = "
                         f"{p.train_flops(0)['total']:.3g} FLOPs ({o['source']})")
            continue
        for stage in p.stages:
            lines.append(f"  {stage}: {p.params[stage] / 1e6:.2f}M trainable params, "
                         f"{p.forward_macs_per_image[stage] / 1e9:.4g} GMACs forward/image, "
                         f"{p.flops_per_image[stage] / 1e9:.4g} GFLOPs train/image, batch {p.batch_size[stage]}")
        if p.stage1_steps:
            lines.append(f"  stage1 budget: {p.stage1_steps} steps = {p.train_flops(None)['stage1']:.3g} FLOPs "
                         "(trained once, shared by every rung)")
        for i, steps in enumerate(p.rung_steps):
            f = p.train_flops(i)
            lines.append(f"  rung b{i}: {p.final_stage} to step {steps}: stage2 {f['stage2']:.3g} + stage1 "
                         f"{f['stage1']:.3g} = {f['total']:.3g} FLOPs")
        est = p.estimated_seconds()
        if est is not None:
            lines.append(f"  estimated training wall time on {device}: {_duration(est)} ({p.timing_note})")
    return "\n".join(lines)
