"""DistributedOptimizer: bucketed, compressed gradient allreduce that feeds the fused update directly.

One training step on N ranks (design.md, "One training step with DistributedOptimizer"):

    backward  each parameter's post-accumulate-grad hook marks it ready; when the last parameter of a
              bucket is ready, ONE pack launch writes cast(grad / (N * passes)) for all of them into
              the bucket's flat buffer (fusedmf.functional.pack) and an async allreduce of that buffer
              starts, while backward goes on. Buckets are launched in index order (the same order on
              every rank, so collectives always match); a bucket that fills early waits for the ones
              before it.
    end of    (autograd engine callback) buckets still missing gradients are packed with zeros for
    backward  the missing ones and launched; with find_unused_parameters a tiny allreduce counts, per
              parameter, the ranks that produced a gradient.
    step()    waits for every bucket (stream waits on GPUs, no host synchronisation), checks the
              reduced buffers for inf/NaN into found_inf (a non-finite value on any rank survives the
              sum, so every rank decides the same), then runs the optimizer's fused update with each
              parameter's gradient being a view of the reduced buffer (shape and strides of the param,
              dtype of the communication): no unflatten pass. found_inf set skips the whole step on
              every rank, state untouched (NOTE [deferred skip accounting] in fusedmf/optim/_base.py).

``p.grad`` keeps this rank's own (unreduced) gradient; the reduced one, as the update saw it, is
``reduced_grads()``.

Compression tolerance (what tests/test_comm.py asserts): the reduced gradient of one element is the
sum over ranks of round(g_r / N), each rounding off by at most u·|g_r|/N, plus the roundings of the
N − 1 additions of the allreduce in the communication dtype, each at most u·Σ|g_r|/N. So
|reduced − mean| <= N·u·Σ_r |g_r| / N  (+ N·2^-25 absolute for fp16, whose subnormals stop at 2^-24),
with u = 2^-11 for fp16 and 2^-8 for bf16 (unit roundoff of an 11- and 8-bit significand). Propagated
through T SGD steps with learning rate lr and momentum μ, a parameter moves at most
lr·T/(1 − μ)·(that bound) away from uncompressed training, to first order; Adam's normalised step
moves it at most about lr·T·2·N·u.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import warnings
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist
from torch.autograd import Variable

from .. import functional as F
from ..functional.pack import slot_strides, slot_view
from ..noise import GradientNoiseScale
from ..optim._base import MFOptimizerBase
from .buckets import BucketSpec, assign_buckets
from .telemetry import CommTelemetry

COMPRESSION = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}

Timeout = Union[None, float, datetime.timedelta]


def _as_timedelta(timeout: Timeout) -> Optional[datetime.timedelta]:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if not float(timeout) > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


class CommError(RuntimeError):
    """A collective of the DistributedOptimizer failed or timed out (a rank died, hung or diverged)."""


class DistributedOptimizer:
    r"""Data-parallel wrapper of an :class:`~fusedmf.optim.MFSGD` / :class:`~fusedmf.optim.MFAdam`.

    Args:
        optimizer: the optimizer over this rank's replica of the model (same params on every rank).
        process_group: the group to average over (default: the default group). Without an initialised
            process group the wrapper runs with world size 1 (no communication).
        bucket_cap_mb: cap of each bucket's flat buffer, in MB of the communication dtype.
        compression: "fp16", "bf16" or "none" (communicate in the gradients' own dtype).
        first_bucket_cap_mb: cap of the first bucket (small, so communication starts early).
        backward_passes_per_step: accumulate this many backward passes locally before communicating.
        average_backward_passes: divide the accumulated gradient by the number of backward passes (so k
            micro-batches with a mean loss each give the mean-loss gradient of their union); False sums
            them, for losses already divided by k.
        find_unused_parameters: allow parameters that get no gradient in a step (on some or all ranks):
            one small extra allreduce per step counts the ranks that produced each gradient; a parameter
            no rank produced a gradient for is not updated, one that some ranks produced is updated with
            the average (zeros from the others). The count is read by the host only on a rank that
            missed a gradient. False: a missing gradient is an error.
        timeout: seconds (or a timedelta) a rank waits for the others at construction and in ``step()``
            before raising :class:`CommError`. None: the process group's own timeout. On NCCL the
            step's waits never block the host; its timeout is the process group's.
        telemetry: record per-step communication telemetry (``self.telemetry``, see fusedmf.comm.telemetry).
        telemetry_history: how many steps the telemetry keeps.
        backend: backend of the pack and non-finite-check ops ("auto" or a name); the update runs on
            the optimizer's own backend.
        noise_scale: a :class:`fusedmf.noise.GradientNoiseScale` to feed every step with the local and
            reduced gradient norms, summed inside the pack and non-finite-check kernels (NOTE [noise scale
            from the allreduce] in fusedmf/noise.py): one 3-float allreduce per step more, no extra pass
            over the gradients, no host synchronisation; the sample of step t arrives at step t + 1.
            Needs world size >= 2 and every bucket on one device.

    Use it as the optimizer: ``loss.backward(); dopt.step(); dopt.zero_grad()``. With a
    :class:`fusedmf.amp.DynamicLossScaler`, ``scaler.step(dopt)`` works: the scaler's found_inf is
    updated in place with the check of the reduced buffers, so ``scaler.update()`` makes the same
    decision on every rank. LR schedulers take ``dopt.optimizer``.
    """

    _step_supports_amp_scaling = True
    _warned_grad_scaler = False

    def __init__(
        self,
        optimizer: MFOptimizerBase,
        *,
        process_group=None,
        bucket_cap_mb: float = 25.0,
        compression: str = "fp16",
        first_bucket_cap_mb: float = 1.0,
        backward_passes_per_step: int = 1,
        average_backward_passes: bool = True,
        find_unused_parameters: bool = True,
        timeout: Timeout = None,
        telemetry: bool = False,
        telemetry_history: int = 100,
        backend: str = "auto",
        noise_scale: Optional[GradientNoiseScale] = None,
    ):
        if not isinstance(optimizer, MFOptimizerBase):
            raise TypeError(f"DistributedOptimizer wraps a fusedmf MFSGD or MFAdam, got {type(optimizer).__name__}")
        if compression not in COMPRESSION:
            raise ValueError(f"compression must be one of {tuple(COMPRESSION)}, got {compression!r}")
        if int(backward_passes_per_step) != backward_passes_per_step or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {backward_passes_per_step!r}")
        self.optimizer = optimizer
        self.compression = compression
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.average_backward_passes = bool(average_backward_passes)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.timeout = _as_timedelta(timeout)
        self.backend = backend
        self.bucket_cap_mb, self.first_bucket_cap_mb = float(bucket_cap_mb), float(first_bucket_cap_mb)

        if dist.is_available() and dist.is_initialized():
            self.process_group = process_group
            self.world_size = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)
            self.comm_backend = str(dist.get_backend(process_group))
        elif process_group is not None:
            raise RuntimeError("DistributedOptimizer: a process_group was given but torch.distributed is not initialised")
        else:
            self.process_group, self.world_size, self.rank, self.comm_backend = None, 1, 0, "none"

        # every param of the optimizer, in registration order; only those that require grad are bucketed
        self._all_params: List[torch.Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
        self._verify_same_parameters()
        self.params: List[torch.Tensor] = [p for p in self._all_params if p.requires_grad]
        comm_dtype = COMPRESSION[compression]
        self.buckets: List[BucketSpec] = assign_buckets(
            self.params, comm_dtype_of=lambda p: comm_dtype or p.dtype,
            bucket_cap_mb=self.bucket_cap_mb, first_bucket_cap_mb=self.first_bucket_cap_mb)
        # zeroed once: the padding between slots stays zero forever (NOTE [pack layout])
        self._buffers = [torch.zeros(b.numel, dtype=b.dtype, device=b.device) for b in self.buckets]
        self._strides = [slot_strides(p) for p in self.params]
        self._where: List[tuple] = [None] * len(self.params)    # param index -> (bucket, slot)
        self._views: Dict[torch.Tensor, torch.Tensor] = {}
        for b, buf in zip(self.buckets, self._buffers):
            for j, (i, off) in enumerate(zip(b.params, b.offsets)):
                self._where[i] = (b.index, j)
                self._views[self.params[i]] = slot_view(buf, off, self.params[i].shape, self._strides[i])
        self._host_wait = all(b.device.type == "cpu" for b in self.buckets)
        self._nvtx = any(b.device.type == "cuda" for b in self.buckets)
        # checked before the hooks go on the params: a rejected argument leaves the model untouched
        self.noise_scale: Optional[GradientNoiseScale] = self._init_noise_scale(noise_scale)
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self.params)]

        self.telemetry: Optional[CommTelemetry] = None
        if telemetry:
            device = self.buckets[0].device if self.buckets else torch.device("cpu")
            self.telemetry = CommTelemetry(rank=self.rank, world_size=self.world_size, backend=self.comm_backend,
                                           device=device, history=telemetry_history)
        self._no_sync = False
        self._steps = 0
        #: what ran in the last step: {"pack": name, "non_finite_check": name, "update": {name: tensors}}
        self.backends_used: Dict[str, object] = {}
        self._reset_round()

    def _init_noise_scale(self, noise_scale) -> Optional[GradientNoiseScale]:
        """Device state of NOTE [noise scale from the allreduce] (fusedmf/noise.py)."""
        if noise_scale is None:
            return None
        if not isinstance(noise_scale, GradientNoiseScale):
            raise TypeError(f"noise_scale must be a fusedmf.noise.GradientNoiseScale, got {type(noise_scale).__name__}")
        if self.world_size < 2:
            raise ValueError("noise_scale needs world size >= 2: with one rank the local and the global batch are the "
                             "same batch, and B_simple cannot be estimated (use GradientNoiseScale.update by hand)")
        devices = {b.device for b in self.buckets}
        if len(devices) != 1:
            raise ValueError(f"noise_scale needs every gradient on one device, the buckets are on {sorted(map(str, devices))}")
        device = devices.pop()
        zeros = lambda n: torch.zeros(n, dtype=torch.float32, device=device)  # noqa: E731
        self._ns_local = zeros(1)       # Σ (g·s)² of this rank's packs in the current round
        self._ns_global = zeros(1)      # Σ x² of the reduced buffers, from the non-finite check
        self._ns_carry = zeros(2)       # [|G_B|² unscaled, valid] of the last step, sent with the next allreduce
        self._ns_prev_local = zeros(1)  # |G_b|² (mean over ranks, unscaled) of the last step
        self._ns_has_prev = False
        self._ns_comm: Optional[torch.Tensor] = None
        self._ns_work = None
        return noise_scale

    # ------------------------------------------------------------------ construction check
    def _signature(self):
        config = {"compression": self.compression, "bucket_cap_mb": self.bucket_cap_mb,
                  "first_bucket_cap_mb": self.first_bucket_cap_mb,
                  "backward_passes_per_step": self.backward_passes_per_step,
                  "average_backward_passes": self.average_backward_passes,
                  "find_unused_parameters": self.find_unused_parameters}
        params = []
        for gi, g in enumerate(self.optimizer.param_groups):
            for pi, p in enumerate(g["params"]):
                params.append((gi, pi, tuple(p.shape), str(p.dtype).replace("torch.", ""), bool(p.requires_grad)))
        return config, params

    def _verify_same_parameters(self) -> None:
        """Every rank must hold the same parameters (count, shapes, dtypes) and settings: a mismatch
        would pair up buckets of different sizes and hang or corrupt (prior-art.md, complaint 7)."""
        if self.world_size == 1:
            return
        config, params = self._signature()
        digest = hashlib.sha256(repr((config, params)).encode()).digest()
        device = torch.device("cuda", torch.cuda.current_device()) if self.comm_backend == "nccl" else torch.device("cpu")
        mine = torch.tensor([len(params), int.from_bytes(digest[:8], "little", signed=True)],
                            dtype=torch.int64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        work = dist.all_gather(gathered, mine, group=self.process_group, async_op=True)
        self._wait(work, "the parameter check at construction", host_wait=True,
                   hint="Not every rank constructed the DistributedOptimizer: a rank died, hung, or skipped it.")
        if all(torch.equal(g, gathered[0]) for g in gathered):
            return
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, (config, params), group=self.process_group)
        raise ValueError("DistributedOptimizer: the ranks do not hold the same parameters or settings: "
                         + _first_mismatch(everyone))

    # ------------------------------------------------------------------ per-step state
    def _reset_round(self) -> None:
        nb = len(self.buckets)
        self._passes = 0                  # backward passes seen since the last step
        self._pass_open = False           # a backward pass is running (its end callback is queued)
        self._pass_syncs = False          # whether the running pass communicates
        self._ready = [[False] * len(b.params) for b in self.buckets]
        self._missing = [len(b.params) for b in self.buckets]
        self._packed = [False] * nb
        self._works: List[object] = [None] * nb
        self._next_launch = 0
        self._closed = False              # every bucket of this step has been launched
        self._mask_work = None
        self._mask: Optional[torch.Tensor] = None
        self._locally_missing = False
        if getattr(self, "noise_scale", None) is not None:
            self._ns_local.zero_()
            self._ns_comm, self._ns_work = None, None

    def _scale(self) -> float:
        passes = max(self._passes, 1) if self.average_backward_passes else 1
        return 1.0 / (self.world_size * passes)

    # ------------------------------------------------------------------ backward: hooks
    def _make_hook(self, i: int) -> Callable:
        def hook(p: torch.Tensor) -> None:
            self._on_grad(i, p)
        return hook

    def _begin_pass(self) -> None:
        self._pass_open = True
        self._passes += 1
        self._pass_syncs = not self._no_sync and self._passes >= self.backward_passes_per_step
        Variable._execution_engine.queue_callback(self._end_pass)
        if self._pass_syncs and self.telemetry is not None:
            self.telemetry.backward_start(self.buckets)

    def _on_grad(self, i: int, p: torch.Tensor) -> None:
        if not self._pass_open:
            self._begin_pass()
        if not self._pass_syncs:
            return
        if self._closed:
            raise RuntimeError(
                "DistributedOptimizer: a gradient arrived after this step's gradients were already "
                "communicated (backward() called again before step()). Accumulate with `with dopt.no_sync():` "
                "or backward_passes_per_step=k.")
        b, j = self._where[i]
        if self._ready[b][j]:
            raise RuntimeError(f"DistributedOptimizer: the gradient of parameter {i} became ready twice in one step")
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
            self._close_round()

    # ------------------------------------------------------------------ pack and launch
    def _pack(self, b: int) -> None:
        spec, buf = self.buckets[b], self._buffers[b]
        if self.telemetry is not None:
            self.telemetry.bucket_ready(self.buckets, b)
        grads = []
        for j, i in enumerate(spec.params):
            p = self.params[i]
            g = p.grad if self._ready[b][j] else None
            if g is None:                                      # no gradient this step: a zero slot
                g = torch.zeros_like(p, dtype=spec.dtype, memory_format=torch.preserve_format)
            elif g.is_sparse or g.layout != torch.strided:
                raise RuntimeError(f"DistributedOptimizer does not support sparse gradients (parameter {i})")
            elif g.shape != p.shape:
                raise RuntimeError(f"grad of parameter {i} has shape {list(g.shape)}, the parameter {list(p.shape)}")
            elif g.numel() > 1 and tuple(g.stride()) != self._strides[i]:
                # a grad laid out unlike its param (rare): give its slot the param's layout
                g = torch.empty_strided(p.shape, self._strides[i], dtype=g.dtype, device=g.device).copy_(g)
            grads.append(g)
        with torch.profiler.record_function("fusedmf.pack"), _nvtx_range(f"fusedmf pack bucket {b}", self._nvtx):
            self.backends_used["pack"] = F.pack(grads, buf, scale=self._scale(), backend=self.backend,
                                                sumsq=self._ns_local if self.noise_scale is not None else None)
        self._packed[b] = True
        if self.telemetry is not None:
            self.telemetry.bucket_packed(self.buckets, b)

    def _launch_in_order(self, in_backward: bool) -> None:
        while self._next_launch < len(self.buckets) and self._packed[self._next_launch]:
            k = self._next_launch
            work = None
            if self.world_size > 1:
                with torch.profiler.record_function("fusedmf.allreduce_launch"):
                    work = dist.all_reduce(self._buffers[k], op=dist.ReduceOp.SUM, group=self.process_group,
                                           async_op=True)
            self._works[k] = work
            if self.telemetry is not None:
                self.telemetry.bucket_launched(self.buckets, k, work, in_backward)
            self._next_launch += 1

    def _close_round(self) -> None:
        """Pack the buckets still missing gradients, launch everything left, count who had which grad."""
        if self._closed:
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
            names = ", ".join(f"{self.buckets[b].params[j]} (shape {list(self.params[self.buckets[b].params[j]].shape)})"
                              for b, j in missing[:5])
            raise RuntimeError(
                f"DistributedOptimizer: {len(missing)} parameter(s) got no gradient in this step on rank "
                f"{self.rank}: {names}{' ...' if len(missing) > 5 else ''} (indices among the parameters that "
                "require grad, in registration order). Pass find_unused_parameters=True to allow it.")
        self._locally_missing = bool(missing)
        for b in range(len(self.buckets)):
            if not self._packed[b]:
                self._pack(b)
        self._launch_in_order(in_backward=False)
        if self.find_unused_parameters and self.world_size > 1 and self.buckets:
            used = [1.0 if self._ready[b][j] else 0.0 for b in range(len(self.buckets))
                    for j in range(len(self.buckets[b].params))]
            mask = torch.tensor(used, dtype=torch.float32)
            device = self.buckets[0].device
            self._mask = mask.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else mask
            self._mask_work = dist.all_reduce(self._mask, op=dist.ReduceOp.SUM, group=self.process_group, async_op=True)
        if self.noise_scale is not None:
            # NOTE [noise scale from the allreduce]: [local Σ(g·s)², carried |G_B|², carried validity]
            self._ns_comm = torch.cat([self._ns_local, self._ns_carry])
            self._ns_work = dist.all_reduce(self._ns_comm, op=dist.ReduceOp.SUM, group=self.process_group,
                                            async_op=True)
        self._closed = True

    # ------------------------------------------------------------------ waiting
    def _wait(self, work, what: str, *, host_wait: bool, hint: str = "") -> None:
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
                f"DistributedOptimizer (rank {self.rank} of {self.world_size}, {self.comm_backend}): {what} failed "
                f"or did not complete within {limit} ({reason}). {hint} The process group cannot be used after this."
            ) from exc

    def _used_params(self) -> Optional[set]:
        """Indices of params to update, or None for all (no rank can have missed one that this rank has)."""
        self._wait(self._mask_work, "the count of ranks that produced each gradient", host_wait=self._host_wait)
        if self.world_size == 1 or not self.find_unused_parameters:
            if not self._locally_missing:
                return None
            return {self.buckets[b].params[j] for b in range(len(self.buckets))
                    for j in range(len(self.buckets[b].params)) if self._ready[b][j]}
        if not self._locally_missing:
            return None       # every param has a gradient here, so on at least one rank: update all
        counts = self._mask.tolist()   # host read, only on a rank that missed a gradient
        order = [self.buckets[b].params[j] for b in range(len(self.buckets)) for j in range(len(self.buckets[b].params))]
        return {i for i, c in zip(order, counts) if c > 0}

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale=None, found_inf=None):
        """Finish communication and apply the fused update from the reduced buffers (see the module doc).

        ``grad_scale``: the loss scale the gradients carry (unscaled inside the update). ``found_inf``:
        a non-finite flag of the caller's (e.g. a loss scaler's); a 1-element fp32 tensor on the
        gradients' device is updated in place with the check of the reduced buffers.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
            if found_inf is not None and self.world_size > 1 and not DistributedOptimizer._warned_grad_scaler:
                DistributedOptimizer._warned_grad_scaler = True
                warnings.warn(
                    "DistributedOptimizer driven by torch.amp.GradScaler: every rank skips the same steps, but "
                    "GradScaler.update() only sees its own rank's local check, so the ranks' loss scales can drift "
                    "apart after an overflow on one rank. Use fusedmf.amp.DynamicLossScaler, whose found_inf this "
                    "step updates in place.", RuntimeWarning, stacklevel=2)
        tel = self.telemetry
        if tel is not None:
            tel.step_start(self.buckets)
        self._close_round()
        with torch.profiler.record_function("fusedmf.wait"):
            for k, work in enumerate(self._works):
                self._wait(work, f"the allreduce of bucket {k} ({self.buckets[k].nbytes} bytes)",
                           host_wait=self.buckets[k].device.type == "cpu")
            used = self._used_params()
            if self.noise_scale is not None:
                self._wait(self._ns_work, "the allreduce of the noise-scale norms", host_wait=self._host_wait)
        if tel is not None:
            tel.wait_end(self.buckets)

        with torch.profiler.record_function("fusedmf.update"):
            found = self._check_non_finite(found_inf)
            if grad_scale is not None and not isinstance(grad_scale, torch.Tensor):
                grad_scale = torch.tensor(float(grad_scale), dtype=torch.float32)
            if self.noise_scale is not None:
                self._noise_scale_step(found, grad_scale)
            views = self._views if used is None else {self.params[i]: self._views[self.params[i]] for i in used}
            self.optimizer.step(grads=views.get, grad_scale=grad_scale, found_inf=found)
        self.backends_used["update"] = dict(self.optimizer.backends_used)
        if tel is not None:
            tel.step_end(self.buckets, lambda: self.optimizer.last_step_skipped)
        self._steps += 1
        self._reset_round()
        return loss

    def _check_non_finite(self, user_found) -> Optional[torch.Tensor]:
        if not self.buckets:
            return user_found if isinstance(user_found, torch.Tensor) or user_found is None \
                else torch.tensor(float(user_found), dtype=torch.float32)
        per_device: Dict[torch.device, list] = {}
        for spec, buf in zip(self.buckets, self._buffers):
            per_device.setdefault(spec.device, []).append(buf)
        devices = list(per_device)
        target = None
        if (isinstance(user_found, torch.Tensor) and user_found.numel() == 1 and user_found.dtype == torch.float32
                and user_found.device == devices[0]):
            target = user_found.reshape(1)            # a view: the caller's flag is updated in place
        else:
            target = torch.zeros(1, dtype=torch.float32, device=devices[0])
            if user_found is not None:
                target += torch.as_tensor(user_found, dtype=torch.float32).reshape(1).to(devices[0])
        sumsq = None
        if self.noise_scale is not None:       # one device (checked at construction)
            self._ns_global.zero_()
            sumsq = self._ns_global
        _, ran = F.found_inf_over(per_device, into=target, sumsq=sumsq, backend=self.backend)  # NOTE [one amp helper]
        self.backends_used["non_finite_check"] = ran
        return target

    def _noise_scale_record_previous(self) -> None:
        """The previous step's sample is complete once this round's small allreduce is done: its
        carried |G_B|² and validity, summed over the ranks, are now the same on every rank."""
        if self._ns_has_prev and self._ns_comm is not None:
            n = self.world_size
            comm = self._ns_comm
            valid = (comm[2:3] > n - 0.5).to(torch.float32)      # every rank had a finite step
            self.noise_scale.record(torch.cat([self._ns_prev_local, comm[1:2] / n, valid]), n)
            self._ns_has_prev = False

    def _noise_scale_step(self, found: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor]) -> None:
        """NOTE [noise scale from the allreduce]: record the last step's sample, carry this step's."""
        self._noise_scale_record_previous()
        comm, n = self._ns_comm, self.world_size
        device = comm.device
        if grad_scale is not None:
            inv2 = grad_scale.to(device=device, dtype=torch.float32).reshape(1).reciprocal().square()
        else:
            inv2 = torch.ones(1, dtype=torch.float32, device=device)
        # mean over ranks of |g_r / passes|² = N² · Σ_r |g_r·s|² / N, with s = 1 / (N · passes)
        self._ns_prev_local = comm[0:1] * float(n) * inv2
        valid = torch.ones(1, dtype=torch.float32, device=device) if found is None else \
            (found.to(device).reshape(1) == 0).to(torch.float32)
        glob = torch.where(valid > 0, self._ns_global * inv2, torch.zeros_like(self._ns_global))
        self._ns_carry = torch.cat([glob, valid])
        self._ns_has_prev = True

    # ------------------------------------------------------------------ accumulation and zeroing
    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate into ``p.grad`` without communicating; the next one
        outside (or ``step()``) communicates the sum, averaged over passes and ranks."""
        old, self._no_sync = self._no_sync, True
        try:
            yield
        finally:
            self._no_sync = old

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) every ``p.grad``. Called in the middle of a step (gradients already being
        communicated, no ``step()`` yet), it completes that step's collectives, so that every rank stays
        in step, and throws their result away."""
        if self._next_launch > 0 or self._closed:
            self._close_round()
            for k, work in enumerate(self._works):
                self._wait(work, f"the allreduce of bucket {k} (drained by zero_grad)", host_wait=self._host_wait)
            self._wait(self._mask_work, "the count of ranks that produced each gradient (drained by zero_grad)",
                       host_wait=self._host_wait)
            if self.noise_scale is not None:
                self._wait(self._ns_work, "the allreduce of the noise-scale norms (drained by zero_grad)",
                           host_wait=self._host_wait)
                self._noise_scale_record_previous()   # the carry arrived; this round's own sample is dropped
            if self.telemetry is not None:
                self.telemetry.discard_round()
        self._reset_round()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ optimizer-like surface
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    @property
    def last_step_skipped(self) -> Optional[bool]:
        return self.optimizer.last_step_skipped

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict (the same on every rank; loads into the plain optimizer)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("DistributedOptimizer: buckets are fixed at construction; add the param group "
                                  "to the optimizer before wrapping it")

    def reduced_grads(self) -> Dict[torch.Tensor, torch.Tensor]:
        """param -> its reduced (averaged, compressed) gradient as the last update saw it: views of the
        flat buffers, valid until the next backward pass that communicates."""
        return dict(self._views)

    def bucket_layout(self) -> List[dict]:
        """Which parameters (indices in registration order, requiring grad) each bucket holds."""
        return [{"bucket": b.index, "params": list(b.params), "numel": b.numel, "bytes": b.nbytes,
                 "dtype": str(b.dtype).replace("torch.", ""), "device": str(b.device)} for b in self.buckets]

    def remove_hooks(self) -> None:
        """Detach from the parameters (the wrapper cannot step afterwards)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __repr__(self) -> str:
        return (f"DistributedOptimizer(world_size={self.world_size}, backend={self.comm_backend!r}, "
                f"compression={self.compression!r}, buckets={len(self.buckets)}, "
                f"bucket_cap_mb={self.bucket_cap_mb:g}, first_bucket_cap_mb={self.first_bucket_cap_mb:g},\n"
                f"  optimizer={self.optimizer!r})")


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


def _first_mismatch(everyone: list) -> str:
    """A message naming the first rank, parameter and field that differ from rank 0."""
    config0, params0 = everyone[0]
    for r, (config, params) in enumerate(everyone[1:], start=1):
        for key in config0:
            if config.get(key) != config0.get(key):
                return f"setting {key} is {config0.get(key)!r} on rank 0 but {config.get(key)!r} on rank {r}"
        for idx, (a, b) in enumerate(zip(params0, params)):
            if a != b:
                ga, pa, sa, da, ra = a
                gb, pb, sb, db, rb = b
                return (f"parameter {idx} (param group {ga}, index {pa}) has shape {list(sa)}, dtype {da}"
                        f"{'' if ra else ', requires_grad=False'} on rank 0 but parameter {idx} (param group {gb}, "
                        f"index {pb}) has shape {list(sb)}, dtype {db}{'' if rb else ', requires_grad=False'} "
                        f"on rank {r}")
        if len(params) != len(params0):
            return f"rank 0 has {len(params0)} parameters, rank {r} has {len(params)}"
    return "the signatures differ (no field-level difference found)"
