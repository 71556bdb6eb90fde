"""Small helpers shared by fusedmf.bench's measurement modules (timing, stats, machine info, output)."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

import torch


def quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(repeats_s: Sequence[float]) -> dict:
    """The same fields as benchmarks/harness.py's summarize (median, p20, p80, min, max, n)."""
    s = sorted(repeats_s)
    return {"median_s": quantile(s, 0.5), "p20_s": quantile(s, 0.2), "p80_s": quantile(s, 0.8),
            "min_s": s[0] if s else math.nan, "max_s": s[-1] if s else math.nan, "n": len(s)}


def repo_root() -> Optional[str]:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return here if os.path.isdir(os.path.join(here, "benchmarks")) else None


def _git_commit() -> Optional[str]:
    root = repo_root() or os.getcwd()
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device) -> dict:
    """The fields of benchmarks/harness.py's machine_info that these benchmarks quote (fusedmf never
    imports benchmarks/, so this is its own, smaller copy)."""
    device = torch.device(device)
    info = {"utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": shlex.join([sys.executable] + sys.argv), "cwd": os.getcwd(), "hostname": platform.node(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "FUSEDMF_JIT")
                    if k in os.environ},
            "git": {"commit": _git_commit() or "unknown"}, "device": str(device)}
    try:
        import fusedmf

        info["fusedmf"] = getattr(fusedmf, "__version__", None)
    except Exception:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device),
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    gpu_mem_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
    else:
        info["device_name"] = info["cpu_model"]
    return info


def now_tag(utc: str) -> str:
    return utc.replace("-", "").replace(":", "")


def write_json(result: dict, out_dir: str, stem: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}_{now_tag(result['machine']['utc'])}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
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


def progress(iterable, total=None, desc=""):
    try:
        from tqdm.auto import tqdm  # type: ignore

        return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)
    except ImportError:
        return iterable
