"""Assigning parameters to communication buckets.

Rules (the same on every rank, so that every rank launches the same collectives in the same order):

- parameters are taken in *reverse* registration order, the order in which backward usually
  produces their gradients, so the first bucket fills first;
- a bucket holds parameters of one (device, communication dtype) only;
- a parameter is never split: a bucket is closed before a parameter that would take it over its cap,
  and a parameter larger than the cap gets a bucket of its own;
- the first bucket of each (device, dtype) has its own, small cap (``first_bucket_cap_mb``, 1 MB by
  default as in torch DDP) so that communication starts as early as possible in backward;
- buckets are numbered in the order they open; they are launched in that order
  (fusedmf/comm/distributed_optimizer.py).

Inside a bucket each parameter has a slot of the flat buffer at the offsets ``fusedmf.functional.pack``
writes to (NOTE [pack layout]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Sequence

import torch

from ..functional.pack import pack_offsets

MB = 1 << 20


@dataclass
class BucketSpec:
    """One bucket: which parameters (indices into the registration-order list) and where each sits."""

    index: int
    device: torch.device
    dtype: torch.dtype                      # the communication dtype of the flat buffer
    params: List[int] = field(default_factory=list)
    offsets: List[int] = field(default_factory=list)   # element offset of each param's slot
    numel: int = 0                          # padded length of the flat buffer

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def assign_buckets(
    params: Sequence[torch.Tensor],
    *,
    comm_dtype_of: Callable[[torch.Tensor], torch.dtype],
    bucket_cap_mb: float = 25.0,
    first_bucket_cap_mb: float = 1.0,
) -> List[BucketSpec]:
    """Split ``params`` (in registration order) into buckets; see the module docstring for the rules."""
    if not bucket_cap_mb > 0 or not first_bucket_cap_mb > 0:
        raise ValueError(f"bucket caps must be > 0 MB, got bucket_cap_mb={bucket_cap_mb!r}, "
                         f"first_bucket_cap_mb={first_bucket_cap_mb!r}")
    cap, first_cap = int(bucket_cap_mb * MB), int(first_bucket_cap_mb * MB)
    buckets: List[BucketSpec] = []
    open_bucket: dict = {}                  # (device, dtype) -> (bucket, bytes so far)
    opened: dict = {}                       # (device, dtype) -> number of buckets opened
    for i in reversed(range(len(params))):
        p = params[i]
        dtype = comm_dtype_of(p)
        key = (p.device, dtype)
        nbytes = p.numel() * torch.empty((), dtype=dtype).element_size()
        if key in open_bucket:
            bucket, size = open_bucket[key]
            limit = first_cap if opened[key] == 1 else cap
            if size + nbytes > limit:
                del open_bucket[key]
        if key not in open_bucket:
            bucket = BucketSpec(index=len(buckets), device=p.device, dtype=dtype)
            buckets.append(bucket)
            opened[key] = opened.get(key, 0) + 1
            open_bucket[key] = (bucket, 0)
        bucket, size = open_bucket[key]
        bucket.params.append(i)
        open_bucket[key] = (bucket, size + nbytes)
    for b in buckets:
        elem = torch.empty((), dtype=b.dtype).element_size()
        b.offsets, b.numel = pack_offsets([params[i].numel() for i in b.params], elem)
    return buckets
