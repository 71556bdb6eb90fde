"""MF (momentum-like factor) schedules: callables ``step -> MF`` given to ``mf_schedule=``.

The optimizers call a schedule with the 1-based number of the update about to be applied
(torch's ``state["step"]`` after its increment); a step skipped for overflow does not count.
Any callable works; the classes here add a readable repr and validation (every value must be a
finite MF in [0, 1); a schedule called with a step < 1 raises).

The MF is the momentum μ for MF-SGD / MF-NAG and β1 for MF-Adam (Tang et al., "Increasing
Momentum-Like Factors", Tsinghua Sci. Technol. 27(1), 2022). Those papers show that a larger MF
lowers the training error as the number of ranks K grows at a fixed global batch B, but give **no
closed-form rule** for the MF as a function of K or of the per-rank batch b. The rules below
(:class:`by_world_size`, :class:`horizon`, :class:`ramp`, :class:`sequence`) are therefore
fusedmf's own heuristics, not results from the papers:

- :class:`constant` -- the same MF at every step (torch.optim's behaviour).
- :class:`by_world_size` -- a table ``{K: MF}``, the papers' "try a larger MF per configuration".
- :class:`horizon` -- keep the averaging horizon 1/(1 − μ), measured in samples per rank, fixed:
  1 − μ = (1 − mf_ref)·(b / b_ref)**power, clamped to [mf_ref, mf_max]. From μ = 0.9 at K = 1 it
  gives 0.975 at K = 4 and 0.9875 at K = 8 with B fixed (b = B / K).
- :class:`ramp` -- linear from one MF to another (or to another schedule) over a number of
  updates, e.g. over the LR warm-up so that the MF does not jump.
- :class:`sequence` -- schedules one after another, each for a number of updates.
- :class:`callable_schedule` -- wrap any ``step -> MF`` function to get validation and a repr.
- :class:`noise_adaptive` -- an EXPERIMENT: the horizon rule with the measured gradient noise scale
  (fusedmf.noise) as the reference batch, so the MF rises as the per-rank batch falls below it.

:func:`effective_lr` gives the step size a constant MF amounts to, η·(1 − τ)/(1 − μ): raising μ
from 0.9 to 0.99 at τ = 0 multiplies it by 10, which is what ``MFSGD(lr_compensation=...)`` or
``dampening="tied"`` are there to undo.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence, Tuple, Union

from .functional.scalars import check_lr, check_mf

__all__ = ["MFSchedule", "constant", "by_world_size", "horizon", "ramp", "sequence", "callable_schedule",
           "noise_adaptive", "effective_lr", "as_schedule", "is_stateful"]


class MFSchedule:
    """Base class: subclasses implement ``value(step)``; calling validates the result.

    A stateful schedule also implements ``state_dict()`` / ``load_state_dict()``; the optimizer
    saves and restores it with its own state (MFSGD/MFAdam ``state_dict()["mf_schedule"]``).
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def value(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or int(step) != step:
            raise TypeError(f"MF schedules are called with an integer update number, got {step!r}")
        step = int(step)
        if step < 1:
            raise ValueError(f"MF schedules are called with the 1-based update number, got {step}")
        return check_mf(f"{self!r}({step})", self.value(step))


def is_stateful(schedule) -> bool:
    """Whether a schedule keeps state between calls (it has its own ``state_dict``): such a schedule must
    be called at run time, step by step, and cannot be tabulated ahead for a ``capturable=True`` step."""
    if isinstance(schedule, sequence):
        return any(is_stateful(s) for _, s in schedule.segments)
    state_dict = getattr(type(schedule), "state_dict", None)
    return state_dict is not None and state_dict is not MFSchedule.state_dict


def as_schedule(s: Union[float, int, Callable[[int], float], MFSchedule], name: str = "schedule") -> MFSchedule:
    """A number becomes :class:`constant`, a plain callable :class:`callable_schedule`."""
    if isinstance(s, MFSchedule):
        return s
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return constant(s)
    if callable(s):
        return callable_schedule(s)
    raise TypeError(f"{name} must be an MF (float), a callable step -> MF or an MFSchedule; got {type(s).__name__}")


class constant(MFSchedule):
    """The same MF at every step (what torch.optim does)."""

    def __init__(self, mf: float):
        self.mf = check_mf("mf", mf)

    def value(self, step: int) -> float:
        return self.mf

    def __repr__(self) -> str:
        return f"constant({self.mf})"


class callable_schedule(MFSchedule):
    """Wrap any ``fn(step) -> MF``: the result is checked to be a finite MF in [0, 1) at every call."""

    def __init__(self, fn: Callable[[int], float]):
        if not callable(fn):
            raise TypeError(f"callable_schedule needs a callable step -> MF, got {type(fn).__name__}")
        self.fn = fn

    def value(self, step: int) -> float:
        return float(self.fn(step))

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        return f"callable_schedule({name})"


def _default_world_size() -> int:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch always ships it
        return 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class by_world_size(MFSchedule):
    """The MF for the world size K looked up in a table ``{K: MF}`` (fusedmf's heuristic).

    ``world_size=None`` takes torch.distributed's world size when a process group is initialised,
    else 1; it is resolved on the first call (so the schedule may be built before
    ``init_process_group``) and then fixed. A K missing from the table raises ValueError.
    """

    def __init__(self, table: Mapping[int, float], world_size: Optional[int] = None):
        if not isinstance(table, Mapping) or not table:
            raise ValueError("by_world_size needs a non-empty mapping {world_size: MF}")
        self.table = {}
        for k, mf in table.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"by_world_size: world sizes must be integers >= 1, got {k!r}")
            self.table[k] = check_mf(f"by_world_size table[{k}]", mf)
        if world_size is not None:
            world_size = self._check_world_size(int(world_size))
        self.world_size = world_size

    def _check_world_size(self, k: int) -> int:
        if k not in self.table:
            raise ValueError(f"by_world_size: no MF for world size {k}; the table covers "
                             f"{sorted(self.table)} (add an entry for {k})")
        return k

    def value(self, step: int) -> float:
        if self.world_size is None:
            self.world_size = self._check_world_size(_default_world_size())
        return self.table[self.world_size]

    def __repr__(self) -> str:
        return f"by_world_size({self.table}, world_size={self.world_size})"


class horizon(MFSchedule):
    """Constant MF that keeps the momentum horizon per rank fixed (fusedmf's heuristic).

    1 − μ = (1 − mf_ref)·(b / b_ref)**power, clamped to [mf_ref, mf_max]: ``mf_ref`` is the MF
    tuned at per-rank batch ``b_ref``, ``b`` is the per-rank batch now. With the global batch B
    fixed and b = B / K, mf_ref = 0.9 at K = 1 gives 0.975 at K = 4 and 0.9875 at K = 8.
    A larger per-rank batch than the reference (b > b_ref) never lowers the MF below mf_ref.
    """

    def __init__(self, mf_ref: float, b: float, b_ref: float, power: float = 1.0, mf_max: float = 0.995):
        self.mf_ref = check_mf("mf_ref", mf_ref)
        self.mf_max = check_mf("mf_max", mf_max)
        if self.mf_max < self.mf_ref:
            raise ValueError(f"horizon: mf_max {mf_max} must be >= mf_ref {mf_ref}")
        for name, v in (("b", b), ("b_ref", b_ref)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"horizon: {name} must be a positive batch size, got {v!r}")
        if not (isinstance(power, (int, float)) and math.isfinite(power) and power >= 0):
            raise ValueError(f"horizon: power must be a finite number >= 0, got {power!r}")
        self.b, self.b_ref, self.power = b, b_ref, float(power)
        raw = 1.0 - (1.0 - self.mf_ref) * (b / b_ref) ** self.power
        self.mf = min(max(raw, self.mf_ref), self.mf_max)

    def value(self, step: int) -> float:
        return self.mf

    def __repr__(self) -> str:
        return (f"horizon(mf_ref={self.mf_ref}, b={self.b}, b_ref={self.b_ref}, power={self.power}, "
                f"mf_max={self.mf_max}) = {self.mf!r}")


class ramp(MFSchedule):
    """Linear from ``start`` to ``end`` over ``steps`` updates, then ``end`` (fusedmf's heuristic).

    μ(t) = start + (end − start)·min(t − 1, steps)/steps: update 1 gets ``start``, update
    ``steps + 1`` and later get ``end`` (the convention of torch's ``LinearLR``, so a ramp of the
    same length as an LR warm-up ends when the warm-up does). ``steps = 0`` gives ``end`` at once.

    ``end`` may itself be a schedule (or any callable ``step -> MF``): the ramp then interpolates
    towards ``end(t)`` and hands over to it after ``steps`` updates, e.g.
    ``ramp(0.9, by_world_size({1: 0.9, 8: 0.99}), 500)``.
    """

    def __init__(self, start: float, end, steps: int):
        self.start = check_mf("ramp start", start)
        if isinstance(end, (int, float)) and not isinstance(end, bool):
            self.end = check_mf("ramp end", end)
        else:
            self.end = as_schedule(end, "ramp end")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"ramp: steps must be an integer >= 0, got {steps!r}")
        self.steps = steps

    def value(self, step: int) -> float:
        end = self.end(step) if isinstance(self.end, MFSchedule) else self.end
        if step > self.steps:
            return end
        frac = (step - 1) / self.steps
        return self.start + (end - self.start) * frac

    def __repr__(self) -> str:
        return f"ramp({self.start}, {self.end!r}, steps={self.steps})"


class sequence(MFSchedule):
    """Schedules one after another: ``sequence([(n1, s1), (n2, s2), ..., (None, s_last)])``.

    Segment i runs for ``n_i`` updates and its schedule is called with the update number *within
    the segment* (1-based), so ``ramp`` and friends can be reused unchanged. The last segment's
    length may be None (forever); if it is a number, the last schedule keeps going past it.
    A float in place of a schedule means :class:`constant`.
    """

    def __init__(self, segments: Sequence[Tuple[Optional[int], object]]):
        segments = list(segments)
        if not segments:
            raise ValueError("sequence needs at least one (steps, schedule) segment")
        self.segments = []
        for i, seg in enumerate(segments):
            try:
                n, s = seg
            except (TypeError, ValueError):
                raise ValueError(f"sequence: segment {i} must be a pair (steps, schedule), got {seg!r}") from None
            last = i == len(segments) - 1
            if n is None:
                if not last:
                    raise ValueError(f"sequence: only the last segment may have steps=None (segment {i})")
            elif isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"sequence: segment {i} length must be an integer >= 1, got {n!r}")
            self.segments.append((n, as_schedule(s, f"sequence segment {i}")))

    def value(self, step: int) -> float:
        offset = 0
        for i, (n, s) in enumerate(self.segments):
            if n is None or step <= offset + n or i == len(self.segments) - 1:
                return s(step - offset)
            offset += n
        raise AssertionError("unreachable")  # pragma: no cover

    def __repr__(self) -> str:
        return "sequence([" + ", ".join(f"({n}, {s!r})" for n, s in self.segments) + "])"


class noise_adaptive(MFSchedule):
    """EXPERIMENT (fusedmf's, not from the papers): raise the MF as the per-rank batch falls below the
    measured gradient noise scale.

    ``noise`` is a :class:`fusedmf.noise.GradientNoiseScale` (fed by ``DistributedOptimizer(noise_scale=...)``).
    The rule is :class:`horizon` with the noise scale in place of the reference batch:

        1 − μ_target = (1 − mf_ref) · min(1, b / B_simple)**power,   clamped to [mf_ref, mf_max]

    i.e. while the per-rank batch b is at least the noise scale, gradients are signal-dominated and
    ``mf_ref`` is kept; below it (power 1) the momentum's averaging horizon 1/(1 − μ) grows like
    B_simple / b steps, so the samples one rank sees within the horizon stay B_simple / (1 − mf_ref).
    Why it might help: the papers' finding is that a larger MF helps as b shrinks at fixed B; B_simple
    says *how* small b is relative to the noise. Untested at scale: benchmarks/mf_experiment.py runs it
    next to the fixed schedules.

    Guards, so that an estimate does not make the MF jump: ``mf_ref`` until ``min_samples`` noise
    samples are in, and afterwards the MF moves by at most ``max_change`` per update towards the
    target. The estimate read is :meth:`~fusedmf.noise.GradientNoiseScale.settled_value` (all samples
    but the newest, which may still be on its way from the GPU): the same on every rank, so replicas
    stay identical. Stateful: call it with increasing update numbers (a repeated number returns the
    value it gave before, as after a skipped step).
    """

    def __init__(self, noise, batch_size_per_rank: Optional[int] = None, *, mf_ref: float = 0.9, power: float = 1.0,
                 mf_max: float = 0.995, min_samples: int = 20, max_change: float = 0.001):
        if not (hasattr(noise, "settled_value") and hasattr(noise, "settled_samples")):
            raise TypeError(f"noise_adaptive needs a fusedmf.noise.GradientNoiseScale, got {type(noise).__name__}")
        self.noise = noise
        b = noise.batch_size_per_rank if batch_size_per_rank is None else batch_size_per_rank
        if not (isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b > 0):
            raise ValueError(f"noise_adaptive: batch_size_per_rank must be a positive batch size, got {b!r}")
        self.b = b
        self.mf_ref = check_mf("mf_ref", mf_ref)
        self.mf_max = check_mf("mf_max", mf_max)
        if self.mf_max < self.mf_ref:
            raise ValueError(f"noise_adaptive: mf_max {mf_max} must be >= mf_ref {mf_ref}")
        if not (isinstance(power, (int, float)) and math.isfinite(power) and power >= 0):
            raise ValueError(f"noise_adaptive: power must be a finite number >= 0, got {power!r}")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
            raise ValueError(f"noise_adaptive: min_samples must be an integer >= 1, got {min_samples!r}")
        if not (isinstance(max_change, (int, float)) and max_change > 0):
            raise ValueError(f"noise_adaptive: max_change must be > 0, got {max_change!r}")
        self.power, self.min_samples, self.max_change = float(power), min_samples, float(max_change)
        self._last_step, self._mf = 0, self.mf_ref
        #: (update, B_simple read, target, MF) of the last call: log it next to the effective LR
        self.last: Optional[Tuple[int, Optional[float], float, float]] = None

    def target(self, b_simple: Optional[float]) -> float:
        """The MF the rule aims at for a noise scale (mf_ref when unknown)."""
        if b_simple is None or not b_simple > 0:
            return self.mf_ref
        ratio = min(1.0, self.b / b_simple)          # 0 for an infinite noise scale: mf_max
        raw = 1.0 - (1.0 - self.mf_ref) * ratio ** self.power
        return min(max(raw, self.mf_ref), self.mf_max)

    def value(self, step: int) -> float:
        if step == self._last_step:
            return self._mf
        if step < self._last_step:
            raise ValueError(f"noise_adaptive is stateful and must be called with increasing update numbers: "
                             f"got {step} after {self._last_step}")
        value = self.noise.settled_value()
        enough = self.noise.settled_samples() >= self.min_samples
        goal = self.target(value) if enough else self.mf_ref
        delta = max(-self.max_change, min(self.max_change, goal - self._mf))
        self._mf = min(max(self._mf + delta, self.mf_ref), self.mf_max)
        self._last_step = step
        self.last = (step, value, goal, self._mf)
        return self._mf

    def state_dict(self) -> dict:
        """The rule's own state (the MF it moved to and when): with the estimator's state (saved by
        DistributedOptimizer.state_dict) a resumed run continues bit-identically."""
        return {"last_step": self._last_step, "mf": self._mf, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        mf = check_mf("noise_adaptive state mf", state["mf"])
        self._last_step, self._mf = int(state["last_step"]), mf
        self.last = None if state["last"] is None else tuple(state["last"])

    def __repr__(self) -> str:
        return (f"noise_adaptive(b={self.b}, mf_ref={self.mf_ref}, power={self.power}, mf_max={self.mf_max}, "
                f"min_samples={self.min_samples}, max_change={self.max_change})")


def effective_lr(lr: float, mf: float, dampening: float = 0.0) -> float:
    """The step size a constant MF amounts to in the long run: ``lr * (1 - dampening) / (1 - mf)``.

    For heavy ball / NAG a gradient g applied at every step moves θ by η·(1 − τ)/(1 − μ)·g in the
    steady state. Log it every step when the MF changes (docs/algorithms.md).
    """
    lr = check_lr(lr)
    mf = check_mf("mf", mf)
    dampening = float(dampening)
    if not (math.isfinite(dampening) and 0.0 <= dampening <= 1.0):
        raise ValueError(f"dampening must be in [0, 1], got {dampening!r}")
    return lr * (1.0 - dampening) / (1.0 - mf)
