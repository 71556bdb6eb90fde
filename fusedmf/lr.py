"""Large-batch learning-rate rules as torch LR schedulers.

Both are :class:`torch.optim.lr_scheduler.LRScheduler` subclasses whose ``get_lr`` is *chainable*
(like torch's ``LinearLR``: each step multiplies the current ``group["lr"]`` by f(t)/f(t − 1)), so
they compose with :class:`~torch.optim.lr_scheduler.ChainedScheduler` (e.g. with a ``MultiStepLR``
decay) and :class:`~torch.optim.lr_scheduler.SequentialLR` (e.g. followed by a
``CosineAnnealingLR``). Call ``scheduler.step()`` once per optimizer update: the t-th update
(1-based) then runs with the factor f(t − 1).

- :func:`goyal_warmup` -- linear scaling + gradual warm-up, Goyal et al., "Accurate, Large
  Minibatch SGD: Training ImageNet in 1 Hour", arXiv:1706.02677 (2017).
- :func:`legw` -- Linear-Epoch Gradual Warm-up, You et al., "Large-Batch Training for LSTM and
  Beyond", SC'19, arXiv:1901.08256.

Both set each param group's ``lr`` and ``initial_lr`` to the peak LR they compute when they are
built fresh (``last_epoch=-1``); schedulers built afterwards on the same optimizer then take that
peak as their base LR.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

from torch.optim.lr_scheduler import LRScheduler

__all__ = ["GoyalWarmup", "LEGW", "goyal_warmup", "legw"]


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


class _FactorLR(LRScheduler):
    """lr_t = peak · f(t), t = number of ``step()`` calls so far, written in chainable form."""

    def factor(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_peak(self, optimizer, peak_lrs, last_epoch: int) -> None:
        if last_epoch == -1:
            for group, peak in zip(optimizer.param_groups, peak_lrs):
                group["lr"] = peak
                group["initial_lr"] = peak

    def get_lr(self):
        t = self.last_epoch
        if t == 0:
            return [group["lr"] * self.factor(0) for group in self.optimizer.param_groups]
        if self._is_initial:
            return [group["lr"] for group in self.optimizer.param_groups]
        prev, now = self.factor(t - 1), self.factor(t)
        if prev == 0.0:  # the ratio is undefined: fall back to the closed form
            return [base * now for base in self.base_lrs]
        return [group["lr"] * (now / prev) for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


class GoyalWarmup(_FactorLR):
    """Linear scaling rule + gradual warm-up (Goyal et al. 2017, arXiv:1706.02677).

    The peak LR is η = base_lr · B / reference_batch (the paper: η = 0.1 · B / 256); the first
    update runs at η / k with k = B / reference_batch, and the LR rises linearly to η, reached at
    update ``warmup_steps + 1`` (the paper: over the first 5 epochs), then stays at η: chain a decay
    (the paper divides by 10 at epochs 30, 60, 80) with ChainedScheduler / SequentialLR. With
    k <= 1 there is nothing to warm up and the LR is η from the start.

    ``base_lr=None`` takes each param group's current lr as its small-batch LR.
    """

    def __init__(self, optimizer, base_lr: Optional[float], batch_size: int, warmup_steps: int, *,
                 reference_batch: int = 256, last_epoch: int = -1):
        self.batch_size = _positive("batch_size", batch_size)
        self.reference_batch = _positive("reference_batch", reference_batch)
        self.warmup_steps = _count("warmup_steps", warmup_steps)
        self.k = self.batch_size / self.reference_batch
        bases = [group["initial_lr" if last_epoch != -1 else "lr"] if base_lr is None else base_lr
                 for group in optimizer.param_groups]
        for b in bases:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
                raise ValueError(f"base_lr must be a finite float >= 0, got {b!r}")
        self.peak_lrs = [float(b) * self.k for b in bases]
        self.start_factor = min(1.0, 1.0 / self.k)
        self._set_peak(optimizer, self.peak_lrs, last_epoch)
        super().__init__(optimizer, last_epoch)

    def factor(self, t: int) -> float:
        if self.warmup_steps == 0 or t >= self.warmup_steps:
            return 1.0
        return self.start_factor + (1.0 - self.start_factor) * t / self.warmup_steps


class LEGW(_FactorLR):
    """Linear-Epoch Gradual Warm-up (You et al., SC'19, arXiv:1901.08256).

    Tuned at batch B0 with peak LR η0 and w0 warm-up epochs; for B = k · B0 LEGW uses the peak
    η = sqrt(k) · η0 and k · w0 warm-up epochs, i.e. the same number of warm-up *iterations*
    W = k · w0 · steps_per_epoch (``steps_per_epoch`` counted at batch B). Update t (1-based) runs
    at η · min(1, t / W); after the warm-up the base decay follows, in epochs:

    - ``decay=None``: constant η;
    - ``"poly"``: η · (1 − p)^power, p the fraction of the post-warm-up steps done, reaching 0 at
      ``total_epochs`` (the paper's polynomial decay, power 2);
    - ``"cosine"``: η · (1 + cos(π p)) / 2, also reaching 0 at ``total_epochs``;
    - a callable ``epoch -> factor`` (epoch a float counted from the start of training, as the
      base schedule at B0 was written), multiplied into η after the warm-up.

    ``lr0=None`` takes each param group's current lr as η0.
    """

    def __init__(self, optimizer, lr0: Optional[float], batch0: int, batch: int, warmup_epochs0: float,
                 steps_per_epoch: int, decay: Union[None, str, Callable[[float], float]] = None, *,
                 total_epochs: Optional[float] = None, power: float = 2.0, last_epoch: int = -1):
        self.batch0 = _positive("batch0", batch0)
        self.batch = _positive("batch", batch)
        self.steps_per_epoch = _positive("steps_per_epoch", steps_per_epoch)
        if isinstance(warmup_epochs0, bool) or not isinstance(warmup_epochs0, (int, float)) \
                or not math.isfinite(warmup_epochs0) or warmup_epochs0 < 0:
            raise ValueError(f"warmup_epochs0 must be a finite number >= 0, got {warmup_epochs0!r}")
        self.k = self.batch / self.batch0
        self.warmup_epochs = self.k * warmup_epochs0
        self.warmup_steps = int(round(self.warmup_epochs * self.steps_per_epoch))
        if decay in ("poly", "cosine"):
            if total_epochs is None:
                raise ValueError(f"decay={decay!r} needs total_epochs")
            self.total_steps = int(round(_positive("total_epochs", total_epochs) * self.steps_per_epoch))
            if self.total_steps <= self.warmup_steps:
                raise ValueError(f"total_epochs={total_epochs} leaves no steps after the "
                                 f"{self.warmup_steps}-step warm-up")
        elif decay is not None and not callable(decay):
            raise ValueError(f"decay must be None, 'poly', 'cosine' or a callable epoch -> factor, got {decay!r}")
        else:
            self.total_steps = None
        self.decay, self.power = decay, _positive("power", power)
        bases = [group["initial_lr" if last_epoch != -1 else "lr"] if lr0 is None else lr0
                 for group in optimizer.param_groups]
        for b in bases:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
                raise ValueError(f"lr0 must be a finite float >= 0, got {b!r}")
        self.peak_lrs = [math.sqrt(self.k) * float(b) for b in bases]
        self._set_peak(optimizer, self.peak_lrs, last_epoch)
        super().__init__(optimizer, last_epoch)

    def factor(self, t: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        if self.decay is None:
            return 1.0
        if callable(self.decay):
            value = float(self.decay(t / self.steps_per_epoch))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"LEGW decay({t / self.steps_per_epoch}) returned {value!r}, not a factor >= 0")
            return value
        p = min(1.0, (t - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        if self.decay == "poly":
            return (1.0 - p) ** self.power
        return 0.5 * (1.0 + math.cos(math.pi * p))


def goyal_warmup(optimizer, base_lr: Optional[float], batch_size: int, warmup_steps: int, **kwargs) -> GoyalWarmup:
    """:class:`GoyalWarmup` (Goyal et al. 2017): η = base_lr·B/256, linear warm-up from η/k."""
    return GoyalWarmup(optimizer, base_lr, batch_size, warmup_steps, **kwargs)


def legw(optimizer, lr0: Optional[float], batch0: int, batch: int, warmup_epochs0: float, steps_per_epoch: int,
         decay=None, **kwargs) -> LEGW:
    """:class:`LEGW` (You et al., SC'19): η = sqrt(k)·η0, k·w0 epochs of linear warm-up, then ``decay``."""
    return LEGW(optimizer, lr0, batch0, batch, warmup_epochs0, steps_per_epoch, decay, **kwargs)
