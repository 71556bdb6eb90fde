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
  unscaling inside the update);
- ``found_inf`` (optional 1-element fp32 tensor): if non-zero the call writes nothing at all
  (NOTE [skip on overflow]); it is read on the device, never synchronised by compiled backends.

Each function returns the name of the backend that ran, so callers can report it.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch

from .. import _backends
from . import reference
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

Tensor = torch.Tensor

__all__ = [
    "mf_sgd", "mf_adam", "non_finite_check", "pack", "pack_offsets", "PACK_ALIGN_BYTES",
    "sgd_step_scalars", "adam_step_scalars", "SGDStepScalars", "AdamStepScalars",
    "SGD_NUM_SCALARS", "ADAM_NUM_SCALARS", "smega2", "smega2_estimate",
]


def _kernels(name: str):
    if name in ("cpu", "cuda"):
        return _backends.compiled_extension()[0]
    if name == "triton":
        return _backends.triton_module()[0]
    return reference


def _device_of(tensors: Sequence[Tensor]) -> torch.device:
    for t in tensors:
        return t.device
    return torch.device("cpu")


def _scalar_vector(values: list, device: torch.device) -> Tensor:
    """The per-step scalar vector on `device`, without a host synchronisation.

    On CUDA the values go through a freshly allocated pinned buffer and a non-blocking copy: the
    caching host allocator does not hand that buffer out again until the copy has run, so the next
    step cannot overwrite values a queued kernel has yet to read.
    """
    host = torch.tensor(values, dtype=torch.float32)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _as_list(x) -> list:
    return [] if x is None else list(x)


def _scale_tensor(x: Union[None, float, Tensor], device: torch.device, name: str) -> Optional[Tensor]:
    if x is None:
        return None
    if not isinstance(x, Tensor):
        return torch.full((1,), float(x), dtype=torch.float32, device=device)
    if x.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {list(x.shape)}")
    return x.reshape(1).to(device=device, dtype=torch.float32)


def _check_same_device(lists: dict, device: torch.device, op: str) -> None:
    for list_name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t.device != device:
                raise ValueError(
                    f"fusedmf.{op}: {list_name}[{i}] is on {t.device} but the tensors of one call must "
                    f"all be on {device} (the optimizers group tensors by device for you)"
                )


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
    inv_grad_scale: Union[None, float, Tensor] = None,
    found_inf: Optional[Tensor] = None,
    backend: str = "auto",
) -> str:
    """One fused MF-SGD / MF-NAG step over lists of tensors (see algorithms.md).

    ``momentum_buffers`` None/empty runs plain SGD (d = g). ``first_step`` makes the buffer start
    as g (torch semantics) without reading it.
    """
    params, grads = list(params), list(grads)
    momentum_buffers, master_params = _as_list(momentum_buffers), _as_list(master_params)
    scalars = sgd_step_scalars(
        lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        nesterov=nesterov, decoupled_weight_decay=decoupled_weight_decay, first_step=first_step,
    )
    return _run_sgd(params, grads, momentum_buffers, master_params, scalars, inv_grad_scale, found_inf, backend)


def _run_sgd(params, grads, momentum_buffers, master_params, scalars, inv_grad_scale, found_inf, backend) -> str:
    device = _device_of(params)
    _check_same_device({"params": params, "grads": grads, "momentum_buffers": momentum_buffers,
                        "master_params": master_params}, device, "mf_sgd")
    name = _backends.resolve(backend, device, params[0].dtype if params else None)
    inv = _scale_tensor(inv_grad_scale, device, "inv_grad_scale")
    found = _scale_tensor(found_inf, device, "found_inf") if found_inf is not None else None
    if name == "reference":
        reference.mf_sgd_(params, grads, momentum_buffers, master_params, scalars, inv, found)
    else:
        _kernels(name).mf_sgd_(params, grads, momentum_buffers, master_params,
                               _scalar_vector(scalars.as_list(), device), inv, found)
    return name


def mf_adam(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    master_params: Optional[Sequence[Tensor]] = None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    step: int,
    beta1_product: float,
    inv_grad_scale: Union[None, float, Tensor] = None,
    found_inf: Optional[Tensor] = None,
    backend: str = "auto",
) -> str:
    """One fused MF-Adam / MF-AdamW step. ``beta1_product`` is P_t including this step's beta1."""
    params, grads = list(params), list(grads)
    exp_avgs, exp_avg_sqs, master_params = list(exp_avgs), list(exp_avg_sqs), _as_list(master_params)
    scalars = adam_step_scalars(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay, step=step, beta1_product=beta1_product,
    )
    return _run_adam(params, grads, exp_avgs, exp_avg_sqs, master_params, scalars, inv_grad_scale, found_inf, backend)


def _run_adam(params, grads, exp_avgs, exp_avg_sqs, master_params, scalars, inv_grad_scale, found_inf, backend) -> str:
    device = _device_of(params)
    _check_same_device({"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
                        "master_params": master_params}, device, "mf_adam")
    name = _backends.resolve(backend, device, params[0].dtype if params else None)
    inv = _scale_tensor(inv_grad_scale, device, "inv_grad_scale")
    found = _scale_tensor(found_inf, device, "found_inf") if found_inf is not None else None
    if name == "reference":
        reference.mf_adam_(params, grads, exp_avgs, exp_avg_sqs, master_params, scalars, inv, found)
    else:
        _kernels(name).mf_adam_(params, grads, exp_avgs, exp_avg_sqs, master_params,
                                _scalar_vector(scalars.as_list(), device), inv, found)
    return name


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
    if sumsq is None:
        _kernels(name).non_finite_check_(tensors, found_inf)
    else:
        _kernels(name).non_finite_check_(tensors, found_inf, sumsq)
    return name


_PACK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: backends whose module has no ``pack_`` kernel yet, so the reference pack ran in their place
pack_fallbacks: set = set()


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

    Returns the name of what ran. A backend whose kernels do not include ``pack_`` yet falls back
    to the reference here, the one dispatch point, with a warning the first time; the fallback is
    reported by the return value ("reference") and recorded in ``pack_fallbacks``.
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
    kernel = None if name == "reference" else getattr(_kernels(name), "pack_", None)
    if kernel is None:
        if name != "reference" and name not in pack_fallbacks:
            pack_fallbacks.add(name)
            warnings.warn(f"fusedmf.pack: backend {name!r} has no pack_ kernel yet; the reference pack runs "
                          "in its place", RuntimeWarning, stacklevel=2)
        _reference_pack_(grads, out, scale, sumsq)
        return "reference"
    if sumsq is None:
        kernel(grads, out, scale)
    else:
        kernel(grads, out, scale, sumsq)
    return name


from .smega2 import smega2, smega2_estimate  # noqa: E402  (it uses the helpers above)
