"""Training loops for Stage 1 (encoder + prior + decoder) and Stage 2 (base model on cached latents).

One code path for CPU, one GPU and ``torchrun`` (DDP): rank 0 writes checkpoints and metrics. Checkpoints are
safetensors weights (model and EMA) plus a torch file of optimizer state, step and RNG states, each written
atomically; ``resume=True`` continues bit-for-bit on CPU.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from ul_model.io import atomic_bytes


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4  # [choice]
    betas: tuple[float, float] = (0.9, 0.99)  # [choice]
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # [choice]
    log_every: int = 10
    checkpoint_every: int = 500  # <= 0: never write checkpoints (benchmarks)
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    compile: bool = False


def distributed() -> tuple[int, int]:
    """(rank, world size); initializes the process group when launched by torchrun."""
    if "RANK" in os.environ and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


class EMA:
    """Exponential moving average of parameters: ema = d * ema + (1 - d) * param."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - self.decay)
            else:
                self.shadow[k].copy_(v)


def lr_at(step: int, cfg: TrainConfig) -> float:
    # linear warm-up to lr, then constant [choice]
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def save_checkpoint(out: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer, step: int) -> None:
    """weights.safetensors, ema.safetensors, state.pt (optimizer, step, RNG), then latest.json last (atomically)."""
    ckpt = out / f"checkpoint-{step:08d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_bytes(ckpt / "weights.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
    atomic_bytes(ckpt / "ema.safetensors", save({k: v.contiguous() for k, v in ema.shadow.items()}))
    state = {"optimizer": opt.state_dict(), "step": step, "rng_cpu": torch.get_rng_state(),
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_bytes(ckpt / "state.pt", buf.getvalue())
    atomic_bytes(out / "latest.json", json.dumps({"checkpoint": ckpt.name, "step": step}).encode())


def load_checkpoint(out: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer) -> int:
    latest = json.loads((out / "latest.json").read_text())
    ckpt = out / latest["checkpoint"]
    model.load_state_dict(load_file(str(ckpt / "weights.safetensors")))
    ema.shadow = load_file(str(ckpt / "ema.safetensors"))
    # Our own file (optimizer tensors, ints, RNG byte tensors): weights_only loading suffices.
    state = torch.load(ckpt / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])


def train(model: nn.Module, loss_fn: Callable[[nn.Module, tuple], dict[str, torch.Tensor]],
          batches: Callable[[int], Iterator[tuple]], cfg: TrainConfig, out: str | os.PathLike,
          resume: bool = False, device: str | torch.device = "cpu", progress: bool = True) -> list[dict]:
    """Generic loop. ``loss_fn(model, batch)`` returns per-sample named terms with a ``loss`` entry to minimise;
    ``batches(start_step)`` yields batches from ``start_step`` on (so a resumed run sees the same data)."""
    from tqdm.auto import tqdm

    out, device = Path(out), torch.device(device)
    rank, world = distributed()
    model.to(device)
    ema = EMA(model, cfg.ema_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    start = load_checkpoint(out, model, ema, opt) if resume and (out / "latest.json").exists() else 0
    if start == 0:
        torch.manual_seed(cfg.seed + rank)
    elif rank == 0 and (out / "metrics.jsonl").exists():  # drop rows logged after the checkpoint we resume from
        rows = [r for r in (out / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= start]
        atomic_bytes(out / "metrics.jsonl", "".join(r + "\n" for r in rows).encode())
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    step_fn = torch.compile(net) if cfg.compile else net
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log: list[dict] = []
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or rank != 0, desc="train", unit="step")
    t0, seen = time.perf_counter(), 0
    it = batches(start)
    for step in range(start, cfg.steps):
        batch = tuple(b.to(device) if torch.is_tensor(b) else b for b in next(it))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with autocast(device, cfg.precision):
            terms = loss_fn(step_fn, batch)
        loss = terms["loss"].float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        ema.update(model)
        seen += batch[0].shape[0] * world
        bar.update(1)
        if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            elapsed = time.perf_counter() - t0
            row = {"step": step + 1, "lr": lr_at(step, cfg), "grad_norm": grad_norm, "elapsed_s": elapsed,
                   "images_per_s": seen / elapsed,
                   **{k: float(v.detach().float().mean()) for k, v in terms.items()}}
            log.append(row)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if rank == 0 and cfg.checkpoint_every > 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(out, model, ema, opt, step + 1)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step + 1}")
    bar.close()
    return log
