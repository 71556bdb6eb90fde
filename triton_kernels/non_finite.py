"""Non-finite check: found_inf = 1 if any element of any tensor is inf or NaN (never cleared).

One multi-tensor launch per dtype present in the list. Programs that find a non-finite value all
store the same 1.0 (a benign race, no atomics); once found_inf is set, later programs and later
calls read it and skip their loads.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import _multi_tensor as mt
from ._common import COL_NUMEL, FP_FUSION, _load_f32

_COL_DATA = tl.constexpr(1)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def non_finite_kernel(tensor_table, block_table, found_inf_ptr, sumsq_ptr,
                      DTYPE: tl.constexpr, SUMSQ: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    if tl.load(found_inf_ptr) == 0.0:
        pid = tl.program_id(0).to(tl.int64)  # NOTE [multi-tensor tables]
        row = tl.load(block_table + 2 * pid)
        start = tl.load(block_table + 2 * pid + 1)
        row_ptr = tensor_table + row
        numel = tl.load(row_ptr + COL_NUMEL)
        offs = tl.arange(0, BLOCK)
        mask = offs < numel - start
        if start + BLOCK <= numel:
            x = _load_f32(row_ptr, _COL_DATA, start, offs, mask, DTYPE, ALIGNED, MASKED=False)
        else:  # masked lanes read 0.0, which is finite
            x = _load_f32(row_ptr, _COL_DATA, start, offs, mask, DTYPE, ALIGNED, MASKED=True)
        # |x| <= FLT_MAX is false exactly for +-inf and NaN (an ordered comparison). Widening
        # fp16/bf16 to fp32 keeps inf and NaN.
        finite = tl.abs(x) <= _FLT_MAX
        if tl.min(finite.to(tl.int32), axis=0) == 0:
            tl.store(found_inf_ptr, 1.0)
        if SUMSQ:  # one atomic add per program (NOTE [sums of squares], csrc/cpu/kernels_impl.h)
            tl.atomic_add(sumsq_ptr, tl.sum(x * x, axis=0))


@torch.no_grad()
def non_finite_check_(tensors: Sequence[torch.Tensor], found_inf: torch.Tensor,
                      sumsq: Optional[torch.Tensor] = None) -> None:
    """Set ``found_inf`` (a 1-element float32 tensor on the tensors' device) to 1.0 if any element
    of ``tensors`` is inf or NaN; never clears it. Tensors may mix fp32/fp16/bf16; zero-size
    tensors are skipped; a tensor that is not dense is checked through a contiguous copy.
    ``sumsq`` (optional, like found_inf): add the sum of the squares of the elements to it; its
    value is meaningless once found_inf is set (programs that see found_inf set skip their block)."""
    op = "non_finite_check_"
    if not isinstance(tensors, (list, tuple)):
        raise mt.InputError(f"{op}: tensors must be a list of tensors, got {type(tensors).__name__}")
    if not isinstance(found_inf, torch.Tensor):
        raise mt.InputError(f"{op}: found_inf must be a 1-element float32 tensor, got {type(found_inf).__name__}")
    device = found_inf.device
    mt.check_device_scalar(op, "found_inf", found_inf, device)
    mt.check_device_scalar(op, "sumsq", sumsq, device)
    if sumsq is not None and sumsq.data_ptr() == found_inf.data_ptr():
        raise mt.InputError(f"{op}: sumsq and found_inf are the same memory; they must be two tensors")
    groups = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise mt.InputError(f"{op}: tensors[{i}] is a {type(t).__name__}, not a tensor")
        if t.device != device:
            raise mt.InputError(f"{op}: tensors[{i}] is on {t.device} but found_inf is on {device}")
        if t.dtype not in mt.LOW_OR_FULL:
            raise mt.InputError(f"{op}: tensors[{i}] has dtype {t.dtype}; the Triton backend checks "
                                f"{mt._names(mt.LOW_OR_FULL)} tensors")
        if t.layout != torch.strided:
            raise mt.InputError(f"{op}: tensors[{i}] has layout {t.layout}; only strided tensors are supported")
        if t.numel() == 0:
            continue
        groups.setdefault(t.dtype, []).append(t)
    keep_alive = []
    for dtype, group in groups.items():
        rows = []
        for t in group:
            if not mt._is_non_overlapping_and_dense(t):
                t = t.contiguous()
                keep_alive.append(t)
            rows.append((t.numel(), t.data_ptr()))
        tables = mt.get_tables(device, rows, (dtype,))
        mt.launch(non_finite_kernel, tables, (found_inf, found_inf if sumsq is None else sumsq),
                  dict(DTYPE=mt.TORCH_TO_TL[dtype], SUMSQ=sumsq is not None),
                  **FP_FUSION)  # the squares are summed rounded, as in the interpreter
