"""Worker finish times of the simulated asynchronous cluster: who reports next.

NOTE [worker time model]
SMEGA2's experiments (Cohen, Hakimi, Schuster, ICPP 2022; ``worker_selection.py`` of
github.com/rafi-cohen/SMEGA2) simulate asynchrony without clocks: worker ``i`` finishes its k-th
gradient at ``T_i,k = T_i,k-1 + D_i,k`` with ``T_i,0 = 0`` and iid durations
``D ~ Gamma(shape=100, scale=B/100)`` (mean B, the batch size; coefficient of variation 0.1), and
the next gradient the master applies is the one of the worker with the earliest pending finish
time. Each worker is thus a renewal process and the master sees their superposition in time order.

:class:`WorkerTimes` is that model with the pieces made explicit and configurable:

- the duration distribution: ``"gamma"`` (the paper's), or a heavy-tailed straggler model,
  ``"lognormal"`` (sigma) or ``"pareto"`` (tail index alpha > 1), each scaled to the same mean B;
- ``slow``: ``{worker: factor}`` multiplies that worker's durations (one slow worker);
- ``seed``: every draw comes from one ``random.Random(seed)`` in a fixed order (the N initial
  draws, then one per report), so a seed fixes the whole schedule on every machine. Python's
  generator is used so that the schedule depends on neither numpy nor torch's global RNG.

Ties (equal finish times, only possible with a degenerate distribution) go to the lower index.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

__all__ = ["WorkerTimes", "Report", "DISTRIBUTIONS"]

DISTRIBUTIONS = ("gamma", "lognormal", "pareto")


@dataclass(frozen=True)
class Report:
    """One gradient arriving at the master: which worker, when it finished, how long it took."""

    worker: int
    time: float
    duration: float


class WorkerTimes:
    """The order in which N simulated workers report (NOTE [worker time model]).

    ``mean`` is the mean duration (the paper: the batch size B); ``shape`` the Gamma shape (100:
    CV 0.1). Heavy tails: ``distribution="lognormal"`` with ``sigma`` (CV = sqrt(e^sigma² - 1)) or
    ``distribution="pareto"`` with ``alpha`` (> 1; the smaller, the heavier; infinite variance for
    alpha <= 2). ``slow={i: f}`` multiplies worker i's durations by f.

        times = WorkerTimes(8, mean=128, seed=0)
        r = times.next()          # Report(worker=..., time=..., duration=...)
    """

    def __init__(self, num_workers: int, *, mean: float = 128.0, shape: float = 100.0,
                 distribution: str = "gamma", sigma: float = 1.0, alpha: float = 1.5,
                 slow: Optional[Mapping[int, float]] = None, seed: int = 0):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"WorkerTimes: num_workers must be a positive int, got {num_workers!r}")
        if not mean > 0 or not math.isfinite(mean):
            raise ValueError(f"WorkerTimes: mean must be a positive finite duration, got {mean!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"WorkerTimes: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if distribution == "gamma" and not shape > 0:
            raise ValueError(f"WorkerTimes: shape must be > 0, got {shape!r}")
        if distribution == "lognormal" and not sigma > 0:
            raise ValueError(f"WorkerTimes: sigma must be > 0, got {sigma!r}")
        if distribution == "pareto" and not alpha > 1:
            raise ValueError(f"WorkerTimes: alpha must be > 1 (a finite mean), got {alpha!r}")
        slow = dict(slow or {})
        for w, f in slow.items():
            if not (isinstance(w, int) and 0 <= w < num_workers):
                raise ValueError(f"WorkerTimes: slow worker {w!r} is not in [0, {num_workers})")
            if not f > 0:
                raise ValueError(f"WorkerTimes: slow factor of worker {w} must be > 0, got {f!r}")
        self.num_workers, self.mean, self.shape = num_workers, float(mean), float(shape)
        self.distribution, self.sigma, self.alpha = distribution, float(sigma), float(alpha)
        self.slow: Dict[int, float] = slow
        self.seed = seed
        self._rng = random.Random(seed)
        self._heap: List[Tuple[float, int, float]] = []
        for w in range(num_workers):
            d = self.draw(w)
            heapq.heappush(self._heap, (d, w, d))

    def draw(self, worker: int) -> float:
        """One duration of ``worker`` from the model (consumes one draw of the seeded generator)."""
        rng = self._rng
        if self.distribution == "gamma":
            d = rng.gammavariate(self.shape, self.mean / self.shape)
        elif self.distribution == "lognormal":
            # E[exp(N(mu, s²))] = exp(mu + s²/2) = mean
            d = rng.lognormvariate(math.log(self.mean) - 0.5 * self.sigma ** 2, self.sigma)
        else:
            # paretovariate(a) has support [1, inf) and mean a / (a - 1)
            d = rng.paretovariate(self.alpha) * self.mean * (self.alpha - 1.0) / self.alpha
        return d * self.slow.get(worker, 1.0)

    def next(self) -> Report:
        """The worker with the earliest pending finish time; its next finish time is drawn."""
        t, w, d = heapq.heappop(self._heap)
        nd = self.draw(w)
        heapq.heappush(self._heap, (t + nd, w, nd))
        return Report(worker=w, time=t, duration=d)

    def pending(self) -> List[Tuple[int, float]]:
        """(worker, finish time) of every worker's gradient in flight, earliest first."""
        return [(w, t) for t, w, _ in sorted(self._heap)]

    def state_dict(self) -> dict:
        return {"rng": self._rng.getstate(), "heap": list(self._heap)}

    def load_state_dict(self, state: dict) -> None:
        heap = [tuple(x) for x in state["heap"]]
        if sorted(w for _, w, _ in heap) != list(range(self.num_workers)):
            raise ValueError(f"WorkerTimes.load_state_dict: the state is for {len(heap)} workers, "
                             f"this model has {self.num_workers}")
        self._rng.setstate(state["rng"])
        self._heap = heap
        heapq.heapify(self._heap)

    def __repr__(self) -> str:
        extra = {"gamma": f"shape={self.shape:g}", "lognormal": f"sigma={self.sigma:g}",
                 "pareto": f"alpha={self.alpha:g}"}[self.distribution]
        return (f"WorkerTimes({self.num_workers}, mean={self.mean:g}, distribution={self.distribution!r}, "
                f"{extra}, slow={self.slow}, seed={self.seed})")
