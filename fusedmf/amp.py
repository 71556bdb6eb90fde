"""DynamicLossScaler: loss scaling for fp16 params with fp32 masters, no host synchronisation.

torch.amp.GradScaler also works with fusedmf optimizers (they implement its fused-step protocol,
fp16 params included). This scaler exists for the master-weight path without GradScaler's
constraints: its non-finite check is one fused multi-tensor pass per device (fusedmf.functional),
the optimizer unscales inside its update, and the scale is updated on the device.

    scaler = DynamicLossScaler()
    scaler.scale(loss).backward()
    scaler.step(opt)        # check grads, then opt.step(grad_scale=..., found_inf=...)
    scaler.update()         # back off on overflow, grow after `growth_interval` clean steps
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch

from . import functional as F


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

    def step(self, optimizer, *args, **kwargs):
        """Check the grads once, then let the optimizer unscale and skip inside its fused update."""
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
