"""The interface between the harness and a model family.

A *kind* (``ul``, later ``dit``, ``edm2``...) names its presets (typed config dataclasses), resolves a suite's
overrides onto one, and builds a real training step for FLOP counting. Training, sampling and reconstruction go
through ``MethodKind.runner``, which returns an object with the ``Runner`` methods.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

ENCODE_BATCH = 64  # images per encoder call when building a latent cache


@dataclass
class StepInputs:
    """One real training step: ``loss_fn(module, batch)["loss"]`` is a per-sample loss to back-propagate."""

    module: nn.Module
    loss_fn: Callable[[nn.Module, tuple], dict[str, torch.Tensor]]
    batch: tuple


@dataclass
class NetworkCall:
    """A network evaluation that generating or reconstructing one image makes ``per_image`` times; ``guided``: it is
    the classifier-free-guided one (a guidance scale other than 1 adds the unconditional pass). ``run()`` makes one
    conditional call on a batch of inputs (meta tensors: for FLOP counting)."""

    name: str
    per_image: int
    run: Callable[[], Any]
    guided: bool = False


@dataclass
class TrainData:
    """What a runner trains on: a dataset (``ulbench.data.base.ImageDataset``), whether to add mirrored copies
    (EDM2's ``xflip``: 2N items, and latent caches keep both), and DataLoader worker processes."""

    dataset: Any
    xflip: bool = False
    workers: int = 0
    source: str = ""  # the spec that reopens the dataset (a path, photos, fashion-mnist): recorded in run configs

    def record(self) -> dict:
        """What a stage's run directory records of its data (the spec that reopens it, the fingerprint)."""
        ds = self.dataset
        return {"spec": self.source, "name": ds.name, "n": len(ds), "fingerprint": ds.fingerprint(),
                "xflip": self.xflip}


class Runner(Protocol):
    """A method being trained in ``workdir``: stages in order, each resumable and extendable to more steps."""

    def trained_steps(self, stage: str) -> int: ...
    def train(self, stage: str, steps: int, resume: bool) -> None: ...
    def sample(self, seeds: list[int], labels: torch.Tensor | None, sampler: dict, guidance: float) -> torch.Tensor: ...
    def reconstruct(self, x: torch.Tensor, seeds: list[int], sampler: dict) -> torch.Tensor: ...
    # clip methods (frame prediction): clips whose first frames are given -> predicted clips, given frames kept
    def predict(self, context: torch.Tensor, seeds: list[int], labels: torch.Tensor | None, sampler: dict,
                guidance: float) -> torch.Tensor: ...
    def bits_per_pixel(self, x: torch.Tensor, seed: int) -> torch.Tensor: ...


class MethodKind(Protocol):
    name: str
    stages: tuple[str, ...]  # training stages in order, e.g. ("stage1", "stage2")
    reconstructs: bool  # whether it has an autoencoder to reconstruct with (rFID, PSNR, bits/pixel)
    sampler_keys: tuple[str, ...]  # the sampler settings its runner reads (suites: methods[].sampler)
    path_overrides: tuple[str, ...]  # dotted override keys naming files (made absolute when a run starts)

    def presets(self) -> dict[str, Any]: ...
    def resolve(self, preset: str, overrides: dict, resolution: int | None = None,
                num_classes: int | None = None) -> Any: ...
    def stages_for(self, config: Any) -> tuple[str, ...]: ...  # the stages this config trains (a subset of stages)
    # the published recipe of a stage as ul_model.train.TrainConfig fields ({}: the harness's defaults)
    def train_recipe(self, config: Any, stage: str) -> dict: ...
    # the published sampler ({}: none published, the suite's evaluation.sampler applies)
    def sampler_recipe(self, config: Any) -> dict: ...
    def trains_unconditional(self, config: Any) -> bool: ...  # whether guidance has a trained null branch
    def step_inputs(self, config: Any, stage: str, batch_size: int, device: str | torch.device) -> StepInputs: ...
    def evaluation_calls(self, config: Any, sampler: dict, batch_size: int,
                         device: str | torch.device) -> dict[str, list[NetworkCall]]: ...  # "sample", "reconstruct"
    def runner(self, config: Any, train: dict[str, Any], workdir: Path, device: str, precision: str,
               data: TrainData, progress: bool) -> Runner: ...


class OverrideError(ValueError):
    """A suite override that does not fit the config: ``key`` is its dotted path, ``allowed`` the valid names."""

    def __init__(self, key: str, problem: str, allowed: list[str] | None = None):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem, self.allowed = key, problem, allowed or []


def _coerce(value: Any, current: Any, key: str) -> Any:
    """``value`` typed like the field's current value (ints accepted for floats, lists for tuples)."""
    if isinstance(current, bool) or isinstance(value, bool):
        if not (isinstance(current, bool) and isinstance(value, bool)):
            raise OverrideError(key, f"expected {type(current).__name__}, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, (int, float)):
        return float(value)
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)):
            raise OverrideError(key, f"expected a list, got {value!r}")
        if current and len(value) != len(current) and not isinstance(current[0], (int, float)):
            raise OverrideError(key, f"expected {len(current)} entries, got {len(value)}")
        return tuple(_coerce(v, current[0], f"{key}[{i}]") if current else v for i, v in enumerate(value))
    if current is None or isinstance(value, type(current)):
        return value
    raise OverrideError(key, f"expected {type(current).__name__}, got {value!r}")


def apply_overrides(config: Any, overrides: dict, prefix: str = "") -> Any:
    """A copy of a (nested, frozen) dataclass with ``overrides`` (a nested dict) applied, every key validated."""
    import dataclasses

    if not isinstance(overrides, dict):
        raise OverrideError(prefix.rstrip(".") or "overrides", f"expected a mapping, got {overrides!r}")
    names = [f.name for f in dataclasses.fields(config)]
    changes = {}
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise OverrideError(path, "unknown field", names)
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            changes[key] = apply_overrides(current, value, f"{path}.")
        else:
            changes[key] = _coerce(value, current, path)
    return dataclasses.replace(config, **changes)


def stage_train_config(overrides: dict[str, dict], stage: str, steps: int, precision: str):
    """ul_model's TrainConfig for one stage trained to ``steps``: ``overrides[stage]`` (the method's recipe with
    the suite's settings on top, ``recipe``) on the defaults. A sweep always checkpoints where it stops (every rung
    is evaluated from its checkpoint), so ``checkpoint_every <= 0`` means "only there"."""
    from ul_model.train import TrainConfig

    cfg = apply_overrides(TrainConfig(steps=steps, precision=precision), overrides.get(stage, {}))
    return cfg if cfg.checkpoint_every > 0 else dataclasses.replace(cfg, checkpoint_every=steps)


def recipe(kind: MethodKind, config: Any, stage: str, suite_settings: dict, seed: int) -> dict:
    """A stage's full training recipe, every TrainConfig field but ``steps`` (which the budgets set) and
    ``precision`` (the suite's, unless this stage sets its own): the harness's defaults, then the kind's published
    recipe, then the suite's settings (``methods[].train.<stage>``; an ``ema_decay`` there without ``ema_stds``
    replaces a published power-function EMA by the exponential one)."""
    from ul_model.train import TrainConfig

    published = kind.train_recipe(config, stage)
    if "ema_decay" in suite_settings and "ema_stds" not in suite_settings:
        published = {k: v for k, v in published.items() if k != "ema_stds"}  # the suite chose the exponential EMA
    cfg = apply_overrides(TrainConfig(seed=seed), {**published, **suite_settings})
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    out.pop("steps")
    if "precision" not in suite_settings:
        out.pop("precision")
    return out


def keep_checkpoints_at(train: dict[str, dict], steps: dict[str, list[int]]) -> dict[str, dict]:
    """Per-stage training settings with ``steps[stage]`` added to the stage's ``keep_steps``: checkpoints that
    ``keep_checkpoints`` never deletes (a sweep's rung ends, each evaluated from its checkpoint)."""
    return {stage: {**settings, "keep_steps": sorted({*settings.get("keep_steps", ()), *steps.get(stage, ())})}
            for stage, settings in train.items()}


class RunnerBase:
    """What every runner shares: stage run directories ``workdir/<stage>``, per-stage train configs, the
    training batches of a dataset (rank-split under torchrun) and stage 2's latent cache."""

    def __init__(self, config: Any, train: dict[str, dict], workdir: Path, device: str, precision: str,
                 data: TrainData, progress: bool):
        self.config, self.train_overrides, self.workdir = config, train, Path(workdir)
        self.device, self.precision, self.progress, self.data = device, precision, progress, data

    def train_config(self, stage: str, steps: int):
        from ul_model.train import distributed, micro_batches
        from ulbench.errors import UserError

        cfg = stage_train_config(self.train_overrides, stage, steps, self.precision)
        try:
            micro_batches(cfg, distributed()[1])
        except ValueError as e:
            raise UserError(f"train.{stage}: {e}") from None
        return cfg

    def trained_steps(self, stage: str) -> int:
        latest = self.workdir / stage / "latest.json"
        return json.loads(latest.read_text())["step"] if latest.is_file() else 0

    def checkpoint_file(self, stage: str, which: str = "ema") -> Path:
        return latest_checkpoint_file(self.workdir / stage, which)

    def batches(self, dataset, tcfg) -> Callable[[int], Iterator[tuple]]:
        return training_batches(dataset, tcfg, self.data.workers, self.device)

    def image_set(self):
        """Stage 1's training images: the dataset, with its mirror copies when ``xflip``."""
        from ulbench.data.base import XFlip

        return XFlip(self.data.dataset) if self.data.xflip else self.data.dataset

    def latent_set(self, what: str, encoder_sha256: str, encode: Callable[[torch.Tensor], torch.Tensor]):
        return latent_training_set(self.workdir / "stage2" / "latents", what, encoder_sha256, encode, self.data,
                                   self.progress)


def latest_checkpoint_file(run: Path, which: str = "ema") -> Path:
    """The ``ema``/``weights`` safetensors file of a training run's latest checkpoint."""
    return run / json.loads((run / "latest.json").read_text())["checkpoint"] / f"{which}.safetensors"


def training_batches(dataset, tcfg, workers: int, device) -> Callable[[int], Iterator[tuple]]:
    """``start -> iterator`` of this rank's share of the global batches (tcfg.batch_size) of ``dataset``."""
    from ul_model.train import distributed
    from ulbench.data.loader import train_batches

    rank, world = distributed()
    return lambda start: train_batches(dataset, tcfg.batch_size, tcfg.seed, start, rank, world, workers,
                                       pin_memory=str(device).startswith("cuda"))


def latent_training_set(root: Path, what: str, encoder_sha256: str, encode: Callable[[torch.Tensor], torch.Tensor],
                        data: TrainData, progress: bool):
    """Stage 2's training set: the dataset encoded once into the latent cache ``root`` (keyed by encoder
    checkpoint, dataset fingerprint and xflip; rebuilt when any changes), split across ranks under torchrun."""
    from ul_model.train import distributed
    from ulbench.data.latent_cache import LatentDataset, build_latent_cache

    rank, world = distributed()
    ds = data.dataset
    key = {"what": what, "encoder_sha256": encoder_sha256, "dataset": ds.fingerprint(), "xflip": data.xflip}
    cache = build_latent_cache(root, key, ds, encode, xflip=data.xflip, batch_size=ENCODE_BATCH, progress=progress,
                               rank=rank, world=world, workers=data.workers)
    return LatentDataset(cache, ds.labels, xflip=data.xflip)
