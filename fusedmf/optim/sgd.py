"""MFSGD: SGD with heavy-ball or Nesterov momentum whose momentum (the MF) may change every step."""

from __future__ import annotations

from typing import Optional

import torch

from .. import functional as F
from ..functional.scalars import _div, check_lr, check_mf, sgd_slots, sgd_step_scalars
from ._base import MFOptimizerBase, lr_value, torch_implementation_flags


class MFSGD(MFOptimizerBase):
    r"""Fused SGD / Nesterov with a per-step momentum-like factor, fp32 masters and in-kernel unscaling.

    The arguments shared with :class:`torch.optim.SGD` mean exactly what they mean there, and with a
    constant momentum and fp32 params the trajectory matches it (first step: the buffer starts as g).

    Args:
        params: iterable of params, of ``(name, param)`` pairs (``named_parameters()``: the names go
            to the groups' ``param_names``, as torch records them), or of param groups.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as in torch.optim.SGD (lr a float
            or a 1-element tensor); ``dampening`` may
            also be ``"tied"``: τ_t = μ_t, so the buffer is an EMA of the gradients (opt-in).
        foreach, fused, differentiable: torch.optim's choice of implementation. fusedmf always runs
            its fused kernels, so foreach / fused (None, False or True) change nothing and are kept
            in the groups for checkpoints; ``differentiable=True`` raises NotImplementedError.
        decoupled_weight_decay: multiply the weights by ``1 - lr * weight_decay`` instead of adding
            ``weight_decay * w`` to the gradient (SGDW). Default False (torch semantics).
        mf_schedule: None, or a callable ``step -> momentum`` (e.g. from :mod:`fusedmf.mf`), called
            once per step with the optimizer's 1-based step number (NOTE [one clock]); it overrides
            ``momentum``. A skipped (overflowing) step does not count.
        master_weights: None (default) keeps fp32 master weights for fp16/bf16 params; False updates
            low-precision params in place (fp32 arithmetic, fp32 momentum).
        backend: "auto" | "cuda" | "triton" | "cpu" | "reference".
        capturable: as in torch.optim: step counts, the MF and every per-step scalar live in device
            tensors and the skip decision never leaves the device, so ``step()`` can be captured in a
            CUDA graph (NOTE [capturable step] in fusedmf/optim/_base.py; ``reserve_mf_steps``).
        lr_compensation: None (default, off) or μ_ref: each step uses η_t = lr·(1 − μ_t)/(1 − μ_ref),
            so the effective step η_t/(1 − μ_t) stays lr/(1 − μ_ref) as the MF changes (opt-in).

    After each step ``last_effective_lr`` holds, per param group, η_t·(1 − τ_t)/(1 − μ_t) (η_t
    when the group has no momentum) for the update just planned (docs/algorithms.md: log it every step).

    State per param: ``momentum_buffer`` (fp32, or None without momentum, as torch), ``step`` (int)
    and ``master_param`` (fp32) for low-precision params with masters.
    """

    _FP32_STATE_KEYS = ("momentum_buffer", "master_param")

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False, foreach=None,
                 differentiable: bool = False, fused=None, decoupled_weight_decay: bool = False,
                 mf_schedule=None, master_weights=None, backend: str = "auto",
                 lr_compensation: Optional[float] = None, capturable: bool = False):
        flags = torch_implementation_flags("MFSGD", foreach, fused, differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, **flags, decoupled_weight_decay=decoupled_weight_decay,
                        lr_compensation=lr_compensation)
        self.last_effective_lr: list = []
        super().__init__(params, defaults, mf_schedule=mf_schedule, master_weights=master_weights, backend=backend,
                         capturable=capturable)

    def _validate_group(self, group: dict) -> None:
        lr = self._lr_to_check(group)
        check_lr(lr)
        check_mf("momentum", group["momentum"])
        dampening = group["dampening"]
        if isinstance(dampening, str):
            if dampening != "tied":
                raise ValueError(f"MFSGD: dampening must be a number or \"tied\", got {dampening!r}")
            if group["nesterov"]:
                raise ValueError("MFSGD: nesterov momentum requires zero dampening, not dampening=\"tied\"")
            dampening = 0.0  # the check below then covers the other arguments
        reference = group.get("lr_compensation")
        if reference is not None:
            if isinstance(reference, bool):
                raise TypeError("MFSGD: lr_compensation is the reference MF (a float) or None, not a bool")
            check_mf("lr_compensation (the reference MF)", reference)
        sgd_step_scalars(lr=lr, momentum=group["momentum"] if self.mf_schedule is None else 0.5,
                         dampening=dampening, weight_decay=group["weight_decay"],
                         nesterov=group["nesterov"], decoupled_weight_decay=group["decoupled_weight_decay"])

    def _uses_momentum(self, group: dict) -> bool:
        return group["momentum"] != 0.0 or self.mf_schedule is not None

    def _init_token(self, group: dict):
        return self._uses_momentum(group)  # switching momentum on needs buffers

    def _state_key(self, state: dict):
        # params whose momentum buffer starts this step must not share a launch with the others
        return (state.get("step", 0), state.get("step", 0) == 0 or state.get("momentum_buffer") is None)

    def _capture_state_key(self, state: dict):
        return state.get("momentum_buffer") is None

    def _fresh_state(self, state: dict):
        return state.get("momentum_buffer") is None  # the buffer starts as g (see _plan_group)

    def _check_scheduled_mf(self, step: int, value) -> float:
        value = super()._check_scheduled_mf(step, value)
        if value <= 0.0 and any(g["nesterov"] for g in self.param_groups):
            raise ValueError(f"nesterov momentum requires a momentum > 0; mf_schedule({step}) gave {value!r}")
        return value

    def _init_state(self, group: dict, p: torch.Tensor, state: dict) -> None:
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.int64, device=p.device) if self.capturable else 0
        if self._uses_momentum(group):
            if state.get("momentum_buffer") is None:
                # zeros, not empty_like: a state_dict taken before the first applied step must not
                # expose garbage (torch's fused SGD starts its buffer with empty_like)
                state["momentum_buffer"] = torch.zeros_like(p, dtype=self._state_dtype(p),
                                                            memory_format=torch.preserve_format)
        else:
            state.setdefault("momentum_buffer", None)
        if self._uses_master(p) and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)

    def _mf_option(self, group: dict):
        return "momentum", group["momentum"]

    def _plan_group(self, group: dict, step: int, state: dict, mf):
        momentum = mf if mf is not None else group["momentum"]
        # The buffer starts as g on the first applied update, or when momentum was switched on later
        # (no buffer yet). If that later update is skipped, the zero buffer then reads as
        # u = (1 - dampening)·g, which is g for the default dampening of 0.
        first_step = step == 0 or state.get("momentum_buffer") is None
        momentum = check_mf("momentum from mf_schedule" if self.mf_schedule else "momentum", momentum)
        settings = self._settings(group, lr_value(group["lr"]), momentum)
        self._log_effective_lr(group, settings)
        return sgd_step_scalars(**settings, first_step=first_step, maximize=group["maximize"]), None

    def _plan_device(self, group: dict, state: dict, mf, fresh):
        """As ``_plan_group`` with the step count, the MF and a tensor lr on the device."""
        settings = self._settings(group, self._device_lr(group, state["step"].device),
                                  mf if mf is not None else group["momentum"])
        self._log_effective_lr(group, settings)
        return sgd_slots(**settings, first_step=True if fresh else state["step"] == 0, maximize=group["maximize"]), None

    def _settings(self, group: dict, lr, momentum) -> dict:
        """The rule's settings of this step (floats, or device tensors in a capturable step)."""
        dampening = momentum if group["dampening"] == "tied" else group["dampening"]
        reference = group.get("lr_compensation")
        if reference is not None:  # opt-in: η_t = η·(1 − μ_t)/(1 − μ_ref)
            lr = _div(lr * (1.0 - momentum), 1.0 - reference)
        return dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=group["weight_decay"],
                    nesterov=group["nesterov"], decoupled_weight_decay=group["decoupled_weight_decay"])

    def _log_effective_lr(self, group: dict, settings: dict) -> None:
        """η_t·(1 − τ_t)/(1 − μ_t) per param group (η_t without momentum); a 0-dim device tensor in a
        capturable step with a schedule or a tensor lr."""
        lr, momentum, dampening = settings["lr"], settings["momentum"], settings["dampening"]
        effective = _div(lr * (1.0 - dampening), 1.0 - momentum) if self._uses_momentum(group) else lr
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        if len(self.last_effective_lr) != len(self.param_groups):
            self.last_effective_lr = [None] * len(self.param_groups)
        self.last_effective_lr[index] = effective

    def _call(self, group, scalars, vector, params, grads, states, backend, inv_grad_scale, found_inf):
        buffers = [s["momentum_buffer"] for s in states] if self._uses_momentum(group) else []
        masters = [s["master_param"] for s in states] if "master_param" in states[0] else []
        return F.sgd_call(backend, params, grads, buffers, masters, scalars, vector, inv_grad_scale, found_inf)

    def _normalize_loaded_state(self, p: torch.Tensor, state: dict) -> None:
        if "step" not in state:
            # a torch.optim.SGD checkpoint records no step count: a buffer means updates happened
            state["step"] = 0 if state.get("momentum_buffer") is None else 1
        elif isinstance(state["step"], torch.Tensor):
            state["step"] = int(state["step"].item())
        else:
            state["step"] = int(state["step"])
