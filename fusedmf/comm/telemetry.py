"""Per-step communication telemetry: when each bucket became ready, when its allreduce started and
finished, how many bytes it carried, and how much communication backward did not hide.

Times are seconds on ``time.perf_counter``'s clock (CLOCK_MONOTONIC on Linux, shared by every
process of a machine, so the ranks of one node line up in a merged timeline). On GPUs the marks are
CUDA events, turned into the same clock through one anchor (an event whose host time is known,
taken with one synchronisation when telemetry is switched on); reading a step's record waits for its
events, so the records of GPU steps are resolved lazily, when they are read, never inside ``step()``.

The timeline is written in the Chrome trace event format, the format ``torch.profiler`` exports
(``prof.export_chrome_trace``): open it in Perfetto (ui.perfetto.dev) or chrome://tracing, alone or
next to a profiler trace. The step's phases are also ``torch.profiler.record_function`` ranges
(``fusedmf.pack``, ``fusedmf.allreduce_launch``, ``fusedmf.wait``, ``fusedmf.update``) and, on GPUs, NVTX
ranges, so Nsight Systems and torch.profiler show them without this module.

"Exposed communication" of a step is ``max(0, last allreduce end - backward end)``: the part of the
communication that backward did not hide. Backward's end is marked by a callback the autograd engine
runs when the backward pass that communicates finishes; backward's start by the first gradient hook
of that pass (the first parameter gradient, a little after the true start of backward).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import torch


@dataclass
class BucketTiming:
    bucket: int
    num_params: int
    numel: int
    dtype: str
    bytes: int                       # payload of the allreduce (the padded flat buffer)
    ready: Optional[float] = None    # its last gradient arrived (or the end-of-backward flush)
    packed: Optional[float] = None   # the pack launch returned (CPU) / finished (GPU)
    start: Optional[float] = None    # allreduce launched
    end: Optional[float] = None      # allreduce finished
    in_backward: bool = False        # launched from a gradient hook, i.e. while backward ran

    @property
    def comm_s(self) -> Optional[float]:
        return None if self.start is None or self.end is None else self.end - self.start


@dataclass
class StepTelemetry:
    step: int                        # 0-based count of DistributedOptimizer.step() calls
    rank: int
    world_size: int
    backend: str                     # the process group's backend ("gloo", "nccl", "none")
    backward_start: Optional[float] = None
    backward_end: Optional[float] = None
    step_start: Optional[float] = None
    wait_end: Optional[float] = None
    update_end: Optional[float] = None
    skipped: Optional[bool] = None
    buckets: List[BucketTiming] = field(default_factory=list)
    # what the step communicated: "gradient allreduce" (DistributedOptimizer, LocalSGD's warm-up), or
    # LocalSGD's "local step" (nothing) / "model average (global)" / "model average (group of k)";
    # for the last two, wait_end marks the end of the local update and update_end that of the average
    kind: str = "gradient allreduce"

    @property
    def bytes_sent(self) -> int:
        """Payload bytes allreduced by this rank in this step (all buckets)."""
        return sum(b.bytes for b in self.buckets)

    @property
    def wire_bytes(self) -> float:
        """Bytes each rank sends with a ring allreduce: 2 (N - 1) / N times the payload."""
        n = self.world_size
        return 0.0 if n <= 1 else 2.0 * (n - 1) / n * self.bytes_sent

    @property
    def average_s(self) -> Optional[float]:
        """LocalSGD: time of the model average (pack, allreduce, apply) of this step, None if it had none."""
        if not self.kind.startswith("model average") or self.wait_end is None or self.update_end is None:
            return None
        return self.update_end - self.wait_end

    @property
    def comm_end(self) -> Optional[float]:
        ends = [b.end for b in self.buckets if b.end is not None]
        return max(ends) if ends else None

    @property
    def exposed_comm_s(self) -> Optional[float]:
        end = self.comm_end
        ref = self.backward_end if self.backward_end is not None else self.step_start
        if end is None or ref is None:
            return None
        return max(0.0, end - ref)

    @property
    def overlapped(self) -> bool:
        """Whether some allreduce started before backward ended."""
        return self.backward_end is not None and any(
            b.start is not None and b.start < self.backward_end for b in self.buckets)

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(bytes_sent=self.bytes_sent, wire_bytes=self.wire_bytes, comm_end=self.comm_end, average_s=self.average_s,
                 exposed_comm_s=self.exposed_comm_s, overlapped=self.overlapped)
        return d


# ------------------------------------------------------------------------------------------ clocks
class _HostClock:
    """Marks are perf_counter floats."""

    def mark(self):
        return time.perf_counter()

    def resolve(self, mark) -> Optional[float]:
        return mark


class _CudaClock:
    """Marks are CUDA events on the current stream; one anchor maps them onto perf_counter."""

    def __init__(self, device: torch.device):
        self.device = device
        torch.cuda.synchronize(device)
        self._anchor = torch.cuda.Event(enable_timing=True)
        self._anchor.record(torch.cuda.current_stream(device))
        self._anchor.synchronize()
        self._anchor_host = time.perf_counter()

    def mark(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def resolve(self, mark) -> Optional[float]:
        if mark is None or isinstance(mark, float):
            return mark
        mark.synchronize()
        return self._anchor_host + self._anchor.elapsed_time(mark) * 1e-3


def _nvtx():
    return torch.cuda.nvtx if torch.cuda.is_available() else None


class CommTelemetry:
    """Collects the marks of each step and keeps the last ``history`` steps as :class:`StepTelemetry`."""

    def __init__(self, *, rank: int, world_size: int, backend: str, device: torch.device, history: int = 100):
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.clock = _CudaClock(device) if device.type == "cuda" else _HostClock()
        self._raw: deque = deque(maxlen=history)      # (StepTelemetry with marks, resolved?)
        self._current: Optional[StepTelemetry] = None
        self._steps = 0
        self._nvtx_ranges: Dict[int, Any] = {}

    # ------------------------------------------------------------------ recording (called by comm)
    def _cur(self, buckets) -> StepTelemetry:
        if self._current is None:
            self._current = StepTelemetry(step=self._steps, rank=self.rank, world_size=self.world_size,
                                          backend=self.backend)
            self._current.buckets = [BucketTiming(bucket=b.index, num_params=len(b.params), numel=b.numel,
                                                  dtype=str(b.dtype).replace("torch.", ""), bytes=b.nbytes)
                                     for b in buckets]
        return self._current

    def backward_start(self, buckets) -> None:
        rec = self._cur(buckets)
        rec.backward_start = self.clock.mark()

    def backward_end(self, buckets) -> None:
        self._cur(buckets).backward_end = self.clock.mark()

    def bucket_ready(self, buckets, k: int) -> None:
        self._cur(buckets).buckets[k].ready = self.clock.mark()

    def bucket_packed(self, buckets, k: int) -> None:
        self._cur(buckets).buckets[k].packed = self.clock.mark()

    def bucket_launched(self, buckets, k: int, work, in_backward: bool) -> None:
        timing = self._cur(buckets).buckets[k]
        timing.start = self.clock.mark()
        timing.in_backward = in_backward
        nvtx = _nvtx()
        range_id = nvtx.range_start(f"fusedmf allreduce bucket {k}") if nvtx is not None else None
        if work is None:                    # world size 1: nothing to wait for
            timing.end = timing.start
            if range_id is not None:
                nvtx.range_end(range_id)
            return
        clock = self.clock

        def done(_fut):
            # runs when the allreduce completes (on GPUs: on a stream that waits for it)
            timing.end = clock.mark()
            if range_id is not None:
                nvtx.range_end(range_id)

        work.get_future().add_done_callback(done)

    def step_start(self, buckets, kind: Optional[str] = None, mark=None) -> None:
        """``kind``: see StepTelemetry.kind; ``mark``: a clock mark taken earlier (default: now)."""
        rec = self._cur(buckets)
        rec.step_start = self.clock.mark() if mark is None else mark
        if kind is not None:
            rec.kind = kind

    def wait_end(self, buckets) -> None:
        self._cur(buckets).wait_end = self.clock.mark()

    def step_end(self, buckets, skipped_fn) -> None:
        rec = self._cur(buckets)
        rec.update_end = self.clock.mark()
        self._raw.append([rec, skipped_fn, False])
        self._current = None
        self._steps += 1

    def discard_round(self) -> None:
        """A round drained without a step (zero_grad in the middle of a step): record nothing."""
        self._current = None

    # ------------------------------------------------------------------ reading
    def _resolve(self, entry) -> StepTelemetry:
        rec, skipped_fn, done = entry
        if not done:
            r = self.clock.resolve
            for name in ("backward_start", "backward_end", "step_start", "wait_end", "update_end"):
                setattr(rec, name, r(getattr(rec, name)))
            for b in rec.buckets:
                b.ready, b.packed, b.start, b.end = r(b.ready), r(b.packed), r(b.start), r(b.end)
            rec.skipped = skipped_fn()
            entry[1], entry[2] = None, True
        return rec

    @property
    def steps(self) -> List[StepTelemetry]:
        """The recorded steps, oldest first (reading may wait for the GPU)."""
        return [self._resolve(e) for e in self._raw]

    def last(self) -> Optional[StepTelemetry]:
        return self._resolve(self._raw[-1]) if self._raw else None

    def clear(self) -> None:
        self._raw.clear()

    def summary(self) -> Dict[str, Any]:
        """Medians over the recorded steps: exposed communication, total comm time, bytes per step."""
        steps = self.steps
        if not steps:
            return {"steps": 0}

        def median(xs):
            xs = sorted(x for x in xs if x is not None)
            return xs[len(xs) // 2] if xs else None

        return {
            "steps": len(steps),
            "buckets": len(steps[-1].buckets),
            "bytes_per_step": steps[-1].bytes_sent,
            "median_exposed_comm_s": median(s.exposed_comm_s for s in steps),
            "median_backward_s": median(None if s.backward_start is None or s.backward_end is None
                                        else s.backward_end - s.backward_start for s in steps),
            "median_wait_s": median(None if s.wait_end is None else s.wait_end - s.step_start for s in steps),
            "median_update_s": median(None if s.update_end is None else s.update_end - s.wait_end for s in steps),
            "mean_bytes_per_step": sum(s.bytes_sent for s in steps) / len(steps),
            "median_average_s": median(s.average_s for s in steps),
            "overlapped_steps": sum(s.overlapped for s in steps),
        }

    def to_chrome_trace(self, path: Optional[str] = None, steps: Optional[Iterable[StepTelemetry]] = None) -> dict:
        """The recorded steps as a Chrome trace (dict); also written to ``path`` when given."""
        trace = chrome_trace(self.steps if steps is None else steps)
        if path is not None:
            write_chrome_trace(path, trace)
        return trace


# ------------------------------------------------------------------------------------------ traces
_LANES = {"backward": 0, "step": 1, "pack": 2}
_ALLREDUCE_LANE0 = 10


def chrome_trace(steps: Iterable[StepTelemetry]) -> dict:
    """Chrome trace events (``ph: "X"``, microseconds) for steps of one or more ranks.

    One process per rank; threads: "backward" (first gradient hook to the end of backward), "step"
    (waiting for communication, the update), "pack" (one range per bucket) and one
    "allreduce bucket k" thread per bucket, so concurrent allreduces do not nest.
    """
    events: List[dict] = []
    named: set = set()

    def lane(pid: int, tid: int, name: str) -> None:
        if (pid, tid) not in named:
            named.add((pid, tid))
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})

    def span(pid, tid, name, t0, t1, args=None):
        if t0 is None or t1 is None:
            return
        events.append({"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": t0 * 1e6,
                       "dur": max(0.0, t1 - t0) * 1e6, "cat": "fusedmf.comm", "args": args or {}})

    for s in steps:
        pid = s.rank
        if (pid, -1) not in named:
            named.add((pid, -1))
            events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"rank {s.rank}"}})
            events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": s.rank}})
        lane(pid, _LANES["backward"], "backward")
        lane(pid, _LANES["step"], "step")
        lane(pid, _LANES["pack"], "pack")
        span(pid, _LANES["backward"], f"backward (step {s.step})", s.backward_start, s.backward_end)
        if s.kind == "gradient allreduce":
            span(pid, _LANES["step"], "wait for allreduce", s.step_start, s.wait_end,
                 {"step": s.step, "exposed_comm_ms": None if s.exposed_comm_s is None else s.exposed_comm_s * 1e3})
            span(pid, _LANES["step"], "fused update" + (" (skipped)" if s.skipped else ""), s.wait_end, s.update_end,
                 {"step": s.step, "skipped": s.skipped})
        else:   # LocalSGD: the local update, then (every period-th step) the model average
            span(pid, _LANES["step"], "local update" + (" (skipped)" if s.skipped else ""), s.step_start, s.wait_end,
                 {"step": s.step, "skipped": s.skipped})
            if s.kind != "local step":
                span(pid, _LANES["step"], s.kind, s.wait_end, s.update_end,
                     {"step": s.step, "bytes": s.bytes_sent})
        for b in s.buckets:
            tid = _ALLREDUCE_LANE0 + b.bucket
            lane(pid, tid, f"allreduce bucket {b.bucket}")
            span(pid, _LANES["pack"], f"pack bucket {b.bucket}", b.ready, b.packed, {"step": s.step})
            span(pid, tid, f"allreduce bucket {b.bucket}", b.start, b.end,
                 {"step": s.step, "bytes": b.bytes, "dtype": b.dtype, "params": b.num_params,
                  "in_backward": b.in_backward})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def merge_chrome_traces(traces: Iterable[dict]) -> dict:
    """One timeline from the traces of several ranks (each rank is its own process row)."""
    events: List[dict] = []
    for t in traces:
        events.extend(t["traceEvents"])
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str, trace: dict) -> None:
    with open(path, "w") as f:
        json.dump(trace, f)
