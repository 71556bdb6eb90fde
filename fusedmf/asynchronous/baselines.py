"""Master-side baselines for asynchronous training: ASGD, ASGD with momentum, DANA-Zero.

Pure PyTorch (per-tensor torch ops, no fused kernels): they exist to be compared with SMEGA2
under the same simulator and workers, not to be fast. They share SMEGA2's interface, so
:class:`~fusedmf.asynchronous.Simulator` and :class:`~fusedmf.asynchronous.Master` drive any of
them unchanged:

    opt.step(closure=None, *, grad_scale=None, found_inf=None, grads=None, worker=None)
    opt.estimate(out=None) -> list[Tensor]     # the weights the reporting worker computes on next

One ``step`` is one master step: one gradient from one worker, computed at stale weights.
``grads`` is the public seam of fusedmf's optimizers (a callable ``param -> Tensor | None``;
None leaves the param alone); ``grad_scale`` (the loss scale) divides the gradients and a
non-zero ``found_inf`` skips the step with nothing changed (read on the host: these are
references, not capturable kernels). ``worker`` is required by DANA-Zero only, whose master keeps
one momentum buffer per worker (``needs_worker = True``); the others accept and ignore it.

Update rules (θ params, g the worker's gradient, η lr, γ momentum, τ dampening, λ weight decay):

- :class:`ASGD`, momentum 0 (plain asynchronous SGD):  θ ← θ − η·(g + λθ); the worker gets θ.
- :class:`ASGD`, momentum γ > 0: torch.optim.SGD's heavy ball on the stale gradients,
  g ← g + λθ; u ← g on the first step, else u ← γ·u + (1 − τ)·g; θ ← θ − η·u; the worker gets θ.
- :class:`DANAZero` (Hakimi, Barkai, Gabel, Schuster, "Taming Momentum in a Distributed
  Asynchronous Environment", 2019): the master keeps a momentum v_i per worker i; on a gradient
  from worker i, g ← g + λθ; v_i ← γ·v_i + g; θ ← θ − η·v_i; the worker then receives the
  look-ahead θ − η·γ·Σ_j v_j (where θ would go if every worker's momentum were applied once more).
  Its state grows with N (N buffers per param): that is what SMEGA2's single buffer avoids.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch.optim import Optimizer

Tensor = torch.Tensor

__all__ = ["ASGD", "DANAZero"]


def _check_nonneg(name: str, value, cls: str, upper: Optional[float] = None) -> float:
    if isinstance(value, Tensor):
        value = float(value)
    if not isinstance(value, (int, float)) or value != value or value < 0 or (upper is not None and value >= upper):
        bound = f"[0, {upper:g})" if upper is not None else ">= 0"
        raise ValueError(f"{cls}: {name} must be a number in {bound}, got {value!r}")
    return float(value)


class _MasterOptimizer(Optimizer):
    """The shared step/estimate plumbing; subclasses implement ``_update`` and ``_estimate_into``."""

    needs_worker = False

    def _validate_groups(self) -> None:
        for i, g in enumerate(self.param_groups):
            _check_nonneg(f"param_groups[{i}]['lr']", g["lr"], type(self).__name__)
            _check_nonneg(f"param_groups[{i}]['momentum']", g["momentum"], type(self).__name__, upper=1.0)
            _check_nonneg(f"param_groups[{i}]['weight_decay']", g["weight_decay"], type(self).__name__)

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale=None, found_inf=None,
             grads: Optional[Callable[[Tensor], Optional[Tensor]]] = None, worker: Optional[int] = None):
        name = type(self).__name__
        if grads is not None and not callable(grads):
            raise TypeError(f"{name}.step: grads must be a callable param -> Tensor | None, got {type(grads).__name__}")
        self._check_worker(worker)
        self._validate_groups()            # lr may have been changed in place (warm-up)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            return loss                    # NOTE [skip on overflow]: nothing changes
        inv = None if grad_scale is None else 1.0 / float(grad_scale)
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                g = grads(p) if grads is not None else p.grad
                if g is None:
                    continue
                if g.shape != p.shape:
                    raise ValueError(f"{name}.step: the gradient of a param of shape {list(p.shape)} has shape "
                                     f"{list(g.shape)}")
                work.append((group, p, g))
        for group, p, g in work:            # validated every grad before changing anything
            g = g.to(torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype)
            if inv is not None:
                g = g * inv
            self._update(group, p, g, worker)
        return loss

    def _check_worker(self, worker) -> None:
        if worker is not None and (not isinstance(worker, int) or worker < 0):
            raise ValueError(f"{type(self).__name__}.step: worker must be a non-negative int, got {worker!r}")

    @torch.no_grad()
    def estimate(self, out: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
        """The weights the reporting worker computes its next gradient at, one tensor per param in
        param-group order; written into ``out`` (same shapes) when given, else new tensors."""
        params = [p for g in self.param_groups for p in g["params"]]
        if out is not None:
            out = list(out)
            if len(out) != len(params):
                raise ValueError(f"{type(self).__name__}.estimate: out has {len(out)} tensors, the optimizer "
                                 f"has {len(params)} params")
            for i, (o, p) in enumerate(zip(out, params)):
                if o.shape != p.shape:
                    raise ValueError(f"{type(self).__name__}.estimate: out[{i}] has shape {list(o.shape)}, "
                                     f"param {i} has {list(p.shape)}")
        result = []
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                o = out[i] if out is not None else torch.empty_like(p)
                self._estimate_into(group, p, o)
                result.append(o)
                i += 1
        return result


class ASGD(_MasterOptimizer):
    """Asynchronous SGD at the master: torch.optim.SGD's rule applied to each stale gradient as it
    arrives (momentum 0: plain ASGD; momentum > 0: ASGD with heavy-ball momentum). Workers receive
    the current params. Pure PyTorch."""

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0):
        _check_nonneg("lr", lr, "ASGD")
        _check_nonneg("momentum", momentum, "ASGD", upper=1.0)
        _check_nonneg("dampening", dampening, "ASGD", upper=1.0 + 1e-12)
        _check_nonneg("weight_decay", weight_decay, "ASGD")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay))

    def _update(self, group, p, g, worker) -> None:
        master = self._master(p)
        lr, mu, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
        if wd:
            g = g.add(master, alpha=wd)
        if mu:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.clone()      # torch semantics: starts as g, undampened
            else:
                buf.mul_(mu).add_(g, alpha=1.0 - float(group["dampening"]))
            g = buf
        master.add_(g, alpha=-lr)
        if master is not p:
            p.copy_(master)

    def _master(self, p: Tensor) -> Tensor:
        """fp32 master copy for fp16/bf16 params (kept in the state), the param itself otherwise."""
        if p.dtype not in (torch.float16, torch.bfloat16):
            return p
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().float()
        return state["master"]

    def _estimate_into(self, group, p, out) -> None:
        out.copy_(self._master(p))


class DANAZero(ASGD):
    """DANA-Zero (Hakimi et al. 2019) at the master: one momentum buffer per worker, the worker
    receives θ − η·γ·Σ_j v_j. ``step`` needs ``worker=`` (the index, 0 ≤ worker < num_workers, of
    the worker whose gradient this is). Pure PyTorch."""

    needs_worker = True

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, *,
                 num_workers: int):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"DANAZero: num_workers must be a positive int, got {num_workers!r}")
        self.num_workers = num_workers
        super().__init__(params, lr=lr, momentum=momentum, dampening=0.0, weight_decay=weight_decay)

    def _check_worker(self, worker) -> None:
        if worker is None:
            raise ValueError("DANAZero.step: worker= (the index of the reporting worker) is required: the "
                             "master keeps one momentum buffer per worker")
        if not isinstance(worker, int) or not 0 <= worker < self.num_workers:
            raise ValueError(f"DANAZero.step: worker must be an int in [0, {self.num_workers}), got {worker!r}")

    def _momenta(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momenta" not in state:
            state["momenta"] = torch.zeros((self.num_workers,) + tuple(p.shape), dtype=torch.float32
                                           if p.dtype in (torch.float16, torch.bfloat16) else p.dtype, device=p.device)
        return state["momenta"]

    def _update(self, group, p, g, worker) -> None:
        master = self._master(p)
        lr, mu, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
        if wd:
            g = g.add(master, alpha=wd)
        v = self._momenta(p)[worker]
        v.mul_(mu).add_(g)
        master.add_(v, alpha=-lr)
        if master is not p:
            p.copy_(master)

    def _estimate_into(self, group, p, out) -> None:
        lr, mu = float(group["lr"]), float(group["momentum"])
        master = self._master(p)
        out.copy_(master - (lr * mu) * self._momenta(p).sum(0))

    def load_state_dict(self, state_dict) -> None:
        for s in state_dict.get("state", {}).values():
            m = s.get("momenta")
            if m is not None and m.shape[0] != self.num_workers:
                raise ValueError(f"DANAZero.load_state_dict: the state has momenta for {m.shape[0]} workers, "
                                 f"this optimizer has num_workers={self.num_workers}")
        super().load_state_dict(state_dict)
