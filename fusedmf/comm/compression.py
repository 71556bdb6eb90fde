"""Horovod-style choices of how gradients travel: ``Compression.none | fp16 | bf16`` and the reduction
``Average | Sum``. The strings "none", "fp16", "bf16" keep working wherever a compression is taken."""

from __future__ import annotations

import enum
from typing import Optional, Union

import torch


class Compressor:
    """One compression: the dtype of the flat communication buffer (None: the gradients' own dtype).

    Unlike Horovod's compressors there is no separate compress/decompress pass: the cast happens
    inside the pack kernel and the update reads the compressed buffer directly."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: Optional[torch.dtype]):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"Compression.{self.name}"

    def __reduce__(self):      # pickles (spawned ranks, checkpoints) as the shared instance
        return (getattr, (Compression, self.name))


class Compression:
    """``Compression.none``, ``Compression.fp16``, ``Compression.bf16`` (as ``hvd.Compression.fp16``)."""

    none = Compressor("none", None)
    fp16 = Compressor("fp16", torch.float16)
    bf16 = Compressor("bf16", torch.bfloat16)


#: name -> communication dtype (None: uncompressed), the string form every wrapper accepts
COMPRESSION = {c.name: c.dtype for c in (Compression.none, Compression.fp16, Compression.bf16)}


def as_compressor(compression: Union[str, Compressor]) -> Compressor:
    if isinstance(compression, Compressor):
        return compression
    if isinstance(compression, str) and compression in COMPRESSION:
        return getattr(Compression, compression)
    raise ValueError(f"compression must be one of {tuple(COMPRESSION)} or fusedmf.comm.Compression.none/fp16/bf16, "
                     f"got {compression!r}")


class ReduceOp(enum.Enum):
    """How the ranks' gradients are combined (Horovod's ``op=``)."""

    Average = "average"
    Sum = "sum"


Average = ReduceOp.Average
Sum = ReduceOp.Sum


def as_reduce_op(op) -> ReduceOp:
    if isinstance(op, ReduceOp):
        return op
    if isinstance(op, str) and op.lower() in ("average", "sum"):
        return ReduceOp(op.lower())
    raise ValueError(f"op must be fusedmf.comm.Average or fusedmf.comm.Sum, got {op!r}")
