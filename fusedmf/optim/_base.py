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
exactly where the MF method runs. So on CUDA the commit is deferred: the pending step counts are
settled at the start of the next ``step()`` (by then the GPU has long finished that check), and
by ``state_dict()``, ``load_state_dict()`` and ``last_step_skipped``. The kernels themselves need
no host value: they read found_inf on the device and write nothing when it is set, on the very
first step too (the momentum buffer of a never-applied step is never read, see ``first_step``).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch.optim import Optimizer

from .. import _backends

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


class _Launch:
    """One functional call of a step: params of one group sharing device, dtypes, master and step."""

    __slots__ = ("group", "group_index", "first_of_group", "indices", "params", "device", "grad_dtype",
                 "backend", "strides", "states", "init_token")

    def __init__(self, group, group_index, first_of_group, indices, params, device, grad_dtype, backend):
        self.group, self.group_index, self.first_of_group = group, group_index, first_of_group
        self.indices, self.params, self.device = indices, params, device
        self.grad_dtype, self.backend = grad_dtype, backend
        self.strides = [p.stride() for p in params]
        self.states = None       # the params' state dicts, bound on the first launch
        self.init_token = None


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
        self._pending: list = []          # (found_inf, [(state, new_values)]) awaiting the skip decision
        self._last_found_inf = None
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

    def _plan_group(self, group: dict, step: int, state_sample: dict) -> Any:
        """Per-launch scalars/kwargs for a group at a given step (validates; must not mutate)."""
        raise NotImplementedError

    def _launch(self, group, plan, params, grads, states, backend, inv_grad_scale, found_inf) -> str:
        raise NotImplementedError

    def _committed_values(self, plan, state: dict) -> dict:
        """State entries (host values) that the update changes once it is known to be applied."""
        return {"step": state["step"] + 1}

    # ------------------------------------------------------------------ skip accounting
    def _resolve_pending(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for found_inf, updates in pending:
            skipped = bool(found_inf.item() != 0) if found_inf is not None else False
            self._last_skipped = skipped
            if not skipped:
                self._commit(updates)

    @property
    def last_step_skipped(self) -> Optional[bool]:
        """Whether the last ``step()`` was skipped for a non-finite gradient (None before any step).

        Reading it may synchronise with the device (NOTE [deferred skip accounting]).
        """
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
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and not isinstance(found_inf, torch.Tensor):
            found_inf = torch.tensor(float(found_inf), dtype=torch.float32)
        if grad_scale is not None and not isinstance(grad_scale, torch.Tensor):
            grad_scale = torch.tensor(float(grad_scale), dtype=torch.float32)
        self._step_with_grads(grads, grad_scale, found_inf)
        return loss

    @torch.no_grad()
    def _step_with_grads(self, grad_of: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]],
                         grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
        """The step itself, with each param's grad taken from ``grad_of(p)`` (None: leave p alone)
        instead of ``p.grad`` when ``grad_of`` is given. fusedmf.comm updates straight from views
        into the reduced communication buffer this way (no unflatten pass)."""
        self._resolve_pending()

        # phase 1: plan (validates everything, mutates nothing)
        launches, grads_of_launch = self._layout(grad_of)
        plans = []
        for launch in launches:
            if launch.first_of_group:
                self._validate_group(launch.group)  # lr or momentum may have been changed in place
            state0 = self.state.get(launch.params[0], {})
            plans.append(self._plan_group(launch.group, state0.get("step", 0), state0))

        # phase 2: launch
        per_device_inv: dict = {}
        per_device_found: dict = {}
        used: dict = defaultdict(int)
        updates: list = []
        for launch, plan, grads in zip(launches, plans, grads_of_launch):
            token = self._init_token(launch.group)
            if launch.states is None or launch.init_token != token:
                launch.states = [self.state[p] for p in launch.params]
                for p, state in zip(launch.params, launch.states):
                    self._init_state(launch.group, p, state)
                launch.init_token = token
            device = launch.device
            inv = found = None
            if grad_scale is not None:
                if device not in per_device_inv:
                    per_device_inv[device] = torch.reciprocal(
                        grad_scale.reshape(1).to(device=device, dtype=torch.float32, non_blocking=True))
                inv = per_device_inv[device]
            if found_inf is not None:
                if device not in per_device_found:
                    per_device_found[device] = found_inf.reshape(1).to(
                        device=device, dtype=torch.float32, non_blocking=True)
                found = per_device_found[device]
            ran = self._launch(launch.group, plan, launch.params, grads, launch.states, launch.backend, inv, found)
            used[ran] += len(launch.params)
            # the params of one launch advance together, so one set of new values serves them all
            updates.append((launch.states, self._committed_values(plan, launch.states[0])))
        self.backends_used = dict(used)

        # phase 3: commit, now or once the device has decided (NOTE [deferred skip accounting])
        if found_inf is None:
            self._commit(updates)
            self._last_skipped = False
        else:
            self._pending.append((found_inf, updates))
            if found_inf.device.type == "cpu":
                self._resolve_pending()

    @staticmethod
    def _commit(updates) -> None:
        for states, values in updates:
            for state in states:
                state.update(values)

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
        return super().state_dict()

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
        super().load_state_dict(state_dict)
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
