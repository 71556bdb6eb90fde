"""Test configuration shared by every test file.

Backends are parametrised by name. A backend this machine cannot run is skipped with its reason,
except those listed in FUSEDMF_REQUIRE_BACKENDS (comma-separated; .ci/run requires "cpu,triton"),
which fail instead: CI must never go green because a kernel silently did not build.
"""

import os
import sys

import torch

# Triton decides at decoration time whether to interpret, so this must precede any triton import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

import fusedmf  # noqa: E402

# The one list of backends the tests run (cuda_emu: csrc/cuda's kernels on CPU tensors, built with
# FUSEDMF_CUDA_EMU=1; scripts/test.sh sets it, so CI runs every CUDA kernel without a GPU).
ALL_BACKENDS = ("reference", "cpu", "cuda", "triton", "cuda_emu")
FUSED_BACKENDS = tuple(b for b in ALL_BACKENDS if b != "reference")


def required_backends() -> set:
    return {b for b in os.environ.get("FUSEDMF_REQUIRE_BACKENDS", "").split(",") if b}


def device_for(backend: str) -> torch.device:
    return torch.device("cuda") if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) \
        else torch.device("cpu")


def require_backend(backend: str) -> torch.device:
    status = fusedmf.available_backends()[backend]
    if not status.available:
        if backend in required_backends():
            pytest.fail(f"backend {backend!r} is required here (FUSEDMF_REQUIRE_BACKENDS) but unavailable: "
                        f"{status.detail}")
        pytest.skip(f"backend {backend!r} unavailable: {status.detail}")
    return device_for(backend)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """(name, device) of each backend; unavailable ones skip with their reason (or fail if required)."""
    return request.param, require_backend(request.param)


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request):
    return request.param, require_backend(request.param)
