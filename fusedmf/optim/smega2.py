"""SMEGA2: asynchronous SGD with a single momentum buffer and a look-ahead estimate.

Cohen, Hakimi, Schuster, "SMEGA2: Distributed Asynchronous Deep Neural Network Training With a
Single Momentum Buffer", ICPP 2022; the rule is that of their reference code
(github.com/rafi-cohen/SMEGA2, smega2.py), see docs/algorithms.md.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _backends
from ..functional.scalars import (
    SMEGA2_ESTIMATES,
    check_lr,
    check_mf,
    check_num_workers,
    smega2_estimate_scalars,
    smega2_step_scalars,
)
from ..functional.smega2 import _run_smega2_estimate, smega2_call
from ._base import MFOptimizerBase, _is_dense, lr_value

_ESTIMATE_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class SMEGA2(MFOptimizerBase):
    r"""The SMEGA2 master: one step per gradient received from any of ``num_workers`` workers.

    Per param: momentum buffer v, gradient accumulator G and cycle position s (N = num_workers,
    γ = momentum, the MF; η = lr; τ = dampening; λ = weight_decay)::

        g ← g + λθ ;  s ← (s + 1) mod N ;  G ← G + g ;  d = g + γ·v
        if s == 0:  v ← γ·v + (1 − τ)/N · G ;  G ← 0
        θ ← θ − η·d

    :meth:`estimate` returns where the weights will be about N steps later, which a worker uses to
    compute its next gradient (``"advanced"``: θ − ηγ(s/N)G − ηγ(N + s(γ − 1))v, ``"naive"``:
    θ − ηγNv). Both are one fused pass over (param or master, grad, v, G) on every backend.

    Args:
        params: iterable of params or param groups.
        lr, momentum, dampening, weight_decay: η, γ, τ, λ above (``momentum`` may also come from
            ``mf_schedule``).
        num_workers: N, the number of gradients per momentum refresh (keyword-only).
        estimate: ``"advanced"`` (default) or ``"naive"``.
        maximize: ascend instead of descend (torch's meaning: the gradient is negated first).
        mf_schedule: None, or a callable ``step -> γ`` called with the 1-based number of the master
            step about to be applied (a skipped step does not count); it overrides ``momentum``.
            :meth:`estimate` uses the γ of the next step.
        master_weights: None (default) keeps fp32 master weights for fp16/bf16 params; False
            updates low-precision params in place (fp32 arithmetic, fp32 state).
        backend: "auto" | "cuda" | "triton" | "cpu" | "reference".

    State per param: ``step`` (applied master steps), ``cycle`` (s), ``momentum_buffer`` and
    ``grad_accumulator`` (fp32, zeros at the start as in the reference code) and
    ``master_param`` (fp32) for low-precision params with masters.
    """

    _FP32_STATE_KEYS = ("momentum_buffer", "grad_accumulator", "master_param")

    def __init__(self, params, lr: float, momentum: float = 0.9, dampening: float = 0.0, weight_decay: float = 0.0,
                 *, num_workers: int, estimate: str = "advanced", maximize: bool = False, mf_schedule=None,
                 master_weights=None, backend: str = "auto"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        num_workers=num_workers, estimate=estimate, maximize=maximize)
        super().__init__(params, defaults, mf_schedule=mf_schedule, master_weights=master_weights, backend=backend)

    # ------------------------------------------------------------------ checks and state
    def _validate_group(self, group: dict) -> None:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            raise TypeError("SMEGA2: lr must be a float (per-step values reach the kernels as data already)")
        check_lr(lr)
        check_mf("momentum", group["momentum"])
        if group["estimate"] not in SMEGA2_ESTIMATES:
            raise ValueError(f"SMEGA2: estimate must be one of {SMEGA2_ESTIMATES}, got {group['estimate']!r}")
        smega2_step_scalars(lr=lr, momentum=group["momentum"], dampening=group["dampening"],
                            weight_decay=group["weight_decay"], num_workers=group["num_workers"], cycle=0)

    def _state_key(self, state: dict):
        # params of one launch share the step (the MF schedule's clock) and the cycle position
        return (state.get("step", 0), state.get("cycle", 0))

    def _init_state(self, group: dict, p: torch.Tensor, state: dict) -> None:
        state.setdefault("step", 0)
        state.setdefault("cycle", 0)
        for key in ("momentum_buffer", "grad_accumulator"):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=self._state_dtype(p), memory_format=torch.preserve_format)
        if self._uses_master(p) and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)

    def _momentum_at(self, group: dict, step: int) -> float:
        """γ of master step ``step`` (1-based; the estimate's, the step gets it from the base class)."""
        if self.mf_schedule is None:
            return group["momentum"]
        return check_mf("momentum from mf_schedule", self.mf_schedule(step))

    @staticmethod
    def _cycle_of(group: dict, state: dict) -> int:
        # s stays below N; should num_workers change between steps, the position is read mod the new N
        return int(state.get("cycle", 0)) % check_num_workers(group["num_workers"])

    # ------------------------------------------------------------------ the step (MFOptimizerBase)
    def _mf_option(self, group: dict):
        return "momentum", group["momentum"]

    def _plan_group(self, group: dict, step: int, state: dict, mf):
        # NOTE [one clock]: ``mf`` is the schedule's γ for this master step, called once per step
        momentum = check_mf("momentum from mf_schedule", mf) if mf is not None else group["momentum"]
        scalars = smega2_step_scalars(lr=lr_value(group["lr"]), momentum=momentum,
                                      dampening=group["dampening"], weight_decay=group["weight_decay"],
                                      num_workers=group["num_workers"], cycle=self._cycle_of(group, state),
                                      maximize=group["maximize"])
        return scalars, scalars   # the committed values need next_cycle

    def _call(self, group, scalars, vector, params, grads, states, backend, inv_grad_scale, found_inf):
        masters = [s["master_param"] for s in states] if "master_param" in states[0] else []
        return smega2_call(backend, params, grads, [s["momentum_buffer"] for s in states],
                           [s["grad_accumulator"] for s in states], masters, scalars, vector, inv_grad_scale,
                           found_inf)

    def _committed_values(self, plan, state: dict) -> dict:
        return {"step": state["step"] + 1, "cycle": plan.next_cycle}

    def _normalize_loaded_state(self, p: torch.Tensor, state: dict) -> None:
        for key in ("step", "cycle"):
            value = state.get(key, 0)
            state[key] = int(value.item()) if isinstance(value, torch.Tensor) else int(value)

    # ------------------------------------------------------------------ the estimate
    @torch.no_grad()
    def estimate(self, out: Optional[Sequence[torch.Tensor]] = None) -> list:
        """The look-ahead weights of every param, in param-group order.

        ``out``: optional tensors to write them into (one per param, its shape, dtype float32,
        float16 or bfloat16, or float64), e.g. a worker's copy of the model or views into a send
        buffer, written in place; one with the param's memory layout is written by the kernel
        directly, another (say a contiguous view for a channels_last param) through a temporary.
        Default: new tensors like the params. Everything is checked before anything is written.
        Params that have not been stepped yet estimate to themselves.
        """
        self._resolve_pending()
        params = [p for group in self.param_groups for p in group["params"]]
        if out is None:
            out = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
        else:
            out = self._check_estimate_out(params, out)

        # plan every launch first (raises before anything is written or created)
        launches: dict = {}
        k = 0
        for group in self.param_groups:
            self._check_group(group)
            for p in group["params"]:
                o = out[k]
                k += 1
                state = self.state.get(p, {})
                step, cycle = state.get("step", 0), self._cycle_of(group, state)
                # float64 anywhere, and params the kernels cannot treat as flat memory, are the reference's
                reference = not _is_dense(p) or torch.float64 in (p.dtype, o.dtype)
                key = (id(group), p.device, p.dtype, o.dtype, self._uses_master(p), step, cycle, reference)
                launches.setdefault(key, (group, step, cycle, []))[3].append((p, o))
        plans = []
        for key, (group, step, cycle, members) in launches.items():
            # γ of the next master step, on the optimizer's one clock (NOTE [one clock])
            scalars = smega2_estimate_scalars(lr=lr_value(group["lr"]), momentum=self._momentum_at(group, self._applied_steps + 1),
                                              num_workers=group["num_workers"], cycle=cycle,
                                              estimate=group["estimate"])
            backend = _backends.resolve("reference" if key[7] else self.backend, key[1], key[2])
            plans.append((group, members, scalars, backend))

        for group, members, scalars, backend in plans:
            ps = [p for p, _ in members]
            states = [self.state[p] for p in ps]
            for p, state in zip(ps, states):
                self._init_state(group, p, state)
            masters = [s["master_param"] for s in states] if "master_param" in states[0] else []
            direct = backend == "reference"
            targets = [o if direct or _same_layout(o, p) else torch.empty_like(p, dtype=o.dtype) for p, o in members]
            _run_smega2_estimate(ps, [s["momentum_buffer"] for s in states], [s["grad_accumulator"] for s in states],
                                 masters, targets, scalars, backend)
            for (_, o), t in zip(members, targets):
                if t is not o:
                    o.copy_(t)
        return list(out)

    def _check_estimate_out(self, params, out) -> list:
        if isinstance(out, torch.Tensor) or not isinstance(out, (list, tuple)):
            raise TypeError(f"SMEGA2.estimate: out must be a list of tensors (one per param), got {type(out).__name__}")
        out = list(out)
        if len(out) != len(params):
            raise ValueError(f"SMEGA2.estimate: out has {len(out)} tensors but the optimizer has {len(params)} params")
        param_ids = {id(q) for q in params}
        for i, (p, o) in enumerate(zip(params, out)):
            if not isinstance(o, torch.Tensor):
                raise TypeError(f"SMEGA2.estimate: out[{i}] is a {type(o).__name__}, not a Tensor")
            if o.shape != p.shape:
                raise ValueError(f"SMEGA2.estimate: out[{i}] has shape {list(o.shape)}, its param {list(p.shape)}")
            if o.device != p.device:
                raise ValueError(f"SMEGA2.estimate: out[{i}] is on {o.device}, its param on {p.device}")
            if o.dtype not in _ESTIMATE_OUT_DTYPES:
                raise TypeError(f"SMEGA2.estimate: out[{i}] has dtype {o.dtype}; supported: float32, float16, "
                                "bfloat16, float64")
            if o.layout != torch.strided or not _non_overlapping(o):
                raise ValueError(f"SMEGA2.estimate: out[{i}] (strides {list(o.stride())}) has elements that share "
                                 "memory or is not strided; it must be a tensor each element of which can be written")
            if id(o) in param_ids:
                raise ValueError(f"SMEGA2.estimate: out[{i}] is one of the optimizer's params")
            if o.numel() and any(isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() == o.data_ptr()
                                 for t in [p, *self.state.get(p, {}).values()]):
                raise ValueError(f"SMEGA2.estimate: out[{i}] is the memory of its param or of the param's state")
        return out


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same flat element order: equal strides on every dimension longer than 1."""
    return a.numel() <= 1 or all(n == 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride()))


def _non_overlapping(t: torch.Tensor) -> bool:
    """No two elements at one address: sorted by stride, each dimension steps past the previous ones."""
    if t.numel() <= 1:
        return True
    reach = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride < reach:
            return False
        reach = stride * size
    return True
