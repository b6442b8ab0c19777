"""Where the metric networks run: the run's accelerator when there is one, in full float32 there.

Evaluating 50k samples through Inception (or DINOv2, I3D) on the CPU of a GPU node takes hours; on the GPU, minutes.
The features must not change with the device beyond float32 round-off, so TF32 (which cuDNN allows by default for
convolutions, moving Inception features by ~1e-3) is switched off around every feature network's forward.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ulbench.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (this process's CUDA device when there is one, else the CPU), cpu, cuda or cuda:N"


def eval_device(spec: str | torch.device | None = None) -> torch.device:
    """The device for a metric network: ``None``/``"auto"`` is this process's current CUDA device (under torchrun its
    local rank's, set when the process group starts) when CUDA is available, else the CPU."""
    import torch  # here, not at the top: the CLI reads DEVICE_HELP without loading torch

    if spec is None or spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UserError(f"device {spec!r}: not a device name; use {DEVICE_HELP}") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {spec!r}: metric networks run on the CPU or CUDA; use {DEVICE_HELP}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec!r}: CUDA is not available to this process (torch {torch.__version__}); use "
                        "cpu or auto")
    return device


@contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 in CUDA convolutions and matmuls inside the block (restored after): features as in float32."""
    import torch

    if not torch.cuda.is_available():
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                        benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
