"""SMEGA2 (docs/algorithms.md): the master step and the look-ahead estimate on every backend.

- The step and estimate() follow the equations over 2N+3 master steps (both estimate modes, with
  and without dampening and weight decay, a constant and a scheduled MF), against an independent
  float64 implementation written here from the equations (not from fusedmf's reference).
- Every backend matches the reference backend: bit for bit for the CPU kernels in fp32 (the same
  roundings, NOTE [fma placement]); within a few fp32 ulps where a backend may fuse differently.
- fp16/bf16 params with fp32 masters: within twice the error of the low-precision path without
  masters (the reference code's SMEGA2 run in the params' dtype), as MFSGD earns against torch.
- Overflow: found_inf set writes nothing and s does not advance; state_dict round trip; bad input
  errors before anything changes.
"""

import copy

import pytest
import torch

import fusedmf
import fusedmf.functional as F
from fusedmf import SMEGA2
from fusedmf.optim import SMEGA2 as SMEGA2_from_optim

from conftest import require_backend
from _util import assert_bit_identical, assert_close_ulps, max_abs_err

SHAPES = [(1,), (4097,), (13, 57), (0,), (6, 5, 3, 3)]
STATE_KEYS = ("momentum_buffer", "grad_accumulator")


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        if len(shape) == 4:
            p = p.contiguous(memory_format=torch.channels_last)
        out.append(p.requires_grad_())
    return out


def worker_grads(shapes, step, dtype=torch.float32, scale=1.0):
    """The gradient of master step `step` (one worker's), deterministic, rounded to `dtype`."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype) for shape in shapes]


def set_grads(params, grads):
    """p.grad = g in the param's dtype and layout (grads of other dtypes go through step(grads=))."""
    for p, g in zip(params, grads):
        p.grad = torch.empty_like(p).copy_(g)


class Equations:
    """SMEGA2 written from the equations (docs/algorithms.md), in float64, one param list."""

    def __init__(self, thetas, *, lr, num_workers, gamma, dampening, weight_decay, estimate):
        self.theta = [t.detach().double().clone() for t in thetas]
        self.v = [torch.zeros_like(t) for t in self.theta]
        self.G = [torch.zeros_like(t) for t in self.theta]
        self.s, self.t = 0, 0
        self.lr, self.N, self.gamma, self.tau, self.wd, self.mode = (lr, num_workers, gamma, dampening,
                                                                     weight_decay, estimate)

    def step(self, grads):
        self.t += 1
        gamma = self.gamma(self.t)
        self.s = (self.s + 1) % self.N
        for i, grad in enumerate(grads):
            g = grad.double() + self.wd * self.theta[i]
            self.G[i] = self.G[i] + g
            d = g + gamma * self.v[i]
            if self.s == 0:
                self.v[i] = gamma * self.v[i] + (1 - self.tau) / self.N * self.G[i]
                self.G[i] = torch.zeros_like(self.G[i])
            self.theta[i] = self.theta[i] - self.lr * d

    def estimate(self):
        gamma, eta, N, s = self.gamma(self.t + 1), self.lr, self.N, self.s  # the γ of the coming step
        if self.mode == "naive":
            return [th - eta * gamma * N * v for th, v in zip(self.theta, self.v)]
        return [th - eta * gamma * (s / N) * G - eta * gamma * (N + s * (gamma - 1)) * v
                for th, G, v in zip(self.theta, self.G, self.v)]


MFS = [0.9, 0.5, 0.95, 0.7]
CONFIGS = {
    "plain": dict(dampening=0.0, weight_decay=0.0),
    "damp_wd": dict(dampening=0.3, weight_decay=1e-2),
    "schedule_damp_wd": dict(dampening=0.1, weight_decay=1e-2, mf_schedule=lambda t: MFS[(t - 1) % len(MFS)]),
}


def _gamma_of(kwargs):
    schedule = kwargs.get("mf_schedule")
    return schedule if schedule is not None else (lambda t: kwargs.get("momentum", 0.9))


@pytest.mark.parametrize("num_workers", [1, 3, 4])
@pytest.mark.parametrize("estimate", ["advanced", "naive"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend_dtype", [("reference", torch.float64), ("reference", torch.float32),
                                           ("cpu", torch.float32)], ids=["reference-f64", "reference-f32", "cpu"])
def test_step_and_estimate_follow_the_equations(backend_dtype, config, estimate, num_workers):
    name, dtype = backend_dtype
    if name != "reference":
        require_backend(name)
    kwargs = dict(CONFIGS[config])
    params = make_params(SHAPES, dtype)
    spec = Equations(params, lr=0.05, num_workers=num_workers, gamma=_gamma_of(kwargs),
                     dampening=kwargs["dampening"], weight_decay=kwargs["weight_decay"], estimate=estimate)
    opt = SMEGA2(params, lr=0.05, num_workers=num_workers, estimate=estimate, backend=name, **kwargs)
    if dtype == torch.float64:  # the same equations, in float64: only the order of roundings differs
        close = dict(rtol=1e-12, atol=1e-12)
    else:  # fp32 against float64 over at most 11 steps: tens of fp32 ulps of accumulated rounding
        close = dict(rtol=2e-6 * (2 * num_workers + 3), atol=2e-6 * (2 * num_workers + 3))
    # the look-ahead of fresh params is the params themselves
    for e, q in zip(opt.estimate(), spec.estimate()):
        torch.testing.assert_close(e.double(), q, **close)
    for step in range(2 * num_workers + 3):
        grads = worker_grads(SHAPES, step)
        set_grads(params, grads)
        opt.step()
        spec.step(grads)
        assert opt.backends_used == {name: len(SHAPES)}
        estimates = opt.estimate()
        for i, p in enumerate(params):
            state = opt.state[p]
            assert state["step"] == step + 1 and state["cycle"] == spec.s, (i, state["step"], state["cycle"])
            where = f"step {step + 1}, param {i}"
            torch.testing.assert_close(p.detach().double(), spec.theta[i], **close, msg=lambda m: f"{where}: {m}")
            torch.testing.assert_close(state["momentum_buffer"].double(), spec.v[i], **close,
                                       msg=lambda m: f"{where} v: {m}")
            torch.testing.assert_close(state["grad_accumulator"].double(), spec.G[i], **close,
                                       msg=lambda m: f"{where} G: {m}")
            assert estimates[i].dtype == p.dtype and estimates[i].shape == p.shape
            torch.testing.assert_close(estimates[i].double(), spec.estimate()[i], **close,
                                       msg=lambda m: f"{where} estimate: {m}")
    # the rule refreshed v at least twice and G is back to 0 exactly at the end of each cycle
    assert any(v.abs().sum() > 0 for v in spec.v)


def test_importable_from_both_places():
    assert fusedmf.SMEGA2 is SMEGA2_from_optim is SMEGA2
    assert callable(F.smega2) and callable(F.smega2_estimate)


# ---------------------------------------------------------------------------------------------
# every backend against the reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (param dtype, grad dtype, master_weights)
COMBOS = [("fp32", "fp32", None), ("fp32", "fp16", None), ("bf16", "bf16", None), ("fp16", "fp16", None),
          ("bf16", "fp32", None), ("fp16", "fp16", False)]
# 70001 elements: more than one piece of the CPU work split (NOTE [cpu work split]) and several
# Triton blocks; many small tensors with an empty last one
MATCH_SHAPES = SHAPES + [(70001,)] + [(33,)] * 5 + [(5, 0)]
GRAD_SCALE = 1024.0  # a power of two: unscaling inside the kernel is exact


def _run(backend, device, combo, estimate, num_workers=3, steps=None, mf_schedule=None):
    pdt, gdt, master = DTYPES[combo[0]], DTYPES[combo[1]], combo[2]
    params = make_params(MATCH_SHAPES, pdt, device)
    opt = SMEGA2(params, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, num_workers=num_workers,
                 estimate=estimate, master_weights=master, backend=backend, mf_schedule=mf_schedule)
    looks = []
    for step in range(steps or 2 * num_workers + 3):
        grads = {id(p): g.to(device) for p, g in zip(params, worker_grads(MATCH_SHAPES, step, gdt, GRAD_SCALE))}
        opt.step(grads=lambda p: grads[id(p)], grad_scale=GRAD_SCALE)
        worker_copy = [torch.full_like(p, 7.0) for p in params]  # written in place, in the params' dtype
        returned = opt.estimate(out=worker_copy)
        assert all(a is b for a, b in zip(returned, worker_copy))
        looks.append([e.cpu() for e in opt.estimate(out=[torch.empty_like(p, dtype=torch.float32)
                                                         for p in params])] + [e.cpu() for e in worker_copy])
    assert opt.backends_used == {backend: len(MATCH_SHAPES)}
    states = {key: [opt.state[p][key].cpu() for p in params] for key in STATE_KEYS}
    if pdt != torch.float32 and master is not False:
        states["master_param"] = [opt.state[p]["master_param"].cpu() for p in params]
    return [p.detach().cpu() for p in params], states, looks, opt


def _assert_matches(name, actual, expected, what, weights_dtype=torch.float32):
    """`weights_dtype`: what the update reads as the weight (fp32 with masters)."""
    if name == "cpu":  # the same roundings in the same order (NOTE [fma placement])
        assert_bit_identical(actual, expected, what)
    elif weights_dtype != torch.float32:
        # the weight itself is fp16/bf16: a few fp32 ulps of one update can flip its rounding, and
        # that low-precision ulp of the weight then reaches every later value (the estimate is
        # about the weight; G and v see it through weight decay)
        lp_eps = torch.finfo(weights_dtype).eps
        torch.testing.assert_close(actual.float(), expected.float(), rtol=lp_eps,
                                   atol=lp_eps * float(expected.float().abs().mean()) if expected.numel() else 0.0,
                                   msg=lambda m: f"{what}: {m}")
    elif actual.dtype == torch.float32:
        # cuda: bit for bit by construction, checked here within a few ulps until a GPU run confirms
        # it; triton under the interpreter rounds tl.fma twice (triton_kernels/smega2.py)
        assert_close_ulps(actual, expected, ulps=8, name=what)
    else:  # one low-precision ulp at most (a few fp32 ulps can flip a rounding boundary)
        lp_eps = torch.finfo(actual.dtype).eps
        torch.testing.assert_close(actual.float(), expected.float(), rtol=lp_eps, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("estimate", ["advanced", "naive"])
@pytest.mark.parametrize("combo", COMBOS, ids=[f"p{a}-g{b}{'-nomaster' if m is False else ''}" for a, b, m in COMBOS])
def test_every_backend_matches_the_reference(fused_backend, combo, estimate):
    name, device = fused_backend
    ours = _run(name, device, combo, estimate)
    ref = _run("reference", "cpu", combo, estimate)
    weights = DTYPES[combo[0]] if combo[2] is False else torch.float32
    for i, (a, b) in enumerate(zip(ours[0], ref[0])):
        _assert_matches(name, a, b, f"params[{i}]", weights)
    for key in ref[1]:
        for i, (a, b) in enumerate(zip(ours[1][key], ref[1][key])):
            _assert_matches(name, a, b, f"{key}[{i}]", weights)
    for step, (xs, ys) in enumerate(zip(ours[2], ref[2])):
        for i, (a, b) in enumerate(zip(xs, ys)):
            _assert_matches(name, a, b, f"estimate {i} after step {step + 1}", weights)


@pytest.mark.parametrize("combo", [("fp16", "fp16", None), ("fp32", "fp32", None)], ids=["fp16-master", "fp32"])
def test_estimate_into_low_precision_copy_is_the_cast_of_the_fp32_estimate(backend, combo):
    name, device = backend
    params, _, looks, opt = _run(name, device, combo, "advanced", steps=4)
    half = len(MATCH_SHAPES)
    for i in range(half):  # worker copy (params' dtype) == the fp32 estimate rounded once
        assert_bit_identical(looks[-1][half + i], looks[-1][i].to(params[i].dtype), f"estimate {i}")


# ---------------------------------------------------------------------------------------------
# fp16/bf16 params with fp32 masters


class PaperSMEGA2:
    """The reference code's SMEGA2.step (github.com/rafi-cohen/SMEGA2, smega2.py), on tensors of the
    params' own dtype: the low-precision path without masters that the masters must beat."""

    def __init__(self, params, *, lr, num_workers, momentum, dampening, weight_decay):
        self.params = params
        self.v = [torch.zeros_like(p) for p in params]
        self.G = [torch.zeros_like(p) for p in params]
        self.s = 0
        self.lr, self.N, self.momentum, self.dampening, self.wd = lr, num_workers, momentum, dampening, weight_decay

    @torch.no_grad()
    def step(self, grads):
        self.s = (self.s + 1) % self.N
        for p, g, v, G in zip(self.params, grads, self.v, self.G):
            d_p = g.to(p.dtype).add(p, alpha=self.wd)
            G.add_(d_p)
            d_p = d_p.add(v, alpha=self.momentum)
            if self.s == 0:
                v.mul_(self.momentum).add_(G, alpha=(1 - self.dampening) / self.N)
                G.zero_()
            p.add_(d_p, alpha=-self.lr)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_masters_within_twice_the_low_precision_error(backend, dtype):
    name, device = backend
    shapes, steps, hyper = [(1,), (4097,), (13, 57), (0,)], 24, dict(lr=0.05, momentum=0.9, dampening=0.0,
                                                                     weight_decay=1e-4)
    ours = make_params(shapes, dtype, device)
    theirs = [p.detach().cpu().clone() for p in ours]
    spec = Equations(ours, lr=hyper["lr"], num_workers=4, gamma=lambda t: hyper["momentum"],
                     dampening=hyper["dampening"], weight_decay=hyper["weight_decay"], estimate="advanced")
    opt = SMEGA2(ours, num_workers=4, backend=name, **hyper)
    paper = PaperSMEGA2(theirs, num_workers=4, **hyper)
    for step in range(steps):
        grads = worker_grads(shapes, step, dtype)
        set_grads(ours, grads)
        opt.step()
        paper.step(grads)
        spec.step(grads)
    assert opt.backends_used == {name: len(shapes)}
    err_ours = max(max_abs_err(p.cpu(), q) for p, q in zip(ours, spec.theta))
    err_low = max(max_abs_err(p, q) for p, q in zip(theirs, spec.theta))
    assert err_low > 0, "the low-precision path should show rounding error"
    assert err_ours <= 2 * err_low, f"masters error {err_ours:.3g} > 2 x low-precision error {err_low:.3g}"
    for i, (p, q) in enumerate(zip(ours, spec.theta)):
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32 and opt.state[p]["momentum_buffer"].dtype == torch.float32
        # fp32 against float64 after 24 steps: a few hundred fp32 ulps of accumulated rounding at most
        torch.testing.assert_close(master.double().cpu(), q, rtol=3e-5, atol=3e-6, msg=lambda m: f"master {i}: {m}")
        assert torch.equal(p.detach(), master.to(dtype)), f"param {i} is not the cast of its master"


# ---------------------------------------------------------------------------------------------
# overflow, checkpoints


def _snapshot(opt, params):
    """(params, per-param state) copied."""
    return [p.detach().clone() for p in params], [{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                                   for k, v in opt.state[p].items()} for p in params]


def _assert_same_snapshot(a, b):
    for i, (x, y) in enumerate(zip(a[0], b[0])):
        assert_bit_identical(x, y, f"params[{i}]")
    for i, (sx, sy) in enumerate(zip(a[1], b[1])):
        assert sx.keys() == sy.keys()
        for k in sx:
            if isinstance(sx[k], torch.Tensor):
                assert_bit_identical(sx[k], sy[k], f"state[{i}][{k}]")
            else:
                assert sx[k] == sy[k], (i, k, sx[k], sy[k])


@pytest.mark.parametrize("skip_at", [0, 2], ids=["first_step", "cycle_end"])
def test_overflow_skip_writes_nothing_and_keeps_the_cycle(backend, skip_at):
    name, device = backend
    shapes = [(1,), (4097,), (0,), (3, 8, 5)]
    schedule = lambda t: MFS[(t - 1) % len(MFS)]  # noqa: E731  (the clock must not advance on a skip)

    def run(skip):
        params = make_params(shapes, torch.float16, device)
        opt = SMEGA2(params, lr=0.05, num_workers=3, weight_decay=1e-2, dampening=0.1, mf_schedule=schedule,
                     backend=name)
        history = []
        for step in range(7):
            if skip and step == skip_at:
                set_grads(params, worker_grads(shapes, 99, torch.float16))
                opt.estimate()  # creates the state of fresh params, so the first step is comparable too
                before = _snapshot(opt, params)
                opt.step(grad_scale=GRAD_SCALE, found_inf=torch.ones((), device=device))
                assert opt.last_step_skipped is True
                _assert_same_snapshot(_snapshot(opt, params), before)
            set_grads(params, [g * GRAD_SCALE for g in worker_grads(shapes, step, torch.float16)])
            opt.step(grad_scale=GRAD_SCALE, found_inf=torch.zeros((), device=device))
            assert opt.last_step_skipped is False
            history.append(_snapshot(opt, params))
        return history

    for step, (a, b) in enumerate(zip(run(True), run(False))):
        for i, (x, y) in enumerate(zip(a[0], b[0])):
            assert_bit_identical(x, y, f"params[{i}] after step {step + 1}")
        for i, (sx, sy) in enumerate(zip(a[1], b[1])):
            assert sx["step"] == sy["step"] == step + 1 and sx["cycle"] == sy["cycle"] == (step + 1) % 3
            for key in STATE_KEYS + ("master_param",):
                assert_bit_identical(sx[key], sy[key], f"{key}[{i}] after step {step + 1}")


def test_state_dict_round_trip(backend):
    import io

    name, device = backend
    shapes = [(4097,), (13, 57), (0,)]

    params = make_params(shapes, torch.bfloat16, device)
    opt = SMEGA2(params, lr=0.05, num_workers=4, weight_decay=1e-2, backend=name)
    for step in range(5):  # cycle position 1 after 5 steps of N = 4
        set_grads(params, worker_grads(shapes, step, torch.bfloat16))
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)

    clones = [p.detach().clone().requires_grad_() for p in params]
    opt2 = SMEGA2(clones, lr=0.05, num_workers=4, weight_decay=1e-2, backend=name)
    opt2.load_state_dict(loaded)
    for p, q in zip(params, clones):
        assert opt2.state[q]["cycle"] == 1 and opt2.state[q]["step"] == 5
        for key in STATE_KEYS + ("master_param",):
            assert opt2.state[q][key].dtype == torch.float32, key  # not cast to the params' bf16
            assert_bit_identical(opt2.state[q][key], opt.state[p][key], key)
    for a, b in zip(opt.estimate(), opt2.estimate()):
        assert_bit_identical(a, b, "estimate after loading")
    for step in range(5, 10):
        grads = worker_grads(shapes, step, torch.bfloat16)
        set_grads(params, grads)
        set_grads(clones, grads)
        opt.step()
        opt2.step()
    for i, (p, q) in enumerate(zip(params, clones)):
        assert_bit_identical(p.detach(), q.detach(), f"params[{i}] after the round trip")
        for key in STATE_KEYS:
            assert_bit_identical(opt.state[p][key], opt2.state[q][key], f"{key}[{i}]")


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, raised before anything is modified


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_workers=0), "num_workers"), (dict(num_workers=2.0), "num_workers"),
    (dict(num_workers=True), "num_workers"), (dict(num_workers=None), "num_workers"),
    (dict(num_workers=2, estimate="fast"), "estimate"), (dict(num_workers=2, lr=-0.1), "lr"),
    (dict(num_workers=2, momentum=1.0), "momentum"), (dict(num_workers=2, weight_decay=-1.0), "weight_decay"),
    (dict(num_workers=2, dampening=float("nan")), "dampening"), (dict(num_workers=2, backend="gpu"), "backend"),
], ids=lambda x: str(x) if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()))
def test_bad_arguments_are_rejected_at_construction(kwargs, match):
    kwargs = dict(dict(lr=0.1), **kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        SMEGA2(make_params([(3,)]), **kwargs)


def test_num_workers_is_required():
    with pytest.raises(TypeError, match="num_workers"):
        SMEGA2(make_params([(3,)]), lr=0.1)


def test_bad_grad_raises_before_any_state_exists(backend):
    name, device = backend
    params = make_params([(4,), (3, 5)], device=device)
    before = [p.detach().clone() for p in params]
    opt = SMEGA2(params, lr=0.1, num_workers=2, backend=name)
    params[0].grad = torch.ones(4, device=device)
    params[1].grad = None
    opt.step()  # param 1 without a grad is left alone, as torch does
    mid = _snapshot(opt, params)
    grads = {id(params[0]): torch.ones(4, device=device), id(params[1]): torch.ones(3, 4, device=device)}
    with pytest.raises(RuntimeError, match=r"grad of param 1 of param group 0 has shape \[3, 4\]"):
        opt.step(grads=lambda p: grads[id(p)])
    _assert_same_snapshot(_snapshot(opt, params), mid)
    assert opt.state[params[0]]["cycle"] == 1 and not opt.state.get(params[1])
    assert torch.equal(params[1].detach(), before[1])


@pytest.mark.parametrize("case", ["count", "shape", "dtype", "overlapping", "device", "is_param", "is_state",
                                  "not_a_list"])
def test_bad_estimate_out_raises_before_anything_is_written(backend, case):
    name, device = backend
    params = make_params([(4,), (3, 5)], device=device)
    opt = SMEGA2(params, lr=0.1, num_workers=2, backend=name)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    out = [torch.full_like(p, 7.0) for p in params]
    match = {"count": "out has 1 tensors", "shape": r"out\[1\] has shape", "dtype": r"out\[1\] has dtype",
             "overlapping": r"out\[1\] \(strides \[0, 1\]\) has elements that share memory",
             "device": r"out\[1\] is on", "is_param": r"out\[1\] is one of",
             "is_state": r"out\[1\] is the memory of its param or of the param's state",
             "not_a_list": "must be a list"}[case]
    bad = list(out)
    if case == "count":
        bad = out[:1]
    elif case == "shape":
        bad[1] = torch.full((15,), 7.0, device=device)
    elif case == "dtype":
        bad[1] = torch.full((3, 5), 7, dtype=torch.int32, device=device)
    elif case == "overlapping":
        bad[1] = torch.full((1, 5), 7.0, device=device).expand(3, 5)
    elif case == "device":
        bad[1] = torch.full((3, 5), 7.0, device="meta")
    elif case == "is_param":
        bad[1] = params[1]
    elif case == "is_state":
        bad[1] = opt.state[params[1]]["grad_accumulator"]
    elif case == "not_a_list":
        bad = out[0]
    snapshot = _snapshot(opt, params)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.estimate(out=bad)
    _assert_same_snapshot(_snapshot(opt, params), snapshot)
    for o in out:
        assert bool((o == 7.0).all()), "out was written before the error"


def _op_args(device, n=2, pdt=torch.float16):
    gen = torch.Generator().manual_seed(3)
    shapes = [(5,), (4, 3)][:n]
    params = [torch.randn(s, generator=gen).to(device=device, dtype=pdt) for s in shapes]
    return dict(params=params, grads=[torch.randn(s, generator=gen).to(device=device, dtype=pdt) for s in shapes],
                momentum_buffers=[torch.randn(s, generator=gen).to(device) for s in shapes],
                grad_accumulators=[torch.randn(s, generator=gen).to(device) for s in shapes],
                master_params=[p.float() for p in params])


def _op(name):
    if name == "triton":
        return fusedmf._backends.triton_module()[0]
    return torch.ops.fusedmf


OP_CASES = {
    "accumulator_dtype": (lambda a: a["grad_accumulators"].__setitem__(1, a["grad_accumulators"][1].half()),
                          r"grad_accumulators\[1\] has dtype"),
    "momentum_count": (lambda a: a["momentum_buffers"].pop(), "momentum_buffers has 1 tensors"),
    "master_shape": (lambda a: a["master_params"].__setitem__(1, torch.zeros(12, device=a["params"][0].device)),
                     r"master_params\[1\] has shape"),
    "grad_dtype_mixed": (lambda a: a["grads"].__setitem__(1, a["grads"][1].float()), r"grads\[1\] has dtype"),
    "accumulator_is_momentum": (lambda a: a["grad_accumulators"].__setitem__(0, a["momentum_buffers"][0]),
                                r"\[0\] and .*\[0\] are the same memory"),
    "scalars_length": (None, "scalars"),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_kernel_validation_names_the_tensor_and_writes_nothing(fused_backend, case):
    from fusedmf.functional.scalars import SMEGA2_NUM_SCALARS, smega2_step_scalars

    name, device = fused_backend
    args = _op_args(device)
    mutate, match = OP_CASES[case]
    scalars = torch.tensor(smega2_step_scalars(lr=0.1, momentum=0.9, num_workers=1, cycle=0).as_list(),
                           device=device)
    if mutate is None:
        scalars = torch.zeros(SMEGA2_NUM_SCALARS + 1, device=device)
    else:
        mutate(args)
    snapshot = {k: [t.clone() for t in v] for k, v in args.items()}
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        _op(name).smega2_(args["params"], args["grads"], args["momentum_buffers"], args["grad_accumulators"],
                          args["master_params"], scalars, None, None)
    for key, tensors in args.items():
        for i, (t, s) in enumerate(zip(tensors, snapshot[key])):
            assert_bit_identical(t, s, f"{key}[{i}]")


@pytest.mark.parametrize("case", ["out_is_master", "out_dtype", "scalars_length"])
def test_estimate_kernel_validation(fused_backend, case):
    from fusedmf.functional.scalars import SMEGA2_ESTIMATE_NUM_SCALARS

    name, device = fused_backend
    a = _op_args(device)
    out = [torch.full_like(p, 7.0) for p in a["params"]]
    scalars = torch.zeros(SMEGA2_ESTIMATE_NUM_SCALARS, device=device)
    match = {"out_is_master": r"out\[1\] and master_params\[1\] are the same memory",
             "out_dtype": r"out\[0\] has dtype", "scalars_length": "scalars"}[case]
    if case == "out_is_master":  # an fp32 estimate written over the master would corrupt the state
        out = [torch.full_like(m, 7.0) for m in a["master_params"][:1]] + a["master_params"][1:]
    elif case == "out_dtype":
        out = [o.to(torch.int32) for o in out]
    else:
        scalars = torch.zeros(SMEGA2_ESTIMATE_NUM_SCALARS + 1, device=device)
    keep = [o.clone() for o in out]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        _op(name).smega2_estimate_(a["params"], a["momentum_buffers"], a["grad_accumulators"], a["master_params"],
                                   out, scalars)
    for i, (o, k) in enumerate(zip(out, keep)):
        assert_bit_identical(o, k, f"out[{i}]")


def test_functional_checks_cycle_and_estimate_mode():
    a = _op_args("cpu", pdt=torch.float32)
    with pytest.raises(ValueError, match="cycle"):
        F.smega2(a["params"], a["grads"], a["momentum_buffers"], a["grad_accumulators"], lr=0.1, momentum=0.9,
                 num_workers=2, cycle=2, backend="reference")
    with pytest.raises(ValueError, match="estimate"):
        F.smega2_estimate(a["params"], a["momentum_buffers"], a["grad_accumulators"], a["params"], lr=0.1,
                          momentum=0.9, num_workers=2, cycle=0, estimate="fast", backend="reference")


# ---------------------------------------------------------------------------------------------
# ops: schemas, fake kernels, slot layouts


def test_ops_are_registered_with_mutation_annotations():
    require_backend("cpu")
    schema = str(torch.ops.fusedmf.smega2_.default._schema)
    for arg in ("Tensor(a!)[] params", "Tensor[] grads", "Tensor(b!)[] momentum_buffers",
                "Tensor(c!)[] grad_accumulators", "Tensor(d!)[] master_params"):
        assert arg in schema, schema
    assert "Tensor(a!)[] out" in str(torch.ops.fusedmf.smega2_estimate_.default._schema)


def test_fake_kernels_validate_and_write_nothing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    require_backend("cpu")
    from fusedmf.functional.scalars import SMEGA2_ESTIMATE_NUM_SCALARS, SMEGA2_NUM_SCALARS

    with FakeTensorMode():
        a = _op_args("cpu")
        torch.ops.fusedmf.smega2_(a["params"], a["grads"], a["momentum_buffers"], a["grad_accumulators"],
                                  a["master_params"], torch.zeros(SMEGA2_NUM_SCALARS), None, torch.zeros(1))
        torch.ops.fusedmf.smega2_estimate_(a["params"], a["momentum_buffers"], a["grad_accumulators"],
                                           a["master_params"], [torch.empty_like(p) for p in a["params"]],
                                           torch.zeros(SMEGA2_ESTIMATE_NUM_SCALARS))
        a["grad_accumulators"][1] = torch.zeros(7)
        with pytest.raises(ValueError, match=r"grad_accumulators\[1\] has shape"):
            torch.ops.fusedmf.smega2_(a["params"], a["grads"], a["momentum_buffers"], a["grad_accumulators"],
                                      a["master_params"], torch.zeros(SMEGA2_NUM_SCALARS), None, None)


def test_opcheck_schema_and_fake_tensor():
    require_backend("cpu")
    from fusedmf.functional.scalars import SMEGA2_NUM_SCALARS, smega2_step_scalars

    a = _op_args("cpu")
    scalars = torch.tensor(smega2_step_scalars(lr=0.1, momentum=0.9, num_workers=2, cycle=0).as_list())
    assert scalars.numel() == SMEGA2_NUM_SCALARS
    torch.library.opcheck(torch.ops.fusedmf.smega2_.default,
                          (a["params"], a["grads"], a["momentum_buffers"], a["grad_accumulators"],
                           a["master_params"], scalars, None, None),
                          test_utils=("test_schema", "test_faketensor"))


# Each slot holds its own value (the flags set one at a time), so a kernel that reads any slot at
# another index than SMEGA2_SLOTS / SMEGA2_ESTIMATE_SLOTS say computes something else. The expected
# values come from the scalars by name, in float64, not from any backend.
SLOT_VALUES = dict(lr=0.125, momentum=0.75, momentum_scale=0.375, l2_weight_decay=0.0625)


@pytest.mark.parametrize("cycle_end, maximize", [(1.0, 0.0), (0.0, 1.0)], ids=["cycle_end", "maximize"])
def test_kernels_read_each_slot_the_layout_names(fused_backend, cycle_end, maximize):
    name, device = fused_backend
    from fusedmf.functional.scalars import (SMEGA2_ESTIMATE_SLOTS, SMEGA2_SLOTS, SMEGA2EstimateScalars,
                                            SMEGA2StepScalars)

    assert len(set(SLOT_VALUES.values())) == len(SLOT_VALUES)  # distinct: a swap of any two shows
    step = SMEGA2StepScalars(**SLOT_VALUES, cycle_end=cycle_end, maximize=maximize, next_cycle=0)
    vec = step.as_list()
    assert [vec[SMEGA2_SLOTS.index(k)] for k in SLOT_VALUES] == list(SLOT_VALUES.values())
    a = _op_args(device)
    w, g, v, acc = ([t.detach().double().cpu() for t in a[k]]
                    for k in ("master_params", "grads", "momentum_buffers", "grad_accumulators"))
    _op(name).smega2_(a["params"], a["grads"], a["momentum_buffers"], a["grad_accumulators"], a["master_params"],
                      torch.tensor(vec, device=device), None, None)
    lr, mf, ms, l2 = SLOT_VALUES.values()
    for i in range(len(w)):
        gi = (-g[i] if maximize else g[i]) + l2 * w[i]
        acc_i = acc[i] + gi
        d = gi + mf * v[i]
        v_i = mf * v[i] + ms * acc_i if cycle_end else v[i]
        acc_i = torch.zeros_like(acc_i) if cycle_end else acc_i
        w_i = w[i] - lr * d
        close = dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a["master_params"][i].double().cpu(), w_i, **close)
        torch.testing.assert_close(a["params"][i].double().cpu(), w_i.half().double(), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(a["momentum_buffers"][i].double().cpu(), v_i, **close)
        torch.testing.assert_close(a["grad_accumulators"][i].double().cpu(), acc_i, **close)
    # the estimate: two coefficients, distinct
    est = SMEGA2EstimateScalars(accumulator_coef=-0.3, momentum_coef=-0.7)
    assert est.as_list()[SMEGA2_ESTIMATE_SLOTS.index("accumulator_coef")] == -0.3
    b = _op_args(device)
    out = [torch.full_like(m, 7.0) for m in b["master_params"]]
    _op(name).smega2_estimate_(b["params"], b["momentum_buffers"], b["grad_accumulators"], b["master_params"], out,
                               torch.tensor(est.as_list(), device=device))
    for i, o in enumerate(out):
        want = (b["master_params"][i].double() - 0.3 * b["grad_accumulators"][i].double()
                - 0.7 * b["momentum_buffers"][i].double()).cpu()
        torch.testing.assert_close(o.double().cpu(), want, rtol=1e-6, atol=1e-6)


def test_estimate_into_buffers_of_another_layout_or_float64(backend):
    """Buffers of another layout than their param (contiguous views into a flat send buffer for a
    channels_last param, a column-major one for a row-major param) and float64 buffers get the same
    look-ahead as the default buffers."""
    name, device = backend
    shapes = [(6, 5, 3, 3), (7, 4), (4097,)]  # make_params makes the 4-D param channels_last
    params = make_params(shapes, device=device)
    opt = SMEGA2(params, lr=0.05, num_workers=3, weight_decay=1e-2, backend=name)
    for step in range(4):
        set_grads(params, worker_grads([tuple(p.shape) for p in params], step))
        opt.step()
    expected = opt.estimate()
    flat = torch.full((sum(p.numel() for p in params),), 7.0, device=device)
    views, at = [], 0
    for p in params:
        piece = flat[at:at + p.numel()]
        views.append(piece.view(p.shape[::-1]).t() if p.dim() == 2 else piece.view(p.shape))
        at += p.numel()
    assert not views[0].is_contiguous(memory_format=torch.channels_last) and views[1].stride() == (1, 7)
    opt.estimate(out=views)
    wide = opt.estimate(out=[torch.empty_like(p, dtype=torch.float64) for p in params])
    for i, (v, w, e) in enumerate(zip(views, wide, expected)):
        assert_bit_identical(v, e, f"view {i}")
        if name in ("reference", "cpu"):  # the fp32 estimate, widened exactly
            assert_bit_identical(w, e.double(), f"float64 estimate {i}")
        else:
            assert_close_ulps(w.float(), e, ulps=8, name=f"float64 estimate {i}")


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_param_groups_have_their_own_hyperparameters(name):
    if name != "reference":
        require_backend(name)
    shapes_a, shapes_b = [(5,), (4, 3)], [(7,)]
    a, b = make_params(shapes_a, seed=1), make_params(shapes_b, seed=2)
    opt = SMEGA2([dict(params=a), dict(params=b, lr=0.2, weight_decay=0.1, num_workers=2, estimate="naive")],
                 lr=0.05, num_workers=3, backend=name)
    specs = [Equations(a, lr=0.05, num_workers=3, gamma=lambda t: 0.9, dampening=0.0, weight_decay=0.0,
                       estimate="advanced"),
             Equations(b, lr=0.2, num_workers=2, gamma=lambda t: 0.9, dampening=0.0, weight_decay=0.1,
                       estimate="naive")]
    for step in range(7):
        ga, gb = worker_grads(shapes_a, step), worker_grads(shapes_b, 50 + step)
        set_grads(a, ga)
        set_grads(b, gb)
        opt.step()
        specs[0].step(ga)
        specs[1].step(gb)
        want = specs[0].estimate() + specs[1].estimate()
        for i, (e, q) in enumerate(zip(opt.estimate(), want)):
            torch.testing.assert_close(e.double(), q, rtol=1e-5, atol=1e-5, msg=lambda m: f"estimate {i}: {m}")
    for p, q in zip(a + b, specs[0].theta + specs[1].theta):
        torch.testing.assert_close(p.detach().double(), q, rtol=1e-5, atol=1e-5)
    assert [opt.state[p]["cycle"] for p in a + b] == [7 % 3, 7 % 3, 7 % 2]
