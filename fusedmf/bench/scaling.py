"""Scaling efficiency: measured multi-process runs, the predictor's prediction for them, predicted curves.

1. Measured: the same training step (small ResNet, synthetic data, fixed per-rank batch, MFSGD wrapped in
   ``DistributedOptimizer(compression="fp16")``) at world size 1 (this process, no process group) and at
   world size N (N gloo ranks spawned on this machine; or under torchrun with NCCL, one rank per GPU).
   ``E(N) = throughput(N) / (N · throughput(1)) = T(1) / T(N)``, and Lu et al.'s "actual average
   single-GPU training time": total time × GPUs ÷ work = ``T(N) · N / (N · b)`` GPU-seconds per sample.
2. Predicted for the same configuration: the world-size-1 timeline (forward, backward with each
   bucket's ready time, optimizer) + a ring model whose α and B are fitted to allreduces timed on the
   same ranks (reported), and the error against the measurement.
3. Predicted curves (N = 1..1024) for 8-GPU NVLink nodes with 400 Gb/s InfiniBand between them, fusedmf
   bucketing (fp16 at cap C, and the recommended cap) vs torch DDP's (25 MB fp32, fp32 or fp16 hook), from
   the measured timeline and, when the measurement is not a GPU's, from an illustrative ResNet-50 H200
   timeline (labelled synthetic) or a timeline from ``--timeline-json`` (a throughput JSON).

On CPUs the ranks share the machine's cores and memory bandwidth, which the predictor does not model
(it assumes each GPU computes as fast as one alone): the error says how much that matters here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import time
import warnings
from types import SimpleNamespace
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ._common import machine_info, summarize, sync, write_json
from .predictor import (DEFAULT_NS, NETWORKS, Network, Timeline, efficiency_curve, predict, recommend_bucket_cap,
                        resnet50_like_timeline, simulate)

LR, MOMENTUM = 0.1, 0.9
ALLREDUCE_SIZES = (1 << 12, 1 << 16, 1 << 20, 1 << 22)      # bytes of fp16 buffers for the α/B fit


def _model_args(args) -> SimpleNamespace:
    return SimpleNamespace(model=args.model, channels_last=args.channels_last, low_dtype=None,
                           num_classes=args.num_classes, image_size=args.image_size, amp_dtype=None,
                           warmup=args.warmup)


def _train(args, device: torch.device, rank: int, world_size: int) -> dict:
    """Timed DistributedOptimizer steps on this rank (world size 1: no process group)."""
    from ..comm import DistributedOptimizer
    from ..data import synthetic_imagenet
    from ..optim import MFSGD
    from .throughput import build_model

    torch.manual_seed(0)
    model = build_model(args.model, args.num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dopt = DistributedOptimizer(MFSGD(model.parameters(), lr=LR, momentum=MOMENTUM), compression="fp16",
                                bucket_cap_mb=args.bucket_cap_mb, telemetry=True)
    x, y = synthetic_imagenet(args.batch, device, args.channels_last, image_size=args.image_size,
                              num_classes=args.num_classes, seed=100 + rank)
    loss_fn = nn.CrossEntropyLoss()
    times, phases = [], []
    for i in range(args.warmup + args.steps):
        if world_size > 1:
            dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        dopt.step()
        dopt.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        if i >= args.warmup:
            times.append(t3 - t0)
            phases.append((t1 - t0, t2 - t1, t3 - t2))
    tel = dopt.telemetry.steps[-args.steps:]
    exposed = [s.exposed_comm_s for s in tel if s.exposed_comm_s is not None]
    last = tel[-1].as_dict()
    ar = {}
    if world_size > 1:
        for nbytes in ALLREDUCE_SIZES:
            buf = torch.randn(nbytes // 2, device=device).half()
            ts = []
            for _ in range(2 + args.allreduce_repeats):
                dist.barrier()
                sync(device)
                t0 = time.perf_counter()
                dist.all_reduce(buf)
                sync(device)
                ts.append(time.perf_counter() - t0)
            ar[nbytes] = summarize(ts[2:])["median_s"]
    dopt.remove_hooks()
    return {"rank": rank, "times": times, "phases": phases, "exposed": exposed, "last_step": last,
            "allreduce": ar, "layout": dopt.bucket_layout(), "num_params": sum(p.numel() for p in model.parameters())}


def _spawned(rank, world_size, port, args, out_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=args.pg_timeout))
    try:
        _rank_main(rank, world_size, args, out_path, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def _rank_main(rank, world_size, args, out_path, device):
    res = _train(args, device, rank, world_size)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, res)
    if rank == 0:
        torch.save(everyone, out_path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def measure(args) -> dict:
    """World size 1 here, then world size N spawned (gloo) or joined (torchrun)."""
    from .throughput import record_timeline

    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    single = _train(args, device, 0, 1)
    t1 = summarize(single["times"])["median_s"]
    ph = [summarize([p[i] for p in single["phases"]])["median_s"] for i in range(3)]
    timeline = record_timeline(_model_args(args), device, args.batch,
                               {"forward_median_s": ph[0], "backward_median_s": ph[1], "optimizer_median_s": ph[2]},
                               args.bucket_cap_mb)
    tmp = os.path.join(args.out, f".scaling_{os.getpid()}.pt")
    os.makedirs(args.out, exist_ok=True)
    torch.multiprocessing.spawn(_spawned, args=(args.world_size, _free_port(), args, tmp), nprocs=args.world_size)
    ranks = torch.load(tmp, weights_only=False)
    os.remove(tmp)
    return {"single": single, "t1": t1, "phases1": ph, "timeline": timeline, "ranks": ranks}


def analyse(meas: dict, args) -> dict:
    n = args.world_size
    ranks = meas["ranks"]
    steps = [max(r["times"][i] for r in ranks) for i in range(len(ranks[0]["times"]))]   # the slowest rank
    tn = summarize(steps)["median_s"]
    t1 = meas["t1"]
    tl = Timeline.from_dict(meas["timeline"]["timeline"])
    fit = fit_ring(ranks[0]["allreduce"], n)
    net = Network(f"fitted ({'gloo, loopback' if args.backend == 'gloo' else args.backend})", gpus_per_node=n,
                  intra_bw=fit["bw_Bps"], intra_alpha=fit["alpha_s"])
    pred_meas = simulate(tl, tl.buckets, n, net) if tl.buckets else None
    pred_rebucket = predict(tl, n, net, scheme="fusedmf-fp16", cap_mb=args.bucket_cap_mb)
    e_meas = t1 / tn
    measured = {
        "points": [
            {"n": 1, "step_s": t1, "throughput_img_s": args.batch / t1, "efficiency": 1.0,
             "avg_single_gpu_time_per_sample_s": t1 / args.batch, "repeats_s": meas["single"]["times"]},
            {"n": n, "step_s": tn, "throughput_img_s": n * args.batch / tn, "efficiency": e_meas,
             "avg_single_gpu_time_per_sample_s": tn * n / (n * args.batch), "repeats_s": steps,
             "exposed_comm_s_median": summarize(ranks[0]["exposed"])["median_s"] if ranks[0]["exposed"] else None,
             "per_rank_s": [r["times"] for r in ranks]}],
        "criterion": "actual average single-GPU training time (Lu, Lu, Liang 2020) = total time x GPUs / samples",
    }
    pm = pred_meas or pred_rebucket
    prediction = {"network": net.as_dict(), "network_fit": fit, "timeline_used": tl.as_dict(),
                  "measured_buckets": pred_meas.as_dict(schedule=True) if pred_meas else None,
                  "rebucketed_fusedmf_fp16": pred_rebucket.as_dict(schedule=True),
                  "predicted_efficiency": pm.efficiency, "predicted_step_s": pm.step_s,
                  "error_efficiency": pm.efficiency - e_meas,
                  "relative_error_step": (pm.step_s - tn) / tn,
                  "note": "the predictor assumes every rank computes as fast as one alone; ranks sharing CPU cores "
                          "and memory bandwidth do not, which is most of the error on a CPU machine"}
    return {"measured": measured, "prediction": prediction, "single_gpu_phases_s": meas["phases1"]}


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
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, cur in result["curves"].items():
        for netname, d in cur["networks"].items():
            for sname, s in d["series"].items():
                ax.plot([r["n"] for r in s], [r["efficiency"] for r in s], marker=".",
                        label=f"{label}: {sname} ({netname})")
    m = result["measured"]["points"]
    ax.scatter([p["n"] for p in m], [p["efficiency"] for p in m], color="k", zorder=5, label="measured (this machine)")
    p = result["prediction"]
    ax.scatter([result["config"]["world_size"]], [p["predicted_efficiency"]], marker="x", color="r", zorder=6,
               label="predicted for the measured run")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs (N)")
    ax.set_ylabel("efficiency T(1)/T(N)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_base + "_efficiency.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    cur = next(iter(result["curves"].values()))
    sched = next(iter(cur["networks"].values()))["schedule_64"]
    for row, (name, sch) in enumerate(sched.items()):
        for b in sch:
            ax.barh(row, b["end_s"] - b["start_s"], left=b["start_s"], height=0.6)
            ax.plot([b["ready_s"]], [row], "k|")
    ax.axvline(cur_bwd := result["curves_timeline_backward_s"], color="r", ls="--", label="backward end")
    ax.set_yticks(range(len(sched)), list(sched))
    ax.set_xlabel("s after backward start (N=64, predicted)")
    ax.legend(fontsize=7)
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
    del cur_bwd
    return paths


def defaults(quick: bool) -> dict:
    if quick:
        return {"model": "tiny", "batch": 4, "image_size": 32, "steps": 4, "warmup": 2, "num_classes": 10,
                "allreduce_repeats": 3}
    return {"model": "small", "batch": 4, "image_size": 64, "steps": 8, "warmup": 3, "num_classes": 10,
            "allreduce_repeats": 5}


def add_arguments(ap: argparse.ArgumentParser, default_out: str) -> None:
    ap.add_argument("--backend", choices=("gloo",), default="gloo",
                    help="gloo ranks spawned on this machine (torchrun + NCCL: not wired up yet)")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--model", default=None, help="tiny | small | resnet18 | resnet50 (default: small; tiny with --quick)")
    ap.add_argument("--batch", type=int, default=None, help="per-rank batch (fixed as N grows)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--num-classes", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--allreduce-repeats", type=int, default=None)
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0)
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    ap.add_argument("--timeline-json", default=None,
                    help="a throughput JSON (e.g. from a GPU) whose timeline drives the predicted curves")
    ap.add_argument("--pg-timeout", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="tiny model, 32x32 images, 4 steps: a smoke run")
    ap.add_argument("--out", default=default_out)


def run(args) -> dict:
    d = defaults(args.quick)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.world_size)
    start = time.perf_counter()
    machine = machine_info(torch.device("cpu"))
    meas = measure(args)
    result = {"schema": 1, "bench": "scaling", "machine": machine,
              "config": {"device": "cpu", "backend": args.backend, "world_size": args.world_size, "model": args.model,
                         "batch_per_rank": args.batch, "image_size": args.image_size, "steps": args.steps,
                         "warmup": args.warmup, "bucket_cap_mb": args.bucket_cap_mb, "compression": "fp16",
                         "threads_per_rank": args.threads, "channels_last": args.channels_last,
                         "num_params": meas["ranks"][0]["num_params"], "quick": args.quick,
                         "optimizer": f"DistributedOptimizer(MFSGD lr={LR} momentum={MOMENTUM}, fp16)"}}
    result.update(analyse(meas, args))
    result["measured_timeline"] = meas["timeline"]
    tls = {"measured (this machine)": Timeline.from_dict(meas["timeline"]["timeline"])}
    if args.timeline_json:
        with open(args.timeline_json) as f:
            tj = json.load(f)
        tls[f"from {os.path.basename(args.timeline_json)}"] = Timeline.from_dict(tj["timeline"]["timeline"])
        result["throughput_points"] = [{k: r.get(k) for k in ("case", "batch", "images_per_s")} for r in tj["cases"]]
    else:
        tl = resnet50_like_timeline(0.010)
        tl.batch = 32
        tl.source += "; illustrative H200 ResNet-50 step at batch 32 of 10 ms (performance.md), not a measurement"
        tls["illustrative ResNet-50 H200 b32 (synthetic)"] = tl
    result["curves"] = {label: curves(tl) for label, tl in tls.items()}
    last_tl = list(tls.values())[0]
    result["curves_timeline_backward_s"] = last_tl.backward_s
    result["elapsed_s"] = time.perf_counter() - start
    path = write_json(result, args.out, "scaling_cpu")
    result["paths"] = {"json": path, "plots": _plots(result, path[:-5])}
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    return result


def format_table(result: dict) -> str:
    c, m = result["config"], result["machine"]
    p = result["prediction"]
    lines = [f"scaling: {c['world_size']} {c['backend']} ranks on {m.get('device_name')}, {c['model']} "
             f"({c['num_params'] / 1e6:.2f}M params) {c['image_size']}x{c['image_size']}, batch {c['batch_per_rank']}/rank, "
             f"{c['threads_per_rank']} thread(s)/rank, fp16 buckets cap {c['bucket_cap_mb']} MB, torch {m['torch']}"]
    header = f"{'N':>4} {'step ms':>9} {'img/s':>9} {'E(N)':>7} {'GPU-s/sample':>13} {'exposed comm ms':>16}"
    lines += ["measured", header, "-" * len(header)]
    for pt in result["measured"]["points"]:
        ex = pt.get("exposed_comm_s_median")
        lines.append(f"{pt['n']:>4} {pt['step_s'] * 1e3:>9.2f} {pt['throughput_img_s']:>9.1f} {pt['efficiency']:>7.3f} "
                     f"{pt['avg_single_gpu_time_per_sample_s'] * 1e3:>11.3f}ms {'-' if ex is None else f'{ex * 1e3:.2f}':>16}")
    net, fit, tl = p["network"], p["network_fit"], p["timeline_used"]
    lines.append(f"predicted for N={c['world_size']}: E {p['predicted_efficiency']:.3f} (measured "
                 f"{result['measured']['points'][1]['efficiency']:.3f}, error {p['error_efficiency']:+.3f}), step "
                 f"{p['predicted_step_s'] * 1e3:.2f} ms ({p['relative_error_step']:+.1%} vs measured)")
    lines.append(f"  inputs: fwd {tl['forward_s'] * 1e3:.2f} ms, bwd {tl['backward_s'] * 1e3:.2f} ms, opt "
                 f"{tl['optimizer_s'] * 1e3:.2f} ms, {len(tl['buckets'])} bucket(s) "
                 f"[{', '.join('%.2f ms/%.0f KB' % (b['ready_s'] * 1e3, b['nbytes'] / 1e3) for b in tl['buckets'])}]; "
                 f"ring fitted to timed allreduces: alpha {fit['alpha_s'] * 1e6:.1f} us, B {fit['bw_Bps'] / 1e9:.2f} GB/s")
    for label, cur in result["curves"].items():
        for netname, d in cur["networks"].items():
            lines.append(f"predicted curves, {label}, {netname} (T(1) {cur['single_gpu_s'] * 1e3:.2f} ms):")
            ns = [8, 64, 256, 1024]
            lines.append(f"  {'bucketing':<44} " + " ".join(f"{'E(' + str(n) + ')':>8}" for n in ns))
            for sname, s in d["series"].items():
                by = {r["n"]: r for r in s}
                lines.append(f"  {sname:<44} " + " ".join(f"{by[n]['efficiency']:>8.4f}" for n in ns))
            rc = d["recommended_cap"]
            lines.append(f"  recommended fusedmf fp16 cap: {rc['8']['best_cap_mb']} MB at N=8, "
                         f"{rc['64']['best_cap_mb']} MB at N=64")
    plots = result["paths"]["plots"]
    lines.append(f"wrote {result['paths']['json']}" + (f" + {len(plots)} PNG" if plots else
                                                     f" (no plots: {result.get('plots_skipped')})")
                 + f" in {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, default_out: Optional[str] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap, default_out or os.path.join("benchmarks", "out", "scaling"))
    args = ap.parse_args(argv)
    result = run(args)
    print(format_table(result))
    return result
