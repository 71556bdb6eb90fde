"""Checks that the ranks agree, so that a disagreement raises on every rank instead of pairing
collectives of different steps or silently averaging different things.

- at construction (:func:`verify_same_signature`): the same parameters (count, shapes, dtypes),
  buffers and settings on every rank (silently diverging replicas are the failure to prevent);
- every round (:class:`RoundCheck`): the step number, the backward passes of the round and, with
  ``module=``, the training-mode forward passes so far, in one small all_gather launched after the
  buckets (NOTE [round check]);
- every k steps, optional (:class:`ReplicaCheck`): a checksum of every parameter and buffer.

NOTE [round check]
Each round carries [steps done, backward passes in this round, training forwards so far] of every
rank in one all_gather of 3 int64 per rank, launched after the round's last bucket (so it overlaps
them) and read by ``step()`` (or the drain in ``zero_grad``) before anything is updated; every rank
sees the same gathered table, so every rank raises together, naming the ranks and their numbers.
What it catches: a rank that skipped a ``step()`` (only ``zero_grad()``: it is one step behind from
the next round on), ranks that ran different numbers of backward passes under ``no_sync`` /
``backward_passes_per_step`` (they would weight their gradients differently), and -- with
``module=``, whose forward pre-hook counts forward passes that train (``module.training`` and grad
enabled; an evaluation on rank 0 only does not count) -- a rank that caught an error in a forward
and went on with the next batch, whose collectives would otherwise pair with the others' one
iteration apart. The buckets of such a round have already been reduced when the check is read, but
no rank applies them.

"immediate" (the default for CPU buckets): ``step()`` reads the table on the host and raises before
the update. "deferred" (the default for CUDA buckets, where a host read would stall the host until
the GPU has caught up, NOTE [deferred skip accounting]): the comparison is made on the device and
added to the step's found_inf, so a mismatched round is skipped on every rank with nothing written;
the table's copy to pinned host memory is read at the next round (long finished by then) or the next
``zero_grad()`` drain, which raise the same error one round late. ``check_ranks=False`` turns it off.
"""

from __future__ import annotations

import hashlib
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from .group import CommGroup, RankMismatchError


# ------------------------------------------------------------------------------------------ construction
def verify_same_signature(group: CommGroup, config: dict, entries: list, describe: Callable[[int, tuple], str],
                          owner: str = "DistributedOptimizer") -> None:
    """Raise ValueError on every rank if ``(config, entries)`` differ between ranks. ``entries``: one
    hashable tuple per tensor; ``describe(index, entry)`` renders one for the message."""
    if group.world_size == 1:
        return
    digest = hashlib.sha256(repr((config, entries)).encode()).digest()
    mine = torch.tensor([len(entries), int.from_bytes(digest[:8], "little", signed=True)],
                        dtype=torch.int64, device=group.small_device)
    gathered = [torch.empty_like(mine) for _ in range(group.world_size)]
    work = dist.all_gather(gathered, mine, group=group.process_group, async_op=True)
    group.wait(work, "the parameter check at construction", host_wait=True,
               hint=f"Not every rank constructed the {owner}: a rank died, hung, or skipped it.")
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    everyone: list = [None] * group.world_size
    dist.all_gather_object(everyone, (config, entries, [describe(i, e) for i, e in enumerate(entries)]),
                           group=group.process_group)
    raise ValueError(f"{owner}: the ranks do not hold the same parameters or settings: " + _first_mismatch(everyone))


def _first_mismatch(everyone: list) -> str:
    """A message naming the first rank, tensor and field that differ from rank 0."""
    config0, entries0, text0 = everyone[0]
    for r, (config, entries, text) in enumerate(everyone[1:], start=1):
        for key in config0:
            if config.get(key) != config0.get(key):
                return f"setting {key} is {config0.get(key)!r} on rank 0 but {config.get(key)!r} on rank {r}"
        for idx, (a, b) in enumerate(zip(entries0, entries)):
            if a != b:
                return f"{text0[idx]} on rank 0 but {text[idx]} on rank {r}"
        if len(entries) != len(entries0):
            return f"rank 0 has {len(entries0)} parameters, rank {r} has {len(entries)}"
    return "the signatures differ (no field-level difference found)"


# ------------------------------------------------------------------------------------------ every round
class RoundCheck:
    """NOTE [round check]: [steps, passes, forwards] of every rank, gathered once per round."""

    FIELDS = ("step", "backward passes", "training forward passes")

    MODES = ("immediate", "deferred")

    def __init__(self, group: CommGroup, device: torch.device, mode: str):
        if mode not in self.MODES:
            raise ValueError(f"check_ranks must be True, False, 'immediate' or 'deferred', got {mode!r}")
        self.group = group
        self.device = device
        self.mode = mode
        self._mine = torch.zeros(3, dtype=torch.int64, device=device)
        self._table = [torch.zeros(3, dtype=torch.int64, device=device) for _ in range(group.world_size)]
        self._work = None
        self._pending = None              # deferred: (host copy of the table, event or None, what)

    def launch(self, steps: int, passes: int, forwards: int) -> None:
        values = torch.tensor([steps, passes, forwards], dtype=torch.int64)
        self._mine.copy_(values.pin_memory() if self.device.type == "cuda" else values, non_blocking=True)
        self._work = dist.all_gather(self._table, self._mine, group=self.group.process_group, async_op=True)

    def verify(self, what: str) -> Optional[torch.Tensor]:
        """Wait for this round's table; raise on every rank if the ranks disagree ("immediate"), or
        return a device flag (1-element fp32, non-zero on a mismatch) for the step's found_inf and
        read the table at the next call ("deferred"). Either way first raises for a deferred table
        of an earlier round."""
        self.raise_pending()
        if self._work is None:
            return None
        work, self._work = self._work, None
        deferred = self.mode == "deferred"
        self.group.wait(work, f"the round check ({what})", host_wait=not deferred)
        table = torch.stack(self._table)
        if not deferred:
            self._raise_if_mismatch(table.tolist(), what)
            return None
        flag = (table != table[0:1]).any().to(torch.float32).reshape(1)
        if table.device.type == "cuda":
            host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
            host.copy_(table, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(table.device))
        else:
            host, event = table.clone(), None
        self._pending = (host, event, what)
        return flag

    def raise_pending(self) -> None:
        """Deferred mode: read an earlier round's table (its copy is done by now) and raise on a mismatch."""
        if self._pending is None:
            return
        (host, event, what), self._pending = self._pending, None
        if event is not None:
            event.synchronize()
        self._raise_if_mismatch(host.tolist(), f"{what}; found one round late, that round was skipped")

    def _raise_if_mismatch(self, rows: List[list], what: str) -> None:
        if all(row == rows[0] for row in rows):
            return
        col = next(c for c in range(3) if len({row[c] for row in rows}) > 1)
        name = self.FIELDS[col]
        groups: dict = {}
        for r, row in enumerate(rows):
            groups.setdefault(row[col], []).append(r)
        parts = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {name} {v}"
                          for v, rs in sorted(groups.items()))
        detail = ", ".join(f"rank {r} at step {row[0]} with {row[1]} backward pass(es)"
                           + (f" and {row[2]} training forwards" if row[2] >= 0 else "") for r, row in enumerate(rows))
        raise RankMismatchError(
            f"DistributedOptimizer (rank {self.group.rank} of {self.group.world_size}): the ranks disagree on "
            f"the {name} of this round ({what}): {parts} ({detail}). A rank skipped a step(), caught an error "
            "and went on, or ran a different number of backward passes; nothing was updated. The ranks' "
            "collectives are no longer paired: restart from a checkpoint.")


# ------------------------------------------------------------------------------------------ every k steps
def tensor_checksum(t: torch.Tensor) -> torch.Tensor:
    """An int64 checksum of a tensor's bytes (its words summed with position weights): equal tensors
    have equal checksums; a changed bit changes it except with negligible probability."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=t.device)
    raw = t.detach().contiguous().reshape(-1)
    nbytes = raw.numel() * raw.element_size()
    words = raw.view(torch.int32) if nbytes % 4 == 0 else raw.view(torch.uint8)
    words = words.to(torch.int64)
    weights = torch.arange(1, words.numel() + 1, dtype=torch.int64, device=t.device) % 65521 + 1
    return (words * weights).sum()


class ReplicaCheck:
    """Every ``every`` steps: one allreduce (MAX of [c, -c]) of every tensor's checksum; if the ranks
    differ, a RankMismatchError on every rank naming the first tensor that differs and the ranks whose
    copy differs from rank 0's. One host read of the reduced checksums per check."""

    def __init__(self, group: CommGroup, tensors: Sequence[torch.Tensor], names: Sequence[str], every: int):
        if isinstance(every, bool) or int(every) != every or every < 1:
            raise ValueError(f"replica_check_every must be None or an integer >= 1, got {every!r}")
        self.group, self.tensors, self.names, self.every = group, list(tensors), list(names), int(every)

    def due(self, steps: int) -> bool:
        return self.group.world_size > 1 and steps % self.every == 0

    def run(self, steps: int) -> None:
        device = self.group.small_device
        sums = torch.stack([tensor_checksum(t).to(device) for t in self.tensors]) if self.tensors else \
            torch.zeros(0, dtype=torch.int64, device=device)
        both = torch.cat([sums, -sums])
        work = dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group.process_group, async_op=True)
        self.group.wait(work, f"the replica check after step {steps}", host_wait=True)
        n = sums.numel()
        differ = (both[:n] != -both[n:]).nonzero().flatten().tolist()
        if not differ:
            return
        first = differ[0]
        table = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.group.world_size)]
        dist.all_gather(table, sums[first:first + 1].clone(), group=self.group.process_group)
        values = [int(t.item()) for t in table]
        odd = [r for r, v in enumerate(values) if v != values[0]]
        raise RankMismatchError(
            f"DistributedOptimizer (rank {self.group.rank} of {self.group.world_size}): the replicas diverged by "
            f"step {steps}: {self.names[first]} differs from rank 0's on rank{'s' if len(odd) > 1 else ''} "
            f"{', '.join(map(str, odd))} ({len(differ)} of {n} tensors differ). Something updated one replica "
            "differently (a rank-dependent branch, a non-deterministic buffer, a skipped step).")
