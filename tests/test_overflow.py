"""NOTE [skip on overflow]: an inf/NaN grad, on the first step or later, changes nothing at all
(params, masters, states, step counts, Adam's beta1 product), and the loss scaler backs off.
Covers fusedmf's DynamicLossScaler and torch.amp.GradScaler's fused-step protocol (fp16 included)."""

import copy

import pytest
import torch

from fusedmf import DynamicLossScaler, MFAdam, MFAdamW, MFSGD

from _util import assert_bit_identical
from test_optim_vs_torch import make_params, set_grads

SHAPES = [(4097,), (12, 7), (0,), (5,)]
OPTIMIZERS = {
    "sgd": lambda ps, b: MFSGD(ps, lr=0.1, momentum=0.9, dampening=0.1, backend=b, mf_schedule=lambda t: 0.9),
    "nag": lambda ps, b: MFSGD(ps, lr=0.1, momentum=0.9, nesterov=True, backend=b),
    "adam": lambda ps, b: MFAdam(ps, lr=0.01, backend=b, mf_schedule=lambda t: 0.8 + 0.01 * t),
    "adamw_amsgrad_maximize": lambda ps, b: MFAdamW(ps, lr=0.01, amsgrad=True, maximize=True, backend=b),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def assert_unchanged(before, opt, params):
    old_params, old_state = before
    for i, (p, q) in enumerate(zip(params, old_params)):
        assert_bit_identical(p.detach(), q, name=f"param {i}")
    new_state = opt.state_dict()["state"]
    # A skipped first step may leave freshly *initialised* state behind (as torch's fused optimizers
    # do): step 0, zero moments, masters equal to the params. That is the never-updated state.
    for pid in new_state.keys() - old_state.keys():
        st = new_state[pid]
        assert st["step"] == 0, f"state[{pid}] counted a skipped step"
        assert st.get("beta1_product", 1.0) == 1.0
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if isinstance(st.get(key), torch.Tensor):
                assert not st[key].any(), f"state[{pid}][{key}] was written by a skipped step"
        if "master_param" in st:
            assert torch.equal(st["master_param"], old_params[pid].float()), f"master {pid} changed"
    for pid, st in old_state.items():
        assert new_state[pid].keys() == st.keys()
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                assert_bit_identical(new_state[pid][key], value, name=f"state[{pid}][{key}]")
            else:
                assert new_state[pid][key] == value, f"state[{pid}][{key}] changed: {value} -> {new_state[pid][key]}"


def poison(params, which, value, index=3):
    params[which].grad.view(-1)[index] = value


def make_scaler():
    scaler = DynamicLossScaler(init_scale=2.0**10, growth_interval=1000)
    scaler.scale(torch.ones(()))  # the scale lives on the loss's device
    return scaler


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")], ids=["inf", "nan", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_overflow_on_first_step_changes_nothing_then_first_step_rule_holds(backend, opt_name, dtype, bad):
    name, device = backend
    params = make_params(SHAPES, device, dtype=dtype)
    twin = [p.detach().clone().requires_grad_() for p in params]   # never sees the overflow
    opt, twin_opt = OPTIMIZERS[opt_name](params, name), OPTIMIZERS[opt_name](twin, name)
    scaler = make_scaler()
    set_grads([params], 0)
    poison(params, 0, bad)
    before = snapshot(opt, params)
    scaler.step(opt)
    scaler.update()
    assert opt.last_step_skipped is True
    assert scaler.get_scale() == 2.0**9, "the scaler must back off after an overflow"
    assert_unchanged(before, opt, params)
    # the next good step is the *first* applied update: identical to an optimizer that never overflowed
    set_grads([params, twin], 1)
    for p in params:
        p.grad.mul_(2.0**9)  # scaled by the current loss scale; the kernel unscales exactly (power of 2)
    scaler.step(opt)
    scaler.update()
    twin_opt.step()
    assert opt.last_step_skipped is False
    for i, (p, q) in enumerate(zip(params, twin)):
        assert_bit_identical(p.detach(), q.detach(), name=f"param {i} after the first applied step")
    for p, q in zip(params, twin):
        for key, value in twin_opt.state[q].items():
            if isinstance(value, torch.Tensor):
                assert_bit_identical(opt.state[p][key], value, name=key)
            else:
                assert opt.state[p][key] == value, key


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_overflow_later_changes_nothing(backend, opt_name, dtype):
    name, device = backend
    params = make_params(SHAPES, device, dtype=dtype)
    opt = OPTIMIZERS[opt_name](params, name)
    scaler = make_scaler()
    for step in range(3):
        set_grads([params], step)
        scaler.step(opt)
        scaler.update()
    set_grads([params], 3)
    poison(params, len(SHAPES) - 1, float("nan"), index=1)   # only the last tensor is bad
    before = snapshot(opt, params)
    scaler.step(opt)
    scaler.update()
    assert opt.last_step_skipped is True
    assert_unchanged(before, opt, params)
    assert all(opt.state[p]["step"] == 3 for p in params)


def test_torch_gradscaler_fused_protocol_fp16_params(backend):
    """torch.amp.GradScaler refuses to unscale fp16 grads; with fusedmf it hands grad_scale and
    found_inf to the fused step instead, so fp16 params with fp32 masters train and skip correctly."""
    name, device = backend
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).to(device=device, dtype=torch.float16)
    twin = copy.deepcopy(model)
    opt = MFSGD(model.parameters(), lr=0.1, momentum=0.9, backend=name)
    twin_opt = MFSGD(twin.parameters(), lr=0.1, momentum=0.9, backend=name)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**8, growth_interval=1000)
    x = torch.randn(8, 16, device=device, dtype=torch.float16)
    loss = model(x).float().pow(2).mean()
    scaler.scale(loss).backward()
    twin(x).float().pow(2).mean().backward()
    scaler.step(opt)
    scaler.update()
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        # the scale is a power of two: unscaling inside the kernel is exact
        torch.testing.assert_close(opt.state[p]["master_param"], twin_opt.state[q]["master_param"],
                                   rtol=2e-3, atol=1e-4)
    # an overflow: everything stays, the scale backs off
    opt.zero_grad()
    loss = model(x).float().pow(2).mean()
    scaler.scale(loss).backward()
    model.weight.grad[0, 0] = float("inf")
    before = snapshot(opt, list(model.parameters()))
    scaler.step(opt)
    scaler.update()
    assert opt.last_step_skipped is True
    assert scaler.get_scale() == 2.0**7
    assert_unchanged(before, opt, list(model.parameters()))


def test_found_inf_without_scale_skips_and_counts_nothing(backend):
    name, device = backend
    params = make_params([(10,)], device)
    opt = MFAdam(params, lr=0.1, backend=name)
    set_grads([params], 0)
    before = snapshot(opt, params)
    opt.step(found_inf=torch.ones((), device=device))
    assert opt.last_step_skipped is True
    assert_unchanged(before, opt, params)
    opt.step(found_inf=torch.zeros((), device=device))
    assert opt.last_step_skipped is False and opt.state[params[0]]["step"] == 1
    assert opt.state[params[0]]["beta1_product"] == pytest.approx(0.9)


def test_scaler_grows_after_interval_and_round_trips():
    scaler = DynamicLossScaler(init_scale=4.0, growth_interval=2)
    p = torch.zeros(3, requires_grad=True)
    opt = MFSGD([p], lr=0.1)
    scaler.scale(torch.ones(()))
    for _ in range(2):
        p.grad = torch.ones(3)
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 8.0
    state = scaler.state_dict()
    other = DynamicLossScaler()
    other.load_state_dict(state)
    assert other.get_scale() == 8.0 and other.state_dict() == state
    with pytest.raises(ValueError, match="backoff_factor"):
        DynamicLossScaler(backoff_factor=1.5)
