"""fusedmf._C on CPU tensors, against fusedmf.functional.reference: the binding's own contract.

What is checked here (the backend matrix through fusedmf.functional lives in test_mixed_precision.py,
test_optim_vs_torch.py and test_overflow.py):
- mf_sgd_ / mf_adam_ for every (param, grad, master) dtype combination, with momentum off, heavy
  ball, dampening and Nesterov, L2 and decoupled weight decay, inv_grad_scale, a first step whose
  momentum buffers hold NaN garbage, several steps, over one call holding tensors of shape [1],
  [4097], [123, 457], [0], a channels_last 4-D tensor, many small tensors and an empty last tensor;
- MF-SGD is bit-identical to the reference when both run FMA kernels (NOTE [fma placement] in
  csrc/update_math.h); MF-Adam is within a few ulps (torch's CPU sqrt is MKL's, not correctly
  rounded); low-precision params are exactly the round-to-nearest-even cast of the fp32 master;
- maximize (SGD, Adam, SMEGA2) and AMSGrad (mf_adam_'s max_exp_avg_sqs), on the CPU kernels and the
  emulated CUDA kernels, against the reference with the tolerances above;
- found_inf set: nothing written at all (bit-identical tensors);
- non_finite_check_;
- pack_ against fusedmf.functional.pack.pack_ (NOTE [pack layout]): every (grad, out) dtype pair,
  bit-identical (one rounding of an fp32 product), padding never written, on both CPU capabilities;
- validation: every rejected call names the offending list and index and modifies nothing.
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

from _util import ordered_bits as _ordered_bits  # noqa: E402
from _util import assert_bit_identical  # noqa: E402
from conftest import require_backend  # noqa: E402

try:  # the binding suite obeys FUSEDMF_REQUIRE_BACKENDS like every other: "cpu" required -> a failure
    require_backend("cpu")
except pytest.skip.Exception as exc:
    pytest.skip(str(exc), allow_module_level=True)
import fusedmf._C as C  # noqa: E402

K = torch.ops.fusedmf  # the kernels, registered as torch ops by importing fusedmf._C

import fusedmf.functional as F  # noqa: E402
from fusedmf.functional import reference  # noqa: E402
from fusedmf.functional.pack import PACK_ALIGN_BYTES, pack_offsets  # noqa: E402
from fusedmf.functional.pack import pack_ as reference_pack_  # noqa: E402
from fusedmf.functional.scalars import (  # noqa: E402
    ADAM_SLOTS,
    SGD_SLOTS,
    adam_step_scalars,
    sgd_step_scalars,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
NAMES = {F32: "f32", F16: "f16", BF16: "bf16"}

# (param, grad, master?) -- every combination the kernels support
COMBOS = [(p, g, m) for p in DTYPES for g in DTYPES for m in (False, True)]


def combo_id(c):
    p, g, m = c
    return f"p{NAMES[p]}-g{NAMES[g]}-{'master' if m else 'nomaster'}"


def torch_runs_fma_kernels() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.fixture(autouse=True)
def _restore_cpu_capability():
    before = C._cpu_capability()
    yield
    C._set_cpu_capability(before)


# ---- comparison helpers -------------------------------------------------------------------------


def assert_ulps(actual: torch.Tensor, expected: torch.Tensor, max_ulps: int, what: str, atol: float = 0.0):
    """|actual - expected| <= max_ulps ulps, or <= atol (for values that cancel towards zero)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    int_dtype = {F32: torch.int32, F16: torch.int16, BF16: torch.int16}[actual.dtype]
    if actual.numel() == 0 or torch.equal(actual.view(int_dtype), expected.view(int_dtype)):  # bitwise equal
        return
    a, e = actual.reshape(-1), expected.reshape(-1)
    ulps = (_ordered_bits(a) - _ordered_bits(e)).abs()
    close = (a.double() - e.double()).abs() <= atol
    nan_both = a.isnan() & e.isnan()
    bad = ~((ulps <= max_ulps) | close | nan_both)
    if bad.any():
        idx = bad.nonzero().flatten()
        first = idx[:5].tolist()
        raise AssertionError(
            f"{what}: {len(idx)} of {a.numel()} elements differ by more than {max_ulps} ulps (max {ulps.max().item()});"
            f" first at {first}: actual {a[first].tolist()} expected {e[first].tolist()}"
        )


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str):
    assert_ulps(actual, expected, 0, what)


def assert_unchanged(before: dict, after: dict):
    for name, tensors in before.items():
        for i, (b, a) in enumerate(zip(tensors, after[name])):
            assert torch.equal(b.contiguous().view(torch.uint8) if b.numel() else b,
                               a.contiguous().view(torch.uint8) if a.numel() else a), f"{name}[{i}] was modified"


def clone_all(tensors):
    return [t.clone() for t in tensors]


# ---- inputs ---------------------------------------------------------------------------------------


def zoo_shapes(seed: int = 0):
    """One call's tensors: every awkward shape at once, an empty one last."""
    rng = random.Random(seed)
    shapes = [((1,), False), ((4097,), False), ((123, 457), False), ((0,), False), ((64, 3, 7, 7), True),
              ((5, 0, 3), False)]
    shapes += [((rng.randint(1, 300),), False) for _ in range(40)]
    shapes += [((rng.randint(1, 9), rng.randint(1, 9), 3, 3), True) for _ in range(3)]
    shapes += [((0,), False)]
    return shapes


def make_tensor(shape, channels_last, dtype, gen, scale=1.0, positive=False):
    t = torch.randn(shape, generator=gen) * scale
    if positive:
        t = t.abs()
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.to(dtype)


def sgd_inputs(param_dtype, grad_dtype, master, momentum, seed=0, garbage_momentum=False):
    gen = torch.Generator().manual_seed(seed)
    params, grads, bufs = [], [], []
    for shape, cl in zoo_shapes(seed):
        params.append(make_tensor(shape, cl, param_dtype, gen))
        grads.append(make_tensor(shape, cl, grad_dtype, gen))
        bufs.append(torch.full_like(params[-1], float("nan"), dtype=F32) if garbage_momentum
                    else make_tensor(shape, cl, F32, gen, 0.1))
    masters = [p.to(F32) for p in params] if master else []
    return params, grads, (bufs if momentum else []), masters


def sgd_vector(**kwargs):
    s = sgd_step_scalars(**kwargs)
    return s, torch.tensor(s.as_list(), dtype=torch.float32)


def adam_vector(**kwargs):
    s = adam_step_scalars(**kwargs)
    return s, torch.tensor(s.as_list(), dtype=torch.float32)


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0)


def _locate(tensors, flat_index):
    for i, t in enumerate(tensors):
        if flat_index < t.numel():
            return f"[{i}] (shape {list(t.shape)}) element {flat_index}"
        flat_index -= t.numel()
    return "?"


def check_update(name, kernel_lists, ref_lists, master, param_dtype, max_ulps, atol=0.0):
    """Compare every list, all tensors of a list at once; low-precision params must be the exact
    cast of the kernel's master."""
    for list_name, mine in kernel_lists.items():
        ref = ref_lists[list_name]
        for i, (a, e) in enumerate(zip(mine, ref)):
            assert a.stride() == e.stride() or a.numel() <= 1, f"{name}: {list_name}[{i}] changed layout"
        a, e = _flat(mine), _flat(ref)
        try:
            if list_name == "params" and master:
                assert_bitwise(a, _flat(kernel_lists["master_params"]).to(param_dtype), "params vs cast(master)")
                assert_ulps(a, e, 1 if param_dtype != F32 else max_ulps, "params", atol)
            elif list_name == "params" and param_dtype != F32:
                # fp32 results within max_ulps may round to neighbouring low-precision values
                assert_ulps(a, e, 0 if max_ulps == 0 else 1, "params", atol)
            else:
                assert_ulps(a, e, max_ulps, list_name, atol)
        except AssertionError as err:
            bad = ((_ordered_bits(a) - _ordered_bits(e)).abs() > max_ulps).nonzero().flatten()
            where = _locate(mine, bad[0].item()) if len(bad) else ""
            raise AssertionError(f"{name}: {list_name}: {err} (first mismatch in {list_name}{where})") from None


# ---- MF-SGD ----------------------------------------------------------------------------------------

MOMENTUM_CONFIGS = {
    "plain": dict(momentum=0.0),
    "heavyball": dict(momentum=0.9),
    "dampening": dict(momentum=0.8, dampening=0.25),
    "nesterov": dict(momentum=0.95, nesterov=True),
}
DECAY_CONFIGS = {"nowd": dict(), "l2": dict(weight_decay=1e-2), "decoupled": dict(weight_decay=1e-2, decoupled_weight_decay=True)}


# (weight decay, inv_grad_scale) pairs: each decay mode with and without unscaling, in 4 runs
DECAY_SCALE = [("nowd", None), ("l2", 0.5), ("decoupled", 0.5), ("l2", None)]


@pytest.mark.parametrize("decay,inv_scale", DECAY_SCALE, ids=[f"{d}-{'invscale' if s else 'noscale'}" for d, s in DECAY_SCALE])
@pytest.mark.parametrize("mconf", list(MOMENTUM_CONFIGS), ids=str)
@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_sgd_matches_reference(combo, mconf, decay, inv_scale):
    param_dtype, grad_dtype, master = combo
    kw = dict(MOMENTUM_CONFIGS[mconf], **DECAY_CONFIGS[decay])
    use_momentum = kw["momentum"] > 0
    params, grads, bufs, masters = sgd_inputs(param_dtype, grad_dtype, master, use_momentum, garbage_momentum=True)
    mine = {"params": params, "momentum_buffers": bufs, "master_params": masters}
    ref = {k: clone_all(v) for k, v in mine.items()}
    inv = None if inv_scale is None else torch.tensor([inv_scale])
    for step in range(3):
        # an MF that changes every step, the first step starting the buffers from NaN garbage
        s, vec = sgd_vector(lr=0.1, first_step=step == 0, **dict(kw, momentum=kw["momentum"] * (1 - 0.01 * step)))
        K.mf_sgd_(params, grads, bufs, masters, vec, inv, None)
        reference.mf_sgd_(ref["params"], grads, ref["momentum_buffers"], ref["master_params"], s, inv, None)
    exact = C._cpu_capability() == "avx2" and torch_runs_fma_kernels()
    check_update(f"mf_sgd_ {combo_id(combo)} {mconf} {decay}", mine, ref, master, param_dtype, 0 if exact else 4,
                 atol=0 if exact else 1e-6)


def test_sgd_first_step_does_not_read_buffers():
    params, grads, bufs, _ = sgd_inputs(F32, F32, False, True, garbage_momentum=True)
    _, vec = sgd_vector(lr=0.1, momentum=0.9, first_step=True)
    K.mf_sgd_(params, grads, bufs, [], vec, None, None)
    for i, (u, g) in enumerate(zip(bufs, grads)):
        assert_bitwise(u, g, f"momentum_buffers[{i}] after the first step")  # u = g, NaNs never read
        assert not params[i].isnan().any(), f"params[{i}] read the NaN garbage"


# ---- MF-Adam ---------------------------------------------------------------------------------------


def adam_inputs(param_dtype, grad_dtype, master, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params, grads, m, v = [], [], [], []
    for shape, cl in zoo_shapes(seed):
        params.append(make_tensor(shape, cl, param_dtype, gen))
        grads.append(make_tensor(shape, cl, grad_dtype, gen))
        m.append(make_tensor(shape, cl, F32, gen, 0.1))
        v.append(make_tensor(shape, cl, F32, gen, 0.1, positive=True))
    masters = [p.to(F32) for p in params] if master else []
    return params, grads, m, v, masters


@pytest.mark.parametrize("mf,inv_scale", [("constant", None), ("varying", 0.25)], ids=["constmf-noscale", "varyingmf-invscale"])
@pytest.mark.parametrize("decay", list(DECAY_CONFIGS), ids=str)
@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_adam_matches_reference(combo, decay, inv_scale, mf):
    param_dtype, grad_dtype, master = combo
    params, grads, exp_avgs, exp_avg_sqs, masters = adam_inputs(param_dtype, grad_dtype, master)
    mine = {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "master_params": masters}
    ref = {k: clone_all(v) for k, v in mine.items()}
    inv = None if inv_scale is None else torch.tensor([inv_scale])
    product = 1.0
    for step in range(1, 4):
        beta1 = 0.9 if mf == "constant" else 0.3 + 0.2 * step  # crosses the lerp branch at 0.5
        product *= beta1
        s, vec = adam_vector(lr=1e-2, beta1=beta1, beta2=0.999, eps=1e-8, step=step, beta1_product=product,
                             **DECAY_CONFIGS[decay])
        K.mf_adam_(params, grads, exp_avgs, exp_avg_sqs, [], masters, vec, inv, None)
        reference.mf_adam_(ref["params"], grads, ref["exp_avgs"], ref["exp_avg_sqs"], [], ref["master_params"], s, inv,
                           None)
    # a few ulps: torch's CPU sqrt (MKL) is off by an ulp in ~20% of cases, ours is IEEE
    check_update(f"mf_adam_ {combo_id(combo)} {decay}", mine, ref, master, param_dtype, 4, atol=1e-6)


# ---- the portable (base) CPU kernels ---------------------------------------------------------------


@pytest.mark.parametrize("combo", [(F32, F32, False), (BF16, F16, True), (F16, BF16, False)], ids=combo_id)
def test_base_capability_matches_reference(combo):
    assert C._set_cpu_capability("base")
    assert C._cpu_capability() == "base"
    param_dtype, grad_dtype, master = combo
    params, grads, bufs, masters = sgd_inputs(param_dtype, grad_dtype, master, True)
    mine = {"params": params, "momentum_buffers": bufs, "master_params": masters}
    ref = {k: clone_all(v) for k, v in mine.items()}
    s, vec = sgd_vector(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    K.mf_sgd_(params, grads, bufs, masters, vec, torch.tensor([0.5]), None)
    reference.mf_sgd_(ref["params"], grads, ref["momentum_buffers"], ref["master_params"], s, torch.tensor([0.5]))
    check_update("mf_sgd_ base", mine, ref, master, param_dtype, 4, atol=1e-6)

    params, grads, exp_avgs, exp_avg_sqs, masters = adam_inputs(param_dtype, grad_dtype, master)
    mine = {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "master_params": masters}
    ref = {k: clone_all(v) for k, v in mine.items()}
    s, vec = adam_vector(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=1, beta1_product=0.9, weight_decay=0.1,
                         decoupled_weight_decay=True)
    K.mf_adam_(params, grads, exp_avgs, exp_avg_sqs, [], masters, vec, None, None)
    reference.mf_adam_(ref["params"], grads, ref["exp_avgs"], ref["exp_avg_sqs"], [], ref["master_params"], s)
    check_update("mf_adam_ base", mine, ref, master, param_dtype, 4, atol=1e-6)


def test_unknown_capability_is_refused():
    assert not C._set_cpu_capability("avx512_please")
    assert C.build_info()["cpu_capability"] == C._cpu_capability()


# ---- conversions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F16, BF16], ids=NAMES.get)
def test_param_is_exact_cast_of_master(dtype):
    """With zero grads and lr 0 the master is unchanged and the param is its cast: compare with torch's .to()."""
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(100_000, generator=gen) * torch.exp2(torch.randint(-40, 40, (100_000,), generator=gen).float())
    finfo = torch.finfo(dtype)
    # values exactly halfway between two representable values, and around overflow / subnormals
    grid = torch.randn(20_000, generator=gen).to(dtype).to(F32)
    halfway = (grid + torch.nextafter(grid.to(dtype), torch.tensor(float("inf"), dtype=dtype)).to(F32)) / 2
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), finfo.max, -finfo.max, finfo.max * 1.001,
                             65519.99, 65520.0, finfo.tiny, finfo.tiny / 3, 1e-8, -1e-8, 5.96e-8, 2.98e-8])
    master = torch.cat([wide, halfway, specials])
    param = torch.zeros_like(master, dtype=dtype)
    _, vec = sgd_vector(lr=0.0, momentum=0.0)
    K.mf_sgd_([param], [torch.zeros_like(master)], [], [master], vec, None, None)
    assert_bitwise(param, master.to(dtype), f"cast to {dtype}")


# ---- found_inf: skip on overflow ------------------------------------------------------------------


@pytest.mark.parametrize("combo", [(F32, F32, False), (BF16, F16, True)], ids=combo_id)
@pytest.mark.parametrize("first_step", [True, False], ids=["first", "later"])
def test_found_inf_writes_nothing(combo, first_step):
    param_dtype, grad_dtype, master = combo
    params, grads, bufs, masters = sgd_inputs(param_dtype, grad_dtype, master, True, garbage_momentum=first_step)
    before = {"params": clone_all(params), "bufs": clone_all(bufs), "masters": clone_all(masters)}
    _, vec = sgd_vector(lr=0.1, momentum=0.9, first_step=first_step, weight_decay=0.1)
    K.mf_sgd_(params, grads, bufs, masters, vec, torch.tensor([2.0]), torch.tensor([1.0]))
    assert_unchanged(before, {"params": params, "bufs": bufs, "masters": masters})

    params, grads, exp_avgs, exp_avg_sqs, masters = adam_inputs(param_dtype, grad_dtype, master)
    before = {"params": clone_all(params), "m": clone_all(exp_avgs), "v": clone_all(exp_avg_sqs),
              "masters": clone_all(masters)}
    _, vec = adam_vector(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=1, beta1_product=0.9)
    K.mf_adam_(params, grads, exp_avgs, exp_avg_sqs, [], masters, vec, None, torch.tensor([float("inf")]))
    assert_unchanged(before, {"params": params, "m": exp_avgs, "v": exp_avg_sqs, "masters": masters})


def test_found_inf_zero_updates():
    params, grads, bufs, _ = sgd_inputs(F32, F32, False, True)
    before = clone_all(params)
    _, vec = sgd_vector(lr=0.1, momentum=0.9)
    K.mf_sgd_(params, grads, bufs, [], vec, None, torch.tensor([0.0]))
    assert not torch.equal(params[1], before[1])


# ---- non_finite_check_ ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["first", "middle", "last_of_big", "last_tensor"])
def test_non_finite_check_finds(dtype, bad, where):
    tensors = [torch.randn(s).to(dtype) for s in [(3,), (0,), (1000, 333), (7,), (0,), (5,)]]
    target, index = {"first": (0, 0), "middle": (2, 123_456), "last_of_big": (2, 332_999), "last_tensor": (5, 4)}[where]
    tensors[target].view(-1)[index] = float(bad)
    found = torch.zeros(1)
    K.non_finite_check_(tensors, found)
    assert found.item() == 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
def test_non_finite_check_clean_and_sticky(dtype):
    finfo = torch.finfo(dtype)
    tensors = [torch.randn(100_003).to(dtype), torch.tensor([finfo.max, -finfo.max, finfo.tiny, 0.0], dtype=dtype),
               torch.empty(0, dtype=dtype)]
    found = torch.zeros(1)
    K.non_finite_check_(tensors, found)
    assert found.item() == 0.0
    found.fill_(1.0)
    K.non_finite_check_(tensors, found)  # never cleared
    assert found.item() == 1.0
    # empty list: a no-op, so found_inf keeps whatever it holds (neither set nor cleared)
    for flag in (0.0, 1.0):
        found = torch.full((1,), flag)
        K.non_finite_check_([], found)
        assert found.item() == flag


# ---- empty and zero-size calls ------------------------------------------------------------------------


def test_empty_lists_are_noops():
    """No tensors (or only zero-size ones): nothing is read or written, not the scalar vector, not
    inv_grad_scale or found_inf, and the zero-size tensors keep their shapes."""
    inv_scale, found = torch.tensor([0.5]), torch.tensor([0.0])

    def unchanged(call, *tensors):
        before = [t.clone() for t in tensors]
        assert call() is None
        for i, (t, b) in enumerate(zip(tensors, before)):
            assert_bit_identical(t, b, f"argument {i} of a no-op call")

    _, vec = sgd_vector(lr=0.1, momentum=0.9)
    unchanged(lambda: K.mf_sgd_([], [], [], [], vec, inv_scale, found), vec, inv_scale, found)
    _, vec = adam_vector(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=1, beta1_product=0.9)
    unchanged(lambda: K.mf_adam_([], [], [], [], [], [], vec, inv_scale, found), vec, inv_scale, found)
    p = [torch.empty(0), torch.empty(3, 0)]
    lists = [clone_all(p) for _ in range(4)]
    unchanged(lambda: K.mf_adam_(p, lists[0], lists[1], lists[2], [], [], vec, inv_scale, found), vec, inv_scale,
              found, *p, *lists[1], *lists[2])
    unchanged(lambda: K.mf_adam_(p, lists[0], lists[1], lists[2], lists[3], [], vec, inv_scale, found),  # AMSGrad
              vec, inv_scale, found, *p, *lists[1], *lists[2], *lists[3])
    found.fill_(1.0)  # a skipped step on empty lists leaves found_inf as it is too
    unchanged(lambda: K.mf_sgd_([], [], [], [], sgd_vector(lr=0.1, momentum=0.9)[1], None, found), found)


def test_scalar_vector_layout_matches_python_slots_by_name():
    assert C.SGD_NUM_SCALARS == len(SGD_SLOTS)
    assert C.ADAM_NUM_SCALARS == len(ADAM_SLOTS)
    assert dict(C.SGD_SLOT_INDEX) == {name: i for i, name in enumerate(SGD_SLOTS)}
    assert dict(C.ADAM_SLOT_INDEX) == {name: i for i, name in enumerate(ADAM_SLOTS)}


def test_build_info():
    info = C.build_info()
    assert info["cuda"] == C.has_cuda()
    assert info["cpu_capability"] in ("base", "avx2")
    assert info["compiler"]
    if C.has_cuda():
        assert info["cuda_runtime"] and info["nvcc"]


# ---- validation ----------------------------------------------------------------------------------------


def sgd_call(**override):
    """A valid mf_sgd_ call's arguments (param shapes [3], [5, 4], [2], [6]), with some replaced."""
    params = [torch.randn(3), torch.randn(5, 4), torch.randn(2), torch.randn(6)]
    args = dict(params=params, grads=[torch.randn_like(p) for p in params],
                momentum_buffers=[torch.randn_like(p) for p in params], master_params=[],
                scalars=sgd_vector(lr=0.1, momentum=0.9)[1], inv_grad_scale=None, found_inf=None)
    args.update(override)
    return args


def expect_rejected(fn, args, exc, *fragments):
    tensors = {k: clone_all(v) if isinstance(v, list) else ([v.clone()] if isinstance(v, torch.Tensor) else [])
               for k, v in args.items()}
    with pytest.raises(exc) as info:
        fn(**args)
    message = str(info.value)
    for f in fragments:
        assert f in message, f"{f!r} not in error message: {message}"
    after = {k: v if isinstance(v, list) else ([v] if isinstance(v, torch.Tensor) else []) for k, v in args.items()}
    for name, ts in tensors.items():
        for i, (b, a) in enumerate(zip(ts, after[name])):
            if b.layout == torch.strided and b.device.type == "cpu" and b.numel():
                same = torch.equal(b.contiguous().view(torch.uint8), a.contiguous().view(torch.uint8))
                assert same, f"{name}[{i}] modified by a rejected call"


def _params():
    return [torch.randn(3), torch.randn(5, 4), torch.randn(2), torch.randn(6)]


def test_rejects_list_length_mismatch():
    a = sgd_call()
    a["grads"] = a["grads"][:3]
    expect_rejected(K.mf_sgd_, a, ValueError, "fusedmf.mf_sgd_: grads has 3 tensors but params has 4")
    a = sgd_call()
    a["momentum_buffers"] = a["momentum_buffers"][:2]
    expect_rejected(K.mf_sgd_, a, ValueError, "momentum_buffers has 2 tensors but params has 4", "must be empty")
    a = sgd_call(master_params=[torch.randn(3)])
    expect_rejected(K.mf_sgd_, a, ValueError, "master_params has 1 tensors but params has 4")


def test_rejects_shape_mismatch():
    a = sgd_call()
    a["params"][3] = torch.randn(5, 4)
    a["grads"][3] = torch.randn(4, 5)
    a["momentum_buffers"][3] = torch.randn(5, 4)
    expect_rejected(K.mf_sgd_, a, ValueError, "fusedmf.mf_sgd_: grads[3] has shape [4, 5] but params[3] has shape [5, 4]")


def test_rejects_stride_mismatch():
    a = sgd_call()
    a["momentum_buffers"][1] = torch.randn(4, 5).t()  # shape [5, 4], strides [1, 5]: dense, another layout
    expect_rejected(K.mf_sgd_, a, ValueError, "momentum_buffers[1] has strides [1, 5] but params[1] has strides [4, 1]")


def test_accepts_size_one_dims_with_other_strides():
    p = torch.randn(8, 3, 1, 1)
    g = torch.randn(8, 3, 1, 1).contiguous(memory_format=torch.channels_last)  # same memory order
    s, vec = sgd_vector(lr=0.1, momentum=0.0)
    ref = p.clone()
    K.mf_sgd_([p], [g], [], [], vec, None, None)
    reference.mf_sgd_([ref], [g], [], [], s)
    assert torch.equal(p, ref)


def test_rejects_non_dense():
    base_p, base_g, base_u = torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 8)
    a = sgd_call()
    a["params"][1], a["grads"][1], a["momentum_buffers"][1] = base_p[:5, ::2], base_g[:5, ::2], base_u[:5, ::2]
    expect_rejected(K.mf_sgd_, a, ValueError, "params[1] is not dense (shape [5, 4], strides [8, 2])")


def test_rejects_wrong_state_dtype():
    a = sgd_call()
    a["momentum_buffers"] = [u.half() for u in a["momentum_buffers"]]
    expect_rejected(K.mf_sgd_, a, TypeError, "momentum_buffers[0] has dtype float16", "must be float32")
    params = _params()
    expect_rejected(K.mf_adam_, dict(params=params, grads=clone_all(params), exp_avgs=clone_all(params),
                                     exp_avg_sqs=[p.double() for p in params], max_exp_avg_sqs=[], master_params=[],
                                     scalars=adam_vector(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, step=1,
                                                         beta1_product=0.9)[1],
                                     inv_grad_scale=None, found_inf=None),
                    TypeError, "exp_avg_sqs[0] has dtype float64")


def test_rejects_mixed_dtypes_within_a_list():
    a = sgd_call()
    a["grads"][2] = a["grads"][2].half()
    expect_rejected(K.mf_sgd_, a, TypeError, "grads[2] has dtype float16 but grads[0] has dtype float32", "uniform")


@pytest.mark.parametrize("what", ["float64_params", "complex_params", "float16_master", "int_grads"])
def test_rejects_unsupported_dtype_combinations(what):
    a = sgd_call(momentum_buffers=[])
    if what == "float64_params":
        a["params"] = [p.double() for p in a["params"]]
    elif what == "complex_params":
        a["params"] = [p.to(torch.complex64) for p in a["params"]]
    elif what == "float16_master":
        a["params"] = [p.half() for p in a["params"]]
        a["master_params"] = [p.clone() for p in a["params"]]
    else:
        a["grads"] = [g.int() for g in a["grads"]]
    expect_rejected(K.mf_sgd_, a, TypeError, "unsupported dtypes", "supported (param, grad, master) combinations")


def test_rejects_bad_scalar_vectors():
    a = sgd_call(scalars=torch.zeros(len(SGD_SLOTS) - 1))
    expect_rejected(K.mf_sgd_, a, ValueError, "scalars has 7 elements but must have 8", "SGD_SLOTS")
    a = sgd_call(scalars=torch.zeros(len(SGD_SLOTS), dtype=torch.float64))
    expect_rejected(K.mf_sgd_, a, TypeError, "scalars has dtype float64 but must be float32")
    a = sgd_call(inv_grad_scale=torch.ones(2))
    expect_rejected(K.mf_sgd_, a, ValueError, "inv_grad_scale has 2 elements but must have 1")
    a = sgd_call(found_inf=torch.zeros(1, dtype=torch.float16))
    expect_rejected(K.mf_sgd_, a, TypeError, "found_inf has dtype float16")
    params = _params()
    adam = dict(params=params, grads=clone_all(params), exp_avgs=clone_all(params), exp_avg_sqs=clone_all(params),
                max_exp_avg_sqs=[], master_params=[], scalars=sgd_vector(lr=0.1, momentum=0.9)[1],
                inv_grad_scale=None, found_inf=None)
    expect_rejected(K.mf_adam_, adam, ValueError, "scalars has 8 elements but must have 11", "ADAM_SLOTS")
    expect_rejected(K.mf_sgd_, dict(sgd_call(), params=[], grads=[], momentum_buffers=[],
                                    scalars=torch.zeros(3)), ValueError, "scalars has 3 elements")


def test_rejects_wrong_device():
    a = sgd_call()
    a["grads"][1] = torch.empty(5, 4, device="meta")
    # a meta tensor in the call dispatches to the fake kernel (fusedmf/functional/_ops.py), which
    # refuses a mixed call naming the tensor, as the CPU kernel does
    expect_rejected(K.mf_sgd_, a, ValueError, "grads[1] is on meta but params[0] is on cpu")
    a = sgd_call(found_inf=torch.zeros(1, device="meta"))
    expect_rejected(K.mf_sgd_, a, ValueError, "found_inf is on meta but params[0] is on cpu")
    a = sgd_call(momentum_buffers=[])
    a["params"] = [torch.empty_like(p, device="meta") for p in a["params"]]
    a["grads"] = [torch.empty_like(p, device="meta") for p in a["grads"]]
    expect_rejected(K.mf_sgd_, a, ValueError, "scalars is on cpu but params[0] is on meta")
    expect_rejected(K.non_finite_check_, dict(tensors=[torch.randn(3), torch.randn(2, device="meta")],
                                              found_inf=torch.zeros(1)),
                    ValueError, "tensors[1] is on meta but tensors[0] is on cpu")


@pytest.mark.skipif(C.has_cuda(), reason="this build has CUDA kernels")
def test_cuda_tensors_without_cuda_build_are_refused():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device to make CUDA tensors with; the message is checked where one exists")
    a = sgd_call()
    a = {k: ([t.cuda() for t in v] if isinstance(v, list) else (v.cuda() if isinstance(v, torch.Tensor) else v))
         for k, v in a.items()}
    expect_rejected(K.mf_sgd_, a, RuntimeError, "has no CUDA kernels", "FUSEDMF_CUDA=1 pip install --no-build-isolation .")


def test_rejects_sparse():
    a = sgd_call(momentum_buffers=[])
    a["grads"][0] = a["grads"][0].to_sparse()
    expect_rejected(K.mf_sgd_, a, ValueError, "grads[0] has layout Sparse")


def test_non_finite_check_validation():
    expect_rejected(K.non_finite_check_, dict(tensors=[torch.randn(3)], found_inf=torch.zeros(2)),
                    ValueError, "found_inf has 2 elements but must have 1")
    expect_rejected(K.non_finite_check_, dict(tensors=[torch.randn(3).double()], found_inf=torch.zeros(1)),
                    TypeError, "tensors[0] has dtype float64")
    expect_rejected(K.non_finite_check_, dict(tensors=[torch.randn(3), torch.randn(2).half()], found_inf=torch.zeros(1)),
                    TypeError, "tensors[1] has dtype float16 but tensors[0] has dtype float32")


# ---- CUDA kernels: on a GPU, and as backend "cuda_emu" (csrc/cuda executed on CPU tensors) ---------
# Each test runs the same csrc/cuda source twice where it can: "cuda" needs a GPU and a CUDA build
# (skipped otherwise, with the reason), "cuda_emu" needs a FUSEDMF_CUDA_EMU=1 build (CI has one and
# requires it). Both must equal the CPU kernels bit for bit.

needs_cuda = pytest.mark.skipif(not (C.has_cuda() and torch.cuda.is_available()),
                                reason="needs fusedmf._C built with CUDA (FUSEDMF_CUDA=1) and a visible GPU")


def _require_emu():
    require_backend("cuda_emu")  # skips with the reason, or fails under FUSEDMF_REQUIRE_BACKENDS


CUDA_KINDS = [pytest.param("cuda", marks=needs_cuda), "cuda_emu"]


class _Cuda:
    """The CUDA kernels of one kind: where their tensors live, and their ops."""

    def __init__(self, kind):
        if kind == "cuda_emu":
            _require_emu()
        self.kind = kind
        self.device = "cuda" if kind == "cuda" else "cpu"
        prefix = "" if kind == "cuda" else "cuda_emu_"
        for rule in ("mf_sgd_", "mf_adam_", "non_finite_check_", "pack_"):
            setattr(self, rule, getattr(K, prefix + rule))

    def sync(self):
        if self.kind == "cuda":
            torch.cuda.synchronize()


@pytest.fixture(params=CUDA_KINDS)
def gpu(request):
    return _Cuda(request.param)


def _to(tensors, device, misalign=None):
    """Copies on `device` (always new memory); for the CUDA kernels (misalign, the default on a
    CUDA device) every third one a view one element into its buffer, so that the kernels take their
    scalar (unaligned) path for it."""
    misalign = device == "cuda" if misalign is None else misalign
    out = []
    for i, t in enumerate(tensors):
        if misalign and i % 3 == 1 and t.dim() == 1:
            buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
            out.append(buf[1:].copy_(t))
        else:
            out.append(t.to(device, copy=True))
    return out


def _launcher_zoo(dtype, seed=0):
    """Shapes that exercise the launcher: >48 tensors per launch, a tensor of >320 chunks, sizes
    not multiple of 4, zero-size tensors in the middle and last."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(int(n), generator=gen) for n in torch.randint(1, 3000, (150,), generator=gen)]
    tensors += [torch.randn(4097, generator=gen), torch.empty(0)]
    tensors += [torch.randn(320 * 65536 + 5, generator=gen), torch.empty(0), torch.randn(3, generator=gen),
                torch.empty(0)]
    return [t.to(dtype) for t in tensors]


def _views_like(tensors, dtype, gen, scale=1.0, positive=False):
    out = []
    for t in tensors:
        x = torch.randn(t.numel(), generator=gen) * scale
        out.append((x.abs() if positive else x).to(dtype))
    return out


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_cuda_sgd_and_adam_match_cpu_kernels(gpu, combo):
    """The CUDA kernels round like the CPU kernels (NOTE [fma placement]): bit for bit."""
    param_dtype, grad_dtype, master = combo
    gen = torch.Generator().manual_seed(3)
    params = _launcher_zoo(param_dtype)
    grads = _views_like(params, grad_dtype, gen)
    bufs = _views_like(params, F32, gen, 0.1)
    masters = [p.to(F32) for p in params] if master else []
    cpu = {"params": clone_all(params), "momentum_buffers": clone_all(bufs), "master_params": clone_all(masters)}
    dev = {k: _to(v, gpu.device, True) for k, v in cpu.items()}
    grads_dev = _to(grads[1:] + grads[:1], gpu.device, True)  # other alignments than the params'
    grads_dev = grads_dev[-1:] + grads_dev[:-1]
    inv = torch.tensor([0.5])
    for step in range(2):
        _, vec = sgd_vector(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, first_step=step == 0)
        K.mf_sgd_(cpu["params"], grads, cpu["momentum_buffers"], cpu["master_params"], vec, inv, None)
        gpu.mf_sgd_(dev["params"], grads_dev, dev["momentum_buffers"], dev["master_params"], vec.to(gpu.device),
                    inv.to(gpu.device), torch.zeros(1, device=gpu.device))
    exact = C._cpu_capability() == "avx2"
    check_update(f"{gpu.kind} mf_sgd_ {combo_id(combo)}", {k: _to(v, "cpu", False) for k, v in dev.items()}, cpu, master,
                 param_dtype, 0 if exact else 4, atol=0 if exact else 1e-6)

    exp_avgs = _views_like(params, F32, gen, 0.1)
    exp_avg_sqs = _views_like(params, F32, gen, 0.1, positive=True)
    masters = [p.to(F32) for p in params] if master else []
    cpu = {"params": clone_all(params), "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "master_params": masters}
    dev = {k: _to(v, gpu.device, True) for k, v in cpu.items()}
    _, vec = adam_vector(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=1, beta1_product=0.9, weight_decay=0.1,
                         decoupled_weight_decay=True)
    K.mf_adam_(cpu["params"], grads, cpu["exp_avgs"], cpu["exp_avg_sqs"], [], cpu["master_params"], vec, inv, None)
    gpu.mf_adam_(dev["params"], grads_dev, dev["exp_avgs"], dev["exp_avg_sqs"], [], dev["master_params"],
                 vec.to(gpu.device), inv.to(gpu.device), None)
    check_update(f"{gpu.kind} mf_adam_ {combo_id(combo)}", {k: _to(v, "cpu", False) for k, v in dev.items()}, cpu, master,
                 param_dtype, 0 if exact else 4, atol=0 if exact else 1e-6)


def test_cuda_found_inf_writes_nothing_and_non_finite_check(gpu):
    params = _to(_launcher_zoo(F32), gpu.device, True)
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.full_like(p, float("nan")) for p in params]
    before = {"params": clone_all(params), "bufs": clone_all(bufs)}
    found = torch.zeros(1, device=gpu.device)
    gpu.non_finite_check_(grads, found)
    assert found.item() == 0.0
    grads[-2][-1] = float("nan")  # the last non-empty tensor, an empty one after it
    gpu.non_finite_check_(grads, found)
    assert found.item() == 1.0
    _, vec = sgd_vector(lr=0.1, momentum=0.9, first_step=True)
    gpu.mf_sgd_(params, grads, bufs, [], vec.to(gpu.device), None, found)
    gpu.sync()
    assert_unchanged(before, {"params": params, "bufs": bufs})


@needs_cuda
def test_cuda_step_replays_in_a_graph_with_new_scalars():
    params = [torch.randn(1000, device="cuda"), torch.randn(7, 9, device="cuda")]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    eager = {"params": clone_all(params), "bufs": clone_all(bufs)}
    vec = torch.zeros(len(SGD_SLOTS), device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        K.mf_sgd_(clone_all(params), grads, clone_all(bufs), [], vec, None, None)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K.mf_sgd_(params, grads, bufs, [], vec, None, None)
    for step in range(3):
        _, v = sgd_vector(lr=0.1 / (step + 1), momentum=0.8 + 0.05 * step, first_step=step == 0)
        vec.copy_(v)
        graph.replay()
        K.mf_sgd_(eager["params"], grads, eager["bufs"], [], v.cuda(), None, None)
    torch.cuda.synchronize()
    assert_unchanged(eager, {"params": params, "bufs": bufs})  # i.e. identical


# ---- pack_ (NOTE [pack layout] in fusedmf/functional/pack.py) ---------------------------------------

# a bit pattern no kernel writes by accident: the padding must still hold it afterwards
PACK_SENTINEL = {F32: -1.2345678e-7, F16: -0.0001234, BF16: -1.2e-30}


def pack_grads(dtype, seed=0):
    """The zoo of one call: [1], [4097], [123, 457], [0], channels_last 4-D, many small grads, an
    empty last one; values across magnitudes, so that fp16 overflows and underflows happen."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for shape, cl in zoo_shapes(seed):
        t = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-30, 30, shape, generator=gen).float())
        grads.append((t.contiguous(memory_format=torch.channels_last) if cl else t).to(dtype))
    assert grads[-1].numel() == 0
    return grads


def pack_buffer(grads, dtype, extra=5):
    """A sentinel-filled buffer a few elements longer than the grads need, and the padding mask."""
    offsets, total = pack_offsets([g.numel() for g in grads], torch.empty((), dtype=dtype).element_size())
    out = torch.full((total + extra,), PACK_SENTINEL[dtype], dtype=dtype)
    padding = torch.ones(total + extra, dtype=torch.bool)
    for g, off in zip(grads, offsets):
        padding[off:off + g.numel()] = False
    return out, padding


def check_pack(grads, out_dtype, scale, what):
    mine, padding = pack_buffer(grads, out_dtype)
    ref = mine.clone()
    assert mine.data_ptr() % PACK_ALIGN_BYTES == 0
    K.pack_(grads, mine, scale)
    reference_pack_(grads, ref, scale)
    assert_bitwise(mine, ref, what)
    assert_bitwise(mine[padding], torch.full_like(mine[padding], PACK_SENTINEL[out_dtype]), f"{what}: padding")


PACK_COMBOS = [(g, o) for g in DTYPES for o in DTYPES]


def pack_id(c):
    return f"g{NAMES[c[0]]}-out{NAMES[c[1]]}"


@pytest.mark.parametrize("scale", [1 / 3, 0.5], ids=["third", "half"])
@pytest.mark.parametrize("combo", PACK_COMBOS, ids=pack_id)
def test_pack_matches_reference(combo, scale):
    grad_dtype, out_dtype = combo
    check_pack(pack_grads(grad_dtype), out_dtype, scale, f"pack_ {combo} scale {scale}")


@pytest.mark.parametrize("combo", [(F32, F16), (BF16, F32), (F16, BF16)], ids=pack_id)
def test_pack_base_capability_matches_reference(combo):
    assert C._set_cpu_capability("base")
    check_pack(pack_grads(combo[0], seed=1), combo[1], 1 / 3, f"pack_ base {combo}")


@pytest.mark.filterwarnings("ignore:overflow")
@pytest.mark.parametrize("out_dtype", [F16, BF16], ids=NAMES.get)
def test_pack_rounds_like_torch(out_dtype):
    """Halfway cases, overflow to inf, subnormals, signed zeros, inf and NaN: torch's .to() bit for bit."""
    gen = torch.Generator().manual_seed(2)
    grid = torch.randn(20_000, generator=gen).to(out_dtype).to(F32)
    up = torch.nextafter(grid.to(out_dtype), torch.tensor(float("inf"), dtype=out_dtype)).to(F32)
    halfway = (grid + up) / 2
    finfo = torch.finfo(out_dtype)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), finfo.max, finfo.max * 1.001,
                             65519.99, 65520.0, finfo.tiny, finfo.tiny / 3, 5.96e-8, 2.98e-8, 3.4e38, -3.4e38])
    x = torch.cat([halfway, specials])
    for scale in (1.0, 0.5, 1 / 3):
        check_pack([x, x.to(F16), x.to(BF16)], out_dtype, scale, f"pack_ specials into {out_dtype} * {scale}")
    out = torch.zeros(x.numel() + 8, dtype=out_dtype)
    K.pack_([x], out, 1.0)
    assert_bitwise(out[:x.numel()], x.to(out_dtype), "pack_ with scale 1 is torch's cast")


def test_pack_mixed_dtypes_and_layouts():
    """Grads of several dtypes in one call (a bucket of mixed params, zero slots in the buffer's
    dtype), a transposed (dense) grad, and a grad that is not dense (packed row-major, as the reference)."""
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(3, 5, generator=gen), torch.randn(2, 3, 4, 4, generator=gen).to(BF16)
             .contiguous(memory_format=torch.channels_last), torch.randn(7, generator=gen).half(),
             torch.randn(0), torch.randn(6, 9, generator=gen).t(), torch.randn(9, 4, generator=gen)[::2, 1:],
             torch.randn(4, 5, generator=gen)[:, None, :].expand(4, 3, 5).to(F16), torch.randn(1).to(BF16)]
    for out_dtype in DTYPES:
        check_pack(grads, out_dtype, 0.25, f"mixed grads into {out_dtype}")


def test_pack_large_call_is_split_across_threads():
    """More than a few grain sizes of elements, so at::parallel_for cuts tensors into pieces."""
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(n, generator=gen) for n in (300_001, 17, 150_000, 3)]
    check_pack(grads, F16, 1 / 3, "large pack")


def test_pack_empty_calls():
    out = torch.full((8,), 3.0)
    K.pack_([], out, 0.5)
    K.pack_([torch.empty(0), torch.empty(3, 0)], out, 0.5)
    K.pack_([], torch.empty(0), 0.5)
    assert (out == 3.0).all()


def test_pack_dispatch_runs_the_cpu_kernel():
    grads = pack_grads(F32)
    out, _ = pack_buffer(grads, F16)
    ref = out.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        assert F.pack(grads, out, scale=0.5, backend="cpu") == "cpu"
        assert F.pack(grads, out, scale=0.5) == "cpu"  # auto
    reference_pack_(grads, ref, 0.5)
    assert_bitwise(out, ref, "F.pack(backend='cpu')")
    # float64 stays with the reference, whatever backend is named
    assert F.pack([torch.randn(3, dtype=torch.float64)], torch.zeros(8), scale=0.5, backend="cpu") == "reference"


def pack_call(**override):
    args = dict(grads=[torch.randn(3), torch.randn(5, 4), torch.randn(2)], out=torch.zeros(32), scale=0.5)
    args.update(override)
    return args


def test_pack_rejects_bad_out():
    base = torch.zeros(64)
    expect_rejected(K.pack_, pack_call(out=torch.zeros(4, 8)), ValueError,
                    "fusedmf.pack_: out must be a contiguous 1-D buffer, got shape [4, 8]")
    expect_rejected(K.pack_, pack_call(out=base[::2]), ValueError,
                    "out must be a contiguous 1-D buffer, got shape [32] and strides [2]")
    expect_rejected(K.pack_, pack_call(out=base[1:]), ValueError, "out must start on a 16-byte boundary",
                    "4 bytes past one")
    expect_rejected(K.pack_, pack_call(out=torch.zeros(27)), ValueError,
                    "fusedmf.pack_: the grads need 28 elements of out", "out has 27")  # 4 + 20 + 4
    expect_rejected(K.pack_, pack_call(out=torch.zeros(39, dtype=F16)), ValueError,
                    "the grads need 40 elements of out", "out has 39")  # slots of 8 fp16: 8 + 24 + 8
    expect_rejected(K.pack_, pack_call(out=torch.zeros(32, dtype=torch.float64)), TypeError,
                    "out has dtype float64", "'reference' backend")
    expect_rejected(K.pack_, pack_call(out=torch.zeros(32, dtype=torch.int32)), TypeError, "out has dtype int32")
    expect_rejected(K.pack_, pack_call(out=torch.zeros(32, device="meta")), ValueError,
                    "grads[0] is on cpu but out is on meta")  # the fake kernel's check


def test_pack_rejects_bad_grads():
    a = pack_call()
    a["grads"][1] = torch.empty(5, 4, device="meta")
    expect_rejected(K.pack_, a, ValueError, "fusedmf.pack_: grads[1] is on meta but out is on cpu")
    a = pack_call()
    a["grads"][2] = a["grads"][2].double()
    expect_rejected(K.pack_, a, TypeError, "grads[2] has dtype float64", "'reference' backend")
    a = pack_call()
    a["grads"][0] = a["grads"][0].to_sparse()
    expect_rejected(K.pack_, a, ValueError, "grads[0] has layout Sparse")
    a = pack_call()
    a["grads"][2] = None
    with pytest.raises(RuntimeError, match=r"List\[Tensor\]"):  # the schema refuses None in a Tensor[]
        K.pack_(**a)


@pytest.mark.parametrize("combo", PACK_COMBOS, ids=pack_id)
def test_cuda_pack_matches_reference(gpu, combo):
    """The launcher's zoo (several launches, a tensor of >320 chunks, unaligned grads), bit for bit."""
    grad_dtype, out_dtype = combo
    d = gpu.device
    grads = _to(_launcher_zoo(grad_dtype), d, True)
    grads += [torch.randn(3, 8, 5, 7, device=d).to(grad_dtype).contiguous(memory_format=torch.channels_last),
              torch.randn(9, 4, device=d)[::2].to(grad_dtype), torch.randn(5, device=d).half(),
              torch.empty(0, device=d)]
    mine, padding = pack_buffer(grads, out_dtype)
    mine = mine.to(d)
    ref = mine.clone()
    gpu.pack_(grads, mine, 1 / 3)
    reference_pack_(grads, ref, 1 / 3)
    gpu.sync()
    assert_bitwise(mine.cpu(), ref.cpu(), f"{gpu.kind} pack_ {combo}")
    assert (mine.cpu()[padding] == PACK_SENTINEL[out_dtype]).all(), "padding written"


# ---- maximize and AMSGrad, on the CPU kernels and the emulated CUDA kernels ------------------------
# Each test runs the C++ CPU loops ("cpu") and csrc/cuda's kernels on the host ("cuda_emu"), against
# reference.py. Tolerances are the ones above: bit for bit where both round with FMA (SGD, SMEGA2),
# a few ulps for Adam (torch's MKL sqrt is not correctly rounded, NOTE [fma placement]).

UPDATE_BACKENDS = ["cpu", "cuda_emu"]


@pytest.fixture(params=UPDATE_BACKENDS)
def update_backend(request):
    if request.param == "cuda_emu":
        _require_emu()
    return request.param


def _update_op(backend, rule):
    return getattr(K, ("cuda_emu_" if backend == "cuda_emu" else "") + rule)


def _exact(backend) -> bool:
    """Whether `backend` rounds exactly where the reference does: FMA on both sides. The emulated
    CUDA kernels always fuse (std::fma, as __fmaf_rn does); the CPU loops in their AVX2 build."""
    return torch_runs_fma_kernels() and (backend == "cuda_emu" or C._cpu_capability() == "avx2")


MAXIMIZE_COMBOS = [(F32, F32, False), (BF16, F16, True), (F16, BF16, False)]
MAXIMIZE_SGD = {k: MOMENTUM_CONFIGS[k] for k in ("plain", "heavyball", "nesterov")}


@pytest.mark.parametrize("mconf", list(MAXIMIZE_SGD), ids=str)
@pytest.mark.parametrize("combo", MAXIMIZE_COMBOS, ids=combo_id)
def test_sgd_maximize_matches_reference(update_backend, combo, mconf):
    param_dtype, grad_dtype, master = combo
    kw = dict(MAXIMIZE_SGD[mconf], weight_decay=1e-2)
    use_momentum = kw["momentum"] > 0
    params, grads, bufs, masters = sgd_inputs(param_dtype, grad_dtype, master, use_momentum)
    mine = {"params": params, "momentum_buffers": bufs, "master_params": masters}
    ref = {k: clone_all(v) for k, v in mine.items()}
    # the same step descending along -g: maximize negates the unscaled gradient exactly
    neg = {k: clone_all(v) for k, v in mine.items()}
    neg_grads = [g.neg() for g in grads]
    inv = torch.tensor([0.5])
    op = _update_op(update_backend, "mf_sgd_")
    for step in range(3):
        s, vec = sgd_vector(lr=0.1, first_step=step == 0, maximize=True, **kw)
        op(params, grads, bufs, masters, vec, inv, None)
        reference.mf_sgd_(ref["params"], grads, ref["momentum_buffers"], ref["master_params"], s, inv, None)
        _, vec_min = sgd_vector(lr=0.1, first_step=step == 0, **kw)
        op(neg["params"], neg_grads, neg["momentum_buffers"], neg["master_params"], vec_min, inv, None)
    exact = _exact(update_backend)
    name = f"{update_backend} mf_sgd_ maximize {combo_id(combo)} {mconf}"
    check_update(name, mine, ref, master, param_dtype, 0 if exact else 4, atol=0 if exact else 1e-6)
    check_update(name + " vs -g", mine, neg, master, param_dtype, 0)


@pytest.mark.parametrize("combo", MAXIMIZE_COMBOS, ids=combo_id)
def test_adam_maximize_matches_reference(update_backend, combo):
    param_dtype, grad_dtype, master = combo
    params, grads, exp_avgs, exp_avg_sqs, masters = adam_inputs(param_dtype, grad_dtype, master)
    mine = {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "master_params": masters}
    ref = {k: clone_all(v) for k, v in mine.items()}
    plain = {k: clone_all(v) for k, v in mine.items()}
    inv = torch.tensor([0.25])
    op = _update_op(update_backend, "mf_adam_")
    product = 1.0
    for step in range(1, 4):
        product *= 0.9
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=step, beta1_product=product, weight_decay=1e-2)
        s, vec = adam_vector(maximize=True, **kw)
        op(params, grads, exp_avgs, exp_avg_sqs, [], masters, vec, inv, None)
        reference.mf_adam_(ref["params"], grads, ref["exp_avgs"], ref["exp_avg_sqs"], [], ref["master_params"], s,
                           inv, None)
        op(plain["params"], grads, plain["exp_avgs"], plain["exp_avg_sqs"], [], plain["master_params"],
           adam_vector(**kw)[1], inv, None)
    check_update(f"{update_backend} mf_adam_ maximize {combo_id(combo)}", mine, ref, master, param_dtype, 4,
                 atol=1e-6)
    assert not torch.equal(_flat(mine["exp_avgs"]), _flat(plain["exp_avgs"])), "maximize changed nothing"


@pytest.mark.parametrize("combo", MAXIMIZE_COMBOS, ids=combo_id)
def test_smega2_maximize_matches_reference(update_backend, combo):
    from fusedmf.functional.scalars import smega2_step_scalars

    param_dtype, grad_dtype, master = combo
    params, grads, bufs, masters = sgd_inputs(param_dtype, grad_dtype, master, True)
    gen = torch.Generator().manual_seed(4)
    accs = [torch.empty_like(p, dtype=F32).copy_(torch.randn(p.shape, generator=gen) * 0.1) for p in params]
    mine = {"params": params, "momentum_buffers": bufs, "grad_accumulators": accs, "master_params": masters}
    ref = {k: clone_all(v) for k, v in mine.items()}
    inv = torch.tensor([0.5])
    op = _update_op(update_backend, "smega2_")
    for step in range(4):  # two workers: the cycle closes on every second step
        s = smega2_step_scalars(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, num_workers=2,
                                cycle=step % 2, maximize=True)
        op(params, grads, bufs, accs, masters, torch.tensor(s.as_list()), inv, None)
        reference.smega2_(ref["params"], grads, ref["momentum_buffers"], ref["grad_accumulators"],
                          ref["master_params"], s, inv, None)
    exact = _exact(update_backend)
    check_update(f"{update_backend} smega2_ maximize {combo_id(combo)}", mine, ref, master, param_dtype,
                 0 if exact else 4, atol=0 if exact else 1e-6)


def amsgrad_grads(params, grad_dtype, steps, seed=7):
    """Per-step grads whose size drops 100-fold after the second step on about half the elements, so
    that v decreases there and AMSGrad's maximum is what the denominator uses."""
    gen = torch.Generator().manual_seed(seed)
    drop = [torch.rand(p.shape, generator=gen) < 0.5 for p in params]
    out = []
    for step in range(steps):
        gs = []
        for p, d in zip(params, drop):
            g = torch.randn(p.shape, generator=gen)
            if step >= 2:
                g = torch.where(d, g * 0.01, g)
            gs.append(torch.empty_like(p, dtype=grad_dtype).copy_(g))  # the param's layout
        out.append(gs)
    return out


AMSGRAD_COMBOS = [(F32, F32, False), (F16, F16, True), (BF16, BF16, True), (BF16, F32, False), (F16, BF16, True)]


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("inv_scale", [None, 0.25], ids=["noscale", "invscale"])
@pytest.mark.parametrize("combo", AMSGRAD_COMBOS, ids=combo_id)
def test_adam_amsgrad_matches_reference(update_backend, combo, inv_scale, maximize):
    param_dtype, grad_dtype, master = combo
    params, _, exp_avgs, exp_avg_sqs, masters = adam_inputs(param_dtype, grad_dtype, master)
    gen = torch.Generator().manual_seed(5)
    # zeros as torch.optim.Adam starts them, and some larger than the first v
    max_sqs = []
    for v in exp_avg_sqs:
        big = torch.rand(v.shape, generator=gen) < 0.3
        max_sqs.append(torch.empty_like(v).copy_(torch.rand(v.shape, generator=gen) * 0.2 * big))
    mine = {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "max_exp_avg_sqs": max_sqs,
            "master_params": masters}
    ref = {k: clone_all(v) for k, v in mine.items()}
    inv = None if inv_scale is None else torch.tensor([inv_scale])
    op = _update_op(update_backend, "mf_adam_")
    steps = amsgrad_grads(params, grad_dtype, 6)
    product = 1.0
    for step, grads in enumerate(steps, start=1):
        product *= 0.9
        s, vec = adam_vector(lr=1e-2, beta1=0.9, beta2=0.9, eps=1e-8, step=step, beta1_product=product,
                             weight_decay=1e-2, decoupled_weight_decay=step % 2 == 0, maximize=maximize)
        op(params, grads, exp_avgs, exp_avg_sqs, max_sqs, masters, vec, inv, None)
        reference.mf_adam_(ref["params"], grads, ref["exp_avgs"], ref["exp_avg_sqs"], ref["max_exp_avg_sqs"],
                           ref["master_params"], s, inv, None)
        check_update(f"{update_backend} mf_adam_ amsgrad {combo_id(combo)} step {step}", mine, ref, master,
                     param_dtype, 4, atol=1e-6)
        # Each step starts from the reference's state: a 16-bit param without master keeps a one-ulp
        # flip (the MKL sqrt's ulp at a rounding boundary) for good, and as the weight shrinks that same
        # difference grows to several ulps of the smaller weight, which is no error of the step.
        for name, tensors in mine.items():
            for t, r in zip(tensors, ref[name]):
                t.copy_(r)
    v, vmax = _flat(exp_avg_sqs), _flat(max_sqs)
    assert (vmax >= v).all()
    assert (vmax > v).float().mean() > 0.3, "the maximum never bit: v did not decrease"


def test_adam_amsgrad_propagates_nan_like_torch_maximum(update_backend):
    params = [torch.randn(37), torch.randn(4, 5)]
    grads = [torch.randn_like(p) for p in params]
    exp_avgs = [torch.randn_like(p) * 0.1 for p in params]
    exp_avg_sqs = [torch.rand_like(p) for p in params]
    max_sqs = [torch.rand_like(p) for p in params]
    max_sqs[0][3] = float("nan")  # the old maximum is NaN
    exp_avg_sqs[1][2, 1] = float("nan")  # the new v is NaN
    mine = {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "max_exp_avg_sqs": max_sqs,
            "master_params": []}
    ref = {k: clone_all(v) for k, v in mine.items()}
    s, vec = adam_vector(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=3, beta1_product=0.729)
    _update_op(update_backend, "mf_adam_")(params, grads, exp_avgs, exp_avg_sqs, max_sqs, [], vec, None, None)
    reference.mf_adam_(ref["params"], grads, ref["exp_avgs"], ref["exp_avg_sqs"], ref["max_exp_avg_sqs"], [], s)
    assert max_sqs[0][3].isnan() and max_sqs[1][2, 1].isnan()
    assert params[0][3].isnan() and params[1][2, 1].isnan()
    check_update(f"{update_backend} mf_adam_ amsgrad nan", mine, ref, False, F32, 4, atol=1e-6)


@pytest.mark.parametrize("combo", [(F32, F32, False), (BF16, F16, True)], ids=combo_id)
def test_adam_amsgrad_found_inf_writes_nothing(update_backend, combo):
    param_dtype, grad_dtype, master = combo
    params, grads, exp_avgs, exp_avg_sqs, masters = adam_inputs(param_dtype, grad_dtype, master)
    max_sqs = clone_all(exp_avg_sqs)
    before = {"params": clone_all(params), "m": clone_all(exp_avgs), "v": clone_all(exp_avg_sqs),
              "vmax": clone_all(max_sqs), "masters": clone_all(masters)}
    _, vec = adam_vector(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=1, beta1_product=0.9, maximize=True)
    _update_op(update_backend, "mf_adam_")(params, grads, exp_avgs, exp_avg_sqs, max_sqs, masters, vec,
                                           torch.tensor([0.5]), torch.tensor([1.0]))
    assert_unchanged(before, {"params": params, "m": exp_avgs, "v": exp_avg_sqs, "vmax": max_sqs, "masters": masters})


def _amsgrad_call():
    params = _params()
    return dict(params=params, grads=clone_all(params), exp_avgs=clone_all(params),
                exp_avg_sqs=[p.abs() for p in params], max_exp_avg_sqs=[p.abs() for p in params], master_params=[],
                scalars=adam_vector(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, step=1, beta1_product=0.9)[1],
                inv_grad_scale=None, found_inf=None)


@pytest.mark.parametrize("case", ["length", "dtype", "mixed_dtype", "shape", "strides", "aliases_exp_avg_sqs",
                                  "aliases_params"])
def test_adam_rejects_bad_max_exp_avg_sqs(update_backend, case):
    a = _amsgrad_call()
    vm = a["max_exp_avg_sqs"]
    if case == "length":
        a["max_exp_avg_sqs"] = vm[:3]
        want = (ValueError, "max_exp_avg_sqs has 3 tensors but params has 4", "must be empty")
    elif case == "dtype":
        a["max_exp_avg_sqs"] = [t.half() for t in vm]
        want = (TypeError, "max_exp_avg_sqs[0] has dtype float16", "must be float32")
    elif case == "mixed_dtype":
        vm[2] = vm[2].double()
        want = (TypeError, "max_exp_avg_sqs[2] has dtype float64 but max_exp_avg_sqs[0] has dtype float32")
    elif case == "shape":
        vm[1] = torch.rand(4, 5)
        want = (ValueError, "max_exp_avg_sqs[1] has shape [4, 5] but params[1] has shape [5, 4]")
    elif case == "strides":
        vm[1] = torch.rand(4, 5).t()
        want = (ValueError, "max_exp_avg_sqs[1] has strides [1, 5] but params[1] has strides [4, 1]")
    elif case == "aliases_exp_avg_sqs":
        vm[3] = a["exp_avg_sqs"][3]
        want = (ValueError, "max_exp_avg_sqs[3] and exp_avg_sqs[3] are the same memory")
    else:
        vm[0] = a["params"][0]
        want = (ValueError, "max_exp_avg_sqs[0] and params[0] are the same memory")
    expect_rejected(_update_op(update_backend, "mf_adam_"), a, *want)


def test_smega2_slot_layout_matches_python_slots_by_name():
    from fusedmf.functional.scalars import SMEGA2_SLOTS

    assert C.SMEGA2_NUM_SCALARS == len(SMEGA2_SLOTS)
    assert dict(C.SMEGA2_SLOT_INDEX) == {name: i for i, name in enumerate(SMEGA2_SLOTS)}


@pytest.mark.parametrize("driver", [13000, 12000], ids=["args32k", "args4k"])
@pytest.mark.parametrize("combo", [(F32, F32, False), (BF16, F16, True), (F16, F32, False)], ids=combo_id)
def test_cuda_adam_amsgrad_matches_cpu_kernels(gpu, combo, driver):
    """AMSGrad's six-list launches (several of them: more tensors and chunks than one launch holds,
    with 32 KiB or 4 KiB of kernel arguments), on the vector, unaligned and tail paths, maximizing:
    bit for bit the CPU kernels' results."""
    if gpu.kind == "cuda_emu":
        before = C._cuda_emu_driver_version()
        C._cuda_emu_set_driver_version(driver)
    elif driver != 13000:
        pytest.skip("a real driver's version cannot be chosen")
    try:
        param_dtype, grad_dtype, master = combo
        gen = torch.Generator().manual_seed(11)
        params = _launcher_zoo(param_dtype)
        grads = _views_like(params, grad_dtype, gen)
        cpu = {"params": clone_all(params), "exp_avgs": _views_like(params, F32, gen, 0.1),
               "exp_avg_sqs": _views_like(params, F32, gen, 0.1, positive=True),
               "max_exp_avg_sqs": _views_like(params, F32, gen, 0.1, positive=True),
               "master_params": [p.to(F32) for p in params] if master else []}
        dev = {k: _to(v, gpu.device, True) for k, v in cpu.items()}
        grads_dev = _to(grads, gpu.device, True)
        inv = torch.tensor([0.5])
        for step in (1, 2):
            _, vec = adam_vector(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=step, beta1_product=0.9**step,
                                 weight_decay=0.1, maximize=True)
            K.mf_adam_(cpu["params"], grads, cpu["exp_avgs"], cpu["exp_avg_sqs"], cpu["max_exp_avg_sqs"],
                       cpu["master_params"], vec, inv, None)
            gpu.mf_adam_(dev["params"], grads_dev, dev["exp_avgs"], dev["exp_avg_sqs"], dev["max_exp_avg_sqs"],
                         dev["master_params"], vec.to(gpu.device), inv.to(gpu.device), None)
        exact = C._cpu_capability() == "avx2"
        check_update(f"{gpu.kind} mf_adam_ amsgrad {combo_id(combo)}", {k: _to(v, "cpu", False) for k, v in dev.items()},
                     cpu, master, param_dtype, 0 if exact else 4, atol=0 if exact else 1e-6)
    finally:
        if gpu.kind == "cuda_emu":
            C._cuda_emu_set_driver_version(before)
