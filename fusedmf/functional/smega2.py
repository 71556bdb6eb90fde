"""SMEGA2's two fused calls: the master step and the look-ahead estimate (docs/algorithms.md, SMEGA2).

Same contract as the other rules (fusedmf/functional/__init__.py): one device per call, params
fp32/fp16/bf16 (float64 on the reference backend), grads fp32/fp16/bf16, momentum buffers,
gradient accumulators and masters fp32 (float64 with float64 params), optional inv_grad_scale and
found_inf (NOTE [skip on overflow]: a set found_inf writes nothing). Compiled kernels are the torch
ops ``torch.ops.fusedmf.smega2_`` / ``smega2_estimate_`` (csrc/smega2_ops.cpp); Triton's live in
triton_kernels/smega2.py.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import _backends
from . import _ops, reference
from ._args import _check_same_device, _device_of, _scalar_vector, _scale_tensor
from .scalars import SMEGA2EstimateScalars, SMEGA2StepScalars, smega2_estimate_scalars, smega2_step_scalars

Tensor = torch.Tensor

__all__ = ["smega2", "smega2_estimate", "smega2_call"]

def _kernel(name: str, op: str):
    """The compiled or Triton kernel `op` of backend `name` (resolve() has checked it is available)."""
    if name == "triton":
        return getattr(_backends.triton_module()[0], op)
    return _ops.op(name, op)  # cpu, cuda, cuda_emu: the torch ops of OP_TABLE


def smega2_call(backend: str, params, grads, momentum_buffers, grad_accumulators, master_params,
                scalars: SMEGA2StepScalars, vector: Optional[Tensor], inv_grad_scale: Optional[Tensor],
                found_inf: Optional[Tensor]):
    """The optimizer's hot path, as ``sgd_call`` for MF-SGD: ``(op, args)`` of one SMEGA2 launch for a
    backend already resolved and tensors already checked by the layout. ``vector``: the float32
    scalar vector on the params' device (None: made here). The reference takes host floats."""
    if backend == "reference":
        return reference.smega2_, (params, grads, momentum_buffers, grad_accumulators, master_params, scalars,
                                   inv_grad_scale, found_inf)
    if vector is None:
        vector = _scalar_vector(scalars.as_list(), _device_of(params))
    return _kernel(backend, "smega2_"), (params, grads, momentum_buffers, grad_accumulators, master_params, vector,
                                         inv_grad_scale, found_inf)


def smega2(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    grad_accumulators: Sequence[Tensor],
    *,
    master_params: Optional[Sequence[Tensor]] = None,
    lr: float,
    momentum: float,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    num_workers: int,
    cycle: int,
    maximize: bool = False,
    inv_grad_scale: Union[None, float, Tensor] = None,
    found_inf: Optional[Tensor] = None,
    backend: str = "auto",
) -> str:
    """One SMEGA2 master step over lists of tensors; ``cycle`` is the position s before the step
    (the caller advances it to ``(cycle + 1) % num_workers`` once the step is known applied)."""
    scalars = smega2_step_scalars(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                  num_workers=num_workers, cycle=cycle, maximize=maximize)
    return _run_smega2(list(params), list(grads), list(momentum_buffers), list(grad_accumulators),
                       [] if master_params is None else list(master_params), scalars, inv_grad_scale, found_inf,
                       backend)


def _run_smega2(params, grads, momentum_buffers, grad_accumulators, master_params, scalars: SMEGA2StepScalars,
                inv_grad_scale, found_inf, backend) -> str:
    device = _device_of(params)
    _check_same_device({"params": params, "grads": grads, "momentum_buffers": momentum_buffers,
                        "grad_accumulators": grad_accumulators, "master_params": master_params}, device, "smega2")
    name = _backends.resolve(backend, device, params[0].dtype if params else None)
    inv = _scale_tensor(inv_grad_scale, device, "inv_grad_scale")
    found = _scale_tensor(found_inf, device, "found_inf") if found_inf is not None else None
    if name == "reference":
        reference.smega2_(params, grads, momentum_buffers, grad_accumulators, master_params, scalars, inv, found)
    else:
        _kernel(name, "smega2_")(params, grads, momentum_buffers, grad_accumulators, master_params,
                                 _scalar_vector(scalars.as_list(), device), inv, found)
    return name


def smega2_estimate(
    params: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    grad_accumulators: Sequence[Tensor],
    out: Sequence[Tensor],
    *,
    master_params: Optional[Sequence[Tensor]] = None,
    lr: float,
    momentum: float,
    num_workers: int,
    cycle: int,
    estimate: str = "advanced",
    backend: str = "auto",
) -> str:
    """Write SMEGA2's look-ahead weights (at cycle position ``cycle``) into ``out``, one fused pass.

    ``out[i]`` has the shape and layout of ``params[i]``; its dtype is float32, float16 or bfloat16
    (float64 on the reference backend), uniform over the list, independently of the params."""
    scalars = smega2_estimate_scalars(lr=lr, momentum=momentum, num_workers=num_workers, cycle=cycle,
                                      estimate=estimate)
    return _run_smega2_estimate(list(params), list(momentum_buffers), list(grad_accumulators),
                                [] if master_params is None else list(master_params), list(out), scalars, backend)


def _run_smega2_estimate(params, momentum_buffers, grad_accumulators, master_params, out,
                         scalars: SMEGA2EstimateScalars, backend) -> str:
    device = _device_of(params)
    _check_same_device({"params": params, "momentum_buffers": momentum_buffers,
                        "grad_accumulators": grad_accumulators, "master_params": master_params, "out": out},
                       device, "smega2_estimate")
    wide = any(t.dtype == torch.float64 for t in out[:1] + params[:1])
    name = _backends.resolve(backend, device, torch.float64 if wide else (params[0].dtype if params else None))
    if name == "reference":
        reference.smega2_estimate_(params, momentum_buffers, grad_accumulators, master_params, out, scalars)
    else:
        _kernel(name, "smega2_estimate_")(params, momentum_buffers, grad_accumulators, master_params, out,
                                          _scalar_vector(scalars.as_list(), device))
    return name
