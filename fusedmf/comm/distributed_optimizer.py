"""DistributedOptimizer: a torch.optim.Optimizer that averages gradients over the ranks in bucketed,
compressed allreduces and feeds the reduced buffers to the wrapped optimizer's update.

One training step on N ranks (docs/design.md, one distributed step):

    construct  the ranks' parameters, buffers and settings are checked (rank_check.py), then every
               parameter (and with ``module=`` every buffer) is broadcast from rank 0 (broadcast.py)
    backward   the bucket round (bucket_round.py): pack + async allreduce per bucket while backward
               runs; at its end the round check (NOTE [round check]) and, with ``noise_scale``, the
               noise-scale probe's allreduce (noise_probe.py)
    step()     wait, check the ranks agree, check the reduced buffers for inf/NaN into found_inf (a
               non-finite value on any rank survives the sum, so every rank decides the same), then
               - fused path (MFSGD / MFAdam / any optimizer whose ``step`` takes ``grads=``,
                 ``grad_scale=``, ``found_inf=``: the public seam): ``optimizer.step(grads=views.get,
                 ...)`` with each parameter's gradient a view of the reduced buffer (shape and strides
                 of the param, dtype of the communication): no unflatten pass, the loss-scale unscale
                 and any post-division inside the update, all-or-nothing skip on the device;
               - generic path (any other torch.optim.Optimizer, as Horovod wraps them): each ``p.grad``
                 becomes its reduced gradient (the buffer view itself when its dtype is the param's,
                 else a cast copy), unscaled in place if a loss scale was given, then the optimizer's
                 own ``step()`` (skipped, with a host read of found_inf, on overflow);
               then, with ``module=`` and ``broadcast_buffers``, the module's buffers are broadcast
               from rank 0, and every ``replica_check_every`` steps the replicas are compared.

In the fused path ``p.grad`` keeps this rank's own (unreduced) gradient unless :meth:`synchronize`
(or ``unscale_``) was called; the reduced one, as the update saw it, is ``reduced_grads()``.

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
import inspect
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..amp import unscale_grads_
from ..noise import GradientNoiseScale
from .broadcast import broadcast_tensors_
from .bucket_round import BucketRound
from .compression import Average, Compressor, ReduceOp, as_compressor, as_reduce_op
from .group import CommError, CommGroup, Timeout
from .noise_probe import NoiseScaleProbe
from .rank_check import ReplicaCheck, RoundCheck, verify_same_signature
from .telemetry import CommTelemetry

__all__ = ["DistributedOptimizer", "CommError"]


def has_fused_seam(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` takes the public seam ``grads=``, ``grad_scale=``, ``found_inf=``."""
    try:
        params = inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):
        return False
    return all(k in params for k in ("grads", "grad_scale", "found_inf"))


class DistributedOptimizer(torch.optim.Optimizer):
    r"""Data-parallel wrapper of any optimizer; a :class:`torch.optim.Optimizer` itself.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's (the same objects), so LR
    schedulers, ``register_step_pre_hook`` / ``register_step_post_hook`` (they fire once per
    ``dopt.step()``), ``state_dict``, ``add_param_group`` and ``zero_grad`` behave as on any optimizer.
    MFSGD / MFAdam (and any optimizer with the same ``step(grads=, grad_scale=, found_inf=)`` seam)
    update straight from the reduced buffers; any other torch optimizer gets the reduced gradients in
    ``p.grad`` and runs its own ``step()`` (module docstring).

    Args:
        optimizer: the optimizer over this rank's replica of the model (same params on every rank).
        module: the model, for its buffers: checked and broadcast from rank 0 at construction, and
            (``broadcast_buffers``) after every step; its training-mode forward passes are counted
            for the round check.
        named_parameters: ``model.named_parameters()`` (Horovod's argument): names used in error
            messages and in ``bucket_layout()``; every parameter of the optimizer must be named.
        process_group: the group to average over (default: the default group). Without an initialised
            process group the wrapper runs with world size 1 (no communication).
        bucket_cap_mb: cap of each bucket's flat buffer, in MB of the communication dtype.
        compression: ``fusedmf.comm.Compression.fp16 | bf16 | none`` or the strings "fp16", "bf16",
            "none" (communicate in the gradients' own dtype).
        op: ``fusedmf.comm.Average`` (default) or ``fusedmf.comm.Sum`` of the ranks' gradients.
        gradient_predivide_factor: None (default: divide by N before the sum, so that an fp16 sum
            cannot overflow), or Horovod's f: divide by f before the sum and by N/f after it (the
            after part inside the update, folded into its unscale). Average only.
        first_bucket_cap_mb: cap of the first bucket (small, so communication starts early).
        backward_passes_per_step: accumulate this many backward passes locally before communicating.
        average_backward_passes: divide the accumulated gradient by the number of backward passes (so k
            micro-batches with a mean loss each give the mean-loss gradient of their union); False sums
            them, for losses already divided by k.
        find_unused_parameters: allow parameters that get no gradient in a step (on some or all ranks):
            one small extra allreduce per step counts the ranks that produced each gradient; a parameter
            no rank produced a gradient for is not updated, one that some ranks produced is updated with
            the average (zeros from the others). False: a missing gradient is an error.
        broadcast_buffers: with ``module=``, broadcast its buffers (BatchNorm running statistics) from
            rank 0 at the end of every step, so every replica starts each forward with rank 0's, as
            torch DDP's default (which broadcasts them at the start of each forward: the values are the
            same, rank 0's after its own forwards). Broadcasting at the end of the step keeps every
            collective inside the step, so a forward that raises on one rank cannot misalign them.
            False: each rank keeps its own statistics; use ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
            for statistics over the global batch instead.
        check_ranks: the round check (NOTE [round check] in rank_check.py): every round compares the
            ranks' step numbers, backward passes and (with ``module=``) training forwards in one small
            all_gather and raises :class:`RankMismatchError` on every rank when they differ. True: read
            on the host before the update for CPU buckets ("immediate"), on the device for CUDA buckets
            ("deferred": the round is skipped through found_inf, the error raised at the next round);
            or name the mode; False: off.
        replica_check_every: None, or k: every k steps compare a checksum of every parameter across
            the ranks (one small allreduce and one host read) and raise :class:`RankMismatchError`
            naming the first diverging tensor.
        timeout: seconds (or a timedelta) a rank waits for the others at construction and in ``step()``
            before raising :class:`CommError`. None: the process group's own timeout. On NCCL the
            step's waits never block the host; its timeout is the process group's.
        telemetry: record per-step communication telemetry (``self.telemetry``, see fusedmf.comm.telemetry).
        telemetry_history: how many steps the telemetry keeps.
        backend: backend of the pack and non-finite-check ops ("auto" or a name); the update runs on
            the optimizer's own backend.
        noise_scale: a :class:`fusedmf.noise.GradientNoiseScale` to feed every step with the local and
            reduced gradient norms (NOTE [noise scale from the allreduce] in fusedmf/noise.py); its
            state and the probe's are part of ``state_dict()``. Needs world size >= 2, every bucket on
            one device, ``op=Average`` and no predivide factor.

    Use it as the optimizer: ``loss.backward(); dopt.step(); dopt.zero_grad()``. With a
    :class:`fusedmf.amp.DynamicLossScaler`, ``scaler.step(dopt)`` works: the scaler's found_inf is
    updated in place with the check of the reduced buffers, so ``scaler.update()`` makes the same
    decision on every rank; ``scaler.unscale_(dopt)`` before clipping unscales the *reduced*
    gradients (see :meth:`unscale_`).
    """

    _step_supports_amp_scaling = True
    _warned_grad_scaler = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        module: Optional[nn.Module] = None,
        named_parameters=None,
        process_group=None,
        bucket_cap_mb: float = 25.0,
        compression="fp16",
        op=Average,
        gradient_predivide_factor: Optional[float] = None,
        first_bucket_cap_mb: float = 1.0,
        backward_passes_per_step: int = 1,
        average_backward_passes: bool = True,
        find_unused_parameters: bool = True,
        broadcast_buffers: bool = True,
        check_ranks=True,
        replica_check_every: Optional[int] = None,
        timeout: Timeout = None,
        telemetry: bool = False,
        telemetry_history: int = 100,
        backend: str = "auto",
        noise_scale: Optional[GradientNoiseScale] = None,
    ):
        # ---- arguments (nothing is communicated or registered before they are all checked)
        if isinstance(optimizer, DistributedOptimizer):
            raise TypeError("DistributedOptimizer: the optimizer is already a DistributedOptimizer")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer (MFSGD, MFAdam or any torch "
                            f"optimizer), got {type(optimizer).__name__}")
        self._compressor: Compressor = as_compressor(compression)
        self.op: ReduceOp = as_reduce_op(op)
        if gradient_predivide_factor is not None:
            if self.op is not ReduceOp.Average:
                raise ValueError("gradient_predivide_factor needs op=fusedmf.comm.Average (as in Horovod)")
            if isinstance(gradient_predivide_factor, bool) or not float(gradient_predivide_factor) > 0:
                raise ValueError(f"gradient_predivide_factor must be > 0, got {gradient_predivide_factor!r}")
            gradient_predivide_factor = float(gradient_predivide_factor)
        if int(backward_passes_per_step) != backward_passes_per_step or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {backward_passes_per_step!r}")
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if noise_scale is not None and (self.op is not ReduceOp.Average or gradient_predivide_factor is not None):
            raise ValueError("noise_scale needs op=Average and no gradient_predivide_factor (its norms assume the "
                             "default prescale 1/(N·passes))")
        if replica_check_every is not None and (isinstance(replica_check_every, bool)
                                                or int(replica_check_every) != replica_check_every
                                                or replica_check_every < 1):
            raise ValueError(f"replica_check_every must be None or an integer >= 1, got {replica_check_every!r}")
        self._names_by_id = self._check_names(optimizer, named_parameters)

        self.optimizer = optimizer
        self._fused = has_fused_seam(optimizer)
        self.gradient_predivide_factor = gradient_predivide_factor
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.average_backward_passes = bool(average_backward_passes)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.broadcast_buffers = bool(broadcast_buffers)
        if check_ranks not in (True, False, *RoundCheck.MODES):
            raise ValueError(f"check_ranks must be True, False, 'immediate' or 'deferred', got {check_ranks!r}")
        self.check_ranks = check_ranks
        self.replica_check_every = replica_check_every
        self.backend = backend
        self.bucket_cap_mb, self.first_bucket_cap_mb = float(bucket_cap_mb), float(first_bucket_cap_mb)
        self._group = CommGroup(process_group, timeout=timeout)
        self.module = module
        self._noise_arg = noise_scale
        self._telemetry_args = (bool(telemetry), int(telemetry_history))

        # ---- the torch.optim.Optimizer surface over the wrapped optimizer (not a copy of it)
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()        # step hooks and profiling, as torch.optim.Optimizer.__init__
        self._warned_capturable_if_run_uncaptured = True

        self._round: Optional[BucketRound] = None
        self._forward_hook = None
        self._steps = 0
        self._forwards = 0
        self._last_skipped: Optional[bool] = None
        #: what ran in the last step: {"pack": name, "non_finite_check": name, "update": {name: tensors}}
        self.backends_used: Dict[str, object] = {}
        self._build(first=True)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _check_names(optimizer, named_parameters) -> Optional[dict]:
        if named_parameters is None:
            return None
        pairs = list(named_parameters)
        names: dict = {}
        for k, item in enumerate(pairs):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], torch.Tensor)):
                raise TypeError(f"named_parameters must yield (name, tensor) pairs (model.named_parameters()); "
                                f"item {k} is {type(item).__name__}")
            names.setdefault(id(item[1]), item[0])
        for gi, g in enumerate(optimizer.param_groups):
            for pi, p in enumerate(g["params"]):
                if id(p) not in names:
                    raise ValueError(f"named_parameters was given but parameter {pi} of param group {gi} (shape "
                                     f"{list(p.shape)}) is not in it: name every parameter of the optimizer")
        return names

    def _param_name(self, gi: int, pi: int, k: int, p: torch.Tensor) -> str:
        if self._names_by_id is not None and id(p) in self._names_by_id:
            return f"parameter {self._names_by_id[id(p)]!r}"
        return f"parameter {k} (param group {gi}, index {pi})"

    def _build(self, first: bool) -> None:
        """Check the ranks agree, broadcast rank 0's values, and (re)build the bucket round."""
        group = self._group
        entries, described, all_params, names = [], [], [], []
        for gi, g in enumerate(self.optimizer.param_groups):
            for pi, p in enumerate(g["params"]):
                k = len(all_params)
                all_params.append(p)
                names.append(self._param_name(gi, pi, k, p))
                entries.append(("param", gi, pi, tuple(p.shape), str(p.dtype).replace("torch.", ""),
                                bool(p.requires_grad)))
                described.append(names[-1])
        buffers, buffer_names = [], []
        module_params = []
        if self.module is not None:
            ids = {id(p) for p in all_params}
            for name, b in self.module.named_buffers():
                buffers.append(b)
                buffer_names.append(f"buffer {name!r}")
                entries.append(("buffer", name, tuple(b.shape), str(b.dtype).replace("torch.", "")))
                described.append(buffer_names[-1])
            module_params = [p for p in self.module.parameters() if id(p) not in ids]
        config = {"compression": self._compressor.name, "op": self.op.value,
                  "gradient_predivide_factor": self.gradient_predivide_factor, "bucket_cap_mb": self.bucket_cap_mb,
                  "first_bucket_cap_mb": self.first_bucket_cap_mb,
                  "backward_passes_per_step": self.backward_passes_per_step,
                  "average_backward_passes": self.average_backward_passes,
                  "find_unused_parameters": self.find_unused_parameters,
                  "broadcast_buffers": self.broadcast_buffers, "check_ranks": self.check_ranks,
                  "module": self.module is not None, "noise_scale": self._noise_arg is not None}

        def describe(i, e):
            if e[0] == "param":
                _, _, _, shape, dtype, rg = e
                return f"{described[i]} has shape {list(shape)}, dtype {dtype}{'' if rg else ', requires_grad=False'}"
            return f"{described[i]} has shape {list(e[2])}, dtype {e[3]}"

        verify_same_signature(group, config, entries, describe)

        params = [p for p in all_params if p.requires_grad]
        param_names = [n for n, p in zip(names, all_params) if p.requires_grad]
        labels = [self._names_by_id[id(p)] if self._names_by_id is not None else i
                  for i, p in enumerate(params)]
        noise = None
        if self._noise_arg is not None:       # validated before anything is registered on the params
            noise = NoiseScaleProbe(self._noise_arg, group, {p.device for p in params})

        # replica consistency: rank 0's values everywhere (DDP and Horovod's broadcast_parameters)
        broadcast_tensors_(all_params + module_params + buffers, group, 0, what="the parameters and buffers")

        if self._round is not None:
            self._round.remove_hooks()
        rnd = BucketRound(params, param_names, labels, group, comm_dtype=self._compressor.dtype,
                          bucket_cap_mb=self.bucket_cap_mb, first_bucket_cap_mb=self.first_bucket_cap_mb,
                          backward_passes_per_step=self.backward_passes_per_step,
                          find_unused_parameters=self.find_unused_parameters, backend=self.backend,
                          pack_scale=self._pack_scale)
        if first:
            tel, history = self._telemetry_args
            self.telemetry: Optional[CommTelemetry] = None
            if tel:
                device = rnd.buckets[0].device if rnd.buckets else torch.device("cpu")
                self.telemetry = CommTelemetry(rank=group.rank, world_size=group.world_size, backend=group.backend,
                                               device=device, history=history)
        rnd.telemetry = self.telemetry
        rnd.noise = noise
        if self.check_ranks and group.world_size > 1:
            mode = self.check_ranks if isinstance(self.check_ranks, str) else \
                "immediate" if rnd.host_wait else "deferred"
            rnd.check = RoundCheck(group, group.small_device, mode)
            rnd.round_meta = lambda: (self._steps, self._forwards if self.module is not None else -1)
        rnd.reset()
        self._round = rnd
        self._noise = noise
        self._buffers = buffers
        self._replica_check = None
        if self.replica_check_every is not None:
            self._replica_check = ReplicaCheck(group, all_params + module_params,
                                               names + [f"module parameter {i}" for i in range(len(module_params))],
                                               self.replica_check_every)
        if first and self.module is not None:
            self._forward_hook = self.module.register_forward_pre_hook(self._count_forward)
        self._reset_step_state()

    def _count_forward(self, module, args) -> None:
        if module.training and torch.is_grad_enabled():
            self._forwards += 1

    def _reset_step_state(self) -> None:
        self._reduced = None          # (used param indices or None, found_inf of the reduced buffers)
        self._synced = False          # p.grad holds the reduced gradients (synchronize / unscale_)
        self._swapped: List[torch.Tensor] = getattr(self, "_swapped", [])
        self._unscaled_by: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ scales
    def _pack_scale(self, passes: int) -> float:
        """The prescale inside pack: Average divides by N (or by f, Horovod's predivide factor)."""
        n = self._group.world_size
        p = max(passes, 1) if self.average_backward_passes else 1
        if self.op is ReduceOp.Sum:
            return 1.0 / p
        f = self.gradient_predivide_factor
        return 1.0 / ((n if f is None else f) * p)

    def _post_scale(self) -> float:
        """The factor still owed after the sum: f/N with a predivide factor f, else 1."""
        f = self.gradient_predivide_factor
        return 1.0 if f is None else f / self._group.world_size

    # ------------------------------------------------------------------ reduced gradients
    def _reduce(self):
        """Finish the round's communication once per step: wait, verify the round check, find_unused
        counts, and the non-finite check of the reduced buffers."""
        if self._reduced is None:
            rnd = self._round
            with torch.profiler.record_function("fusedmf.wait"):
                rnd.wait()
                used = rnd.used_params()
            self._reduced = (used, rnd.check_non_finite(None))
        return self._reduced

    @torch.no_grad()
    def synchronize(self) -> None:
        """Finish this step's communication now and make every parameter's ``.grad`` its reduced
        gradient (the average over ranks, as the update will apply it): the buffer view itself when it
        has the param's dtype, else a cast copy. Call it before reading or modifying gradients
        (clipping with torch's GradScaler: ``dopt.synchronize(); scaler.unscale_(dopt); clip...``);
        the following ``step()`` updates from ``p.grad``."""
        used, _ = self._reduce()
        if self._synced:
            return
        rnd = self._round
        chosen = range(len(rnd.params)) if used is None else sorted(used)
        grads = []
        for i in chosen:
            p = rnd.params[i]
            v = rnd.views[p]
            if v.dtype == p.dtype:
                p.grad = v                    # no copy: the update reads the buffer through p.grad
                self._swapped.append(p)
            elif p.grad is None:
                p.grad = torch.empty_like(p).copy_(v)
            else:
                p.grad.copy_(v)
            grads.append(p.grad)
        post = self._post_scale()
        if post != 1.0:
            torch._foreach_mul_(grads, post)
        self._synced = True

    @torch.no_grad()
    def unscale_(self, grad_scale) -> torch.Tensor:
        """Divide the reduced gradients by ``grad_scale`` in place (after :meth:`synchronize`; NOTE
        [in-place unscale] in fusedmf/amp.py) and return found_inf (non-zero if a reduced gradient is
        inf/NaN; the same on every rank). The next ``step()`` must then get no grad_scale.
        :meth:`fusedmf.amp.DynamicLossScaler.unscale_` calls this."""
        if self._unscaled_by is not None:
            raise RuntimeError("DistributedOptimizer.unscale_() was already called in this step")
        scale = grad_scale if isinstance(grad_scale, torch.Tensor) else torch.tensor(float(grad_scale))
        self.synchronize()
        used, found_reduced = self._reduced
        rnd = self._round
        chosen = range(len(rnd.params)) if used is None else sorted(used)
        if found_reduced is None:
            found_reduced = torch.zeros(1, dtype=torch.float32, device=scale.device)
        found = found_reduced.clone().reshape(1)
        unscale_grads_([rnd.params[i].grad for i in chosen], scale, found)
        self._unscaled_by = scale
        return found

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale=None, found_inf=None):
        """Finish communication and apply the update from the reduced buffers (see the module doc).

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
            if found_inf is not None and self._group.world_size > 1 and not DistributedOptimizer._warned_grad_scaler:
                DistributedOptimizer._warned_grad_scaler = True
                warnings.warn(
                    "DistributedOptimizer driven by torch.amp.GradScaler: every rank skips the same steps, but "
                    "GradScaler.update() only sees its own rank's local check, so the ranks' loss scales can drift "
                    "apart after an overflow on one rank. Use fusedmf.amp.DynamicLossScaler, whose found_inf this "
                    "step updates in place.", RuntimeWarning, stacklevel=2)
        if grad_scale is not None and self._unscaled_by is not None:
            raise RuntimeError("DistributedOptimizer.step: grad_scale given after unscale_() already unscaled")
        if grad_scale is not None and not isinstance(grad_scale, torch.Tensor):
            grad_scale = torch.tensor(float(grad_scale), dtype=torch.float32)
        rnd, tel = self._round, self.telemetry
        if tel is not None:
            tel.step_start(rnd.buckets)
        used, found_reduced = self._reduce()
        if tel is not None:
            tel.wait_end(rnd.buckets)
        found = _combine_found(found_inf, found_reduced)

        with torch.profiler.record_function("fusedmf.update"):
            if self._noise is not None:
                self._noise.step(found, grad_scale if self._unscaled_by is None else self._unscaled_by)
            if self._fused:
                self._fused_update(used, grad_scale, found)
            else:
                self._generic_update(grad_scale, found)
        self.backends_used.update(rnd.backends_used)
        if tel is not None:
            tel.step_end(rnd.buckets, lambda: self.last_step_skipped)
        self._steps += 1
        self._end_round(stepped=True)
        return loss

    def _fused_update(self, used, grad_scale, found) -> None:
        rnd = self._round
        if self._synced:            # p.grad holds the reduced gradient, post-scaled (and maybe clipped)
            chosen = None if used is None else {rnd.params[i] for i in used}
            grads = (lambda p: p.grad) if chosen is None else (lambda p: p.grad if p in chosen else None)
        else:
            views = rnd.views if used is None else {rnd.params[i]: rnd.views[rnd.params[i]] for i in used}
            grads = views.get
            post = self._post_scale()
            if post != 1.0:         # owed after the sum: folded into the update's unscale
                grad_scale = (torch.ones((), dtype=torch.float32) if grad_scale is None else grad_scale) / post
        self.optimizer.step(grads=grads, grad_scale=grad_scale, found_inf=found)
        self.backends_used["update"] = dict(getattr(self.optimizer, "backends_used", {}))

    def _generic_update(self, grad_scale, found) -> None:
        self.synchronize()
        rnd = self._round
        grads = [p.grad for p in rnd.params if p.grad is not None]
        if grad_scale is not None:
            flag = found if found is not None else torch.zeros(1, dtype=torch.float32, device=grad_scale.device)
            unscale_grads_(grads, grad_scale, flag)
            found = flag
        skipped = found is not None and bool(found.reshape(-1)[0].item() != 0)   # host read: torch's steps need it
        if not skipped:
            self.optimizer.step()
        self._last_skipped = skipped
        self.backends_used["update"] = {f"{type(self.optimizer).__module__}.{type(self.optimizer).__name__}":
                                        0 if skipped else len(grads)}

    def _end_round(self, stepped: bool) -> None:
        """What closes every round, stepped or drained, on every rank alike (so collectives stay paired)."""
        group = self._group
        if self.module is not None and self.broadcast_buffers and group.world_size > 1:
            broadcast_tensors_(self._buffers, group, 0, what="the module's buffers", host_wait=False)
        if stepped and self._replica_check is not None and self._replica_check.due(self._steps):
            self._replica_check.run(self._steps)
        self._round.reset()
        swapped = self._swapped
        self._reset_step_state()
        self._swapped = swapped        # p.grad may still be a buffer view: zero_grad() drops it

    @property
    def last_step_skipped(self) -> Optional[bool]:
        return self.optimizer.last_step_skipped if self._fused else self._last_skipped

    # ------------------------------------------------------------------ accumulation and zeroing
    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate into ``p.grad`` without communicating; the next one
        outside (or ``step()``) communicates the sum, averaged over passes and ranks."""
        rnd = self._round
        old, rnd.no_sync = rnd.no_sync, True
        try:
            yield
        finally:
            rnd.no_sync = old

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) every ``p.grad``. Called in the middle of a step (gradients already being
        communicated, no ``step()`` yet), it completes that step's collectives, so that every rank stays
        in step, and throws their result away (the round check then sees this rank one step behind
        at the next round, unless every rank did the same)."""
        rnd = self._round
        if rnd.started:
            rnd.wait("drained by zero_grad")
            if self._noise is not None:
                self._noise.record_previous()   # the carry arrived; this round's own sample is dropped
            if self.telemetry is not None:
                self.telemetry.discard_round()
            self._end_round(stepped=False)
        for p in self._swapped:                 # never leave a buffer view behind as p.grad
            if p.grad is not None:
                p.grad = None if set_to_none else torch.zeros_like(p)
        self._swapped = []
        self._reset_step_state()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ the wrapped optimizer's state
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict, plus ``"distributed"``: the step count and, with
        ``noise_scale``, the estimator's and the probe's state and the MF schedule's (if it has a
        ``state_dict``). The same on every rank; loads into the plain optimizer too (which ignores
        the extra key)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = dict(self.optimizer.state_dict())
        extra = {"steps": self._steps}
        if self._noise is not None:
            extra["noise_scale"] = self._noise.state_dict()
        schedule = getattr(self.optimizer, "mf_schedule", None)
        if schedule is not None and hasattr(schedule, "state_dict"):
            extra["mf_schedule"] = schedule.state_dict()
        sd["distributed"] = extra
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        extra = state_dict.get("distributed", {})
        if self._noise is not None and "noise_scale" in extra:
            self._noise.check_state(extra["noise_scale"])        # before anything is loaded
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "distributed"})
        if self._noise is not None and "noise_scale" in extra:
            self._noise.load_state_dict(extra["noise_scale"])
        schedule = getattr(self.optimizer, "mf_schedule", None)
        if "mf_schedule" in extra and schedule is not None and hasattr(schedule, "load_state_dict"):
            schedule.load_state_dict(extra["mf_schedule"])
        self._steps = int(extra.get("steps", self._steps))
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the wrapped optimizer and rebuild the buckets (call it on every rank, between
        steps: the new parameters are checked and broadcast from rank 0 like the first ones)."""
        if self._round is None:
            raise RuntimeError("DistributedOptimizer.add_param_group before construction finished")
        if self._round.started:
            raise RuntimeError("DistributedOptimizer.add_param_group in the middle of a step (gradients are "
                               "being communicated); call it between step() and the next backward")
        self.optimizer.add_param_group(param_group)
        if self._names_by_id is not None:
            for p in self.optimizer.param_groups[-1]["params"]:
                self._names_by_id.setdefault(id(p), f"param group {len(self.optimizer.param_groups) - 1} "
                                                    f"parameter {len(self._names_by_id)}")
        self._build(first=False)

    # ------------------------------------------------------------------ reports and properties
    @property
    def compression(self) -> str:
        return self._compressor.name

    @property
    def buckets(self):
        return self._round.buckets

    @property
    def params(self) -> List[torch.Tensor]:
        return self._round.params

    @property
    def process_group(self):
        return self._group.process_group

    @property
    def world_size(self) -> int:
        return self._group.world_size

    @property
    def rank(self) -> int:
        return self._group.rank

    @property
    def comm_backend(self) -> str:
        return self._group.backend

    @property
    def timeout(self):
        return self._group.timeout

    @property
    def noise_scale(self) -> Optional[GradientNoiseScale]:
        return None if self._noise is None else self._noise.noise

    def reduced_grads(self) -> Dict[torch.Tensor, torch.Tensor]:
        """param -> its reduced (averaged, compressed) gradient as the last update saw it: views of the
        flat buffers, valid until the next backward pass that communicates."""
        return dict(self._round.views)

    def bucket_layout(self) -> List[dict]:
        """Which parameters (indices in registration order among those requiring grad, and their names
        from ``named_parameters``, or the same indices without it) each bucket holds."""
        return self._round.layout()

    def remove_hooks(self) -> None:
        """Detach from the parameters and the module (the wrapper cannot step afterwards)."""
        self._round.remove_hooks()
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None

    def __getstate__(self):
        raise TypeError("DistributedOptimizer cannot be pickled (it holds hooks and a process group); "
                        "save its state_dict()")

    def __repr__(self) -> str:
        return (f"DistributedOptimizer(world_size={self.world_size}, backend={self.comm_backend!r}, "
                f"compression={self.compression!r}, op={self.op.name}, buckets={len(self.buckets)}, "
                f"bucket_cap_mb={self.bucket_cap_mb:g}, first_bucket_cap_mb={self.first_bucket_cap_mb:g}, "
                f"path={'fused' if self._fused else 'generic'},\n  optimizer={self.optimizer!r})")


def _combine_found(user_found, found_reduced: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The step's found_inf: the reduced buffers' check, added into the caller's flag in place when it
    is a 1-element fp32 tensor on the same device (a loss scaler then decides the same on every rank)."""
    if user_found is None:
        return found_reduced
    if found_reduced is None:
        return user_found if isinstance(user_found, torch.Tensor) else torch.tensor(float(user_found))
    if (isinstance(user_found, torch.Tensor) and user_found.numel() == 1 and user_found.dtype == torch.float32
            and user_found.device == found_reduced.device):
        user_found.reshape(1).add_(found_reduced)          # reshape of a 1-element tensor: a view
        return user_found
    return found_reduced + torch.as_tensor(user_found, dtype=torch.float32).reshape(1).to(found_reduced.device)
