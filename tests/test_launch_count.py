"""Launch counts of the CUDA launcher, executed by the host emulator of csrc/cuda (backend "cuda_emu",
docs/performance.md): ResNet-50's 161 tensors are one launch per rule with a CUDA >= 12.1 driver (32 KiB kernel
arguments), and as many as benchmarks/launch_model.py predicts from csrc/cuda/launch_limits.h with
the 4 KiB fallback (driver < 12.1); both modes give identical results.

Needs the emulator (FUSEDMF_CUDA_EMU=1 builds): fusedmf._C._cuda_emu_launches() -> total launches,
fusedmf._C._cuda_emu_set_driver_version(int). Skipped only where the extension lacks it and
FUSEDMF_CUDA_EMU is not set; with FUSEDMF_CUDA_EMU set, a missing API fails."""

import math
import os
import sys

import pytest
import torch

import fusedmf.functional as F
from fusedmf.models import resnet50_param_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import launch_model as lm  # noqa: E402

try:
    from fusedmf import _C
except ImportError:  # no compiled extension at all
    _C = None
HAS_EMU = hasattr(_C, "_cuda_emu_launches") and hasattr(_C, "_cuda_emu_set_driver_version")
EMU_REQUESTED = bool(os.environ.get("FUSEDMF_CUDA_EMU"))

pytestmark = pytest.mark.skipif(not HAS_EMU and not EMU_REQUESTED,
                                reason="fusedmf._C has no cuda_emu (build with FUSEDMF_CUDA_EMU=1)")

NEW_DRIVER, OLD_DRIVER = 12010, 12000


def test_emulator_api_present():
    assert HAS_EMU, "FUSEDMF_CUDA_EMU is set but fusedmf._C lacks _cuda_emu_launches / _cuda_emu_set_driver_version"


def _state(rule: str, seed: int = 0):
    """ResNet-50's 161 tensors for one rule (random, never zeros), CPU tensors."""
    g = torch.Generator().manual_seed(seed)
    mixed = rule.endswith("_mixed")
    shapes = resnet50_param_shapes()
    master = [torch.randn(s, generator=g) for s in shapes]
    params = [m.to(torch.bfloat16) if mixed else m.clone() for m in master]
    grads = [torch.randn(s, generator=g).to(torch.bfloat16 if mixed else torch.float32) for s in shapes]
    bufs = [[torch.randn(s, generator=g) for s in shapes] for _ in range(2)]
    for v in bufs[1]:
        v.abs_()  # exp_avg_sq >= 0
    return {"params": params, "grads": grads, "master": master if mixed else None, "bufs": bufs}


def _step(rule: str, st: dict, backend: str = "cuda_emu") -> str:
    if rule.startswith("mf_sgd"):
        return F.mf_sgd(st["params"], st["grads"], st["bufs"][0], master_params=st["master"], lr=0.1, momentum=0.9,
                        weight_decay=1e-4, backend=backend)
    return F.mf_adam(st["params"], st["grads"], st["bufs"][0], st["bufs"][1], master_params=st["master"], lr=1e-3,
                     beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled_weight_decay=True, step=3,
                     beta1_product=0.9 ** 3, backend=backend)


def _launches_of_one_step(rule: str, driver: int):
    _C._cuda_emu_set_driver_version(driver)
    st = _state(rule)
    before = _C._cuda_emu_launches()
    assert _step(rule, st) == "cuda_emu"
    return _C._cuda_emu_launches() - before, st


@pytest.fixture(autouse=True)
def _restore_driver():
    yield
    if HAS_EMU:
        _C._cuda_emu_set_driver_version(13000)


@pytest.mark.parametrize("rule", list(lm.RULES))
def test_resnet50_launch_counts_and_identical_results(rule):
    numels = [math.prod(s) for s in resnet50_param_shapes()]
    depth = lm.RULES[rule].depth
    expected_new = len(lm.pack_launches(numels, depth, lm.arg_bytes_for_driver(NEW_DRIVER)))
    expected_old = len(lm.pack_launches(numels, depth, lm.arg_bytes_for_driver(OLD_DRIVER)))
    assert expected_new == 1
    assert expected_old >= math.ceil(161 / lm.launch_limits()[(4096, depth)][0]) > 1

    new_count, new_state = _launches_of_one_step(rule, NEW_DRIVER)
    old_count, old_state = _launches_of_one_step(rule, OLD_DRIVER)
    assert new_count == expected_new, f"{rule}: {new_count} launches with a 12.1 driver"
    assert old_count == expected_old, f"{rule}: {old_count} launches with the 4 KiB fallback"

    cpu_state = _state(rule)  # the same inputs, stepped by the CPU backend: the bit-for-bit spec here
    assert _step(rule, cpu_state, backend="cpu") == "cpu"
    for other, label in ((old_state, "the 4 KiB launches"), (cpu_state, "backend cpu")):
        for name in ("params", "grads", "master"):
            if new_state[name] is None:
                continue
            for a, b in zip(new_state[name], other[name]):
                assert torch.equal(a, b), f"{rule}: {name} differ between the 32 KiB launch and {label}"
        for i in range(2):
            for a, b in zip(new_state["bufs"][i], other["bufs"][i]):
                assert torch.equal(a, b), f"{rule}: state {i} differs between the 32 KiB launch and {label}"
