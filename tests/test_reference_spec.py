"""The reference backend is the spec: check it against the formulas of docs/algorithms.md, written out
independently here in float64 plain Python-on-tensors, with an MF that changes every step."""

import pytest
import torch

from fusedmf import MFAdam, MFSGD
from fusedmf.mf import constant

MFS = [0.5, 0.9, 0.99, 0.7, 0.0, 0.95]


def schedule(t):
    return MFS[(t - 1) % len(MFS)]


def grads_for(step, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(77 + step), dtype=torch.float64)


@pytest.mark.parametrize("nesterov,dampening,wd,decoupled", [
    (False, 0.0, 0.0, False), (False, 0.2, 1e-2, False), (True, 0.0, 1e-2, False), (False, 0.0, 1e-2, True)])
def test_mf_sgd_formula(nesterov, dampening, wd, decoupled):
    if nesterov and any(m == 0.0 for m in MFS):
        sched = lambda t: max(schedule(t), 0.3)  # noqa: E731 - NAG needs a positive MF
    else:
        sched = schedule
    theta0 = torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = theta0.clone().requires_grad_()
    opt = MFSGD([p], lr=0.1, dampening=dampening, weight_decay=wd, nesterov=nesterov,
                decoupled_weight_decay=decoupled, mf_schedule=sched, backend="reference")
    theta, u, lr = theta0.clone(), None, 0.1
    for t in range(1, 13):
        g = grads_for(t, 50)
        p.grad = g.clone()
        opt.step()
        mu = sched(t)
        if wd and not decoupled:
            g = g + wd * theta
        u = g.clone() if u is None else mu * u + (1 - dampening) * g
        d = g + mu * u if nesterov else u
        if decoupled:
            theta = theta * (1 - lr * wd)
        theta = theta - lr * d
    torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), u, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("decoupled", [False, True])
def test_mf_adam_formula_uses_running_beta1_product(decoupled):
    theta0 = torch.randn(40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p = theta0.clone().requires_grad_()
    lr, b2, eps, wd = 0.01, 0.999, 1e-8, 1e-2
    opt = MFAdam([p], lr=lr, betas=(0.9, b2), eps=eps, weight_decay=wd, decoupled_weight_decay=decoupled,
                 mf_schedule=schedule, backend="reference")
    theta, m, v, prod = theta0.clone(), torch.zeros(40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64), 1.0
    for t in range(1, 13):
        g = grads_for(t, 40)
        p.grad = g.clone()
        opt.step()
        mu = schedule(t)
        if not decoupled:
            g = g + wd * theta
        else:
            theta = theta * (1 - lr * wd)
        m = mu * m + (1 - mu) * g
        v = b2 * v + (1 - b2) * g * g
        prod *= mu
        theta = theta - lr * (m / (1 - prod)) / (v.sqrt() / (1 - b2**t) ** 0.5 + eps)
    torch.testing.assert_close(p.detach(), theta, rtol=1e-10, atol=1e-12)
    assert opt.state[p]["beta1_product"] == pytest.approx(prod, rel=1e-15)
    assert opt.state[p]["step"] == 12


def test_constant_schedule_equals_constant_momentum():
    a = torch.randn(10, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    oa = MFSGD([a], lr=0.1, momentum=0.9, backend="reference")
    ob = MFSGD([b], lr=0.1, momentum=0.0, mf_schedule=constant(0.9), backend="reference")
    for t in range(5):
        g = grads_for(t, 10)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)


def test_schedule_called_with_one_based_step_and_skips_do_not_count():
    calls = []

    def sched(t):
        calls.append(t)
        return 0.9

    p = torch.zeros(3, requires_grad=True)
    opt = MFSGD([p], lr=0.1, mf_schedule=sched, backend="reference")
    p.grad = torch.ones(3)
    opt.step()
    opt.step(found_inf=torch.tensor(1.0))  # skipped: the next update is still number 2
    opt.step()
    assert calls == [1, 2, 2]
    assert opt.state[p]["step"] == 2
