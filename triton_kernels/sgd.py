"""MF-SGD / MF-NAG: one multi-tensor launch per call (docs/algorithms.md, MF-SGD and MF-NAG).

The order of floating-point operations is fusedmf/functional/reference.py::mf_sgd_'s, with fma
where torch's CPU kernels fuse (NOTE [explicit fp fusion] in _common.py):
    g = grad * inv_scale ; if maximize: g = -g ; if l2 != 0: g = fma(w, l2, g)
    u = g (first step, the buffer is not read) | fma(g, one_minus_dampening, u * momentum)
    d = fma(u, momentum, g) (nesterov) | u     (d = g without momentum buffers)
    if decay_factor != 1: w = w * decay_factor
    w = fma(d, -lr, w)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import _multi_tensor as mt
from ._common import COL_NUMEL, FP_FUSION, _load_f32, _store_f32
from ._slots import (
    SGD_DECAY_FACTOR,
    SGD_FIRST_STEP,
    SGD_L2_WEIGHT_DECAY,
    SGD_LR,
    SGD_MAXIMIZE,
    SGD_MOMENTUM,
    SGD_NESTEROV,
    SGD_NUM_SCALARS,
    SGD_ONE_MINUS_DAMPENING,
)

# Tensor-table columns (after COL_NUMEL): one per list, in the order of the `lists` below.
_COL_PARAM = tl.constexpr(1)
_COL_GRAD = tl.constexpr(2)
_COL_MOMENTUM = tl.constexpr(3)
_COL_MASTER = tl.constexpr(4)

_LR = tl.constexpr(SGD_LR)
_MOMENTUM = tl.constexpr(SGD_MOMENTUM)
_ONE_MINUS_DAMPENING = tl.constexpr(SGD_ONE_MINUS_DAMPENING)
_L2 = tl.constexpr(SGD_L2_WEIGHT_DECAY)
_DECAY = tl.constexpr(SGD_DECAY_FACTOR)
_NESTEROV = tl.constexpr(SGD_NESTEROV)
_FIRST_STEP = tl.constexpr(SGD_FIRST_STEP)
_MAXIMIZE = tl.constexpr(SGD_MAXIMIZE)


@triton.jit
def _sgd_block(row_ptr, start, numel, scalars_ptr, inv_scale,
               PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
               HAS_MASTER: tl.constexpr, HAS_INV_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
               BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < numel - start  # used only when MASKED (the last block of a tensor)
    lr = tl.load(scalars_ptr + _LR)
    l2 = tl.load(scalars_ptr + _L2)
    decay = tl.load(scalars_ptr + _DECAY)

    if HAS_MASTER:
        w = _load_f32(row_ptr, _COL_MASTER, start, offs, mask, tl.float32, ALIGNED, MASKED)
    else:
        w = _load_f32(row_ptr, _COL_PARAM, start, offs, mask, PARAM_DTYPE, ALIGNED, MASKED)
    g = _load_f32(row_ptr, _COL_GRAD, start, offs, mask, GRAD_DTYPE, ALIGNED, MASKED)
    if HAS_INV_SCALE:
        g = g * inv_scale
    if tl.load(scalars_ptr + _MAXIMIZE) != 0.0:
        g = -g  # exact; after unscaling and before L2, as reference.py::_unscaled
    if l2 != 0.0:
        g = tl.fma(w, l2, g)  # g.add(w, alpha=l2)

    if HAS_MOMENTUM:
        momentum = tl.load(scalars_ptr + _MOMENTUM)
        if tl.load(scalars_ptr + _FIRST_STEP) != 0.0:
            u = g  # the buffer starts as g and is not read (it may hold garbage)
        else:
            one_minus_dampening = tl.load(scalars_ptr + _ONE_MINUS_DAMPENING)
            u = _load_f32(row_ptr, _COL_MOMENTUM, start, offs, mask, tl.float32, ALIGNED, MASKED)
            u = tl.fma(g, one_minus_dampening, u * momentum)  # buf.mul_(momentum).add_(g, alpha=1 - dampening)
        _store_f32(row_ptr, _COL_MOMENTUM, start, offs, u, mask, tl.float32, ALIGNED, MASKED)
        if tl.load(scalars_ptr + _NESTEROV) != 0.0:
            d = tl.fma(u, momentum, g)  # g.add(u, alpha=momentum)
        else:
            d = u
    else:
        d = g

    if decay != 1.0:
        w = w * decay
    w = tl.fma(d, -lr, w)  # w.add(d, alpha=-lr)
    if HAS_MASTER:
        _store_f32(row_ptr, _COL_MASTER, start, offs, w, mask, tl.float32, ALIGNED, MASKED)
    _store_f32(row_ptr, _COL_PARAM, start, offs, w, mask, PARAM_DTYPE, ALIGNED, MASKED)


@triton.jit
def mf_sgd_kernel(tensor_table, block_table, scalars_ptr, inv_grad_scale_ptr, found_inf_ptr,
                  PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                  HAS_MASTER: tl.constexpr, HAS_INV_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                  ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    found_inf = 0.0
    if HAS_FOUND_INF:
        found_inf = tl.load(found_inf_ptr)
    if found_inf == 0.0:  # NOTE [skip on overflow]: otherwise write nothing at all
        pid = tl.program_id(0).to(tl.int64)  # NOTE [multi-tensor tables]
        row = tl.load(block_table + 2 * pid)
        start = tl.load(block_table + 2 * pid + 1)
        row_ptr = tensor_table + row
        numel = tl.load(row_ptr + COL_NUMEL)
        inv_scale = 1.0
        if HAS_INV_SCALE:
            inv_scale = tl.load(inv_grad_scale_ptr)
        if start + BLOCK <= numel:
            _sgd_block(row_ptr, start, numel, scalars_ptr, inv_scale, PARAM_DTYPE, GRAD_DTYPE, HAS_MOMENTUM,
                       HAS_MASTER, HAS_INV_SCALE, ALIGNED, BLOCK, MASKED=False)
        else:
            _sgd_block(row_ptr, start, numel, scalars_ptr, inv_scale, PARAM_DTYPE, GRAD_DTYPE, HAS_MOMENTUM,
                       HAS_MASTER, HAS_INV_SCALE, ALIGNED, BLOCK, MASKED=True)


@torch.no_grad()
def mf_sgd_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    master_params: Sequence[torch.Tensor],
    scalars: torch.Tensor,
    inv_grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One fused MF-SGD / MF-NAG step, in place; the compiled binding's contract.

    ``momentum_buffers`` empty: no momentum (d = g). ``master_params`` empty: params are updated in
    place in fp32 arithmetic; else the fp32 masters are updated and params written as their
    round-to-nearest-even copy. ``scalars``: float32 vector laid out as SGD_SLOTS, on the params'
    device. ``inv_grad_scale`` / ``found_inf``: optional 1-element float32 device tensors, read by
    the kernel (found_inf != 0: nothing is written).
    """
    op = "mf_sgd_"
    lists = [
        mt.TensorList("params", params, mt.LOW_OR_FULL),
        mt.TensorList("grads", grads, mt.LOW_OR_FULL),
        mt.TensorList("momentum_buffers", momentum_buffers, mt.FP32_ONLY, optional=True),
        mt.TensorList("master_params", master_params, mt.FP32_ONLY, optional=True),
    ]
    checked = mt.check_update_inputs(op, lists, scalars, SGD_NUM_SCALARS, inv_grad_scale, found_inf)
    if checked is None:
        return
    device, dtypes, rows = checked
    if not rows:
        return  # only zero-size tensors
    tables = mt.get_tables(device, rows, dtypes)
    mt.launch(
        mf_sgd_kernel, tables,
        (scalars, inv_grad_scale if inv_grad_scale is not None else scalars,
         found_inf if found_inf is not None else scalars),
        dict(PARAM_DTYPE=mt.TORCH_TO_TL[dtypes[0]], GRAD_DTYPE=mt.TORCH_TO_TL[dtypes[1]],
             HAS_MOMENTUM=dtypes[2] is not None, HAS_MASTER=dtypes[3] is not None,
             HAS_INV_SCALE=inv_grad_scale is not None, HAS_FOUND_INF=found_inf is not None),
        **FP_FUSION,
    )
