"""Offline model of one fused optimizer step on an H200: bytes, launches, waves, latency (docs/performance.md).

A prediction made before any GPU measurement, so that the measurement (scripts/gpu_verify.sh,
owed) can confirm or refute it. For each rule (the dtypes of its streams) over a list of tensor
sizes (default: ResNet-50's 161 parameter tensors, fusedmf.models.resnet50_param_shapes):

- bytes moved: per element, the bytes each stream reads and writes (the floors of
  docs/performance.md);
- launches and blocks per launch: the packing loop of csrc/cuda/multi_tensor_apply.cuh replayed
  (:func:`pack_launches`) with the limits read from csrc/cuda/launch_limits.h (:func:`launch_limits`,
  NOTE [launch limits]): the one description the launcher compiles from;
- waves: resident blocks per SM from registers per thread (ptxas -v), threads and the register file;
- time: a fluid simulation of each launch. A resident block streams at most
  ``threads * bytes_in_flight_per_thread / latency`` (Little's law: each thread has one or
  ``unroll`` iterations of loads outstanding), all resident blocks together at most the copy
  bandwidth, shared equally; a finished block frees its slot for the next one of the launch. So a
  launch of many blocks is bandwidth-bound, and a launch's last blocks (or a launch of few) are
  latency-bound. Plus a fixed cost per launch (kernel boundary: drain, launch, ramp).

    python benchmarks/launch_model.py                         # table of today's and the new design
    python benchmarks/launch_model.py --out benchmarks/results/model-h200   # also the JSON record

Every constant below states its source; those that are assumptions say so.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LIMITS_HEADER = os.path.join(ROOT, "csrc", "cuda", "launch_limits.h")

# ---- the machine -------------------------------------------------------------------------------

# docs/performance.md: "~4.3 TB/s device copy, read + write counted", measured on one H200.
COPY_BANDWIDTH = 4.3e12  # bytes/s
# H200 (GH100): 132 SMs, 2048 threads, 32 blocks and 65536 32-bit registers per SM; registers are
# allocated per warp in units of 256 (8 per thread). Source: NVIDIA Hopper tuning guide / CUDA
# occupancy calculator for compute capability 9.0.
SMS = 132
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
REGISTERS_PER_SM = 65536
REGISTER_GRANULE = 8  # per thread (256 per warp)
# ASSUMPTION: DRAM load latency seen by a streaming kernel near full bandwidth, 600-700 ns (HBM3
# pointer-chase latency on H100 is ~500 ns unloaded; queueing under load adds to it). Not measured
# here; the two ends give the range of the prediction. To be measured on the H200 (owed).
LATENCY_S = (600e-9, 700e-9)
# ASSUMPTION: device time per launch besides its blocks' streaming (the previous kernel's drain,
# the launch of the next from the stream, the ramp of its first blocks), 2 us; the same for 4 KiB
# and 32 KiB of arguments. This is the ~2 us by which one launch (121 us) is expected above the
# mixed MF-SGD floor (119 us).
LAUNCH_OVERHEAD_S = 2e-6

# ---- the launcher (csrc/cuda/multi_tensor_apply.cuh) ---------------------------------------------

BLOCK_SIZE = 512  # kBlockSize
CHUNK_SIZE = 65536  # kChunkSize
ILP = 4  # kIlp
SMALL_ARGS, LARGE_ARGS = 4096, 32764  # kSmallArgs, kLargeArgs
LARGE_ARGS_MIN_DRIVER = 12010  # cudaDriverGetVersion() from which the 32 KiB rows are used

_LIMIT_ROW = re.compile(r"FUSEDMF_LAUNCH_LIMIT\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)")


LAUNCHER_HEADER = os.path.join(ROOT, "csrc", "cuda", "multi_tensor_apply.cuh")


def read_kunroll(path: str = LAUNCHER_HEADER) -> int:
    """The launcher's kUnroll (aligned iterations whose loads are in flight together per thread)."""
    m = re.search(r"constexpr int kUnroll = (\d+);", open(path).read())
    if m is None:
        raise RuntimeError(f"no 'constexpr int kUnroll = N;' in {path}")
    return int(m.group(1))


def launch_limits(path: str = LIMITS_HEADER) -> Dict[Tuple[int, int], Tuple[int, int]]:
    """{(arg_bytes, depth): (max_tensors, max_blocks)}: the rows of csrc/cuda/launch_limits.h."""
    with open(path) as f:
        text = f.read()
    body = text[text.index("#define FUSEDMF_LAUNCH_LIMITS"):]
    rows = {}
    for m in _LIMIT_ROW.finditer(body):
        arg_bytes, depth, tensors, blocks = map(int, m.groups())
        rows[(arg_bytes, depth)] = (tensors, blocks)
    if not rows:
        raise ValueError(f"no FUSEDMF_LAUNCH_LIMIT rows in {path}")
    return rows


def meta_bytes(depth: int, max_tensors: int, max_blocks: int) -> int:
    """sizeof(TensorListMeta): depth pointers + one int64 numel per tensor, an int32 chunk index and a
    uint8 (<= 256 tensors) or uint16 tensor index per block, padded to 8 bytes."""
    index_bytes = 1 if max_tensors <= 256 else 2
    raw = 8 * depth * max_tensors + 8 * max_tensors + (4 + index_bytes) * max_blocks
    return -(-raw // 8) * 8


def arg_bytes_for_driver(driver_version: int) -> int:
    """The argument limit the launcher picks for a driver (large_kernel_args() in the launcher)."""
    return LARGE_ARGS if driver_version >= LARGE_ARGS_MIN_DRIVER else SMALL_ARGS


def pack_launches(numels: Sequence[int], depth: int, arg_bytes: int,
                  limits: Optional[Dict[Tuple[int, int], Tuple[int, int]]] = None) -> List[List[int]]:
    """The launches multi_tensor_apply_with<arg_bytes, depth> makes: for each, the element count of
    each of its blocks. The same loop as the launcher (zero-size tensors take no slot; a launch when
    the tensors are full at a tensor's last chunk or the blocks are full; a tensor cut by a full
    launch continues as tensor 0 of the next; whatever is pending at the end is launched)."""
    max_tensors, max_blocks = (limits or launch_limits())[(arg_bytes, depth)]
    launches: List[List[int]] = []
    blocks: List[int] = []
    loc_tensor = 0
    for numel in numels:
        if numel <= 0:
            continue
        chunks = -(-numel // CHUNK_SIZE)
        loc_tensor += 1
        for c in range(chunks):
            blocks.append(min(CHUNK_SIZE, numel - c * CHUNK_SIZE))
            last_chunk = c == chunks - 1
            if (loc_tensor == max_tensors and last_chunk) or len(blocks) == max_blocks:
                launches.append(blocks)
                blocks = []
                loc_tensor = 0 if last_chunk else 1
    if blocks:
        launches.append(blocks)
    return launches


# ---- the rules ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One kernel: the bytes per element each stream reads and writes, its depth (lists), and the
    kernel instantiation whose registers decide its occupancy."""
    name: str
    depth: int
    read_bytes: Tuple[int, ...]  # per element, one entry per stream read
    write_bytes: Tuple[int, ...]  # per element, one entry per stream written
    kernel: str  # as ptxas names the Op (benchmarks/results/model-h200/*: registers)

    @property
    def bytes_per_element(self) -> int:
        return sum(self.read_bytes) + sum(self.write_bytes)


# Steady state (not the first step, which does not read the momentum); 16-bit = bf16 or fp16.
RULES = {
    # bf16/fp16 param (written), fp32 master, fp32 momentum, 16-bit grad: docs/performance.md's 20 B/param
    "mf_sgd_mixed": Rule("mf_sgd_mixed", 4, read_bytes=(4, 4, 2), write_bytes=(2, 4, 4),
                         kernel="SgdOp<bf16, bf16, true, true>"),
    # fp32 param, grad, momentum: 20 B/param
    "mf_sgd_fp32": Rule("mf_sgd_fp32", 4, read_bytes=(4, 4, 4), write_bytes=(4, 4),
                        kernel="SgdOp<float, float, false, true>"),
    # 16-bit param (written), fp32 master, exp_avg, exp_avg_sq, 16-bit grad: 28 B/param
    "mf_adam_mixed": Rule("mf_adam_mixed", 5, read_bytes=(4, 4, 4, 2), write_bytes=(2, 4, 4, 4),
                          kernel="AdamOp<bf16, bf16, true, false>"),
    # fp32 param, grad, exp_avg, exp_avg_sq: 28 B/param (read 4 streams, write 3)
    "mf_adam_fp32": Rule("mf_adam_fp32", 5, read_bytes=(4, 4, 4, 4), write_bytes=(4, 4, 4),
                         kernel="AdamOp<float, float, false, false>"),
}

# Registers per thread of each rule's kernel (nvcc 13.0, sm_90): "before" at commit ce8a500 (4 KiB
# arguments, one iteration in flight; `nvcc -Xptxas -v`), "after" the shipped build (32 KiB
# arguments, kUnroll = 2, __launch_bounds__ minimum blocks, Adam's unaligned path two lanes at a
# time), as `python scripts/codegen.py` reads them from fusedmf/_C's cubin (benchmarks/results/
# codegen-20261203/). No spills in either for these four kernels.
REGISTERS = {
    "before": {"mf_sgd_mixed": 32, "mf_sgd_fp32": 48, "mf_adam_mixed": 46, "mf_adam_fp32": 48},
    "after": {"mf_sgd_mixed": 40, "mf_sgd_fp32": 38, "mf_adam_mixed": 58, "mf_adam_fp32": 60},
}


@dataclass(frozen=True)
class Design:
    name: str
    arg_bytes: int  # kernel-argument limit the launcher packs for
    unroll: int  # aligned iterations whose loads are in flight together per thread
    registers: str  # key of REGISTERS
    elems_per_access: int = ILP  # elements per vector access and stream (ILP-4; 8 = 16 B for 16-bit)


DESIGNS = {
    "before": Design("before: 4 KiB arguments, 1 iteration in flight", SMALL_ARGS, 1, "before"),
    "after": Design(f"after: 32 KiB arguments, {read_kunroll()} iteration(s) in flight", LARGE_ARGS, read_kunroll(),
                    "after"),
    "after_old_driver": Design(f"after, driver < 12.1: 4 KiB arguments, {read_kunroll()} iteration(s) in flight",
                               SMALL_ARGS, read_kunroll(), "after"),
    # the alternative of NOTE [ILP-4] that was not chosen: 16-byte accesses for 16-bit streams
    # (8 elements per thread and iteration, one iteration in flight): the same bytes in flight as
    # unrolling by 2 for fp32 streams, more for 16-bit ones, but it needs 16-byte alignment of the
    # 16-bit tensors to take the vector path at all.
    "alt_16B_16bit": Design("alternative: 32 KiB arguments, 8 elements per access, 1 iteration",
                            LARGE_ARGS, 1, "after", elems_per_access=8),
}


def blocks_per_sm(registers: int) -> int:
    """Resident blocks of kBlockSize threads per SM, limited by threads, blocks and registers."""
    regs = -(-registers // REGISTER_GRANULE) * REGISTER_GRANULE
    by_regs = REGISTERS_PER_SM // (regs * BLOCK_SIZE)
    return max(0, min(THREADS_PER_SM // BLOCK_SIZE, BLOCKS_PER_SM, by_regs))


def bytes_in_flight_per_thread(rule: Rule, design: Design) -> int:
    """Loads outstanding per thread: every read stream's vector, for `unroll` iterations. Each
    fp32 access is at most 16 B (elems_per_access 8 means two 16 B accesses for fp32)."""
    return design.unroll * design.elems_per_access * sum(rule.read_bytes)


def simulate_launch(block_elems: Sequence[int], rule: Rule, resident: int, block_rate: float,
                    bandwidth: float) -> float:
    """Seconds to stream one launch: blocks start in order as slots free up (at most `resident` at
    once); each streams at min(block_rate, bandwidth / active)."""
    pending = [n * rule.bytes_per_element for n in block_elems]
    active: List[float] = []
    t = 0.0
    nxt = 0
    while nxt < len(pending) or active:
        while len(active) < resident and nxt < len(pending):
            active.append(float(pending[nxt]))
            nxt += 1
        rate = min(block_rate, bandwidth / len(active))
        dt = min(active) / rate
        t += dt
        active = [b - dt * rate for b in active]
        active = [b for b in active if b > 1e-9]
    return t


def predict(numels: Sequence[int], rule: Rule, design: Design, latency_s: float,
            bandwidth: float = COPY_BANDWIDTH, launch_overhead_s: float = LAUNCH_OVERHEAD_S) -> dict:
    launches = pack_launches(numels, rule.depth, design.arg_bytes)
    regs = REGISTERS[design.registers][rule.name]
    bps = blocks_per_sm(regs)
    resident = bps * SMS
    per_thread = bytes_in_flight_per_thread(rule, design)
    read_per_element = sum(rule.read_bytes)
    # Little's law on the loads; the writes stream along at the same element rate
    block_rate = BLOCK_SIZE * per_thread / latency_s * rule.bytes_per_element / read_per_element
    stream_s = [simulate_launch(b, rule, resident, block_rate, bandwidth) for b in launches]
    total_bytes = sum(numels) * rule.bytes_per_element
    time_s = sum(stream_s) + launch_overhead_s * len(launches)
    return {
        "rule": rule.name, "design": design.name, "latency_ns": round(latency_s * 1e9),
        "bytes": total_bytes, "bytes_per_element": rule.bytes_per_element,
        "launches": len(launches), "blocks_per_launch": [len(b) for b in launches],
        "registers": regs, "blocks_per_sm": bps, "waves_per_launch": [math.ceil(len(b) / resident) for b in launches],
        "bytes_in_flight_per_thread": per_thread,
        "floor_us": total_bytes / bandwidth * 1e6,
        "stream_us_per_launch": [s * 1e6 for s in stream_s],
        "time_us": time_s * 1e6,
        "fraction_of_copy": total_bytes / bandwidth / time_s,
    }


def resnet50_numels() -> List[int]:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from fusedmf.models import resnet50_param_shapes

    return [math.prod(s) for s in resnet50_param_shapes()]


def model(numels: Sequence[int], designs=("before", "after", "after_old_driver", "alt_16B_16bit")) -> List[dict]:
    return [predict(numels, RULES[r], DESIGNS[d], lat) for d in designs for r in RULES for lat in LATENCY_S]


def table(rows: Sequence[dict]) -> str:
    lines = [f"{'design':64s} {'rule':14s} {'launches':>8s} {'regs':>4s} {'blk/SM':>6s} "
             f"{'floor us':>8s} {'model us (lat 600-700 ns)':>26s} {'% copy':>10s}"]
    for i in range(0, len(rows), 2):
        a, b = rows[i], rows[i + 1]
        lines.append(f"{a['design']:64s} {a['rule']:14s} {a['launches']:8d} {a['registers']:4d} {a['blocks_per_sm']:6d} "
                     f"{a['floor_us']:8.1f} {a['time_us']:12.1f} - {b['time_us']:11.1f} "
                     f"{100 * b['fraction_of_copy']:4.0f}-{100 * a['fraction_of_copy']:3.0f}%")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the JSON record into this folder (e.g. benchmarks/results/model-h200)")
    args = ap.parse_args(argv)
    numels = resnet50_numels()
    rows = model(numels)
    print(f"ResNet-50: {len(numels)} tensors, {sum(numels):,} parameters; H200 model "
          f"({COPY_BANDWIDTH / 1e12:.1f} TB/s copy, {SMS} SMs, latency {LATENCY_S[0] * 1e9:.0f}-"
          f"{LATENCY_S[1] * 1e9:.0f} ns, {LAUNCH_OVERHEAD_S * 1e6:.0f} us per launch)")
    print(table(rows))
    if args.out:
        sys.path.insert(0, HERE)
        import torch

        from harness import machine_info, write_json

        machine = machine_info(torch.device("cpu"))
        machine["device_name"] = "none: an offline model of an NVIDIA H200 (no GPU ran)"
        result = {
            "bench": "launch_model",
            "kind": "model prediction, not a measurement",
            "config": {"tensors": len(numels), "parameters": sum(numels), "copy_bandwidth": COPY_BANDWIDTH,
                       "sms": SMS, "latency_s": list(LATENCY_S), "launch_overhead_s": LAUNCH_OVERHEAD_S,
                       "block_size": BLOCK_SIZE, "chunk_size": CHUNK_SIZE, "registers": REGISTERS,
                       "launch_limits": {f"{a}/{d}": v for (a, d), v in launch_limits().items()}},
            "machine": machine,
            "backends_used": {"launch_model": "none: arithmetic over the launcher's limits, no kernel ran"},
            "rows": rows,
        }
        print("wrote", write_json(result, args.out, "launch_model_h200"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
