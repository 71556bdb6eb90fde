"""MF (momentum-like factor) schedules: callables ``step -> MF`` given to ``mf_schedule=``.

The optimizers call a schedule with the 1-based number of the update about to be applied
(torch's ``state["step"]`` after its increment); a step skipped for overflow does not count.
Any callable works; the classes here add a readable repr and validation.
"""

from __future__ import annotations

from .functional.scalars import check_mf


class MFSchedule:
    """Base class: subclasses implement ``value(step)``; calling validates the result."""

    def value(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        if step < 1:
            raise ValueError(f"MF schedules are called with the 1-based update number, got {step}")
        return check_mf(f"{type(self).__name__}({step})", self.value(step))


class constant(MFSchedule):
    """The same MF at every step (what torch.optim does)."""

    def __init__(self, mf: float):
        self.mf = check_mf("mf", mf)

    def value(self, step: int) -> float:
        return self.mf

    def __repr__(self) -> str:
        return f"constant({self.mf})"
