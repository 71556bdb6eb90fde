"""pack_: gather gradients into one flat buffer, prescaled and cast (NOTE [pack layout] in
fusedmf/functional/pack.py, whose reference ``pack_`` is the specification).

Grad i goes to ``out[offsets[i]:offsets[i] + numel]`` in its own memory order (a channels_last grad
stays channels_last), where every slot starts on a 16-byte boundary; the padding between slots is
never written. The value is ``cast(fp32(grad) * scale)``: the product in fp32, rounded once to
out's dtype (to nearest, ties to even; NOTE [exact bf16 casts]).

One multi-tensor launch per call (NOTE [multi-tensor tables]): the tensor table holds, per
non-empty grad, [numel, address of its slot (out + offsets[i]), address of the grad]. Grads may mix
fp32/fp16/bf16 (a bucket can hold params of several dtypes); then there is one launch per grad
dtype present. A grad that is not dense is packed from a copy laid out as ``torch.empty_like``,
the slot order of the reference.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import _multi_tensor as mt
from ._common import COL_NUMEL, FP_FUSION, _load_f32, _store_f32

# NOTE [pack layout]: the one definition of the slot offsets is fusedmf/functional/pack.py's
from fusedmf.functional.pack import PACK_ALIGN_BYTES, pack_offsets  # noqa: E402

# Tensor-table columns (after COL_NUMEL), in the order of the rows built below.
_COL_OUT = tl.constexpr(1)
_COL_GRAD = tl.constexpr(2)


@triton.jit
def pack_kernel(tensor_table, block_table, scale, sumsq_ptr,
                GRAD_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, SUMSQ: tl.constexpr, ALIGNED: tl.constexpr,
                BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # NOTE [multi-tensor tables]
    row = tl.load(block_table + 2 * pid)
    start = tl.load(block_table + 2 * pid + 1)
    row_ptr = tensor_table + row
    numel = tl.load(row_ptr + COL_NUMEL)
    offs = tl.arange(0, BLOCK)
    mask = offs < numel - start  # used only for the last block of a grad: the padding is never written
    if start + BLOCK <= numel:
        g = _load_f32(row_ptr, _COL_GRAD, start, offs, mask, GRAD_DTYPE, ALIGNED, MASKED=False)
        p = g * scale
        _store_f32(row_ptr, _COL_OUT, start, offs, p, mask, OUT_DTYPE, ALIGNED, MASKED=False)
    else:  # masked lanes read 0.0: they add nothing to the sum of squares
        g = _load_f32(row_ptr, _COL_GRAD, start, offs, mask, GRAD_DTYPE, ALIGNED, MASKED=True)
        p = g * scale
        _store_f32(row_ptr, _COL_OUT, start, offs, p, mask, OUT_DTYPE, ALIGNED, MASKED=True)
    if SUMSQ:  # the squared fp32 products, one atomic add per program (NOTE [sums of squares], csrc/cpu/kernels_impl.h)
        tl.atomic_add(sumsq_ptr, tl.sum(p * p, axis=0))


def _check_out(op: str, out) -> None:
    if not isinstance(out, torch.Tensor):
        raise mt.InputError(f"{op}: out must be a 1-D tensor, got {type(out).__name__}")
    if out.dtype not in mt.LOW_OR_FULL:
        raise mt.InputError(f"{op}: out has dtype {out.dtype}; the Triton backend packs into "
                            f"{mt._names(mt.LOW_OR_FULL)} buffers (float64 runs on the 'reference' backend)")
    if out.layout != torch.strided or out.dim() != 1 or not out.is_contiguous():
        raise mt.InputError(f"{op}: out must be a contiguous 1-D buffer, got shape {list(out.shape)}"
                            + (f" and strides {list(out.stride())}" if out.layout == torch.strided else
                               f" and layout {out.layout}"))
    if out.device.type != "meta" and out.data_ptr() % PACK_ALIGN_BYTES:
        raise mt.InputError(f"{op}: out must start on a {PACK_ALIGN_BYTES}-byte boundary (NOTE [pack layout]); "
                            f"its data is at {out.data_ptr() % PACK_ALIGN_BYTES} bytes past one")


@torch.no_grad()
def pack_(grads: Sequence[torch.Tensor], out: torch.Tensor, scale: float,
          sumsq: Optional[torch.Tensor] = None) -> None:
    """Write ``cast(grads[i] * scale)`` into the flat 1-D buffer ``out`` at the 16-byte-aligned
    offsets of ``pack_offsets``; the compiled binding's contract (reference:
    fusedmf.functional.pack.pack_). ``sumsq`` (a 1-element float32 tensor on out's device, optional):
    add the sum of the squared fp32 products to it. Every argument is checked before anything is
    written."""
    op = "pack_"
    if not isinstance(grads, (list, tuple)):
        raise mt.InputError(f"{op}: grads must be a list of tensors, got {type(grads).__name__}")
    _check_out(op, out)
    device = out.device
    for i, g in enumerate(grads):
        if not isinstance(g, torch.Tensor):
            raise mt.InputError(f"{op}: grads[{i}] is a {type(g).__name__}, not a tensor")
        if g.layout != torch.strided:
            raise mt.InputError(f"{op}: grads[{i}] has layout {g.layout}; only strided tensors are supported")
        if g.device != device:
            raise mt.InputError(f"{op}: grads[{i}] is on {g.device} but out is on {device}; "
                                f"all tensors of one call must be on one device")
        if g.dtype not in mt.LOW_OR_FULL:
            raise mt.InputError(f"{op}: grads[{i}] has dtype {g.dtype}; the Triton backend packs "
                                f"{mt._names(mt.LOW_OR_FULL)} grads (float64 runs on the 'reference' backend)")
    offsets, total = pack_offsets([g.numel() for g in grads], out.element_size())
    if total > out.numel():
        raise mt.InputError(f"{op}: the grads need {total} elements of out (slots padded to {PACK_ALIGN_BYTES} "
                            f"bytes, NOTE [pack layout]), out has {out.numel()}")
    mt.check_device_scalar(op, "sumsq", sumsq, device)
    if sumsq is not None and out.data_ptr() <= sumsq.data_ptr() < out.data_ptr() + out.numel() * out.element_size():
        raise mt.InputError(f"{op}: sumsq lies inside out; it must be a separate 1-element float32 tensor")
    if device.type == "meta":
        raise mt.InputError(f"{op}: out is on meta; the Triton backend runs on CUDA tensors (or CPU tensors "
                            f"under TRITON_INTERPRET=1)")
    base, elem = out.data_ptr(), out.element_size()
    groups = {}
    keep_alive = []
    for g, off in zip(grads, offsets):
        if g.numel() == 0:
            continue
        if not mt._is_non_overlapping_and_dense(g):
            g = torch.empty_like(g).copy_(g)  # the layout of its slot (pack.py slot_strides)
            keep_alive.append(g)
        groups.setdefault(g.dtype, []).append((g.numel(), base + off * elem, g.data_ptr()))
    scale = float(scale)
    out_dtype = mt.TORCH_TO_TL[out.dtype]
    for dtype, rows in groups.items():
        tables = mt.get_tables(device, rows, (out.dtype, dtype))
        mt.launch(pack_kernel, tables, (scale, out if sumsq is None else sumsq),
                  dict(GRAD_DTYPE=mt.TORCH_TO_TL[dtype], OUT_DTYPE=out_dtype, SUMSQ=sumsq is not None),
                  **FP_FUSION)  # the squares are summed rounded, as in the interpreter
