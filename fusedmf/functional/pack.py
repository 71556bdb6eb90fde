"""The reference ``pack_``: gather gradients into one flat communication buffer, prescaled and cast.

NOTE [pack layout]
``pack_(grads, out, scale)`` writes ``cast(grads[i] * scale)`` into the 1-D buffer ``out`` at element
offset ``offsets[i]``, where

    offsets[0] = 0
    offsets[i + 1] = round_up(offsets[i] + grads[i].numel(), PACK_ALIGN_BYTES // out.element_size())

so every slot starts 16 bytes after a 16-byte boundary of ``out`` (which must itself be 16-byte
aligned) and views of the buffer stay aligned for vectorised kernels. Within its slot a gradient's
elements are stored in its own memory order when it is non-overlapping and dense (a channels_last
grad stays channels_last, so the view handed to the update has the param's strides), and in
row-major order otherwise: the order of ``torch.empty_like(grad)``. The padding between slots is
never written; the caller allocates ``out`` zeroed so that the padding sums to zero in an
allreduce and never trips a non-finite check.

Arithmetic: the product is formed in fp32 (in the grad's dtype for fp32/fp64 grads) and rounded
once to ``out.dtype``. Multiplying by 1/world_size *before* the sum is what keeps an fp16 allreduce
from overflowing at scale (docs/design.md, compression).

Compiled backends provide the same signature ``pack_(grads: List[Tensor], out: Tensor, scale: float)``
for fp32/fp16/bf16 grads and buffers: ``torch.ops.fusedmf.pack_`` (csrc/bindings.cpp; the loops in
csrc/cpu/kernels_impl.h and csrc/cuda/pack.cu) and ``torch.ops.fusedmf.triton_pack_`` (triton_kernels/pack.py).
``fusedmf.functional.pack`` is the one dispatch point: float64 runs here.
"""

from __future__ import annotations

import threading
from typing import List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

#: alignment of every slot of a packed buffer, in bytes (NOTE [pack layout])
PACK_ALIGN_BYTES = 16


def pack_offsets(numels: Sequence[int], element_size: int) -> Tuple[List[int], int]:
    """Element offsets of each slot and the padded total length (NOTE [pack layout])."""
    if PACK_ALIGN_BYTES % element_size:
        raise ValueError(f"element size {element_size} does not divide the {PACK_ALIGN_BYTES}-byte alignment")
    align = PACK_ALIGN_BYTES // element_size
    offsets, pos = [], 0
    for n in numels:
        offsets.append(pos)
        pos += -(-int(n) // align) * align
    return offsets, pos


def slot_strides(t: Tensor) -> Tuple[int, ...]:
    """The strides a tensor's slot is laid out with: its own when dense, row-major otherwise."""
    if t.is_contiguous():
        return tuple(t.stride())
    return tuple(torch.empty_like(t, device="meta").stride())


def slot_view(out: Tensor, offset: int, shape, strides) -> Tensor:
    """A view of one slot of a packed buffer with the given shape and (dense) strides."""
    return out.as_strided(tuple(shape), tuple(strides), out.storage_offset() + offset)


#: elements per chunk of the CPU path: a 4 MB fp32 scratch stays in cache between its two passes
_CPU_CHUNK = 1 << 20
_scratch = threading.local()


def _memory_order(t: Tensor) -> Tensor:
    """The elements of ``t`` as a 1-D tensor in the order of its slot (NOTE [pack layout])."""
    if t.is_contiguous():
        return t.reshape(-1)
    strides = slot_strides(t)
    if tuple(t.stride()) != strides or any(s <= 0 for s in strides):
        t = torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)   # rare: not dense
    return t.as_strided((t.numel(),), (1,), t.storage_offset())   # dense: one block of memory


def _cpu_scratch(n: int, dtype: torch.dtype) -> Tensor:
    cache = getattr(_scratch, "buffers", None)
    if cache is None:
        cache = _scratch.buffers = {}
    buf = cache.get(dtype)
    if buf is None or buf.numel() < n:
        buf = cache[dtype] = torch.empty(max(n, 1), dtype=dtype)
    return buf[:n]


@torch.no_grad()
def pack_(grads: Sequence[Tensor], out: Tensor, scale: float, sumsq: Optional[Tensor] = None) -> None:
    """Reference implementation of the pack op (NOTE [pack layout]).

    ``sumsq``: add Σ (fp32(g)·scale)² over every element -- the products before they are rounded to
    ``out.dtype``, squared and summed in float64 and added once -- to this 1-element fp32 tensor:
    the local gradient's squared norm of the noise-scale estimate (fusedmf/noise.py), at no extra
    pass in the compiled kernels (NOTE [sums of squares] in csrc/cpu/kernels_impl.h).

    The arithmetic is ``round_to(out.dtype, fp32(g) * scale)`` (float64 for float64 grads). On CPU it
    runs chunk by chunk through an fp32 scratch: ``torch.mul(g, s, out=fp16_view)`` would form the
    same values, but through torch's scalar dynamic-cast loop (~8x slower than the vectorised
    multiply and cast used here, measured on 25M values). On GPUs one ``torch.mul(..., out=)`` is a
    single kernel that computes in fp32 and rounds once on the store.
    """
    offsets, _ = pack_offsets([g.numel() for g in grads], out.element_size())
    total = torch.zeros((), dtype=torch.float64, device=out.device) if sumsq is not None else None
    for g, off in zip(grads, offsets):
        n = g.numel()
        if n == 0:
            continue
        src = _memory_order(g)
        dst = out[off:off + n]          # the slot, in the memory order of the grad (NOTE [pack layout])
        compute = torch.float64 if src.dtype == torch.float64 else torch.float32
        if total is not None:
            total += (src.to(compute) * scale).double().square().sum()
        if out.device.type != "cpu" or (src.dtype == compute and out.dtype == compute):
            torch.mul(src if src.dtype == compute else src.to(compute), scale, out=dst)
            continue
        for start in range(0, n, _CPU_CHUNK):
            stop = min(n, start + _CPU_CHUNK)
            tmp = _cpu_scratch(stop - start, compute)
            if src.dtype == compute:
                torch.mul(src[start:stop], scale, out=tmp)
            else:
                tmp.copy_(src[start:stop]).mul_(scale)
            dst[start:stop].copy_(tmp)
    if sumsq is not None:
        sumsq.add_(total.to(sumsq.dtype))
