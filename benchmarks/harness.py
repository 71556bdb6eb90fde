"""The one benchmark harness (docs/performance.md, how benchmarks measure).

A benchmark is a list of :class:`Case` objects: a name, a setup factory that builds random inputs
and returns a zero-argument callable to time, and the bytes that callable must move per call.
:func:`run` times every case in one process, next to a copy-bandwidth measurement made in the same
run, and writes one JSON record (raw repeats, machine, versions, git commit, exact command) plus a
CSV, then prints a short table.

    cases = [Case("copy", setup=lambda: make_copy_fn(), bytes_per_call=2 * n * 4)]
    result = run("my_bench", cases, device="cpu", repeats=10, out_dir="benchmarks/out/my_bench")

Timing
- CPU: ``time.perf_counter`` around each synchronous call (several calls per repeat only when one
  call is shorter than ``min_repeat_s``); warm-up calls first.
- GPU: CUDA events around each call, the L2 cache flushed (a buffer larger than L2 overwritten)
  before each repeat, one ``torch.cuda.synchronize()`` before the events are read. The back-to-back
  wall time per call is measured as well (``wall_s``): when it exceeds the event median, the case
  is bound by the host (launch overhead, Python), which events alone would hide. Device time
  (events around CUDA-graph replay of the captured step: ``device_median_s``) and host time (wall
  time of the Python call: ``host_median_s``) are reported separately, NOTE [device and host time];
  on the CPU host time is the median and device time is None, with ``device_time_reason``.
- Statistics: median, p20, p80 of the repeats (linear interpolation); every raw repeat is kept.
- GB/s = ``bytes_per_call / median``; "% copy" compares it with the device-copy bandwidth measured
  by ``dst.copy_(src)`` on large tensors in the same run (read + write counted), before and after
  the cases (the higher median counts); "% rmw" with ``dst.add_(src)`` (see
  :func:`measure_copy_bandwidth` for why CPUs need both).
- Pairs: ``run(pairs=[(a, b)])`` times two cases again, interleaved call by call, and reports the
  median of the per-round ratios: the ratio that survives a shared machine's drifting load.

A setup factory raises :class:`Unavailable` (or the case carries ``skip``) to record the case as
skipped with its reason: nothing is silently dropped. A case that raises is recorded as "error"
(with its traceback) and the run goes on; a crash of the process leaves
``<name>.partial.json`` naming the case that was running. Inputs must be random, never zeros.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["Case", "Unavailable", "run", "run_pair", "measure_copy_bandwidth", "machine_info", "summarize",
           "quantile", "time_cpu", "time_cuda", "speedup", "progress", "PhaseTimer", "sync", "write_json",
           "build_model", "torchrun_env", "REPO"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout this harness sits in

SCHEMA_VERSION = 1


class Unavailable(Exception):
    """Raised by a setup factory when the case cannot run here; the message is the recorded reason."""


@dataclass
class Case:
    """One timed operation.

    name:            unique id (``group/implementation/config`` by convention, matched by --cases)
    setup:           builds random inputs and returns the zero-arg callable to time
    bytes_per_call:  bytes the operation must move per call (the floor's count, see docs/performance.md)
    info:            free-form fields recorded as-is (rule, backend, dtypes, ...)
    baseline:        name of another case; ``speedup`` = baseline median / this median
    check:           optional correctness check run before setup: returns a dict with at least
                     ``ok`` (bool); a failed check marks the case "incorrect" (it is still timed)
    skip:            a reason not to run this case at all (recorded, not dropped)
    """

    name: str
    setup: Callable[[], Callable[[], Any]]
    bytes_per_call: int
    info: dict = field(default_factory=dict)
    baseline: Optional[str] = None
    check: Optional[Callable[[], dict]] = None
    skip: Optional[str] = None


# ---------------------------------------------------------------------------------------- progress
def progress(iterable, total: Optional[int] = None, desc: str = ""):
    """tqdm if it is installed (no hard dependency), else a plain line per item on stderr."""
    try:
        from tqdm.auto import tqdm  # type: ignore
    except ImportError:
        return _PlainProgress(iterable, total, desc)
    return _tqdm_named(tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr))


def _tqdm_named(bar):
    for item in bar:
        bar.set_postfix_str(getattr(item, "name", ""))
        yield item


class _PlainProgress:
    def __init__(self, iterable, total, desc):
        self.iterable, self.total, self.desc = iterable, total, desc

    def __iter__(self):
        total = self.total if self.total is not None else "?"
        for i, item in enumerate(self.iterable, 1):
            label = getattr(item, "name", "")
            print(f"[{self.desc} {i}/{total}] {label}", file=sys.stderr, flush=True)
            yield item


# ---------------------------------------------------------------------------------------- statistics
def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    s = sorted(values)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(repeats_s: Sequence[float]) -> dict:
    """median, p20, p80, min, max and count of the repeats (seconds)."""
    s = sorted(repeats_s)
    return {"median_s": quantile(s, 0.5), "p20_s": quantile(s, 0.2), "p80_s": quantile(s, 0.8),
            "min_s": s[0] if s else math.nan, "max_s": s[-1] if s else math.nan, "n": len(s)}


# ---------------------------------------------------------------------------------------- timers
def time_cpu(fn: Callable[[], Any], *, warmup: int, repeats: int, min_repeat_s: float = 2e-3) -> dict:
    """Per-call seconds of a synchronous callable: warm-up, then ``repeats`` timed repeats.

    A repeat runs ``number`` calls, chosen after warm-up so that a repeat lasts at least
    ``min_repeat_s`` (timer resolution and call overhead stay negligible); per-call time is the
    repeat's time divided by ``number``.
    """
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        fn()
        t_last = time.perf_counter() - t0
    number = 1 if t_last >= min_repeat_s else math.ceil(min_repeat_s / max(t_last, 1e-9))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - t0) / number)
    return {"repeats_s": out, "calls_per_repeat": number, "timer": "time.perf_counter"}


_FLUSH: dict = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer at least twice the L2 cache (and >= 256 MiB) that is overwritten before each repeat."""
    key = str(device)
    if key not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
        nbytes = max(256 << 20, 2 * l2)
        _FLUSH[key] = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    return _FLUSH[key]


def time_cuda(fn: Callable[[], Any], *, warmup: int, repeats: int, flush_l2: bool = True,
              device: Optional[torch.device] = None, host_clock: Callable[[], float] = time.perf_counter,
              graph_timer: Optional[Callable[..., dict]] = None) -> dict:
    """Per-call seconds from CUDA events around each call, L2 flushed before each repeat, and the
    step's device and host time separately (NOTE [device and host time]).

    Also returns ``wall_s``: host wall time per call for ``repeats`` back-to-back calls (no flush),
    synchronised at both ends. wall_s well above the event median means the case is host-bound.
    """
    device = device or torch.device("cuda", torch.cuda.current_device())
    flush = _l2_flush_buffer(device) if flush_l2 else None
    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        if flush is not None:
            flush.fill_(i)  # a different value each time: no write can be elided
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    out = [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize(device)
    wall = (time.perf_counter() - t0) / repeats
    host = time_host_calls(fn, repeats=repeats, clock=host_clock, sync=lambda: torch.cuda.synchronize(device))
    dev = (graph_timer or time_graph_replay)(fn, repeats=repeats, device=device, flush=flush)
    return {"repeats_s": out, "calls_per_repeat": 1, "wall_s": wall,
            "timer": "cuda events around the Python call" + (" + L2 flush" if flush_l2 else ""),
            **host_fields(host), **dev}


# NOTE [device and host time]
# CUDA events recorded around a Python call (time_cuda's repeats_s, the "event span") count the host
# time spent inside the call whenever the device waits for it: a launch-bound step looks slow on the
# device, and a fast kernel hides behind slow Python. So the step is also timed two more ways:
#   device time  CUDA-graph replay of the captured step, events around g.replay(): the launches only,
#                no Python in between (device_repeats_s / device_median_s); None with device_time_reason
#                when the step cannot be captured (CPU-side work inside it, a sync) or on the CPU;
#   host time    wall time of the Python call itself, started on an idle stream and not waiting for
#                the device (host_repeats_s / host_median_s): what the host spends to issue one step.
# The target (docs/performance.md) is host time below device time: the host stays ahead of the device.
# On the CPU a step is synchronous: its wall time is both (repeats_s, host_*), device time is None.
def time_host_calls(fn: Callable[[], Any], *, repeats: int, clock: Callable[[], float] = time.perf_counter,
                    sync: Optional[Callable[[], None]] = None) -> list:
    """Seconds of each Python call of ``fn`` on ``clock``, ``sync()`` (if given) before each call and
    after it, outside the timed span."""
    out = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        t0 = clock()
        fn()
        out.append(clock() - t0)
    if sync is not None:
        sync()
    return out


def host_fields(host_repeats_s: Sequence[float]) -> dict:
    return {"host_repeats_s": list(host_repeats_s), "host_median_s": summarize(host_repeats_s)["median_s"],
            "host_timer": "time.perf_counter around the Python call"}


def no_device_time(reason: str) -> dict:
    return {"device_repeats_s": None, "device_median_s": None, "device_timer": None, "device_time_reason": reason}


def time_graph_replay(fn: Callable[[], Any], *, repeats: int, device: torch.device,
                      flush: Optional[torch.Tensor] = None) -> dict:
    """Device seconds per step: ``fn`` captured once in a CUDA graph, events around each replay."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # capture wants warm-up on a side stream (torch.cuda.graphs docs)
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize(device)
    except Exception as exc:  # the step cannot be captured: say so, do not guess a number
        torch.cuda.synchronize(device)
        return no_device_time(f"the step could not be captured in a CUDA graph: {type(exc).__name__}: {exc}")
    graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        if flush is not None:
            flush.fill_(i)
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize(device)
    out = [a.elapsed_time(b) * 1e-3 for a, b in zip(starts, ends)]
    del graph
    return {"device_repeats_s": out, "device_median_s": summarize(out)["median_s"],
            "device_timer": "cuda events around CUDA-graph replay of the step" + (" + L2 flush" if flush is not None
                                                                                    else ""),
            "device_time_reason": None}


def _time(fn, device: torch.device, warmup: int, repeats: int) -> dict:
    if device.type == "cuda":
        return time_cuda(fn, warmup=warmup, repeats=repeats, device=device)
    return cpu_timing(time_cpu(fn, warmup=warmup, repeats=repeats))


def cpu_timing(timing: dict) -> dict:
    """time_cpu's result with the host / device fields of NOTE [device and host time]: a CPU step is
    synchronous, so its host time is its time (repeats_s unchanged) and there is no device time."""
    return {**timing, **host_fields(timing["repeats_s"]),
            **no_device_time("CPU: the step runs synchronously on the host; its time is host time")}


# ---------------------------------------------------------------------------------------- copy bandwidth
def measure_copy_bandwidth(device: torch.device, *, nbytes: Optional[int] = None, warmup: int = 2,
                           repeats: int = 10, op: str = "copy") -> dict:
    """GB/s of a streaming op on two large fp32 tensors, counting each read and write once.

    op "copy": ``dst.copy_(src)`` (read + write), the reference of "% copy".
    op "rmw":  ``dst.add_(src)`` (read 2 + write 1): a read-modify-write stream like an optimizer
    update's, where every written line was also read. On CPUs a plain copy also reads each
    destination line into the cache before writing it (write-allocate), which the read + write
    count does not see; so a fused update can exceed 100% of "copy" there, and the "rmw" figure is
    the fairer ceiling. On GPUs the two agree closely.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_(-1.0, 1.0)
    dst = torch.empty_like(src).uniform_(-1.0, 1.0)
    if op == "copy":
        fn, moved, what = (lambda: dst.copy_(src)), 2 * n * 4, "dst.copy_(src), fp32"
    elif op == "rmw":
        # alternate the sign so that values stay bounded however many times it runs
        sign = [1.0]

        def fn():
            sign[0] = -sign[0]
            dst.add_(src, alpha=sign[0])

        moved, what = 3 * n * 4, "dst.add_(src), fp32"
    else:
        raise ValueError(f"op must be 'copy' or 'rmw', got {op!r}")
    timing = _time(fn, device, warmup, repeats)
    del src, dst
    stats = summarize(timing["repeats_s"])
    return {"op": what, "bytes_per_call": moved, "tensor_bytes": n * 4,
            "gbps": moved / stats["median_s"] / 1e9, **stats, **timing}


def _best_of_two(before: dict, after: dict) -> dict:
    best = dict(max(before, after, key=lambda c: c["gbps"]))
    best["measured"] = "the higher of the medians before and after the cases"
    best["gbps_before"], best["gbps_after"] = before["gbps"], after["gbps"]
    best["repeats_before_s"], best["repeats_after_s"] = before["repeats_s"], after["repeats_s"]
    return best


# ---------------------------------------------------------------------------------------- machine
def _run_cmd(args: Sequence[str], cwd: Optional[str] = None) -> Optional[str]:
    try:
        out = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git(repo_dir: str) -> dict:
    commit = _run_cmd(["git", "rev-parse", "HEAD"], cwd=repo_dir)
    status = _run_cmd(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir)
    return {"commit": commit or "unknown (no git repository or no commit yet)",
            "dirty": None if status is None else bool(status),
            "branch": _run_cmd(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=repo_dir)}


def _rel(path: str) -> str:
    """``path`` relative to the checkout when it lies inside it (results must not carry machine paths)."""
    full = os.path.realpath(path)
    root = os.path.realpath(REPO)
    if full == root:
        return "."
    return os.path.relpath(full, root) if full.startswith(root + os.sep) else path


def command(argv: Optional[Sequence[str]] = None) -> str:
    """The command that produced a result, as it would be typed in the checkout: ``python`` for the
    interpreter (its path is ``machine["python_executable"]``), ``-m torch.distributed.run ...`` for a
    torchrun rank, and every argument that names a path inside the checkout relative to it."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0] in ("-m", "-c"):
        pass
    elif argv:
        argv[0] = _rel(argv[0])
        mod = {"fusedmf/bench/__main__.py": ["-m", "fusedmf.bench"]}.get(argv[0])
        if mod:
            argv[:1] = mod
    args = []
    for a in argv:
        if "=" in a and a.startswith("--"):
            k, v = a.split("=", 1)
            args.append(f"{k}={_rel(v) if os.path.isabs(v) else v}")
        else:
            args.append(_rel(a) if os.path.isabs(a) else a)
    prefix = ["python"]
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        prefix += ["-m", "torch.distributed.run", f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', '?')}"]
    return shlex.join(prefix + args)


def _available_backends() -> dict:
    try:
        import fusedmf

        return {k: bool(v.available) for k, v in fusedmf.available_backends().items()}
    except Exception as exc:  # a benchmark of torch alone still records where it ran
        return {"error": f"{type(exc).__name__}: {exc}"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pkg_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def machine_info(device: torch.device) -> dict:
    """Everything needed to tell where and how a number was produced (provenance: the git commit and
    whether the tree was dirty, the command with paths relative to the checkout, versions, machine).
    Every result carries it as ``result["machine"]``, next to its own ``result["backends_used"]``."""
    device = torch.device(device)
    repo_dir = REPO
    info = {
        "utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command(),
        "cwd": _rel(os.getcwd()),
        "python_executable": sys.executable,
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _pkg_version("triton"),
        "fusedmf": _pkg_version("fusedmf"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "mem_total_gib": _mem_total_gib(),
        "loadavg_at_start": _loadavg(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                                            "TRITON_INTERPRET", "FUSEDMF_JIT", "FUSEDMF_CUDA", "FUSEDMF_CUDA_EMU")
                if k in os.environ},
        "backends_available": _available_backends(),
        "git": _git(repo_dir),
        "device": str(device),
    }
    try:
        import fusedmf

        info["fusedmf"] = info["fusedmf"] or getattr(fusedmf, "__version__", None)
    except Exception:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = _run_cmd(["nvidia-smi", f"--id={device.index or 0}",
                        "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                        "--format=csv,noheader"])
        info.update({
            "device_name": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "gpu_mem_gib": round(props.total_memory / 2**30, 1),
            "sm_count": props.multi_processor_count,
            "l2_cache_bytes": getattr(props, "L2_cache_size", None),
            "driver": smi.split(",")[0].strip() if smi else None,
            "nvidia_smi": smi,
            "cudnn": torch.backends.cudnn.version(),
        })
    else:
        info.update({"device_name": info["cpu_model"], "driver": None})
    return info


# ---------------------------------------------------------------------------------------- running
def speedup(records: dict, case: str, baseline: str) -> Optional[float]:
    """baseline median / case median, or None when either did not produce a timing."""
    a, b = records.get(case), records.get(baseline)
    if not a or not b or a.get("median_s") is None or b.get("median_s") is None:
        return None
    return b["median_s"] / a["median_s"]


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _loadavg() -> Optional[list]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _run_case(case: Case, device: torch.device, warmup: int, repeats: int) -> dict:
    rec: dict = {"name": case.name, "status": "ok", "reason": None, "bytes_per_call": case.bytes_per_call,
                 "baseline": case.baseline, "loadavg": _loadavg(),
                 **{f"info_{k}": v for k, v in case.info.items()}}
    if case.skip:
        rec.update(status="skipped", reason=case.skip)
        return rec
    fn = None
    try:
        if case.check is not None:
            t0 = time.perf_counter()
            check = case.check()
            rec["check_s"] = time.perf_counter() - t0
            rec["check"] = check
            if not check.get("ok", False):
                rec["status"] = "incorrect"
                rec["reason"] = f"correctness check failed: {check}"
        t0 = time.perf_counter()
        fn = case.setup()
        rec["setup_s"] = time.perf_counter() - t0
        timing = _time(fn, device, warmup, repeats)
        rec["case_wall_s"] = time.perf_counter() - t0
        used = getattr(fn, "backends_used", None)  # what ran, reported by the setup's callable
        rec["backends_used"] = used() if callable(used) else None
    except Unavailable as exc:
        rec.update(status="skipped", reason=str(exc))
        return rec
    except Exception as exc:  # recorded and reported; run() makes the exit status say so
        rec.update(status="error", reason=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc(limit=8))
        return rec
    finally:
        del fn
        _release(device)
    stats = summarize(timing["repeats_s"])
    rec.update(stats)
    rec.update(timing)
    rec["gbps"] = case.bytes_per_call / stats["median_s"] / 1e9 if stats["median_s"] > 0 else None
    dev = rec.get("device_median_s")
    rec["device_gbps"] = case.bytes_per_call / dev / 1e9 if dev else None
    return rec


def _contention(machine: dict, device: torch.device) -> Optional[str]:
    """A warning when other processes were busy on this machine's CPUs as the run started."""
    load = (machine.get("loadavg_at_start") or [0.0])[0]
    ncpu = machine.get("cpu_affinity") or machine.get("cpu_count") or 1
    if device.type == "cpu" and load > 0.5 * ncpu:
        return (f"the 1-minute load average was {load} on {ncpu} CPUs when the run started: other processes "
                "compete for the cores, and a thread that loses its core stalls every parallel region it is "
                "part of, so times and ratios here are not representative; rerun on an idle machine (or with "
                "fewer threads) before quoting them")
    return None


def _time_once(fn, device: torch.device) -> float:
    """Seconds of one call (GPU: events, L2 flushed first)."""
    if device.type == "cuda":
        _l2_flush_buffer(device).fill_(0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) * 1e-3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_pair(a: Case, b: Case, device: torch.device, *, warmup: int, rounds: int) -> dict:
    """Interleaved timing of two cases set up side by side: each round times one call of each, in
    alternating order, and the round's ratio b/a is kept. The median of those ratios survives load
    that drifts during a run (other processes on a shared machine), which a ratio of two medians
    taken minutes apart does not."""
    rec: dict = {"a": a.name, "b": b.name, "rounds": rounds, "loadavg": _loadavg()}
    fa = fb = None
    t0 = time.perf_counter()
    try:
        fa, fb = a.setup(), b.setup()
        for _ in range(max(warmup, 1)):
            fa()
            fb()
        ta, tb = [], []
        for r in range(rounds):
            order = ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta))
            for fn, sink in order:
                sink.append(_time_once(fn, device))
    except Unavailable as exc:
        rec.update(status="skipped", reason=str(exc))
        return rec
    except Exception as exc:
        rec.update(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=8))
        return rec
    finally:
        del fa, fb
        _release(device)
    ratios = sorted(y / x for x, y in zip(ta, tb))
    rec.update(status="ok", wall_s=time.perf_counter() - t0, a_s=ta, b_s=tb, a_median_s=summarize(ta)["median_s"],
               b_median_s=summarize(tb)["median_s"], speedup=quantile(ratios, 0.5),
               speedup_p20=quantile(ratios, 0.2), speedup_p80=quantile(ratios, 0.8))
    return rec


def _resolve_pair(pair, by_name: dict):
    """(a, b) where b may be a tuple of alternatives: the fastest of them that was timed."""
    a, b = pair
    if isinstance(b, (list, tuple)):
        timed = [n for n in b if by_name.get(n, {}).get("median_s") is not None]
        b = min(timed, key=lambda n: by_name[n]["median_s"]) if timed else b[0]
    return a, b


def run(bench: str, cases: Sequence[Case], *, device, repeats: int, warmup: int, out_dir: str,
        config: Optional[dict] = None, extra: Optional[dict] = None, copy_repeats: Optional[int] = None,
        pairs: Sequence[tuple] = (), pair_rounds: Optional[int] = None,
        analyze: Optional[Callable[[dict], dict]] = None, print_table: bool = True) -> dict:
    """Time every case, measure copy bandwidth in the same run, write JSON + CSV, print a table.

    Copy bandwidth is measured before and after the cases; the higher median is the reference for
    "% copy" (load from other processes only ever lowers it). ``pairs``: (a, b) case names to time
    again interleaved (:func:`run_pair`), b optionally a tuple of alternatives (the fastest timed
    one is used); pairs whose cases did not both run are recorded as skipped.
    ``analyze(result)`` may return extra fields (e.g. the comparisons a benchmark exists for); they
    are merged into the result before it is written. Returns the result dict (also written to
    ``<out_dir>/<bench>_<device>_<utc>.json``) with ``result["paths"]`` naming the files written.
    """
    device = torch.device(device)
    names = [c.name for c in cases]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"duplicate case names: {sorted(dupes)}")
    machine = machine_info(device)
    t_start = time.perf_counter()
    copy_repeats = copy_repeats or max(repeats, 5)
    copy_before = measure_copy_bandwidth(device, repeats=copy_repeats, warmup=warmup)
    rmw_before = measure_copy_bandwidth(device, repeats=copy_repeats, warmup=warmup, op="rmw")
    records = []
    # A crash inside a case (a segfault in a kernel) must still leave a record saying which case
    # was running: a partial file is rewritten before each case and removed at the end.
    partial = _base_path(out_dir, bench, device, machine["utc"]) + ".partial.json"
    for case in progress(cases, total=len(cases), desc=bench):
        _write_partial(partial, {"bench": bench, "machine": machine, "running": case.name, "cases": records})
        records.append(_run_case(case, device, warmup, repeats))
    by_name = {r["name"]: r for r in records}
    case_by_name = {c.name: c for c in cases}
    pair_records = []
    for pair in pairs:
        a, b = _resolve_pair(pair, by_name)
        missing = [n for n in (a, b) if by_name.get(n, {}).get("median_s") is None]
        if missing:
            why = "; ".join(f"{n}: " + (f"{by_name[n]['status']}: {by_name[n]['reason']}" if n in by_name
                                        else "not selected") for n in missing)
            pair_records.append({"a": a, "b": b, "status": "skipped", "reason": why})
            continue
        pair_records.append(run_pair(case_by_name[a], case_by_name[b], device, warmup=warmup,
                                     rounds=pair_rounds or max(repeats, 5)))
    copy_bw = _best_of_two(copy_before, measure_copy_bandwidth(device, repeats=copy_repeats, warmup=warmup))
    rmw_bw = _best_of_two(rmw_before, measure_copy_bandwidth(device, repeats=copy_repeats, warmup=warmup, op="rmw"))
    for r in records:
        if r.get("gbps") is not None:
            r["pct_copy_bw"] = 100.0 * r["gbps"] / copy_bw["gbps"]
            r["pct_rmw_bw"] = 100.0 * r["gbps"] / rmw_bw["gbps"]
        if r.get("baseline"):
            r["speedup"] = speedup(by_name, r["name"], r["baseline"])
    machine["loadavg_at_end"] = _loadavg()
    result = {
        "schema": SCHEMA_VERSION,
        "bench": bench,
        "machine": machine,
        "config": {"device": str(device), "repeats": repeats, "warmup": warmup, **(config or {})},
        "copy_bandwidth": copy_bw,
        "rmw_bandwidth": rmw_bw,
        "cases": records,
        "pairs": pair_records,
        "elapsed_s": None,
        **(extra or {}),
    }
    result.setdefault("backends_used", {r["name"]: r["backends_used"] for r in records
                                        if r.get("backends_used") is not None})
    result["contended"] = _contention(machine, device)
    if analyze is not None:
        result.update(analyze(result))
    result["elapsed_s"] = time.perf_counter() - t_start
    result["paths"] = write(result, out_dir)
    if os.path.exists(partial):
        os.remove(partial)
    if print_table:
        print(format_table(result))
    return result


# ---------------------------------------------------------------------------------------- output
_CSV_FIELDS = ("name", "status", "median_ms", "p20_ms", "p80_ms", "gbps", "pct_copy_bw", "pct_rmw_bw", "baseline",
               "speedup",
               "bytes_per_call", "n", "calls_per_repeat", "wall_ms", "device_median_ms", "device_gbps",
               "host_median_ms", "device_time_reason", "reason")


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1e3


def _csv_row(r: dict) -> dict:
    ms = lambda k: None if r.get(k) is None else r[k] * 1e3  # noqa: E731
    row = {"name": r["name"], "status": r["status"], "median_ms": ms("median_s"), "p20_ms": ms("p20_s"),
           "p80_ms": ms("p80_s"), "gbps": r.get("gbps"), "pct_copy_bw": r.get("pct_copy_bw"),
           "pct_rmw_bw": r.get("pct_rmw_bw"),
           "baseline": r.get("baseline"), "speedup": r.get("speedup"), "bytes_per_call": r.get("bytes_per_call"),
           "n": r.get("n"), "calls_per_repeat": r.get("calls_per_repeat"), "wall_ms": ms("wall_s"),
           "device_median_ms": ms("device_median_s"), "device_gbps": r.get("device_gbps"),
           "host_median_ms": ms("host_median_s"), "device_time_reason": r.get("device_time_reason"),
           "reason": r.get("reason")}
    row.update({k: v for k, v in r.items() if k.startswith("info_")})
    return row


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return repr(o)


def _base_path(out_dir: str, bench: str, device, utc: str) -> str:
    stamp = utc.replace("-", "").replace(":", "")
    return os.path.join(out_dir, f"{bench}_{torch.device(device).type}_{stamp}")


def _write_partial(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({**state, "partial": True}, f, indent=1, default=_json_default)


def _check_schema(result: dict) -> None:
    """One report schema: every result says what it measured, where and how (machine: provenance), and
    which fusedmf backends actually ran (a fallback to the reference must show in the record)."""
    missing = [k for k in ("bench", "machine", "config", "backends_used") if k not in result]
    if missing:
        raise ValueError(f"benchmark result lacks {missing} (see benchmarks/harness.py: _check_schema)")


def write(result: dict, out_dir: str) -> dict:
    _check_schema(result)
    os.makedirs(out_dir, exist_ok=True)
    base = _base_path(out_dir, result["bench"], result["config"]["device"], result["machine"]["utc"])
    paths = {"json": base + ".json", "csv": base + ".csv"}
    with open(paths["json"], "w") as f:
        json.dump({**result, "paths": paths}, f, indent=1, default=_json_default)
        f.write("\n")
    rows = [_csv_row(r) for r in result["cases"]]
    fields = list(_CSV_FIELDS) + sorted({k for row in rows for k in row if k not in _CSV_FIELDS})
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return paths


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def _bw_line(label: str, bw: dict) -> str:
    return (f"{label}: {bw['gbps']:.1f} GB/s [p20 {bw['bytes_per_call'] / bw['p80_s'] / 1e9:.1f}, "
            f"p80 {bw['bytes_per_call'] / bw['p20_s'] / 1e9:.1f}; before {bw.get('gbps_before', bw['gbps']):.1f}, "
            f"after {bw.get('gbps_after', bw['gbps']):.1f}]")


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"{result['bench']} on {m['device_name']} ({result['config']['device']}, torch {m['torch']}, "
        f"{m['torch_threads']} threads, git {str(m['git']['commit'])[:12]}, "
        f"load avg {m.get('loadavg_at_start')} -> {m.get('loadavg_at_end')})",
        _bw_line("copy bandwidth, dst.copy_(src), read+write", result["copy_bandwidth"]),
    ]
    if result.get("rmw_bandwidth"):
        lines.append(_bw_line("rmw bandwidth, dst.add_(src), 2 reads+write", result["rmw_bandwidth"]))
    if result.get("contended"):
        lines.append(f"WARNING: {result['contended']}")
    rows = [r for r in result["cases"] if r.get("median_s") is not None]
    if rows:
        width = max(len(r["name"]) for r in rows)
        show_wall = any(r.get("wall_s") is not None for r in rows)
        # NOTE [device and host time]: only where a device ran (on the CPU both are the median)
        show_dev = any(r.get("device_median_s") is not None or r.get("wall_s") is not None for r in rows)
        header = (f"{'case':<{width}}  {'median ms':>9}  {'p20-p80 ms':>17}  {'GB/s':>7}  {'%copy':>6}  {'%rmw':>6}  "
                  f"{'speedup':>7}" + ("  wall ms" if show_wall else "")
                  + ("  device ms  host ms" if show_dev else ""))
        lines += [header, "-" * len(header)]
        for r in rows:
            spread = f"{r['p20_s'] * 1e3:.3f}-{r['p80_s'] * 1e3:.3f}"
            flag = " !" if r["status"] != "ok" else ""
            wall = r.get("wall_s")
            lines.append(
                f"{r['name']:<{width}}  {r['median_s'] * 1e3:>9.3f}  {spread:>17}  {_fmt(r.get('gbps'), '7.2f'):>7}  "
                f"{_fmt(r.get('pct_copy_bw'), '6.1f'):>6}  {_fmt(r.get('pct_rmw_bw'), '6.1f'):>6}  "
                f"{(_fmt(r.get('speedup'), '.2f') + 'x') if r.get('speedup') else '-':>7}"
                + (f"  {_fmt(None if wall is None else wall * 1e3, '7.3f'):>7}" if show_wall else "")
                + (f"  {_fmt(_ms(r.get('device_median_s')), '9.3f'):>9}  {_fmt(_ms(r.get('host_median_s')), '7.3f'):>7}"
                   if show_dev else "") + flag)
        if show_dev:
            lines.append("median = CUDA events around the Python call; device = events around CUDA-graph replay of the "
                         "step (launches only; - where it cannot be captured, see device_time_reason); host = wall "
                         "time of the Python call on an idle stream")
        lines.append("GB/s = bytes the operation must move / median; speedup = the baseline's median / this median "
                     "(baseline: " + ", ".join(sorted({r['baseline'] for r in rows if r.get('baseline')})) + ")")
    for p in result.get("pairs", []):
        if p["status"] == "ok":
            lines.append(f"interleaved x{p['rounds']}: {p['a']} vs {p['b']}: speedup {p['speedup']:.2f}x "
                         f"[p20 {p['speedup_p20']:.2f}, p80 {p['speedup_p80']:.2f}]")
        else:
            lines.append(f"interleaved: {p['a']} vs {p['b']}: {p['status']} (a case was not timed)"
                         if p["status"] == "skipped" else f"interleaved: {p['a']} vs {p['b']}: {p['status']}: "
                         f"{p['reason']}")
    not_run = [r for r in result["cases"] if r.get("median_s") is None]
    if not_run:
        lines.append(f"not timed ({len(not_run)}):")
        by_reason: dict = {}
        for r in not_run:
            by_reason.setdefault(f"{r['status']}: {r['reason']}", []).append(r["name"])
        for reason, names in by_reason.items():
            lines.append(f"  {reason}")
            lines.append(f"    {', '.join(names)}")
    for r in result["cases"]:
        if r["status"] == "incorrect":
            lines.append(f"  ! {r['name']}: {r['reason']}")
    lines.append(f"wrote {result['paths']['json']} and .csv ({result['elapsed_s']:.1f} s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- training-step drivers
def sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Marks on the host clock (CPU) or CUDA events (GPU), read after one synchronisation."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list = []

    def mark(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list:
        sync(self.device)
        if self.device.type == "cuda":
            return [a.elapsed_time(b) * 1e-3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def build_model(name: str, num_classes: int = 1000, *, width: Optional[int] = None,
                depth: Optional[int] = None) -> nn.Module:
    """Every benchmark's model, by name: "resnet18" / "resnet50" / "resnet<depth>"; "small" (one basic
    block per stage, base width ``width`` or 16) and "tiny" (width 8) for CPUs; "mlp" (``depth``
    Linear(width, width) + ReLU layers). Seed with torch.manual_seed before calling for a fixed init."""
    from fusedmf.models import resnet

    if name == "mlp":
        if not width or not depth:
            raise ValueError(f"build_model('mlp') needs width and depth, got width={width!r}, depth={depth!r}")
        layers: list = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        return nn.Sequential(*layers)
    if name in ("small", "tiny"):
        return resnet(blocks=(1, 1, 1, 1), width=width or (16 if name == "small" else 8), bottleneck=False,
                      num_classes=num_classes)
    if name.startswith("resnet") and name[len("resnet"):].isdigit():
        return resnet(int(name[len("resnet"):]), num_classes=num_classes)
    raise ValueError(f"unknown model {name!r} (resnet18, resnet50, resnet<depth>, small, tiny, mlp)")


def torchrun_env() -> Optional[dict]:
    """rank / world size / local rank when started by torchrun with more than one rank, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world <= 1:
        return None
    return {"rank": int(os.environ["RANK"]), "world_size": world,
            "local_rank": int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
            "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", world))}


def write_json(result: dict, out_dir: str, stem: str, *, timestamp: bool = True) -> str:
    """``<out_dir>/<stem>_<utc>.json`` (``<stem>.json`` without ``timestamp``) for the benchmarks that
    are not lists of :class:`Case`; the same schema as :func:`write`."""
    _check_schema(result)
    os.makedirs(out_dir, exist_ok=True)
    stamp = "_" + result["machine"]["utc"].replace("-", "").replace(":", "") if timestamp else ""
    path = os.path.join(out_dir, f"{stem}{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
        f.write("\n")
    return path
