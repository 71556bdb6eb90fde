"""Time-varying MF and low-precision params, every backend.

- fp32 with an MF that changes every step: every backend matches the float64 reference.
- fp16/bf16 params with fp32 masters: within twice the error of torch's own low-precision path
  against float64 (docs/algorithms.md), and the fp32 master stays fp32-accurate.
- functional level: every (param, grad, master) dtype combination against the reference.
"""

import pytest
import torch

import fusedmf.functional as F
from fusedmf import MFAdam, MFSGD

from _util import assert_close_ulps, max_abs_err
from test_optim_vs_torch import clone_params, make_params, set_grads

STEPS = 20
SHAPES = [(1,), (4097,), (123, 457), (0,), (6, 5, 3, 3)]
MFS = [0.9, 0.5, 0.99, 0.7, 0.95]


def schedule(t):
    return MFS[(t - 1) % len(MFS)]


def f64_reference(opt_cls, params, kwargs, steps, grad_dtype=None):
    """The float64 spec run on the grads other runs see (already rounded to `grad_dtype`)."""
    p64 = clone_params(params, torch.float64)
    p64 = [p.cpu().detach().requires_grad_() for p in p64]
    opt = opt_cls(p64, backend="reference", **kwargs)
    for step in range(steps):
        set_grads([p64], step, round_to=grad_dtype)
        opt.step()
    return p64


@pytest.mark.parametrize("opt_cls,kwargs", [
    (MFSGD, dict(lr=0.05, nesterov=False, weight_decay=1e-2)),
    (MFSGD, dict(lr=0.05, nesterov=True, dampening=0.0)),
    (MFAdam, dict(lr=0.01, weight_decay=1e-2, decoupled_weight_decay=True)),
    (MFAdam, dict(lr=0.01, betas=(0.9, 0.99))),
], ids=["sgd", "nag", "adamw", "adam"])
def test_time_varying_mf_fp32_matches_float64_reference(backend, opt_cls, kwargs):
    name, device = backend
    kwargs = dict(kwargs, mf_schedule=schedule)
    ours = make_params(SHAPES, device)
    p64 = f64_reference(opt_cls, ours, kwargs, STEPS)
    opt = opt_cls(ours, backend=name, **kwargs)
    for step in range(STEPS):
        set_grads([ours], step)
        opt.step()
    for i, (p, q) in enumerate(zip(ours, p64)):
        # fp32 against float64 after 20 steps: a few hundred fp32 ulps of accumulated rounding at most
        torch.testing.assert_close(p.double().cpu(), q.detach(), rtol=3e-5, atol=3e-6, msg=lambda m: f"param {i}: {m}")


def _torch_equivalent(opt_cls, params, kwargs):
    if opt_cls is MFSGD:
        return torch.optim.SGD(params, **kwargs)
    kw = dict(kwargs)
    if kw.pop("decoupled_weight_decay", False):
        return torch.optim.AdamW(params, **kw)
    return torch.optim.Adam(params, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("opt_cls,kwargs", [
    (MFSGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-4)),
    (MFSGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (MFAdam, dict(lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True)),
    (MFAdam, dict(lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True, amsgrad=True, maximize=True)),
], ids=["sgd", "nag", "adamw", "adamw-amsgrad-maximize"])
def test_masters_within_twice_torch_low_precision_error(backend, dtype, opt_cls, kwargs):
    name, device = backend
    ours = make_params(SHAPES, device, dtype=dtype)
    theirs = clone_params(ours)
    p64 = f64_reference(opt_cls, ours, kwargs, STEPS, grad_dtype=dtype)
    opt = opt_cls(ours, backend=name, **kwargs)
    ref = _torch_equivalent(opt_cls, theirs, kwargs)
    for step in range(STEPS):
        set_grads([ours, theirs], step)
        opt.step()
        ref.step()
    assert opt.backends_used == {name: len(SHAPES)}
    err_ours = max(max_abs_err(p.cpu(), q) for p, q in zip(ours, p64))
    err_torch = max(max_abs_err(p.cpu(), q) for p, q in zip(theirs, p64))
    assert err_torch > 0, "torch's low-precision path should show rounding error"
    assert err_ours <= 2 * err_torch, f"masters error {err_ours:.3g} > 2 x torch low-precision error {err_torch:.3g}"
    for i, (p, q) in enumerate(zip(ours, p64)):
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master.double().cpu(), q.detach(), rtol=3e-5, atol=3e-6,
                                   msg=lambda m: f"master {i}: {m}")
        # the model copy is the round-to-nearest-even cast of the master, written by the same kernel
        assert torch.equal(p.detach(), master.to(dtype)), f"param {i} is not the cast of its master"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_time_varying_mf_with_masters(backend, dtype):
    name, device = backend
    kwargs = dict(lr=0.01, mf_schedule=schedule)
    ours = make_params(SHAPES, device, dtype=dtype)
    p64 = f64_reference(MFAdam, ours, kwargs, STEPS, grad_dtype=dtype)
    opt = MFAdam(ours, backend=name, **kwargs)
    for step in range(STEPS):
        set_grads([ours], step)
        opt.step()
    for p, q in zip(ours, p64):
        torch.testing.assert_close(opt.state[p]["master_param"].double().cpu(), q.detach(), rtol=3e-5, atol=3e-6)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMBOS = [(pd, gd, m) for pd in DTYPES for gd in DTYPES for m in (False, True) if not (m and pd == "fp32")]


def _functional_state(shapes, device, pdt, gdt, master, seed, adam):
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(params=[], grads=[], s1=[], s2=[], masters=[])
    for shape in shapes:
        w = torch.randn(shape, generator=gen)
        tensors["params"].append(w.to(device=device, dtype=DTYPES[pdt]))
        tensors["grads"].append(torch.randn(shape, generator=gen).to(device=device, dtype=DTYPES[gdt]))
        tensors["s1"].append(torch.randn(shape, generator=gen).to(device))
        tensors["s2"].append(torch.rand(shape, generator=gen).to(device))
        if master:
            tensors["masters"].append(w.to(device))
    return tensors


@pytest.mark.parametrize("pdt,gdt,master", COMBOS, ids=[f"p{a}-g{b}{'-master' if m else ''}" for a, b, m in COMBOS])
@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_functional_dtype_combinations(fused_backend, rule, pdt, gdt, master):
    name, device = fused_backend
    shapes = [(3,), (1025,), (17, 9)]
    ours = _functional_state(shapes, device, pdt, gdt, master, 5, rule == "adam")
    ref = _functional_state(shapes, "cpu", pdt, gdt, master, 5, rule == "adam")
    for step in range(1, 4):
        for t, backend in ((ours, name), (ref, "reference")):
            if rule == "sgd":
                ran = F.mf_sgd(t["params"], t["grads"], t["s1"], master_params=t["masters"], lr=0.1,
                               momentum=0.9, weight_decay=1e-2, first_step=step == 1,
                               inv_grad_scale=0.5, backend=backend)
            else:
                ran = F.mf_adam(t["params"], t["grads"], t["s1"], t["s2"], master_params=t["masters"], lr=0.01,
                                beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled_weight_decay=True,
                                step=step, beta1_product=0.9**step, inv_grad_scale=0.5, backend=backend)
            assert ran == backend
    initial = _functional_state(shapes, "cpu", pdt, gdt, master, 5, rule == "adam")
    # the state the rule owns: SGD's momentum (and masters); Adam's two moments (and masters)
    compared = ("s1", "masters") if rule == "sgd" else ("s1", "s2", "masters")
    for key in compared:
        changed = [not torch.equal(a.cpu(), b) for a, b in zip(ours[key], initial[key]) if a.numel()]
        assert all(changed), f"{key}: the {name} backend left {changed.count(False)} tensors as they were"
        for i, (a, b) in enumerate(zip(ours[key], ref[key])):
            assert_close_ulps(a.cpu(), b, ulps=8, name=f"{key}[{i}]")
    for i, (a, b) in enumerate(zip(ours["params"], ref["params"])):
        if DTYPES[pdt] == torch.float32:
            assert_close_ulps(a.cpu(), b, ulps=8, name=f"params[{i}]")
        else:  # one low-precision ulp at most (a few fp32 ulps can flip a rounding boundary)
            lp_eps = torch.finfo(DTYPES[pdt]).eps
            torch.testing.assert_close(a.cpu().float(), b.float(), rtol=lp_eps, atol=1e-6)
