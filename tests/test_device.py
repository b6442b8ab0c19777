"""Metric networks on the run's device: the device is resolved (and a wrong one refused) before any network loads;
feature forwards run without TF32 on CUDA. The CUDA placement itself runs in benchmarks/gpu_check.py on a GPU."""
from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from ulbench.errors import UserError
from ulbench.metrics.device import eval_device, exact_float32


def test_auto_is_the_cpu_without_cuda_and_names_are_checked():
    if torch.cuda.is_available():
        assert eval_device("auto") == torch.device("cuda", torch.cuda.current_device())
    else:
        assert eval_device(None) == eval_device("auto") == torch.device("cpu")
    assert eval_device("cpu") == torch.device("cpu")
    for bad, says in (("gpu0", "not a device name"), ("meta", "CPU or CUDA"), ("mps", "CPU or CUDA")):
        with pytest.raises(UserError, match=says):
            eval_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv", [["eval", "fid", "photos:0", "photos:1"], ["eval", "fvd", "a.npz", "b.npz"],
                                  ["eval", "lpips", "a.npz", "b.npz"]])
def test_cuda_without_cuda_is_refused_before_any_network_loads(argv, tmp_path):
    env = {"ULBENCH_CACHE": str(tmp_path / "empty-cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    r = run_cli(*argv, "--device", "cuda", env=env)  # an empty cache and no index: loading a network would fail
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'cuda'" in r.stderr and "CUDA is not available" in r.stderr


def test_exact_float32_switches_tf32_off_inside_and_restores_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the flags exist without a GPU
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with exact_float32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark  # other cuDNN settings are left as they were
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
