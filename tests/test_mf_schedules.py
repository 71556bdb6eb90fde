"""fusedmf.mf schedules (hand-computed values, validation) and their use in MFSGD / MFAdam:
every backend follows the float64 reference under a schedule, MFSGD's opt-in lr_compensation and
tied dampening match a hand-written float64 loop, and the defaults still equal torch.optim.SGD."""

import math

import pytest
import torch

from fusedmf import MFAdam, MFSGD, mf

from _util import assert_close_ulps
from test_optim_vs_torch import clone_params, make_params, set_grads

SHAPES = [(1,), (4097,), (33, 17), (0,), (6, 5, 3, 3)]
STEPS = 12


# ----------------------------------------------------------------------------- schedule values
def test_constant():
    s = mf.constant(0.9)
    assert [s(t) for t in (1, 2, 1000)] == [0.9, 0.9, 0.9]
    assert repr(s) == "constant(0.9)"


def test_horizon_rule_numbers():
    B = 256
    assert mf.horizon(0.9, b=B, b_ref=B)(1) == pytest.approx(0.9, abs=1e-15)
    assert mf.horizon(0.9, b=B / 4, b_ref=B)(1) == pytest.approx(0.975, abs=1e-15)
    assert mf.horizon(0.9, b=B / 8, b_ref=B)(1) == pytest.approx(0.9875, abs=1e-15)
    # power 0.5: 1 - 0.1 * (1/4) ** 0.5 = 0.95
    assert mf.horizon(0.9, b=64, b_ref=256, power=0.5)(7) == pytest.approx(0.95, abs=1e-15)
    # clamps: to mf_max for tiny per-rank batches, to mf_ref when b > b_ref
    assert mf.horizon(0.9, b=1, b_ref=256)(1) == 0.995
    assert mf.horizon(0.9, b=1, b_ref=256, mf_max=0.99)(1) == 0.99
    assert mf.horizon(0.9, b=1024, b_ref=256)(1) == 0.9
    assert "horizon(mf_ref=0.9" in repr(mf.horizon(0.9, 32, 256))


def test_by_world_size():
    table = {1: 0.9, 4: 0.95, 8: 0.99}
    assert mf.by_world_size(table, world_size=4)(3) == 0.95
    assert mf.by_world_size(table, world_size=8)(1) == 0.99
    s = mf.by_world_size(table)  # no process group here: world size 1
    assert s(1) == 0.9 and s.world_size == 1
    assert "by_world_size({1: 0.9, 4: 0.95, 8: 0.99}, world_size=1)" == repr(s)
    with pytest.raises(ValueError, match=r"no MF for world size 2.*\[1, 4, 8\]"):
        mf.by_world_size(table, world_size=2)
    with pytest.raises(ValueError, match="no MF for world size 1"):
        mf.by_world_size({4: 0.95})(1)  # resolved (and rejected) on the first call
    with pytest.raises(ValueError):
        mf.by_world_size({1: 1.0})
    with pytest.raises(ValueError):
        mf.by_world_size({0: 0.9})
    with pytest.raises(ValueError):
        mf.by_world_size({})


def test_ramp_endpoints_and_values():
    s = mf.ramp(0.9, 0.99, 4)
    # update t gets start + (end - start) * min(t - 1, steps) / steps
    want = [0.9, 0.9225, 0.945, 0.9675, 0.99, 0.99, 0.99]
    assert [s(t) for t in range(1, 8)] == pytest.approx(want, abs=1e-15)
    assert s(1) == 0.9 and s(5) == 0.99 and s(10_000) == 0.99
    assert mf.ramp(0.5, 0.9, 0)(1) == 0.9
    assert mf.ramp(0.99, 0.9, 2)(2) == pytest.approx(0.945)  # downward ramps work too
    assert repr(s) == "ramp(0.9, 0.99, steps=4)"


def test_ramp_into_schedule_and_sequence():
    target = mf.horizon(0.9, b=32, b_ref=256)  # 0.9875
    s = mf.ramp(0.9, target, 5)
    assert s(1) == 0.9 and s(6) == pytest.approx(0.9875) and s(100) == pytest.approx(0.9875)
    assert s(3) == pytest.approx(0.9 + 0.0875 * 2 / 5)
    # a ramp towards a time-varying schedule follows it after the ramp
    s = mf.ramp(0.5, lambda t: 0.9 if t < 10 else 0.95, 2)
    assert [s(1), s(2), s(3), s(12)] == pytest.approx([0.5, 0.7, 0.9, 0.95])

    seq = mf.sequence([(3, mf.ramp(0.8, 0.9, 2)), (2, 0.95), (None, mf.constant(0.99))])
    assert [seq(t) for t in range(1, 9)] == pytest.approx([0.8, 0.85, 0.9, 0.95, 0.95, 0.99, 0.99, 0.99])
    # the last segment keeps going past a finite length; segments see local step numbers
    seq = mf.sequence([(2, 0.5), (2, lambda t: 0.1 * t)])
    assert [seq(t) for t in (1, 2, 3, 4, 5, 6)] == pytest.approx([0.5, 0.5, 0.1, 0.2, 0.3, 0.4])
    assert "sequence([(2, constant(0.5)), (2, callable_schedule(" in repr(seq)
    with pytest.raises(ValueError, match="only the last segment"):
        mf.sequence([(None, 0.9), (2, 0.9)])
    with pytest.raises(ValueError, match="length must be an integer"):
        mf.sequence([(0, 0.9)])
    with pytest.raises(ValueError):
        mf.sequence([])
    with pytest.raises(ValueError, match="pair"):
        mf.sequence([0.9])


def test_callable_schedule_validates():
    s = mf.callable_schedule(lambda t: 1 - 1 / (t + 1))
    assert s(1) == 0.5 and s(3) == 0.75
    assert repr(s).startswith("callable_schedule(")
    bad = mf.callable_schedule(lambda t: 0.9 + 0.05 * t)
    assert bad(1) == pytest.approx(0.95)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        bad(2)  # 1.0
    with pytest.raises(ValueError, match="finite"):
        mf.callable_schedule(lambda t: float("nan"))(1)
    with pytest.raises(TypeError):
        mf.callable_schedule(0.9)


@pytest.mark.parametrize("make", [
    lambda: mf.constant(-0.1), lambda: mf.constant(1.0), lambda: mf.constant(float("inf")),
    lambda: mf.ramp(0.9, 1.0, 3), lambda: mf.ramp(0.9, 0.99, -1), lambda: mf.ramp(0.9, 0.99, 2.5),
    lambda: mf.horizon(0.9, 0, 256), lambda: mf.horizon(0.9, 32, 256, mf_max=1.0),
    lambda: mf.horizon(0.9, 32, 256, mf_max=0.8), lambda: mf.horizon(0.9, 32, 256, power=-1),
], ids=["neg", "one", "inf", "ramp_end", "ramp_steps_neg", "ramp_steps_float", "horizon_b",
        "horizon_max_one", "horizon_max_below_ref", "horizon_power"])
def test_invalid_arguments(make):
    with pytest.raises((ValueError, TypeError)):
        make()


def test_step_must_be_one_based():
    with pytest.raises(ValueError, match="1-based"):
        mf.constant(0.9)(0)
    with pytest.raises(TypeError):
        mf.constant(0.9)(1.5)


def test_effective_lr():
    assert mf.effective_lr(0.1, 0.9) == pytest.approx(1.0)
    assert mf.effective_lr(0.1, 0.99) == pytest.approx(10.0)
    assert mf.effective_lr(0.1, 0.9, dampening=0.9) == pytest.approx(0.1)
    assert mf.effective_lr(0.1, 0.0) == 0.1
    with pytest.raises(ValueError):
        mf.effective_lr(0.1, 1.0)
    with pytest.raises(ValueError):
        mf.effective_lr(-0.1, 0.5)
    with pytest.raises(ValueError):
        mf.effective_lr(0.1, 0.5, dampening=1.5)


# ----------------------------------------------------------------------------- in the optimizers
SCHEDULE = mf.sequence([(4, mf.ramp(0.5, 0.9, 3)), (None, mf.callable_schedule(lambda t: 0.99 if t % 2 else 0.95))])


def _f64_reference(opt_cls, params, kwargs, steps):
    p64 = [p.detach().to(torch.float64).cpu().clone().requires_grad_() for p in params]
    opt = opt_cls(p64, backend="reference", **kwargs)
    for step in range(steps):
        set_grads([p64], step)
        opt.step()
    return p64


@pytest.mark.parametrize("opt_cls,kwargs", [
    (MFSGD, dict(lr=0.05, weight_decay=1e-2)),
    (MFSGD, dict(lr=0.05, nesterov=True)),
    (MFSGD, dict(lr=0.05, dampening="tied", lr_compensation=0.9)),
    (MFAdam, dict(lr=0.01, betas=(0.9, 0.99))),
], ids=["sgd", "nag", "sgd_tied_comp", "adam"])
def test_schedule_every_backend_matches_float64(backend, opt_cls, kwargs):
    name, device = backend
    kwargs = dict(kwargs, mf_schedule=SCHEDULE)
    ours = make_params(SHAPES, device)
    p64 = _f64_reference(opt_cls, ours, kwargs, STEPS)
    opt = opt_cls(ours, backend=name, **kwargs)
    for step in range(STEPS):
        set_grads([ours], step)
        opt.step()
    assert opt.backends_used == {name: len(SHAPES)}
    for i, (p, q) in enumerate(zip(ours, p64)):
        torch.testing.assert_close(p.double().cpu(), q.detach(), rtol=3e-5, atol=3e-6, msg=lambda m: f"param {i}: {m}")


def _hand_sgd(params, steps, lr, schedule, tied, mu_ref, nesterov=False):
    """docs/algorithms.md's MF-SGD written out in float64 with the opt-in options."""
    ps = [p.detach().double().cpu().clone() for p in params]
    bufs = [None] * len(ps)
    eff = []
    for step in range(steps):
        holders = [p.clone().requires_grad_() for p in ps]
        set_grads([holders], step)
        mu = schedule(step + 1)
        tau = mu if tied else 0.0
        eta = lr * (1 - mu) / (1 - mu_ref) if mu_ref is not None else lr
        eff.append(eta * (1 - tau) / (1 - mu))
        for i, h in enumerate(holders):
            g = h.grad.double()
            bufs[i] = g.clone() if bufs[i] is None else mu * bufs[i] + (1 - tau) * g
            d = g + mu * bufs[i] if nesterov else bufs[i]
            ps[i] = ps[i] - eta * d
    return ps, eff


@pytest.mark.parametrize("tied,mu_ref,nesterov", [(True, None, False), (False, 0.9, False), (True, 0.5, False),
                                                   (False, 0.9, True)],
                         ids=["tied", "comp", "tied_comp", "nag_comp"])
def test_lr_compensation_and_tied_vs_hand_loop(tied, mu_ref, nesterov):
    params = make_params(SHAPES, torch.device("cpu"), dtype=torch.float64)
    want, want_eff = _hand_sgd(params, STEPS, 0.05, SCHEDULE, tied, mu_ref, nesterov)
    opt = MFSGD(params, lr=0.05, mf_schedule=SCHEDULE, nesterov=nesterov, dampening="tied" if tied else 0.0,
                lr_compensation=mu_ref, backend="reference")
    got_eff = []
    for step in range(STEPS):
        set_grads([params], step)
        opt.step()
        got_eff.append(opt.last_effective_lr[0])
    for i, (p, q) in enumerate(zip(params, want)):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-13, msg=lambda m: f"param {i}: {m}")
    assert got_eff == pytest.approx(want_eff, rel=1e-12)
    if mu_ref is not None and not tied:  # the point of lr_compensation: a constant effective LR
        assert got_eff == pytest.approx([0.05 / (1 - mu_ref)] * STEPS, rel=1e-12)


def test_effective_lr_logged_per_group():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = MFSGD([{"params": [a]}, {"params": [b], "momentum": 0.0, "lr": 0.3}], lr=0.1, momentum=0.9)
    assert opt.last_effective_lr == []
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    assert opt.last_effective_lr == pytest.approx([1.0, 0.3])
    opt.param_groups[0]["dampening"] = "tied"  # in place, like any hyperparameter
    opt.step()
    assert opt.last_effective_lr == pytest.approx([0.1, 0.3])


def test_options_validation():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="tied"):
        MFSGD(p, lr=0.1, momentum=0.9, dampening="ema")
    with pytest.raises(ValueError, match="nesterov"):
        MFSGD(p, lr=0.1, momentum=0.9, nesterov=True, dampening="tied")
    with pytest.raises(ValueError, match="lr_compensation"):
        MFSGD(p, lr=0.1, momentum=0.9, lr_compensation=1.0)
    with pytest.raises(TypeError):
        MFSGD(p, lr=0.1, momentum=0.9, lr_compensation=True)
    opt = MFSGD(p, lr=0.1, momentum=0.9, mf_schedule=lambda t: 1.0)
    p[0].grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        opt.step()


@pytest.mark.parametrize("config", [dict(momentum=0.9), dict(momentum=0.9, dampening=0.1, weight_decay=1e-2),
                                    dict(momentum=0.95, nesterov=True), dict()],
                         ids=["momentum", "damp_wd", "nesterov", "plain"])
def test_default_mfsgd_still_equals_torch_sgd(config):
    ours = make_params(SHAPES, torch.device("cpu"))
    theirs = clone_params(ours)
    opt = MFSGD(ours, lr=0.05, backend="reference", **config)
    ref = torch.optim.SGD(theirs, lr=0.05, **config)
    for step in range(STEPS):
        set_grads([ours, theirs], step)
        opt.step()
        ref.step()
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert_close_ulps(p, q, name=f"param {i}")
    # a torch.optim.SGD checkpoint (no lr_compensation key) still loads and runs
    opt2 = MFSGD(clone_params(theirs), lr=0.05, backend="reference", **config)
    opt2.load_state_dict(ref.state_dict())
    assert opt2.param_groups[0]["lr_compensation"] is None
    assert math.isfinite(opt.last_effective_lr[0])


def test_mf_experiment_smoke(tmp_path):
    """benchmarks/mf_experiment.py end to end on a tiny sweep (2 steps, K in {1, 2})."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "mf_experiment.py")
    spec = importlib.util.spec_from_file_location("mf_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    record = module.main(["--steps", "2", "--world-sizes", "1", "2", "--batch", "8", "--samples", "32",
                          "--test-samples", "16", "--width", "4", "--rules", "const", "horizon_comp", "noise",
                          "--mf-values", "0.95", "--optimizers", "sgd", "adam", "--device", "cpu",
                          "--out", str(tmp_path)])
    runs = {(r["optimizer"], r["rule"], r["world_size"]) for r in record["results"]}
    assert runs == {(o, r, k) for o in ("sgd", "adam") for r in ("const", "noise", "const0.95") for k in (1, 2)} | \
        {("sgd", "horizon_comp", 1), ("sgd", "horizon_comp", 2)}
    for r in record["results"]:
        assert len(r["train_error"]) == 2 and all(0.0 <= e <= 1.0 for e in r["train_error"])
        assert 0.0 <= r["test_accuracy"] <= 1.0
        if r["rule"] == "const0.95":
            assert r["mf"] == [0.95, 0.95]
    noise2 = next(r for r in record["results"] if r["rule"] == "noise" and r["world_size"] == 2)
    assert len(noise2["noise_scale"]) == 2 and all(v is not None for v in noise2["noise_scale"])
    assert next(r for r in record["results"] if r["rule"] == "noise" and r["world_size"] == 1)["noise_scale"] is None
    comp2 = next(r for r in record["results"] if r["rule"] == "horizon_comp" and r["world_size"] == 2)
    assert comp2["mf_last"] == pytest.approx(0.95)  # 1 - 0.1 * (4 / 8)
    assert comp2["effective_lr"] == pytest.approx([0.02 / 0.1] * 2)  # lr_compensation keeps lr / (1 - 0.9)
    assert (tmp_path / "mf_experiment.json").exists()
