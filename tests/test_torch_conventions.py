"""torch.optim conventions: param groups and add_param_group, zero_grad, closures, LR schedulers,
and the backend report (no silent fallback; import never fails without the extension)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fusedmf import MFAdam, MFSGD

from _util import ADAM_ULPS, assert_close_ulps
from test_optim_vs_torch import clone_params, make_params, set_grads


def test_param_groups_add_param_group_and_lr_scheduler(backend):
    name, device = backend
    a, b = make_params([(50,), (7, 3)], device), make_params([(9,)], device, seed=3)
    ta, tb = clone_params(a), clone_params(b)
    ours = MFSGD([{"params": a, "momentum": 0.5}], lr=0.1, momentum=0.9, backend=name)
    theirs = torch.optim.SGD([{"params": ta, "momentum": 0.5}], lr=0.1, momentum=0.9)
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=2, gamma=0.5)
    sched_theirs = torch.optim.lr_scheduler.StepLR(theirs, step_size=2, gamma=0.5)
    for step in range(6):
        if step == 3:
            ours.add_param_group({"params": b, "lr": 0.2, "nesterov": True})
            theirs.add_param_group({"params": tb, "lr": 0.2, "nesterov": True})
        set_grads([a + b, ta + tb], step)
        ours.step()
        theirs.step()
        sched_ours.step()
        sched_theirs.step()
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]
    for i, (p, q) in enumerate(zip(a + b, ta + tb)):
        assert_close_ulps(p, q, name=f"param {i}")


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = MFAdam(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert opt.state[model.weight]["step"] == 1


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    p = torch.randn(3, requires_grad=True)
    opt = MFSGD([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.zero_grad(set_to_none=set_to_none)
    assert (p.grad is None) if set_to_none else (p.grad is not None and not p.grad.any())


def test_backends_used_reports_what_ran_and_float64_goes_to_reference():
    p32 = torch.randn(4, requires_grad=True)
    p64 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    opt = MFSGD([p32, p64], lr=0.1, momentum=0.9, backend="reference")
    p32.grad, p64.grad = torch.ones(4), torch.ones(4, dtype=torch.float64)
    opt.step()
    assert opt.backends_used == {"reference": 2}
    assert opt.state[p64]["momentum_buffer"].dtype == torch.float64


def test_import_without_extension_reports_and_falls_back_loudly(tmp_path):
    """fusedmf imports without fusedmf._C; "auto" warns once and runs the reference backend;
    an explicit "cpu" request raises with the reason and how to build."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["fusedmf._C"] = None          # the extension is missing
        import torch, fusedmf
        st = fusedmf.available_backends()
        assert not st["cpu"].available and "pip install" in st["cpu"].detail, st["cpu"]
        p = torch.zeros(3, requires_grad=True); p.grad = torch.ones(3)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt = fusedmf.MFSGD([p], lr=0.1); opt.step()
        assert any("reference backend" in str(x.message) for x in w), [str(x.message) for x in w]
        assert opt.backends_used == {"reference": 1}
        try:
            fusedmf.MFSGD([p], lr=0.1, backend="cpu").step()
        except RuntimeError as e:
            assert "backend 'cpu' is not available" in str(e) and "pip install" in str(e), e
        else:
            raise AssertionError("backend='cpu' without the extension must raise")
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), FUSEDMF_JIT="0")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_layout_cache_follows_changing_grad_sets_and_settings(backend):
    """NOTE [launch layout cache]: params that miss grads in some steps keep their own step counts
    and first-step rule (as torch.optim does per param), a grad with other strides or dtype, and
    momentum switched on mid-training, all rebuild the layout correctly."""
    name, device = backend
    ours = make_params([(40,), (6, 7), (9,)], device)
    theirs = clone_params(ours)
    opt = MFAdam(ours, lr=0.01, backend=name)
    ref = torch.optim.Adam(theirs, lr=0.01)
    present = [(0, 1, 2), (0, 2), (0, 1, 2), (1,), (0, 1, 2), (0, 1, 2)]
    for step, which in enumerate(present):
        set_grads([ours, theirs], step)
        for i in range(3):
            if i not in which:
                ours[i].grad = theirs[i].grad = None
        if step == 4:  # a transposed-layout grad with the same values
            g = ours[1].grad
            ours[1].grad = g.t().contiguous().t()
            assert ours[1].grad.stride() != ours[1].stride()
        opt.step()
        ref.step()
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert_close_ulps(p, q, ulps=ADAM_ULPS, name=f"param {i}")
        assert opt.state[p]["step"] == int(ref.state[q]["step"])

    sgd_ours, sgd_theirs = make_params([(30,)], device), None
    sgd_theirs = clone_params(sgd_ours)
    opt = MFSGD(sgd_ours, lr=0.1, momentum=0.0, backend=name)
    ref = torch.optim.SGD(sgd_theirs, lr=0.1, momentum=0.0)
    for step in range(4):
        if step == 2:  # switch momentum on: buffers start as g on the next update, as in torch
            opt.param_groups[0]["momentum"] = ref.param_groups[0]["momentum"] = 0.9
        set_grads([sgd_ours, sgd_theirs], step)
        opt.step()
        ref.step()
    assert_close_ulps(sgd_ours[0], sgd_theirs[0], name="sgd param")
    assert_close_ulps(opt.state[sgd_ours[0]]["momentum_buffer"], ref.state[sgd_theirs[0]]["momentum_buffer"],
                      name="momentum buffer")
