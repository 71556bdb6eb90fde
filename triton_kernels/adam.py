"""MF-Adam / MF-AdamW: one multi-tensor launch per call (docs/algorithms.md, MF-Adam).

The order of floating-point operations is fusedmf/functional/reference.py::mf_adam_'s, with fma
where torch's CPU kernels fuse (NOTE [explicit fp fusion] in _common.py):
    g = grad * inv_scale ; if maximize: g = -g ; if l2 != 0: g = fma(w, l2, g)
    if decay_factor != 1: w = w * decay_factor
    m = lerp(m, g, one_minus_beta1)             torch's two-sided formula (see _lerp)
    v = fma(one_minus_beta2 * g, g, v * beta2)  (torch's mul_ then addcmul_)
    AMSGrad (HAS_MAX): vmax = maximum(vmax, v), NaN from either side propagating (torch.maximum)
    denom = sqrt(v, or vmax with AMSGrad) / bias_correction2_sqrt + eps
    w = (neg_step_size * m) / denom + w         (addcdiv as torch's CPU kernel rounds it)
Division and square root are the IEEE round-to-nearest ones (div_rn, sqrt_rn), as torch's: plain
``/`` and tl.sqrt compile to approximate instructions (div.full.f32, sqrt.approx) on NVIDIA GPUs.
torch's CPU sqrt (MKL's vsSqrt) is not correctly rounded, so MF-Adam agrees with the reference to
about an ulp, not bitwise (NOTE [fma placement] in csrc/update_math.h).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import _multi_tensor as mt
from ._common import COL_NUMEL, FP_FUSION, _load_f32, _store_f32
from ._slots import (
    ADAM_BETA2,
    ADAM_BIAS_CORRECTION2_SQRT,
    ADAM_DECAY_FACTOR,
    ADAM_EPS,
    ADAM_L2_WEIGHT_DECAY,
    ADAM_MAXIMIZE,
    ADAM_NEG_STEP_SIZE,
    ADAM_NUM_SCALARS,
    ADAM_ONE_MINUS_BETA1,
    ADAM_ONE_MINUS_BETA2,
)

_COL_PARAM = tl.constexpr(1)
_COL_GRAD = tl.constexpr(2)
_COL_EXP_AVG = tl.constexpr(3)
_COL_EXP_AVG_SQ = tl.constexpr(4)
_COL_MAX_EXP_AVG_SQ = tl.constexpr(5)
_COL_MASTER = tl.constexpr(6)

_ONE_MINUS_BETA1 = tl.constexpr(ADAM_ONE_MINUS_BETA1)
_BETA2 = tl.constexpr(ADAM_BETA2)
_ONE_MINUS_BETA2 = tl.constexpr(ADAM_ONE_MINUS_BETA2)
_EPS = tl.constexpr(ADAM_EPS)
_L2 = tl.constexpr(ADAM_L2_WEIGHT_DECAY)
_DECAY = tl.constexpr(ADAM_DECAY_FACTOR)
_NEG_STEP_SIZE = tl.constexpr(ADAM_NEG_STEP_SIZE)
_BC2_SQRT = tl.constexpr(ADAM_BIAS_CORRECTION2_SQRT)
_MAXIMIZE = tl.constexpr(ADAM_MAXIMIZE)


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp (aten/src/ATen/native/Lerp.h) as its CPU kernel rounds it: fma(weight, end - start,
    start) for |weight| < 0.5, else fma(weight - 1, end - start, end); ``weight`` is a scalar, so
    this is a uniform branch."""
    diff = end - start
    if tl.abs(weight) < 0.5:
        out = tl.fma(diff, weight, start)
    else:
        out = tl.fma(diff, weight - 1.0, end)
    return out


@triton.jit
def _adam_block(row_ptr, start, numel, scalars_ptr, inv_scale,
                PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                HAS_MAX: tl.constexpr, HAS_INV_SCALE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                MASKED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < numel - start  # used only when MASKED (the last block of a tensor)
    l2 = tl.load(scalars_ptr + _L2)
    decay = tl.load(scalars_ptr + _DECAY)
    one_minus_beta1 = tl.load(scalars_ptr + _ONE_MINUS_BETA1)
    beta2 = tl.load(scalars_ptr + _BETA2)
    one_minus_beta2 = tl.load(scalars_ptr + _ONE_MINUS_BETA2)
    eps = tl.load(scalars_ptr + _EPS)
    neg_step_size = tl.load(scalars_ptr + _NEG_STEP_SIZE)
    bc2_sqrt = tl.load(scalars_ptr + _BC2_SQRT)

    if HAS_MASTER:
        w = _load_f32(row_ptr, _COL_MASTER, start, offs, mask, tl.float32, ALIGNED, MASKED)
    else:
        w = _load_f32(row_ptr, _COL_PARAM, start, offs, mask, PARAM_DTYPE, ALIGNED, MASKED)
    g = _load_f32(row_ptr, _COL_GRAD, start, offs, mask, GRAD_DTYPE, ALIGNED, MASKED)
    m = _load_f32(row_ptr, _COL_EXP_AVG, start, offs, mask, tl.float32, ALIGNED, MASKED)
    v = _load_f32(row_ptr, _COL_EXP_AVG_SQ, start, offs, mask, tl.float32, ALIGNED, MASKED)

    if HAS_INV_SCALE:
        g = g * inv_scale
    if tl.load(scalars_ptr + _MAXIMIZE) != 0.0:
        g = -g  # exact; after unscaling and before L2, as reference.py::_unscaled
    if l2 != 0.0:
        g = tl.fma(w, l2, g)  # g.add(w, alpha=l2)
    if decay != 1.0:
        w = w * decay
    m = _lerp(m, g, one_minus_beta1)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)  # v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if HAS_MAX:  # AMSGrad: the denominator uses the running maximum of v
        vmax = _load_f32(row_ptr, _COL_MAX_EXP_AVG_SQ, start, offs, mask, tl.float32, ALIGNED, MASKED)
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)  # torch.maximum: NaN wins
        _store_f32(row_ptr, _COL_MAX_EXP_AVG_SQ, start, offs, vmax, mask, tl.float32, ALIGNED, MASKED)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    # w.addcdiv(m, denom, value=neg_step_size): torch's CPU kernel computes w + (value * m) / denom
    w = tl.div_rn(neg_step_size * m, denom) + w

    _store_f32(row_ptr, _COL_EXP_AVG, start, offs, m, mask, tl.float32, ALIGNED, MASKED)
    _store_f32(row_ptr, _COL_EXP_AVG_SQ, start, offs, v, mask, tl.float32, ALIGNED, MASKED)
    if HAS_MASTER:
        _store_f32(row_ptr, _COL_MASTER, start, offs, w, mask, tl.float32, ALIGNED, MASKED)
    _store_f32(row_ptr, _COL_PARAM, start, offs, w, mask, PARAM_DTYPE, ALIGNED, MASKED)


@triton.jit
def mf_adam_kernel(tensor_table, block_table, scalars_ptr, inv_grad_scale_ptr, found_inf_ptr,
                   PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                   HAS_MAX: tl.constexpr, HAS_INV_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
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
            _adam_block(row_ptr, start, numel, scalars_ptr, inv_scale, PARAM_DTYPE, GRAD_DTYPE, HAS_MASTER,
                        HAS_MAX, HAS_INV_SCALE, ALIGNED, BLOCK, MASKED=False)
        else:
            _adam_block(row_ptr, start, numel, scalars_ptr, inv_scale, PARAM_DTYPE, GRAD_DTYPE, HAS_MASTER,
                        HAS_MAX, HAS_INV_SCALE, ALIGNED, BLOCK, MASKED=True)


@torch.no_grad()
def mf_adam_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    master_params: Sequence[torch.Tensor],
    scalars: torch.Tensor,
    inv_grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One fused MF-Adam / MF-AdamW step, in place; the compiled binding's contract.

    ``scalars``: float32 vector laid out as ADAM_SLOTS, on the params' device. ``max_exp_avg_sqs``
    empty: Adam; else AMSGrad, one fp32 tensor per param holding the running maximum of
    exp_avg_sqs (read and written). Masters, found_inf and inv_grad_scale as in mf_sgd_.
    """
    op = "mf_adam_"
    lists = [
        mt.TensorList("params", params, mt.LOW_OR_FULL),
        mt.TensorList("grads", grads, mt.LOW_OR_FULL),
        mt.TensorList("exp_avgs", exp_avgs, mt.FP32_ONLY),
        mt.TensorList("exp_avg_sqs", exp_avg_sqs, mt.FP32_ONLY),
        mt.TensorList("max_exp_avg_sqs", max_exp_avg_sqs, mt.FP32_ONLY, optional=True),
        mt.TensorList("master_params", master_params, mt.FP32_ONLY, optional=True),
    ]
    checked = mt.check_update_inputs(op, lists, scalars, ADAM_NUM_SCALARS, inv_grad_scale, found_inf)
    if checked is None:
        return
    device, dtypes, rows = checked
    if not rows:
        return  # only zero-size tensors
    tables = mt.get_tables(device, rows, dtypes)
    mt.launch(
        mf_adam_kernel, tables,
        (scalars, inv_grad_scale if inv_grad_scale is not None else scalars,
         found_inf if found_inf is not None else scalars),
        dict(PARAM_DTYPE=mt.TORCH_TO_TL[dtypes[0]], GRAD_DTYPE=mt.TORCH_TO_TL[dtypes[1]],
             HAS_MASTER=dtypes[5] is not None, HAS_MAX=dtypes[4] is not None,
             HAS_INV_SCALE=inv_grad_scale is not None, HAS_FOUND_INF=found_inf is not None),
        **FP_FUSION,
    )
