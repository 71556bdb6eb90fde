"""What the network lab adds to the scaling predictor (fusedmf.bench.predictor): the effects that decide a step
on ranks that talk over rate-limited links and share one host's CPUs, each modelled from a measurement.

1. Bucket order. DistributedOptimizer and torch DDP launch bucket k only after buckets 0..k-1 (the same
   order on every rank, so collectives match): a bucket that fills early waits. :func:`launch_order`
   turns ready times into launch-ready times (the running maximum in index order) before the one-stream
   simulation; ``predictor.simulate`` alone would launch in ready order.
2. One ring per payload dtype. gloo reduces on the CPU, element by element in the payload's dtype (fp16
   and bf16 converted through float), and splits a buffer into chunks that it pipelines around the ring:
   its time is not the wire's alone. :class:`LabFit` holds ``t(S) = a + b·S`` fitted separately for
   fp16, bf16 and fp32 payloads on the same links (``α = a / 2(n-1)``, ``B = 2(n-1)/n / b``), so the
   reduction cost and chunking of each dtype are in its own α and B; the fit's residuals are reported.
3. The bucket copy. The world-size-1 timeline the prediction starts from is measured with each
   configuration's own machinery at world size 1 (DistributedOptimizer's pack of each bucket, DDP's copy
   of gradients into its buckets and back) on the ranks' own process groups of one, so those copies are in
   its backward; T(1) for E(N) is the plain step (no wrapper), as a single GPU would run it. The pack (or
   DDP's fp16 compression in its hook) also sits between a bucket's last gradient and its launch:
   :func:`with_pack_time` delays each launch by ``fixed + per_byte · S`` fitted over the world-size-1
   buckets, and the asynchronous allreduce call's own time (``LabFit.launch_s``, measured in the fit) by
   that much more.
4. Ranks sharing the host. (a) Memory bandwidth and caches: that world-size-1 timeline is measured on all
   N ranks at once (each alone in its group, no communication), i.e. at the machine load of the N-rank
   run; ``contention = T1(loaded) / T1(alone)`` is reported. (b) CPU time of communication: gloo's
   threads and the kernel's TCP/veth path take CPU time per byte (``cpu_s_per_byte``, process CPU time
   measured over the fit's allreduces); while a bucket's allreduce overlaps backward on a host whose cores
   are all busy with the ranks' compute threads, that time is taken from backward. :func:`predict_lab`
   iterates: simulate, stretch backward (and the grad-ready times in it) by the CPU time of the
   communication that overlapped it, times ``cpu_share`` (1 when the ranks' compute threads fill every
   core, less when spare cores absorb it), until the schedule settles.

5. DDP's buffer broadcast: with ``broadcast_buffers=True`` (its default) DDP broadcasts the module's buffers
   (BatchNorm statistics) from rank 0 at the start of every forward; at world size 1 that costs nothing, at
   N it is a broadcast over the links (:func:`broadcast_time`, with the fp32 fit). DistributedOptimizer
   without ``module=`` broadcasts nothing.

Not modelled (reported as the residual): TCP slow start and tbf's burst at the start of each bucket,
gloo's thread pool running two buckets at once, and DDP's finalisation copy after the last allreduce.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence

from fusedmf.bench.predictor import Bucket, Network, ParamGrad, Prediction, Timeline, simulate

__all__ = ["LabFit", "fit_ring", "launch_order", "cpu_share", "predict_lab", "buckets_for", "with_pack_time", "recommend_cap", "interpolate_fit", "broadcast_time", "fit_line"]


@dataclass
class LabFit:
    """Ring parameters of one payload dtype fitted on the lab's links at one rate."""

    dtype: str
    n: int
    alpha_s: float
    bw_Bps: float
    intercept_s: float
    slope_s_per_B: float
    cpu_s_per_byte: float            # process CPU time per payload byte of an allreduce (gloo + kernel)
    points: Dict[str, float]         # payload bytes -> median seconds
    cpu_points: Dict[str, float]     # payload bytes -> median process CPU seconds
    max_rel_residual: float
    launch_s: float = 0.0            # the asynchronous allreduce call's own time (enqueue, wake the comm thread)

    def network(self, label: str) -> Network:
        return Network(label, gpus_per_node=self.n, intra_bw=self.bw_Bps, intra_alpha=self.alpha_s,
                       note=f"fitted on the lab links, {self.dtype} payloads")

    def as_dict(self) -> dict:
        return asdict(self)


def fit_line(xs: Sequence[float], ys: Sequence[float]):
    """Least squares ``y = a + b·x``: (a, b)."""
    k = len(xs)
    mx, my = sum(xs) / k, sum(ys) / k
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-30)
    return my - b * mx, b


def fit_ring(times: Dict[int, float], cpu: Dict[int, float], n: int, dtype: str, launch_s: float = 0.0) -> LabFit:
    """Least squares ``t = a + b·S`` over the timed payload sizes; ``cpu_s_per_byte`` the slope of CPU time;
    ``launch_s``: the measured time of the asynchronous call itself (added to each bucket's launch)."""
    if n < 2 or len(times) < 2:
        raise ValueError(f"a ring fit needs n >= 2 ranks and >= 2 sizes, got n={n}, sizes={sorted(times)}")
    from scaling import fit_ring as ring_fit          # the one t = a + b·S -> (α, B) fit

    xs = [float(s) for s in sorted(times)]
    ys = [times[int(s)] for s in xs]
    f = ring_fit({int(s): times[int(s)] for s in xs}, n)
    a, b = f["fit_intercept_s"], f["fit_slope_s_per_B"]
    resid = max(abs(a + b * x - y) / y for x, y in zip(xs, ys) if y > 0)
    _, cb = fit_line(xs, [cpu[int(s)] for s in xs])
    return LabFit(dtype=dtype, n=n, alpha_s=f["alpha_s"], bw_Bps=f["bw_Bps"], intercept_s=a, slope_s_per_B=b,
                  cpu_s_per_byte=max(cb, 0.0), points={str(int(s)): times[int(s)] for s in xs},
                  cpu_points={str(int(s)): cpu[int(s)] for s in xs}, max_rel_residual=resid, launch_s=launch_s)


def launch_order(buckets: Sequence[Bucket]) -> List[Bucket]:
    """Buckets in index order with each ready time raised to the latest ready time before it (1.)."""
    out, latest = [], 0.0
    for b in buckets:
        latest = max(latest, b.ready_s)
        out.append(replace(b, ready_s=latest))
    return out


def cpu_share(n: int, threads: int, cores: int) -> float:
    """Fraction of communication CPU time taken from compute: 1 when the ranks' compute threads occupy every
    core, 0 when each rank has a spare core for it, linear between."""
    spare = max(0, cores - n * threads)
    return max(0.0, 1.0 - spare / n)


def _stretched(tl: Timeline, buckets: Sequence[Bucket], extra_s: float) -> tuple:
    """Backward longer by ``extra_s``, its ready times stretched in proportion."""
    if tl.backward_s <= 0 or extra_s <= 0:
        return tl, list(buckets)
    f = (tl.backward_s + extra_s) / tl.backward_s
    return (replace(tl, backward_s=tl.backward_s + extra_s,
                    params=[ParamGrad(p.numel, p.ready_s * f) for p in tl.params]),
            [replace(b, ready_s=b.ready_s * f) for b in buckets])


def broadcast_time(nbytes: float, fit: LabFit) -> float:
    """A broadcast from rank 0 (pipelined along a chain: every link carries the payload once): ``2α + S/B``."""
    return 0.0 if nbytes <= 0 or fit.n <= 1 else 2 * fit.alpha_s + nbytes / fit.bw_Bps


def predict_lab(tl: Timeline, buckets: Sequence[Bucket], n: int, fit: LabFit, *, t1_s: float,
                share: float, forward_comm_bytes: int = 0, forward_fit: Optional[LabFit] = None,
                iterations: int = 8) -> dict:
    """Predicted step at ``n`` ranks from the (loaded) world-size-1 timeline ``tl`` and its buckets in index
    order; ``t1_s``: the plain single-rank step E(N) is measured against. ``forward_comm_bytes``: a broadcast
    in forward (5.: DDP's buffers), timed with ``forward_fit`` (default ``fit``). Returns the prediction, the
    schedule and the CPU-time stretch of backward (4b)."""
    net = fit.network(f"lab {fit.dtype}")
    buckets = [replace(b, ready_s=b.ready_s + fit.launch_s) for b in buckets]
    fwd_comm = broadcast_time(forward_comm_bytes, forward_fit or fit) if n > 1 else 0.0
    tl = replace(tl, forward_s=tl.forward_s + fwd_comm)
    ordered = launch_order(buckets)
    extra = 0.0
    pred: Optional[Prediction] = None
    for _ in range(iterations):
        tl2, b2 = _stretched(tl, ordered, extra)
        pred = simulate(tl2, b2, n, net)
        # CPU time of the part of each allreduce that ran before backward ended
        overlapped = 0.0
        for s in pred.schedule:
            dur = s["end_s"] - s["start_s"]
            if dur > 0:
                inside = max(0.0, min(s["end_s"], tl2.backward_s) - s["start_s"]) / dur
                overlapped += inside * s["bytes"]
        new_extra = share * fit.cpu_s_per_byte * overlapped
        if abs(new_extra - extra) < 1e-5:
            extra = new_extra
            break
        extra = new_extra
    tl2, b2 = _stretched(tl, ordered, extra)
    pred = simulate(tl2, b2, n, net)
    return {"step_s": pred.step_s, "E": t1_s / pred.step_s, "exposed_comm_s": pred.exposed_comm_s,
            "comm_total_s": pred.comm_total_s, "backward_cpu_stretch_s": extra, "num_buckets": pred.num_buckets,
            "bytes_per_step": pred.bytes_per_step, "schedule": pred.schedule, "network": net.as_dict(),
            "timeline_single_gpu_s": tl.single_gpu_s - fwd_comm, "forward_broadcast_s": fwd_comm}


def buckets_for(tl: Timeline, impl_kind: str, *, cap_mb: float, wire_bytes: int) -> List[Bucket]:
    """The buckets a configuration forms from the timeline's gradients, in index (launch) order:
    DistributedOptimizer counts its cap in payload bytes, DDP in the fp32 gradients' bytes."""
    from fusedmf.bench.predictor import ddp_buckets, fusedmf_buckets

    if impl_kind == "ddp":
        return ddp_buckets(tl.params, cap_mb=cap_mb, fp16_hook=wire_bytes == 2)
    return fusedmf_buckets(tl.params, cap_mb=cap_mb, wire_bytes=wire_bytes)


def with_pack_time(buckets: Sequence[Bucket], pack_s_per_byte: float, pack_fixed_s: float = 0.0) -> List[Bucket]:
    """A bucket is launched after its pack (cast + scale into the flat buffer, 3.), ``fixed + per_byte · S``."""
    return [replace(b, ready_s=b.ready_s + pack_fixed_s + pack_s_per_byte * b.nbytes) for b in buckets]


def recommend_cap(tl: Timeline, n: int, fit: LabFit, *, t1_s: float, share: float, pack_s_per_byte: float = 0.0,
                  pack_fixed_s: float = 0.0,
                  caps_mb: Sequence[float] = (0.5, 1, 2, 4, 8, 16, 25, 32, 64)) -> dict:
    """The fusedmf fp16 bucket cap with the shortest step predicted by :func:`predict_lab` (ties: the larger)."""
    rows = []
    for cap in caps_mb:
        b = with_pack_time(buckets_for(tl, "distopt", cap_mb=cap, wire_bytes=2), pack_s_per_byte, pack_fixed_s)
        p = predict_lab(tl, b, n, fit, t1_s=t1_s, share=share)
        rows.append({"cap_mb": cap, "step_s": p["step_s"], "E": p["E"], "num_buckets": p["num_buckets"]})
    best = min(rows, key=lambda r: (round(r["step_s"], 9), -r["cap_mb"]))
    return {"best_cap_mb": best["cap_mb"], "best": best, "sweep": rows}


def interpolate_fit(fits: Dict[float, LabFit], rate_gbps: float) -> LabFit:
    """The ring fit at a rate between measured ones: log B, α and CPU time per byte linear in log(rate)
    between the two nearest measured rates (the nearest one outside their range)."""
    rates = sorted(fits)
    if rate_gbps <= rates[0] or len(rates) == 1:
        return fits[rates[0]]
    if rate_gbps >= rates[-1]:
        return fits[rates[-1]]
    hi = next(r for r in rates if r >= rate_gbps)
    lo = rates[rates.index(hi) - 1]
    w = math.log(rate_gbps / lo) / math.log(hi / lo)
    a, b = fits[lo], fits[hi]
    bw = math.exp((1 - w) * math.log(a.bw_Bps) + w * math.log(b.bw_Bps))
    return replace(a, alpha_s=(1 - w) * a.alpha_s + w * b.alpha_s, bw_Bps=bw,
                   cpu_s_per_byte=(1 - w) * a.cpu_s_per_byte + w * b.cpu_s_per_byte,
                   launch_s=(1 - w) * a.launch_s + w * b.launch_s,
                   intercept_s=2 * (a.n - 1) * ((1 - w) * a.alpha_s + w * b.alpha_s),
                   slope_s_per_B=2 * (a.n - 1) / a.n / bw, points={}, cpu_points={}, max_rel_residual=math.nan)
