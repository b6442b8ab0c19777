"""Training loops for Stage 1 (encoder + prior + decoder) and Stage 2 (base model on cached latents).

One code path for CPU, one GPU and ``torchrun`` (DDP): rank 0 writes checkpoints and metrics. Checkpoints are
safetensors weights (model and EMA) plus a torch file of optimizer state, step and RNG states, each written
atomically; ``resume=True`` continues bit-for-bit on CPU.

``batch_size`` is the global batch: under ``world`` ranks each takes a contiguous share, processed in micro-batches
of ``micro_batch`` (gradient accumulation; 0: the whole share at once). The random draws of a micro-batch (noise,
diffusion times, label dropout, dropout) come from the RNG seeded by (seed, step, global micro-batch index), so a
run with a fixed ``micro_batch`` trains on the same batches with the same noise under any world size and any
accumulation; with the default the noise realisation depends on the share, not its distribution.

A step whose loss terms or gradient norm are NaN or inf is skipped (no optimizer step, no EMA update) and counted in
the metrics (``nonfinite_steps``); past ``max_nonfinite_steps`` the run stops with an error naming the step and the
terms. No checkpoint holds non-finite weights. ``metrics.jsonl`` is cut back to the step a run starts from (torn and
later rows dropped); checkpoints beyond the newest ``keep_checkpoints`` are deleted, except those at ``keep_steps``.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from ul_model.ema import EMA, PowerFunctionEMA, make_ema
from ul_model.io import DiskFullError, append_line, atomic_bytes, disk_full_error


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4  # [choice]
    betas: tuple[float, float] = (0.9, 0.99)  # [choice]
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warm-up over steps (0: none)
    lr_rampup_images: float = 0.0  # EDM2's ramp-up: lr x min(images seen / this, 1) (0: none)
    lr_decay_batches: float = 0.0  # EDM2's t_ref: lr / sqrt(max(images seen / (this x batch), 1)) (0: none)
    # max gradient norm (<= 0: no clipping; the norm is still logged). [choice, measured] UL's per-dimension loss on
    # Fashion-MNIST (ul-tiny): stage-1 norms median 1.1, p99 4.5, max 9 (clip 4 fired on 0% of 300 steps), stage 2
    # max 0.75: 4 cuts only spikes (benchmarks/RESULTS.md, "UL gradient clipping").
    grad_clip: float = 4.0
    ema_decay: float = 0.9999  # [choice] exponential EMA, used when ema_stds is empty
    ema_stds: tuple[float, ...] = ()  # EDM2's power-function EMA profiles (sigma_rel); the first is sampled from
    log_every: int = 10
    checkpoint_every: int = 500  # <= 0: never write checkpoints (benchmarks)
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    compile: bool = False
    micro_batch: int = 0  # per-rank micro-batch (gradient accumulation); 0: the rank's whole share
    # Steps with a non-finite loss term or gradient norm skipped (no optimizer or EMA update) before the run stops
    # with an error; counted over the whole run, resumes included (0: stop at the first). [choice] bf16 autocast has
    # no loss scaler whose overflowing steps are routine (fp16's GradScaler), so a NaN is either a rare bad batch,
    # which skipping leaves harmless, or divergence, which repeats at every later step and so stops the run soon.
    max_nonfinite_steps: int = 10
    # Checkpoints kept: the newest K (<= 0: every one) plus those at keep_steps. [choice] 2: the latest and one to
    # fall back on; a ul-small checkpoint is ~11 GB with its optimizer state. (EDM2's post-hoc EMA reconstruction,
    # not done here, would need every checkpoint: 0.)
    keep_checkpoints: int = 2
    keep_steps: tuple[int, ...] = ()  # checkpoints never deleted (a sweep's rung ends, evaluated from them)


DIST_TIMEOUT_ENV = "DIST_TIMEOUT_S"  # seconds a collective waits for a rank that is gone before every rank fails


def distributed() -> tuple[int, int]:
    """(rank, world size); initializes the process group when launched by torchrun (NCCL on CUDA, gloo on CPU),
    with a collective timeout of ``$DIST_TIMEOUT_S`` seconds (default 1800): a dead rank makes the others fail
    instead of hanging."""
    if "RANK" in os.environ and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = datetime.timedelta(seconds=float(os.environ.get(DIST_TIMEOUT_ENV, 1800)))
        torch.distributed.init_process_group(backend, timeout=timeout)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def micro_batches(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(rank share, micro-batch) of the global batch; raises ValueError when they do not divide."""
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split across {world} ranks; use a multiple of {world}")
    share = cfg.batch_size // world
    micro = cfg.micro_batch or share
    if micro < 1 or share % micro:
        raise ValueError(f"micro_batch {cfg.micro_batch} must divide each rank's share of the batch ({share} = "
                         f"{cfg.batch_size} / {world} ranks)")
    return share, micro


def noise_seed(seed: int, step: int, micro_index: int) -> int:
    """The RNG seed of global micro-batch ``micro_index`` at ``step``: independent of world size and resume."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{micro_index}".encode()).digest()[:8], "little")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of ``step`` (0-based): linear warm-up over ``warmup_steps`` [choice], then EDM2's schedule
    where its fields are set (EDM2 training/training_loop.py learning_rate_schedule, evaluated on the images seen
    before the step): alpha_ref / sqrt(max(t / t_ref, 1)) x min(t / rampup, 1)."""
    nimg = step * cfg.batch_size
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr
    if cfg.lr_decay_batches > 0:
        lr /= math.sqrt(max(nimg / (cfg.lr_decay_batches * cfg.batch_size), 1.0))
    if cfg.lr_rampup_images > 0:
        lr *= min(nimg / cfg.lr_rampup_images, 1.0)
    return lr


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def nonfinite_tensors(model: nn.Module, ema: EMA | PowerFunctionEMA) -> list[str]:
    """The weights and averages (``<file>/<tensor>``) holding a NaN or inf."""
    named = {f"weights/{k}": v for k, v in model.state_dict().items()}
    for name, average in ema.averages().items():
        named.update({f"{name}/{k}": v for k, v in average.items()})
    return [k for k, v in named.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _nbytes(state: object) -> int:
    """The bytes of the tensors in a (nested) state."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_nbytes(v) for v in state)
    return 0


def save_checkpoint(out: Path, model: nn.Module, ema: EMA | PowerFunctionEMA, opt: torch.optim.Optimizer,
                    step: int, nonfinite_steps: int = 0) -> None:
    """weights.safetensors, one safetensors file per parameter average (ema.safetensors is the one sampled from),
    state.pt (optimizer, step, RNG, skipped steps), then latest.json last (atomically). Refuses non-finite weights or
    averages; on a full disk the partial checkpoint is removed and latest.json still names the previous one."""
    ckpt = out / f"checkpoint-{step:08d}"
    bad = nonfinite_tensors(model, ema)
    if bad:
        raise FloatingPointError(f"{ckpt}: not written, {len(bad)} tensor(s) hold NaN or inf ({', '.join(bad[:5])}"
                                 f"{', ...' if len(bad) > 5 else ''}); {out / 'latest.json'} still names the last "
                                 "good checkpoint")
    ckpt.mkdir(parents=True, exist_ok=True)
    try:
        atomic_bytes(ckpt / "weights.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
        for name, shadow in ema.averages().items():
            atomic_bytes(ckpt / f"{name}.safetensors", save({k: v.contiguous() for k, v in shadow.items()}))
        state = {"optimizer": opt.state_dict(), "step": step, "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                 "nonfinite_steps": nonfinite_steps}
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_bytes(ckpt / "state.pt", buf.getvalue())
        atomic_bytes(out / "latest.json", json.dumps({"checkpoint": ckpt.name, "step": step}).encode())
    except DiskFullError as e:
        latest = out / "latest.json"
        if not latest.is_file() or json.loads(latest.read_text())["checkpoint"] != ckpt.name:
            shutil.rmtree(ckpt, ignore_errors=True)
        total = _nbytes(model.state_dict()) + _nbytes(ema.averages()) + _nbytes(opt.state_dict())
        raise disk_full_error(e.filename, total, OSError(e.errno, os.strerror(e.errno)),
                              needed_for=f"the whole checkpoint {ckpt.name}",
                              note="The partial checkpoint directory was removed too; latest.json, if any, still names "
                              "the previous checkpoint.") from e


def load_checkpoint(out: Path, model: nn.Module, ema: EMA | PowerFunctionEMA,
                    opt: torch.optim.Optimizer) -> tuple[int, int]:
    """Restores the latest checkpoint; returns (step, non-finite steps skipped before it)."""
    latest = json.loads((out / "latest.json").read_text())
    ckpt = out / latest["checkpoint"]
    model.load_state_dict(load_file(str(ckpt / "weights.safetensors")))
    ema.load({name: load_file(str(ckpt / f"{name}.safetensors")) for name in ema.averages()})
    # Our own file (optimizer tensors, ints, RNG byte tensors): weights_only loading suffices.
    state = torch.load(ckpt / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"]), int(state.get("nonfinite_steps", 0))


def prune_checkpoints(out: Path, keep_last: int, keep_steps=()) -> None:
    """Deletes the checkpoints older than latest.json's that are neither among the newest ``keep_last`` (the latest
    counted; <= 0: keep all) nor at ``keep_steps``. Call it after latest.json names the new checkpoint. Each is
    renamed to a hidden name before its files go, so a kill mid-way leaves nothing that looks like a checkpoint."""
    for leftover in out.glob(".deleting-checkpoint-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last <= 0 or not (out / "latest.json").is_file():
        return
    latest = json.loads((out / "latest.json").read_text())
    older = sorted((int(m[1]), p) for p in out.iterdir()
                   if (m := CHECKPOINT_NAME.fullmatch(p.name)) and p.is_dir() and p.name != latest["checkpoint"]
                   and int(m[1]) < latest["step"])  # later ones: a run restarted from scratch, overwritten as it goes
    for step, path in older[:max(len(older) - (keep_last - 1), 0)]:
        if step not in keep_steps:
            doomed = path.with_name(f".deleting-{path.name}")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def trim_metrics(path: Path, start: int) -> None:
    """``metrics.jsonl`` made the log of a run that continues from step ``start``: rows logged after it (by a run
    killed after its last checkpoint, or before its first) and torn or undecodable lines (a kill mid-write) go."""
    if not path.is_file():
        return
    data = path.read_bytes()
    kept = []
    for line in data.split(b"\n"):
        try:
            row = json.loads(line)
        except ValueError:  # empty, torn, not UTF-8
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start:
            kept.append(line + b"\n")
    if b"".join(kept) != data:
        atomic_bytes(path, b"".join(kept))


def nonfinite_terms(sums: dict[str, torch.Tensor], grad_norm: float, world: int,
                    device: torch.device) -> list[str]:
    """The loss terms (and ``grad_norm``) that are NaN or inf on any rank: every rank gets the same names, so all
    skip the step, or stop, together."""
    values = torch.stack([*(v.detach().float().reshape(()) for v in sums.values()),
                          torch.tensor(grad_norm, device=next(iter(sums.values())).device)])
    flags = (~torch.isfinite(values)).float()
    if world > 1:
        flags = flags.to(device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return [name for name, bad in zip([*sums, "grad_norm"], flags.tolist()) if bad]


def _json_number(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN: a skipped step's terms are logged as null


def train(model: nn.Module, loss_fn: Callable[[nn.Module, tuple], dict[str, torch.Tensor]],
          batches: Callable[[int], Iterator[tuple]], cfg: TrainConfig, out: str | os.PathLike,
          resume: bool = False, device: str | torch.device = "cpu", progress: bool = True) -> list[dict]:
    """Generic loop. ``loss_fn(model, batch)`` returns per-sample named terms with a ``loss`` entry to minimise;
    ``batches(start_step)`` yields batches from ``start_step`` on (so a resumed run sees the same data)."""
    from tqdm.auto import tqdm

    out, device = Path(out), torch.device(device)
    rank, world = distributed()
    share, micro = micro_batches(cfg, world)
    model.to(device)
    ema = make_ema(model, cfg.ema_decay, cfg.ema_stds)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    start, nonfinite = load_checkpoint(out, model, ema, opt) if resume and (out / "latest.json").exists() else (0, 0)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    step_fn = torch.compile(net) if cfg.compile else net
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        trim_metrics(out / "metrics.jsonl", start)
        atomic_bytes(out / "train_config.json", json.dumps(asdict(cfg), indent=2).encode())
    log: list[dict] = []
    # the bar is closed on errors too, so that the error printed after it starts a line of its own
    with tqdm(total=cfg.steps, initial=start, disable=not progress or rank != 0, desc="train", unit="step") as bar:
        t0, seen, n_micro = time.perf_counter(), 0, share // micro
        it = batches(start)
        for step in range(start, cfg.steps):
            batch = tuple(b.to(device) if torch.is_tensor(b) else b for b in next(it))
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            sums: dict[str, torch.Tensor] = {}
            for j in range(n_micro):
                chunk = tuple(b[j * micro:(j + 1) * micro] for b in batch)
                torch.manual_seed(noise_seed(cfg.seed, step, (rank * share + j * micro) // micro))
                # DDP all-reduces gradients on the last micro-batch only; the others accumulate locally
                sync = contextlib.nullcontext() if world == 1 or j == n_micro - 1 else net.no_sync()
                with sync:
                    with autocast(device, cfg.precision):
                        terms = loss_fn(step_fn, chunk)
                    loss = terms["loss"].float().mean()
                    (loss / n_micro).backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float().mean()
            # the norm before clipping; an infinite threshold measures without clipping (DiT, EDM2 do not clip)
            grad_norm = float(nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
            bad = nonfinite_terms(sums, grad_norm, world, device)
            if bad:  # skipped: weights, optimizer state and averages stay those of the last finite step
                nonfinite += 1
                if nonfinite > cfg.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"step {step + 1}: non-finite {', '.join(bad)} (NaN or inf); {nonfinite} non-finite step(s) "
                        f"in this run, more than max_nonfinite_steps={cfg.max_nonfinite_steps}. Stopped; the weights "
                        f"are those of the last finite step and no checkpoint holds non-finite values ({out})")
            else:
                opt.step()
                ema.update(model, (step + 1) * cfg.batch_size, cfg.batch_size)
            seen += batch[0].shape[0] * world
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                means = torch.stack([sums[k] for k in sums]) / n_micro
                if world > 1:  # the logged terms are means over the global batch, as in one process
                    means = means.to(device)
                    torch.distributed.all_reduce(means)
                    means = means / world
                if rank == 0:
                    elapsed = time.perf_counter() - t0
                    row = {"step": step + 1, "lr": lr_at(step, cfg), "grad_norm": _json_number(grad_norm),
                           "elapsed_s": elapsed, "images_per_s": seen / elapsed, "nonfinite_steps": nonfinite,
                           **{k: _json_number(float(v)) for k, v in zip(sums, means.tolist())}}
                    log.append(row)
                    append_line(out / "metrics.jsonl", json.dumps(row))
            due = cfg.checkpoint_every > 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps)
            if rank == 0 and due:
                save_checkpoint(out, model, ema, opt, step + 1, nonfinite)
                prune_checkpoints(out, cfg.keep_checkpoints, cfg.keep_steps)
    if world > 1:  # every rank sees the checkpoint rank 0 wrote before it goes on (e.g. to sample from it)
        torch.distributed.barrier()
    return log
