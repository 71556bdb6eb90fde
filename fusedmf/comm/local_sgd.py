"""LocalSGD: post-local SGD (Parallel Restarted SGD) with MF momentum and fused, compressed model averaging.

The schedule (docs/algorithms.md, local SGD; Yu, Yang, Zhu, AAAI 2019; Lin et al.,
ICLR 2020), on N ranks:

    step() calls 1 .. warmup_steps    gradients averaged across the ranks every step, exactly as
                                      DistributedOptimizer does (it is used for them, by composition)
    every later step()                each rank steps on its own gradients (its momentum stays local);
                                      the k-th *applied* local step ends with the weights averaged over
                                      the whole process group when period divides k, else over the
                                      rank's subgroup when a hierarchy period divides k

With period 1 and no momentum that is synchronous SGD.

The average (NOTE [model averaging rounding] in fusedmf/functional/average.py) sends differences, not
weights: c, an fp32 *consensus* every rank holds identically (the weights at the start of the local
phase, then the result of each global average), and per bucket of the flat communication buffers

    pack_delta_      ONE launch: buf = cast((w - c) / N)    w: the fp32 master, or the param itself
    allreduce(buf)   asynchronous, so packing bucket k + 1 overlaps the allreduce of bucket k
    apply_average_   ONE launch: m = c + buf; master = m; param = cast(m); c = m (global averages only)

A subgroup average (hierarchy) uses the same global c, so it writes the masters and params of its ranks
but leaves c alone: every global average then starts from a c that is the same on every rank, which
the sum of differences needs (c + mean_r(w_r - c) = mean_r(w_r) only if c is common). Memory: the
consensus (4 bytes per element), the flat buffers (2 bytes per element with fp16/bf16 compression,
4 with "none", which communicates fp32), and with average_momentum / module= fp32 buffers for the
moments / BatchNorm buffers (which are averaged directly, in fp32: they are statistics, not weights
that moved a little, and Adam's second moment would underflow fp16).

NOTE [local skip decision]
A step skipped for inf/NaN must not count as a local step on any rank, or the ranks would disagree on
when to average and pair up different collectives. During the warm-up the decision is already global
(DistributedOptimizer checks the reduced buffers). In the local phase, when the step is given a loss
scale or a found_inf (``scaler.step(lopt)``, ``lopt.step(grad_scale=..., found_inf=...)``), this
rank's flag (the caller's, or a fused non-finite check of its gradients) is allreduced with MAX (4
bytes) before the update, the caller's found_inf is overwritten with the global flag (so a
DynamicLossScaler backs off on every rank alike), and the host reads it to count the step: one
synchronisation per local step on GPUs, the price of deciding on the host when to launch the
collectives of an average. Without a loss scale nothing is checked (as torch.optim does).

Differences from torch's PostLocalSGDOptimizer + PeriodicModelAverager / HierarchicalModelAverager,
each a reported problem there: a skipped step is not a local step on any rank (pytorch #76282); the
average happens once per step() whatever the number of param groups (PR #74737); one warmup_steps
governs both the gradient averaging and the start of local steps, and the schedule is checked at
construction (PR #73285); masters and fp16/bf16 params are written from one fp32 consensus in one
launch per bucket, with no torch.cat copy of the model, in place (no rebinding of p.data, which left
optimizers holding stale tensors: pytorch #74157 / PR #74894); state_dict() carries the local step count
and the consensus, so a resumed run neither repeats the warm-up nor misses or shifts an average.

State dicts differ between ranks in the middle of a period (each rank's momentum and weights are its
own): every rank saves and loads its own.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import functional as F
from ..functional import average as A
from ..functional.pack import slot_strides, slot_view
from ..optim import MFOptimizerBase
from .buckets import BucketSpec, assign_buckets
from .compression import COMPRESSION
from .distributed_optimizer import DistributedOptimizer
from .telemetry import CommTelemetry

#: optimizer state entries averaged with average_momentum=True (MFSGD/SGD, MFAdam/Adam/AdamW)
MOMENT_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_MASTER_KEY = "master_param"


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"LocalSGD: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_hierarchy(hierarchy, period: int, world_size: int) -> List[tuple]:
    """The subgroup levels [(period, group_size), ...] of ``hierarchy``, smallest period first.

    ``hierarchy`` maps a period to the size of the groups of consecutive ranks that average at it, as
    torch's HierarchicalModelAverager's ``period_group_size_dict``; ``period`` itself is the global
    level (an entry ``{period: world_size}`` may repeat it). Averages must nest: each period divides
    the next larger one (and the global period), each group size divides the next larger one (and the
    world size), so a step divisible by several periods takes the largest, as torch does.
    """
    if hierarchy is None:
        return []
    if not isinstance(hierarchy, dict) or not hierarchy:
        raise ValueError(f"LocalSGD: hierarchy must be None or a non-empty dict {{period: group_size}}, got {hierarchy!r}")
    levels = []
    for p, size in hierarchy.items():
        _check_int(f"the hierarchy period {p!r}", p, 1)
        _check_int(f"the group size of hierarchy period {p}", size, 1)
        if p == period:
            if size != world_size:
                raise ValueError(f"LocalSGD: hierarchy period {p} is the global period, so its group size must be "
                                 f"the world size {world_size}, got {size}")
            continue
        if p > period:
            raise ValueError(f"LocalSGD: hierarchy period {p} is larger than period={period}, the period of the "
                             "global average; subgroup periods must be smaller")
        if period % p:
            raise ValueError(f"LocalSGD: hierarchy period {p} does not divide period={period}: the subgroup "
                             "averages would drift against the global ones")
        if not 2 <= size < world_size or world_size % size:
            raise ValueError(f"LocalSGD: hierarchy group size {size} (period {p}) must be >= 2, smaller than the "
                             f"world size {world_size} and divide it")
        levels.append((p, size))
    levels.sort()
    for (p1, s1), (p2, s2) in zip(levels, levels[1:]):
        if p2 % p1 or s2 % s1 or s2 <= s1:
            raise ValueError(f"LocalSGD: hierarchy levels {p1}: {s1} and {p2}: {s2} do not nest (a larger period "
                             "needs a larger group size, and both must be multiples of the smaller ones)")
    return levels


@dataclasses.dataclass
class _Level:
    period: int
    group: object            # process group (None: the default group)
    size: int
    name: str                # "global" or "group of k"
    update_consensus: bool


class _FlatMean:
    """Plain averaging of a list of tensors (optimizer moments, BatchNorm buffers) through fp32 flat
    buffers: pack with 1/N (fusedmf.functional.pack), allreduce, copy back. Built again whenever the
    list of tensors changes (momentum buffers appear with the first step)."""

    def __init__(self, bucket_cap_mb: float):
        self.bucket_cap_mb = bucket_cap_mb
        self.key = None
        self.buckets: List[BucketSpec] = []

    def units(self, tensors: List[torch.Tensor], backend: str) -> list:
        """(bucket, flat buffer, pack(n), finish()) per bucket, for LocalSGD._communicate."""
        if self.key != tuple(map(id, tensors)):
            wide = lambda t: torch.float64 if t.dtype == torch.float64 else torch.float32  # noqa: E731
            self.buckets = assign_buckets(tensors, comm_dtype_of=wide, bucket_cap_mb=self.bucket_cap_mb,
                                          first_bucket_cap_mb=self.bucket_cap_mb)
            self.flat = [torch.zeros(b.numel, dtype=b.dtype, device=b.device) for b in self.buckets]
            self.views = [[slot_view(buf, off, tensors[i].shape, slot_strides(tensors[i]))
                           for i, off in zip(b.params, b.offsets)] for b, buf in zip(self.buckets, self.flat)]
            self.key = tuple(map(id, tensors))
        out = []
        for b, buf, views in zip(self.buckets, self.flat, self.views):
            members = [tensors[i] for i in b.params]
            out.append((b, buf,
                        lambda n, members=members, buf=buf: F.pack(members, buf, scale=1.0 / n, backend=backend),
                        lambda members=members, views=views: torch._foreach_copy_(members, views)))
        return out


class LocalSGD(torch.optim.Optimizer):
    r"""Post-local SGD over a :class:`~fusedmf.optim.MFSGD` / :class:`~fusedmf.optim.MFAdam` (or any torch
    optimizer, without loss scaling in the local phase) with fused, compressed, bucketed model averaging.

    Args:
        optimizer: the optimizer over this rank's replica of the model.
        period: local steps between two global averages (H).
        warmup_steps: the first ``warmup_steps`` calls of ``step()`` average gradients every step
            (DistributedOptimizer); local steps start after them.
        process_group: the group to average over (default: the default group; none initialised: world
            size 1).
        compression: "fp16", "bf16" or "none" (fp32) for the differences (and the warm-up gradients).
        bucket_cap_mb: cap of each flat communication buffer, in MB of the communication dtype.
        average_momentum: also average the momentum buffers / Adam moments at every average (in fp32).
            Default False: they stay local, as in the papers.
        hierarchy: ``{period: group_size}`` subgroup averages between the global ones (e.g. ``{4: 8}``
            with ``period=16``: groups of 8 consecutive ranks every 4 local steps, everyone every 16);
            see :func:`check_hierarchy`.
        module: the model; its floating-point buffers (BatchNorm running statistics) are averaged
            whenever the parameters are (and after every warm-up step), with the same group.
        telemetry: record per-step telemetry (``self.telemetry``, the timeline of fusedmf.comm.telemetry:
            bytes per step, pack / allreduce spans per bucket, the averaging time).
        backend: backend of the pack / apply kernels ("auto" or a name); the update runs on the
            optimizer's own backend.

    LR schedulers attach to the wrapper (it shares the optimizer's ``param_groups``); ``scaler.step(lopt)``
    with a :class:`fusedmf.amp.DynamicLossScaler` works (NOTE [local skip decision]).
    """

    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer, *, period: int, warmup_steps: int = 0, process_group=None,
                 compression: str = "fp16", bucket_cap_mb: float = 25.0, average_momentum: bool = False,
                 hierarchy: Optional[Dict[int, int]] = None, module: Optional[torch.nn.Module] = None,
                 telemetry: bool = False, telemetry_history: int = 100, backend: str = "auto"):
        # ---- every argument checked before anything is communicated or allocated
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"LocalSGD wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, (LocalSGD, DistributedOptimizer)):
            raise TypeError("LocalSGD wraps the plain optimizer, not another fusedmf.comm wrapper")
        self.period = _check_int("period", period, 1)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        if compression not in COMPRESSION:
            raise ValueError(f"LocalSGD: compression must be one of {tuple(COMPRESSION)}, got {compression!r}")
        if not float(bucket_cap_mb) > 0:
            raise ValueError(f"LocalSGD: bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
        if module is not None and not isinstance(module, torch.nn.Module):
            raise TypeError(f"LocalSGD: module must be a torch.nn.Module, got {type(module).__name__}")
        self._fused = isinstance(optimizer, MFOptimizerBase)
        if dist.is_available() and dist.is_initialized():
            self.process_group = process_group
            self.world_size = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)
            self.comm_backend = str(dist.get_backend(process_group))
        elif process_group is not None:
            raise RuntimeError("LocalSGD: a process_group was given but torch.distributed is not initialised")
        else:
            self.process_group, self.world_size, self.rank, self.comm_backend = None, 1, 0, "none"
        sub_levels = check_hierarchy(hierarchy, self.period, self.world_size)
        self.optimizer = optimizer
        self.compression, self.bucket_cap_mb, self.backend = compression, float(bucket_cap_mb), backend
        self.average_momentum = bool(average_momentum)
        self.module = module
        self.params: List[torch.Tensor] = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        for i, p in enumerate(self.params):
            if p.layout != torch.strided or not A._is_dense(p):
                raise ValueError(f"LocalSGD: parameter {i} (shape {list(p.shape)}) is not dense; the averaging "
                                 "kernels treat each parameter as one block of memory")
        self._buffers_to_average = [] if module is None else [
            b for b in module.buffers() if b.is_floating_point()]

        # torch.optim.Optimizer's own bookkeeping, without a second copy of the param groups
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        # ---- collectives of the construction: same settings everywhere, then rank 0's weights
        self._verify_same_configuration(sub_levels)
        self._broadcast_initial_state()
        self._levels = [_Level(self.period, self.process_group, self.world_size, "global", True)]
        for p, size in reversed(sub_levels):      # largest period first: the one a step takes
            self._levels.append(_Level(p, self._new_subgroup(size), size, f"group of {size}", False))

        comm_dtype = COMPRESSION[compression]
        wide = lambda p: torch.float64 if p.dtype == torch.float64 else torch.float32  # noqa: E731
        self.buckets: List[BucketSpec] = assign_buckets(
            self.params, comm_dtype_of=lambda p: (comm_dtype or wide(p)) if p.dtype != torch.float64 else p.dtype,
            bucket_cap_mb=self.bucket_cap_mb, first_bucket_cap_mb=self.bucket_cap_mb)
        self._flat = [torch.zeros(b.numel, dtype=b.dtype, device=b.device) for b in self.buckets]
        self._views: List[Optional[torch.Tensor]] = [None] * len(self.params)
        for b, buf in zip(self.buckets, self._flat):
            for i, off in zip(b.params, b.offsets):
                self._views[i] = slot_view(buf, off, self.params[i].shape, slot_strides(self.params[i]))
        self._moments = _FlatMean(self.bucket_cap_mb)
        self._bn = _FlatMean(self.bucket_cap_mb)

        self._dopt: Optional[DistributedOptimizer] = None
        if self.warmup_steps:
            self._dopt = DistributedOptimizer(optimizer, process_group=process_group, bucket_cap_mb=bucket_cap_mb,
                                              compression=compression, telemetry=telemetry,
                                              telemetry_history=telemetry_history, backend=backend)
        self.telemetry: Optional[CommTelemetry] = None
        if telemetry:
            if self._dopt is not None:
                self.telemetry = self._dopt.telemetry       # one timeline for warm-up and local steps
            else:
                device = self.buckets[0].device if self.buckets else torch.device("cpu")
                self.telemetry = CommTelemetry(rank=self.rank, world_size=self.world_size, backend=self.comm_backend,
                                               device=device, history=telemetry_history)
        self.consensus: Optional[List[torch.Tensor]] = None
        self._calls = 0              # step() calls (warm-up ones included, skipped ones too)
        self._local_steps = 0        # applied local steps (NOTE [local skip decision])
        #: what the last step() did: "warm-up", "local", "skipped", or "average (global)" / "average (group of k)"
        self.last_action: Optional[str] = None
        self.backends_used: Dict[str, object] = {}

    # ------------------------------------------------------------------ construction
    def _verify_same_configuration(self, sub_levels) -> None:
        if self.world_size == 1:
            return
        mine = (self.period, self.warmup_steps, self.compression, self.bucket_cap_mb, self.average_momentum,
                tuple(sub_levels), len(self._buffers_to_average),
                [(tuple(p.shape), str(p.dtype)) for p in self.params])
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.process_group)
        for r, theirs in enumerate(everyone):
            if theirs != mine:
                names = ("period", "warmup_steps", "compression", "bucket_cap_mb", "average_momentum", "hierarchy",
                         "number of module buffers", "parameters (shapes, dtypes)")
                what = next(n for n, a, b in zip(names, mine, theirs) if a != b)
                raise ValueError(f"LocalSGD: rank {self.rank} and rank {r} differ in {what}: every rank must "
                                 "construct LocalSGD with the same settings over the same parameters")

    @torch.no_grad()
    def _broadcast_initial_state(self) -> None:
        """Every rank starts from rank 0's weights (masters too, if the optimizer already has them)."""
        if self.world_size == 1:
            return
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        tensors = list(self.params) + self._buffers_to_average
        tensors += [self.optimizer.state[p][_MASTER_KEY] for p in self.params
                    if _MASTER_KEY in self.optimizer.state.get(p, {})]
        for t in tensors:
            dist.broadcast(t, src=src, group=self.process_group)

    def _new_subgroup(self, size: int):
        """Groups of ``size`` consecutive ranks of the process group (every rank creates all of them)."""
        ranks = dist.get_process_group_ranks(self.process_group) if self.process_group is not None \
            else list(range(self.world_size))
        mine = None
        for start in range(0, self.world_size, size):
            group = dist.new_group(ranks[start:start + size])
            if start <= self.rank < start + size:
                mine = group
        return mine

    # ------------------------------------------------------------------ torch.optim surface
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

    @property
    def local_steps(self) -> int:
        """Applied local steps so far (skipped ones excluded)."""
        return self._local_steps

    @property
    def in_warmup(self) -> bool:
        return self._calls < self.warmup_steps

    @property
    def last_step_skipped(self) -> Optional[bool]:
        return getattr(self.optimizer, "last_step_skipped", None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._dopt is not None and self.in_warmup:
            self._dopt.zero_grad(set_to_none=set_to_none)
        else:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("LocalSGD: buckets and consensus are fixed at construction; add the param group "
                                  "to the optimizer before wrapping it")

    def state_dict(self) -> dict:
        """The optimizer's state dict plus ``"local_sgd"``: the step() calls, the applied local steps and
        the consensus (fp32, in parameter order; None before the local phase). Rank-specific mid-period."""
        sd = self.optimizer.state_dict()
        sd["local_sgd"] = {"calls": self._calls, "local_steps": self._local_steps,
                           "consensus": None if self.consensus is None else [c.clone() for c in self.consensus]}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        own = state_dict.get("local_sgd")
        if own is None:
            raise ValueError("LocalSGD.load_state_dict: the state dict has no 'local_sgd' entry (it was not saved by "
                             "LocalSGD.state_dict()); load it into the wrapped optimizer instead")
        consensus = own["consensus"]
        if consensus is not None:
            if len(consensus) != len(self.params):
                raise ValueError(f"LocalSGD.load_state_dict: the consensus has {len(consensus)} tensors, this "
                                 f"optimizer {len(self.params)} parameters")
            for i, (c, p) in enumerate(zip(consensus, self.params)):
                if tuple(c.shape) != tuple(p.shape):
                    raise ValueError(f"LocalSGD.load_state_dict: consensus {i} has shape {list(c.shape)}, parameter "
                                     f"{i} {list(p.shape)}")
        inner = {k: v for k, v in state_dict.items() if k != "local_sgd"}
        self.optimizer.load_state_dict(inner)
        self._calls, self._local_steps = int(own["calls"]), int(own["local_steps"])
        if consensus is None:
            self.consensus = None
        else:
            self.consensus = [self._new_consensus(p) for p in self.params]
            for c, saved in zip(self.consensus, consensus):
                c.copy_(saved)
        if self._dopt is not None and not self.in_warmup:
            self._dopt.remove_hooks()

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale=None, found_inf=None):
        """One step: a warm-up step (gradient averaging), or a local step that may end with an average."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        tel = self.telemetry
        if self.in_warmup:
            self._dopt.step(grad_scale=grad_scale, found_inf=found_inf)
            self._calls += 1
            self.backends_used = dict(self._dopt.backends_used)
            if self._buffers_to_average:
                self._communicate(self._bn.units(self._buffers_to_average, self.backend), self.process_group,
                                  self.world_size, None)
            if not self.in_warmup:
                self._dopt.remove_hooks()   # from now on backward only accumulates p.grad
            self.last_action = "warm-up"
            return loss

        if grad_scale is not None and not self._fused:
            raise TypeError(f"LocalSGD: a loss scale needs a fusedmf optimizer (it unscales inside its update); "
                            f"{type(self.optimizer).__name__} does not take one")
        t0 = tel.clock.mark() if tel is not None else None
        if self.consensus is None:
            self._start_local_phase()
        found = self._global_found_inf(grad_scale, found_inf)
        self._local_update(grad_scale, found)
        self._calls += 1
        skipped = found is not None and bool(found.item() != 0)   # NOTE [local skip decision]
        level = None
        if not skipped:
            self._local_steps += 1
            level = next((lv for lv in self._levels if self._local_steps % lv.period == 0), None)
        self.last_action = "skipped" if skipped else "local" if level is None else f"average ({level.name})"
        units = self._average_units(level) if level is not None else []
        buckets = [dataclasses.replace(u[0], index=k) for k, u in enumerate(units)]
        if tel is not None:
            tel.step_start(buckets, kind="local step" if level is None else f"model average ({level.name})", mark=t0)
            tel.wait_end(buckets)          # the local update ends, the average (if any) starts
        if level is not None:
            self._communicate(units, level.group, level.size, buckets if tel is not None else None)
        if tel is not None:
            tel.step_end(buckets, lambda: skipped)
        return loss

    def _local_update(self, grad_scale, found) -> None:
        if self._fused:
            self.optimizer.step(grad_scale=grad_scale, found_inf=found)
            self.backends_used = {"update": dict(getattr(self.optimizer, "backends_used", {}))}
            return
        if found is None or not bool(found.item() != 0):
            self.optimizer.step()

    def _new_consensus(self, p: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        return torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _source(self, p: torch.Tensor) -> torch.Tensor:
        """The weights a rank averages: its fp32 master, or the param itself when it has none."""
        master = self.optimizer.state.get(p, {}).get(_MASTER_KEY)
        return master if master is not None else p

    def _start_local_phase(self) -> None:
        """The consensus is the weights every rank holds at the start of the local phase (identical:
        broadcast at construction, then only synchronous warm-up steps)."""
        self.consensus = []
        for p in self.params:
            c = self._new_consensus(p)
            c.copy_(self._source(p))
            self.consensus.append(c)

    def _global_found_inf(self, grad_scale, found_inf) -> Optional[torch.Tensor]:
        """NOTE [local skip decision]: the MAX over the ranks of this rank's non-finite flag."""
        if grad_scale is None and found_inf is None:
            return None
        device = self.params[0].device if self.params else torch.device("cpu")
        flag = torch.zeros(1, dtype=torch.float32, device=device)
        if found_inf is not None:
            flag += torch.as_tensor(found_inf, dtype=torch.float32).reshape(1).to(device)
        else:
            per_device: Dict[torch.device, list] = {}
            for p in self.params:
                if p.grad is not None:
                    per_device.setdefault(p.grad.device, []).append(p.grad)
            for d, grads in per_device.items():
                local = torch.zeros(1, dtype=torch.float32, device=d)
                F.non_finite_check(grads, local, backend=self.backend)
                flag += local.to(device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
        if isinstance(found_inf, torch.Tensor) and found_inf.numel() == 1:
            found_inf.copy_(flag.reshape(found_inf.shape).to(found_inf.device, found_inf.dtype))
        return flag

    # ------------------------------------------------------------------ the average
    def _moment_tensors(self) -> List[torch.Tensor]:
        out = []
        for p in self.params:
            state = self.optimizer.state.get(p, {})
            out += [state[k] for k in MOMENT_KEYS if isinstance(state.get(k), torch.Tensor)]
        return out

    def _average_units(self, level: _Level) -> list:
        """What one average communicates, as (bucket, flat buffer, pack(n), finish()) per bucket: the
        parameters' differences (fused kernels), then moments and module buffers (plain means)."""
        masters = [self.optimizer.state.get(p, {}).get(_MASTER_KEY) for p in self.params]
        sources = [m if m is not None else p for m, p in zip(masters, self.params)]
        units = []
        for spec, buf in zip(self.buckets, self._flat):
            by_source: Dict[torch.dtype, list] = {}
            by_target: Dict[tuple, list] = {}
            for i in spec.params:
                by_source.setdefault(sources[i].dtype, []).append(i)
                by_target.setdefault((self.params[i].dtype, masters[i] is not None), []).append(i)

            def pack(n, groups=tuple(by_source.values())):
                for idx in groups:          # one launch per bucket (per source dtype, if mixed)
                    self.backends_used["pack_delta"] = A.pack_delta(
                        [sources[i] for i in idx], [self.consensus[i] for i in idx], [self._views[i] for i in idx],
                        scale=1.0 / n, backend=self.backend)

            def finish(groups=tuple(by_target.items()), update=level.update_consensus):
                for (_, has_master), idx in groups:
                    self.backends_used["apply_average"] = A.apply_average(
                        [self._views[i] for i in idx], [self.consensus[i] for i in idx],
                        params=[self.params[i] for i in idx],
                        masters=[masters[i] for i in idx] if has_master else None,
                        update_consensus=update, backend=self.backend)

            units.append((spec, buf, pack, finish))
        if self.average_momentum:
            units += self._moments.units(self._moment_tensors(), self.backend)
        if self._buffers_to_average:
            units += self._bn.units(self._buffers_to_average, self.backend)
        return units

    def _communicate(self, units: list, group, n: int, buckets: Optional[list]) -> None:
        """Pack bucket k, start its allreduce, go on with bucket k + 1; then finish each as it arrives."""
        tel = self.telemetry if buckets is not None else None
        works = []
        for k, (spec, buf, pack, _) in enumerate(units):
            if tel is not None:
                tel.bucket_ready(buckets, k)
            with torch.profiler.record_function("fusedmf.pack_delta"):
                pack(n)
            if tel is not None:
                tel.bucket_packed(buckets, k)
            work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True) if n > 1 else None
            if tel is not None:
                tel.bucket_launched(buckets, k, work, False)
            works.append(work)
        for (spec, _, _, finish), work in zip(units, works):
            if work is not None:
                with torch.profiler.record_function("fusedmf.wait"):
                    work.wait()
            with torch.profiler.record_function("fusedmf.apply_average"):
                finish()

    def __repr__(self) -> str:
        levels = ", ".join(f"every {lv.period}: {lv.name}" for lv in self._levels)
        return (f"LocalSGD(world_size={self.world_size}, backend={self.comm_backend!r}, period={self.period}, "
                f"warmup_steps={self.warmup_steps}, compression={self.compression!r}, averages=[{levels}], "
                f"buckets={len(self.buckets)},\n  optimizer={self.optimizer!r})")
