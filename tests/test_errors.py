"""Bad input: a clear error naming what was wrong, and nothing modified (params, state, groups)."""

import copy
import re

import pytest
import torch

import fusedmf
import fusedmf.functional as F
from fusedmf import MFAdam, MFSGD


def trained_sgd(**kwargs):
    a = torch.randn(6, requires_grad=True)
    b = torch.randn(3, 2, requires_grad=True)
    opt = MFSGD([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.1, momentum=0.9, **kwargs)
    a.grad, b.grad = torch.randn(6), torch.randn(3, 2)
    opt.step()
    a.grad, b.grad = torch.randn(6), torch.randn(3, 2)
    return opt, [a, b]


def assert_nothing_changed(opt, params, before):
    old_params, old_sd = before
    for p, q in zip(params, old_params):
        assert torch.equal(p.detach(), q)
    sd = opt.state_dict()
    assert sd["param_groups"] == old_sd["param_groups"]
    for pid, st in old_sd["state"].items():
        for k, v in st.items():
            assert torch.equal(sd["state"][pid][k], v) if isinstance(v, torch.Tensor) else sd["state"][pid][k] == v


def snap(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def test_sparse_grad():
    opt, params = trained_sgd()
    before = snap(opt, params)
    params[1].grad = params[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients .*param 0 of param group 1"):
        opt.step()
    assert_nothing_changed(opt, params, before)


def test_complex_params_rejected_at_construction():
    with pytest.raises(TypeError, match=r"params\[1\] has dtype torch.complex64"):
        MFSGD([torch.randn(3, requires_grad=True), torch.randn(3, dtype=torch.complex64, requires_grad=True)])


def test_duplicate_params_warn_as_torch_and_their_step_changes_nothing():
    p = torch.randn(3, requires_grad=True)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = MFSGD([p, p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"param 1 of param group 0 is param 0 of the same group again"):
        opt.step()
    assert torch.equal(p.detach(), before) and len(opt.state) == 0
    with pytest.raises(ValueError, match="more than one parameter group"):
        MFSGD([{"params": [p]}, {"params": [p]}], lr=0.1)


@pytest.mark.parametrize("cls,kwargs,match", [
    (MFSGD, dict(momentum=1.0), r"Invalid momentum value: 1.0 .*\[0, 1\)"),
    (MFSGD, dict(momentum=-0.1), r"Invalid momentum value: -0.1 .*\[0, 1\)"),
    (MFSGD, dict(lr=-0.1), "lr must be >= 0"),
    (MFSGD, dict(momentum=0.9, nesterov=True, dampening=0.1), "nesterov"),
    (MFSGD, dict(lr=float("nan")), "finite"),
    (MFAdam, dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (MFAdam, dict(betas=(0.9, 1.5)), "Invalid beta parameter at index 1: 1.5"),
    (MFAdam, dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    (MFAdam, dict(weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
    (MFAdam, dict(betas=(0.9, torch.tensor(0.99))), "betas must be either both floats or both Tensors"),
    (MFAdam, dict(betas=(0.9, 0.99, 0.1)), "betas must be a pair"),
    (MFSGD, dict(foreach="yes"), "foreach must be None, False or True"),
    (MFSGD, dict(maximize=1), "maximize must be False or True"),
    (MFAdam, dict(amsgrad="yes"), "amsgrad must be False or True"),
    (MFSGD, dict(backend="gpu"), "unknown backend"),
    (MFSGD, dict(master_weights="yes"), "master_weights"),
    (MFSGD, dict(mf_schedule=0.9), "mf_schedule must be"),
])
def test_bad_hyperparameters_at_construction(cls, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls([torch.randn(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("cls", [MFSGD, MFAdam, fusedmf.MFAdamW])
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(differentiable=True), NotImplementedError, "differentiable=True is not supported"),
    # torch raises RuntimeError for these two (NotImplementedError is one)
    (dict(differentiable=True, fused=True), RuntimeError, "`fused` does not support `differentiable`"),
    (dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True` together"),
])
def test_torch_implementation_flags_refused_with_torchs_classes(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls([torch.randn(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("cls", [MFSGD, MFAdam, fusedmf.MFAdamW])
@pytest.mark.parametrize("flags", [dict(foreach=None, fused=None), dict(foreach=False, fused=False),
                                   dict(foreach=True), dict(fused=True), dict(differentiable=False)])
def test_torch_implementation_flags_accepted_and_kept_in_the_groups(cls, flags):
    p = torch.randn(3, requires_grad=True)
    opt = cls([p], lr=0.1, **flags)
    for key, value in flags.items():
        assert opt.param_groups[0][key] is value
    p.grad = torch.ones(3)
    opt.step()   # the flags change nothing: fusedmf always runs its fused kernels


def test_schedule_out_of_range_mid_training_changes_nothing():
    opt, params = trained_sgd(mf_schedule=lambda t: 0.9 if t < 2 else 1.2)
    before = snap(opt, params)
    with pytest.raises(ValueError, match=r"Invalid momentum from mf_schedule value: 1.2 .*\[0, 1\)"):
        opt.step()
    assert_nothing_changed(opt, params, before)


def test_negative_lr_set_later_changes_nothing():
    opt, params = trained_sgd()
    before = snap(opt, params)
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.step()
    opt.param_groups[1]["lr"] = 0.01
    assert_nothing_changed(opt, params, before)


def test_mixed_devices_in_one_tensor_list():
    params = [torch.zeros(3), torch.zeros(3, device="meta")]
    grads = [torch.ones(3), torch.ones(3, device="meta")]
    with pytest.raises(ValueError, match=r"params\[1\] is on meta"):
        F.mf_sgd(params, grads, lr=0.1)
    assert not params[0].any()


def test_unavailable_backend_names_the_reason(monkeypatch):
    """Asking for a backend that is not there raises one error carrying its reason, before anything is
    modified. Checked on every machine: a CUDA machine has cuda, so "cuda" is marked unavailable with a
    known reason (what available_backends() reports for a build without CUDA kernels)."""
    status = fusedmf.available_backends()
    assert set(status) == {"reference", "cpu", "cuda", "triton", "cuda_emu"}
    for name, st in status.items():
        assert st.detail, f"{name} has no description"
    reason = "fusedmf._C was built without CUDA kernels (test)"
    fake = dict(status, cuda=fusedmf._backends.BackendStatus(False, reason))
    monkeypatch.setattr(fusedmf._backends, "available_backends", lambda: fake)
    device = "cuda" if status["cuda"].available else "cpu"
    p = torch.randn(3, device=device, requires_grad=True)
    p0 = p.detach().clone()
    opt = MFSGD([p], lr=0.1, momentum=0.9, backend="cuda")
    p.grad = torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available: " + re.escape(reason)):
        opt.step()
    assert opt.state[p] == {} and torch.equal(p.detach(), p0) and p.grad is not None
    if not status["cuda"].available:  # and the real reason, where this machine really lacks cuda
        monkeypatch.undo()
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available: " + re.escape(status["cuda"].detail)):
            opt.step()
        assert opt.state[p] == {} and torch.equal(p.detach(), p0)


def test_params_without_grad_are_skipped():
    a, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    b0 = b.detach().clone()
    opt = MFAdam([a, b], lr=0.1)
    a.grad = torch.ones(4)
    opt.step()
    assert torch.equal(b.detach(), b0) and b not in opt.state
    assert opt.state[a]["step"] == 1


def test_float64_on_a_compiled_backend_is_refused_before_any_launch():
    """The reliability probe: with backend "cpu" a float64 param (or grad) used to pass the plan and be
    refused at its launch, after the launches before it had updated their params."""
    if not fusedmf.available_backends()["cpu"].available:
        pytest.skip("backend 'cpu' is not built")
    a, b = torch.randn(6, requires_grad=True), torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = MFSGD([a, b], lr=0.1, momentum=0.9, backend="cpu")
    before = snap(opt, [a, b])
    a.grad, b.grad = torch.ones(6), torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="param 1 of param group 0 has a float64 param; backend 'cpu'"):
        opt.step()
    assert_nothing_changed(opt, [a, b], before)
    assert opt.state[a] == {}, "state was created before the error"
    c = torch.randn(4, requires_grad=True)
    c.grad_dtype = None                          # allow a float64 grad on an fp32 param
    opt = MFAdam([a, c], lr=0.1, backend="cpu")
    before = snap(opt, [a, c])
    a.grad, c.grad = torch.ones(6), torch.ones(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="param 1 of param group 0 has a float64 grad"):
        opt.step()
    assert_nothing_changed(opt, [a, c], before)


@pytest.mark.parametrize("cls,key", [(MFSGD, "momentum_buffer"), (MFAdam, "exp_avg"), (MFAdam, "exp_avg_sq")])
def test_load_state_dict_refuses_state_that_does_not_fit_the_params(cls, key):
    a, b = torch.randn(6, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    kw = dict(momentum=0.9) if cls is MFSGD else {}
    opt = cls([a, b], lr=0.1, **kw)
    a.grad, b.grad = torch.randn(6), torch.randn(3, 2)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][1][key] = torch.zeros(2, 3)            # transposed: same numel, wrong shape
    a.grad, b.grad = torch.randn(6), torch.randn(3, 2)
    before = snap(opt, [a, b])
    with pytest.raises(ValueError, match=rf"state '{key}' of param 1 of param group 0 has shape \[2, 3\], "
                                         r"the param has \[3, 2\]"):
        opt.load_state_dict(saved)
    assert_nothing_changed(opt, [a, b], before)
    opt.step()                                              # still usable, with its own state
