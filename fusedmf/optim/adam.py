"""MFAdam: Adam / AdamW whose beta1 (the MF) may change every step, with exact bias correction."""

from __future__ import annotations

import torch

from ..functional import adam_call
from ..functional.scalars import adam_slots, adam_step_scalars, check_lr, check_mf
from ._base import MFOptimizerBase, lr_value, torch_implementation_flags


class MFAdam(MFOptimizerBase):
    r"""Fused Adam/AdamW with a per-step beta1, fp32 masters and in-kernel unscaling.

    The arguments shared with :class:`torch.optim.Adam` mean what they mean there; with a constant
    beta1 and fp32 params the trajectory matches torch.optim.Adam, and with
    ``decoupled_weight_decay=True`` it matches torch.optim.AdamW.

    With an ``mf_schedule`` the first-moment bias correction uses the running product
    P_t = beta1_1 · … · beta1_t (kept per param in float64 as ``state["beta1_product"]``), not
    beta1_t ** t, which would be wrong as soon as beta1 varies (docs/algorithms.md, MF-Adam).

    ``capturable=True`` (torch's meaning): step counts, beta1 products, the MF and every per-step
    scalar live in device tensors and the skip decision never leaves the device, so ``step()`` can be
    captured in a CUDA graph (NOTE [capturable step] in fusedmf/optim/_base.py).

    ``amsgrad``, ``maximize`` (torch's meanings) run inside the same fused kernels: AMSGrad keeps
    ``state["max_exp_avg_sq"]`` (fp32, torch's name), the running maximum of the second moment.
    ``foreach`` / ``fused`` (None, False or True) change nothing, fusedmf is always fused; they are
    kept in the groups, under torch's names, for checkpoints; ``differentiable=True`` raises
    NotImplementedError. ``params`` may be ``named_parameters()`` (names in ``param_names``).

    State per param: ``step`` (int; a 0-dim int64 tensor with capturable=True), ``exp_avg``, ``exp_avg_sq`` (fp32), ``beta1_product`` (float; a 0-dim float64 tensor with capturable=True),
    ``max_exp_avg_sq`` (fp32) with amsgrad, and ``master_param`` (fp32) for low-precision params with masters.
    """

    _FP32_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
    _FLOAT64_STATE_KEYS = ("beta1_product",)

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, foreach=None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False, fused=None,
                 decoupled_weight_decay: bool = False, mf_schedule=None, master_weights=None, backend: str = "auto"):
        owner = type(self).__name__
        flags = torch_implementation_flags(owner, foreach, fused, differentiable)
        # torch.optim.Adam's own refusals, in its words and order, so code written against torch
        # gets the errors it expects
        if isinstance(lr, torch.Tensor) and foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        betas = tuple(betas)
        self._betas(dict(betas=betas))
        if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, torch.Tensor) for b in betas)):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, beta in enumerate(betas):
            if isinstance(beta, torch.Tensor) and foreach and not capturable:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        **flags, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, mf_schedule=mf_schedule, master_weights=master_weights, backend=backend,
                         capturable=capturable)

    def _betas(self, group: dict):
        """(beta1, beta2) as floats, each checked in [0, 1) with torch's message: torch lets both be
        1-element tensors, read on the host here."""
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"{type(self).__name__}: betas must be a pair (beta1, beta2), got {betas!r}")
        values = tuple(lr_value(beta, f"betas[{i}]") for i, beta in enumerate(betas))
        for i, value in enumerate(values):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {value}")
        return values

    def _validate_group(self, group: dict) -> None:
        lr = self._lr_to_check(group)
        beta1, beta2 = self._betas(group)
        if not isinstance(group.get("amsgrad", False), bool):
            raise TypeError(f"{type(self).__name__}: amsgrad must be False or True, got {group['amsgrad']!r}")
        check_lr(lr)
        check_mf("beta1", beta1)
        adam_step_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                          weight_decay=group["weight_decay"],
                          decoupled_weight_decay=group["decoupled_weight_decay"], step=1, beta1_product=beta1)

    def _init_token(self, group: dict):
        return bool(group["amsgrad"])  # switching AMSGrad on needs its buffers

    def _state_key(self, state: dict):
        return (state.get("step", 0), state.get("beta1_product", 1.0))

    def _init_state(self, group: dict, p: torch.Tensor, state: dict) -> None:
        if "step" not in state:
            if self.capturable:
                state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
                state["beta1_product"] = torch.ones((), dtype=torch.float64, device=p.device)
            else:
                state["step"] = 0
                state["beta1_product"] = 1.0
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
            if key not in state:
                state[key] = torch.zeros_like(p, dtype=self._state_dtype(p), memory_format=torch.preserve_format)
        if self._uses_master(p) and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)

    def _mf_option(self, group: dict):
        return "betas[0]", group["betas"][0]

    def _plan_group(self, group: dict, step: int, state: dict, mf):
        beta1, beta2 = self._betas(group)
        beta1 = check_mf("beta1 from mf_schedule" if self.mf_schedule else "beta1", mf if mf is not None else beta1)
        product = float(state.get("beta1_product", 1.0)) * beta1  # float64 on the host
        return adam_step_scalars(
            lr=lr_value(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
            step=step + 1, beta1_product=product, maximize=group["maximize"],
        ), product

    def _plan_device(self, group: dict, state: dict, mf, fresh):
        """As ``_plan_group`` with the step count, beta1 product, MF and tensor lr / betas on the device."""
        device = state["beta1_product"].device
        beta1, beta2 = (self._device_hyper(b, device) for b in group["betas"])
        beta1 = mf if mf is not None else beta1
        product = state["beta1_product"] * beta1  # float64 on the device
        return adam_slots(
            lr=self._device_lr(group, device), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
            step=state["step"] + 1, beta1_product=product, maximize=group["maximize"],
        ), product

    def _commit_device(self, states, product, applied) -> None:
        super()._commit_device(states, product, applied)
        products = [s["beta1_product"] for s in states]
        kept = torch.where(applied, product, products[0])  # the params of a launch share their product
        torch._foreach_copy_(products, [kept] * len(products))

    def _capture_state(self, p: torch.Tensor, state: dict) -> None:
        super()._capture_state(p, state)
        state["beta1_product"] = torch.full((), float(state["beta1_product"]), dtype=torch.float64, device=p.device)

    def _call(self, group, scalars, vector, params, grads, states, backend, inv_grad_scale, found_inf):
        masters = [s["master_param"] for s in states] if "master_param" in states[0] else []
        maxima = [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else []
        return adam_call(backend, params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                         maxima, masters, scalars, vector, inv_grad_scale, found_inf)

    def _committed_values(self, product, state: dict) -> dict:
        return {"step": state["step"] + 1, "beta1_product": product}

    def _normalize_loaded_state(self, p: torch.Tensor, state: dict) -> None:
        step = state.get("step", 0)
        state["step"] = int(step.item()) if isinstance(step, torch.Tensor) else int(step)
        if "beta1_product" not in state:
            # a torch.optim.Adam checkpoint: constant beta1, so P_t = beta1 ** t
            beta1 = next(self._betas(g)[0] for g in self.param_groups if any(q is p for q in g["params"]))
            state["beta1_product"] = float(beta1) ** state["step"]
        else:
            state["beta1_product"] = float(state["beta1_product"])


class MFAdamW(MFAdam):
    r"""torch.optim.AdamW's defaults and meaning on MFAdam: decoupled weight decay, 1e-2 by default.

    ``MFAdamW(params)`` is ``MFAdam(params, weight_decay=1e-2, decoupled_weight_decay=True)``; every
    other argument is MFAdam's (and torch.optim.AdamW's where it has it).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False, foreach=None,
                 capturable: bool = False, differentiable: bool = False, fused=None, mf_schedule=None,
                 master_weights=None, backend: str = "auto"):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, mf_schedule=mf_schedule, master_weights=master_weights,
                         backend=backend)
