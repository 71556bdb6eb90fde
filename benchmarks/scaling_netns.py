"""Scaling efficiency over a shaped network: ranks in the network lab (fusedmf.bench.netlab), each link rate-limited.

    python -m fusedmf.bench scaling --netns --bandwidths 0.1 0.3 1 3 10      # as root; Gb/s per link
    python -m fusedmf.bench scaling --netns --quick                         # a smoke run (minutes)

For each bandwidth and configuration, E(N) = T(1) / T(N) at a fixed per-rank batch (T: the slowest rank's
step, median over the timed steps; T(1): the plain single-rank step of the same model and optimizer, no
wrapper, measured alone), next to the prediction of fusedmf.bench.lab_model from world-size-1 timelines and
ring parameters fitted on the same links. Configurations (``--impls``):

    distopt-fp16, distopt-bf16, distopt-none   DistributedOptimizer(MFSGD), compression fp16 / bf16 / none, 25 MB
    distopt-fp16-rec                           the same (fp16) at the cap the lab model recommends at that rate
    ddp                                        torch DDP defaults (25 MB fp32 buckets), torch.optim.SGD
    ddp-fp16hook                               torch DDP + fp16_compress_hook
    localsgd-H16                               LocalSGD(MFSGD, period=16), fp16 averages of the weights every
                                               16th step, no warm-up (the local phase of post-local SGD)

Phases (every one inside the lab's namespaces except the first):
1. model choice (here, with the ranks' thread count): unless --model/--batch say otherwise, the candidate
   (model, image size) and batch whose backward is closest to the fp32 ring allreduce of its gradients at
   the middle bandwidth (geometric mean of --bandwidths), the regime of ResNet-50 on real clusters
   (communication comparable to backward); the probe times and the reason are recorded.
2. T(1) alone: the plain steps (MFSGD; torch SGD) in this process.
3. loaded world-size-1 timelines: all N ranks at once, each alone in a process group of one: the plain steps
   (T(1) at the N-rank run's machine load) and each configuration's own machinery at world size 1 (per-param
   gradient-ready times, phases, pack / compress time per byte): the predictor's inputs (lab_model, 3. and 4a),
   measured again before each rate's runs (4.), so that the baseline sees the machine as those runs do.
4. per bandwidth: the links set to the rate; timed allreduces of fp16 / bf16 / fp32 payloads (the ring fit per
   dtype and the CPU time per byte); rank 0 picks the recommended cap; every configuration's timed steps at N,
   with the per-bucket timeline (DistributedOptimizer's telemetry; DDP + fp16 hook: its hook's launch and
   completion) and the exposed communication (after the last gradient's hook).

Output: ``scaling_netns_<utc>.json`` (``"bench": "scaling_netns"``, ``"points"``, fitted parameters, the lab,
the model choice, machine, provenance), ``_E.png`` (E against bandwidth: measured points, predicted
curves), ``.log`` (the full log, ranks included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

IMPLS = {
    "distopt-fp16": {"kind": "distopt", "compression": "fp16", "cap_mb": 25.0},
    "distopt-bf16": {"kind": "distopt", "compression": "bf16", "cap_mb": 25.0},
    "distopt-none": {"kind": "distopt", "compression": "none", "cap_mb": 25.0},
    "distopt-fp16-rec": {"kind": "distopt", "compression": "fp16", "cap_mb": "recommended"},
    "ddp": {"kind": "ddp", "hook": None, "cap_mb": 25.0},
    "ddp-fp16hook": {"kind": "ddp", "hook": "fp16", "cap_mb": 25.0},
    "localsgd-H16": {"kind": "localsgd", "compression": "fp16", "cap_mb": 25.0, "period": 16},
}
PLAIN = {"distopt": "mfsgd", "ddp": "torch-sgd", "localsgd": "mfsgd"}          # the no-wrapper single-rank step of each kind
WIRE = {"fp16": 2, "bf16": 2, "none": 4}
FIT_DTYPE = {"fp16": "float16", "bf16": "bfloat16", "none": "float32"}
LR, MOMENTUM = 0.1, 0.9
CANDIDATES = (("small", 32), ("small", 64), ("resnet18", 32), ("resnet18", 64))
BATCH_RANGE = (4, 64)


# ============================================================================ ranks (run in the namespaces)
def _log(msg: str) -> None:
    print(f"[rank {os.environ.get('RANK', '-')}] {msg}", flush=True)


def _build(cfg: dict, spec: dict, group, *, plain: bool):
    """(module to call, params, step(), zero_grad(), dopt or None, ddp-hook records or None, info)."""
    import torch
    import torch.nn as nn

    from fusedmf.comm import DistributedOptimizer, LocalSGD
    from fusedmf.optim import MFSGD
    from harness import build_model

    torch.manual_seed(0)
    model = build_model(spec["model"], spec["num_classes"])
    params = [p for p in model.parameters() if p.requires_grad]
    kind = cfg["kind"]
    info = {}
    if kind == "distopt":
        opt = MFSGD(params, lr=LR, momentum=MOMENTUM)
        if plain:
            return model, params, opt.step, opt.zero_grad, None, None, {"optimizer": "MFSGD"}
        dopt = DistributedOptimizer(opt, process_group=group, compression=cfg["compression"],
                                    bucket_cap_mb=cfg["cap_mb"], telemetry=True,
                                    telemetry_history=spec["warmup"] + spec["steps"] + 2)
        return model, params, dopt.step, dopt.zero_grad, dopt, None, {"optimizer": "DistributedOptimizer(MFSGD)"}
    if kind == "localsgd":
        lopt = LocalSGD(MFSGD(params, lr=LR, momentum=MOMENTUM), period=cfg["period"], warmup_steps=0,
                        process_group=group, compression=cfg["compression"], bucket_cap_mb=cfg["cap_mb"],
                        module=model, telemetry=True, telemetry_history=spec["warmup"] + _steps_of(cfg, spec) + 2)
        return model, params, lopt.step, lopt.zero_grad, None, None, {
            "optimizer": f"LocalSGD(MFSGD, period={cfg['period']})", "localsgd": lopt}
    try:
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, fused=True)
        info["torch_sgd"] = "fused"
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=True)
        info["torch_sgd"] = "foreach"
    if plain:
        return model, params, opt.step, opt.zero_grad, None, None, info
    ddp = nn.parallel.DistributedDataParallel(model, process_group=group, bucket_cap_mb=cfg["cap_mb"])
    records = None
    if cfg.get("hook") == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        records = []

        def timed_fp16_hook(state, bucket):
            t0 = time.perf_counter()
            fut = default_hooks.fp16_compress_hook(state, bucket)
            rec = {"bucket": bucket.index(), "bytes": 2 * bucket.buffer().numel(), "ready": t0,
                   "start": time.perf_counter(), "end": None}
            records.append(rec)

            def done(f):
                rec["end"] = time.perf_counter()
                return f.value()
            return fut.then(done)

        ddp.register_comm_hook(group, timed_fp16_hook)
    return ddp, params, opt.step, opt.zero_grad, None, records, info


def _steps_of(cfg: dict, spec: dict, *, plain: bool = False) -> int:
    """Timed steps of a configuration: LocalSGD's a whole number of periods (at least one), so that the window
    holds as many averages as any other window of that length (its step time is the mean over the window)."""
    if plain or cfg.get("kind") != "localsgd":
        return spec["steps"]
    h = cfg["period"]
    return max(1, -(-spec["steps"] // h)) * h


def _timed_steps(cfg: dict, spec: dict, group, *, plain: bool, barrier: bool, rank: int) -> dict:
    """Warm-up + timed steps of one configuration on this rank; per step forward / backward / optimizer, each
    param's gradient-ready time (after backward's start), the exposed communication and the bucket timeline."""
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    from fusedmf.data import synthetic_imagenet

    module, params, step, zero_grad, dopt, hook_recs, info = _build(cfg, spec, group, plain=plain)
    lopt = info.pop("localsgd", None)
    x, y = synthetic_imagenet(spec["batch"], "cpu", image_size=spec["image_size"], num_classes=spec["num_classes"],
                              seed=100 + rank)
    loss_fn = nn.CrossEntropyLoss()
    ready = [0.0] * len(params)
    handles = [p.register_post_accumulate_grad_hook(lambda _p, i=i: ready.__setitem__(i, time.perf_counter()))
               for i, p in enumerate(params)]
    rows = []
    for it in range(spec["warmup"] + _steps_of(cfg, spec, plain=plain)):
        if barrier:                                # every rank starts the step together
            dist.barrier()
        if hook_recs is not None:
            hook_recs.clear()
        t0 = time.perf_counter()
        loss = loss_fn(module(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        step()
        zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if it < spec["warmup"]:
            continue
        row = {"step_s": t3 - t0, "forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2,
               "ready_s": [r - t1 for r in ready]}
        last_grad = max(ready)
        row["backward_compute_s"] = min(max(last_grad - t1, 0.0), t2 - t1)
        exposed = (t2 - last_grad)                             # DDP waits for its allreduces inside backward
        if dopt is not None:
            tel = dopt.telemetry.last()
            row["bytes_sent"] = tel.bytes_sent
            row["exposed_comm_s"] = tel.exposed_comm_s if tel.exposed_comm_s is not None else 0.0
            row["wait_in_step_s"] = (tel.wait_end - tel.step_start) if tel.wait_end and tel.step_start else None
            o = tel.backward_start if tel.backward_start is not None else t1
            row["buckets"] = [{"bucket": b.bucket, "bytes": b.bytes, "num_params": b.num_params,
                               "ready_s": None if b.ready is None else b.ready - t1,
                               "packed_s": None if b.packed is None else b.packed - t1,
                               "start_s": None if b.start is None else b.start - t1,
                               "end_s": None if b.end is None else b.end - t1} for b in tel.buckets]
            row["telemetry_backward_start_s"] = o - t1
        else:
            row["exposed_comm_s"] = max(exposed, 0.0) if not plain else 0.0
            if lopt is not None and lopt.telemetry is not None and lopt.telemetry.last() is not None:
                last = lopt.telemetry.last()
                row["bytes_sent"] = last.bytes_sent                     # 0 on a local step
                row["exposed_comm_s"] = last.average_s or 0.0           # the average runs after the update
            if hook_recs is not None:
                row["buckets"] = [{"bucket": r["bucket"], "bytes": r["bytes"], "ready_s": r["ready"] - t1,
                                   "packed_s": r["start"] - t1, "start_s": r["start"] - t1,
                                   "end_s": None if r["end"] is None else r["end"] - t1} for r in hook_recs]
        rows.append(row)
    for h in handles:
        h.remove()
    if dopt is not None:
        dopt.remove_hooks()
    owner = getattr(step, "__self__", None)          # the optimizer (or wrapper) whose step() was timed
    used = getattr(owner, "backends_used", None)
    out = {"config": cfg, "plain": plain, "info": info, "rows": rows, "numel": [p.numel() for p in params],
           "backends_used": dict(used) if used else {"update": f"torch.optim.SGD ({info.get('torch_sgd', '?')})"},
           "layout": dopt.bucket_layout() if dopt is not None else None,
           # DDP (broadcast_buffers=True, its default) broadcasts these from rank 0 in every forward
           "buffer_bytes": sum(b.numel() * b.element_size() for b in module.buffers())}
    del module, params, dopt
    return out


def _fit_allreduces(spec: dict, rank: int) -> dict:
    """Timed allreduces of each payload dtype and size: wall time and this process's CPU time (all threads)."""
    import torch
    import torch.distributed as dist

    out = {}
    for dtype, sizes in spec["fit_sizes"].items():
        dt = getattr(torch, dtype)
        res = {}
        for nbytes in sizes:
            buf = torch.randn(nbytes // torch.empty((), dtype=dt).element_size()).to(dt)
            ts, cs = [], []
            ls = []
            for k in range(1 + spec["fit_repeats"]):
                dist.barrier()
                c0, t0 = time.process_time(), time.perf_counter()
                work = dist.all_reduce(buf, async_op=True)        # as the buckets are launched
                tl = time.perf_counter()
                work.wait()
                t1, c1 = time.perf_counter(), time.process_time()
                if k:
                    ts.append(t1 - t0)
                    cs.append(c1 - c0)
                    ls.append(tl - t0)
            res[nbytes] = {"times_s": ts, "cpu_s": cs, "launch_s": ls}
        out[dtype] = res
    return out


def worker(spec_path: str) -> None:
    """One rank (``python benchmarks/scaling_netns.py --worker SPEC``), started by the driver in its namespace."""
    import datetime
    import warnings

    import torch
    import torch.distributed as dist

    warnings.simplefilter("ignore", RuntimeWarning)
    with open(spec_path) as f:
        spec = json.load(f)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=spec["pg_timeout"]))
    result = {"rank": rank, "world_size": world, "phase": spec["phase"], "configs": {}}
    try:
        if spec["phase"] == "loaded":
            own, _ = dist.new_subgroups(group_size=1)        # every rank alone: world size 1, at the N-rank load
            for name in ("mfsgd", "torch-sgd"):
                _log(f"loaded plain {name}")
                cfg = {"kind": "distopt" if name == "mfsgd" else "ddp"}
                result["configs"]["plain:" + name] = _timed_steps(cfg, spec, own, plain=True, barrier=True,
                                                                  rank=rank)
            for name in spec["impls"]:
                cfg = dict(IMPLS[name])
                if cfg["cap_mb"] == "recommended":
                    continue                                 # re-bucketed from distopt-fp16's timeline
                _log(f"loaded ws1 {name}")
                result["configs"][name] = _timed_steps(cfg, spec, own, plain=False, barrier=True, rank=rank)
        else:
            _log(f"allreduce fit at {spec['bandwidth_gbps']} Gb/s")
            result["fit"] = _fit_allreduces(spec, rank)
            rec = [None]
            if rank == 0 and "distopt-fp16-rec" in spec["impls"]:
                rec[0] = _recommend(spec, result["fit"], world)
            dist.broadcast_object_list(rec, src=0)
            result["recommended"] = rec[0]
            for name in spec["impls"]:
                cfg = dict(IMPLS[name])
                if cfg["cap_mb"] == "recommended":
                    cfg["cap_mb"] = rec[0]["best_cap_mb"]
                _log(f"{name} at {spec['bandwidth_gbps']} Gb/s (cap {cfg['cap_mb']} MB)")
                result["configs"][name] = _timed_steps(cfg, spec, None, plain=False, barrier=True, rank=rank)
                result["configs"][name]["config"] = cfg
        dist.barrier()          # nobody closes its connections while a peer is still in a collective
    finally:
        dist.destroy_process_group()
    with open(spec["out_prefix"] + f"_rank{rank}.json", "w") as f:
        json.dump(result, f)


def _recommend(spec: dict, fit_raw: dict, n: int) -> dict:
    from lab_model import recommend_cap

    fits = fit_networks({0: fit_raw}, n)
    tl = _timeline_from(spec["recommend_from"])
    return recommend_cap(tl, n, fits["float16"], t1_s=spec["recommend_from"]["t1_s"], share=spec["cpu_share"],
                         pack_s_per_byte=spec["recommend_from"]["pack_s_per_byte"],
                         pack_fixed_s=spec["recommend_from"]["pack_fixed_s"])


# ============================================================================ analysis (driver side)
def _median(xs: Sequence[float]) -> float:
    """The median of the values that are not None (NaN if none)."""
    from harness import quantile

    return quantile([x for x in xs if x is not None], 0.5)


def fit_networks(fit_by_rank: Dict[int, dict], n: int) -> dict:
    """Per payload dtype, the ring fit over rank 0's medians (lab_model.fit_ring)."""
    from lab_model import fit_ring

    out = {}
    for dtype, sizes in fit_by_rank[0].items():
        times = {int(s): _median(v["times_s"]) for s, v in sizes.items()}
        cpu = {int(s): _median(v["cpu_s"]) for s, v in sizes.items()}
        launch = _median([x for v in sizes.values() for x in v.get("launch_s", [])])
        out[dtype] = fit_ring(times, cpu, n, dtype, launch_s=0.0 if math.isnan(launch) else launch)
    return out


def ws1_timeline(run: dict, t1_s: float) -> dict:
    """A world-size-1 timeline (as a dict) from one rank's timed steps: median phases, each param's ready time
    (median over the steps, scaled onto the median backward), pack / compress seconds per payload byte."""
    from lab_model import fit_line

    rows = run["rows"]
    fwd, bwd, opt = (_median([r[k] for r in rows]) for k in ("forward_s", "backward_s", "optimizer_s"))
    ready = [min(max(_median([r["ready_s"][i] for r in rows]), 0.0), bwd) for i in range(len(run["numel"]))]
    packs = []                      # (payload bytes, pack seconds) of every bucket of every step
    for r in rows:
        for b in r.get("buckets") or []:
            if b.get("packed_s") is not None and b.get("ready_s") is not None and b["bytes"]:
                packs.append((b["bytes"], b["packed_s"] - b["ready_s"]))
    pack_fixed, pack_per_byte = 0.0, 0.0
    if packs and len({nb for nb, _ in packs}) > 1:
        pack_fixed, pack_per_byte = fit_line([nb for nb, _ in packs], [t for _, t in packs])
    if packs and (len({nb for nb, _ in packs}) == 1 or pack_fixed < 0 or pack_per_byte < 0):
        # one size, or a noisy line: the time per byte over all buckets
        pack_fixed, pack_per_byte = 0.0, max(sum(t for _, t in packs) / sum(nb for nb, _ in packs), 0.0)
    sent = [r["bytes_sent"] for r in rows if r.get("bytes_sent")]
    return {"forward_s": fwd, "backward_s": bwd, "optimizer_s": opt,
            "step_s": step_time(run["config"], [r["step_s"] for r in rows]),
            "average_bytes": max(sent) if sent else 0,        # LocalSGD: the payload of one model average
            "params": [{"numel": n, "ready_s": r} for n, r in zip(run["numel"], ready)],
            "t1_s": t1_s, "pack_s_per_byte": pack_per_byte, "pack_fixed_s": pack_fixed,
            "buffer_broadcast_bytes": run["buffer_bytes"] if run["config"]["kind"] == "ddp" else 0}


def _loaded_timelines(lab, spec0: dict, workdir: str, log, port: int, t1: dict, n: int, tag: str):
    """Phase 3: all N ranks at once, each alone in a process group of one (no traffic on the links):
    (step times per configuration, each configuration's world-size-1 timeline)."""
    res = _launch(lab, dict(spec0, phase="loaded", tag=tag), workdir, log, port=port)
    loaded, timelines = {}, {}
    for key, run0 in res[0]["configs"].items():
        step = step_time(run0["config"], [row["step_s"] for row in run0["rows"]])
        loaded[key] = {"step_s_rank0": step,
                       "step_s_per_rank": [step_time(run0["config"], [x["step_s"] for x in rr["configs"][key]["rows"]])
                                           for rr in res]}
        if key.startswith("plain:"):
            log(f"T(1) at the {n}-rank load, {key[6:]}: {step * 1e3:.1f} ms (contention x{step / t1[key[6:]]:.3f})")
            continue
        tl = timelines[key] = ws1_timeline(run0, t1[PLAIN[IMPLS[key]["kind"]]])
        log(f"ws1 timeline {key}: fwd {tl['forward_s'] * 1e3:.1f} ms, bwd {tl['backward_s'] * 1e3:.1f} ms, opt "
            f"{tl['optimizer_s'] * 1e3:.1f} ms, pack {tl['pack_fixed_s'] * 1e6:.0f} us + "
            f"{tl['pack_s_per_byte'] * 1e9:.2f} ns/B")
    return loaded, timelines


def _nearest_timelines(state: dict, bw: float) -> dict:
    """The loaded timelines of the measured rate nearest to ``bw`` (on a log scale), for the curves."""
    key = min(state["bandwidths"], key=lambda b: abs(math.log(float(b) / bw)))
    return state["bandwidths"][key].get("timelines") or state["timelines"]


def _timeline_from(d: dict):
    from fusedmf.bench.predictor import ParamGrad, Timeline

    return Timeline(forward_s=d["forward_s"], backward_s=d["backward_s"], optimizer_s=d["optimizer_s"],
                    params=[ParamGrad(**p) for p in d["params"]], source="loaded world-size-1 timeline (lab)")


def step_time(cfg: dict, steps: Sequence[float]) -> float:
    """The step time of a configuration from its timed steps: the median, except LocalSGD's mean over whole
    periods (its one averaging step in H is what it pays for communication; a median would drop it)."""
    if cfg.get("kind") == "localsgd":
        xs = [x for x in steps if x is not None]
        return sum(xs) / len(xs) if xs else float("nan")
    return _median(steps)


def _slowest(per_rank: List[dict]) -> List[float]:
    n = min(len(r["rows"]) for r in per_rank)
    return [max(r["rows"][i]["step_s"] for r in per_rank) for i in range(n)]


def _mean_bytes(rows: List[dict]) -> Optional[float]:
    """Payload bytes allreduced per step (mean over the timed steps; telemetry of the fusedmf wrappers)."""
    xs = [r["bytes_sent"] for r in rows if r.get("bytes_sent") is not None]
    return sum(xs) / len(xs) if xs else None


def _wire(cfg: dict) -> tuple:
    """(payload bytes per element, the fitted dtype) of a configuration."""
    if cfg["kind"] == "ddp":
        return (2, "float16") if cfg.get("hook") == "fp16" else (4, "float32")
    return WIRE[cfg["compression"]], FIT_DTYPE[cfg["compression"]]


def _predict(state: dict, name: str, cfg: dict, fits: dict, timelines: Optional[dict] = None) -> dict:
    """lab_model's prediction of configuration ``name`` (``cfg``: its cap) on links with ring fits ``fits``
    (payload dtype -> LabFit), from the loaded world-size-1 ``timelines`` measured with that rate's runs
    (default: the first rate's)."""
    from lab_model import buckets_for, predict_lab, with_pack_time

    tl_d = (timelines or state["timelines"])["distopt-fp16" if name == "distopt-fp16-rec" else name]
    if cfg["kind"] == "localsgd":
        return _predict_localsgd(state, cfg, tl_d, fits[_wire(cfg)[1]])
    tl = _timeline_from(tl_d)
    wire, _ = _wire(cfg)
    b = with_pack_time(buckets_for(tl, cfg["kind"], cap_mb=cfg["cap_mb"], wire_bytes=wire), tl_d["pack_s_per_byte"],
                       tl_d["pack_fixed_s"])
    return predict_lab(tl, b, state["world_size"], fits[_wire(cfg)[1]], t1_s=state["t1_alone_s"][PLAIN[cfg["kind"]]],
                       share=state["cpu_share"], forward_comm_bytes=tl_d.get("buffer_broadcast_bytes", 0),
                       forward_fit=fits["float32"])


def _predict_localsgd(state: dict, cfg: dict, tl_d: dict, fit) -> dict:
    """LocalSGD's step at N: its world-size-1 step at the N-rank load (local update; every H-th step the pack
    and apply of the average, which run at world size 1 too) plus, once per period, the ring allreduce of
    the average's payload, one per bucket. Nothing overlaps backward: the average runs after the update."""
    payload = tl_d["average_bytes"]
    cap = cfg["cap_mb"] * 2 ** 20
    nb = max(1, math.ceil(payload / cap)) if payload else 0
    comm = nb * fit.intercept_s + fit.slope_s_per_B * payload if state["world_size"] > 1 else 0.0
    step = tl_d["step_s"] + comm / cfg["period"]
    return {"step_s": step, "E": state["t1_alone_s"][PLAIN["localsgd"]] / step, "exposed_comm_s": comm / cfg["period"],
            "backward_cpu_stretch_s": 0.0, "num_buckets": nb, "schedule": [],
            "average": {"payload_bytes": payload, "allreduce_s": comm, "period": cfg["period"]}}


def analyse(state: dict) -> List[dict]:
    """Every measured point with its prediction (the measured run's own cap: the recommendation it used)."""
    points = []
    n = state["world_size"]
    for bw_key, res in state["bandwidths"].items():
        for name, per_rank in res["runs"].items():
            cfg = per_rank[0]["config"]
            t1 = state["t1_alone_s"][PLAIN[cfg["kind"]]]
            steps = _slowest(per_rank)
            tn = step_time(cfg, steps)
            dtype = _wire(cfg)[1]
            pred = _predict(state, name, cfg, res["fits"], res.get("timelines"))
            r0 = per_rank[0]["rows"]
            points.append({
                "bandwidth_gbps": float(bw_key), "impl": name, "world_size": n,
                "E_measured": t1 / tn, "E_predicted": pred["E"], "error": pred["E"] - t1 / tn,
                "T1_s": t1, "TN_s": tn, "TN_predicted_s": pred["step_s"], "TN_repeats_s": steps,
                "bucket_cap_mb": cfg["cap_mb"], "payload_dtype": dtype,
                "exposed_comm_s": step_time(cfg, [max(r["exposed_comm_s"] for r in rows) for rows in
                                                  zip(*[p["rows"] for p in per_rank])]),
                "exposed_comm_predicted_s": pred["exposed_comm_s"],
                "backward_cpu_stretch_predicted_s": pred["backward_cpu_stretch_s"],
                "phases_rank0_s": {k: _median([r[k] for r in r0]) for k in
                                   ("forward_s", "backward_s", "optimizer_s", "backward_compute_s")},
                "buckets_rank0_last_step": r0[-1].get("buckets"),
                "predicted_schedule": pred["schedule"], "num_buckets_predicted": pred["num_buckets"],
                "bytes_per_step_rank0": _mean_bytes(r0),
                "info": per_rank[0]["info"]})
    return points


def predicted_curves(state: dict, impls: Sequence[str], per_decade: int = 8) -> dict:
    """E predicted on a log grid between the measured rates, the ring fit interpolated between the two nearest
    measured rates (lab_model.interpolate_fit); the recommended cap re-chosen at every grid rate."""
    from lab_model import interpolate_fit, recommend_cap

    bws = sorted(float(b) for b in state["bandwidths"])
    if len(bws) < 2:
        return {}
    steps = max(2, int(round(per_decade * math.log10(bws[-1] / bws[0]))) + 1)
    grid = sorted(set([bws[0] * (bws[-1] / bws[0]) ** (k / (steps - 1)) for k in range(steps)] + bws))
    out = {}
    for name in impls:
        cfg = dict(IMPLS[name])
        rows = []
        for bw in grid:
            fits = {dt: interpolate_fit({float(b): d["fits"][dt] for b, d in state["bandwidths"].items()}, bw)
                    for dt in FIT_DTYPE.values()}
            c = dict(cfg)
            timelines = _nearest_timelines(state, bw)
            if c["cap_mb"] == "recommended":
                tl_d = timelines["distopt-fp16"]
                c["cap_mb"] = recommend_cap(_timeline_from(tl_d), state["world_size"], fits["float16"],
                                            t1_s=tl_d["t1_s"], share=state["cpu_share"],
                                            pack_s_per_byte=tl_d["pack_s_per_byte"],
                                            pack_fixed_s=tl_d["pack_fixed_s"])["best_cap_mb"]
            p = _predict(state, name, c, fits, timelines)
            rows.append({"bandwidth_gbps": bw, "E_predicted": p["E"], "cap_mb": c["cap_mb"]})
        out[name] = rows
    return out


def checks(points: List[dict]) -> dict:
    """What the network-lab acceptance checks, computed from the points (no judgement here: the figures side by side)."""
    errs = [abs(p["error"]) for p in points]
    by_bw: Dict[float, Dict[str, dict]] = {}
    for p in points:
        by_bw.setdefault(p["bandwidth_gbps"], {})[p["impl"]] = p
    per_bw = {}
    for bw, d in sorted(by_bw.items()):
        fm = {k: v for k, v in d.items() if k.startswith("distopt")}
        row = {}
        if fm:
            best = max(fm.values(), key=lambda p: p["E_measured"])
            row.update(best_fusedmf=best["impl"], best_fusedmf_E=best["E_measured"], best_fusedmf_TN_s=best["TN_s"])
        if "ddp" in d:
            row.update(ddp_E=d["ddp"]["E_measured"], ddp_TN_s=d["ddp"]["TN_s"])
            if fm:
                row["best_fusedmf_E_minus_ddp_E"] = row["best_fusedmf_E"] - row["ddp_E"]
        if "distopt-fp16-rec" in d and "distopt-fp16" in d:
            row.update(recommended_cap_mb=d["distopt-fp16-rec"]["bucket_cap_mb"],
                       recommended_E=d["distopt-fp16-rec"]["E_measured"], cap25_E=d["distopt-fp16"]["E_measured"],
                       recommended_minus_25mb_E=d["distopt-fp16-rec"]["E_measured"] - d["distopt-fp16"]["E_measured"])
        per_bw[f"{bw:g}"] = row
    return {"points": len(points), "bandwidths": len(by_bw),
            "max_abs_error": max(errs) if errs else None, "median_abs_error": _median(errs) if errs else None,
            "targets": ">= 8 points over >= 3 rates; |error| <= 0.10 everywhere, <= 0.05 median; best "
                       "fusedmf E >= DDP default E at every rate <= 1 Gb/s; recommended cap no worse than 25 MB",
            "per_bandwidth": per_bw}


# ============================================================================ driver
def estimate_duration(state: dict, args, numel: int) -> float:
    """Seconds the per-bandwidth phases should take: timed steps predicted by the lab model on the nominal rate
    (B = the link rate, α = 0.2 ms), the fit's allreduces, and a start-up of the ranks per rate."""
    from lab_model import LabFit

    total = 0.0
    n = state["world_size"]
    for bw in args.bandwidths:
        B = bw * 1e9 / 8
        fit = LabFit("nominal", n, 2e-4, B, 4 * (n - 1) * 1e-4, 2 * (n - 1) / n / B, 0.0, {}, {}, 0.0)
        for sizes in _fit_sizes(numel, args.quick).values():
            total += (3 if args.quick else 5) * sum(2 * (n - 1) / n * s / B + 2 * (n - 1) * 2e-4 for s in sizes)
        for name in args.impls:
            cfg = dict(IMPLS[name])
            if cfg["cap_mb"] == "recommended":
                cfg["cap_mb"] = 25.0
            total += (args.warmup + args.steps) * _predict(state, name, cfg, {d: fit for d in FIT_DTYPE.values()})["step_s"]
        total += 15.0
    return total


def _rank_threads(n: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // n)


def choose_model(args, n: int, log) -> dict:
    """Model, image size and batch whose backward ~ the fp32 ring allreduce of its grads at the middle rate."""
    import torch

    from harness import build_model

    bws = sorted(args.bandwidths)
    ref = math.exp(sum(math.log(b) for b in bws) / len(bws))
    if args.quick and args.model is None:
        args.model, args.image_size, args.batch = "tiny", 32, args.batch or 2
        return {"model": "tiny", "image_size": 32, "batch": args.batch, "reference_gbps": ref,
                "why": "--quick: the smallest model, for a smoke run (not the measurement's regime)"}
    if args.model is not None and args.batch is not None:
        return {"model": args.model, "image_size": args.image_size or 32, "batch": args.batch, "reference_gbps": ref,
                "why": "given on the command line"}
    cands = [(m, s) for m, s in CANDIDATES if args.model in (None, m) and args.image_size in (None, s)]
    probes = []
    for model_name, size in cands:
        t = _probe_backward_per_sample(model_name, size, probe_batch=4)
        params = sum(p.numel() for p in build_model(model_name, 10).parameters())
        comm = 2 * (n - 1) / n * 4 * params / (ref * 1e9 / 8)
        batch = comm / t["backward_per_sample_s"]
        probes.append({"model": model_name, "image_size": size, "params": params, **t,
                       "fp32_ring_allreduce_at_ref_s": comm, "batch_for_backward_eq_comm": batch})
        log(f"probe {model_name} {size}x{size}: backward {t['backward_per_sample_s'] * 1e3:.2f} ms/sample, "
            f"{params / 1e6:.2f}M params, fp32 ring {comm * 1e3:.1f} ms at {ref:.2f} Gb/s -> batch {batch:.1f}")
    lo, hi = BATCH_RANGE
    inside = [p for p in probes if lo <= p["batch_for_backward_eq_comm"] <= hi]
    pool = inside or probes
    best = min(pool, key=lambda p: abs(math.log(max(p["batch_for_backward_eq_comm"], 1e-9) / 16)))
    batch = args.batch or int(min(max(round(best["batch_for_backward_eq_comm"]), 1), 256))
    args.model, args.image_size, args.batch = best["model"], best["image_size"], batch
    why = (f"backward time ~ the fp32 ring allreduce of the gradients (what DDP's default sends) at "
           f"{ref:.2f} Gb/s, the geometric middle of the bandwidths, as for ResNet-50 on real clusters; among "
           f"the candidates whose batch for that lands in [{lo}, {hi}] the one nearest 16"
           + ("" if inside else " (none landed inside: the nearest overall)"))
    return {"model": args.model, "image_size": args.image_size, "batch": batch, "reference_gbps": ref,
            "probes": probes, "why": why}


def _probe_backward_per_sample(model_name: str, size: int, probe_batch: int) -> dict:
    import torch.nn as nn

    from fusedmf.data import synthetic_imagenet
    from harness import build_model

    model = build_model(model_name, 10)
    x, y = synthetic_imagenet(probe_batch, "cpu", image_size=size, num_classes=10)
    fb = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        fb.append((t1 - t0, t2 - t1))
        model.zero_grad(set_to_none=True)
    f, b = min(fb[1:], key=lambda p: p[1])
    return {"forward_per_sample_s": f / probe_batch, "backward_per_sample_s": b / probe_batch,
            "probe_batch": probe_batch}


def _fit_sizes(numel: int, quick: bool) -> dict:
    """Payload sizes of the fit per dtype: 256 KiB up to the model's whole gradient (<= 32 MiB) in that dtype."""
    out = {}
    for dtype, elem in (("float16", 2), ("bfloat16", 2), ("float32", 4)):
        top = min(32 << 20, max(1 << 20, numel * elem))
        sizes = sorted({256 << 10, max(256 << 10, top // 4), top}) if not quick else sorted({64 << 10, top})
        out[dtype] = [int(s) // 64 * 64 for s in sizes]
    return out


def _launch(lab, spec: dict, workdir: str, log, port: int) -> List[dict]:
    """Write the spec, start one worker per rank in its namespace, wait, return every rank's result."""
    path = os.path.join(workdir, f"spec_{spec['tag']}.json")
    spec = dict(spec, out_prefix=os.path.join(workdir, f"out_{spec['tag']}"))
    with open(path, "w") as f:
        json.dump(spec, f)
    argv = [sys.executable, os.path.abspath(__file__), "--worker", path]
    logs = [os.path.join(workdir, f"log_{spec['tag']}_rank{r}.txt") for r in range(lab.n)]
    procs = []
    for r in range(lab.n):
        fh = open(logs[r], "w")
        procs.append((lab.spawn(r, argv, env=lab.rank_env(r, port=port, threads=spec["threads"]), cwd=os.getcwd(),
                                stdout=fh, stderr=subprocess.STDOUT), fh))
    spec_cmd = shlex.join(lab.command(0, argv))
    deadline = time.monotonic() + spec["pg_timeout"] * 4
    try:
        while any(p.poll() is None for p, _ in procs):
            if any(p.poll() not in (None, 0) for p, _ in procs) or time.monotonic() > deadline:
                time.sleep(2.0)               # give the others a moment to report, then stop them
                break
            time.sleep(0.2)
    finally:
        for p, fh in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            fh.close()
    for r, lp in enumerate(logs):
        with open(lp) as f:
            log(f"---- {spec['tag']} rank {r} ----\n" + f.read().rstrip())
    codes = [p.returncode for p, _ in procs]
    if codes != [0] * lab.n:
        raise RuntimeError(f"phase {spec['tag']}: ranks exited with {codes} (logs above; command: {spec_cmd})")
    out = []
    for r in range(lab.n):
        with open(spec["out_prefix"] + f"_rank{r}.json") as f:
            out.append(json.load(f))
    return out


def run(args) -> dict:
    import torch

    from fusedmf.bench import netlab
    from harness import machine_info
    from lab_model import cpu_share

    reason = netlab.lab_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"scaling --netns: the network lab cannot run here: {reason}")
    bad = [i for i in args.impls if i not in IMPLS]
    if bad:
        raise SystemExit(f"scaling --netns: unknown --impls {bad}; choose from {sorted(IMPLS)}")
    if any(not b > 0 for b in args.bandwidths):
        raise SystemExit(f"scaling --netns: --bandwidths must be > 0 Gb/s, got {args.bandwidths}")
    if "distopt-fp16-rec" in args.impls and "distopt-fp16" not in args.impls:
        args.impls = ["distopt-fp16"] + list(args.impls)     # the recommendation re-buckets its timeline
    n = args.ranks
    threads = args.threads or _rank_threads(n)
    torch.set_num_threads(threads)
    args.steps = args.steps or (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    os.makedirs(args.out, exist_ok=True)
    machine = machine_info(torch.device("cpu"))
    stem = os.path.join(args.out, f"scaling_netns_{machine['utc'].replace('-', '').replace(':', '')}")
    log_f = open(stem + ".log", "w")
    start = time.perf_counter()

    def log(msg: str) -> None:
        line = f"[{time.perf_counter() - start:8.1f}s] {msg}"
        print(line, flush=True)
        log_f.write(line + "\n")
        log_f.flush()

    command = "python -m fusedmf.bench scaling --netns " + shlex.join(args.argv)
    log(f"command: {command}")
    choice = choose_model(args, n, log)
    log(f"model: {choice['model']} {choice['image_size']}x{choice['image_size']}, batch {choice['batch']}/rank: "
        f"{choice['why']}")
    spec0 = {"model": args.model, "image_size": args.image_size, "batch": args.batch, "num_classes": 10,
             "steps": args.steps, "warmup": args.warmup, "threads": threads, "pg_timeout": args.pg_timeout,
             "impls": list(args.impls)}
    # 2. T(1) alone, here
    t1 = {}
    for name, cfg in (("mfsgd", {"kind": "distopt"}), ("torch-sgd", {"kind": "ddp"})):
        r = _timed_steps(cfg, spec0, None, plain=True, barrier=False, rank=0)
        t1[name] = _median([row["step_s"] for row in r["rows"]])
        log(f"T(1) alone, {name}: {t1[name] * 1e3:.1f} ms")
    numel = sum(r["numel"])                      # the model's gradient elements
    state = {"world_size": n, "t1_alone_s": t1, "cpu_share": cpu_share(n, threads, os.cpu_count() or 1),
             "timelines": {}, "bandwidths": {}, "loaded": {}}
    commands = [command]
    workdir = os.path.join(args.out, f".netns_{os.getpid()}")
    os.makedirs(workdir, exist_ok=True)
    with netlab.NetLab(n, rate_gbps=max(args.bandwidths)) as lab:
        log(f"lab: {json.dumps(lab.describe())}")
        if lab.oversubscribed:
            log(f"oversubscribed: {n} ranks on {lab.cores} cores; E(N) then also measures the ranks' CPU contention")
        if lab.stale_removed:
            log(f"removed stale lab namespaces: {lab.stale_removed}")
        launch_command = shlex.join(lab.command(0, [sys.executable, os.path.abspath(__file__), "--worker",
                                                    "<spec.json>"])) + "  (one per rank, in its namespace)"
        commands.append(launch_command)
        # 4. per bandwidth
        for i, bw in enumerate(sorted(args.bandwidths)):
            # 3. the loaded world-size-1 timelines, measured again right before each rate's runs: the
            # baseline a prediction starts from must see the machine as those runs do (measured once at
            # the start of a 12-minute sweep, drift of the shared machine's load entered every later rate)
            loaded, timelines = _loaded_timelines(lab, spec0, workdir, log, 29400 + i, t1, n, f"loaded-bw{bw:g}")
            if not state["timelines"]:
                state["timelines"], state["loaded"] = timelines, loaded
                est = estimate_duration(state, args, numel)
                log(f"expected duration of the per-bandwidth phases: ~{est / 60:.1f} min (the lab model at the "
                    f"nominal rates, alpha 0.2 ms, + ~15 s of start-up and a loaded baseline per rate)")
            lab.set_rate(bw)
            log(f"links at {bw} Gb/s: {lab.qdiscs(0)['send']['options']}")
            spec = dict(spec0, phase="net", tag=f"bw{bw:g}", bandwidth_gbps=bw, fit_sizes=_fit_sizes(numel, args.quick),
                        fit_repeats=2 if args.quick else 4, cpu_share=state["cpu_share"],
                        recommend_from=timelines.get("distopt-fp16"))
            res = _launch(lab, spec, workdir, log, port=29500 + i)
            fits = fit_networks({0: res[0]["fit"]}, n)
            for dt, fit in fits.items():
                log(f"  fit {dt}: alpha {fit.alpha_s * 1e6:.0f} us, B {fit.bw_Bps * 8 / 1e9:.3f} Gb/s "
                    f"({fit.bw_Bps / 1e6:.1f} MB/s), CPU {fit.cpu_s_per_byte * 1e9:.2f} ns/B, "
                    f"launch {fit.launch_s * 1e6:.0f} us, max residual {fit.max_rel_residual:.1%}")
            state["bandwidths"][f"{bw:g}"] = {
                "fits": fits, "recommended": res[0].get("recommended"), "timelines": timelines, "loaded": loaded,
                "runs": {name: [rr["configs"][name] for rr in res] for name in res[0]["configs"]}}
    points = analyse(state)
    curves = predicted_curves(state, [i for i in args.impls if i in {p["impl"] for p in points}])
    for p in points:
        log(f"  {p['bandwidth_gbps']:>6g} Gb/s {p['impl']:<18} E measured {p['E_measured']:.3f} predicted "
            f"{p['E_predicted']:.3f} ({p['error']:+.3f}); T(N) {p['TN_s'] * 1e3:.1f} ms, exposed comm "
            f"{p['exposed_comm_s'] * 1e3:.1f} ms (predicted {p['exposed_comm_predicted_s'] * 1e3:.1f})")
    result = {
        "schema": 1, "bench": "scaling_netns", "machine": machine, "commands": commands,
        "backends_used": {name: runs[0].get("backends_used") for name, runs in
                          next(iter(state["bandwidths"].values()))["runs"].items()} if state["bandwidths"] else {},
        "provenance": {"git_commit": machine["git"]["commit"], "command": command, "cwd_relative": True},
        "config": {"ranks": n, "threads_per_rank": threads, "bandwidths_gbps": sorted(args.bandwidths),
                   "impls": list(args.impls), "steps": args.steps, "warmup": args.warmup, "quick": args.quick,
                   "optimizer": f"SGD lr={LR} momentum={MOMENTUM} (MFSGD for DistributedOptimizer, torch.optim.SGD for DDP)",
                   "E": "T(1)/T(N): T(1) the plain single-rank step alone, T(N) the slowest rank's step (medians)"},
        "model_choice": choice, "lab": lab.describe(),
        "t1_alone_s": t1, "cpu_share": state["cpu_share"],
        "loaded_world_size_1": {bw: d["loaded"] for bw, d in state["bandwidths"].items()},
        "timelines_world_size_1_loaded": {bw: d["timelines"] for bw, d in state["bandwidths"].items()},
        "fitted": {bw: {"networks": {dt: f.as_dict() for dt, f in d["fits"].items()}, "recommended_cap": d["recommended"]}
                   for bw, d in state["bandwidths"].items()},
        "points": points, "predicted_curves": curves, "checks": checks(points),
        "per_rank_rows": {bw: {name: [pr["rows"] for pr in runs] for name, runs in d["runs"].items()}
                          for bw, d in state["bandwidths"].items()},
        "elapsed_s": time.perf_counter() - start}
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    result["paths"] = {"json": stem + ".json", "log": stem + ".log", "plot": _plot(result, stem + "_E.png")}
    ck = result["checks"]
    log(f"predictor |E_pred - E_meas|: max {ck['max_abs_error']:.3f}, median {ck['median_abs_error']:.3f} over "
        f"{ck['points']} points at {ck['bandwidths']} rates")
    for bw, row in ck["per_bandwidth"].items():
        log(f"  {bw} Gb/s: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    log(f"wrote {stem}.json, {stem}.log" + (f", {result['paths']['plot']}" if result["paths"]["plot"] else ""))
    log_f.close()
    for fn in os.listdir(workdir):
        os.remove(os.path.join(workdir, fn))
    os.rmdir(workdir)
    return result


def _plot(result: dict, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    impls = list(dict.fromkeys(p["impl"] for p in result["points"]))
    top = 1.0
    for k, impl in enumerate(impls):
        pts = sorted((p for p in result["points"] if p["impl"] == impl), key=lambda p: p["bandwidth_gbps"])
        color = f"C{k}"
        bws = [p["bandwidth_gbps"] for p in pts]
        curve = result.get("predicted_curves", {}).get(impl)
        if curve:
            ax.plot([c["bandwidth_gbps"] for c in curve], [c["E_predicted"] for c in curve], "-", color=color,
                    alpha=0.7, label=f"{impl} predicted")
        ax.plot(bws, [p["E_predicted"] for p in pts], "x", color=color, ms=6, label=None if curve else f"{impl} predicted")
        ax.plot(bws, [p["E_measured"] for p in pts], "o", color=color, label=f"{impl} measured")
        top = max([top] + [p["E_measured"] for p in pts] + [p["E_predicted"] for p in pts])
    ax.set_xscale("log")
    rates = sorted({p["bandwidth_gbps"] for p in result["points"]})
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.minorticks_off()
    ax.set_xlabel("link rate per rank and direction (Gb/s, tc tbf)")
    ax.set_ylabel("E(N) = T(1) / T(N)")
    c, m = result["config"], result["model_choice"]
    ax.set_title(f"{c['ranks']} ranks in network namespaces, {m['model']} {m['image_size']}px batch {m['batch']}/rank"
                 + (" (quick smoke)" if c["quick"] else ""), fontsize=9)
    ax.set_ylim(0, top + 0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(ap: argparse.ArgumentParser, default_out: str) -> None:
    ap.add_argument("--bandwidths", type=float, nargs="+", default=None,
                    help="link rates in Gb/s per rank and direction (default 0.1 0.3 1 3 10; --quick: 1)")
    ap.add_argument("--ranks", type=int, default=2, help="ranks = namespaces (more than the cores: oversubscribed)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), help=f"configurations, of {list(IMPLS)}")
    ap.add_argument("--model", default=None, help="tiny | small | resnet18 | resnet50 (default: chosen, see above)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="per-rank batch (default: chosen with the model)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (default cores // ranks)")
    ap.add_argument("--pg-timeout", type=float, default=600.0)
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 steps, one bandwidth: a smoke run")
    ap.add_argument("--out", default=default_out)


def format_table(result: dict) -> str:
    lines = [f"{'Gb/s':>6} {'impl':<18} {'E meas':>7} {'E pred':>7} {'err':>7} {'T(N) ms':>9} {'exposed ms':>10}"]
    for p in result["points"]:
        lines.append(f"{p['bandwidth_gbps']:>6g} {p['impl']:<18} {p['E_measured']:>7.3f} {p['E_predicted']:>7.3f} "
                     f"{p['error']:>+7.3f} {p['TN_s'] * 1e3:>9.1f} {p['exposed_comm_s'] * 1e3:>10.1f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, default_out: Optional[str] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m fusedmf.bench scaling --netns", description=__doc__.split("\n\n")[0])
    add_arguments(ap, default_out or os.path.join("benchmarks", "out", "scaling_netns"))
    args = ap.parse_args(argv)
    args.argv = argv
    if args.bandwidths is None:
        args.bandwidths = [1.0] if args.quick else [0.1, 0.3, 1.0, 3.0, 10.0]
    result = run(args)
    print(format_table(result))
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
