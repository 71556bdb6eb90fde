"""SMEGA2's master step and look-ahead estimate: one multi-tensor launch each (docs/algorithms.md, SMEGA2).

The operations are fusedmf/functional/reference.py's smega2_ / smega2_estimate_, in its order, with
tl.fma exactly where the reference (torch's CPU kernels) fuses a multiply-add (NOTE [fma placement]
in csrc/update_math.h), and the launch compiled with enable_fp_fusion=False so that Triton adds no
contraction of its own (NOTE [explicit fp fusion] in _common.py): on a GPU the kernels round as the
CUDA and CPU kernels do. (Triton's interpreter evaluates tl.fma as a product and a sum, each
rounded, so under TRITON_INTERPRET=1 results differ from the reference by a few fp32 ulps.)

    g = grad * inv_scale ; if maximize: g = -g ; if l2 != 0: g = fma(w, l2, g)
    G = G + g ;  d = fma(v, momentum, g)
    if cycle_end: v = fma(G, momentum_scale, v * momentum) ; G = 0      (v is written only then)
    w = fma(d, -lr, w)
estimate:  e = w ; if accumulator_coef != 0: e = fma(G, accumulator_coef, e) ; e = fma(v, momentum_coef, e)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import _multi_tensor as mt
from ._common import COL_NUMEL, FP_FUSION, _load_f32, _store_f32
from ._slots import (
    SMEGA2_CYCLE_END,
    SMEGA2_ESTIMATE_ACCUMULATOR_COEF,
    SMEGA2_ESTIMATE_MOMENTUM_COEF,
    SMEGA2_ESTIMATE_NUM_SCALARS,
    SMEGA2_L2_WEIGHT_DECAY,
    SMEGA2_LR,
    SMEGA2_MAXIMIZE,
    SMEGA2_MOMENTUM,
    SMEGA2_MOMENTUM_SCALE,
    SMEGA2_NUM_SCALARS,
)

# Tensor-table columns of the step (after COL_NUMEL), in the order of its `lists` below.
_COL_PARAM = tl.constexpr(1)
_COL_GRAD = tl.constexpr(2)
_COL_MOMENTUM = tl.constexpr(3)
_COL_ACCUMULATOR = tl.constexpr(4)
_COL_MASTER = tl.constexpr(5)
# ... and of the estimate: the weights read (the masters when there are, else the params)
_COL_E_WEIGHTS = tl.constexpr(1)
_COL_E_MOMENTUM = tl.constexpr(2)
_COL_E_ACCUMULATOR = tl.constexpr(3)
_COL_E_OUT = tl.constexpr(4)

_LR = tl.constexpr(SMEGA2_LR)
_MOMENTUM = tl.constexpr(SMEGA2_MOMENTUM)
_MOMENTUM_SCALE = tl.constexpr(SMEGA2_MOMENTUM_SCALE)
_L2 = tl.constexpr(SMEGA2_L2_WEIGHT_DECAY)
_CYCLE_END = tl.constexpr(SMEGA2_CYCLE_END)
_MAXIMIZE = tl.constexpr(SMEGA2_MAXIMIZE)
_ACC_COEF = tl.constexpr(SMEGA2_ESTIMATE_ACCUMULATOR_COEF)
_MOM_COEF = tl.constexpr(SMEGA2_ESTIMATE_MOMENTUM_COEF)


@triton.jit
def _smega2_block(row_ptr, start, numel, scalars_ptr, inv_scale,
                  PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                  HAS_INV_SCALE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < numel - start  # used only when MASKED (the last block of a tensor)
    lr = tl.load(scalars_ptr + _LR)
    momentum = tl.load(scalars_ptr + _MOMENTUM)
    l2 = tl.load(scalars_ptr + _L2)

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
        g = tl.fma(w, l2, g)
    v = _load_f32(row_ptr, _COL_MOMENTUM, start, offs, mask, tl.float32, ALIGNED, MASKED)
    acc = _load_f32(row_ptr, _COL_ACCUMULATOR, start, offs, mask, tl.float32, ALIGNED, MASKED)
    acc = acc + g
    d = tl.fma(v, momentum, g)  # with the old buffer
    if tl.load(scalars_ptr + _CYCLE_END) != 0.0:
        momentum_scale = tl.load(scalars_ptr + _MOMENTUM_SCALE)
        v = tl.fma(acc, momentum_scale, v * momentum)
        _store_f32(row_ptr, _COL_MOMENTUM, start, offs, v, mask, tl.float32, ALIGNED, MASKED)
        acc = tl.zeros_like(acc)
    _store_f32(row_ptr, _COL_ACCUMULATOR, start, offs, acc, mask, tl.float32, ALIGNED, MASKED)
    w = tl.fma(d, -lr, w)
    if HAS_MASTER:
        _store_f32(row_ptr, _COL_MASTER, start, offs, w, mask, tl.float32, ALIGNED, MASKED)
    _store_f32(row_ptr, _COL_PARAM, start, offs, w, mask, PARAM_DTYPE, ALIGNED, MASKED)


@triton.jit
def smega2_kernel(tensor_table, block_table, scalars_ptr, inv_grad_scale_ptr, found_inf_ptr,
                  PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                  HAS_INV_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr,
                  BLOCK: tl.constexpr):
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
            _smega2_block(row_ptr, start, numel, scalars_ptr, inv_scale, PARAM_DTYPE, GRAD_DTYPE, HAS_MASTER,
                          HAS_INV_SCALE, ALIGNED, BLOCK, MASKED=False)
        else:
            _smega2_block(row_ptr, start, numel, scalars_ptr, inv_scale, PARAM_DTYPE, GRAD_DTYPE, HAS_MASTER,
                          HAS_INV_SCALE, ALIGNED, BLOCK, MASKED=True)


@triton.jit
def _estimate_block(row_ptr, start, numel, scalars_ptr, WEIGHT_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < numel - start
    acc_coef = tl.load(scalars_ptr + _ACC_COEF)
    mom_coef = tl.load(scalars_ptr + _MOM_COEF)
    e = _load_f32(row_ptr, _COL_E_WEIGHTS, start, offs, mask, WEIGHT_DTYPE, ALIGNED, MASKED)
    if acc_coef != 0.0:  # the naive estimate does not read G
        acc = _load_f32(row_ptr, _COL_E_ACCUMULATOR, start, offs, mask, tl.float32, ALIGNED, MASKED)
        e = tl.fma(acc, acc_coef, e)
    v = _load_f32(row_ptr, _COL_E_MOMENTUM, start, offs, mask, tl.float32, ALIGNED, MASKED)
    e = tl.fma(v, mom_coef, e)
    _store_f32(row_ptr, _COL_E_OUT, start, offs, e, mask, OUT_DTYPE, ALIGNED, MASKED)


@triton.jit
def smega2_estimate_kernel(tensor_table, block_table, scalars_ptr, WEIGHT_DTYPE: tl.constexpr,
                           OUT_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # NOTE [multi-tensor tables]
    row = tl.load(block_table + 2 * pid)
    start = tl.load(block_table + 2 * pid + 1)
    row_ptr = tensor_table + row
    numel = tl.load(row_ptr + COL_NUMEL)
    if start + BLOCK <= numel:
        _estimate_block(row_ptr, start, numel, scalars_ptr, WEIGHT_DTYPE, OUT_DTYPE, ALIGNED, BLOCK, MASKED=False)
    else:
        _estimate_block(row_ptr, start, numel, scalars_ptr, WEIGHT_DTYPE, OUT_DTYPE, ALIGNED, BLOCK, MASKED=True)


def _check_not_aliased(op: str, written: "mt.TensorList", lists) -> None:
    """written.tensors[i] must not be the memory of another list's tensor i (it would corrupt state)."""
    for i, w in enumerate(written.tensors):
        if w.numel() == 0:
            continue
        for lst in lists:
            if lst is not written and lst.tensors and lst.tensors[i].data_ptr() == w.data_ptr():
                raise mt.InputError(f"{op}: {written.name}[{i}] and {lst.name}[{i}] are the same memory; they must "
                                    "be separate tensors")


@torch.no_grad()
def smega2_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    grad_accumulators: Sequence[torch.Tensor],
    master_params: Sequence[torch.Tensor],
    scalars: torch.Tensor,
    inv_grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One SMEGA2 master step, in place; the contract of torch.ops.fusedmf.smega2_.

    ``scalars``: float32 vector laid out as SMEGA2_SLOTS on the params' device; ``inv_grad_scale``
    / ``found_inf``: optional 1-element float32 device tensors read by the kernel."""
    op = "smega2_"
    lists = [
        mt.TensorList("params", params, mt.LOW_OR_FULL),
        mt.TensorList("grads", grads, mt.LOW_OR_FULL),
        mt.TensorList("momentum_buffers", momentum_buffers, mt.FP32_ONLY),
        mt.TensorList("grad_accumulators", grad_accumulators, mt.FP32_ONLY),
        mt.TensorList("master_params", master_params, mt.FP32_ONLY, optional=True),
    ]
    checked = mt.check_update_inputs(op, lists, scalars, SMEGA2_NUM_SCALARS, inv_grad_scale, found_inf)
    if checked is None:
        return
    for written in (lists[0], lists[2], lists[3], lists[4]):
        _check_not_aliased(op, written, lists)
    device, dtypes, rows = checked
    if not rows:
        return  # only zero-size tensors
    tables = mt.get_tables(device, rows, dtypes)
    mt.launch(
        smega2_kernel, tables,
        (scalars, inv_grad_scale if inv_grad_scale is not None else scalars,
         found_inf if found_inf is not None else scalars),
        dict(PARAM_DTYPE=mt.TORCH_TO_TL[dtypes[0]], GRAD_DTYPE=mt.TORCH_TO_TL[dtypes[1]],
             HAS_MASTER=dtypes[4] is not None, HAS_INV_SCALE=inv_grad_scale is not None,
             HAS_FOUND_INF=found_inf is not None),
        **FP_FUSION,
    )


@torch.no_grad()
def smega2_estimate_(
    params: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    grad_accumulators: Sequence[torch.Tensor],
    master_params: Sequence[torch.Tensor],
    out: Sequence[torch.Tensor],
    scalars: torch.Tensor,
) -> None:
    """SMEGA2's look-ahead weights into ``out``; the contract of torch.ops.fusedmf.smega2_estimate_.

    ``scalars``: float32 vector laid out as SMEGA2_ESTIMATE_SLOTS on the params' device."""
    op = "smega2_estimate_"
    lists = [
        mt.TensorList("params", params, mt.LOW_OR_FULL),
        mt.TensorList("momentum_buffers", momentum_buffers, mt.FP32_ONLY),
        mt.TensorList("grad_accumulators", grad_accumulators, mt.FP32_ONLY),
        mt.TensorList("master_params", master_params, mt.FP32_ONLY, optional=True),
        mt.TensorList("out", out, mt.LOW_OR_FULL),
    ]
    checked = mt.check_update_inputs(op, lists, scalars, SMEGA2_ESTIMATE_NUM_SCALARS, None, None)
    if checked is None:
        return
    _check_not_aliased(op, lists[4], lists)
    device, dtypes, rows = checked
    if not rows:
        return
    master = dtypes[3] is not None
    # rows: (numel, param, momentum, accumulator, master, out) -> (numel, weights, momentum, accumulator, out)
    rows = [(r[0], r[4] if master else r[1], r[2], r[3], r[5]) for r in rows]
    weight_dtype = torch.float32 if master else dtypes[0]
    tables = mt.get_tables(device, rows, [weight_dtype, dtypes[1], dtypes[2], dtypes[4]])
    mt.launch(smega2_estimate_kernel, tables, (scalars,),
              dict(WEIGHT_DTYPE=mt.TORCH_TO_TL[weight_dtype], OUT_DTYPE=mt.TORCH_TO_TL[dtypes[4]]),
              **FP_FUSION)
