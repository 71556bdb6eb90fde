"""The fused model averaging of fusedmf.comm.LocalSGD: ``pack_delta`` and ``apply_average``.

This module is the specification (the reference, pure PyTorch) and the one dispatch point of the two
ops; the compiled ones are ``torch.ops.fusedmf.pack_delta_`` / ``apply_average_`` (csrc/average.cpp,
CPU and CUDA) and ``torch.ops.fusedmf.triton_pack_delta_`` / ``triton_apply_average_``
(triton_kernels/average.py).

NOTE [model averaging rounding]
Local SGD (docs/algorithms.md) averages the *differences* from the last consensus c, an fp32 copy of the
weights every rank agreed on at the last average, instead of the weights:

    pack_delta_(sources, consensus, out, scale):
        out[i] = round_to(out.dtype, (fp32(sources[i]) - consensus[i]) * scale)
    allreduce(SUM) of the flat buffer that holds every out[i]          (in the compression dtype)
    apply_average_(averages, consensus, masters, params, update_consensus):
        m = consensus[i] + fp32(averages[i])
        masters[i] = m  (when given);  params[i] = round_to(params.dtype, m);  consensus[i] = m  (when update_consensus)

``sources`` are the fp32 masters (or the params themselves when they have none), ``scale`` is 1/N
as an fp32 number. Every operation rounds once, to nearest even, nothing is fused (the same in every
backend, so they agree bit for bit): w - c is exact when c/2 <= w <= 2c (Sterbenz's lemma; the usual
case, as local steps move weights by little), and * (1/N) is exact for N a power of two. So the only
rounding before the allreduce is the cast to the compression dtype, and it costs digits of the
small difference: |error| <= u·|w - c|/N per rank, u = 2^-11 (fp16) or 2^-8 (bf16), instead of
u·|w|/N had the weights been sent. The allreduce adds N such terms in the compression dtype (each
addition rounds once more, at most u·Σ|Δ_r|/N), and the final fp32 add rounds once. A non-finite
difference is not checked for: the step that made it was already skipped (a non-finite weight can
only come from a non-finite update, which every rank skips, NOTE [local skip decision] in
fusedmf/comm/local_sgd.py).

Memory: one fp32 consensus per parameter (4 bytes/element; the masters are not duplicated), and the
flat communication buffers (2 bytes/element for fp16/bf16, 4 for "none"), allocated once. Traffic
of an average: pack reads w and c and writes the buffer; apply reads the buffer and c and writes
master, param and c: 14 bytes/element for fp32 masters + fp16 params + fp16 compression, against
torch's average_parameters, which reads the params, writes a torch.cat copy as large as the model,
divides it, and copies it back (and keeps no masters).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import _backends
from . import _ops

Tensor = torch.Tensor

_COMPILED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------ reference
@torch.no_grad()
def reference_pack_delta_(sources: Sequence[Tensor], consensus: Sequence[Tensor], out: Sequence[Tensor],
                          scale: float) -> None:
    """out[i] = round_to(out.dtype, (fp32(sources[i]) - consensus[i]) * scale) (NOTE [model averaging rounding])."""
    for w, c, o in zip(sources, consensus, out):
        compute = torch.float64 if c.dtype == torch.float64 else torch.float32
        d = torch.sub(w.to(compute), c)
        d.mul_(scale)
        o.copy_(d)


@torch.no_grad()
def reference_apply_average_(averages: Sequence[Tensor], consensus: Sequence[Tensor], masters: Sequence[Tensor],
                             params: Sequence[Tensor], update_consensus: bool) -> None:
    """m = consensus[i] + fp32(averages[i]); write masters[i], params[i] and (optionally) consensus[i]."""
    masters = list(masters)
    for i, (a, c, p) in enumerate(zip(averages, consensus, params)):
        m = torch.add(c, a.to(c.dtype))
        if masters:
            masters[i].copy_(m)
        p.copy_(m)
        if update_consensus:
            c.copy_(m)


# ------------------------------------------------------------------------------------ dispatch
def _is_dense(t: Tensor) -> bool:
    return t.numel() == 0 or t.is_contiguous() or torch.empty_like(t).stride() == t.stride()


def _check(op: str, lists: dict, fp32_lists: tuple, head: str) -> torch.device:
    """Python-side checks shared by every backend (the compiled and Triton ops check again)."""
    ref = lists[head]
    n = len(ref)
    for name, ts in lists.items():
        if len(ts) != n and not (name == "masters" and len(ts) == 0):
            raise ValueError(f"fusedmf.{op}: {name} has {len(ts)} tensors but {head} has {n}")
    device = ref[0].device if n else torch.device("cpu")
    for name, ts in lists.items():
        for i, t in enumerate(ts):
            if not isinstance(t, Tensor):
                raise TypeError(f"fusedmf.{op}: {name}[{i}] is a {type(t).__name__}, not a tensor")
            if t.device != device:
                raise ValueError(f"fusedmf.{op}: {name}[{i}] is on {t.device} but {head}[0] is on {device}")
            if t.shape != ref[i].shape:
                raise ValueError(f"fusedmf.{op}: {name}[{i}] has shape {list(t.shape)} but {head}[{i}] has "
                                 f"{list(ref[i].shape)}")
            if t.layout != torch.strided or not _is_dense(t):
                raise ValueError(f"fusedmf.{op}: {name}[{i}] is not a dense strided tensor")
            if t.numel() > 1 and any(a != b for a, b, n in zip(t.stride(), ref[i].stride(), t.shape) if n > 1):
                raise ValueError(f"fusedmf.{op}: {name}[{i}] has strides {list(t.stride())} but {head}[{i}] has "
                                 f"{list(ref[i].stride())} (every tensor must have the memory layout of its param)")
            if t.dtype != ts[0].dtype:
                raise TypeError(f"fusedmf.{op}: {name}[{i}] has dtype {t.dtype} but {name}[0] has {ts[0].dtype}")
            allowed = (torch.float32, torch.float64) if name in fp32_lists else _COMPILED_DTYPES + (torch.float64,)
            if t.dtype not in allowed:
                raise TypeError(f"fusedmf.{op}: {name}[{i}] has dtype {t.dtype}; allowed: "
                                + ", ".join(str(d).replace("torch.", "") for d in allowed))
    names = [k for k, ts in lists.items() if ts]
    for i in range(n):
        seen = {}
        for name in names:
            t = lists[name][i]
            if t.numel() == 0:
                continue
            other = seen.setdefault(t.data_ptr(), name)
            if other != name:
                raise ValueError(f"fusedmf.{op}: {name}[{i}] and {other}[{i}] are the same memory")
    return device


def _backend(backend: str, device: torch.device, lists: dict) -> str:
    wide = any(ts and ts[0].dtype == torch.float64 for ts in lists.values())
    name = _backends.resolve(backend, device, torch.float64 if wide else None)
    return "reference" if wide else name


def _op(name: str, rule: str):
    return _ops.op(name, rule)  # the backend's torch op, by OP_TABLE's prefix


def pack_delta(sources: Sequence[Tensor], consensus: Sequence[Tensor], out: Sequence[Tensor], *, scale: float,
               backend: str = "auto") -> str:
    """``out[i] = cast((sources[i] - consensus[i]) * scale)``; returns the backend that ran.

    ``out[i]`` are usually the slot views of a flat communication buffer (NOTE [pack layout]), shaped
    and laid out as their param. Dtypes are uniform within each list: sources fp32/fp16/bf16,
    consensus fp32, out fp32/fp16/bf16 (float64 anywhere: the reference).
    """
    sources, consensus, out = list(sources), list(consensus), list(out)
    lists = {"sources": sources, "consensus": consensus, "out": out}
    device = _check("pack_delta", lists, ("consensus",), "sources")
    name = _backend(backend, device, lists)
    if not sources:
        return name
    if name == "reference":
        reference_pack_delta_(sources, consensus, out, float(scale))
    else:
        _op(name, "pack_delta_")(sources, consensus, out, float(scale))
    return name


def apply_average(averages: Sequence[Tensor], consensus: Sequence[Tensor], *, params: Sequence[Tensor],
                  masters: Optional[Sequence[Tensor]] = None, update_consensus: bool = True,
                  backend: str = "auto") -> str:
    """``m = consensus + averages``; writes ``masters`` (if given), ``params`` (cast) and, with
    ``update_consensus``, ``consensus``; returns the backend that ran."""
    averages, consensus, params = list(averages), list(consensus), list(params)
    masters: List[Tensor] = [] if masters is None else list(masters)
    lists = {"params": params, "averages": averages, "consensus": consensus, "masters": masters}
    device = _check("apply_average", lists, ("consensus", "masters"), "params")
    name = _backend(backend, device, lists)
    if not params:
        return name
    if name == "reference":
        reference_apply_average_(averages, consensus, masters, params, bool(update_consensus))
    else:
        _op(name, "apply_average_")(averages, consensus, masters, params, bool(update_consensus))
    return name

