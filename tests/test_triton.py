"""The Triton backend (triton_kernels/) against the reference backend (fusedmf/functional/reference.py).

Without a GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
below before triton is first imported); with one they run natively on CUDA tensors. The same
multi-tensor launch path (int64 address tables) runs in both cases.

Matrix: update configurations x (param, grad, master) dtypes x shapes {1, 4097, 123x457, 0,
channels_last 4-D} x 3 steps (first_step, then a changing MF), comparing params and every state
tensor after every step; plus block/launch boundaries with many small tensors and an empty last
one, views into a flat buffer (unaligned addresses), exact fp32 -> fp16/bf16 rounding, skip on
overflow (bit-identical), the non-finite check, table caching, and validation errors that name the
list and index and modify nothing. pack_ against fusedmf.functional.pack.pack_ (NOTE [pack layout]):
bit-identical values, padding never written, block boundaries, validation. maximize (SGD, Adam,
SMEGA2) and AMSGrad against the reference; maximize is also checked bit for bit against the same
step on negated gradients. Every launch states its fp-fusion choice (NOTE [explicit fp fusion]).
"""

import dataclasses
import functools
import importlib
import math
import os
import platform
import sys

import torch

if not torch.cuda.is_available():
    # Triton decides at decoration time whether to interpret: this must precede importing triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

import fusedmf  # noqa: E402

# The one import name of the Triton package; loaded by fusedmf (a source checkout's triton_kernels/
# when it is not installed), and it must be this checkout's, not another installed copy.
tk, _why = fusedmf._backends.triton_module()
assert tk is not None, _why
assert os.path.dirname(os.path.abspath(tk.__file__)) == os.path.join(ROOT, "triton_kernels"), (
    f"fusedmf.triton_kernels comes from {tk.__file__}, not from this checkout ({ROOT})")
from fusedmf.triton_kernels import _multi_tensor as mt  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


from fusedmf.functional import reference, scalars as S  # noqa: E402
P = importlib.import_module("fusedmf.functional.pack")  # by module name: F.pack is also a function


DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
F32_EPS = torch.finfo(torch.float32).eps
STEPS = 3
SHAPES = [(1,), (4097,), (123, 457), (0,), (3, 8, 5, 7)]  # the 4-D one is channels_last

# (param dtype, grad dtype, master weights)
DTYPES = {
    "fp32": (F32, F32, False),
    "fp32_gradfp16": (F32, F16, False),
    "fp16_master": (F16, F16, True),
    "bf16_master": (BF16, BF16, True),
    "bf16_master_gradfp32": (BF16, F32, True),
    "fp16_nomaster_gradfp32": (F16, F32, False),
    "bf16_nomaster": (BF16, BF16, False),
}

# momentum: one value or one per step (a changing MF). grad_scale: grads are generated scaled by
# it and unscaled in the kernel by inv_grad_scale = 1/grad_scale. found_inf0: pass a zero found_inf.
SGD_CONFIGS = {
    "plain": dict(momentum=0.0, buffers=False),
    "heavy_ball": dict(momentum=0.9),
    "damp_l2_scaled_mf": dict(momentum=[0.9, 0.95, 0.99], dampening=0.1, weight_decay=0.01, grad_scale=1024.0,
                              found_inf0=True),
    "nesterov_l2": dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    "decoupled_scaled": dict(momentum=0.9, weight_decay=0.05, decoupled=True, grad_scale=256.0),
    # maximize: the unscaled gradient is negated before L2 (reference.py::_unscaled)
    "plain_maximize": dict(momentum=0.0, buffers=False, maximize=True, weight_decay=0.01),
    "heavy_ball_maximize_scaled": dict(momentum=[0.9, 0.95, 0.99], dampening=0.1, weight_decay=0.01,
                                       grad_scale=1024.0, found_inf0=True, maximize=True),
    "nesterov_maximize": dict(momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
}
ADAM_CONFIGS = {
    "adam": dict(beta1=0.9),
    "adam_l2_mf_scaled": dict(beta1=[0.9, 0.95, 0.975], weight_decay=0.01, grad_scale=1024.0, found_inf0=True),
    "adamw": dict(beta1=0.9, weight_decay=0.05, decoupled=True),
    # 1 - beta1 = 0.7 >= 0.5: torch.lerp's other formula, end - (end - start) * (1 - weight)
    "adam_lerp_large_weight": dict(beta1=[0.3, 0.2, 0.4]),
    "adam_maximize_l2_scaled": dict(beta1=0.9, weight_decay=0.01, grad_scale=1024.0, found_inf0=True, maximize=True),
    # AMSGrad: beta2 = 0.6 so that v decreases on many elements from the second step (g² < 0.4·g_prev²
    # is common with these grads), where the running maximum then differs from v
    "amsgrad": dict(beta1=0.9, beta2=0.6, amsgrad=True),
    "amsgrad_l2_scaled_maximize": dict(beta1=[0.9, 0.95, 0.975], beta2=0.6, weight_decay=0.01, grad_scale=1024.0,
                                       found_inf0=True, amsgrad=True, maximize=True),
    "amsgradw": dict(beta1=0.9, beta2=0.6, weight_decay=0.05, decoupled=True, amsgrad=True),
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The interpreter is single-threaded Python; for the small tensors here torch's intra-op
    threads only add OpenMP contention (measured: a 56k-element float64 comparison took 69 ms with
    2 threads and 2 ms with 1 on the loaded 2-core CI machine). Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# comparisons


def _describe(actual, expected, bad, name):
    idx = bad.nonzero()[:5].tolist()
    a, e = actual.double(), expected.double()
    rows = ", ".join(f"{i}: got {a[tuple(i)].item():.9g} want {e[tuple(i)].item():.9g}" for i in idx)
    return f"{name}: {int(bad.sum())} of {bad.numel()} elements differ; first {rows}"


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of `dtype` at |x| (x in float64), subnormals included."""
    info = torch.finfo(dtype)
    mant = {F16: 10, BF16: 7, F32: 23}[dtype]
    _, exp = torch.frexp(x.abs().clamp_min(info.tiny))
    return torch.ldexp(torch.ones_like(x), (exp - 1 - mant).clamp_min(int(math.log2(info.tiny)) - mant))


def assert_close(actual, expected, scale, name, ulps=8):
    """Kernel vs reference for one output tensor, given its error scale (see _sgd_scales).

    fp32 outputs: |actual - expected| <= ulps * eps32 * scale, where scale is the same update
    computed in float64 on absolute values (every term added, none cancelled): the classic bound
    on the rounding error of a chain of sums and products is eps32 per rounding times that scale,
    however much the result itself cancelled. Both implementations round the same operations in
    the same order, except that a product fused into a sum rounds once in one and twice in the
    other (torch fuses on CPUs with FMA; the kernels' tl.fma rounds once on a GPU and twice in
    Triton's interpreter before 3.9), torch's CPU sqrt is not correctly rounded, and torch's CUDA
    division by a scalar multiplies by its reciprocal. An output depends on at most four such
    products (SGD's w: l2*w, (1-tau)*g, mu*u, lr*d), each worth at most eps32 * scale: 8 leaves a
    factor 2. Where both sides fuse alike, MF-SGD and SMEGA2 are compared bitwise instead
    (fma_rounds_as_torch).
    fp16/bf16 outputs (params): the same allowance plus one ulp of the low-precision type, and at
    most a handful of such elements: an fp32 difference of a few ulps changes the rounded value
    only when it straddles a rounding boundary (probability ~2^-13), whereas a wrong rounding mode
    (truncation) would change about half of them.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    if actual.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    both_nan = a.isnan() & e.isnan()
    tol = ulps * F32_EPS * scale.double() + 1e-40
    if actual.dtype != F32:
        tol = tol + _ulp(e, actual.dtype)
        differ = (a != e) & ~both_nan
        limit = max(2, actual.numel() // 1000)
        assert int(differ.sum()) <= limit, _describe(actual, expected, differ, name) + f" (more than {limit})"
    bad = ((a - e).abs() > tol) & ~both_nan
    bad |= a.isnan() != e.isnan()
    assert not bad.any(), _describe(actual, expected, bad, name)


def assert_bit_identical(actual, expected, name):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    if actual.numel() == 0:
        return
    raw_a = actual.detach().contiguous().reshape(-1).view(torch.uint8)
    raw_e = expected.detach().contiguous().reshape(-1).view(torch.uint8)
    if not torch.equal(raw_a, raw_e):
        bad = (actual != expected) & ~(actual.isnan() & expected.isnan())
        raise AssertionError(_describe(actual, expected, bad, name) + " (bitwise)")


# ---------------------------------------------------------------------------------------------
# inputs


def _randn(shape, dtype, gen, scale=1.0, positive=False):
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if positive:
        x = x * x
    x = (x * scale).to(dtype)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(DEV)


def _clones(tensors):
    return [t.clone(memory_format=torch.preserve_format) for t in tensors]


def _vec(step_scalars) -> torch.Tensor:
    return torch.tensor(step_scalars.as_list(), dtype=torch.float32, device=DEV)


def _per_step(value, step):
    return value[step % len(value)] if isinstance(value, (list, tuple)) else value


def _device_scalar(value):
    return torch.full((1,), value, dtype=torch.float32, device=DEV)


def _check_lists(kernel_lists, ref_lists, scale_lists, names, exact=False):
    """``exact``: bit for bit (see fma_rounds_as_torch), else within assert_close's bound."""
    for name, ks, rs, scales in zip(names, kernel_lists, ref_lists, scale_lists):
        assert len(ks) == len(rs) == len(scales), name
        for i, (k, r, sc) in enumerate(zip(ks, rs, scales)):
            assert k.stride() == r.stride() or k.numel() == 0, f"{name}[{i}] layout changed"
            if exact:
                assert_bit_identical(k, r, f"{name}[{i}]")
            else:
                assert_close(k, r, sc, f"{name}[{i}]")


@triton.jit
def _fma_probe_kernel(x_ptr, y_ptr, z_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.fma(tl.load(x_ptr + offs), tl.load(y_ptr + offs), tl.load(z_ptr + offs)))


@functools.lru_cache(maxsize=None)
def fma_rounds_as_torch() -> bool:
    """Whether tl.fma and the reference's fused operations round alike here: torch fuses
    ``z.add(x, alpha=a)`` into one fma on CPUs with FMA (NOTE [fma placement] in csrc/update_math.h),
    and tl.fma rounds once on a GPU and in the interpreter of Triton 3.9 on (earlier interpreters
    round the product and the sum). Then MF-SGD and SMEGA2, whose kernels write tl.fma exactly where
    torch fuses and launch without fp fusion (NOTE [explicit fp fusion]), must match the reference
    bit for bit; otherwise they are compared within assert_close's bound."""
    gen = torch.Generator().manual_seed(15)
    x, z = _randn((4096,), F32, gen), _randn((4096,), F32, gen)
    alpha = 0.9
    fused = torch.empty_like(z)
    _fma_probe_kernel[(1,)](x, torch.full_like(x, alpha), z, fused, N=4096, enable_fp_fusion=False)
    torch_result = z.add(x, alpha=alpha)
    rounded_twice = x * torch.tensor(alpha, dtype=F32, device=DEV) + z
    return torch.equal(fused, torch_result) and not torch.equal(torch_result, rounded_twice)


def _abs64(tensors):
    return [t.detach().abs().double() for t in tensors]


def _sgd_scales(ref, grads, sc, inv):
    """Error scales of one MF-SGD step: the reference run in float64 on |inputs| with every term
    added (lr negated, since it subtracts). Returns (scale of w, scale of u), one tensor per index."""
    params, bufs, masters = ref
    w, u = _abs64(masters or params), _abs64(bufs)
    # maximize off: negating g changes no magnitude, and on |g| it would cancel terms
    s = dataclasses.replace(sc, lr=-abs(sc.lr), decay_factor=abs(sc.decay_factor), maximize=0.0)
    reference.mf_sgd_(w, _abs64(grads), u, [], s, None if inv is None else inv.abs(), None)
    return w, u


def _adam_scales(ref, grads, sc, inv):
    """As _sgd_scales for MF-Adam: (scale of w, of m, of v, of the AMSGrad maxima)."""
    params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters = ref
    w, m, v, vmax = _abs64(masters or params), _abs64(exp_avgs), _abs64(exp_avg_sqs), _abs64(max_exp_avg_sqs)
    s = dataclasses.replace(sc, neg_step_size=abs(sc.neg_step_size), decay_factor=abs(sc.decay_factor), maximize=0.0)
    reference.mf_adam_(w, _abs64(grads), m, v, vmax, [], s, None if inv is None else inv.abs(), None)
    return w, m, v, vmax


def _check_masters(params, masters):
    for i, (p, m) in enumerate(zip(params, masters)):
        # the param is the round-to-nearest-even copy of the master, exactly as torch's .to() rounds
        assert_bit_identical(p, m.to(p.dtype), f"params[{i}] vs master_params[{i}].to({p.dtype})")


def _resync(kernel_lists, ref_lists):
    # Each step starts both implementations from identical state, so every comparison bounds the
    # error of one step (the tolerances above are per-step arguments).
    for ks, rs in zip(kernel_lists, ref_lists):
        for k, r in zip(ks, rs):
            k.copy_(r)


def run_sgd(cfg, dtypes, shapes, seed=0, steps=STEPS):
    pdt, gdt, has_master = dtypes
    gen = torch.Generator().manual_seed(seed)
    params = [_randn(s, pdt, gen) for s in shapes]
    masters = [p.to(F32, copy=True) for p in params] if has_master else []
    use_buffers = cfg.get("buffers", True)
    # NaN-filled: the first step must write u = g without reading the buffer
    bufs = [torch.full_like(p, float("nan"), dtype=F32) for p in params] if use_buffers else []
    ref = [_clones(params), _clones(bufs), _clones(masters)]
    scale = cfg.get("grad_scale")
    inv = _device_scalar(1.0 / scale) if scale else None
    found = _device_scalar(0.0) if cfg.get("found_inf0") else None
    for step in range(steps):
        grads = [_randn(s, gdt, gen, scale=scale or 1.0) for s in shapes]
        sc = S.sgd_step_scalars(
            lr=0.1, momentum=_per_step(cfg.get("momentum", 0.0), step), dampening=cfg.get("dampening", 0.0),
            weight_decay=cfg.get("weight_decay", 0.0), nesterov=cfg.get("nesterov", False),
            decoupled_weight_decay=cfg.get("decoupled", False), first_step=step == 0,
            maximize=cfg.get("maximize", False))
        w_scale, u_scale = _sgd_scales(ref, grads, sc, inv)
        tk.mf_sgd_(params, grads, bufs, masters, _vec(sc), inv, found)
        reference.mf_sgd_(ref[0], grads, ref[1], ref[2], sc, inv, found)
        _check_lists([params, bufs, masters], ref, [w_scale, u_scale, w_scale if masters else []],
                     ["params", "momentum_buffers", "master_params"], exact=fma_rounds_as_torch())
        _check_masters(params, masters)
        _resync([params, bufs, masters], ref)
    return params, bufs, masters


def run_adam(cfg, dtypes, shapes, seed=0, steps=STEPS):
    pdt, gdt, has_master = dtypes
    gen = torch.Generator().manual_seed(seed)
    params = [_randn(s, pdt, gen) for s in shapes]
    masters = [p.to(F32, copy=True) for p in params] if has_master else []
    exp_avgs = [torch.zeros_like(p, dtype=F32) for p in params]
    exp_avg_sqs = [torch.zeros_like(p, dtype=F32) for p in params]
    # AMSGrad's maxima start at zero, as torch.optim.Adam(amsgrad=True) makes them
    max_exp_avg_sqs = [torch.zeros_like(p, dtype=F32) for p in params] if cfg.get("amsgrad") else []
    ref = [_clones(params), _clones(exp_avgs), _clones(exp_avg_sqs), _clones(max_exp_avg_sqs), _clones(masters)]
    scale = cfg.get("grad_scale")
    inv = _device_scalar(1.0 / scale) if scale else None
    found = _device_scalar(0.0) if cfg.get("found_inf0") else None
    beta1_product = 1.0
    max_above_v = 0  # elements where the AMSGrad maximum is not this step's v
    for step in range(steps):
        grads = [_randn(s, gdt, gen, scale=scale or 1.0) for s in shapes]
        beta1 = _per_step(cfg["beta1"], step)
        beta1_product *= beta1
        sc = S.adam_step_scalars(
            lr=0.01, beta1=beta1, beta2=cfg.get("beta2", 0.999), eps=1e-8, weight_decay=cfg.get("weight_decay", 0.0),
            decoupled_weight_decay=cfg.get("decoupled", False), step=step + 1, beta1_product=beta1_product,
            maximize=cfg.get("maximize", False))
        w_scale, m_scale, v_scale, vmax_scale = _adam_scales(ref, grads, sc, inv)
        tk.mf_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, _vec(sc), inv, found)
        reference.mf_adam_(ref[0], grads, ref[1], ref[2], ref[3], ref[4], sc, inv, found)
        _check_lists([params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters], ref,
                     [w_scale, m_scale, v_scale, vmax_scale, w_scale if masters else []],
                     ["params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params"])
        _check_masters(params, masters)
        max_above_v += sum(int((vm > v).sum()) for vm, v in zip(ref[3], ref[2]))
        _resync([params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters], ref)
    return max_above_v


# ---------------------------------------------------------------------------------------------
# the matrix


def test_fma_probe_sees_single_rounding_where_both_fuse():
    """The probe behind the bitwise comparisons is not silently off where both sides fuse: torch on
    an x86 CPU with AVX2 (or aarch64) and tl.fma in Triton >= 3.9's interpreter (or on a GPU)."""
    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    if DEV.type == "cpu":
        if version < (3, 9):
            pytest.skip(f"Triton {triton.__version__}'s interpreter rounds tl.fma twice")
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") and not platform.machine() == "aarch64":
            pytest.skip("torch does not fuse on this CPU")
    assert fma_rounds_as_torch()




def test_slots_match_fusedmf_scalars():
    from fusedmf.triton_kernels import _slots
    assert S.SGD_SLOTS[-1] == S.ADAM_SLOTS[-1] == S.SMEGA2_SLOTS[-1] == "maximize"
    assert tk.SGD_MAXIMIZE == _slots.SGD_MAXIMIZE == S.SGD_NUM_SCALARS - 1
    assert tk.ADAM_MAXIMIZE == _slots.ADAM_MAXIMIZE == S.ADAM_NUM_SCALARS - 1
    assert _slots.SMEGA2_MAXIMIZE == S.SMEGA2_NUM_SCALARS - 1 and _slots.SMEGA2_NUM_SCALARS == S.SMEGA2_NUM_SCALARS
    assert tk.SGD_SLOTS == S.SGD_SLOTS and tk.SGD_NUM_SCALARS == S.SGD_NUM_SCALARS
    assert tk.ADAM_SLOTS == S.ADAM_SLOTS and tk.ADAM_NUM_SCALARS == S.ADAM_NUM_SCALARS
    for i, name in enumerate(S.SGD_SLOTS):
        assert getattr(tk, "SGD_" + name.upper()) == i, name
    for i, name in enumerate(S.ADAM_SLOTS):
        assert getattr(tk, "ADAM_" + name.upper()) == i, name
    assert tk.SGD_SLOT_INDEX == {n: i for i, n in enumerate(S.SGD_SLOTS)}
    assert tk.ADAM_SLOT_INDEX == {n: i for i, n in enumerate(S.ADAM_SLOTS)}


def _matrix(configs, full_config):
    """Every configuration with fp32 and with fp16 + masters; every dtype combination with the
    configuration that uses every feature (the interpreter is too slow for the full product)."""
    cases = [(c, d) for d in ("fp32", "fp16_master") for c in configs]
    cases += [(full_config, d) for d in DTYPES if d not in ("fp32", "fp16_master")]
    return pytest.mark.parametrize("config,dtypes", cases, ids=[f"{c}-{d}" for c, d in cases])


@_matrix(SGD_CONFIGS, "damp_l2_scaled_mf")
def test_mf_sgd_matches_reference(config, dtypes):
    run_sgd(SGD_CONFIGS[config], DTYPES[dtypes], SHAPES)


@_matrix(ADAM_CONFIGS, "adam_l2_mf_scaled")
def test_mf_adam_matches_reference(config, dtypes):
    max_above_v = run_adam(ADAM_CONFIGS[config], DTYPES[dtypes], SHAPES)
    if ADAM_CONFIGS[config].get("amsgrad"):
        assert max_above_v > 1000, "the steps never made the AMSGrad maximum differ from v"


@pytest.mark.parametrize("dtypes", ["bf16_master", "bf16_master_gradfp32", "fp16_nomaster_gradfp32", "bf16_nomaster"])
def test_mf_adam_amsgrad_low_precision_params(dtypes):
    """AMSGrad with bf16 masters and with fp16/bf16 params updated in place (no masters), unscaled,
    maximizing, with found_inf read, over four steps (the matrix above covers fp32 and fp16 masters)."""
    max_above_v = run_adam(ADAM_CONFIGS["amsgrad_l2_scaled_maximize"], DTYPES[dtypes], SHAPES, steps=4)
    assert max_above_v > 1000, "the steps never made the AMSGrad maximum differ from v"


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny blocks and launches: many blocks per tensor, tails, and several launches per call."""
    monkeypatch.setattr(mt, "BLOCK_SIZE", 64)
    monkeypatch.setattr(mt, "MAX_BLOCKS_PER_LAUNCH", 7)


MANY_SMALL = [(n,) for n in (1, 63, 64, 65, 127, 128, 129, 200, 5, 31)] + [(4, 9), (2, 3, 4, 5), (0,)]


@pytest.mark.parametrize("dtypes", ["fp32", "fp16_master"])
def test_mf_sgd_many_small_tensors_block_and_launch_boundaries(small_blocks, dtypes):
    tk.clear_table_cache()
    stats = tk.table_cache_stats()
    run_sgd(SGD_CONFIGS["nesterov_l2"], DTYPES[dtypes], MANY_SMALL, steps=2)
    after = tk.table_cache_stats()
    # new grads each step: a new tensor table per step, one block table (same element counts)
    assert after["builds"] == stats["builds"] + 2 and after["block_builds"] == stats["block_builds"] + 1


@pytest.mark.parametrize("dtypes", ["fp32", "bf16_master"])
def test_mf_adam_many_small_tensors_block_and_launch_boundaries(small_blocks, dtypes):
    run_adam(ADAM_CONFIGS["adamw"], DTYPES[dtypes], MANY_SMALL, steps=2)
    run_adam(ADAM_CONFIGS["amsgradw"], DTYPES[dtypes], MANY_SMALL, steps=2)


def test_gpu_block_size_boundaries(monkeypatch):
    """The GPU's block size, with tensors of exactly one/two blocks and one element more."""
    monkeypatch.setattr(mt, "BLOCK_SIZE", 2048)
    shapes = [(2048,), (4096,), (4097,), (2049,), (1,)]
    run_sgd(SGD_CONFIGS["damp_l2_scaled_mf"], DTYPES["bf16_master_gradfp32"], shapes, steps=2)
    run_adam(ADAM_CONFIGS["adam_l2_mf_scaled"], DTYPES["fp16_master"], shapes, steps=2)
    run_adam(ADAM_CONFIGS["amsgrad_l2_scaled_maximize"], DTYPES["bf16_master"], shapes, steps=2)


@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda o: f"offset{o}")
def test_views_into_flat_buffers(offset):
    """Params/grads/states as views into flat buffers (as in gradient buckets), aligned or not."""
    shapes = [(4, 7), (100,), (3, 4, 2, 2)]  # element counts multiples of 4: offset 0 stays aligned
    numels = [math.prod(s) for s in shapes]
    end = offset + sum(numels)
    total = end + 8

    def views(flat):
        out, pos = [], offset
        for s, n in zip(shapes, numels):
            out.append(flat[pos:pos + n].view(s))
            pos += n
        return out

    gen = torch.Generator().manual_seed(1)
    flats = [_randn((total,), F16, gen), _randn((total,), F16, gen), _randn((total,), F32, gen)]
    flats.append(flats[0].float())
    flat_p, flat_g, flat_u, flat_m = flats
    outside = [(f[:offset].clone(), f[end:].clone()) for f in flats]
    params, grads, bufs, masters = views(flat_p), views(flat_g), views(flat_u), views(flat_m)
    ref = [_clones(params), _clones(bufs), _clones(masters)]
    sc = S.sgd_step_scalars(lr=0.1, momentum=0.9, weight_decay=0.01)
    w_scale, u_scale = _sgd_scales(ref, grads, sc, None)
    tk.mf_sgd_(params, grads, bufs, masters, _vec(sc))
    reference.mf_sgd_(ref[0], grads, ref[1], ref[2], sc)
    _check_lists([params, bufs, masters], ref, [w_scale, u_scale, w_scale], ["params", "bufs", "masters"],
                 exact=fma_rounds_as_torch())
    _check_masters(params, masters)
    for f, (head, tail) in zip(flats, outside):  # nothing outside the views was written
        assert_bit_identical(f[:offset], head, "before the first view")
        assert_bit_identical(f[end:], tail, "after the last view")
    rows = [(n, p.data_ptr(), g.data_ptr(), u.data_ptr(), m.data_ptr())
            for n, p, g, u, m in zip(numels, params, grads, bufs, masters)]
    tables = mt.get_tables(DEV, rows, (F16, F16, F32, F32))
    # 4-element vector accesses are only claimed when every address allows them
    assert tables.aligned == (offset == 0)


def test_flat_buffer_tail_untouched():
    """Writes stop exactly at each tensor's last element (masked tail of the last block)."""
    gen = torch.Generator().manual_seed(2)
    flat = _randn((300,), F32, gen)
    flat_g = _randn((300,), F32, gen)
    keep = flat.clone()
    params, grads = [flat[:133]], [flat_g[:133]]
    sc = S.sgd_step_scalars(lr=0.5, momentum=0.0)
    tk.mf_sgd_(params, grads, [], [], _vec(sc))
    assert_bit_identical(flat[133:], keep[133:], "elements after the tensor")
    assert not torch.equal(flat[:133], keep[:133])


# ---------------------------------------------------------------------------------------------
# rounding, skip on overflow, first step


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_fp32_to_low_precision_rounds_to_nearest_even(dtype):
    """w = 0 + (-1) * (-x) = x exactly, so the stored param must equal x.to(dtype) bit for bit."""
    mant = 10 if dtype == F16 else 7
    one_ulp = 2.0 ** -mant
    values = [1.0, 1.0 + one_ulp / 2, 1.0 + 3 * one_ulp / 2, -(1.0 + one_ulp / 2), -(1.0 + 3 * one_ulp / 2),
              1.0 + one_ulp / 2 + 2.0 ** -20, 1.0 + one_ulp / 2 - 2.0 ** -20, 2.0 - one_ulp / 4,
              2.0 - one_ulp / 2, 3.14159265, -2.71828183, 1e-3, 6e-8, 1e-40, -1e-38, float("inf"),
              float("-inf"), 3.4e38, -3.4e38, 65504.0, 65519.0, 65520.0, 1e5]
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.tensor(values, dtype=F32), torch.randn(4000, generator=gen) * 100]).to(DEV)
    params = [torch.zeros(x.shape, dtype=dtype, device=DEV)]
    sc = S.SGDStepScalars(lr=1.0, momentum=0.0, one_minus_dampening=1.0, l2_weight_decay=0.0,
                          decay_factor=1.0, nesterov=0.0, first_step=0.0)
    tk.mf_sgd_(params, [-x], [], [], _vec(sc))
    assert_bit_identical(params[0], x.to(dtype), f"fp32 -> {dtype}")


def test_nan_is_stored_as_nan():
    x = torch.tensor([float("nan"), 1.0, -float("nan")], device=DEV)
    sc = S.SGDStepScalars(lr=1.0, momentum=0.0, one_minus_dampening=1.0, l2_weight_decay=0.0,
                          decay_factor=1.0, nesterov=0.0, first_step=0.0)
    for dtype in (F16, BF16):
        p = [torch.zeros(3, dtype=dtype, device=DEV)]
        tk.mf_sgd_(p, [-x], [], [], _vec(sc))
        assert p[0].isnan().tolist() == [True, False, True], dtype


@pytest.mark.parametrize("found_value", [1.0, float("inf"), float("nan")], ids=["one", "inf", "nan"])
@pytest.mark.parametrize("rule", ["sgd", "adam", "amsgrad", "smega2"])
def test_found_inf_writes_nothing(rule, found_value):
    """NOTE [skip on overflow]: every tensor bit-identical, on the first step too."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(1,), (4097,), (0,), (3, 8, 5, 7)]
    params = [_randn(s, F16, gen) for s in shapes]
    masters = [_randn(s, F32, gen) for s in shapes]
    grads = [_randn(s, F16, gen) for s in shapes]
    states = [[_randn(s, F32, gen, positive=True) for s in shapes] for _ in range(3)]
    snapshot = [_clones(lst) for lst in [params, masters, grads] + states]
    found = _device_scalar(found_value)
    inv = _device_scalar(0.5)
    if rule == "sgd":
        sc = S.sgd_step_scalars(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True, first_step=True,
                                maximize=True)
        tk.mf_sgd_(params, grads, states[0], masters, _vec(sc), inv, found)
    elif rule == "adam":
        sc = S.adam_step_scalars(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, step=1, beta1_product=0.9)
        tk.mf_adam_(params, grads, states[0], states[1], [], masters, _vec(sc), inv, found)
    elif rule == "amsgrad":  # max_exp_avg_sqs (states[2]) untouched too
        sc = S.adam_step_scalars(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, step=1, beta1_product=0.9, maximize=True)
        tk.mf_adam_(params, grads, states[0], states[1], states[2], masters, _vec(sc), inv, found)
    else:
        sc = S.smega2_step_scalars(lr=0.1, momentum=0.9, weight_decay=0.01, num_workers=1, cycle=0, maximize=True)
        tk.smega2_(params, grads, states[0], states[1], masters, _vec(sc), inv, found)
    for lst, snap in zip([params, masters, grads] + states, snapshot):
        for i, (t, s) in enumerate(zip(lst, snap)):
            assert_bit_identical(t, s, f"tensor {i}")
    assert_bit_identical(found, _device_scalar(found_value), "found_inf")


def test_empty_lists_and_zero_size_tensors_are_no_ops():
    sc = _vec(S.sgd_step_scalars(lr=0.1, momentum=0.9))
    tk.mf_sgd_([], [], [], [], sc)
    tk.mf_adam_([], [], [], [], [], [], torch.zeros(3))  # nothing to check the scalars against: no-op
    z = [torch.empty(0, 3, device=DEV)]
    tk.mf_sgd_(z, [torch.empty(0, 3, device=DEV)], [torch.empty(0, 3, device=DEV)], [], sc)
    found = _device_scalar(0.0)
    tk.non_finite_check_([], found)
    tk.non_finite_check_([torch.empty(0, device=DEV)], found)
    assert found.item() == 0.0


# ---------------------------------------------------------------------------------------------
# maximize and AMSGrad (reference.py: _unscaled, mf_adam_)


def _run_rule(rule, grads, maximize, seed=11):
    """One step of ``rule`` from a fixed state (fp16 params + masters, L2, unscaling) with the given
    grads; returns every tensor it writes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [g.shape for g in grads]
    params = [_randn(s, F16, gen) for s in shapes]
    masters = [_randn(s, F32, gen) for s in shapes]
    states = [[_randn(s, F32, gen, positive=True) for s in shapes] for _ in range(3)]
    inv = _device_scalar(0.5)
    if rule in ("sgd_plain", "sgd_momentum", "sgd_nesterov"):
        sc = S.sgd_step_scalars(lr=0.1, momentum=0.0 if rule == "sgd_plain" else 0.9, weight_decay=0.01,
                                nesterov=rule == "sgd_nesterov", maximize=maximize)
        bufs = [] if rule == "sgd_plain" else states[0]
        tk.mf_sgd_(params, grads, bufs, masters, _vec(sc), inv)
        return params + masters + bufs
    if rule in ("adam", "amsgrad"):
        sc = S.adam_step_scalars(lr=0.01, beta1=0.9, beta2=0.6, eps=1e-8, weight_decay=0.01, step=2,
                                 beta1_product=0.81, maximize=maximize)
        maxes = states[2] if rule == "amsgrad" else []
        tk.mf_adam_(params, grads, states[0], states[1], maxes, masters, _vec(sc), inv)
        return params + masters + states[0] + states[1] + maxes
    sc = S.smega2_step_scalars(lr=0.1, momentum=0.9, weight_decay=0.01, num_workers=2, cycle=1, maximize=maximize)
    tk.smega2_(params, grads, states[0], states[1], masters, _vec(sc), inv)
    return params + masters + states[0] + states[1]


MAXIMIZE_RULES = ["sgd_plain", "sgd_momentum", "sgd_nesterov", "adam", "amsgrad", "smega2"]


@pytest.mark.parametrize("rule", MAXIMIZE_RULES)
def test_maximize_is_the_step_on_negated_gradients_bit_for_bit(rule):
    """Negation is exact, so maximizing with g must write exactly what minimizing with -g writes
    (every tensor, bitwise), and differ from minimizing with g."""
    gen = torch.Generator().manual_seed(12)
    grads = [_randn(s, F16, gen) for s in [(4097,), (3, 8, 5, 7), (1,)]]
    ascended = _run_rule(rule, grads, maximize=True)
    negated = _run_rule(rule, [-g for g in grads], maximize=False)
    for i, (a, b) in enumerate(zip(ascended, negated)):
        assert_bit_identical(a, b, f"{rule}: tensor {i}")
    descended = _run_rule(rule, grads, maximize=False)
    assert not torch.equal(ascended[0], descended[0]), f"{rule}: maximize changed nothing"


def _smega2_scales(ref, grads, sc, inv):
    """As _sgd_scales for SMEGA2: (scale of w, of v, of G)."""
    params, bufs, accs, masters = ref
    w, v, acc = _abs64(masters or params), _abs64(bufs), _abs64(accs)
    s = dataclasses.replace(sc, lr=-abs(sc.lr), maximize=0.0)
    reference.smega2_(w, _abs64(grads), v, acc, [], s, None if inv is None else inv.abs(), None)
    return w, v, acc


@pytest.mark.parametrize("dtypes", ["fp32", "fp16_master", "bf16_nomaster"])
def test_smega2_maximize_matches_reference(dtypes):
    """SMEGA2 maximizing over two cycles of two workers (v refreshed at each cycle end), unscaled,
    with L2 and found_inf read."""
    pdt, gdt, has_master = DTYPES[dtypes]
    gen = torch.Generator().manual_seed(13)
    params = [_randn(s, pdt, gen) for s in SHAPES]
    masters = [p.to(F32, copy=True) for p in params] if has_master else []
    bufs = [_randn(s, F32, gen) for s in SHAPES]
    accs = [torch.zeros_like(b) for b in bufs]
    ref = [_clones(params), _clones(bufs), _clones(accs), _clones(masters)]
    inv, found = _device_scalar(1.0 / 256), _device_scalar(0.0)
    for step in range(4):
        grads = [_randn(s, gdt, gen, scale=256.0) for s in SHAPES]
        sc = S.smega2_step_scalars(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, num_workers=2,
                                   cycle=step % 2, maximize=True)
        w_scale, v_scale, acc_scale = _smega2_scales(ref, grads, sc, inv)
        tk.smega2_(params, grads, bufs, accs, masters, _vec(sc), inv, found)
        reference.smega2_(ref[0], grads, ref[1], ref[2], ref[3], sc, inv, found)
        _check_lists([params, bufs, accs, masters], ref, [w_scale, v_scale, acc_scale, w_scale if masters else []],
                     ["params", "momentum_buffers", "grad_accumulators", "master_params"], exact=fma_rounds_as_torch())
        _check_masters(params, masters)
        _resync([params, bufs, accs, masters], ref)


def test_amsgrad_maximum_propagates_nan_from_either_side():
    """torch.maximum: a NaN in the stored maximum or in this step's v (from a NaN gradient) is what
    the maximum becomes, and the weight turns NaN there; elsewhere nothing changes."""
    n = 1000
    gen = torch.Generator().manual_seed(14)
    params = [_randn((n,), F32, gen)]
    grads = [_randn((n,), F32, gen)]
    grads[0][7] = float("nan")
    exp_avgs = [torch.zeros(n, device=DEV)]
    exp_avg_sqs = [_randn((n,), F32, gen, positive=True)]
    maxes = [exp_avg_sqs[0] * 2]
    maxes[0][500] = float("nan")
    ref = [_clones(params), _clones(exp_avgs), _clones(exp_avg_sqs), _clones(maxes)]
    sc = S.adam_step_scalars(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, step=3, beta1_product=0.729)
    w_scale, m_scale, v_scale, vmax_scale = _adam_scales(ref + [[]], grads, sc, None)
    tk.mf_adam_(params, grads, exp_avgs, exp_avg_sqs, maxes, [], _vec(sc))
    reference.mf_adam_(ref[0], grads, ref[1], ref[2], ref[3], [], sc)
    assert maxes[0].isnan().nonzero().flatten().tolist() == [7, 500]
    assert params[0].isnan().nonzero().flatten().tolist() == [7, 500]
    _check_lists([params, exp_avgs, exp_avg_sqs, maxes], ref, [w_scale, m_scale, v_scale, vmax_scale],
                 ["params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])


def test_amsgrad_op_schema_and_dispatch():
    """torch.ops.fusedmf.triton_* follow fusedmf.functional._ops.SCHEMAS (mf_adam_ with max_exp_avg_sqs
    after exp_avg_sqs), and the op reaches the kernel: AMSGrad through the op equals the direct call."""
    from fusedmf.functional._ops import SCHEMAS
    for rule, schema in SCHEMAS.items():
        op = getattr(torch.ops.fusedmf, "triton_" + rule).default
        assert op._schema == torch._C.parse_schema("fusedmf::triton_" + rule + schema), rule
    args = _adam_args()
    direct = {k: _clones(v) if isinstance(v, list) else v for k, v in args.items()}
    torch.ops.fusedmf.triton_mf_adam_(args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"],
                                       args["max_exp_avg_sqs"], args["master_params"], args["scalars"])
    tk.mf_adam_(**direct)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for i, (a, b) in enumerate(zip(args[key], direct[key])):
            assert_bit_identical(a, b, f"{key}[{i}]")


# ---------------------------------------------------------------------------------------------
# non-finite check


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
def test_non_finite_check(dtype):
    gen = torch.Generator().manual_seed(5)
    big = torch.finfo(dtype).max
    tensors = [_randn((4097,), dtype, gen), _randn((1,), dtype, gen), torch.empty(0, device=DEV, dtype=dtype),
               torch.full((7, 9), big, dtype=dtype, device=DEV)]
    found = _device_scalar(0.0)
    tk.non_finite_check_(tensors, found)
    assert found.item() == 0.0, "largest finite values are finite"
    for bad in (float("inf"), float("-inf"), float("nan")):
        for which, index in ((0, 4096), (0, 17), (1, 0), (3, (6, 8))):
            t = [x.clone() for x in tensors]
            t[which][index] = bad
            found = _device_scalar(0.0)
            tk.non_finite_check_(t, found)
            assert found.item() == 1.0, (bad, which, index)
    found = _device_scalar(1.0)  # never cleared
    tk.non_finite_check_(tensors, found)
    assert found.item() == 1.0


def test_non_finite_check_mixed_dtypes_and_layouts():
    x16 = torch.zeros(300, dtype=F16, device=DEV)
    x32 = torch.zeros(10, 20, device=DEV).t()  # not contiguous, but dense: read as flat memory
    strided = torch.zeros(10, 20, dtype=BF16, device=DEV)[:, ::2]  # not dense: checked via a copy
    found = torch.zeros((), device=DEV)  # a 0-dim found_inf works too
    tk.non_finite_check_([x16, x32, strided], found)
    assert found.item() == 0.0
    strided[9, 9] = float("nan")
    tk.non_finite_check_([x16, x32, strided], found)
    assert found.item() == 1.0
    found.zero_()
    x32[19, 0] = float("inf")
    tk.non_finite_check_([x16, x32], found)
    assert found.item() == 1.0


# ---------------------------------------------------------------------------------------------
# caching


def test_tables_are_cached_per_tensor_set():
    gen = torch.Generator().manual_seed(6)
    params = [_randn((50,), F32, gen), _randn((3, 3), F32, gen)]
    grads = [_randn((50,), F32, gen), _randn((3, 3), F32, gen)]
    sc = _vec(S.sgd_step_scalars(lr=0.1, momentum=0.0))
    tk.mf_sgd_(params, grads, [], [], sc)
    stats = tk.table_cache_stats()
    tk.mf_sgd_(params, grads, [], [], sc)
    after = tk.table_cache_stats()
    assert after["builds"] == stats["builds"] and after["hits"] == stats["hits"] + 1
    other = [_randn((50,), F32, gen), _randn((3, 3), F32, gen)]
    tk.mf_sgd_(other, grads, [], [], sc)
    assert tk.table_cache_stats()["builds"] == stats["builds"] + 1
    tk.clear_table_cache()
    assert tk.table_cache_stats()["entries"] == 0


# ---------------------------------------------------------------------------------------------
# validation


def _sgd_args(n=3, pdt=F32, master=False):
    gen = torch.Generator().manual_seed(7)
    shapes = [(4, 5), (6,), (2, 3, 4, 5)][:n]
    params = [_randn(s, pdt, gen) for s in shapes]
    return dict(params=params, grads=[_randn(s, F32, gen) for s in shapes],
                momentum_buffers=[_randn(s, F32, gen) for s in shapes],
                master_params=[p.to(F32, copy=True) for p in params] if master else [],
                scalars=_vec(S.sgd_step_scalars(lr=0.1, momentum=0.9)),
                inv_grad_scale=_device_scalar(1.0), found_inf=_device_scalar(0.0))


def _adam_args():
    gen = torch.Generator().manual_seed(8)
    shapes = [(4, 5), (6,), (7,)]
    params = [_randn(s, F32, gen) for s in shapes]
    return dict(params=params, grads=[_randn(s, F32, gen) for s in shapes],
                exp_avgs=[_randn(s, F32, gen) for s in shapes],
                exp_avg_sqs=[_randn(s, F32, gen, positive=True) for s in shapes],
                max_exp_avg_sqs=[_randn(s, F32, gen, positive=True) for s in shapes], master_params=[],
                scalars=_vec(S.adam_step_scalars(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, step=1,
                                                 beta1_product=0.9)))


def _set(key, index, value):
    def edit(args):
        if index is None:
            args[key] = value(args) if callable(value) else value
        else:
            args[key] = list(args[key])
            args[key][index] = value(args[key][index]) if callable(value) else value
    return edit


SGD_BAD = {
    "grads_length": (_set("grads", None, lambda a: a["grads"][:2]), r"grads has 2 tensors but params has 3"),
    "buffers_length": (_set("momentum_buffers", None, lambda a: a["momentum_buffers"][:1]),
                       r"momentum_buffers has 1 tensors .* expected 3 \(or 0\)"),
    "shape": (_set("grads", 1, lambda t: t.new_zeros(7)), r"grads\[1\] has shape \[7\] but params\[1\] has \[6\]"),
    "strides": (_set("grads", 0, lambda t: t.t().contiguous().t()), r"grads\[0\] has strides \[1, 4\]"),
    # params[2] is channels_last (see _randn); its buffer contiguous
    "layout_4d": (_set("momentum_buffers", 2, lambda t: t.contiguous()),
                  r"momentum_buffers\[2\] has strides \[60, 20, 5, 1\] but params\[2\] has \[60, 1, 15, 3\]"),
    "not_dense": (_set("params", 1, lambda t: t.new_zeros(12)[::2]), r"params\[1\] .* not dense"),
    "param_dtype": (lambda a: a.update(params=[p.double() for p in a["params"]]),
                    r"params\[0\] has dtype torch.float64; the Triton backend supports params float32/float16"),
    "state_dtype": (lambda a: a.update(momentum_buffers=[t.half() for t in a["momentum_buffers"]]),
                    r"momentum_buffers\[0\] has dtype torch.float16.*must be float32"),
    "mixed_grad_dtypes": (_set("grads", 2, lambda t: t.half()),
                          r"grads\[2\] has dtype torch.float16 but grads\[0\] has torch.float32"),
    "device": (_set("grads", 1, lambda t: torch.empty(t.shape, device="meta")), r"grads\[1\] is on meta"),
    "not_a_tensor": (_set("momentum_buffers", 1, 3.0), r"momentum_buffers\[1\] is a float, not a tensor"),
    "scalars_length": (_set("scalars", None, lambda a: a["scalars"][:-1]),
                       rf"scalars must be a float32 tensor of {S.SGD_NUM_SCALARS} values"),
    "scalars_dtype": (_set("scalars", None, lambda a: a["scalars"].double()), r"scalars must be a float32 tensor"),
    "inv_grad_scale_size": (_set("inv_grad_scale", None, lambda a: torch.ones(2, device=DEV)),
                            r"inv_grad_scale must be a 1-element float32 tensor"),
    "found_inf_dtype": (_set("found_inf", None, lambda a: torch.zeros(1, dtype=torch.float64, device=DEV)),
                        r"found_inf must be a 1-element float32 tensor"),
    "master_dtype": (lambda a: a.update(master_params=[p.half() for p in a["params"]]),
                     r"master_params\[0\] has dtype torch.float16"),
}


def _snapshot(args):
    out = {}
    for key, value in args.items():
        for i, t in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                out[(key, i)] = (t, t.clone())
    return out


def _assert_unchanged(snap):
    for (key, i), (t, copy) in snap.items():
        assert_bit_identical(t, copy, f"{key}[{i}]")


@pytest.mark.parametrize("case", list(SGD_BAD), ids=list(SGD_BAD))
def test_mf_sgd_validation_names_list_and_index(case):
    edit, pattern = SGD_BAD[case]
    args = _sgd_args()
    edit(args)
    snap = _snapshot(args)
    with pytest.raises(tk.InputError, match=pattern):
        tk.mf_sgd_(**args)
    _assert_unchanged(snap)


def test_validation_error_is_value_and_runtime_error():
    args = _sgd_args()
    args["grads"] = args["grads"][:1]
    for exc in (ValueError, RuntimeError):
        with pytest.raises(exc):
            tk.mf_sgd_(**args)


ADAM_BAD = {
    "exp_avg_sqs_missing": (_set("exp_avg_sqs", None, []), r"exp_avg_sqs has 0 tensors but params has 3; expected 3$"),
    "exp_avgs_shape": (_set("exp_avgs", 2, lambda t: t.new_zeros(2, 4)), r"exp_avgs\[2\] has shape \[2, 4\]"),
    "scalars_sgd_length": (_set("scalars", None, lambda a: torch.zeros(S.SGD_NUM_SCALARS, device=DEV)),
                           rf"scalars must be a float32 tensor of {S.ADAM_NUM_SCALARS} values"),
    # AMSGrad's list: empty or one fp32 tensor per param, checked like exp_avg_sqs
    "max_exp_avg_sqs_length": (_set("max_exp_avg_sqs", None, lambda a: a["max_exp_avg_sqs"][:2]),
                               r"max_exp_avg_sqs has 2 tensors but params has 3; expected 3 \(or 0\)$"),
    "max_exp_avg_sqs_too_long": (_set("max_exp_avg_sqs", None, lambda a: a["max_exp_avg_sqs"] * 2),
                                 r"max_exp_avg_sqs has 6 tensors but params has 3"),
    "max_exp_avg_sqs_dtype": (lambda a: a.update(max_exp_avg_sqs=[t.half() for t in a["max_exp_avg_sqs"]]),
                              r"max_exp_avg_sqs\[0\] has dtype torch.float16.*max_exp_avg_sqs must be float32"),
    "max_exp_avg_sqs_bf16": (lambda a: a.update(max_exp_avg_sqs=[t.bfloat16() for t in a["max_exp_avg_sqs"]]),
                             r"max_exp_avg_sqs\[0\] has dtype torch.bfloat16"),
    "max_exp_avg_sqs_mixed_dtype": (_set("max_exp_avg_sqs", 2, lambda t: t.double()),
                                    r"max_exp_avg_sqs\[2\] has dtype torch.float64 but max_exp_avg_sqs\[0\] has "
                                    r"torch.float32"),
    "max_exp_avg_sqs_shape": (_set("max_exp_avg_sqs", 1, lambda t: t.new_zeros(5)),
                              r"max_exp_avg_sqs\[1\] has shape \[5\] but params\[1\] has \[6\]"),
    "max_exp_avg_sqs_device": (_set("max_exp_avg_sqs", 0, lambda t: torch.empty(t.shape, device="meta")),
                               r"max_exp_avg_sqs\[0\] is on meta"),
}


@pytest.mark.parametrize("case", list(ADAM_BAD), ids=list(ADAM_BAD))
def test_mf_adam_validation_names_list_and_index(case):
    edit, pattern = ADAM_BAD[case]
    args = _adam_args()
    edit(args)
    snap = _snapshot(args)
    with pytest.raises(tk.InputError, match=pattern):
        tk.mf_adam_(**args)
    _assert_unchanged(snap)


def test_non_finite_check_validation():
    found = _device_scalar(0.0)
    with pytest.raises(tk.InputError, match=r"tensors\[1\] has dtype torch.int32"):
        tk.non_finite_check_([torch.zeros(3, device=DEV), torch.zeros(3, dtype=torch.int32, device=DEV)], found)
    with pytest.raises(tk.InputError, match=r"found_inf must be a 1-element float32 tensor"):
        tk.non_finite_check_([torch.zeros(3, device=DEV)], torch.zeros(2, device=DEV))
    with pytest.raises(tk.InputError, match=r"tensors\[0\] is on meta"):
        tk.non_finite_check_([torch.zeros(3, device="meta")], found)
    assert found.item() == 0.0


# ---------------------------------------------------------------------------------------------
# pack_ (NOTE [pack layout] in fusedmf/functional/pack.py)

# a value no kernel writes by accident: the padding must still hold it afterwards
PACK_SENTINEL = {F32: -1.2345678e-7, F16: -0.0001234, BF16: -1.2e-30}
PACK_SHAPES = [(1,), (4097,), (123, 457), (0,), (3, 8, 5, 7)] + [(n,) for n in (5, 31, 64, 65, 129, 3)] + [(0,)]


def _pack_grads(shapes, dtype, seed=0):
    """Values across magnitudes (fp16 overflow and subnormals happen); 4-D shapes channels_last."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        x = torch.randn(s, generator=gen) * torch.exp2(torch.randint(-30, 30, s, generator=gen).float())
        x = x.to(dtype)
        out.append((x.contiguous(memory_format=torch.channels_last) if len(s) == 4 else x).to(DEV))
    return out


def _assert_same_values(actual, expected, name):
    """Bit for bit, except that NaNs only need to be NaN: torch's vectorised CPU cast to bfloat16
    writes NaN as 0xFFFF, its scalar cast (and ours) as 0x7FC0."""
    nan = actual.isnan()
    assert torch.equal(nan, expected.isnan()), f"{name}: NaNs at different places"
    assert_bit_identical(actual[~nan], expected[~nan], name)


def _check_pack(grads, out_dtype, scale, name, extra=5):
    offsets, total = P.pack_offsets([g.numel() for g in grads], torch.empty((), dtype=out_dtype).element_size())
    mine = torch.full((total + extra,), PACK_SENTINEL[out_dtype], dtype=out_dtype, device=DEV)
    ref = mine.clone()
    tk.pack_(grads, mine, scale)
    P.pack_(grads, ref, scale)
    _assert_same_values(mine, ref, name)
    padding = torch.ones(total + extra, dtype=torch.bool, device=DEV)
    for g, off in zip(grads, offsets):
        padding[off:off + g.numel()] = False
    assert bool((mine[padding] == PACK_SENTINEL[out_dtype]).all()), f"{name}: padding was written"


PACK_COMBOS = [(g, o) for g in (F32, F16, BF16) for o in (F32, F16, BF16)]
_DT = {F32: "fp32", F16: "fp16", BF16: "bf16"}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("combo", PACK_COMBOS, ids=[f"g{_DT[g]}-out{_DT[o]}" for g, o in PACK_COMBOS])
def test_pack_matches_reference(combo):
    grad_dtype, out_dtype = combo
    grads = _pack_grads(PACK_SHAPES, grad_dtype)
    assert grads[-1].numel() == 0  # an empty last grad
    _check_pack(grads, out_dtype, 1 / 3, f"pack_ {combo}")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_pack_scale_half_block_boundaries_and_mixed_dtypes(small_blocks):
    """Tiny blocks (many per grad, masked tails, several launches), grads of mixed dtypes in one
    call (one launch per dtype), a grad that is not dense (packed as the reference: row-major)."""
    grads = _pack_grads(MANY_SMALL, F32, seed=1)
    grads[2] = grads[2].to(BF16)
    grads[5] = grads[5].to(F16)
    grads.append(torch.randn(9, 6, device=DEV)[::2, 1:])
    grads.append(torch.empty(0, device=DEV))
    for out_dtype in (F32, F16, BF16):
        _check_pack(grads, out_dtype, 0.5, f"small blocks into {out_dtype}")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("out_dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_pack_rounds_to_nearest_even(out_dtype):
    mant = 10 if out_dtype == F16 else 7
    one_ulp = 2.0 ** -mant
    values = [1.0 + one_ulp / 2, 1.0 + 3 * one_ulp / 2, -(1.0 + one_ulp / 2), 1.0 + one_ulp / 2 + 2.0 ** -20,
              2.0 - one_ulp / 4, 6e-8, 1e-40, float("inf"), float("-inf"), float("nan"), 3.4e38, 65519.0, 65520.0,
              -0.0]
    x = torch.tensor(values, dtype=F32, device=DEV)
    _check_pack([x], out_dtype, 1.0, f"pack_ rounding into {out_dtype}")
    out = torch.zeros(16, dtype=out_dtype, device=DEV)
    tk.pack_([x], out, 1.0)
    _assert_same_values(out[:x.numel()], x.to(out_dtype), f"scale 1 is torch's cast to {out_dtype}")


def test_pack_views_into_flat_buffers_unaligned():
    """Grads that are views at odd offsets (no vector accesses) pack like aligned ones."""
    flat = torch.randn(1000, device=DEV)
    grads = [flat[1:130], flat[131:140].view(3, 3), flat[141:900]]
    _check_pack(grads, F16, 1 / 3, "unaligned grads")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_pack_through_fusedmf_functional():
    F = pytest.importorskip("fusedmf.functional")
    grads = _pack_grads([(4, 5), (0,), (3, 8, 5, 7)], F32)
    _, total = P.pack_offsets([g.numel() for g in grads], 2)
    out = torch.zeros(total, dtype=F16, device=DEV)
    ref = out.clone()
    assert F.pack(grads, out, scale=0.5, backend="triton") == "triton"  # no fallback to the reference
    P.pack_(grads, ref, 0.5)
    assert_bit_identical(out, ref, "F.pack(backend='triton')")


def test_pack_layout_has_one_definition():
    from fusedmf.triton_kernels import pack as tpack
    assert tpack.pack_offsets is P.pack_offsets and tpack.PACK_ALIGN_BYTES == P.PACK_ALIGN_BYTES


def _pack_args():
    return dict(grads=[torch.randn(3, device=DEV), torch.randn(5, 4, device=DEV), torch.randn(2, device=DEV)],
                out=torch.zeros(32, device=DEV), scale=0.5)


PACK_BAD = {
    "out_2d": (_set("out", None, lambda a: torch.zeros(4, 8, device=DEV)),
               r"out must be a contiguous 1-D buffer, got shape \[4, 8\]"),
    "out_strided": (_set("out", None, lambda a: torch.zeros(64, device=DEV)[::2]),
                    r"out must be a contiguous 1-D buffer, got shape \[32\] and strides \[2\]"),
    "out_unaligned": (_set("out", None, lambda a: torch.zeros(64, device=DEV)[1:]),
                      r"out must start on a 16-byte boundary.*4 bytes past one"),
    "out_too_small": (_set("out", None, lambda a: torch.zeros(27, device=DEV)),
                      r"the grads need 28 elements of out .* out has 27"),
    "out_fp16_too_small": (_set("out", None, lambda a: torch.zeros(39, dtype=F16, device=DEV)),
                           r"the grads need 40 elements of out .* out has 39"),
    "out_dtype": (_set("out", None, lambda a: torch.zeros(32, dtype=torch.float64, device=DEV)),
                  r"out has dtype torch.float64.*'reference' backend"),
    "grad_device": (_set("grads", 1, lambda t: torch.empty(t.shape, device="meta")),
                    r"grads\[1\] is on meta but out is on"),
    "grad_dtype": (_set("grads", 2, lambda t: t.double()), r"grads\[2\] has dtype torch.float64"),
    "grad_not_a_tensor": (_set("grads", 0, 1.5), r"grads\[0\] is a float, not a tensor"),
    "grad_sparse": (_set("grads", 0, lambda t: t.to_sparse()), r"grads\[0\] has layout torch.sparse_coo"),
}


@pytest.mark.parametrize("case", list(PACK_BAD), ids=list(PACK_BAD))
def test_pack_validation_names_what_is_wrong_and_writes_nothing(case):
    edit, pattern = PACK_BAD[case]
    args = _pack_args()
    edit(args)
    if isinstance(args["out"], torch.Tensor) and args["out"].dtype.is_floating_point:
        args["out"].fill_(7.0)
    snap = {k: v for k, v in _snapshot(args).items() if v[0].layout == torch.strided}
    with pytest.raises(tk.InputError, match=pattern):
        tk.pack_(**args)
    _assert_unchanged(snap)


# ---------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture_and_replay():
    """Scalars, inv_grad_scale and found_inf are read on the device, so a captured step replays
    correctly after only their contents change."""
    gen = torch.Generator().manual_seed(9)
    shapes = [(4097,), (123, 457), (3, 8, 5, 7)]
    params = [_randn(s, F16, gen) for s in shapes]
    masters = [p.to(F32, copy=True) for p in params]
    bufs = [torch.zeros_like(m) for m in masters]
    grads = [_randn(s, F16, gen) for s in shapes]
    scalars = _vec(S.sgd_step_scalars(lr=0.1, momentum=0.9, first_step=True))
    inv, found = _device_scalar(1.0), _device_scalar(0.0)
    ref = [_clones(params), _clones(bufs), _clones(masters)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernel and caches the tables
        tk.mf_sgd_(params, grads, bufs, masters, scalars, inv, found)
    torch.cuda.current_stream().wait_stream(side)
    _resync([params, bufs, masters], ref)  # undo the warm-up step
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tk.mf_sgd_(params, grads, bufs, masters, scalars, inv, found)

    for step, (mf, scale, skip) in enumerate([(0.9, 0.5, 0.0), (0.95, 0.25, 0.0), (0.99, 1.0, 1.0)]):
        sc = S.sgd_step_scalars(lr=0.1, momentum=mf, first_step=step == 0)
        for g in grads:
            g.copy_(_randn(g.shape, F16, gen))
        scalars.copy_(_vec(sc))
        inv.fill_(scale)
        found.fill_(skip)
        w_scale, u_scale = _sgd_scales(ref, grads, sc, inv)
        graph.replay()
        reference.mf_sgd_(ref[0], grads, ref[1], ref[2], sc, inv, found)
        torch.cuda.synchronize()
        _check_lists([params, bufs, masters], ref, [w_scale, u_scale, w_scale],
                     ["params", "momentum_buffers", "master_params"])
        _resync([params, bufs, masters], ref)


# ---------------------------------------------------------------------------------------------
# compiled code, without a GPU


# Records what each host function launches instead of launching it: the kernel, its arguments and
# its options exactly as mt.launch passes them. The AOT compile below builds each kernel's signature,
# constexprs and options from such a record, so they cannot drift from the kernels or the launchers.
_RECORDER = r"""
import torch


class LaunchRecorder:
    def __init__(self, mt, forward):
        self.mt, self.forward, self.launches, self._launch = mt, forward, [], mt.launch

    def __enter__(self):
        def launch(kernel, *args, **kwargs):
            return self._launch(_Recording(kernel, self), *args, **kwargs)
        self.mt.launch = launch
        return self

    def __exit__(self, *exc):
        self.mt.launch = self._launch


class _Recording:
    def __init__(self, kernel, recorder):
        self.kernel, self.recorder = kernel, recorder

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.recorder.launches.append((self.kernel, args, kwargs))
            if self.recorder.forward:
                self.kernel[grid](*args, **kwargs)
        return run


def kernel_name(kernel):
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


def call_every_host_function(tk, device):
    # One small call of every host function (4096 elements, 16-byte aligned, bf16/fp16 where the
    # kernels have a low-precision variant).
    f32 = lambda n=4096: torch.randn(n, device=device)
    from fusedmf.functional import scalars as S
    vec = lambda sc: torch.tensor(sc.as_list(), dtype=torch.float32, device=device)
    one = lambda v: torch.full((1,), v, dtype=torch.float32, device=device)
    p16 = [f32().half()]
    tk.mf_sgd_([f32()], [f32()], [f32()], [], vec(S.sgd_step_scalars(lr=0.1, momentum=0.9)))
    flat_p, flat_g = f32(4097).bfloat16(), f32(4097).half()  # views at an odd offset: unaligned
    tk.mf_sgd_([flat_p[1:]], [flat_g[1:]], [], [f32()], vec(S.sgd_step_scalars(lr=0.1, momentum=0.0)),
               one(1.0), one(0.0))
    adam = vec(S.adam_step_scalars(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, step=1, beta1_product=0.9))
    tk.mf_adam_(p16, [f32().half()], [f32()], [f32().abs()], [], [f32()], adam, one(1.0), one(0.0))
    tk.mf_adam_([f32()], [f32()], [f32()], [f32().abs()], [f32().abs()], [], adam)
    tk.smega2_(p16, [f32().half()], [f32()], [f32()], [f32()],
               vec(S.smega2_step_scalars(lr=0.1, momentum=0.9, num_workers=2, cycle=1)), one(1.0), one(0.0))
    tk.smega2_estimate_(p16, [f32()], [f32()], [f32()], [f32().half()],
                        vec(S.smega2_estimate_scalars(lr=0.1, momentum=0.9, num_workers=2, cycle=1)))
    tk.non_finite_check_([f32().bfloat16()], one(0.0), one(0.0))
    tk.pack_([f32()], torch.empty(4096, dtype=torch.float16, device=device), 0.5)
    tk.pack_delta_([f32().half()], [f32()], [torch.empty(4096, dtype=torch.bfloat16, device=device)], 0.5)
    tk.apply_average_([f32().half()], [f32()], [f32()], [f32().half()], True)
"""

_SM90_SCRIPT = _RECORDER + r"""
import json, re, sys, warnings
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fusedmf

tk = fusedmf._backends.triton_module()[0]
from fusedmf.triton_kernels import _multi_tensor as mt

POINTER = {torch.int64: "*i64", torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def arg_type(value):
    if isinstance(value, torch.Tensor):
        return POINTER[value.dtype]
    if isinstance(value, float):
        return "fp32"  # how Triton passes a Python float
    raise TypeError(f"no signature type for a {type(value).__name__} kernel argument")


def compile_launch(kernel, args, kwargs, **override):
    names = kernel.arg_names
    bound = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
    assert set(bound) == set(names), (kernel_name(kernel), set(names) - set(bound))
    constexprs = {p.name: bound[p.name] for p in kernel.params if p.is_constexpr}
    signature = {n: "constexpr" if n in constexprs else arg_type(bound[n]) for n in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    options.update(override)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def ops(text):
    return sorted(set(re.findall(r"\b(ld\.global\.v\d\.b32|st\.global\.v\d\.b32|div\.\w+\.f32|sqrt\.\w+\.f32"
                                 r"|fma\.rn\.f32)", text)))


def contractible(text):
    # f32 multiplies and adds without a rounding modifier: ptxas may fuse those into an fma
    # (instructions only: an atomic's red.global.add.f32 is not one)
    return sorted(set(re.findall(r"(?<![\w.])(?:mul|add|sub)(?:\.ftz)?\.f32\b", text)))


with LaunchRecorder(mt, forward=False) as rec:
    call_every_host_function(tk, torch.device("cpu"))
names = ["sgd_fp32_aligned", "sgd_bf16_master_unaligned", "adam_fp16_master_aligned", "adam_amsgrad_fp32",
         "smega2_fp16_master", "smega2_estimate", "non_finite_bf16_sumsq", "pack_fp32_to_fp16_aligned",
         "pack_delta_fp16_to_bf16", "apply_average_fp16"]
assert len(rec.launches) == len(names), [kernel_name(k) for k, _, _ in rec.launches]
out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name, (kernel, args, kwargs) in zip(names, rec.launches):
        compiled = compile_launch(kernel, args, kwargs)
        ptx = compiled.asm["ptx"]
        out[name] = dict(kernel=kernel_name(kernel), ops=ops(ptx), contractible=contractible(ptx),
                         launch_fp_fusion=kwargs.get("enable_fp_fusion"),
                         compiled_fp_fusion=compiled.metadata.enable_fp_fusion)
    # control: the same SGD kernel compiled with fusion enabled has contractible operations
    kernel, args, kwargs = rec.launches[0]
    out["control_sgd_fusion_enabled"] = contractible(compile_launch(kernel, args, kwargs, enable_fp_fusion=True)
                                                     .asm["ptx"])
out["warnings"] = [str(w.message) for w in caught]
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_with_vector_access_and_ieee_div_sqrt():
    """Compile every kernel for sm_90 (no GPU needed: Triton ships LLVM and ptxas), from the launches
    of the host functions (signatures, constexprs and options as launched), and check what the
    interpreter cannot: they compile, full blocks use vector accesses when aligned (pack_ included),
    Adam uses IEEE division and square root, not div.full / sqrt.approx, and every kernel is
    compiled with the fp-fusion choice it launches with (NOTE [explicit fp fusion]): disabled, so
    the PTX has only rounded f32 multiplies and adds (ptxas may not fuse them) and an fma exactly
    where the kernel writes tl.fma."""
    pytest.importorskip("triton.backends.nvidia", reason="this Triton build has no NVIDIA backend")
    import json
    import subprocess

    # Triton's default left as shipped: a launch without an explicit choice would compile with it
    # (enabled up to 3.9, with a warning in 3.9) and fail the checks below.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION", "TRITON_FORCE_DISABLE_FP_FUSION")}
    proc = subprocess.run([sys.executable, "-c", _SM90_SCRIPT, ROOT], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [w for w in out.pop("warnings") if "FP_FUSION" in w], out
    control = out.pop("control_sgd_fusion_enabled")
    assert control, "the contractible-operation check would not see fusion enabled"
    fma_kernels = {"mf_sgd_kernel", "mf_adam_kernel", "smega2_kernel", "smega2_estimate_kernel"}
    assert fma_kernels | {"non_finite_kernel", "pack_kernel", "pack_delta_kernel", "apply_average_kernel"} == \
        {case["kernel"] for case in out.values()}
    for name, case in out.items():
        assert case["launch_fp_fusion"] is False and case["compiled_fp_fusion"] is False, (name, case)
        assert not case["contractible"], (name, case)
        assert ("fma.rn.f32" in case["ops"]) == (case["kernel"] in fma_kernels), (name, case)
    ops = {name: case["ops"] for name, case in out.items()}
    assert "ld.global.v4.b32" in ops["sgd_fp32_aligned"] and "st.global.v4.b32" in ops["sgd_fp32_aligned"], ops
    assert not any(op.startswith(("ld.global.v", "st.global.v")) for op in ops["sgd_bf16_master_unaligned"]), ops
    for name in ("adam_fp16_master_aligned", "adam_amsgrad_fp32"):
        adam_ops = ops[name]
        assert "div.rn.f32" in adam_ops and "sqrt.rn.f32" in adam_ops, (name, adam_ops)
        assert not any(op in adam_ops for op in ("div.full.f32", "div.approx.f32", "sqrt.approx.f32")), adam_ops
    assert "ld.global.v2.b32" in ops["adam_fp16_master_aligned"], ops  # fp16 x 4
    assert "ld.global.v4.b32" in ops["adam_amsgrad_fp32"] and "st.global.v4.b32" in ops["adam_amsgrad_fp32"], ops
    assert "ld.global.v2.b32" in ops["non_finite_bf16_sumsq"], ops
    # pack_: fp32 grads in as 128-bit loads, 4 fp16 values out as one 64-bit store
    assert "ld.global.v4.b32" in ops["pack_fp32_to_fp16_aligned"], ops
    assert "st.global.v2.b32" in ops["pack_fp32_to_fp16_aligned"], ops


def test_every_launch_states_its_fp_fusion_choice():
    """NOTE [explicit fp fusion]: every kernel is launched with enable_fp_fusion given (disabled), and
    mt.launch refuses a launch that leaves it to Triton's default."""
    namespace = {}
    exec(_RECORDER, namespace)
    with namespace["LaunchRecorder"](mt, forward=True) as rec:
        namespace["call_every_host_function"](tk, DEV)
    kernels = {name for module in (tk.sgd, tk.adam, tk.smega2, tk.non_finite, tk.pack, tk.average)
               for name in vars(module) if name.endswith("_kernel")}
    assert {namespace["kernel_name"](k) for k, _, _ in rec.launches} == kernels
    for kernel, _, kwargs in rec.launches:
        assert kwargs.get("enable_fp_fusion") is False, namespace["kernel_name"](kernel)
    with pytest.raises(TypeError, match="enable_fp_fusion"):
        mt.launch(tk.sgd.mf_sgd_kernel, None, (), {})
