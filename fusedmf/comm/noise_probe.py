"""The gradient-noise-scale probe of DistributedOptimizer(noise_scale=...): the device state of
NOTE [noise scale from the allreduce] (fusedmf/noise.py) and its small per-step allreduce.

The round packs every bucket with ``local`` as the pack's sum of squares, launches :meth:`launch`
after the buckets, and the step's non-finite check of the reduced buffers sums into ``global_``;
:meth:`step` then records the previous step's sample and carries this step's. The carry is part of
the wrapper's ``state_dict()`` (with the estimator's own state), so a resumed run continues
bit-identically.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..noise import GradientNoiseScale
from .group import CommGroup


class NoiseScaleProbe:
    def __init__(self, noise: GradientNoiseScale, group: CommGroup, devices: set):
        if not isinstance(noise, GradientNoiseScale):
            raise TypeError(f"noise_scale must be a fusedmf.noise.GradientNoiseScale, got {type(noise).__name__}")
        if group.world_size < 2:
            raise ValueError("noise_scale needs world size >= 2: with one rank the local and the global batch are the "
                             "same batch, and B_simple cannot be estimated (use GradientNoiseScale.update by hand)")
        if len(devices) != 1:
            raise ValueError(f"noise_scale needs every gradient on one device, the buckets are on {sorted(map(str, devices))}")
        self.noise, self.group = noise, group
        device = next(iter(devices))
        zeros = lambda n: torch.zeros(n, dtype=torch.float32, device=device)  # noqa: E731
        self.local = zeros(1)        # Σ (g·s)² of this rank's packs in the current round
        self.global_ = zeros(1)      # Σ x² of the reduced buffers, from the non-finite check
        self._carry = zeros(2)       # [|G_B|² unscaled, valid] of the last step, sent with the next allreduce
        self._prev_local = zeros(1)  # |G_b|² (mean over ranks, unscaled) of the last step
        self._has_prev = False
        self._comm: Optional[torch.Tensor] = None
        self._work = None

    def reset_round(self) -> None:
        self.local.zero_()
        self._comm, self._work = None, None

    def launch(self) -> None:
        """NOTE [noise scale from the allreduce]: [local Σ(g·s)², carried |G_B|², carried validity]."""
        self._comm = torch.cat([self.local, self._carry])
        self._work = dist.all_reduce(self._comm, op=dist.ReduceOp.SUM, group=self.group.process_group, async_op=True)

    def wait(self, *, host_wait: bool, what: str = "the allreduce of the noise-scale norms") -> None:
        self.group.wait(self._work, what, host_wait=host_wait)

    def record_previous(self) -> None:
        """The previous step's sample is complete once this round's small allreduce is done: its
        carried |G_B|² and validity, summed over the ranks, are now the same on every rank."""
        if self._has_prev and self._comm is not None:
            n = self.group.world_size
            comm = self._comm
            valid = (comm[2:3] > n - 0.5).to(torch.float32)      # every rank had a finite step
            self.noise.record(torch.cat([self._prev_local, comm[1:2] / n, valid]), n)
            self._has_prev = False

    def step(self, found: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor]) -> None:
        """Record the last step's sample, carry this step's (``grad_scale``: the scale the reduced
        gradients carried when their sum of squares was taken)."""
        self.record_previous()
        comm, n = self._comm, self.group.world_size
        device = comm.device
        if grad_scale is not None:
            inv2 = grad_scale.to(device=device, dtype=torch.float32).reshape(1).reciprocal().square()
        else:
            inv2 = torch.ones(1, dtype=torch.float32, device=device)
        # mean over ranks of |g_r / passes|² = N² · Σ_r |g_r·s|² / N, with s = 1 / (N · passes)
        self._prev_local = comm[0:1] * float(n) * inv2
        valid = torch.ones(1, dtype=torch.float32, device=device) if found is None else \
            (found.to(device).reshape(1) == 0).to(torch.float32)
        glob = torch.where(valid > 0, self.global_ * inv2, torch.zeros_like(self.global_))
        self._carry = torch.cat([glob, valid])
        self._has_prev = True

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"estimator": self.noise.state_dict(), "carry": self._carry.detach().cpu().clone(),
                "prev_local": self._prev_local.detach().cpu().clone(), "has_prev": self._has_prev}

    def check_state(self, state: dict) -> None:
        """Raise (changing nothing) if ``state`` does not fit this probe and its estimator."""
        for key in ("estimator", "carry", "prev_local", "has_prev"):
            if key not in state:
                raise ValueError(f"noise-scale probe state: no {key!r} entry")
        for key, shape in (("carry", (2,)), ("prev_local", (1,))):
            if tuple(torch.as_tensor(state[key]).shape) != shape:
                raise ValueError(f"noise-scale probe state: {key} has shape {list(torch.as_tensor(state[key]).shape)}, "
                                 f"expected {list(shape)}")
        for key in ("batch_size_per_rank", "beta"):
            if state["estimator"][key] != getattr(self.noise, key):
                raise ValueError(f"noise-scale state: {key} is {state['estimator'][key]!r} in the state but "
                                 f"{getattr(self.noise, key)!r} here")

    def load_state_dict(self, state: dict) -> None:
        self.check_state(state)
        self.noise.load_state_dict(state["estimator"])
        device = self.local.device
        self._carry = torch.as_tensor(state["carry"], dtype=torch.float32).to(device).clone()
        self._prev_local = torch.as_tensor(state["prev_local"], dtype=torch.float32).to(device).clone()
        self._has_prev = bool(state["has_prev"])
