"""Backend "cuda_emu": the CUDA kernel sources (csrc/cuda/*.cu) executed on CPU tensors (docs/backends.md).

FUSEDMF_CUDA_EMU=1 builds compile csrc/cuda a second time with g++ against the shim of
csrc/cuda/emu/ (GPU threads as fibers, barriers, full-warp shuffles, the _rn intrinsics, f16/bf16
conversions), so CI runs every CUDA kernel without a GPU. What is checked here:
- MFSGD / MFAdam on "cuda_emu" equal "cpu" bit for bit, params and every state tensor, over several
  steps of a shape set that exercises the launcher: a tensor of more than 320 chunks of 65536, 60
  small tensors (more than 48 per launch), zero-size tensors and an empty last one, views at
  storage offset 1 (the scalar path), fp32 / bf16 / fp16 params with fp32 masters, a loss scale and
  found_inf, and an overflowing step in between (skipped: nothing changes). Every block's threads
  run forward and in reverse (a missing barrier shows in one order only). The CUDA kernels round
  exactly where the CPU kernels do (NOTE [fma placement]), so no tolerance is needed when the CPU
  kernels are the FMA (avx2) ones; with the base capability (a * b + c rounded twice) the two
  differ by design and the comparison is skipped as not this machine's configuration.
- the shim refuses what a GPU leaves undefined: barrier divergence, shuffles with inactive lanes
  or partial warps, an argument struct over the launch limit, out-of-range launch dimensions;
- the launch counter and the settings exported by fusedmf._C.
The binding suite's CUDA tests (tests/test_binding.py) and the backend matrices of the optimizer,
comm and noise-scale suites run against cuda_emu as well (tests/conftest.py FUSED_BACKENDS).
"""

from __future__ import annotations

import pytest
import torch

from conftest import require_backend

require_backend("cuda_emu")  # skips (or fails, under FUSEDMF_REQUIRE_BACKENDS) without an emu build
import fusedmf._C as C  # noqa: E402
from fusedmf import mf  # noqa: E402
from fusedmf.optim import MFAdam, MFSGD  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CHUNK = 65536


@pytest.fixture(params=("forward", "reverse"))
def thread_order(request):
    C._cuda_emu_set_thread_order(request.param)
    yield request.param
    C._cuda_emu_set_thread_order("forward")


def _shapes():
    """(numel or shape, dtype, misaligned) of the shape set; misaligned params and grads are views
    at storage offset 1, so their chunks take the kernels' scalar path."""
    # 321 chunks after a small tensor: under the 4 KiB fallback (320 blocks per launch) the big
    # tensor continues into a second launch as its tensor 0, carried over from slot 1
    big = 320 * CHUNK + 4321
    spec = [((100,), F32, False), ((big,), F32, False)]
    gen = torch.Generator().manual_seed(11)
    for i in range(60):  # more than 48 tensors per launch (depth 4) and 36 (depth 5)
        n = int(torch.randint(1, 700, (1,), generator=gen))
        spec.append(((n,), (F32, BF16, F16)[i % 3], i % 7 == 3))
    spec += [((0,), F32, False), ((3, 0), BF16, False), ((5, 7, 3), BF16, False), ((4099,), F16, True),
             ((70001,), BF16, False), ((2, CHUNK + 1), F32, True), ((0,), F32, False)]  # empty last
    return spec


def _tensor(shape, dtype, misaligned, gen, scale=1.0):
    n = 1
    for s in shape:
        n *= s
    x = (torch.randn(n + 1, generator=gen) * scale).to(dtype)
    return (x[1:] if misaligned else x[:n]).view(shape)


def _model(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(_tensor(s, d, m, gen)) for s, d, m in _shapes()]


def _grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [_tensor(p.shape, p.dtype, p.storage_offset() % 2 == 1, gen, 0.5) for p in params]


CONFIGS = {
    "sgd": (MFSGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "nesterov": (MFSGD, dict(lr=0.05, momentum=0.9, nesterov=True, dampening=0.0, decoupled_weight_decay=True,
                             weight_decay=1e-2)),
    "sgd-mf-schedule": (MFSGD, dict(lr=0.05, momentum=0.9, mf_schedule=mf.ramp(0.5, 0.95, 3))),
    "adam": (MFAdam, dict(lr=1e-3, weight_decay=1e-3)),
    "adamw": (MFAdam, dict(lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True)),
    "adam-mf-schedule": (MFAdam, dict(lr=1e-3, mf_schedule=mf.ramp(0.8, 0.9, 2))),
}


def _run(backend, config, seed=5, steps=4):
    cls, kwargs = CONFIGS[config]
    params = _model(seed)
    opt = cls(params, backend=backend, **kwargs)
    scale = torch.tensor(1024.0)
    for step in range(steps):
        grads = _grads(params, step)
        overflow = step == 2
        for p, g in zip(params, grads):
            p.grad = g * 1024 if not overflow else g
        found = torch.tensor(1.0 if overflow else 0.0)
        before = _snapshot(params, opt) if overflow else None
        opt.step(grad_scale=scale, found_inf=found)
        if overflow:  # skipped: nothing at all changes
            after = _snapshot(params, opt)
            assert before.keys() == after.keys()
            for k in before:
                assert torch.equal(_bits(before[k]), _bits(after[k])), (backend, k)
    return _snapshot(params, opt)


def _snapshot(params, opt):
    out = {}
    for i, p in enumerate(params):
        out[f"param[{i}]"] = p.detach().clone()
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"state[{i}].{k}"] = v.detach().clone()
    return out


def _bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.fixture(params=(13000, 12000), ids=("args32k", "args4k"))
def driver(request):
    """The launcher's kernel-argument limit: 32 KiB structs under a CUDA >= 12.1 driver (2048 blocks
    and 416-1260 tensors per launch), its 4 KiB fallback under an older one (320 blocks, 36-110
    tensors: the shape set then needs several launches and carries the big tensor over)."""
    C._cuda_emu_set_driver_version(request.param)
    yield request.param
    C._cuda_emu_set_driver_version(13000)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_optimizers_equal_the_cpu_backend_bit_for_bit(config, thread_order, driver):
    if C._cpu_capability() != "avx2":
        pytest.skip("the CPU backend's base capability rounds a * b + c twice; csrc/cuda fuses (NOTE [fma placement])")
    launches = C._cuda_emu_launches()
    emu = _run("cuda_emu", config)
    # per step (the overflowing one launches too, its kernels return on found_inf): one launch per
    # param dtype (fp32, bf16, fp16); at 4 KiB the fp32 group's 345 blocks (23 tensors) need two
    per_step = {13000: 3, 12000: 4}[driver]
    assert C._cuda_emu_launches() - launches == 4 * per_step, "launches of the shape set's 4 steps"
    cpu = _run("cpu", config)
    assert emu.keys() == cpu.keys()
    for k in emu:
        assert emu[k].shape == cpu[k].shape and emu[k].dtype == cpu[k].dtype, k
        bad = (_bits(emu[k]) != _bits(cpu[k])).sum().item()
        assert bad == 0, f"{config}: {k}: {bad} of {emu[k].numel()} elements differ after 4 steps"


# ---- the shim's own checks --------------------------------------------------------------------------


@pytest.mark.parametrize("name,message", [
    ("divergent_barrier", r"barrier divergence.*thread 1 waits at the barrier at .*api_emu\.cpp"),
    ("early_exit_barrier", r"barrier divergence.*1 of 64 threads exited while 63 wait"),
    ("partial_warp_shuffle", r"shuffle at .* in a block of 48 threads, not a multiple of 32"),
    ("partial_mask_shuffle", r"with mask 0xffff: only full-warp shuffles"),
    ("grid_zero", r"grid \(0, 1, 1\)"),
    ("grid_too_large", r"grid \(2147483648, 1, 1\)"),
    ("block_too_large", r"block \(1056, 1, 1\), 1056 threads"),
    ("misaligned_vector_load", r"misaligned 16-byte vector access at .*multi_tensor_apply\.cuh.*a GPU faults"),
], ids=lambda x: x if isinstance(x, str) and " " not in x and "\\" not in x else "")
def test_the_shim_refuses_what_a_gpu_leaves_undefined(name, message, thread_order):
    with pytest.raises(RuntimeError, match="fusedmf cuda_emu: .*" + message):
        C._cuda_emu_selftest(name)


@pytest.mark.parametrize("sumsq", [False, True], ids=["flag", "sumsq"])
def test_non_finite_check_blocks_after_a_find_exit_together(thread_order, sumsq):
    """A block that starts after an earlier block of the launch set found_inf returns at once, all
    of its threads (thread 0 reads the flag into shared memory, then a barrier): without that
    barrier the other threads, run before thread 0 in reverse order, read the shared flag of the
    block before and go on to __syncthreads_or without it (barrier divergence, which the shim
    raises)."""
    x = torch.randn(4 * CHUNK + 5)
    x[7] = float("inf")  # in the first of the launch's five blocks
    found = torch.zeros(1)
    acc = torch.zeros(1) if sumsq else None
    torch.ops.fusedmf.cuda_emu_non_finite_check_([x, torch.randn(3)], found, acc)
    assert found.item() == 1.0
    clean = torch.randn(4 * CHUNK + 5)
    found.zero_()
    acc = torch.zeros(1) if sumsq else None
    torch.ops.fusedmf.cuda_emu_non_finite_check_([clean], found, acc)
    assert found.item() == 0.0
    if sumsq:
        expected = clean.double().square().sum().item()
        assert abs(acc.item() - expected) <= 1e-5 * expected, (acc.item(), expected)


def test_shuffles_and_block_sum_are_exact():
    assert C._cuda_emu_selftest("full_shuffle") == 1.0
    for threads in (32, 64, 512):  # block_sum of 1.0 per thread over every warp (it holds kBlockSize = 512)
        assert C._cuda_emu_selftest(f"block_sum_{threads}") == threads


def test_an_aligned_vector_load_passes():
    assert C._cuda_emu_selftest("aligned_vector_load") == 3.0


def test_kernel_argument_limit():
    """A 5008-byte parameter block (a 5000-byte struct and a pointer) fits the 32764-byte limit of CUDA >= 12.1 but not the 4 KiB of
    older drivers; the launcher's own structs stay under 4 KiB (multi_tensor_apply.cuh)."""
    assert C._cuda_emu_param_limit() == 32764
    assert C._cuda_emu_selftest("oversize_args") == 0.0
    C._cuda_emu_set_param_limit(4096)
    C._cuda_emu_set_driver_version(12000)   # an old driver: the launcher falls back to its 4 KiB structs
    try:
        with pytest.raises(RuntimeError, match="kernel arguments of 5008 bytes exceed the launch limit of 4096"):
            C._cuda_emu_selftest("oversize_args")
        p = [torch.randn(100)]
        opt = MFSGD(p, lr=0.1, momentum=0.9, backend="cuda_emu")
        p[0].grad = torch.randn(100)
        opt.step()  # 4 KiB is what the launcher is sized for
        C._cuda_emu_set_param_limit(3000)
        p[0].grad = torch.randn(100)
        before = p[0].detach().clone()
        with pytest.raises(RuntimeError, match="exceed the launch limit of 3000 bytes"):
            opt.step()
        assert torch.equal(p[0].detach(), before)
    finally:
        C._cuda_emu_set_param_limit(32764)
        C._cuda_emu_set_driver_version(13000)


def test_settings_and_launch_counter():
    assert C._cuda_emu_driver_version() == 13000
    C._cuda_emu_set_driver_version(12000)
    assert C._cuda_emu_driver_version() == 12000
    C._cuda_emu_set_driver_version(13000)
    with pytest.raises(ValueError, match="order must be 'forward', 'reverse' or 'shuffle'"):
        C._cuda_emu_set_thread_order("backwards")
    C._cuda_emu_set_thread_order("shuffle", 7)
    try:
        assert C._cuda_emu_thread_order() == "shuffle"
        assert C._cuda_emu_selftest("block_sum_256") == 256
    finally:
        C._cuda_emu_set_thread_order("forward")
    # 321 chunks: one launch under the 32 KiB structs of a CUDA >= 12.1 driver (2048 blocks each),
    # two under the 4 KiB fallback (320 blocks each; csrc/cuda/launch_limits.h)
    p = [torch.nn.Parameter(torch.randn(320 * CHUNK + 1))]
    opt = MFSGD(p, lr=0.1, momentum=0.9, backend="cuda_emu")
    for driver, launches in ((13000, 1), (12000, 2)):
        C._cuda_emu_set_driver_version(driver)
        try:
            p[0].grad = torch.randn_like(p[0])
            before = C._cuda_emu_launches()
            opt.step()
            assert C._cuda_emu_launches() - before == launches, driver
        finally:
            C._cuda_emu_set_driver_version(13000)


def test_auto_never_chooses_cuda_emu_and_cuda_emu_needs_cpu_tensors():
    import fusedmf
    from fusedmf import _backends

    assert fusedmf.available_backends()["cuda_emu"].available
    assert _backends.resolve("auto", torch.device("cpu"), torch.float32) == "cpu"
    assert _backends.resolve("cuda_emu", torch.device("cpu"), torch.float32) == "cuda_emu"
