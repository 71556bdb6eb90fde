"""Scaling efficiency: measured multi-process runs, the predictor's prediction for them, predicted curves.

1. Measured: the same training step (a ResNet, synthetic data, fixed per-rank batch, MFSGD wrapped in
   ``DistributedOptimizer(compression="fp16")``) at world size 1 and at each world size N asked for.
   ``E(N) = throughput(N) / (N · throughput(1)) = T(1) / T(N)`` (T: the slowest rank's step, median), and
   Lu et al.'s "actual average single-GPU training time": total time × GPUs ÷ work = ``T(N) · N / (N · b)``
   GPU-seconds per sample. Three ways to launch it:

   - spawn (the default): world size 1 in this process (no process group), then for each N of
     ``--world-sizes`` (default 2) N ranks spawned here: gloo on CPU, or ``--backend nccl``: one rank per
     visible GPU (cuda:rank). Every run uses the same torch threads per rank, ``cores // max(N)`` unless
     ``--threads`` says otherwise, so T(1) and T(N) compare like with like; where N exceeds the cores
     (4 ranks on a 2-core machine) the ranks oversubscribe them (``config.oversubscribed``) and E(N) mostly
     measures that contention.
   - torchrun (``WORLD_SIZE`` > 1 in the environment): every rank joins the default process group from the
     environment (nccl with GPUs, gloo without; ``--backend`` overrides; device cuda:LOCAL_RANK), rank 0
     measures world size 1 on its own (a DistributedOptimizer over the 1-rank group ``new_group([0])``, so
     it makes no collective) while the others wait at a barrier, then all ranks measure N = WORLD_SIZE;
     rank 0 gathers, analyses and writes the JSON and plots.
   - world size 1 only (``--world-sizes 1``, e.g. a machine with one GPU): the measured timeline alone,
     which drives the predicted curves.

2. Predicted for each measured N: the world-size-1 timeline of rank 0 (forward, backward with each
   bucket's ready time, optimizer) + a ring model whose α and B are fitted to allreduces timed on the
   same N ranks (reported), and the error against the measurement.
3. Predicted curves (N = 1..1024) for 8-GPU NVLink nodes with 400 Gb/s InfiniBand between them, fusedmf
   bucketing (fp16 at cap C, and the recommended cap) vs torch DDP's (25 MB fp32, fp32 or fp16 hook), from
   the measured timeline and, when the measurement is not a GPU's, from an illustrative ResNet-50 H200
   timeline (labelled synthetic) or a timeline from ``--timeline-json`` (a throughput JSON).

On CPUs the ranks share the machine's cores and memory bandwidth, which the predictor does not model
(it assumes each GPU computes as fast as one alone): the error says how much that matters here.
On GPUs the step runs bf16 params with fp32 masters under bf16 autocast (``--low-precision``, ``--amp``),
as the throughput benchmark's mfsgd case does; on CPUs everything is fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from types import SimpleNamespace
from typing import List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):  # run from a checkout: this checkout's fusedmf, and the harness beside us
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from fusedmf._ranks import process_group, spawn  # noqa: E402
from fusedmf.comm import DistributedOptimizer  # noqa: E402
from fusedmf.data import synthetic_imagenet  # noqa: E402
from fusedmf.optim import MFSGD  # noqa: E402
from harness import PhaseTimer, build_model, machine_info, summarize, sync, torchrun_env, write_json  # noqa: E402
from throughput import measured_timeline  # noqa: E402
from fusedmf.bench.predictor import (  # noqa: E402
DEFAULT_NS, NETWORKS, Network, Timeline, efficiency_curve, predict, recommend_bucket_cap,
                        resnet50_like_timeline, simulate)

LR, MOMENTUM = 0.1, 0.9
ALLREDUCE_SIZES = (1 << 12, 1 << 16, 1 << 20, 1 << 22)      # bytes of fp16 buffers for the α/B fit
ALLREDUCE_SIZES_GPU = (1 << 24, 1 << 26)                    # NCCL: large messages too (bandwidth-bound)
TARGETS = {8: 0.98, 64: 0.975}                             # docs/performance.md: E(8) one NVLink node, E(64) over IB


def _model_args(args) -> SimpleNamespace:
    return SimpleNamespace(model=args.model, channels_last=args.channels_last, low_dtype=args.low_dtype,
                           num_classes=args.num_classes, image_size=args.image_size, amp_dtype=args.amp_dtype,
                           warmup=args.warmup)


def _barrier(device: torch.device, group=None) -> None:
    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index])
    else:
        dist.barrier(group=group)


def _train(args, device: torch.device, rank: int, world_size: int, process_group=None) -> dict:
    """Timed DistributedOptimizer steps on this rank. ``world_size`` 1: no communication (no process group,
    or ``process_group`` of one rank); otherwise the default group."""
    torch.manual_seed(0)
    model = build_model(args.model, args.num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    low = args.low_dtype if device.type == "cuda" else None
    amp = args.amp_dtype if device.type == "cuda" else None
    if low is not None:
        model = model.to(low)                    # MFSGD keeps fp32 masters for low-precision params
    pdtype = next(model.parameters()).dtype
    dopt = DistributedOptimizer(MFSGD(model.parameters(), lr=LR, momentum=MOMENTUM), process_group=process_group,
                                compression="fp16", bucket_cap_mb=args.bucket_cap_mb, telemetry=True,
                                telemetry_history=args.warmup + args.steps + 1)
    x, y = synthetic_imagenet(args.batch, device, args.channels_last, image_size=args.image_size,
                              num_classes=args.num_classes, seed=100 + rank, dtype=pdtype)
    loss_fn = nn.CrossEntropyLoss()
    times, phases = [], []
    for i in range(args.warmup + args.steps):
        if world_size > 1:
            _barrier(device)
        sync(device)
        timer = PhaseTimer(device)              # host clock on CPUs, CUDA events on GPUs: no sync inside the step
        h0 = time.perf_counter()
        timer.mark()
        if amp is not None:
            with torch.autocast(device.type, dtype=amp):
                loss = loss_fn(model(x), y)
        else:
            loss = loss_fn(model(x), y)
        timer.mark()
        loss.backward()
        timer.mark()
        dopt.step()
        dopt.zero_grad(set_to_none=True)
        timer.mark()
        sync(device)
        h1 = time.perf_counter()
        if i >= args.warmup:
            times.append(h1 - h0)
            phases.append(tuple(timer.intervals()))
    tel = dopt.telemetry.steps[-args.steps:]
    exposed = [s.exposed_comm_s for s in tel if s.exposed_comm_s is not None]
    last = tel[-1].as_dict()
    ar = {}
    if world_size > 1:
        sizes = ALLREDUCE_SIZES + (ALLREDUCE_SIZES_GPU if device.type == "cuda" else ())
        for nbytes in sizes:
            buf = torch.randn(nbytes // 2, device=device).half()
            ts = []
            for _ in range(2 + args.allreduce_repeats):
                _barrier(device)
                sync(device)
                t0 = time.perf_counter()
                dist.all_reduce(buf)
                sync(device)
                ts.append(time.perf_counter() - t0)
            ar[nbytes] = summarize(ts[2:])["median_s"]
    dopt.remove_hooks()
    out = {"rank": rank, "world_size": world_size, "host": socket.gethostname(), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "threads": torch.get_num_threads(), "times": times, "phases": phases, "exposed": exposed,
           "last_step": last, "allreduce": ar, "layout": dopt.bucket_layout(), "backends_used": dopt.backends_used,
           "num_params": sum(p.numel() for p in model.parameters()), "param_dtype": str(pdtype).replace("torch.", "")}
    del model, dopt, x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _single(args, device: torch.device, process_group=None) -> dict:
    """World size 1: the timed steps and the timeline the predictor consumes (same process)."""
    single = _train(args, device, 0, 1, process_group=process_group)
    ph = [summarize([p[i] for p in single["phases"]])["median_s"] for i in range(3)]
    timeline = measured_timeline(_model_args(args), device, args.batch,
                               {"forward_median_s": ph[0], "backward_median_s": ph[1], "optimizer_median_s": ph[2]},
                               args.bucket_cap_mb, process_group=process_group)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"single": single, "t1": summarize(single["times"])["median_s"], "phases1": ph, "timeline": timeline}


def _spawned(rank, world_size, args, out_path):
    """One spawned rank (inside fusedmf._ranks.process_group): train, gather, rank 0 saves."""
    if args.backend == "gloo":
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True      # the best plain-PyTorch setting, for every case alike
    torch.set_num_threads(args.threads)
    res = _train(args, device, rank, world_size)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, res)
    if rank == 0:
        torch.save(everyone, out_path)


def fit_ring(allreduce: dict, n: int) -> dict:
    """Least squares t = a + b·S over the timed sizes -> α = a / (2(n-1)), B = 2(n-1)/n / b."""
    xs = [float(s) for s in allreduce]
    ys = [allreduce[s] for s in allreduce]
    k = len(xs)
    mx, my = sum(xs) / k, sum(ys) / k
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-30)
    a = my - b * mx
    b = max(b, 1e-15)
    a = max(a, 0.0)
    return {"alpha_s": a / (2 * (n - 1)), "bw_Bps": 2 * (n - 1) / n / b, "fit_intercept_s": a,
            "fit_slope_s_per_B": b, "points": {str(s): t for s, t in allreduce.items()}}


def measure(args, device: torch.device) -> dict:
    """Spawn mode: world size 1 here, then each N > 1 of ``args.world_sizes`` spawned."""
    torch.set_num_threads(args.threads)
    meas = _single(args, device)
    meas["runs"] = {}
    os.makedirs(args.out, exist_ok=True)
    for n in args.world_sizes:
        if n <= 1:
            continue
        tmp = os.path.join(args.out, f".scaling_{os.getpid()}_{n}.pt")
        spawn(_spawned, n, args, tmp, backend=args.backend, timeout_s=args.pg_timeout)
        meas["runs"][n] = torch.load(tmp, weights_only=False)
        os.remove(tmp)
    return meas


def measure_torchrun(args, env: dict, device: torch.device) -> Optional[dict]:
    """Torchrun mode (the default process group is up): rank 0 measures world size 1 on a 1-rank group while
    the others wait, then every rank measures N = WORLD_SIZE; rank 0 returns everything, the others None."""
    rank, world = env["rank"], env["world_size"]
    solo = dist.new_group([0])                   # every rank must create it; only rank 0 is a member
    meas = _single(args, device, process_group=solo) if rank == 0 else None
    _barrier(device)
    res = _train(args, device, rank, world)
    everyone = [None] * world
    dist.all_gather_object(everyone, res)
    if rank != 0:
        return None
    meas["runs"] = {world: everyone}
    return meas


def analyse(meas: dict, args) -> dict:
    """Measured points (N = 1 and every N run) and, per N, the prediction, its inputs and its error."""
    t1 = meas["t1"]
    tl = Timeline.from_dict(meas["timeline"]["timeline"])
    points = [{"n": 1, "step_s": t1, "throughput_img_s": args.batch / t1, "efficiency": 1.0,
               "avg_single_gpu_time_per_sample_s": t1 / args.batch, "repeats_s": meas["single"]["times"],
               "exposed_comm_s_median": None, "per_rank_s": [meas["single"]["times"]],
               "ranks": [_rank_summary(meas["single"])]}]
    predictions = []
    label = {"gloo": "gloo, loopback", "nccl": "nccl"}.get(args.backend, args.backend)
    for n in sorted(meas["runs"]):
        ranks = sorted(meas["runs"][n], key=lambda r: r["rank"])
        steps = [max(r["times"][i] for r in ranks) for i in range(len(ranks[0]["times"]))]   # the slowest rank
        tn = summarize(steps)["median_s"]
        e_meas = t1 / tn
        points.append({"n": n, "step_s": tn, "throughput_img_s": n * args.batch / tn, "efficiency": e_meas,
                       "avg_single_gpu_time_per_sample_s": tn * n / (n * args.batch), "repeats_s": steps,
                       "exposed_comm_s_median": summarize(ranks[0]["exposed"])["median_s"] if ranks[0]["exposed"] else None,
                       "per_rank_s": [r["times"] for r in ranks], "ranks": [_rank_summary(r) for r in ranks]})
        fit = fit_ring(ranks[0]["allreduce"], n)
        net = Network(f"fitted ({label}, {n} ranks)", gpus_per_node=n, intra_bw=fit["bw_Bps"], intra_alpha=fit["alpha_s"])
        pred_meas = simulate(tl, tl.buckets, n, net) if tl.buckets else None
        pred_rebucket = predict(tl, n, net, scheme="fusedmf-fp16", cap_mb=args.bucket_cap_mb)
        pm = pred_meas or pred_rebucket
        predictions.append({
            "n": n, "network": net.as_dict(), "network_fit": fit, "timeline_used": tl.as_dict(),
            "timeline_from": "rank 0, world size 1 (the measured single-GPU step of this run)",
            "measured_buckets": pred_meas.as_dict(schedule=True) if pred_meas else None,
            "rebucketed_fusedmf_fp16": pred_rebucket.as_dict(schedule=True),
            "predicted_efficiency": pm.efficiency, "predicted_step_s": pm.step_s,
            "measured_efficiency": e_meas, "measured_step_s": tn,
            "error_efficiency": pm.efficiency - e_meas, "relative_error_step": (pm.step_s - tn) / tn,
            "note": ("the predictor assumes every rank computes as fast as one alone; ranks sharing CPU cores "
                     "and memory bandwidth do not, which is most of the error on a CPU machine"
                     + (f" ({n} ranks x {args.threads} thread(s) on {os.cpu_count()} cores: oversubscribed)"
                        if n * args.threads > (os.cpu_count() or 1) and args.device_type == "cpu" else ""))
            if args.device_type == "cpu" else
            "the predictor does not model communication kernels slowing compute (SMs, memory bandwidth), "
            "stragglers, or the pack/cast time outside backward"})
    measured = {"points": points,
                "criterion": "actual average single-GPU training time (Lu, Lu, Liang 2020) = total time x GPUs / samples"}
    return {"measured": measured, "prediction": predictions[-1] if predictions else None,
            "predictions": predictions, "single_gpu_phases_s": meas["phases1"]}


def _rank_summary(r: dict) -> dict:
    return {"rank": r["rank"], "host": r.get("host"), "device": r.get("device"), "device_name": r.get("device_name"),
            "threads": r.get("threads"), "step_s_median": summarize(r["times"])["median_s"],
            "exposed_comm_s_median": summarize(r["exposed"])["median_s"] if r["exposed"] else None,
            "allreduce_s": {str(k): v for k, v in r["allreduce"].items()}}


def curves(timeline: Timeline, ns=DEFAULT_NS) -> dict:
    out = {"timeline_source": timeline.source, "single_gpu_s": timeline.single_gpu_s, "networks": {}}
    for netname in ("nvlink-ib400",):
        net = NETWORKS[netname]
        rec8 = recommend_bucket_cap(timeline, net, 8)
        rec64 = recommend_bucket_cap(timeline, net, 64)
        series = {
            "fusedmf-fp16 cap 25MB": efficiency_curve(timeline, net, ns=ns, scheme="fusedmf-fp16", cap_mb=25.0),
            f"fusedmf-fp16 cap {rec64['best_cap_mb']}MB (recommended at 64)":
                efficiency_curve(timeline, net, ns=ns, scheme="fusedmf-fp16", cap_mb=rec64["best_cap_mb"]),
            "ddp fp32 25MB": efficiency_curve(timeline, net, ns=ns, scheme="ddp-fp32", cap_mb=25.0),
            "ddp fp16-hook 25MB": efficiency_curve(timeline, net, ns=ns, scheme="ddp-fp16", cap_mb=25.0),
        }
        for s in series.values():
            for r in s:
                r["avg_single_gpu_time_per_sample_s"] = (r["step_s"] / timeline.batch) if timeline.batch else None
        out["networks"][netname] = {"network": net.as_dict(), "series": series,
                                    "recommended_cap": {"8": rec8, "64": rec64},
                                    "schedule_64": {
                                        "fusedmf-fp16 recommended": predict(timeline, 64, net, scheme="fusedmf-fp16",
                                                                            cap_mb=rec64["best_cap_mb"]).schedule,
                                        "ddp fp32 25MB": predict(timeline, 64, net, scheme="ddp-fp32").schedule}}
    return out


def _plots(result: dict, out_base: str) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result["plots_skipped"] = "matplotlib is not installed"
        return []
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    ms = FuncFormatter(lambda x, _pos: f"{x:g}")
    paths = []
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for label, cur in result["curves"].items():
        style = "--" if label.startswith("illustrative") else "-"
        for netname, d in cur["networks"].items():
            for sname, s in d["series"].items():
                ax.plot([r["n"] for r in s], [r["efficiency"] for r in s], style, marker=".",
                        label=f"predicted, {label}: {sname} ({netname})")
    m = result["measured"]["points"]
    ax.scatter([p["n"] for p in m], [p["efficiency"] for p in m], color="k", zorder=5,
               label="measured on this machine (gloo ranks)" if result["config"]["device"] == "cpu"
               else "measured on this machine")
    preds = result.get("predictions") or []
    if preds:
        ax.scatter([p["n"] for p in preds], [p["predicted_efficiency"] for p in preds], marker="x", color="r",
                   zorder=6, label="predicted for the measured runs (their timeline and fitted ring)")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    ax.set_xlabel("GPUs / ranks (N)")
    ax.set_ylabel("scaling efficiency E(N) = T(1)/T(N)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))     # outside: no point hidden under it
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_base + "_efficiency.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    # one bar per bucket (its allreduce, predicted at N = 64), one row per bucket, grouped by scheme
    label, cur = next(iter(result["curves"].items()))
    netname, net = next(iter(cur["networks"].items()))
    rows = [(scheme, k, b) for scheme, sch in net["schedule_64"].items() for k, b in enumerate(sch)]
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.32 * len(rows)))
    colors = {scheme: f"C{i}" for i, scheme in enumerate(net["schedule_64"])}
    for row, (scheme, k, b) in enumerate(rows):
        ax.barh(row, (b["end_s"] - b["start_s"]) * 1e3, left=b["start_s"] * 1e3, height=0.6, color=colors[scheme],
                label=f"{scheme}: allreduce (predicted)" if k == 0 else None)
        ax.plot([b["ready_s"] * 1e3], [row], "k|", markersize=10, label="bucket ready (measured)" if row == 0 else None)
    ax.axvline(result["curves_timeline_backward_s"] * 1e3, color="r", ls="--", label="backward ends (measured)")
    ax.set_yticks(range(len(rows)), [f"{scheme} #{k} ({b['bytes'] / 2**20:.2f} MB)" for scheme, k, b in rows],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(b["end_s"] for _, _, b in rows) * 1e3 * 1.02)   # the whole backward, from its start
    ax.xaxis.set_major_locator(MaxNLocator(8))
    ax.xaxis.set_major_formatter(ms)
    ax.set_xlabel(f"ms after backward starts (N = 64 over {netname}, {label})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    paths.append(out_base + "_timeline.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    tp = result.get("throughput_points")
    if tp:
        fig, ax = plt.subplots(figsize=(6, 4))
        for case in sorted({r["case"] for r in tp}):
            rs = [r for r in tp if r["case"] == case and r.get("images_per_s")]
            ax.plot([r["batch"] for r in rs], [r["images_per_s"] for r in rs], marker="o", label=case)
        ax.set_xlabel("per-GPU batch")
        ax.set_ylabel("images/s")
        ax.legend()
        fig.tight_layout()
        paths.append(out_base + "_throughput.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def defaults(device_type: str, quick: bool) -> dict:
    """The model and step counts for a device type ("cpu" | "cuda"); the same signature in every driver."""
    if device_type == "cuda":          # the regime of the MF method: a small per-GPU batch
        if quick:
            return {"model": "resnet50", "batch": 32, "image_size": 224, "steps": 10, "warmup": 5,
                    "num_classes": 1000, "allreduce_repeats": 5}
        return {"model": "resnet50", "batch": 32, "image_size": 224, "steps": 30, "warmup": 10, "num_classes": 1000,
                "allreduce_repeats": 10}
    if quick:
        return {"model": "tiny", "batch": 4, "image_size": 32, "steps": 4, "warmup": 2, "num_classes": 10,
                "allreduce_repeats": 3}
    return {"model": "small", "batch": 4, "image_size": 64, "steps": 8, "warmup": 3, "num_classes": 10,
            "allreduce_repeats": 5}


_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def add_arguments(ap: argparse.ArgumentParser, default_out: str) -> None:
    ap.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                    help="gloo: CPU ranks; nccl: one rank per GPU (cuda:LOCAL_RANK). Default: nccl when the "
                         "device is cuda, else gloo")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda with --backend nccl or under torchrun on a machine with GPUs, else cpu")
    ap.add_argument("--world-sizes", "--world-size", dest="world_sizes", type=int, nargs="+", default=None,
                    help="spawn mode: the world sizes N to measure, one run each (default: 2 ranks with gloo, every "
                         "visible GPU with nccl); 1 alone = the single-GPU timeline only. Under torchrun: WORLD_SIZE")
    ap.add_argument("--model", default=None,
                    help="tiny | small | resnet18 | resnet50 (default: small on CPU, tiny with --quick; resnet50 on GPU)")
    ap.add_argument("--batch", type=int, default=None, help="per-rank batch (fixed as N grows)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--num-classes", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--allreduce-repeats", type=int, default=None)
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0)
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "none"), help="GPU autocast dtype")
    ap.add_argument("--low-precision", default="bf16", choices=("bf16", "fp16", "none"),
                    help="GPU: the params' dtype (MFSGD keeps fp32 masters)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per rank, the same for every world size (default: cores // max(N); "
                         "under torchrun cores // LOCAL_WORLD_SIZE)")
    ap.add_argument("--timeline-json", default=None,
                    help="a throughput JSON (e.g. from a GPU) whose timeline drives the predicted curves")
    ap.add_argument("--pg-timeout", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="tiny model, 32x32 images, 4 steps: a smoke run")
    ap.add_argument("--out", default=default_out)


def resolve(args, env: Optional[dict]) -> torch.device:
    """Fill in the device, backend, world sizes, threads and size defaults; returns this rank's device."""
    cuda = torch.cuda.is_available()
    if args.device is None:
        args.device = "cuda" if args.backend == "nccl" or (env and cuda and args.backend != "gloo") else "cpu"
    if args.device == "cuda" and not cuda:
        raise SystemExit("scaling: --device cuda (or --backend nccl) but torch sees no GPU")
    if args.backend is None:
        args.backend = "nccl" if args.device == "cuda" else "gloo"
    if (args.backend, args.device) not in (("gloo", "cpu"), ("nccl", "cuda")):
        raise SystemExit(f"scaling: --backend {args.backend} with --device {args.device}: use gloo on cpu, nccl on cuda")
    args.device_type = args.device
    if env:
        args.launcher = "torchrun"
        if args.world_sizes and args.world_sizes != [env["world_size"]]:
            warnings.warn(f"--world-sizes {args.world_sizes} ignored under torchrun: WORLD_SIZE={env['world_size']}")
        args.world_sizes = [env["world_size"]]
        ranks_here = env["local_world_size"]
    else:
        args.launcher = "spawn"
        if not args.world_sizes:
            args.world_sizes = [torch.cuda.device_count()] if args.device == "cuda" else [2]
        args.world_sizes = sorted(set(args.world_sizes))
        if min(args.world_sizes) < 1:
            raise SystemExit(f"scaling: world sizes must be >= 1, got {args.world_sizes}")
        if args.device == "cuda" and max(args.world_sizes) > torch.cuda.device_count():
            raise SystemExit(f"scaling: {max(args.world_sizes)} nccl ranks need as many GPUs, "
                             f"{torch.cuda.device_count()} visible")
        ranks_here = max(args.world_sizes)
    for k, v in defaults(args.device, args.quick).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.amp_dtype, args.low_dtype = _DT[args.amp], _DT[args.low_precision]
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // ranks_here)
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        device = torch.device("cuda", env["local_rank"] if env else 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True      # the best plain-PyTorch setting, for every case alike
        return device
    return torch.device("cpu")


def run(args) -> Optional[dict]:
    """Measure, analyse, write JSON + plots. Under torchrun only rank 0 returns the result (others None)."""
    env = torchrun_env()
    device = resolve(args, env)
    start = time.perf_counter()
    if env:
        with process_group(args.backend, timeout_s=args.pg_timeout):   # NOTE [gloo teardown]
            meas = measure_torchrun(args, env, device)
        if meas is None:
            return None
    else:
        meas = measure(args, device)
    machine = machine_info(device)
    runs = [n for n in args.world_sizes if n > 1]
    ranks_here = env["local_world_size"] if env else max(args.world_sizes)
    result = {"schema": 1, "bench": "scaling", "machine": machine,
              "config": {"device": args.device, "backend": args.backend, "launcher": args.launcher,
                         "world_size": max(args.world_sizes), "world_sizes": runs, "model": args.model,
                         "batch_per_rank": args.batch, "image_size": args.image_size, "steps": args.steps,
                         "warmup": args.warmup, "bucket_cap_mb": args.bucket_cap_mb, "compression": "fp16",
                         "threads_per_rank": args.threads, "channels_last": args.channels_last,
                         "params": (f"{args.low_precision} + fp32 masters, autocast {args.amp}"
                                    if args.device == "cuda" and args.low_dtype is not None else
                                    meas["single"]["param_dtype"]),
                         "cpu_cores": os.cpu_count(),
                         "oversubscribed": args.device == "cpu" and ranks_here * args.threads > (os.cpu_count() or 1),
                         "num_params": meas["single"]["num_params"], "quick": args.quick,
                         "optimizer": f"DistributedOptimizer(MFSGD lr={LR} momentum={MOMENTUM}, fp16)"}}
    result.update(analyse(meas, args))
    result["backends_used"] = {"N=1": meas["single"]["backends_used"],
                               **{f"N={n}": [r["backends_used"] for r in rs] for n, rs in meas["runs"].items()}}
    result["measured_timeline"] = meas["timeline"]
    # keys name the timeline the predicted curves replay (NOTE: curves are predictions, never measurements)
    tls = {"timeline measured here": Timeline.from_dict(meas["timeline"]["timeline"])}
    if args.timeline_json:
        with open(args.timeline_json) as f:
            tj = json.load(f)
        tls[f"from {os.path.basename(args.timeline_json)}"] = Timeline.from_dict(tj["timeline"]["timeline"])
        result["throughput_points"] = [{k: r.get(k) for k in ("case", "batch", "images_per_s")} for r in tj["cases"]]
    elif args.device == "cpu":
        tl = resnet50_like_timeline(0.010)
        tl.batch = 32
        tl.source += "; illustrative H200 ResNet-50 step at batch 32 of 10 ms (docs/performance.md), not a measurement"
        tls["illustrative timeline (synthetic ResNet-50, H200, b32)"] = tl
    result["curves"] = {label: curves(tl) for label, tl in tls.items()}
    result["predicted_targets"] = _targets(result["curves"])
    last_tl = list(tls.values())[0]
    result["curves_timeline_backward_s"] = last_tl.backward_s
    result["elapsed_s"] = time.perf_counter() - start
    path = write_json(result, args.out, f"scaling_{args.device}")
    result["paths"] = {"json": path, "plots": _plots(result, path[:-5])}
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    return result


def _targets(all_curves: dict) -> dict:
    """Predicted E(8) (one NVLink node) and E(64) (8 nodes over 400 Gb/s IB) per timeline and bucketing,
    next to docs/performance.md's targets."""
    out = {"targets": {str(k): v for k, v in TARGETS.items()}, "network": "nvlink-ib400", "by_timeline": {}}
    for label, cur in all_curves.items():
        d = cur["networks"]["nvlink-ib400"]
        out["by_timeline"][label] = {
            sname: {str(n): next(r["efficiency"] for r in s if r["n"] == n) for n in TARGETS}
            for sname, s in d["series"].items()}
    return out


def format_table(result: dict) -> str:
    c, m = result["config"], result["machine"]
    ns = ", ".join(str(n) for n in c["world_sizes"]) or "none (world size 1 only)"
    lines = [f"scaling: {c['launcher']}, {c['backend']} ranks N = {ns} on {m.get('device_name')}, {c['model']} "
             f"({c['num_params'] / 1e6:.2f}M params) {c['image_size']}x{c['image_size']}, batch {c['batch_per_rank']}/rank, "
             f"{c['threads_per_rank']} thread(s)/rank{' (cores oversubscribed)' if c.get('oversubscribed') else ''}, "
             f"params {c['params']}, fp16 buckets cap {c['bucket_cap_mb']} MB, torch {m['torch']}"]
    header = f"{'N':>4} {'step ms':>9} {'img/s':>9} {'E(N)':>7} {'GPU-s/sample':>13} {'exposed comm ms':>16}"
    lines += ["measured", header, "-" * len(header)]
    for pt in result["measured"]["points"]:
        ex = pt.get("exposed_comm_s_median")
        lines.append(f"{pt['n']:>4} {pt['step_s'] * 1e3:>9.2f} {pt['throughput_img_s']:>9.1f} {pt['efficiency']:>7.3f} "
                     f"{pt['avg_single_gpu_time_per_sample_s'] * 1e3:>11.3f}ms {'-' if ex is None else f'{ex * 1e3:.2f}':>16}")
    preds = result.get("predictions") or []
    if preds:
        h2 = (f"{'N':>4} {'E measured':>10} {'E predicted':>11} {'error':>7} {'step ms meas':>12} "
              f"{'step ms pred':>12} {'step err':>9}")
        lines += ["the predictor against the measured runs", h2, "-" * len(h2)]
        for p in preds:
            lines.append(f"{p['n']:>4} {p['measured_efficiency']:>10.3f} {p['predicted_efficiency']:>11.3f} "
                         f"{p['error_efficiency']:>+7.3f} {p['measured_step_s'] * 1e3:>12.2f} "
                         f"{p['predicted_step_s'] * 1e3:>12.2f} {p['relative_error_step']:>+9.1%}")
    for p in preds:
        fit, tl = p["network_fit"], p["timeline_used"]
        lines.append(f"predicted for N={p['n']}: E {p['predicted_efficiency']:.3f} (measured "
                     f"{p['measured_efficiency']:.3f}, error {p['error_efficiency']:+.3f}), step "
                     f"{p['predicted_step_s'] * 1e3:.2f} ms ({p['relative_error_step']:+.1%} vs measured)")
        lines.append(f"  inputs: fwd {tl['forward_s'] * 1e3:.2f} ms, bwd {tl['backward_s'] * 1e3:.2f} ms, opt "
                     f"{tl['optimizer_s'] * 1e3:.2f} ms, {len(tl['buckets'])} bucket(s) "
                     f"[{', '.join('%.2f ms/%.0f KB' % (b['ready_s'] * 1e3, b['nbytes'] / 1e3) for b in tl['buckets'])}]; "
                     f"ring fitted to allreduces timed on the {p['n']} ranks: alpha {fit['alpha_s'] * 1e6:.1f} us, "
                     f"B {fit['bw_Bps'] / 1e9:.2f} GB/s")
    for label, cur in result["curves"].items():
        for netname, d in cur["networks"].items():
            lines.append(f"predicted curves, {label}, {netname} (T(1) {cur['single_gpu_s'] * 1e3:.2f} ms):")
            cols = [8, 64, 256, 1024]
            lines.append(f"  {'bucketing':<44} " + " ".join(f"{'E(' + str(n) + ')':>8}" for n in cols))
            for sname, s in d["series"].items():
                by = {r["n"]: r for r in s}
                lines.append(f"  {sname:<44} " + " ".join(f"{by[n]['efficiency']:>8.4f}" for n in cols))
            rc = d["recommended_cap"]
            lines.append(f"  recommended fusedmf fp16 cap: {rc['8']['best_cap_mb']} MB at N=8, "
                         f"{rc['64']['best_cap_mb']} MB at N=64")
    t = result["predicted_targets"]["targets"]
    lines.append(f"targets (docs/performance.md): E(8) >= {t['8']} on one NVLink node, E(64) >= {t['64']} over 400 Gb/s IB")
    plots = result["paths"]["plots"]
    lines.append(f"wrote {result['paths']['json']}" + (f" + {len(plots)} PNG" if plots else
                                                     f" (no plots: {result.get('plots_skipped')})")
                 + f" in {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap, os.path.join(ROOT, "benchmarks", "out", "scaling"))
    args = ap.parse_args(argv)
    result = run(args)
    if result is not None:                       # torchrun: rank 0 prints
        print(format_table(result))
    return result


if __name__ == "__main__":
    main()
