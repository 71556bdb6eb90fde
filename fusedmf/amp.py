"""DynamicLossScaler: loss scaling for fp16 params with fp32 masters, no host synchronisation.

torch.amp.GradScaler also works with fusedmf optimizers (they implement its fused-step protocol,
fp16 params included). This scaler exists for the master-weight path without GradScaler's
constraints: its non-finite check is one fused multi-tensor pass per device (fusedmf.functional),
the optimizer unscales inside its update, and the scale is updated on the device.

    scaler = DynamicLossScaler()
    scaler.scale(loss).backward()
    scaler.step(opt)        # check grads, then opt.step(grad_scale=..., found_inf=...)
    scaler.update()         # back off on overflow, grow after `growth_interval` clean steps

Clipping (fp16 params included, which torch.amp.GradScaler.unscale_ refuses):

    scaler.scale(loss).backward()
    scaler.unscale_(opt)    # grads /= scale in place, non-finite check in the same pass
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(opt)        # the update no longer unscales; skips if the unscale found inf/NaN
    scaler.update()

With a :class:`fusedmf.comm.DistributedOptimizer`, ``unscale_`` first finishes the step's
communication and makes every ``p.grad`` the reduced gradient, so clipping sees the gradient the
update will apply, identically on every rank.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch

from . import functional as F


def unscale_grads_(grads, grad_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
    """``g /= grad_scale`` in place for every tensor of ``grads``, and ``found_inf`` (a 1-element fp32
    tensor) set non-zero if any of them holds inf/NaN: one fused pass per (device, dtype).

    NOTE [in-place unscale]
    The kernel is torch's own ``_amp_foreach_non_finite_check_and_unscale_`` (GradScaler's; one
    multi-tensor launch on CUDA, a vectorised loop on CPU), which accepts fp16 and bf16 gradients:
    the refusal of fp16 in ``GradScaler.unscale_`` is a Python-level policy, not the kernel's.
    fusedmf's pack_ kernel cannot do it: it gathers tensors into *one flat output* at padded slot
    offsets, so writing back into each gradient would alias its inputs with its output (outside its
    op schema, where inputs are read-only and only ``out`` is mutated), and it has no non-finite
    check; the update kernels unscale only on the fly, without writing the gradient."""
    groups: dict = defaultdict(list)
    for g in grads:
        if g is not None:
            groups[(g.device, g.dtype)].append(g)
    for (device, _dtype), gs in groups.items():
        inv = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1).reciprocal()
        if device == found_inf.device:
            torch._amp_foreach_non_finite_check_and_unscale_(gs, found_inf.reshape(1), inv)
        else:
            local = torch.zeros(1, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(gs, local, inv)
            found_inf.reshape(1).add_(local.to(found_inf.device, non_blocking=True))


class DynamicLossScaler:
    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, *, backend: str = "auto"):
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if int(growth_interval) < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval!r}")
        self._init_scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.backend = backend
        self._scale: Optional[torch.Tensor] = None
        self._growth_tracker: Optional[torch.Tensor] = None
        self._found_inf: Optional[torch.Tensor] = None
        self._unscaled = None             # the optimizer unscale_() ran on since the last update()
        self._loaded_tracker = 0

    def _lazy_init(self, device: torch.device) -> None:
        if self._scale is None:
            self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=device)
            self._growth_tracker = torch.full((), self._loaded_tracker, dtype=torch.int32, device=device)

    def scale(self, outputs):
        """Multiply a tensor (or a nested list/tuple of tensors) by the current scale."""
        if isinstance(outputs, torch.Tensor):
            self._lazy_init(outputs.device)
            return outputs * self._scale.to(device=outputs.device, non_blocking=True)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise TypeError(f"DynamicLossScaler.scale expects tensors, got {type(outputs).__name__}")

    def check_non_finite(self, optimizer) -> torch.Tensor:
        """found_inf (fp32 scalar on the scale's device) for the optimizer's current grads."""
        if self._scale is None:
            raise RuntimeError("DynamicLossScaler.step() called before scale(): nothing was scaled")
        per_device = defaultdict(list)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    per_device[p.grad.device].append(p.grad)
        flag, _ = F.found_inf_over(per_device, backend=self.backend)  # NOTE [one amp helper]
        if flag is None:
            return torch.zeros((), dtype=torch.float32, device=self._scale.device)
        return flag.reshape(()).to(self._scale.device, non_blocking=True)

    def unscale_(self, optimizer) -> None:
        """Divide the optimizer's gradients by the scale in place (NOTE [in-place unscale]), e.g. before
        ``clip_grad_norm_``; the following :meth:`step` then does not unscale again and skips the
        update if the gradients held inf/NaN. An optimizer with its own ``unscale_(grad_scale)`` (a
        :class:`fusedmf.comm.DistributedOptimizer`: the reduced gradients) is asked to do it."""
        if self._scale is None:
            raise RuntimeError("DynamicLossScaler.unscale_() called before scale(): nothing was scaled")
        if self._unscaled is not None:
            raise RuntimeError("DynamicLossScaler.unscale_() was already called since the last update()")
        if hasattr(optimizer, "unscale_"):
            found = optimizer.unscale_(self._scale)
        else:
            found = torch.zeros(1, dtype=torch.float32, device=self._scale.device)
            unscale_grads_([p.grad for g in optimizer.param_groups for p in g["params"]], self._scale, found)
        self._found_inf = found.to(self._scale.device).reshape(())
        self._unscaled = optimizer

    def step(self, optimizer, *args, **kwargs):
        """Check the grads once, then let the optimizer unscale and skip inside its fused update
        (after :meth:`unscale_`: only skip)."""
        if self._unscaled is optimizer:
            return optimizer.step(*args, found_inf=self._found_inf, **kwargs)
        if self._unscaled is not None:
            raise RuntimeError("DynamicLossScaler.step(): unscale_() was called on another optimizer")
        self._found_inf = self.check_non_finite(optimizer)
        return optimizer.step(*args, grad_scale=self._scale, found_inf=self._found_inf, **kwargs)

    def update(self) -> None:
        """Back off after an overflow, grow after growth_interval clean steps (on the device)."""
        if self._found_inf is None:
            raise RuntimeError("DynamicLossScaler.update() called without a preceding step()")
        overflow = self._found_inf != 0
        tracker = torch.where(overflow, torch.zeros_like(self._growth_tracker), self._growth_tracker + 1)
        grow = tracker >= self.growth_interval
        scale = torch.where(overflow, self._scale * self.backoff_factor,
                            torch.where(grow, self._scale * self.growth_factor, self._scale))
        self._growth_tracker.copy_(torch.where(grow, torch.zeros_like(tracker), tracker))
        self._scale.copy_(scale)
        self._found_inf = None
        self._unscaled = None

    def get_scale(self) -> float:
        return self._init_scale if self._scale is None else float(self._scale.item())

    def state_dict(self) -> dict:
        return {"scale": self.get_scale(), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "growth_tracker": 0 if self._growth_tracker is None else int(self._growth_tracker.item())}

    def load_state_dict(self, state: dict) -> None:
        self._init_scale = float(state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
            self._growth_tracker.fill_(int(state["growth_tracker"]))
        else:
            self._loaded_tracker = int(state["growth_tracker"])
