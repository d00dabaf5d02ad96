"""Where the `gpu`-marked tests run: CUDA (`make gpu-test`), or the CPU in `make gpu-rehearsal`, which runs the same
tests with `DS_VICUNA_GPU_TEST_DEVICE=cpu` so a GPU run can only fail for a reason only a GPU has.

    from tests.support.gpu_device import DEVICE, needs_cuda
    @needs_cuda("a CUDA generator")        # skipped in the rehearsal, the reason says what only CUDA has
    def test_x(): ...

A test that cannot run on this machine skips with a reason opening with HARDWARE_SKIP; `benchmarks/gpu_check.py`
counts only those as "cannot run here", so any other skip is a failure of the GPU tier.
"""
from __future__ import annotations

import os

import pytest

DEVICE_ENV = "DS_VICUNA_GPU_TEST_DEVICE"
HARDWARE_SKIP = "not on this machine:"  # the same string as benchmarks/gpu_check.py (tests/gpu checks it)


def gpu_test_device() -> str:
    """`cuda` (default) or `cpu` (the rehearsal), from $DS_VICUNA_GPU_TEST_DEVICE.

    Raises:
        ValueError: another value, naming the variable.
    """
    device = os.environ.get(DEVICE_ENV, "cuda")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"${DEVICE_ENV}={device!r}: use cuda or cpu")
    return device


DEVICE = gpu_test_device()
REHEARSAL = DEVICE == "cpu"


def hardware_skip_reason(what: str) -> str:
    """The skip reason of a test this machine cannot run, in the form gpu_check accepts."""
    return f"{HARDWARE_SKIP} needs {what}"


def needs_cuda(what: str):
    """Skip in the rehearsal (CPU): the test needs `what`, which only CUDA has."""
    return pytest.mark.skipif(REHEARSAL, reason=hardware_skip_reason(f"{what} (CUDA only; CPU rehearsal)"))


def needs_gpus(count: int):
    """Skip unless `count` CUDA GPUs are visible."""
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(REHEARSAL or have < count,
                              reason=hardware_skip_reason(f"{count} CUDA GPUs ({have} here)"))
