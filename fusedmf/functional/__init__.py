"""The functional layer: one keyword-only function per update rule, and the one backend switch.

Contract shared by every backend (reference, cpu, cuda, triton):

- all tensors of one call live on one device; ``params[i]``, ``grads[i]`` and every state tensor
  ``i`` have the same shape (and layout); dtypes are uniform within each list;
- params are fp32, fp16 or bf16 (float64 only on the reference backend); grads fp32/fp16/bf16,
  independently of the params (a grad can come straight from an fp16 communication buffer);
  momentum/Adam states and master weights are fp32;
- ``master_params`` empty: params are updated in place (fp32 arithmetic); else the fp32 masters are
  updated and the params written as their low-precision copy, in the same pass;
- ``inv_grad_scale`` (optional 1-element fp32 tensor): grads are multiplied by it first (loss-scale
  unscaling inside the update); ``maximize=True`` then negates them (torch's ``maximize``: ascend);
- ``found_inf`` (optional 1-element fp32 tensor): if non-zero the call writes nothing at all
  (NOTE [skip on overflow]); it is read on the device, never synchronised by compiled backends.

Each function returns the name of the backend that ran, so callers can report it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import _backends
from . import _ops, reference
from ._args import _as_list, _check_same_device, _device_of, _scalar_vector, _scale_tensor
from .pack import PACK_ALIGN_BYTES, pack_offsets
from .pack import pack_ as _reference_pack_
from .scalars import (
    ADAM_NUM_SCALARS,
    SGD_NUM_SCALARS,
    AdamStepScalars,
    SGDStepScalars,
    adam_step_scalars,
    sgd_step_scalars,
)
from .smega2 import smega2, smega2_estimate

Tensor = torch.Tensor

__all__ = [
    "mf_sgd", "mf_adam", "non_finite_check", "pack", "pack_offsets", "PACK_ALIGN_BYTES",
    "sgd_step_scalars", "adam_step_scalars", "SGDStepScalars", "AdamStepScalars",
    "SGD_NUM_SCALARS", "ADAM_NUM_SCALARS", "AmpTensors", "found_inf_over", "sgd_call", "adam_call",
    "smega2", "smega2_estimate",
]


def mf_sgd(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Optional[Sequence[Tensor]] = None,
    *,
    master_params: Optional[Sequence[Tensor]] = None,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    decoupled_weight_decay: bool = False,
    first_step: bool = False,
    maximize: bool = False,
    inv_grad_scale: Union[None, float, Tensor] = None,
    found_inf: Optional[Tensor] = None,
    backend: str = "auto",
) -> str:
    """One fused MF-SGD / MF-NAG step over lists of tensors (see docs/algorithms.md).

    ``momentum_buffers`` None/empty runs plain SGD (d = g). ``first_step`` makes the buffer start
    as g (torch semantics) without reading it.
    """
    params, grads = list(params), list(grads)
    momentum_buffers, master_params = _as_list(momentum_buffers), _as_list(master_params)
    scalars = sgd_step_scalars(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        nesterov=nesterov, decoupled_weight_decay=decoupled_weight_decay, first_step=first_step, maximize=maximize,
    )
    return _run_sgd(params, grads, momentum_buffers, master_params, scalars, inv_grad_scale, found_inf, backend)


def _run_sgd(params, grads, momentum_buffers, master_params, scalars, inv_grad_scale, found_inf, backend) -> str:
    device = _device_of(params)
    name = _backends.resolve(backend, device, params[0].dtype if params else None)
    if name == "reference":
        _check_same_device({"params": params, "grads": grads, "momentum_buffers": momentum_buffers,
                            "master_params": master_params}, device, "mf_sgd")
    fn, args = sgd_call(name, params, grads, momentum_buffers, master_params, scalars, None,
                        _scale_tensor(inv_grad_scale, device, "inv_grad_scale"),
                        _scale_tensor(found_inf, device, "found_inf"))
    fn(*args)
    return name


def sgd_call(backend: str, params, grads, momentum_buffers, master_params, scalars: SGDStepScalars,
             vector: Optional[Tensor], inv_grad_scale: Optional[Tensor], found_inf: Optional[Tensor]):
    """The optimizers' hot path: ``(op, args)`` of one MF-SGD launch, for a backend already resolved
    and tensors already checked by the caller's layout (NOTE [launch layout cache]); the op checks
    them again in C++/Triton. ``vector``: the float32 scalar vector on the params' device (None:
    made here from ``scalars``). The reference takes the scalars as host floats."""
    if backend == "reference":
        return reference.mf_sgd_, (params, grads, momentum_buffers, master_params, scalars, inv_grad_scale, found_inf)
    if vector is None:
        vector = _scalar_vector(scalars.as_list(), _device_of(params))
    return _ops.op(backend, "mf_sgd_"), (params, grads, momentum_buffers, master_params, vector, inv_grad_scale,
                                         found_inf)


def mf_adam(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    max_exp_avg_sqs: Optional[Sequence[Tensor]] = None,
    master_params: Optional[Sequence[Tensor]] = None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    step: int,
    beta1_product: float,
    maximize: bool = False,
    inv_grad_scale: Union[None, float, Tensor] = None,
    found_inf: Optional[Tensor] = None,
    backend: str = "auto",
) -> str:
    """One fused MF-Adam / MF-AdamW step. ``beta1_product`` is P_t including this step's beta1.
    ``max_exp_avg_sqs`` (fp32, one per param) given: AMSGrad, torch's ``amsgrad=True``."""
    params, grads = list(params), list(grads)
    exp_avgs, exp_avg_sqs, master_params = list(exp_avgs), list(exp_avg_sqs), _as_list(master_params)
    max_exp_avg_sqs = _as_list(max_exp_avg_sqs)
    scalars = adam_step_scalars(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay, step=step, beta1_product=beta1_product, maximize=maximize,
    )
    return _run_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, scalars, inv_grad_scale,
                     found_inf, backend)


def _run_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, scalars, inv_grad_scale,
              found_inf, backend) -> str:
    device = _device_of(params)
    name = _backends.resolve(backend, device, params[0].dtype if params else None)
    if name == "reference":
        _check_same_device({"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
                            "max_exp_avg_sqs": max_exp_avg_sqs, "master_params": master_params}, device, "mf_adam")
    fn, args = adam_call(name, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, scalars, None,
                         _scale_tensor(inv_grad_scale, device, "inv_grad_scale"),
                         _scale_tensor(found_inf, device, "found_inf"))
    fn(*args)
    return name


def adam_call(backend: str, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
              scalars: AdamStepScalars, vector: Optional[Tensor], inv_grad_scale: Optional[Tensor],
              found_inf: Optional[Tensor]):
    """As :func:`sgd_call`, for MF-Adam (``max_exp_avg_sqs`` empty: no AMSGrad)."""
    if backend == "reference":
        return reference.mf_adam_, (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, scalars,
                                    inv_grad_scale, found_inf)
    if vector is None:
        vector = _scalar_vector(scalars.as_list(), _device_of(params))
    return _ops.op(backend, "mf_adam_"), (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
                                          vector, inv_grad_scale, found_inf)


def write_scalars(buf: Tensor, values: list) -> None:
    """Write per-step scalars into a persistent float32 device buffer without a host synchronisation
    (NOTE [per-step scalars are data]). On CUDA the values go through a freshly allocated pinned
    buffer and a non-blocking copy on the current stream: the caching host allocator does not hand
    that buffer out again until the copy has run, and kernels queued before it still read the old
    values in stream order."""
    host = torch.tensor(values, dtype=torch.float32)
    if buf.device.type == "cuda":
        buf.copy_(host.pin_memory(), non_blocking=True)
    else:
        buf.copy_(host)


class AmpTensors:
    """NOTE [one amp helper]: one step's ``grad_scale`` / ``found_inf`` (tensors on any device, or
    numbers) as the 1-element float32 tensors the kernels read on each device: ``on(device)`` gives
    (1/grad_scale or None, found_inf or None), made once per device and step, with non-blocking
    copies. ``found_inf`` is the flag as a tensor (None without one), for the skip accounting.
    Used by the optimizers, and by fusedmf.amp and fusedmf.comm through ``found_inf_over``."""

    __slots__ = ("grad_scale", "found_inf", "_per_device")

    def __init__(self, grad_scale=None, found_inf=None):
        if grad_scale is not None and not isinstance(grad_scale, Tensor):
            grad_scale = torch.tensor(float(grad_scale), dtype=torch.float32)
        if found_inf is not None and not isinstance(found_inf, Tensor):
            found_inf = torch.tensor(float(found_inf), dtype=torch.float32)
        for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if t is not None and t.numel() != 1:
                raise ValueError(f"{name} must have exactly one element, got shape {list(t.shape)}")
        self.grad_scale, self.found_inf, self._per_device = grad_scale, found_inf, {}

    def on(self, device: torch.device):
        got = self._per_device.get(device)
        if got is None:
            inv = found = None
            if self.grad_scale is not None:
                inv = torch.reciprocal(self.grad_scale.reshape(1).to(device=device, dtype=torch.float32,
                                                                     non_blocking=True))
            if self.found_inf is not None:
                found = self.found_inf.reshape(1).to(device=device, dtype=torch.float32, non_blocking=True)
            got = self._per_device[device] = (inv, found)
        return got


def found_inf_over(tensors_by_device: dict, *, into: Optional[Tensor] = None, sumsq: Optional[Tensor] = None,
                   backend: str = "auto"):
    """NOTE [one amp helper]: the non-finite check over tensors on several devices, as one flag.

    ``into``: a 1-element float32 tensor on the first device that the result is accumulated into
    (updated in place), else a zeroed one is made there. ``sumsq`` goes to the first device's check
    (the noise scale runs on one device). Returns (flag, name of the backend that ran or None)."""
    devices = list(tensors_by_device)
    if not devices:
        return into, None
    target = into if into is not None else torch.zeros(1, dtype=torch.float32, device=devices[0])
    name = None
    for d in devices:
        flag = target if d == target.device else torch.zeros(1, dtype=torch.float32, device=d)
        name = non_finite_check(tensors_by_device[d], flag, sumsq=sumsq if flag is target else None,
                                backend=backend)
        if flag is not target:
            target += flag.to(target.device, non_blocking=True)
    return target, name


def _check_sumsq(op: str, sumsq: Optional[Tensor], device: torch.device) -> None:
    if sumsq is None:
        return
    if not isinstance(sumsq, torch.Tensor) or sumsq.dtype != torch.float32 or sumsq.numel() != 1 \
            or sumsq.device != device:
        what = (f"{sumsq.dtype} of shape {list(sumsq.shape)} on {sumsq.device}" if isinstance(sumsq, torch.Tensor)
                else type(sumsq).__name__)
        raise ValueError(f"fusedmf.{op}: sumsq must be a 1-element float32 tensor on {device}, got {what}")


def non_finite_check(tensors: Sequence[Tensor], found_inf: Tensor, *, sumsq: Optional[Tensor] = None,
                     backend: str = "auto") -> str:
    """Set ``found_inf`` (a 1-element fp32 tensor on the tensors' device) to 1 if any value is inf/NaN.

    ``sumsq`` (optional, a 1-element fp32 tensor on the same device): also add Σ x² over every
    element, read in the same pass (the reduced gradient's squared norm for the noise scale,
    fusedmf/noise.py). Accumulated in fp32 on GPUs (one atomic add per block, so the last bits
    depend on the order blocks finish) and in double per thread on CPUs. Not meaningful when
    found_inf is or becomes set: the kernels stop reading early then.
    """
    tensors = list(tensors)
    device = _device_of(tensors) if tensors else found_inf.device
    _check_same_device({"tensors": tensors, "found_inf": [found_inf]}, device, "non_finite_check")
    _check_sumsq("non_finite_check", sumsq, device)
    dtype = tensors[0].dtype if tensors else None
    name = _backends.resolve(backend, device, dtype)
    if name == "reference":
        reference.non_finite_check_(tensors, found_inf, sumsq)
    else:
        _ops.op(name, "non_finite_check_")(tensors, found_inf, sumsq)
    return name


_PACK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pack(grads: Sequence[Tensor], out: Tensor, *, scale: float, sumsq: Optional[Tensor] = None,
         backend: str = "auto") -> str:
    """Write ``cast(grads[i] * scale)`` for every grad into the flat 1-D buffer ``out``.

    ``sumsq`` (optional, a 1-element fp32 tensor on out's device): also add Σ (fp32(g)·scale)² --
    the products before the cast -- in the same pass (the local gradient's squared norm for the
    noise scale, fusedmf/noise.py). The sum's last bits depend on the backend and, on GPUs, on the
    order blocks finish.

    One launch gathers, prescales and casts the gradients of a communication bucket; the slots
    sit at 16-byte-aligned offsets (NOTE [pack layout] in fusedmf/functional/pack.py, see
    ``pack_offsets``) and the padding between them is left as it is (allocate ``out`` zeroed).

    Returns the name of what ran (every backend registers a ``pack_`` op; float64 runs the
    reference whatever was asked for).
    """
    grads = list(grads)
    if out.dim() != 1 or not out.is_contiguous():
        raise ValueError(f"fusedmf.pack: out must be a contiguous 1-D buffer, got shape {list(out.shape)} "
                         f"and strides {list(out.stride())}")
    if out.dtype not in _PACK_DTYPES:
        raise TypeError(f"fusedmf.pack: out has dtype {out.dtype}; supported: float16, bfloat16, float32, float64")
    if out.data_ptr() % PACK_ALIGN_BYTES:
        raise ValueError(f"fusedmf.pack: out must start on a {PACK_ALIGN_BYTES}-byte boundary (NOTE [pack layout])")
    _check_same_device({"grads": grads}, out.device, "pack")
    _check_sumsq("pack", sumsq, out.device)
    if sumsq is not None and out.data_ptr() <= sumsq.data_ptr() < out.data_ptr() + out.numel() * out.element_size():
        raise ValueError("fusedmf.pack: sumsq lies inside out; it must be a separate 1-element float32 tensor")
    for i, g in enumerate(grads):
        if g.dtype not in _PACK_DTYPES or g.is_complex() or g.layout != torch.strided:
            raise TypeError(f"fusedmf.pack: grads[{i}] has dtype {g.dtype} and layout {g.layout}; "
                            "dense float16, bfloat16, float32 or float64 grads are supported")
    _, total = pack_offsets([g.numel() for g in grads], out.element_size())
    if total > out.numel():
        raise ValueError(f"fusedmf.pack: the grads need {total} elements of out (padded slots), out has {out.numel()}")
    scale = float(scale)
    # float64 anywhere is the reference's territory, as for the update rules: the compiled and
    # Triton pack_ kernels take fp32/fp16/bf16 only, so a float64 pack runs the reference whatever
    # backend was asked for (and says so in the return value)
    wide = out.dtype == torch.float64 or any(g.dtype == torch.float64 for g in grads)
    name = _backends.resolve(backend, out.device, torch.float64 if wide else out.dtype)
    if wide:
        name = "reference"
    if name == "reference":
        _reference_pack_(grads, out, scale, sumsq)
        return "reference"
    _ops.op(name, "pack_")(grads, out, scale, sumsq)
    return name

