"""One bucket round of DistributedOptimizer: gradients -> packed flat buffers -> async allreduces.

    backward  each parameter's post-accumulate-grad hook marks it ready; when the last parameter of a
              bucket is ready, ONE pack launch writes cast(grad · s) for all of them into the bucket's
              flat buffer (fusedmf.functional.pack; s = the prescale, 1/(N · passes) by default) and an
              async allreduce of that buffer starts, while backward goes on. Buckets are launched in
              index order (the same order on every rank, so collectives always match); a bucket that
              fills early waits for the ones before it.
    end of    (autograd engine callback) buckets still missing gradients are packed with zeros for
    backward  the missing ones and launched; with find_unused_parameters a tiny allreduce counts, per
              parameter, the ranks that produced a gradient; the round check (NOTE [round check] in
              rank_check.py) and the noise-scale probe launch their small collectives.
    step()    :meth:`BucketRound.wait` waits for all of it; :meth:`BucketRound.check_non_finite` checks
              the reduced buffers into found_inf; each parameter's reduced gradient is
              ``views[p]``, a view of its bucket's buffer with the param's shape and strides.

Inside a bucket each parameter has a slot of the flat buffer at the offsets ``fusedmf.functional.pack``
writes to (NOTE [pack layout]); the padding between slots is zeroed once and stays zero.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.autograd import Variable

from .. import functional as F
from ..functional.pack import slot_strides, slot_view
from .buckets import BucketSpec, assign_buckets
from .group import CommGroup


class BucketRound:
    def __init__(self, params: List[torch.Tensor], names: List[str], labels: List[object], group: CommGroup, *,
                 comm_dtype: Optional[torch.dtype], bucket_cap_mb: float, first_bucket_cap_mb: float,
                 backward_passes_per_step: int, find_unused_parameters: bool, backend: str,
                 pack_scale: Callable[[int], float]):
        self.params, self.names, self.labels, self.group = params, names, labels, group   # names: for messages
        self.backward_passes_per_step = backward_passes_per_step
        self.find_unused_parameters = find_unused_parameters
        self.backend = backend
        self.pack_scale = pack_scale
        self.buckets: List[BucketSpec] = assign_buckets(
            params, comm_dtype_of=lambda p: comm_dtype or p.dtype,
            bucket_cap_mb=bucket_cap_mb, first_bucket_cap_mb=first_bucket_cap_mb)
        # zeroed once: the padding between slots stays zero forever (NOTE [pack layout])
        self.buffers = [torch.zeros(b.numel, dtype=b.dtype, device=b.device) for b in self.buckets]
        self._strides = [slot_strides(p) for p in params]
        self._where: List[tuple] = [None] * len(params)    # param index -> (bucket, slot)
        self.views: Dict[torch.Tensor, torch.Tensor] = {}
        for b, buf in zip(self.buckets, self.buffers):
            for j, (i, off) in enumerate(zip(b.params, b.offsets)):
                self._where[i] = (b.index, j)
                self.views[params[i]] = slot_view(buf, off, params[i].shape, self._strides[i])
        self.host_wait = all(b.device.type == "cpu" for b in self.buckets)
        self._nvtx = any(b.device.type == "cuda" for b in self.buckets)
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(params)]
        # set by the owner after construction
        self.telemetry = None
        self.noise = None                 # a NoiseScaleProbe
        self.check = None                 # a RoundCheck
        self.round_meta: Callable[[], tuple] = lambda: (0, 0)   # (steps, training forwards) for the check
        self.no_sync = False
        #: what ran: {"pack": name, "non_finite_check": name}
        self.backends_used: Dict[str, object] = {}
        self.reset()

    # ------------------------------------------------------------------ per-round state
    def reset(self) -> None:
        nb = len(self.buckets)
        self.passes = 0                   # backward passes seen since the last step
        self._pass_open = False           # a backward pass is running (its end callback is queued)
        self._pass_syncs = False          # whether the running pass communicates
        self._ready = [[False] * len(b.params) for b in self.buckets]
        self._missing = [len(b.params) for b in self.buckets]
        self._packed = [False] * nb
        self._works: List[object] = [None] * nb
        self._next_launch = 0
        self.closed = False               # every bucket of this step has been launched
        self._mask_work = None
        self._mask: Optional[torch.Tensor] = None
        self._locally_missing = False
        self.check_flag: Optional[torch.Tensor] = None    # a deferred round check's mismatch, for found_inf
        if self.noise is not None:
            self.noise.reset_round()

    @property
    def started(self) -> bool:
        """Some collective of this round has been launched."""
        return self._next_launch > 0 or self.closed

    # ------------------------------------------------------------------ backward: hooks
    def _make_hook(self, i: int) -> Callable:
        def hook(p: torch.Tensor) -> None:
            self._on_grad(i, p)
        return hook

    def _begin_pass(self) -> None:
        self._pass_open = True
        self.passes += 1
        self._pass_syncs = not self.no_sync and self.passes >= self.backward_passes_per_step
        Variable._execution_engine.queue_callback(self._end_pass)
        if self._pass_syncs and self.telemetry is not None:
            self.telemetry.backward_start(self.buckets)

    def _on_grad(self, i: int, p: torch.Tensor) -> None:
        if not self._pass_open:
            self._begin_pass()
        if not self._pass_syncs:
            return
        if self.closed:
            raise RuntimeError(
                "DistributedOptimizer: a gradient arrived after this step's gradients were already "
                "communicated (backward() called again before step()). Accumulate with `with dopt.no_sync():` "
                "or backward_passes_per_step=k.")
        b, j = self._where[i]
        if self._ready[b][j]:
            raise RuntimeError(f"DistributedOptimizer: the gradient of {self.names[i]} became ready twice in one step")
        self._ready[b][j] = True
        self._missing[b] -= 1
        if self._missing[b] == 0:
            self._pack(b)
            self._launch_in_order(in_backward=True)

    def _end_pass(self) -> None:
        """Autograd engine callback at the end of each backward pass."""
        self._pass_open = False
        if self._pass_syncs:
            if self.telemetry is not None:
                self.telemetry.backward_end(self.buckets)
            self.close()

    # ------------------------------------------------------------------ pack and launch
    def _pack(self, b: int) -> None:
        spec, buf = self.buckets[b], self.buffers[b]
        if self.telemetry is not None:
            self.telemetry.bucket_ready(self.buckets, b)
        grads = []
        for j, i in enumerate(spec.params):
            p = self.params[i]
            g = p.grad if self._ready[b][j] else None
            if g is None:                                      # no gradient this step: a zero slot
                g = torch.zeros_like(p, dtype=spec.dtype, memory_format=torch.preserve_format)
            elif g.is_sparse or g.layout != torch.strided:
                raise RuntimeError(f"DistributedOptimizer does not support sparse gradients ({self.names[i]})")
            elif g.shape != p.shape:
                raise RuntimeError(f"grad of {self.names[i]} has shape {list(g.shape)}, the parameter {list(p.shape)}")
            elif g.numel() > 1 and tuple(g.stride()) != self._strides[i]:
                # a grad laid out unlike its param (rare): give its slot the param's layout
                g = torch.empty_strided(p.shape, self._strides[i], dtype=g.dtype, device=g.device).copy_(g)
            grads.append(g)
        with torch.profiler.record_function("fusedmf.pack"), _nvtx_range(f"fusedmf pack bucket {b}", self._nvtx):
            self.backends_used["pack"] = F.pack(grads, buf, scale=self.pack_scale(self.passes), backend=self.backend,
                                                sumsq=self.noise.local if self.noise is not None else None)
        self._packed[b] = True
        if self.telemetry is not None:
            self.telemetry.bucket_packed(self.buckets, b)

    def _launch_in_order(self, in_backward: bool) -> None:
        while self._next_launch < len(self.buckets) and self._packed[self._next_launch]:
            k = self._next_launch
            work = None
            if self.group.world_size > 1:
                with torch.profiler.record_function("fusedmf.allreduce_launch"):
                    work = dist.all_reduce(self.buffers[k], op=dist.ReduceOp.SUM, group=self.group.process_group,
                                           async_op=True)
            self._works[k] = work
            if self.telemetry is not None:
                self.telemetry.bucket_launched(self.buckets, k, work, in_backward)
            self._next_launch += 1

    def close(self) -> None:
        """Pack the buckets still missing gradients, launch everything left, count who had which grad,
        launch the round check and the noise-scale allreduce."""
        if self.closed:
            return
        # A param whose hook did not fire in the communicating pass may still hold a gradient
        # accumulated in earlier (no_sync) passes, or in passes before a step() that came early:
        # that gradient is part of the step.
        missing = []
        for b in range(len(self.buckets)):
            if self._packed[b]:
                continue
            for j, i in enumerate(self.buckets[b].params):
                if not self._ready[b][j]:
                    if self.params[i].grad is not None:
                        self._ready[b][j] = True
                    else:
                        missing.append((b, j))
        if missing and not self.find_unused_parameters:
            names = ", ".join(f"{self.names[self.buckets[b].params[j]]} "
                              f"(shape {list(self.params[self.buckets[b].params[j]].shape)})" for b, j in missing[:5])
            raise RuntimeError(
                f"DistributedOptimizer: {len(missing)} parameter(s) got no gradient in this step on rank "
                f"{self.group.rank}: {names}{' ...' if len(missing) > 5 else ''}. "
                "Pass find_unused_parameters=True to allow it.")
        self._locally_missing = bool(missing)
        for b in range(len(self.buckets)):
            if not self._packed[b]:
                self._pack(b)
        self._launch_in_order(in_backward=False)
        if self.group.world_size > 1:
            if self.find_unused_parameters and self.buckets:
                used = [1.0 if self._ready[b][j] else 0.0 for b in range(len(self.buckets))
                        for j in range(len(self.buckets[b].params))]
                mask = torch.tensor(used, dtype=torch.float32)
                device = self.buckets[0].device
                self._mask = mask.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else mask
                self._mask_work = dist.all_reduce(self._mask, op=dist.ReduceOp.SUM, group=self.group.process_group,
                                                  async_op=True)
            if self.check is not None:
                steps, forwards = self.round_meta()
                self.check.launch(steps, self.passes, forwards)
            if self.noise is not None:
                self.noise.launch()
        self.closed = True

    # ------------------------------------------------------------------ waiting
    def wait(self, why: str = "") -> None:
        """Close the round if backward did not, wait for all of its collectives, verify the round check."""
        self.close()
        suffix = f" ({why})" if why else ""
        for k, work in enumerate(self._works):
            self.group.wait(work, f"the allreduce of bucket {k} ({self.buckets[k].nbytes} bytes){suffix}",
                            host_wait=self.buckets[k].device.type == "cpu")
        self.group.wait(self._mask_work, f"the count of ranks that produced each gradient{suffix}",
                        host_wait=self.host_wait)
        if self.noise is not None:
            self.noise.wait(host_wait=self.host_wait)
        if self.check is not None:
            self.check_flag = self.check.verify(why or "step")

    def used_params(self) -> Optional[set]:
        """Indices of params to update, or None for all (no rank can have missed one that this rank has).
        Call after :meth:`wait`."""
        if not self._locally_missing:
            return None       # every param has a gradient here, so on at least one rank: update all
        order = [self.buckets[b].params[j] for b in range(len(self.buckets)) for j in range(len(self.buckets[b].params))]
        if self.group.world_size == 1 or not self.find_unused_parameters:
            return {self.buckets[b].params[j] for b in range(len(self.buckets))
                    for j in range(len(self.buckets[b].params)) if self._ready[b][j]}
        counts = self._mask.tolist()   # host read, only on a rank that missed a gradient
        return {i for i, c in zip(order, counts) if c > 0}

    def check_non_finite(self, user_found) -> Optional[torch.Tensor]:
        """found_inf over the reduced buffers (a 1-element fp32 tensor), combined with the caller's
        flag; a 1-element fp32 ``user_found`` on the buffers' device is updated in place."""
        if not self.buckets:
            return user_found if isinstance(user_found, torch.Tensor) or user_found is None \
                else torch.tensor(float(user_found), dtype=torch.float32)
        per_device: Dict[torch.device, list] = {}
        for spec, buf in zip(self.buckets, self.buffers):
            per_device.setdefault(spec.device, []).append(buf)
        devices = list(per_device)
        if (isinstance(user_found, torch.Tensor) and user_found.numel() == 1 and user_found.dtype == torch.float32
                and user_found.device == devices[0]):
            target = user_found.reshape(1)            # a view: the caller's flag is updated in place
        else:
            target = torch.zeros(1, dtype=torch.float32, device=devices[0])
            if user_found is not None:
                target += torch.as_tensor(user_found, dtype=torch.float32).reshape(1).to(devices[0])
        sumsq = None
        if self.noise is not None:       # one device (checked at construction)
            self.noise.global_.zero_()
            sumsq = self.noise.global_
        _, ran = F.found_inf_over(per_device, into=target, sumsq=sumsq, backend=self.backend)  # NOTE [one amp helper]
        self.backends_used["non_finite_check"] = ran
        if self.check_flag is not None:           # NOTE [round check], deferred: skip a mismatched round
            target += self.check_flag.to(target.device, non_blocking=True)
        return target

    # ------------------------------------------------------------------ reports
    def layout(self) -> List[dict]:
        return [{"bucket": b.index, "params": list(b.params), "names": [self.labels[i] for i in b.params],
                 "numel": b.numel, "bytes": b.nbytes, "dtype": str(b.dtype).replace("torch.", ""),
                 "device": str(b.device)} for b in self.buckets]

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


@contextlib.contextmanager
def _nvtx_range(name: str, enabled: bool):
    if enabled:
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield
