"""Asynchronous training simulated in one process, as in SMEGA2's experiments.

NOTE [simulated asynchrony]
N workers, each with its own copy of the weights; a :class:`~fusedmf.asynchronous.WorkerTimes`
model says which one reports next (NOTE [worker time model]). One simulated step:

    r = next reporting worker
    model params <- worker r's copy        (the master's weights are stashed)
    the caller computes a gradient on its next minibatch (forward + backward into .grad)
    model params <- the master's weights
    optimizer.step()                       (one master step on that stale gradient)
    worker r's copy <- optimizer.estimate()  (SMEGA2: the look-ahead; baselines: what they send)

which is the loop of the reference code (trainer.py + simulator.py of rafi-cohen/SMEGA2). The
model's parameters are the optimizer's (the master's); the worker copies live here. Worker
copies start equal to the initial params. Buffers (batch-norm running statistics) are not
copied: all workers share the model's, as in the reference. The staleness of a step is the
number of master steps taken since the reporting worker's copy was written (N − 1 every step
for a perfect round robin).

Determinism: the worker order is a function of the time model's seed alone; given the same data
order and initial weights, a run is reproduced bit for bit (on one machine and backend).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .timing import Report, WorkerTimes

Tensor = torch.Tensor

__all__ = ["Simulator", "master_step", "check_num_workers"]


def check_num_workers(optimizer, n: int, who: str) -> None:
    """An optimizer that counts its workers (``num_workers``, as an attribute or in any param
    group: SMEGA2's momentum cycle, DANA-Zero's buffers) must count the ``n`` there are."""
    counts = {getattr(optimizer, "num_workers", None)} | {g.get("num_workers") for g in optimizer.param_groups}
    counts.discard(None)
    wrong = sorted(c for c in counts if c != n)
    if wrong:
        raise ValueError(f"{who}: the optimizer is set up for num_workers={wrong[0]}, there are {n} workers")


def master_step(optimizer, worker: int, **kwargs):
    """``optimizer.step(**kwargs)``, telling the optimizers that keep per-worker state
    (``needs_worker = True``, e.g. DANA-Zero) which worker the gradient came from."""
    if getattr(optimizer, "needs_worker", False):
        return optimizer.step(worker=worker, **kwargs)
    return optimizer.step(**kwargs)


class Simulator:
    """N simulated asynchronous workers around one master optimizer (NOTE [simulated asynchrony]).

        times = WorkerTimes(8, mean=128, seed=0)          # the paper's Gamma(100, B/100)
        sim = Simulator(opt, times)                       # opt: SMEGA2 or a baseline over model.parameters()
        for x, y in batches:
            report = sim.begin()                          # model params = that worker's stale copy
            opt.zero_grad(); loss_fn(model(x), y).backward()
            sim.finish()                                  # master step, then the worker's copy <- estimate

    or ``sim.step(compute)`` with ``compute(report)`` doing the zero_grad/forward/backward.
    ``optimizer`` needs ``step(grads=..., grad_scale=..., found_inf=...)`` and
    ``estimate(out=...)`` (SMEGA2, :class:`ASGD`, :class:`DANAZero`). An optimizer with a
    ``num_workers`` attribute must agree with the time model's.
    """

    def __init__(self, optimizer, times: WorkerTimes):
        if not isinstance(times, WorkerTimes):
            raise TypeError(f"Simulator: times must be a fusedmf.asynchronous.WorkerTimes, got {type(times).__name__}")
        if not callable(getattr(optimizer, "estimate", None)):
            raise TypeError(f"Simulator: the optimizer ({type(optimizer).__name__}) has no estimate(); use SMEGA2, "
                            "ASGD or DANAZero")
        check_num_workers(optimizer, times.num_workers, "Simulator")
        self.optimizer, self.times = optimizer, times
        self.num_workers = times.num_workers
        self.params: List[Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
        with torch.no_grad():
            self.worker_weights: List[List[Tensor]] = [[p.detach().clone() for p in self.params]
                                                       for _ in range(self.num_workers)]
            self._stash = [torch.empty_like(p) for p in self.params]
        self.written_at = [0] * self.num_workers    # master step at which each worker's copy was written
        self.steps = 0                              # master steps taken
        self.current: Optional[Report] = None
        self.history: List[Report] = []             # every report, in order
        self.staleness: List[int] = []              # per master step

    @torch.no_grad()
    def begin(self) -> Report:
        """Pick the next reporting worker and load its copy into the params (master stashed)."""
        if self.current is not None:
            raise RuntimeError("Simulator.begin: the previous step was not finished (call finish())")
        report = self.times.next()
        for s, p, w in zip(self._stash, self.params, self.worker_weights[report.worker]):
            s.copy_(p)
            p.copy_(w)
        self.current = report
        return report

    @torch.no_grad()
    def finish(self, **step_kwargs) -> Report:
        """Restore the master's weights, take one master step on the gradient just computed (in
        ``.grad``, or ``grads=``), write the reporting worker's copy from ``estimate()``."""
        report = self.current
        if report is None:
            raise RuntimeError("Simulator.finish: no step in progress (call begin() first)")
        for s, p in zip(self._stash, self.params):
            p.copy_(s)
        self.current = None
        master_step(self.optimizer, report.worker, **step_kwargs)
        self.steps += 1
        self.staleness.append(self.steps - 1 - self.written_at[report.worker])
        self.optimizer.estimate(out=self.worker_weights[report.worker])
        self.written_at[report.worker] = self.steps
        self.history.append(report)
        return report

    def step(self, compute: Callable[[Report], object], **step_kwargs):
        """begin(), ``compute(report)`` (zero_grad, forward, backward; its result is returned), finish()."""
        report = self.begin()
        try:
            out = compute(report)
        except BaseException:
            with torch.no_grad():                   # leave the master's weights in place
                for s, p in zip(self._stash, self.params):
                    p.copy_(s)
            self.current = None
            raise
        self.finish(**step_kwargs)
        return out

    def state_dict(self) -> dict:
        """Worker copies, the time model's generator and schedule, counters (not the optimizer's
        state: save ``optimizer.state_dict()`` beside it)."""
        if self.current is not None:
            raise RuntimeError("Simulator.state_dict: a step is in progress (call finish() first)")
        return {"times": self.times.state_dict(), "worker_weights": [[w.clone() for w in ws] for ws in self.worker_weights],
                "written_at": list(self.written_at), "steps": self.steps, "staleness": list(self.staleness),
                "history": [(r.worker, r.time, r.duration) for r in self.history]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        ww = state["worker_weights"]
        if len(ww) != self.num_workers or any(len(ws) != len(self.params) for ws in ww):
            raise ValueError(f"Simulator.load_state_dict: the state has {len(ww)} worker copies, this simulator "
                             f"has {self.num_workers} workers of {len(self.params)} params")
        for ws, src in zip(self.worker_weights, ww):
            for i, (w, s) in enumerate(zip(ws, src)):
                if w.shape != s.shape:
                    raise ValueError(f"Simulator.load_state_dict: worker weight {i} has shape {list(s.shape)}, "
                                     f"param {i} has {list(w.shape)}")
        self.times.load_state_dict(state["times"])
        for ws, src in zip(self.worker_weights, ww):
            for w, s in zip(ws, src):
                w.copy_(s)
        self.written_at, self.steps = list(state["written_at"]), int(state["steps"])
        self.staleness = list(state["staleness"])
        self.history = [Report(*r) for r in state["history"]]
