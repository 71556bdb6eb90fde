"""SMEGA2 (algorithms.md, "SMEGA2"): the master step and the look-ahead estimate on every backend.

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
    """SMEGA2 written from the equations (algorithms.md / issue 12), in float64, one param list."""

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
MATCH_SHAPES = SHAPES + [(33,)] * 5 + [(5, 0)]
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
