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
the schedule, the per-step scalars, and the commit of phase 3) runs in one region outside the graph
(``torch.compiler.disable``: one graph break, as torch's own optimizers have) and writes the
per-step scalars into persistent device buffers; the graph holds only the op calls
(torch.ops.fusedmf.*), whose inputs are tensors, so a new MF or lr is new data, not a recompile.
The commit may run before the op calls because they read none of what it writes (host counts; with
capturable=True the device step counts, beta1 products and clock, whose values the scalar vector
already holds; a device found_inf is final before the step). In eager mode the same functions run
directly, the commit after the op calls.

NOTE [capturable step]
With ``capturable=True`` (torch's name and meaning) a step reads nothing on the host and writes
only device memory, so ``opt.step()`` can be captured in a CUDA graph and replayed:
- ``state["step"]`` is a 0-dim int64 tensor on the param's device (exact past 2**24 steps, where
  torch's float32 count is not) and MFAdam's ``state["beta1_product"]`` a 0-dim float64 tensor; a
  step adds ``found_inf == 0`` to them, so a skipped step does not count and nothing leaves the
  device. The optimizer's clock (NOTE [one clock]) is an int64 tensor per device, advanced alike.
- the per-step scalars are computed on the device by the same slot formulas as the host path, in
  float64, then rounded once to float32 (NOTE [capturable scalars] in functional/scalars.py): the
  default and capturable paths give the same bits on CPU.
- the MF comes from a float64 device table of the schedule's values, indexed by the clock:
  ``table[min(clock, len - 1)]``. The host fills it ahead (``reserve_mf_steps``; in eager steps
  it grows by itself); a graph replayed past its end repeats the last value. A stateful schedule
  (``mf.noise_adaptive``) cannot be tabulated ahead and is refused.
- ``lr`` may be a float (a constant of a captured graph) or a 0-dim tensor on the params' device,
  read on the device: ``group["lr"].fill_(new)`` between replays changes it, as with torch.
- params of one launch share one scalar vector, so they must have equal device step counts. The
  host cannot read those, but it knows which params took part in each step (a skip applies to
  every launch of a step alike): params that took part in the same steps share a lockstep token,
  updated whenever the launch layout is rebuilt, and the layout groups params by token.
The reference backend takes host floats, so on it a capturable step reads its scalars back (a
host synchronisation on a GPU): it is the specification, not a capturable backend.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch.optim import Optimizer

from .. import _backends
from .. import functional as F
from ..functional.scalars import check_mf, write_slots
from ..mf import is_stateful

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


def lr_value(lr, name: str = "lr") -> float:
    """A group's lr (or another hyperparameter torch lets be a tensor, such as Adam's betas) as a
    float: a float, or a 1-element tensor as torch.optim accepts (read on the host, so the two give
    bit-identical steps)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element: {name} must be a float or a 1-element tensor, "
                             f"got a tensor of shape {list(lr.shape)}")
        return float(lr)
    return lr


def torch_implementation_flags(owner: str, foreach, fused, differentiable) -> dict:
    """torch.optim's switches between its own implementations, checked as torch checks them.

    fusedmf always runs its fused multi-tensor kernels, so ``foreach`` and ``fused`` may be None,
    False or True and change nothing; they are kept in the param groups under torch's names, so
    checkpoints move between fusedmf and torch.optim with them. ``differentiable=True`` (autograd
    through the update) cannot be had from kernels that write in place and is refused."""
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{owner}: {name} must be None, False or True, got {value!r}")
    if not isinstance(differentiable, bool):
        raise TypeError(f"{owner}: differentiable must be False or True, got {differentiable!r}")
    if differentiable:
        # NotImplementedError is a RuntimeError, the class torch raises for fused=True with it
        raise NotImplementedError(
            f"{owner}: differentiable=True is not supported: the fused kernels update params and state in place, "
            "outside autograd" + (" (`fused` does not support `differentiable`)" if fused else ""))
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    return dict(foreach=foreach, fused=fused, differentiable=differentiable)


class _Launch:
    """One functional call of a step: params of one group sharing device, dtypes, master and step."""

    __slots__ = ("group", "group_index", "first_of_group", "indices", "params", "device", "grad_dtype",
                 "backend", "strides", "states", "init_token", "vector", "scratch", "runs")

    def __init__(self, group, group_index, first_of_group, indices, params, device, grad_dtype, backend):
        self.group, self.group_index, self.first_of_group = group, group_index, first_of_group
        self.indices, self.params, self.device = indices, params, device
        self.grad_dtype, self.backend = grad_dtype, backend
        self.strides = [p.stride() for p in params]
        self.states = None       # the params' state dicts, bound on the first launch
        self.init_token = None
        self.vector = None       # this launch's per-step scalars: a view into a persistent device buffer
        self.scratch = None      # capturable: the same slots in float64, before their one rounding
        self.runs = 0            # capturable: steps this layout ran (NOTE [capturable step], lockstep tokens)


class MFOptimizerBase(Optimizer):
    """Base class of MFSGD and MFAdam (not meant to be used directly)."""

    # GradScaler's fused-step protocol: scaler.step(opt) sets opt.grad_scale / opt.found_inf and
    # lets step() unscale and skip inside the kernel instead of unscaling in a separate pass.
    _step_supports_amp_scaling = True

    #: per-param state entries kept in fp32 on the param's device (never cast to the param dtype)
    _FP32_STATE_KEYS: tuple = ()
    #: per-param scalars kept exactly (float64 on the host, or a float64 device tensor with capturable=True)
    _FLOAT64_STATE_KEYS: tuple = ()
    #: names of the hyperparameters in a param group that torch.optim has and fusedmf does not support
    _UNSUPPORTED_TORCH_OPTIONS: dict = {"differentiable": False}

    def __init__(self, params, defaults: dict, *, mf_schedule, master_weights, backend: str,
                 capturable: bool = False):
        if backend != "auto" and backend not in _backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {_backends.BACKENDS}")
        if master_weights not in (None, True, False):
            raise ValueError(f"master_weights must be None, True or False, got {master_weights!r}")
        self.mf_schedule = _check_schedule(mf_schedule)
        self.master_weights = master_weights
        self.backend = backend
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be True or False, got {capturable!r}")
        if capturable and self.mf_schedule is not None and is_stateful(self.mf_schedule):
            raise ValueError(
                f"capturable=True needs an MF schedule that can be tabulated ahead of the steps; "
                f"mf_schedule={self.mf_schedule!r} keeps state that depends on the run (NOTE [capturable step]): "
                "use capturable=False with it")
        self.capturable = capturable
        # NOTE [capturable step]
        self._mf_values: list = []        # schedule(1), schedule(2), ...: the host copy of the MF table
        self._mf_tables: dict = {}        # device -> float64 MF table
        self._clocks: dict = {}           # device -> int64 0-dim count of applied steps
        self._capture_buffers: dict = {}  # device -> (float64 slots, float32 vector) of the layout
        self._tokens: dict = {}           # param -> lockstep token
        self._eras = 0                    # layouts retired so far (the tokens' era counter)
        self._step_calls = 0              # step() calls that launched something: a bound on the clock
        self._last_applied: Optional[torch.Tensor] = None
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
        # the settings are checked before the params are looked at, as torch.optim does: a bad
        # setting is named as such whatever the params are
        self._check_group(dict(defaults))
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ construction checks
    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        if isinstance(params, set):  # torch's rule and words: a set has no stable order
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                            "tensors in sets will change between runs. Please use a list instead.")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        # any iterable, a generator included, as torch's: the list checked here is the one added;
        # (name, param) pairs (named_parameters()) are torch's too: its loader records param_names
        param_group["params"] = params
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        # a param twice in one group: torch's loader warns (it would update it twice per step);
        # one fused launch cannot write a param twice, so step() refuses it, before anything changes
        for i, p in enumerate(tensors):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{type(self).__name__}: params[{i}] is a {type(p).__name__}, not a Tensor "
                                "(optimizer can only optimize Tensors)")
            if p.dtype not in SUPPORTED_PARAM_DTYPES:
                raise TypeError(
                    f"{type(self).__name__}: params[{i}] has dtype {p.dtype}; supported: float32, float16, "
                    "bfloat16 (and float64 on the reference backend)"
                )
        merged = dict(self.defaults)
        merged.update(param_group)
        self._check_group(merged)  # raises before the group is added
        super().add_param_group(param_group)
        if self.mf_schedule is not None:  # what a scheduler may later overwrite (_check_mf_overrides)
            group = self.param_groups[-1]
            self._mf_overridden[id(group)] = self._mf_option(group)[1]

    def _check_group(self, group: dict) -> None:
        """Every setting of a param group: torch's common flags, then the rule's own settings."""
        torch_implementation_flags(type(self).__name__, group.get("foreach"), group.get("fused"),
                                   group.get("differentiable", False))
        if not isinstance(group.get("maximize", False), bool):
            raise TypeError(f"{type(self).__name__}: maximize must be False or True, got {group['maximize']!r}")
        self._validate_group(group)

    def _validate_group(self, group: dict) -> None:
        raise NotImplementedError

    def _lr_to_check(self, group: dict) -> float:
        """The lr the group checks use: its value; with capturable=True a tensor lr is data on the
        device that the host never reads (NOTE [capturable step]), so only its form is checked and
        the checks of the other settings use 0.0 in its place."""
        lr = group["lr"]
        if self.capturable and isinstance(lr, torch.Tensor):
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"lr must be a float or a 1-element floating-point tensor, got a {lr.dtype} tensor "
                                 f"of shape {list(lr.shape)}")
            return 0.0
        return lr_value(lr)

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

        Reading it may wait for the device (NOTE [deferred skip accounting]; with capturable=True it
        reads the device flag)."""
        if self.capturable:
            return None if self._last_applied is None else not bool(self._last_applied)
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
        if torch.compiler.is_compiling():
            for fn, args in _host_part_outside_graph(self, grads, grad_scale, found_inf):
                fn(*args)
            return loss
        calls, finish = self._prepare_step(grads, grad_scale, found_inf)
        for fn, args in calls:
            fn(*args)
        self._finish_step(finish)
        return loss

    def _prepare_step(self, grad_of, grad_scale, found_inf):
        """Phases 1 and 2 of a step on the host: plan (validates everything, mutates nothing), then
        create missing state and return the op calls plus what ``_finish_step`` needs."""
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if self.capturable:
            return self._prepare_capturable(grad_of, grad_scale, found_inf)
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{type(self).__name__}.step() is being captured in a CUDA graph, but the optimizer was made with "
                "capturable=False: its step counts and skip decision live on the host. Construct it with "
                "capturable=True (NOTE [capturable step])")
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
            self._bind_states(launch)
            inv, found = amp.on(launch.device)
            calls.append(self._call(launch.group, scalars, launch.vector, launch.params, grads, launch.states,
                                    launch.backend, inv, found))
            used[launch.backend] += len(launch.params)
            # the params of one launch advance together, so one set of new values serves them all
            updates.append((launch.states, self._committed_values(extra, launch.states[0])))
        self.backends_used = dict(used)
        return calls, (amp.found_inf, updates)

    def _bind_states(self, launch: _Launch) -> None:
        """Create the launch's missing state (once, and again when a group setting changes which state
        a param needs) and keep the list of its params' state dicts."""
        token = self._init_token(launch.group)
        if launch.states is None or launch.init_token != token:
            launch.states = [self.state[p] for p in launch.params]
            for p, state in zip(launch.params, launch.states):
                self._init_state(launch.group, p, state)
            launch.init_token = token

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
        if self.capturable:
            self._finish_capturable(finish)
            return
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

    # ------------------------------------------------------------------ capturable steps
    def _prepare_capturable(self, grad_of, grad_scale, found_inf):
        """A step that reads nothing on the host (NOTE [capturable step]). Everything that can be
        wrong with the input is checked by the layout and when the MF table is written, before
        anything here mutates."""
        launches, grads_of_launch = self._layout(grad_of)
        if not launches:
            return [], None
        mf_by_device = {}
        if self.mf_schedule is not None:
            self._check_mf_overrides()
            self._reserve_mf(self._step_calls + 1, ahead=True)
        amp = F.AmpTensors(grad_scale, found_inf)
        plans = []
        for launch in launches:
            state0 = self.state.get(launch.params[0], {})
            fresh = self._fresh_state(state0)  # host facts from before the state is made
            self._bind_states(launch)
            mf = None
            if self.mf_schedule is not None:
                mf = mf_by_device.get(launch.device)
                if mf is None:
                    mf = mf_by_device[launch.device] = self._mf_on(launch.device)
            plans.append(self._plan_device(launch.group, launch.states[0], mf, fresh))
        self._capture_vectors(launches, plans)
        for launch, (scalars, _) in zip(launches, plans):
            write_slots(scalars, launch.scratch)
        for scratch, vector in self._capture_buffers.values():
            vector.copy_(scratch)  # the one rounding to float32, as the host path's
        used: dict = defaultdict(int)
        calls, updates = [], []
        for launch, (scalars, extra), grads in zip(launches, plans, grads_of_launch):
            if launch.backend == "reference":  # the specification takes host floats (a read-back)
                scalars = type(scalars)(*launch.scratch.tolist())
            inv, found = amp.on(launch.device)
            calls.append(self._call(launch.group, scalars, launch.vector, launch.params, grads, launch.states,
                                    launch.backend, inv, found))
            used[launch.backend] += len(launch.params)
            updates.append((launch, extra))
            launch.runs += 1
        self.backends_used = dict(used)
        self._step_calls += 1
        return calls, (amp, updates)

    def _finish_capturable(self, finish) -> None:
        """Advance the device counts by ``found_inf == 0``: a skipped step does not count."""
        if finish is None:
            return
        amp, updates = finish
        applied = {}
        for device in {launch.device for launch, _ in updates} | set(self._clocks):
            found = amp.on(device)[1]
            applied[device] = (torch.ones((), dtype=torch.bool, device=device) if found is None
                               else found.reshape(()) == 0)
        for launch, extra in updates:
            self._commit_device(launch.states, extra, applied[launch.device])
        for device, ok in applied.items():
            self._clock(device).add_(ok)
        self._last_applied = applied[updates[0][0].device]

    def _commit_device(self, states, extra, applied: torch.Tensor) -> None:
        """The device counterpart of ``_committed_values``: ``applied`` is a 0-dim bool tensor."""
        steps = [s["step"] for s in states]
        # the list overload: the tensor-scalar one reads the scalar on the host on CPU (.item())
        torch._foreach_add_(steps, [applied] * len(steps))

    def _fresh_state(self, state: dict):
        """Host facts about a param's state, read before a capturable step creates what is missing."""
        return None

    def _plan_device(self, group: dict, state: dict, mf, fresh):
        """``_plan_group`` for a capturable step: (scalars with tensor slots, extra for the commit)."""
        raise NotImplementedError

    def _device_lr(self, group: dict, device: torch.device):
        """The group's lr for a capturable step: a float, or a tensor lr read on the device in float64."""
        return self._device_hyper(group["lr"], device)

    @staticmethod
    def _device_hyper(value, device: torch.device):
        """A hyperparameter for a capturable step: a float, or a 1-element tensor read on the device in float64."""
        return value.reshape(()).to(device=device, dtype=torch.float64) if isinstance(value, torch.Tensor) else value

    def _capture_vectors(self, launches, plans) -> None:
        """Persistent float64 slots and float32 vectors for the layout, made once (a captured graph
        keeps reading the same memory)."""
        if all(launch.scratch is not None for launch in launches):
            return
        by_device: dict = {}
        for launch, (scalars, _) in zip(launches, plans):
            by_device.setdefault(launch.device, []).append((launch, len(scalars.slot_values())))
        self._capture_buffers = {}
        for device, items in by_device.items():
            total = sum(n for _, n in items)
            scratch = torch.zeros(total, dtype=torch.float64, device=device)
            vector = torch.zeros(total, dtype=torch.float32, device=device)
            pos = 0
            for launch, n in items:
                launch.scratch, launch.vector = scratch[pos:pos + n], vector[pos:pos + n]
                pos += n
            self._capture_buffers[device] = (scratch, vector)

    def _clock(self, device: torch.device) -> torch.Tensor:
        clock = self._clocks.get(device)
        if clock is None:
            clock = self._clocks[device] = torch.full((), self._applied_steps, dtype=torch.int64, device=device)
        return clock

    def _applied_steps_now(self) -> int:
        """The optimizer's clock as a host int (with capturable=True a read of the device count)."""
        if self.capturable and self._clocks:
            return int(next(iter(self._clocks.values())))
        return self._applied_steps

    def _mf_on(self, device: torch.device) -> torch.Tensor:
        """This step's MF on ``device``: the table entry of the clock (clamped to the table)."""
        table = self._mf_tables.get(device)
        if table is None:
            host = torch.tensor(self._mf_values, dtype=torch.float64)
            if device.type == "cuda":
                host = host.pin_memory()
            table = self._mf_tables[device] = host.to(device, non_blocking=True)
        index = torch.clamp(self._clock(device), max=table.numel() - 1).reshape(1)
        return torch.index_select(table, 0, index).reshape(())

    def reserve_mf_steps(self, num_steps: int) -> None:
        """capturable=True with an ``mf_schedule``: evaluate the schedule for the update numbers
        1 .. ``num_steps`` now and keep the values in the device table the step reads (NOTE
        [capturable step]). Eager steps extend the table by themselves; call this before capturing
        a CUDA graph with as many steps as it will be replayed for (past the end, replays repeat
        the last value)."""
        if not self.capturable or self.mf_schedule is None:
            raise RuntimeError(f"{type(self).__name__}.reserve_mf_steps: only for capturable=True with an mf_schedule")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"reserve_mf_steps: num_steps must be an int >= 1, got {num_steps!r}")
        self._reserve_mf(num_steps, ahead=False)

    def _reserve_mf(self, num_steps: int, *, ahead: bool) -> None:
        have = len(self._mf_values)
        if have >= num_steps:
            return
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{type(self).__name__}: the MF table holds {have} steps and this captured step needs {num_steps}: "
                f"call opt.reserve_mf_steps(n) with the number of steps the graph will run before capturing it")
        # eager growth doubles (the schedule is evaluated ahead, at most 1024 values at a time early on)
        target = max(num_steps, 2 * have, 1024) if ahead else num_steps
        values = [self._check_scheduled_mf(k, self.mf_schedule(k)) for k in range(have + 1, target + 1)]
        self._mf_values.extend(values)   # only after every value passed its check
        self._mf_tables = {}

    def _check_scheduled_mf(self, step: int, value) -> float:
        return check_mf(f"momentum from mf_schedule({step})", value)

    def _capture_state(self, p: torch.Tensor, state: dict) -> None:
        """A loaded state's host counts as the device tensors of a capturable step."""
        state["step"] = torch.full((), int(state["step"]), dtype=torch.int64, device=p.device)

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
        if self.capturable and cached is not None:
            self._retire_layout(cached[1])
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
            self._check_group(group)
            buckets: dict = {}
            seen: dict = {}
            for pi, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                where = f"param {pi} of param group {gi}"
                if seen.setdefault(id(p), pi) != pi:
                    raise ValueError(f"{type(self).__name__}: {where} is param {seen[id(p)]} of the same group again; "
                                     "a fused step cannot update one param twice (remove the duplicate)")
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
                key = (p.device, p.dtype, g.dtype, self._uses_master(p), self._lockstep_key(p, state), dense)
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
        """What, besides device and dtypes, must be equal for params to share one launch (host state)."""
        return state.get("step", 0)

    def _lockstep_key(self, p: torch.Tensor, state: dict):
        """``_state_key``, or with capturable=True (device counts) the param's lockstep token and the
        host facts of its state (NOTE [capturable step])."""
        if not self.capturable:
            return self._state_key(state)
        return self._tokens.get(p, 0), self._capture_state_key(state)

    def _capture_state_key(self, state: dict):
        """Host facts about a param's state that decide its scalars in a capturable step."""
        return None

    def _retire_layout(self, launches) -> None:
        """Params of a layout that ran took part in the same steps since it was built: they get a
        new token of their old one and this era; the others keep theirs (NOTE [capturable step])."""
        self._eras += 1
        for launch in launches:
            if launch.runs:
                for p in launch.params:
                    self._tokens[p] = hash((self._tokens.get(p, 0), self._eras))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        self._resolve_pending()
        sd = super().state_dict()
        # NOTE [one clock]: torch's loader ignores keys it does not know
        schedule = self.mf_schedule
        sd["mf_schedule"] = {"applied_steps": self._applied_steps_now(),
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
            self._check_group(merged)
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
        self._clocks, self._tokens, self._capture_buffers = {}, {}, {}
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
            for key in self._FLOAT64_STATE_KEYS:  # torch's loader cast a tensor one to the param's dtype
                if key in saved:
                    state[key] = float(saved[key])
            self._normalize_loaded_state(p, state)
            if clock is None:
                self._applied_steps = max(self._applied_steps, state.get("step", 0))
            if self.capturable:  # params loaded with equal counts may share a launch (NOTE [capturable step])
                self._tokens[p] = hash(("loaded", self._state_key(state)))
                self._capture_state(p, state)
        self._step_calls = self._applied_steps

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
        extra = (f"mf_schedule={self.mf_schedule!r}, master_weights={self.master_weights}, backend={self.backend!r}, "
                 f"capturable={self.capturable}")
        return super().__repr__()[:-1] + f"  {extra}\n)"


@torch.compiler.disable
def _host_part_outside_graph(opt, grad_of, grad_scale, found_inf) -> list:
    """NOTE [compiled step]: phases 1-3 of a step, the commit included, in one region outside the
    graph; the op calls it returns run in the graph."""
    calls, finish = opt._prepare_step(grad_of, grad_scale, found_inf)
    opt._finish_step(finish)
    return calls
