"""Every kernel is a torch op (NOTE [op schemas], csrc/bindings.cpp): names, schemas, opcheck, fakes.

torch.library.opcheck runs each op of each backend on small real inputs and checks what the
dispatcher relies on: the schema's mutation annotations are truthful, the fake kernel agrees with
the real one under FakeTensor, and the op works through aot_autograd (as torch.compile uses it).
"""

import pytest
import torch

from conftest import require_backend
from fusedmf.functional import _ops
from fusedmf.functional.scalars import ADAM_SLOTS, SGD_SLOTS, adam_step_scalars, sgd_step_scalars

from conftest import FUSED_BACKENDS as BACKENDS  # noqa: E402


def _device(backend):
    return require_backend(backend)


def _op(backend, rule):
    _device(backend)
    return _ops.op(backend, rule)


def _sgd_args(device, masters, momentum, scale):
    torch.manual_seed(0)
    shapes = [(5,), (3, 4)]
    pdt = torch.bfloat16 if masters else torch.float32
    params = [torch.randn(s, device=device).to(pdt) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    bufs = [torch.randn(s, device=device) for s in shapes] if momentum else []
    mast = [p.float() for p in params] if masters else []
    vec = torch.tensor(sgd_step_scalars(lr=0.1, momentum=0.9 if momentum else 0.0).as_list(), device=device)
    inv = torch.full((1,), 0.5, device=device) if scale else None
    found = torch.zeros(1, device=device) if scale else None
    return (params, grads, bufs, mast, vec, inv, found)


def _adam_args(device, masters, scale, amsgrad=False):
    torch.manual_seed(1)
    shapes = [(7,), (2, 3)]
    pdt = torch.float16 if masters else torch.float32
    params = [torch.randn(s, device=device).to(pdt) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    m = [torch.randn(s, device=device) for s in shapes]
    v = [torch.rand(s, device=device) for s in shapes]
    vmax = [torch.rand(s, device=device) for s in shapes] if amsgrad else []
    mast = [p.float() for p in params] if masters else []
    vec = torch.tensor(adam_step_scalars(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=2,
                                         beta1_product=0.81).as_list(), device=device)
    inv = torch.full((1,), 0.25, device=device) if scale else None
    found = torch.zeros(1, device=device) if scale else None
    return (params, grads, m, v, vmax, mast, vec, inv, found)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_rule_is_an_op_with_the_shared_schema(backend):
    prefix = _ops.OP_TABLE[backend][1]
    for rule in _ops.RULES:
        op = _op(backend, rule)
        assert op is getattr(torch.ops.fusedmf, prefix + rule).default
        assert str(op._schema) == f"fusedmf::{prefix}{rule}{_ops.SCHEMAS[rule]}", rule
        assert op._schema.returns == []
        mutated = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        expected = {"mf_sgd_": ["params", "momentum_buffers", "master_params"],
                    "mf_adam_": ["params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params"],
                    "non_finite_check_": ["found_inf", "sumsq"], "pack_": ["out", "sumsq"]}[rule]
        assert mutated == expected, (rule, mutated)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masters,momentum,scale", [(False, True, False), (True, True, True), (False, False, True)],
                         ids=["fp32", "bf16-master-amp", "fp32-no-momentum-amp"])
def test_opcheck_mf_sgd(backend, masters, momentum, scale):
    op = _op(backend, "mf_sgd_")
    torch.library.opcheck(op, _sgd_args(_device(backend), masters, momentum, scale))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masters,scale,amsgrad", [(False, False, False), (True, True, False), (False, True, True),
                                                   (True, False, True)],
                         ids=["fp32", "fp16-master-amp", "fp32-amsgrad-amp", "fp16-master-amsgrad"])
def test_opcheck_mf_adam(backend, masters, scale, amsgrad):
    op = _op(backend, "mf_adam_")
    torch.library.opcheck(op, _adam_args(_device(backend), masters, scale, amsgrad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_sumsq", [False, True])
def test_opcheck_non_finite_check(backend, with_sumsq):
    device = _device(backend)
    op = _op(backend, "non_finite_check_")
    tensors = [torch.randn(9, device=device), torch.randn(2, 3, device=device).half()]
    tensors[1] = tensors[1].float()  # one dtype per call
    sumsq = torch.zeros(1, device=device) if with_sumsq else None
    torch.library.opcheck(op, (tensors, torch.zeros(1, device=device), sumsq))
    tensors[0][3] = float("inf")
    torch.library.opcheck(op, (tensors, torch.zeros(1, device=device), sumsq))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_pack(backend):
    device = _device(backend)
    op = _op(backend, "pack_")
    grads = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
    from fusedmf.functional.pack import pack_offsets
    _, total = pack_offsets([g.numel() for g in grads], 2)
    out = torch.zeros(total, dtype=torch.float16, device=device)
    torch.library.opcheck(op, (grads, out, 0.5, torch.zeros(1, device=device)))
    torch.library.opcheck(op, (grads, out, 0.5, None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_run_on_meta_tensors_and_refuse_mixed_devices(backend):
    _device(backend)
    meta = _sgd_args(torch.device("meta"), True, True, True)
    _ops.op(backend, "mf_sgd_")(*meta)  # the fake kernel: no data read, nothing to return
    args = list(_adam_args(torch.device("meta"), False, True, amsgrad=True))
    _ops.op(backend, "mf_adam_")(*args)
    args[7] = torch.ones(1)  # inv_grad_scale on the CPU, the rest on meta
    with pytest.raises(ValueError, match=r"inv_grad_scale is on cpu but params\[0\] is on meta"):
        _ops.op(backend, "mf_adam_")(*args)


def test_slot_layout_is_checked_by_name():
    _ops.check_slot_layout("x", {n: i for i, n in enumerate(SGD_SLOTS)}, SGD_SLOTS, "SGD")
    swapped = {n: i for i, n in enumerate(ADAM_SLOTS)}
    swapped["beta2"], swapped["eps"] = swapped["eps"], swapped["beta2"]
    with pytest.raises(RuntimeError, match="lays out the Adam scalar vector"):
        _ops.check_slot_layout("x", swapped, ADAM_SLOTS, "Adam")
    with pytest.raises(RuntimeError, match="lays out the SGD scalar vector"):
        _ops.check_slot_layout("x", {**{n: i for i, n in enumerate(SGD_SLOTS)}, "extra": 7}, SGD_SLOTS, "SGD")


def test_the_profiler_names_the_op():
    require_backend("cpu")
    args = _sgd_args(torch.device("cpu"), False, True, False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _ops.op("cpu", "mf_sgd_")(*args)
    assert any(e.key == "fusedmf::mf_sgd_" for e in prof.key_averages()), [e.key for e in prof.key_averages()]
