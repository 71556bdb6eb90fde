"""What MFSGD and MFAdam share: argument checks, state layout, launch grouping, skip accounting.

A step runs in three phases so that bad input never corrupts state:

1. plan: every group and every param with a grad is checked (sparse/complex grads, shapes,
   devices, hyperparameters including this step's MF from the schedule) and sorted into launches
   keyed by (device, dtypes, master or not, step). Nothing is modified; any error is raised here.
2. launch: missing state is created, then one functional call per launch.
3. commit: step counts (and Adam's beta1 product) advance only for updates that were applied.

NOTE [deferred skip accounting]
With a loss scaler the skip decision lives on the device (``found_inf``). Reading it right after
the launch would stall the host until the GPU has caught up, which costs most at small batches,
exactly where the MF method runs. So on CUDA the flag is copied into pinned host memory
(non-blocking, an event recorded after the copy: the pattern of fusedmf/noise.py) and the commit
is deferred: the pending step counts are settled at the start of the next ``step()`` by reading
that host copy once its event has completed (by then the GPU has long finished that check, so
the wait is on one small copy, never a stream or device synchronisation; at most it keeps the
host from running more than one step ahead), and by ``state_dict()``, ``load_state_dict()`` and
``last_step_skipped``. The kernels themselves need no host value: they read found_inf on the
device and write nothing when it is set, on the very first step too (the momentum buffer of a
never-applied step is never read, see ``first_step``).

NOTE [one clock]
The MF schedule is called once per ``step()`` that updates anything, with the optimizer's step
number: 1 + the number of applied steps so far (a skipped step does not count), whatever subset
of params has grads. Per-param counts (``state["step"]``: torch's first-step rule for SGD's
buffer, Adam's bias corrections and beta1 product) stay per param, as in torch. The count and a
stateful schedule's state are saved in ``state_dict()["mf_schedule"]``.

NOTE [compiled step]
Under torch.compile the host part of a step (resolving the last skip decision, the launch layout,
the schedule, the per-step scalars) runs outside the graph (``torch.compiler.disable``) and writes
the per-step scalars into persistent device buffers; the graph holds only the op calls
(torch.ops.fusedmf.*), whose inputs are tensors, so a new MF or lr is new data, not a recompile.
In eager mode the same functions run directly (no wrapper cost).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch.optim import Optimizer

from .. import _backends
from .. import functional as F

LOW_PRECISION = (torch.float16, torch.bfloat16)
SUPPORTED_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DENSE_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _is_dense(t: torch.Tensor) -> bool:
    """Layouts the fused kernels treat as flat memory."""
    for fmt in _DENSE_FORMATS:
        try:
            if t.is_contiguous(memory_format=fmt):
                return True
        except RuntimeError:  # channels_last on a tensor of the wrong rank
            continue
    return False


def _check_schedule(mf_schedule) -> Optional[Callable[[int], float]]:
    if mf_schedule is None:
        return None
    if not callable(mf_schedule):
        raise TypeError(
            f"mf_schedule must be None, a callable step -> MF, or a fusedmf.mf schedule; got {type(mf_schedule).__name__}"
        )
    return mf_schedule


def lr_value(lr) -> float:
    """A group's lr as a float: a float, or a 1-element tensor as torch.optim accepts (read on the host,
    so the two give bit-identical steps)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a float or a 1-element tensor, got a tensor of shape {list(lr.shape)}")
        return float(lr)
    return lr


class _Launch:
    """One functional call of a step: params of one group sharing device, dtypes, master and step."""

    __slots__ = ("group", "group_index", "first_of_group", "indices", "params", "device", "grad_dtype",
                 "backend", "strides", "states", "init_token", "vector")

    def __init__(self, group, group_index, first_of_group, indices, params, device, grad_dtype, backend):
        self.group, self.group_index, self.first_of_group = group, group_index, first_of_group
        self.indices, self.params, self.device = indices, params, device
        self.grad_dtype, self.backend = grad_dtype, backend
        self.strides = [p.stride() for p in params]
        self.states = None       # the params' state dicts, bound on the first launch
        self.init_token = None
        self.vector = None       # this launch's per-step scalars: a view into a persistent device buffer


class MFOptimizerBase(Optimizer):
    """Base class of MFSGD and MFAdam (not meant to be used directly)."""

    # GradScaler's fused-step protocol: scaler.step(opt) sets opt.grad_scale / opt.found_inf and
    # lets step() unscale and skip inside the kernel instead of unscaling in a separate pass.
    _step_supports_amp_scaling = True

    #: per-param state entries kept in fp32 on the param's device (never cast to the param dtype)
    _FP32_STATE_KEYS: tuple = ()
    #: names of the hyperparameters in a param group that torch.optim has and fusedmf does not support
    _UNSUPPORTED_TORCH_OPTIONS: dict = {"maximize": False, "differentiable": False}

    def __init__(self, params, defaults: dict, *, mf_schedule, master_weights, backend: str):
        if backend != "auto" and backend not in _backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {_backends.BACKENDS}")
        if master_weights not in (None, True, False):
            raise ValueError(f"master_weights must be None, True or False, got {master_weights!r}")
        self.mf_schedule = _check_schedule(mf_schedule)
        self.master_weights = master_weights
        self.backend = backend
        self._pending: list = []          # (host flag or tensor, event, updates) awaiting the skip decision
        self._applied_steps = 0           # NOTE [one clock]
        self._mf_overridden: dict = {}    # id(group) -> the MF value the schedule overrides there
        self._warned_mf_conflict = False
        self._scalar_buffers: dict = {}   # device -> persistent float32 buffer of the launches' scalars
        self._last_skipped: Optional[bool] = None
        #: backend name -> number of tensors it updated in the last step (what actually ran)
        self.backends_used: dict[str, int] = {}
        self._group_keys = tuple(defaults)  # the hyperparameters a group of ours carries
        self._layout_cache = None             # NOTE [launch layout cache]
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ construction checks
    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        # any iterable, a generator included, as torch's: the list checked here is the one added
        param_group["params"] = params
        seen = set()
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{type(self).__name__}: params[{i}] is a {type(p).__name__}, not a Tensor")
            if id(p) in seen:
                raise ValueError(f"{type(self).__name__}: params[{i}] appears twice in the same param group")
            seen.add(id(p))
            if p.dtype not in SUPPORTED_PARAM_DTYPES:
                raise TypeError(
                    f"{type(self).__name__}: params[{i}] has dtype {p.dtype}; supported: float32, float16, "
                    "bfloat16 (and float64 on the reference backend)"
                )
        merged = dict(self.defaults)
        merged.update(param_group)
        self._validate_group(merged)  # raises before the group is added
        super().add_param_group(param_group)
        if self.mf_schedule is not None:  # what a scheduler may later overwrite (_check_mf_overrides)
            group = self.param_groups[-1]
            self._mf_overridden[id(group)] = self._mf_option(group)[1]

    def _validate_group(self, group: dict) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ subclass hooks
    def _uses_master(self, p: torch.Tensor) -> bool:
        if p.dtype not in LOW_PRECISION:
            return False
        return self.master_weights is not False

    @staticmethod
    def _state_dtype(p: torch.Tensor) -> torch.dtype:
        """States and masters are fp32; float64 params (reference backend) keep float64 state."""
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _init_state(self, group: dict, p: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def _plan_group(self, group: dict, step: int, state_sample: dict, mf: Optional[float]) -> Any:
        """Per-launch scalars for a group at a given per-param step, with this step's MF from the
        schedule (None without one). Validates; must not mutate. Returns (scalars dataclass, extra)."""
        raise NotImplementedError

    def _call(self, group, scalars, vector, params, grads, states, backend, inv_grad_scale, found_inf):
        """The (op, args) of one launch (fusedmf.functional *_call)."""
        raise NotImplementedError

    def _mf_option(self, group: dict):
        """(name, value) of the group option the MF schedule overrides (momentum / betas[0])."""
        raise NotImplementedError

    def _committed_values(self, plan, state: dict) -> dict:
        """State entries (host values) that the update changes once it is known to be applied."""
        return {"step": state["step"] + 1}

    # ------------------------------------------------------------------ skip accounting
    def _resolve_pending(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for flag, event, updates in pending:
            if event is not None:
                event.synchronize()  # the pinned copy of found_inf (NOTE [deferred skip accounting])
            skipped = bool(flag.item() != 0) if flag is not None else False
            self._last_skipped = skipped
            if not skipped:
                self._commit(updates)

    @property
    def last_step_skipped(self) -> Optional[bool]:
        """Whether the last ``step()`` was skipped for a non-finite gradient (None before any step).

        Reading it may wait for the device (NOTE [deferred skip accounting])."""
        self._resolve_pending()
        return self._last_skipped

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale=None, found_inf=None, grads=None):
        """Apply one update. ``grad_scale`` (the loss scale) and ``found_inf`` may also be set as
        attributes by torch.amp.GradScaler, which then hands the unscale and skip to this step.

        ``grads`` (optional, the public seam of fusedmf.comm): a callable ``param -> Tensor | None``
        giving each param's gradient instead of ``param.grad`` (None: the param is left alone this
        step). fusedmf.comm updates straight from views into the reduced communication buffer this
        way, with no unflatten pass."""
        if grads is not None and not callable(grads):
            raise TypeError(f"{type(self).__name__}.step: grads must be a callable param -> Tensor | None, "
                            f"got {type(grads).__name__}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # NOTE [compiled step]: host work outside the graph, op calls inside it
        compiling = torch.compiler.is_compiling()
        prepare = _prepare_outside_graph if compiling else MFOptimizerBase._prepare_step
        calls, finish = prepare(self, grads, grad_scale, found_inf)
        for fn, args in calls:
            fn(*args)
        (_finish_outside_graph if compiling else MFOptimizerBase._finish_step)(self, finish)
        return loss

    def _prepare_step(self, grad_of, grad_scale, found_inf):
        """Phases 1 and 2 of a step on the host: plan (validates everything, mutates nothing), then
        create missing state and return the op calls plus what ``_finish_step`` needs."""
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        self._resolve_pending()

        # phase 1: plan
        launches, grads_of_launch = self._layout(grad_of)
        mf = None
        if self.mf_schedule is not None and launches:
            self._check_mf_overrides()
            mf = self.mf_schedule(self._applied_steps + 1)  # NOTE [one clock]: once per step
        plans = []
        for launch in launches:
            # the group's settings were checked when the layout was built; what may change in place
            # between steps (lr, momentum, betas, ...) is checked here by the one function that
            # turns them into this step's scalars (functional/scalars.py)
            state0 = self.state.get(launch.params[0], {})
            plans.append(self._plan_group(launch.group, state0.get("step", 0), state0, mf))

        # phase 2: state, per-step scalars (one copy per device), the op calls
        amp = F.AmpTensors(grad_scale, found_inf)
        self._write_scalars(launches, plans)
        used: dict = defaultdict(int)
        calls, updates = [], []
        for launch, (scalars, extra), grads in zip(launches, plans, grads_of_launch):
            token = self._init_token(launch.group)
            if launch.states is None or launch.init_token != token:
                launch.states = [self.state[p] for p in launch.params]
                for p, state in zip(launch.params, launch.states):
                    self._init_state(launch.group, p, state)
                launch.init_token = token
            inv, found = amp.on(launch.device)
            calls.append(self._call(launch.group, scalars, launch.vector, launch.params, grads, launch.states,
                                    launch.backend, inv, found))
            used[launch.backend] += len(launch.params)
            # the params of one launch advance together, so one set of new values serves them all
            updates.append((launch.states, self._committed_values(extra, launch.states[0])))
        self.backends_used = dict(used)
        return calls, (amp.found_inf, updates)

    def _write_scalars(self, launches, plans) -> None:
        """Every launch's scalar vector into one persistent float32 buffer per device (one host-to-
        device copy per device and step; the launches read views of it)."""
        by_device: dict = {}
        for launch, (scalars, _) in zip(launches, plans):
            if launch.backend != "reference":
                by_device.setdefault(launch.device, []).append((launch, scalars.as_list()))
        for device, items in by_device.items():
            values = [v for _, vs in items for v in vs]
            buf = self._scalar_buffers.get(device)
            if buf is None or buf.numel() != len(values):
                buf = torch.empty(len(values), dtype=torch.float32, device=device)
                self._scalar_buffers[device] = buf
            F.write_scalars(buf, values)
            pos = 0
            for launch, vs in items:
                launch.vector = buf[pos:pos + len(vs)]
                pos += len(vs)

    def _finish_step(self, finish) -> None:
        """Phase 3: commit, now or once the device has decided (NOTE [deferred skip accounting])."""
        found_inf, updates = finish
        if not updates:
            return
        if found_inf is None:
            self._commit(updates)
            self._last_skipped = False
        elif found_inf.device.type == "cpu" or found_inf.device.type == "meta":
            self._pending.append((found_inf if found_inf.device.type == "cpu" else None, None, updates))
            self._resolve_pending()
        else:
            host = torch.empty(found_inf.shape, dtype=found_inf.dtype, pin_memory=True)
            host.copy_(found_inf, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(found_inf.device))
            self._pending.append((host, event, updates))

    def _check_mf_overrides(self) -> None:
        """A scheduler writing momentum / betas while mf_schedule sets the MF: say so, once."""
        for gi, group in enumerate(self.param_groups):
            name, value = self._mf_option(group)
            seen = self._mf_overridden.setdefault(id(group), value)
            if seen != value and not self._warned_mf_conflict:
                self._warned_mf_conflict = True
                warnings.warn(
                    f"{type(self).__name__}: param group {gi}'s {name} changed from {seen!r} to {value!r} (an LR "
                    f"scheduler with cycle_momentum, e.g. OneCycleLR or CyclicLR?), but mf_schedule="
                    f"{self.mf_schedule!r} sets the MF of every step, so the change has no effect; pass "
                    "cycle_momentum=False or drop mf_schedule", RuntimeWarning, stacklevel=4)
            self._mf_overridden[id(group)] = value

    def _commit(self, updates) -> None:
        for states, values in updates:
            for state in states:
                state.update(values)
        self._applied_steps += 1

    def _init_token(self, group: dict):
        """A value that changes when a group setting changes which state a param needs."""
        return None

    # NOTE [launch layout cache]
    # Sorting params into launches and checking each one costs ~10 us of Python per param: with
    # ResNet-50's 161 tensors that is more than the whole fused update on a GPU. The layout is
    # therefore cached and reused while the same params have grads, the backend and master
    # settings are unchanged, and each new grad has the layout, dtype and strides of the last one
    # (a few attribute reads per grad). Params of one launch stay in lockstep (they are updated or
    # skipped together), so their shared step count stays shared. Anything else rebuilds the
    # layout with the full checks; load_state_dict drops the cache.
    def _layout(self, grad_of):
        grads_by_group = []
        key = [self.backend, self.master_weights]
        for group in self.param_groups:
            params = group["params"]
            grads = [p.grad for p in params] if grad_of is None else [grad_of(p) for p in params]
            grads_by_group.append(grads)
            key.append((id(group), tuple(map(id, params)), tuple(g is None for g in grads)))
        key = tuple(key)
        cached = self._layout_cache
        if cached is not None and cached[0] == key:
            grads_of_launch = self._gather_grads(cached[1], grads_by_group)
            if grads_of_launch is not None:
                return cached[1], grads_of_launch
        launches = self._build_layout(grads_by_group)
        self._layout_cache = (key, launches)
        grads_of_launch = self._gather_grads(launches, grads_by_group)
        if grads_of_launch is None:  # strides differ from the param's: hand the kernels a copy
            grads_of_launch = [[g if g.stride() == st else torch.empty_like(p, dtype=g.dtype).copy_(g)
                                for p, g, st in zip(launch.params, (grads_by_group[launch.group_index][i]
                                                                    for i in launch.indices), launch.strides)]
                               for launch in launches]
        return launches, grads_of_launch

    @staticmethod
    def _gather_grads(launches, grads_by_group):
        """Each launch's grads, or None if one no longer fits the layout (dtype, layout, strides)."""
        out = []
        strided = torch.strided
        for launch in launches:
            grads = grads_by_group[launch.group_index]
            chosen = [grads[i] for i in launch.indices]
            gdtype = launch.grad_dtype
            for g, st in zip(chosen, launch.strides):
                if g.layout is not strided or g.dtype is not gdtype or g.stride() != st:
                    return None
            out.append(chosen)
        return out

    def _build_layout(self, grads_by_group) -> list:
        launches = []
        for gi, (group, grads) in enumerate(zip(self.param_groups, grads_by_group)):
            self._validate_group(group)
            buckets: dict = {}
            for pi, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                where = f"param {pi} of param group {gi}"
                if g.is_sparse or g.layout != torch.strided:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({where})")
                if g.is_complex() or p.is_complex():
                    raise RuntimeError(f"{type(self).__name__} does not support complex tensors ({where})")
                if g.shape != p.shape:
                    raise RuntimeError(f"grad of {where} has shape {list(g.shape)}, param has {list(p.shape)}")
                if g.device != p.device:
                    raise RuntimeError(f"grad of {where} is on {g.device}, param on {p.device}")
                if g.dtype not in SUPPORTED_PARAM_DTYPES:
                    raise RuntimeError(f"grad of {where} has unsupported dtype {g.dtype}")
                state = self.state.get(p, {})
                dense = _is_dense(p)
                key = (p.device, p.dtype, g.dtype, self._uses_master(p), self._state_key(state), dense)
                buckets.setdefault(key, []).append(pi)
            first = True
            for key, indices in buckets.items():
                device, dtype, gdtype, dense = key[0], key[1], key[2], key[5]
                params = [group["params"][i] for i in indices]
                if not dense and self.backend != "reference":
                    warnings.warn(f"{type(self).__name__}: params of shape {list(params[0].shape)} are not dense; "
                                  "the reference backend updates them", RuntimeWarning, stacklevel=4)
                # resolving here raises for a missing backend before any state is created
                backend = _backends.resolve(self.backend if dense else "reference", device, dtype)
                if backend != "reference" and torch.float64 in (dtype, gdtype):
                    raise TypeError(
                        f"{type(self).__name__}: param {indices[0]} of param group {gi} has a float64 "
                        f"{'param' if dtype == torch.float64 else 'grad'}; backend {backend!r} runs float32, "
                        "float16 and bfloat16 only (float64 runs on the 'reference' backend)")
                launches.append(_Launch(group, gi, first, indices, params, device, gdtype, backend))
                first = False
        return launches

    def _state_key(self, state: dict):
        """What, besides device and dtypes, must be equal for params to share one launch."""
        return state.get("step", 0)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        self._resolve_pending()
        sd = super().state_dict()
        # NOTE [one clock]: torch's loader ignores keys it does not know
        schedule = self.mf_schedule
        sd["mf_schedule"] = {"applied_steps": self._applied_steps,
                             "state": schedule.state_dict() if hasattr(schedule, "state_dict") else None}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a fusedmf checkpoint or a torch.optim one (SGD for MFSGD, Adam/AdamW for MFAdam).

        torch's loader casts every floating-point state tensor to its param's dtype; fusedmf keeps
        momentum, Adam moments and masters in fp32, so those entries are restored from the
        checkpoint at full precision after torch's loader has mapped ids to params.
        """
        self._resolve_pending()
        saved_groups = state_dict["param_groups"]
        for gi, g in enumerate(saved_groups):
            for option, ok_value in self._UNSUPPORTED_TORCH_OPTIONS.items():
                if g.get(option, ok_value) != ok_value:
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: param group {gi} has {option}={g[option]!r}, "
                        f"which fusedmf does not support"
                    )
            merged = dict(self.defaults)
            merged.update({k: v for k, v in g.items() if k != "params"})
            self._validate_group(merged)
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        id_to_param = {}
        for g, ng in zip(self.param_groups, saved_groups):
            if len(g["params"]) != len(ng["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
            id_to_param.update(zip(ng["params"], g["params"]))
        self._check_loaded_shapes(state_dict["state"], id_to_param)   # before anything is replaced
        self._layout_cache = None
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "mf_schedule"})
        clock = state_dict.get("mf_schedule")
        if clock is not None:
            self._applied_steps = int(clock["applied_steps"])
            if clock.get("state") is not None and hasattr(self.mf_schedule, "load_state_dict"):
                self.mf_schedule.load_state_dict(clock["state"])
        else:  # a torch checkpoint: the most advanced param's count
            self._applied_steps = 0
        self._mf_overridden = {}
        for group in self.param_groups:  # a torch checkpoint lacks fusedmf's own group keys
            for k in self._group_keys:
                group.setdefault(k, self.defaults[k])
        for pid, saved in state_dict["state"].items():
            p = id_to_param.get(pid)
            if p is None:
                continue
            state = self.state[p]
            for key in self._FP32_STATE_KEYS:
                value = saved.get(key)
                if isinstance(value, torch.Tensor):
                    state[key] = value.detach().to(device=p.device, dtype=self._state_dtype(p), copy=True)
            self._normalize_loaded_state(p, state)
            if clock is None:
                self._applied_steps = max(self._applied_steps, state.get("step", 0))

    def _check_loaded_shapes(self, saved_state: dict, id_to_param: dict) -> None:
        """Every per-element state tensor (any tensor with a dimension; scalars such as torch's 0-dim
        ``step`` are exempt) must have its param's shape; the first one that does not is named."""
        for pid, saved in saved_state.items():
            p = id_to_param.get(pid)
            if p is None or not isinstance(saved, dict):
                continue
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                    gi, pi = next((gi, pi) for gi, g in enumerate(self.param_groups)
                                  for pi, q in enumerate(g["params"]) if q is p)
                    raise ValueError(
                        f"{type(self).__name__}.load_state_dict: state {key!r} of param {pi} of param group {gi} "
                        f"has shape {list(value.shape)}, the param has {list(p.shape)}")

    def _normalize_loaded_state(self, p: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        extra = f"mf_schedule={self.mf_schedule!r}, master_weights={self.master_weights}, backend={self.backend!r}"
        return super().__repr__()[:-1] + f"  {extra}\n)"


@torch.compiler.disable
def _prepare_outside_graph(opt, grad_of, grad_scale, found_inf):
    return opt._prepare_step(grad_of, grad_scale, found_inf)


@torch.compiler.disable
def _finish_outside_graph(opt, finish) -> None:
    opt._finish_step(finish)
