"""Replica consistency: parameters, buffers and optimizer state broadcast from one rank.

``broadcast_parameters`` and ``broadcast_optimizer_state`` are Horovod's functions of the same names
for scripts that construct their replicas independently; :class:`~fusedmf.comm.DistributedOptimizer`
uses the same coalesced broadcast at construction (every parameter, and with ``module=`` every
buffer) and, with ``broadcast_buffers=True``, for the module's buffers after every step, as torch DDP
does (see its docstring). Tensors are broadcast in place, one collective per (device, dtype): the
tensors of a group are flattened into one buffer on the sending side, and copied back out of it on
every receiving rank.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Dict, Iterable, List, Tuple, Union

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .group import CommGroup

Tensors = Union[Dict[str, torch.Tensor], Iterable[torch.Tensor], Iterable[Tuple[str, torch.Tensor]]]


def broadcast_tensors_(tensors: List[torch.Tensor], group: CommGroup, root_rank: int = 0, *, what: str,
                       host_wait: bool = True) -> None:
    """Overwrite ``tensors`` on every rank with root_rank's values (root_rank: a rank of the group)."""
    if group.world_size == 1 or not tensors:
        return
    if not 0 <= root_rank < group.world_size:
        raise ValueError(f"root_rank must be in [0, {group.world_size}), got {root_rank!r}")
    src = group.global_rank(root_rank)
    by_kind: Dict[tuple, List[torch.Tensor]] = OrderedDict()
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    for (device, dtype), ts in by_kind.items():
        dense = [t.detach() for t in ts if t.numel()]
        if not dense:
            continue
        flat = _flatten_dense_tensors(dense)
        work = dist.broadcast(flat, src=src, group=group.process_group, async_op=True)
        group.wait(work, f"the broadcast of {what} ({len(dense)} {str(dtype).replace('torch.', '')} tensors "
                         f"on {device}) from rank {root_rank}", host_wait=host_wait or device.type == "cpu")
        if group.rank != root_rank:
            with torch.no_grad():
                for t, v in zip(dense, _unflatten_dense_tensors(flat, dense)):
                    t.copy_(v)


def _as_tensor_list(params: Tensors) -> List[torch.Tensor]:
    if isinstance(params, dict):
        items = list(params.values())
    else:
        items = list(params)
    out = []
    for i, x in enumerate(items):
        if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.Tensor):
            x = x[1]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"broadcast_parameters: item {i} is a {type(x).__name__}, not a tensor "
                            "(give a state_dict, named_parameters() or an iterable of tensors)")
        out.append(x)
    return out


def broadcast_parameters(params: Tensors, root_rank: int = 0, *, process_group=None) -> None:
    """Overwrite every rank's tensors with root_rank's: ``model.state_dict()`` (parameters and
    buffers), ``model.named_parameters()`` or an iterable of tensors, in the same order on every rank."""
    group = CommGroup(process_group, owner="broadcast_parameters")
    broadcast_tensors_(_as_tensor_list(params), group, root_rank, what="the parameters")


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0, *, process_group=None) -> None:
    """Make every rank's optimizer state (hyperparameters of every param group, every per-param state,
    and for a :class:`~fusedmf.comm.DistributedOptimizer` its own state) root_rank's.

    root_rank's ``state_dict()`` is sent as one object and loaded with ``load_state_dict`` on the
    other ranks, so the optimizer's own loader checks it (shapes against the params, fp32 state kept
    fp32). Any torch.optim.Optimizer works; the ranks' param groups must have the same sizes."""
    group = CommGroup(process_group, owner="broadcast_optimizer_state")
    if group.world_size == 1:
        return
    payload = [None]
    if group.rank == root_rank:
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)      # tensors travel as bytes, whatever their device
        payload = [buf.getvalue()]
    dist.broadcast_object_list(payload, src=group.global_rank(root_rank), group=process_group)
    if group.rank != root_rank:
        optimizer.load_state_dict(torch.load(io.BytesIO(payload[0]), map_location="cpu", weights_only=False))
