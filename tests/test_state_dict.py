"""Checkpoints: a mid-training round trip continues bit-identically (also through torch.save with
weights_only=True), a torch.optim checkpoint loads into fusedmf, and fusedmf's loads into torch.optim."""

import copy
import io

import pytest
import torch

from fusedmf import MFAdam, MFAdamW, MFSGD

from _util import assert_bit_identical, assert_close_ulps
from test_optim_vs_torch import clone_params, make_params, set_grads

SHAPES = [(4097,), (12, 7), (0,), (3, 4, 2, 2)]
FACTORIES = {
    "sgd": lambda ps, b: MFSGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3, backend=b),
    "sgd_schedule": lambda ps, b: MFSGD(ps, lr=0.05, nesterov=True, backend=b, mf_schedule=lambda t: 1 - 0.5 / (t + 1)),
    "adamw_schedule": lambda ps, b: MFAdam(ps, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True, backend=b,
                                           mf_schedule=lambda t: 0.8 + 0.1 * (t % 2)),
}


def train(opt, params, steps, start):
    for step in range(start, start + steps):
        set_grads([params], step)
        opt.step()


def through_torch_save(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_masters"])
@pytest.mark.parametrize("kind", FACTORIES)
def test_round_trip_mid_training_continues_bit_identically(backend, kind, dtype):
    name, device = backend
    params = make_params(SHAPES, device, dtype=dtype)
    opt = FACTORIES[kind](params, name)
    train(opt, params, 4, 0)
    saved_params = [p.detach().clone() for p in params]
    sd = through_torch_save(opt.state_dict())
    train(opt, params, 4, 4)

    restored = [p.clone().requires_grad_() for p in saved_params]
    opt2 = FACTORIES[kind](restored, name)
    opt2.load_state_dict(sd)
    assert opt2.state_dict()["param_groups"] == sd["param_groups"], "groups must round-trip exactly"
    train(opt2, restored, 4, 4)
    for i, (p, q) in enumerate(zip(params, restored)):
        assert_bit_identical(q.detach(), p.detach(), name=f"param {i}")
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == opt2.state[q][key].dtype == torch.float32, "state must stay fp32"
                assert_bit_identical(opt2.state[q][key], value, name=f"state {i} {key}")
            else:
                assert opt2.state[q][key] == value


def test_load_state_dict_keeps_fp32_state_of_low_precision_params():
    p = torch.randn(100, dtype=torch.bfloat16, requires_grad=True)
    opt = MFSGD([p], lr=0.1, momentum=0.9, backend="reference")
    p.grad = torch.randn(100, dtype=torch.bfloat16) * 1e-3
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == torch.float32 and torch.equal(buf, sd["state"][0]["momentum_buffer"])
    assert opt.state[p]["master_param"].dtype == torch.float32


@pytest.mark.parametrize("torch_cls,ours_cls,kwargs", [
    (torch.optim.SGD, MFSGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (torch.optim.SGD, MFSGD, dict(lr=0.05)),
    (torch.optim.Adam, MFAdam, dict(lr=1e-2, betas=(0.8, 0.99))),
    (torch.optim.AdamW, MFAdam, dict(lr=1e-2, weight_decay=1e-2)),
    (torch.optim.SGD, MFSGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, maximize=True)),
    (torch.optim.Adam, MFAdam, dict(lr=1e-2, amsgrad=True)),
    (torch.optim.Adam, MFAdam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True, maximize=True)),
    (torch.optim.AdamW, MFAdamW, dict(lr=1e-2, amsgrad=True)),
], ids=["sgd_nesterov", "sgd_plain", "adam", "adamw", "sgd_maximize", "adam_amsgrad", "adam_amsgrad_maximize",
        "adamw_amsgrad_defaults"])
def test_checkpoints_interchange_with_torch_optim(backend, torch_cls, ours_cls, kwargs):
    name, device = backend
    extra = dict(decoupled_weight_decay=True) if torch_cls is torch.optim.AdamW and ours_cls is MFAdam else {}
    # torch -> fusedmf
    a = make_params(SHAPES, device)
    b = clone_params(a)
    t_opt = torch_cls(a, **kwargs)
    train(t_opt, a, 3, 0)
    sd = through_torch_save(t_opt.state_dict())
    for p, q in zip(a, b):
        q.data.copy_(p.detach())
    ours = ours_cls(b, backend=name, **kwargs, **extra)
    ours.load_state_dict(sd)
    train(t_opt, a, 5, 3)
    train(ours, b, 5, 3)
    for i, (p, q) in enumerate(zip(a, b)):
        assert_close_ulps(q, p, ulps=8, name=f"torch->fusedmf param {i}")
    # fusedmf -> torch
    sd = through_torch_save(ours.state_dict())
    c = clone_params(b)
    t2 = torch_cls(c, **kwargs)
    t2.load_state_dict(sd)
    train(ours, b, 3, 8)
    train(t2, c, 3, 8)
    for i, (p, q) in enumerate(zip(b, c)):
        assert_close_ulps(q, p, ulps=8, name=f"fusedmf->torch param {i}")


def test_loading_an_unsupported_torch_option_fails_and_changes_nothing():
    p = torch.randn(5, requires_grad=True)
    t_opt = torch.optim.Adam([p.detach().clone().requires_grad_()], differentiable=True)
    ours = MFAdam([p])
    p.grad = torch.ones(5)
    ours.step()
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match="differentiable=True, which fusedmf does not support"):
        ours.load_state_dict(t_opt.state_dict())
    after = ours.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert torch.equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])
