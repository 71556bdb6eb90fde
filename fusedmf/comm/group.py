"""The process group a fusedmf.comm wrapper talks to: rank, size, backend, timeout, and the one place
where a collective is waited for and its failure becomes a :class:`CommError` that says what failed."""

from __future__ import annotations

import datetime
from typing import Optional, Union

import torch
import torch.distributed as dist

Timeout = Union[None, float, datetime.timedelta]


class CommError(RuntimeError):
    """A collective of fusedmf.comm failed or timed out (a rank died, hung or diverged)."""


class RankMismatchError(CommError):
    """The ranks disagree (step, backward passes, forward passes, or a replica's contents); raised on
    every rank, naming the ranks and what differs, before anything is updated."""


def as_timedelta(timeout: Timeout) -> Optional[datetime.timedelta]:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if not float(timeout) > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


class CommGroup:
    """``process_group`` (None: the default group) as a wrapper sees it. Without an initialised
    torch.distributed the world size is 1 and nothing is ever communicated."""

    def __init__(self, process_group=None, *, timeout: Timeout = None, owner: str = "DistributedOptimizer"):
        self.owner = owner
        self.timeout = as_timedelta(timeout)
        if dist.is_available() and dist.is_initialized():
            self.process_group = process_group
            self.world_size = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)
            self.backend = str(dist.get_backend(process_group))
        elif process_group is not None:
            raise RuntimeError(f"{owner}: a process_group was given but torch.distributed is not initialised")
        else:
            self.process_group, self.world_size, self.rank, self.backend = None, 1, 0, "none"

    @property
    def small_device(self) -> torch.device:
        """Where small metadata tensors live: NCCL only reduces CUDA tensors."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def global_rank(self, group_rank: int) -> int:
        """The default-group rank of a rank of this group (for messages and broadcast roots)."""
        if self.process_group is None or self.world_size == 1:
            return group_rank
        return dist.get_global_rank(self.process_group, group_rank)

    def wait(self, work, what: str, *, host_wait: bool, hint: str = "") -> None:
        """Wait for a collective, turning a failure or a timeout into a CommError that says what.

        ``host_wait``: the host may block (CPU tensors, or construction). For CUDA tensors in a step
        ``work.wait()`` only makes the current stream wait; a timeout argument would block the host,
        so there the process group's own timeout (NCCL's watchdog) applies.
        """
        if work is None:
            return
        try:
            if self.timeout is not None and host_wait:
                work.wait(timeout=self.timeout)
            else:
                work.wait()
        except Exception as exc:
            limit = f"{self.timeout.total_seconds():g} s" if self.timeout is not None else "the process group's timeout"
            reason = str(exc).strip().rstrip(".!")
            hint = hint or "A rank may have died or hung, or the ranks called backward()/step() differently."
            raise CommError(
                f"{self.owner} (rank {self.rank} of {self.world_size}, {self.backend}): {what} failed "
                f"or did not complete within {limit} ({reason}). {hint} The process group cannot be used after this."
            ) from exc
