"""Scaling predictor: a measured single-GPU timeline + a ring-allreduce network model -> step time at N GPUs.

Inputs
- :class:`Timeline`: forward time, backward time, optimizer time of one step on one GPU, and the
  gradients in the order backward produces them: either per parameter (:class:`ParamGrad`: numel and
  the time after backward's start at which its gradient is ready; lets the predictor re-bucket with any
  cap) or already-formed buckets (:class:`Bucket`: ready time and payload bytes).
- :class:`Network`: ring allreduce ``t(S, n) = 2(n-1)·α + 2(n-1)/n · S/B`` (B: the bus bandwidth, i.e.
  the per-direction bottleneck bandwidth of the ring; α: per-hop latency). Inside one node the intra
  parameters apply; beyond ``gpus_per_node`` the model is hierarchical: the intra-node ring over the
  node's GPUs **plus** an inter-node ring over ``nodes`` participants with ``B = nics_per_node ·
  nic_bw`` (one ring per NIC, each carrying a share of the buffer) and the inter-node α. That charges
  the full intra-node allreduce on top of the inter-node one (a reduce-scatter + allgather inside the
  node would cost the same two halves), so it errs on the pessimistic side.

Simulation (one communication stream): buckets are launched in ready order; bucket k's allreduce starts
at ``max(ready_k, end_{k-1})`` and lasts ``t(S_k, N)``. Step time ``T(N) = forward + max(backward end,
last allreduce end) + optimizer``; exposed communication ``max(0, last end - backward end)``;
efficiency with a fixed per-GPU batch ``E(N) = T(1) / T(N)`` (throughput(N) / (N · throughput(1))).
Not modelled: compute slow-down from communication kernels sharing SMs / memory bandwidth, pack/cast
time (measured as part of backward when the timeline comes from DistributedOptimizer), stragglers,
and congestion on the inter-node fabric.

Bucketing (both in reverse registration order, a parameter never split, a small first bucket):
- torch DDP defaults: 25 MB buckets counted in the grads' (fp32) bytes, first bucket 1 MB; with the
  fp16 compression hook the payload is half of that.
- fusedmf DistributedOptimizer: buckets of fp16 payload bytes at cap C (default 25 MB), first 1 MB.
:func:`recommend_bucket_cap` sweeps C and picks the cap with the shortest predicted step time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Sequence

__all__ = ["Network", "NETWORKS", "Timeline", "ParamGrad", "Bucket", "Prediction", "ring_allreduce_time",
           "allreduce_time", "make_buckets", "ddp_buckets", "fusedmf_buckets", "simulate", "predict",
           "efficiency_curve", "recommend_bucket_cap", "DEFAULT_NS", "DEFAULT_CAPS_MB", "MB"]

MB = 1 << 20                       # bucket caps are MiB, as in torch DDP and fusedmf.comm
DEFAULT_NS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DEFAULT_CAPS_MB = (0.5, 1, 2, 4, 8, 16, 25, 32, 64, 128)


# ------------------------------------------------------------------------------------------ network
@dataclass(frozen=True)
class Network:
    name: str
    gpus_per_node: int
    intra_bw: float                  # bytes/s, ring bus bandwidth inside a node
    intra_alpha: float               # s per ring hop inside a node
    inter_bw_per_nic: float = 0.0    # bytes/s per NIC between nodes
    nics_per_node: int = 1
    inter_alpha: float = 0.0         # s per ring hop between nodes
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


# NVLink figures (docs/performance.md) (~370 GB/s bus bandwidth measured on 8xH200 for large messages);
# 400 Gb/s InfiniBand = 50 GB/s per NIC, 8 NICs per node (one per GPU, DGX/HGX layout).
NETWORKS: Dict[str, Network] = {
    "nvlink-ib400": Network("nvlink-ib400", 8, 370e9, 5e-6, 50e9, 8, 10e-6,
                            "8 GPUs/node on NVLink 4 (370 GB/s busbw, 5 us); 8x 400 Gb/s InfiniBand NICs (10 us)"),
    "nvlink-ib400-1nic": Network("nvlink-ib400-1nic", 8, 370e9, 5e-6, 50e9, 1, 10e-6,
                                 "as nvlink-ib400 but a single 400 Gb/s NIC per node"),
    "pcie-ethernet100": Network("pcie-ethernet100", 8, 25e9, 10e-6, 12.5e9, 1, 30e-6,
                                "8 GPUs/node on PCIe 4 (~25 GB/s), 100 Gb/s Ethernet (RoCE/TCP), 30 us"),
    "ethernet25": Network("ethernet25", 1, 3.1e9, 30e-6, 3.1e9, 1, 30e-6,
                          "one GPU per host, 25 Gb/s Ethernet"),
}


def ring_allreduce_time(nbytes: float, n: int, bw: float, alpha: float) -> float:
    """``2(n-1)·α + 2(n-1)/n · S/B``; 0 for n <= 1."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / bw


def allreduce_time(nbytes: float, n: int, net: Network) -> float:
    """Allreduce of ``nbytes`` over ``n`` GPUs: a ring inside a node, hierarchical beyond one node."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    g = net.gpus_per_node
    if n <= g:
        return ring_allreduce_time(nbytes, n, net.intra_bw, net.intra_alpha)
    nodes = math.ceil(n / g)
    intra = ring_allreduce_time(nbytes, g, net.intra_bw, net.intra_alpha)
    inter = ring_allreduce_time(nbytes, nodes, net.nics_per_node * net.inter_bw_per_nic, net.inter_alpha)
    return intra + inter


# ------------------------------------------------------------------------------------------ timeline
@dataclass
class ParamGrad:
    numel: int
    ready_s: float                   # after backward's start


@dataclass
class Bucket:
    ready_s: float                   # after backward's start: its last gradient is ready
    nbytes: int
    num_params: int = 0


@dataclass
class Timeline:
    """One measured single-GPU step. ``params`` in registration order (as ``model.parameters()``)."""

    forward_s: float
    backward_s: float
    optimizer_s: float
    params: List[ParamGrad] = field(default_factory=list)
    buckets: List[Bucket] = field(default_factory=list)
    batch: Optional[int] = None
    source: str = ""

    @property
    def single_gpu_s(self) -> float:
        return self.forward_s + self.backward_s + self.optimizer_s

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Timeline":
        return cls(forward_s=d["forward_s"], backward_s=d["backward_s"], optimizer_s=d["optimizer_s"],
                   params=[ParamGrad(**p) for p in d.get("params", [])],
                   buckets=[Bucket(**b) for b in d.get("buckets", [])], batch=d.get("batch"),
                   source=d.get("source", ""))


def make_buckets(params: Sequence[ParamGrad], *, cap_mb: float, first_cap_mb: float = 1.0,
                 bytes_per_elem_cap: int = 4, bytes_per_elem_wire: int = 2) -> List[Bucket]:
    """Group params (registration order) into buckets in reverse order, never splitting a param.

    ``bytes_per_elem_cap``: element size the cap counts (DDP: the grads' dtype, 4 for fp32);
    ``bytes_per_elem_wire``: element size of the allreduce payload (2 for fp16 compression).
    A bucket is ready when its last param's gradient is.
    """
    if not cap_mb > 0 or not first_cap_mb > 0:
        raise ValueError(f"bucket caps must be > 0 MB, got {cap_mb!r}, {first_cap_mb!r}")
    cap, first = int(cap_mb * MB), int(first_cap_mb * MB)
    out: List[Bucket] = []
    size = None
    for p in reversed(params):
        nb = p.numel * bytes_per_elem_cap
        if size is not None and size + nb > (first if len(out) == 1 else cap):
            size = None
        if size is None:
            out.append(Bucket(ready_s=p.ready_s, nbytes=0, num_params=0))
            size = 0
        b = out[-1]
        b.ready_s = max(b.ready_s, p.ready_s)
        b.nbytes += p.numel * bytes_per_elem_wire
        b.num_params += 1
        size += nb
    return out


def ddp_buckets(params: Sequence[ParamGrad], *, cap_mb: float = 25.0, first_cap_mb: float = 1.0,
                fp16_hook: bool = False, grad_bytes: int = 4) -> List[Bucket]:
    """torch DDP: caps counted in the grads' bytes (fp32), payload halved by the fp16 compress hook."""
    return make_buckets(params, cap_mb=cap_mb, first_cap_mb=first_cap_mb, bytes_per_elem_cap=grad_bytes,
                        bytes_per_elem_wire=2 if fp16_hook else grad_bytes)


def fusedmf_buckets(params: Sequence[ParamGrad], *, cap_mb: float = 25.0, first_cap_mb: float = 1.0,
                    wire_bytes: int = 2) -> List[Bucket]:
    """fusedmf DistributedOptimizer: caps counted in the compressed (fp16) payload bytes."""
    return make_buckets(params, cap_mb=cap_mb, first_cap_mb=first_cap_mb, bytes_per_elem_cap=wire_bytes,
                        bytes_per_elem_wire=wire_bytes)


# ------------------------------------------------------------------------------------------ simulation
@dataclass
class Prediction:
    n: int
    step_s: float
    single_gpu_s: float
    exposed_comm_s: float
    comm_total_s: float              # sum of the allreduce durations (busy time of the comm stream)
    comm_end_s: float                # last allreduce end, after backward's start
    efficiency: float                # T(1) / T(N)
    num_buckets: int
    bytes_per_step: int
    schedule: List[dict] = field(default_factory=list)    # per bucket: ready, start, end, bytes

    def as_dict(self, schedule: bool = False) -> dict:
        d = asdict(self)
        if not schedule:
            d.pop("schedule")
        return d


def simulate(timeline: Timeline, buckets: Sequence[Bucket], n: int, net: Network) -> Prediction:
    """Bucket-by-bucket schedule on one communication stream; see the module docstring."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    t1 = timeline.single_gpu_s
    prev_end = 0.0
    sched = []
    total = 0.0
    for b in sorted(buckets, key=lambda b: b.ready_s):
        dur = allreduce_time(b.nbytes, n, net)
        start = max(b.ready_s, prev_end) if dur > 0 else b.ready_s
        end = start + dur
        prev_end = max(prev_end, end)
        total += dur
        sched.append({"ready_s": b.ready_s, "start_s": start, "end_s": end, "bytes": b.nbytes})
    comm_end = prev_end if n > 1 and buckets else 0.0
    exposed = max(0.0, comm_end - timeline.backward_s)
    step = timeline.forward_s + max(timeline.backward_s, comm_end) + timeline.optimizer_s
    return Prediction(n=n, step_s=step, single_gpu_s=t1, exposed_comm_s=exposed, comm_total_s=total,
                      comm_end_s=comm_end, efficiency=t1 / step if step > 0 else 1.0, num_buckets=len(buckets),
                      bytes_per_step=sum(b.nbytes for b in buckets), schedule=sched)


def _buckets_for(timeline: Timeline, scheme: str, cap_mb: float) -> List[Bucket]:
    if scheme == "measured":
        if not timeline.buckets:
            raise ValueError("scheme 'measured' needs timeline.buckets")
        return list(timeline.buckets)
    if not timeline.params:
        raise ValueError(f"scheme {scheme!r} re-buckets the params: the timeline has no per-param ready times")
    if scheme == "fusedmf-fp16":
        return fusedmf_buckets(timeline.params, cap_mb=cap_mb)
    if scheme == "fusedmf-fp32":
        return fusedmf_buckets(timeline.params, cap_mb=cap_mb, wire_bytes=4)
    if scheme == "ddp-fp32":
        return ddp_buckets(timeline.params, cap_mb=cap_mb)
    if scheme == "ddp-fp16":
        return ddp_buckets(timeline.params, cap_mb=cap_mb, fp16_hook=True)
    raise ValueError(f"unknown bucketing scheme {scheme!r} (measured, fusedmf-fp16, fusedmf-fp32, ddp-fp32, ddp-fp16)")


SCHEMES = ("fusedmf-fp16", "ddp-fp32", "ddp-fp16")


def predict(timeline: Timeline, n: int, net: Network, *, scheme: str = "fusedmf-fp16",
            cap_mb: float = 25.0) -> Prediction:
    return simulate(timeline, _buckets_for(timeline, scheme, cap_mb), n, net)


def efficiency_curve(timeline: Timeline, net: Network, *, ns: Iterable[int] = DEFAULT_NS,
                     scheme: str = "fusedmf-fp16", cap_mb: float = 25.0) -> List[dict]:
    buckets = _buckets_for(timeline, scheme, cap_mb)
    return [simulate(timeline, buckets, n, net).as_dict() for n in ns]


def recommend_bucket_cap(timeline: Timeline, net: Network, n: int, *, caps_mb: Iterable[float] = DEFAULT_CAPS_MB,
                         scheme: str = "fusedmf-fp16") -> dict:
    """Sweep the bucket cap; the shortest predicted step wins (ties: the larger cap, fewer launches)."""
    rows = []
    for cap in caps_mb:
        p = predict(timeline, n, net, scheme=scheme, cap_mb=cap)
        rows.append({"cap_mb": cap, "step_s": p.step_s, "efficiency": p.efficiency,
                     "exposed_comm_s": p.exposed_comm_s, "num_buckets": p.num_buckets})
    best = min(rows, key=lambda r: (round(r["step_s"], 12), -r["cap_mb"]))
    return {"n": n, "network": net.name, "scheme": scheme, "best_cap_mb": best["cap_mb"], "best": best, "sweep": rows}


def resnet50_like_timeline(step_s: float = 0.1, *, forward_frac: float = 1 / 3, optimizer_s: float = 0.2e-3,
                           shapes: Optional[Sequence[int]] = None) -> Timeline:
    """An illustrative timeline when nothing was measured: backward = 2x forward, each param's gradient
    ready in reverse order at a time proportional to the numel produced so far. Inputs are labelled
    ``source='synthetic'`` wherever they are reported."""
    if shapes is None:
        from ..models import resnet50_param_shapes
        shapes = [math.prod(s) for s in resnet50_param_shapes()]
    fwd = step_s * forward_frac
    bwd = step_s - fwd - optimizer_s
    total = float(sum(shapes))
    params: List[ParamGrad] = [None] * len(shapes)  # type: ignore[list-item]
    done = 0.0
    for i in reversed(range(len(shapes))):
        done += shapes[i]
        params[i] = ParamGrad(numel=int(shapes[i]), ready_s=bwd * done / total)
    return Timeline(forward_s=fwd, backward_s=bwd, optimizer_s=optimizer_s, params=params,
                    source="synthetic: ResNet-50 shapes, grads ready in proportion to numel")


def with_network(net: Network, **changes) -> Network:
    return replace(net, **changes)
