"""pack_delta_ and apply_average_ in Triton: the fused model averaging of fusedmf.comm.LocalSGD.

Specification: fusedmf/functional/average.py (NOTE [model averaging rounding]); the same rounding
as the compiled kernels (csrc/average.cpp, csrc/cuda/average.cu): every operation rounds once in
fp32, nothing fused, casts to nearest even (NOTE [exact bf16 casts]).

One multi-tensor launch per call (NOTE [multi-tensor tables]). Registered as the torch ops
``torch.ops.fusedmf.triton_pack_delta_`` / ``triton_apply_average_`` (CPU and CUDA tensors; CPU
tensors run under TRITON_INTERPRET=1), with the schemas of the compiled ops.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import _multi_tensor as mt
from ._common import COL_NUMEL, FP_FUSION, _load_f32, _store_f32

_FP32 = (torch.float32,)

# tensor-table columns (after COL_NUMEL)
_D_OUT = tl.constexpr(1)
_D_SRC = tl.constexpr(2)
_D_CONS = tl.constexpr(3)
_A_AVG = tl.constexpr(1)
_A_CONS = tl.constexpr(2)
_A_MASTER = tl.constexpr(3)
_A_PARAM = tl.constexpr(4)


@triton.jit
def pack_delta_kernel(tensor_table, block_table, scale, SRC_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                      ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(block_table + 2 * pid)
    start = tl.load(block_table + 2 * pid + 1)
    row_ptr = tensor_table + row
    numel = tl.load(row_ptr + COL_NUMEL)
    offs = tl.arange(0, BLOCK)
    mask = offs < numel - start
    if start + BLOCK <= numel:
        w = _load_f32(row_ptr, _D_SRC, start, offs, mask, SRC_DTYPE, ALIGNED, MASKED=False)
        c = _load_f32(row_ptr, _D_CONS, start, offs, mask, tl.float32, ALIGNED, MASKED=False)
        _store_f32(row_ptr, _D_OUT, start, offs, (w - c) * scale, mask, OUT_DTYPE, ALIGNED, MASKED=False)
    else:
        w = _load_f32(row_ptr, _D_SRC, start, offs, mask, SRC_DTYPE, ALIGNED, MASKED=True)
        c = _load_f32(row_ptr, _D_CONS, start, offs, mask, tl.float32, ALIGNED, MASKED=True)
        _store_f32(row_ptr, _D_OUT, start, offs, (w - c) * scale, mask, OUT_DTYPE, ALIGNED, MASKED=True)


@triton.jit
def apply_average_kernel(tensor_table, block_table, AVG_DTYPE: tl.constexpr, PARAM_DTYPE: tl.constexpr,
                         HAS_MASTER: tl.constexpr, UPDATE: tl.constexpr, ALIGNED: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(block_table + 2 * pid)
    start = tl.load(block_table + 2 * pid + 1)
    row_ptr = tensor_table + row
    numel = tl.load(row_ptr + COL_NUMEL)
    offs = tl.arange(0, BLOCK)
    mask = offs < numel - start
    if start + BLOCK <= numel:
        a = _load_f32(row_ptr, _A_AVG, start, offs, mask, AVG_DTYPE, ALIGNED, MASKED=False)
        c = _load_f32(row_ptr, _A_CONS, start, offs, mask, tl.float32, ALIGNED, MASKED=False)
        m = c + a
        if UPDATE:
            _store_f32(row_ptr, _A_CONS, start, offs, m, mask, tl.float32, ALIGNED, MASKED=False)
        if HAS_MASTER:
            _store_f32(row_ptr, _A_MASTER, start, offs, m, mask, tl.float32, ALIGNED, MASKED=False)
        _store_f32(row_ptr, _A_PARAM, start, offs, m, mask, PARAM_DTYPE, ALIGNED, MASKED=False)
    else:
        a = _load_f32(row_ptr, _A_AVG, start, offs, mask, AVG_DTYPE, ALIGNED, MASKED=True)
        c = _load_f32(row_ptr, _A_CONS, start, offs, mask, tl.float32, ALIGNED, MASKED=True)
        m = c + a
        if UPDATE:
            _store_f32(row_ptr, _A_CONS, start, offs, m, mask, tl.float32, ALIGNED, MASKED=True)
        if HAS_MASTER:
            _store_f32(row_ptr, _A_MASTER, start, offs, m, mask, tl.float32, ALIGNED, MASKED=True)
        _store_f32(row_ptr, _A_PARAM, start, offs, m, mask, PARAM_DTYPE, ALIGNED, MASKED=True)


def _validate(op: str, lists):
    """(device, dtypes, rows) after the checks of _multi_tensor (messages name the list and index)."""
    head = lists[0]
    for lst in lists:
        if not isinstance(lst.tensors, (list, tuple)):
            raise mt.InputError(f"{op}: {lst.name} must be a list of tensors, got {type(lst.tensors).__name__}")
        if len(lst.tensors) != len(head.tensors) and not (lst.optional and len(lst.tensors) == 0):
            raise mt.InputError(f"{op}: {lst.name} has {len(lst.tensors)} tensors but {head.name} has "
                                f"{len(head.tensors)}")
    if not head.tensors:
        return None
    try:
        checked = mt._validate_fast(lists)
    except Exception:
        checked = None
    if checked is None:
        mt._explain(op, lists)
        raise mt.InputError(f"{op}: invalid tensor lists")
    device = checked[0]
    if device.type == "meta":
        raise mt.InputError(f"{op}: tensors on meta; the Triton backend runs on CUDA tensors "
                            "(or CPU tensors under TRITON_INTERPRET=1)")
    for lst in lists[1:]:   # written lists must not alias another list of the same index
        for i, t in enumerate(lst.tensors):
            if t.numel() and any(o is not lst and o.tensors and o.tensors[i].data_ptr() == t.data_ptr()
                                 for o in lists):
                raise mt.InputError(f"{op}: {lst.name}[{i}] shares its memory with another list's tensor {i}")
    return checked


@torch.no_grad()
def pack_delta_(sources: Sequence[torch.Tensor], consensus: Sequence[torch.Tensor], out: Sequence[torch.Tensor],
                scale: float) -> None:
    """out[i] = cast((fp32(sources[i]) - consensus[i]) * scale); see the module docstring."""
    op = "pack_delta_"
    lists = [mt.TensorList("sources", sources, mt.LOW_OR_FULL), mt.TensorList("out", out, mt.LOW_OR_FULL),
             mt.TensorList("consensus", consensus, _FP32)]
    checked = _validate(op, lists)
    if checked is None:
        return
    device, dtypes, rows = checked
    # columns: numel, out, source, consensus
    rows = [(r[0], r[2], r[1], r[3]) for r in rows]
    tables = mt.get_tables(device, rows, (dtypes[1], dtypes[0], dtypes[2]))
    mt.launch(pack_delta_kernel, tables, (float(scale),),
              dict(SRC_DTYPE=mt.TORCH_TO_TL[dtypes[0]], OUT_DTYPE=mt.TORCH_TO_TL[dtypes[1]]), **FP_FUSION)


@torch.no_grad()
def apply_average_(averages: Sequence[torch.Tensor], consensus: Sequence[torch.Tensor],
                   masters: Sequence[torch.Tensor], params: Sequence[torch.Tensor], update_consensus: bool) -> None:
    """m = consensus[i] + fp32(averages[i]); masters[i] = m; params[i] = cast(m); consensus[i] = m if update."""
    op = "apply_average_"
    lists = [mt.TensorList("params", params, mt.LOW_OR_FULL), mt.TensorList("averages", averages, mt.LOW_OR_FULL),
             mt.TensorList("consensus", consensus, _FP32), mt.TensorList("masters", masters, _FP32, optional=True)]
    checked = _validate(op, lists)
    if checked is None:
        return
    device, dtypes, rows = checked
    # columns: numel, avg, consensus, master (0 if absent), param
    rows = [(r[0], r[2], r[3], r[4], r[1]) for r in rows]
    tables = mt.get_tables(device, rows, (dtypes[1], dtypes[2], dtypes[3], dtypes[0]))
    mt.launch(apply_average_kernel, tables, (),
              dict(AVG_DTYPE=mt.TORCH_TO_TL[dtypes[1]], PARAM_DTYPE=mt.TORCH_TO_TL[dtypes[0]],
                   HAS_MASTER=bool(masters), UPDATE=bool(update_consensus)), **FP_FUSION)


# ---- torch op registration: torch.ops.fusedmf.triton_pack_delta_ / triton_apply_average_ ---------
_LIB = torch.library.Library("fusedmf", "FRAGMENT")
_SCHEMAS = {
    "triton_pack_delta_": ("(Tensor[] sources, Tensor[] consensus, Tensor(a!)[] out, float scale) -> ()", pack_delta_),
    "triton_apply_average_": ("(Tensor[] averages, Tensor(a!)[] consensus, Tensor(b!)[] masters, Tensor(c!)[] params, "
                              "bool update_consensus) -> ()", apply_average_),
}
for _name, (_schema, _fn) in _SCHEMAS.items():
    if not hasattr(torch.ops.fusedmf, _name):
        _LIB.define(_name + _schema)
        _LIB.impl(_name, _fn, "CPU")
        _LIB.impl(_name, _fn, "CUDA")
        torch.library.register_fake("fusedmf::" + _name, lib=_LIB)(lambda *args, **kwargs: None)
