"""ResNet training throughput: images/s and the forward / backward / optimizer split, single process or under torchrun.

Single process (``python -m fusedmf.bench throughput``): cases, each over the per-GPU batch sizes, synthetic
data, channels_last by default:
    torch-sgd-foreach    torch.optim.SGD(foreach=True)
    torch-sgd-fused      torch.optim.SGD(fused=True)            (skipped with its reason where unsupported)
    mfsgd                fusedmf MFSGD
On GPUs the torch cases run fp32 params under ``torch.autocast`` (bf16 by default: AMP, the best plain-PyTorch
configuration) and fusedmf runs bf16 (or fp16) params with fp32 master weights under the same autocast;
on CPUs every case is fp32.

Under torchrun with WORLD_SIZE > 1 (``torchrun --nproc-per-node N -m fusedmf.bench throughput``), every rank
joins the default process group (nccl on GPUs, cuda:LOCAL_RANK; gloo on CPUs) and the data-parallel cases
run across the ranks, each rank with its own batch of the per-GPU size:
    ddp-torch-sgd           torch DDP, default hook (fp32 allreduce), torch.optim.SGD (fused, else foreach)
    ddp-fp16hook-torch-sgd  torch DDP + fp16_compress_hook, the same SGD
    distopt-mfsgd           fusedmf MFSGD in DistributedOptimizer(compression="fp16")
and the single-process cases run on every rank at the same time with no communication (``mode``: the
no-communication reference at the same machine load; ``vs_no_comm`` compares against it). Each step starts
after a barrier; per step the slowest rank's time counts, with that rank's breakdown: forward, backward
compute (to the last gradient's hook), exposed communication (DDP: the rest of backward, where it waits for
its allreduces; DistributedOptimizer: that plus its wait in step()), and the update. Rank 0 reports per-GPU
images/s and writes the JSON.

One more, untimed step of the MFSGD case records the gradient timeline the scaling predictor consumes:
each parameter's gradient-ready time after backward's start (post-accumulate-grad hooks; CUDA events on
GPUs) and the buckets of a world-size-1 ``DistributedOptimizer`` (telemetry: ready time, bytes); under
torchrun rank 0 records it on a process group of its own while the others wait.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):  # run from a checkout: this checkout's fusedmf, and the harness beside us
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from fusedmf._ranks import process_group  # noqa: E402
from fusedmf.bench.timeline import record_timeline  # noqa: E402
from fusedmf.comm import DistributedOptimizer  # noqa: E402
from fusedmf.data import synthetic_imagenet  # noqa: E402
from fusedmf.optim import MFSGD  # noqa: E402
from harness import (PhaseTimer, build_model, machine_info, progress, summarize, sync, torchrun_env,  # noqa: E402
                     write_json)

CASES = ("torch-sgd-foreach", "torch-sgd-fused", "mfsgd")
DIST_CASES = ("ddp-torch-sgd", "ddp-fp16hook-torch-sgd", "distopt-mfsgd")
# the no-communication counterpart of each data-parallel case (first one that ran wins)
NO_COMM = {"ddp-torch-sgd": ("torch-sgd-fused", "torch-sgd-foreach"),
           "ddp-fp16hook-torch-sgd": ("torch-sgd-fused", "torch-sgd-foreach"), "distopt-mfsgd": ("mfsgd",)}
DIST_ONLY_REASON = "a data-parallel case: runs under torchrun with WORLD_SIZE > 1"
LR, MOMENTUM, WD = 0.1, 0.9, 5e-5


class Unavailable(Exception):
    pass


def make_case(case: str, model_name: str, device: torch.device, channels_last: bool, low_dtype: Optional[torch.dtype],
              num_classes: int):
    """(model, optimizer, param dtype, info) for one case."""
    torch.manual_seed(0)
    model = build_model(model_name, num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    info = {}
    if case.startswith("torch-sgd"):
        kind = case.rsplit("-", 1)[1]
        try:
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD, **{kind: True})
            if kind == "fused":   # construction may succeed and the first step fail: probe on a copy
                p = torch.zeros(4, device=device, requires_grad=True)
                p.grad = torch.ones(4, device=device)
                torch.optim.SGD([p], lr=LR, momentum=MOMENTUM, fused=True).step()
        except (RuntimeError, TypeError, ValueError) as exc:
            raise Unavailable(f"torch.optim.SGD({kind}=True) unavailable here: {exc}")
        info["params"] = "fp32"
    elif case == "mfsgd":
        if device.type == "cuda" and low_dtype is not None:
            model = model.to(low_dtype)
            info["params"] = f"{str(low_dtype).replace('torch.', '')} + fp32 masters"
        else:
            info["params"] = "fp32"
        opt = MFSGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    else:
        raise ValueError(f"unknown case {case!r}")
    return model, opt, info


def _step_fn(model, opt, device, amp_dtype, scaler):
    loss_fn = nn.CrossEntropyLoss()

    def step(x, y, timer: PhaseTimer):
        timer.mark()
        if amp_dtype is not None:
            with torch.autocast(device.type, dtype=amp_dtype):
                loss = loss_fn(model(x), y)
        else:
            loss = loss_fn(model(x), y)
        timer.mark()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        timer.mark()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        timer.mark()
        return loss

    return step


def time_case(case: str, batch: int, args, device: torch.device) -> dict:
    rec = {"name": f"{case}/b{batch}", "case": case, "batch": batch, "status": "ok", "reason": None}
    if case in DIST_CASES:
        rec.update(status="skipped", reason=DIST_ONLY_REASON)
        return rec
    try:
        model, opt, info = make_case(case, args.model, device, args.channels_last, args.low_dtype, args.num_classes)
    except Unavailable as exc:
        rec.update(status="skipped", reason=str(exc))
        return rec
    rec.update({f"info_{k}": v for k, v in info.items()})
    pdtype = next(model.parameters()).dtype
    x, y = synthetic_imagenet(batch, device, args.channels_last, image_size=args.image_size,
                              num_classes=args.num_classes, dtype=pdtype)
    amp = args.amp_dtype if device.type == "cuda" else None
    scaler = None
    if amp == torch.float16 and pdtype == torch.float32:
        scaler = torch.amp.GradScaler("cuda")
    step = _step_fn(model, opt, device, amp, scaler)
    for _ in range(args.warmup):
        step(x, y, PhaseTimer(device))
    sync(device)
    fwd, bwd, optim, total = [], [], [], []
    for _ in range(args.steps):
        t = PhaseTimer(device)
        step(x, y, t)
        f, b, o = t.intervals()
        fwd.append(f), bwd.append(b), optim.append(o), total.append(f + b + o)
    s = summarize(total)
    rec.update(s)
    rec.update(repeats_s=total, forward_s=fwd, backward_s=bwd, optimizer_s=optim,
               forward_median_s=summarize(fwd)["median_s"], backward_median_s=summarize(bwd)["median_s"],
               optimizer_median_s=summarize(optim)["median_s"], images_per_s=batch / s["median_s"],
               amp=str(amp).replace("torch.", "") if amp is not None else None,
               backends_used=dict(getattr(opt, "backends_used", None) or {"torch.optim": type(opt).__name__}))
    del model, opt
    return rec


def measured_timeline(args, device: torch.device, batch: int, phases: Optional[dict] = None,
                      bucket_cap_mb: float = 25.0, process_group=None) -> dict:
    """fusedmf.bench.timeline.record_timeline on this benchmark's MFSGD case (model, synthetic batch)."""
    model, opt, _ = make_case("mfsgd", args.model, device, args.channels_last, args.low_dtype, args.num_classes)
    x, y = synthetic_imagenet(batch, device, args.channels_last, image_size=args.image_size,
                              num_classes=args.num_classes, dtype=next(model.parameters()).dtype)
    return record_timeline(model, opt, x, y, warmup=args.warmup, phases=phases, bucket_cap_mb=bucket_cap_mb,
                           process_group=process_group, amp_dtype=args.amp_dtype if device.type == "cuda" else None,
                           label=f"{args.model} batch {batch} on {device}, MFSGD")


# ------------------------------------------------------------------------------------------ torchrun
def _barrier(device: torch.device, group=None) -> None:
    import torch.distributed as dist

    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index])
    else:
        dist.barrier(group=group)


def _mark(device: torch.device):
    if device.type == "cuda":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


def _elapsed(device: torch.device, a, b) -> float:
    return a.elapsed_time(b) * 1e-3 if device.type == "cuda" else b - a


def _make_dist_case(case: str, args, device: torch.device):
    """(module to call forward on, model, optimizer to step, DistributedOptimizer or None, info)."""
    if case.startswith("ddp-"):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        try:
            model, opt, info = make_case("torch-sgd-fused", args.model, device, args.channels_last, args.low_dtype,
                                         args.num_classes)
            info["torch_sgd"] = "fused"
        except Unavailable:
            model, opt, info = make_case("torch-sgd-foreach", args.model, device, args.channels_last, args.low_dtype,
                                         args.num_classes)
            info["torch_sgd"] = "foreach"
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  bucket_cap_mb=args.bucket_cap_mb)
        info["comm"] = "DDP allreduce (grads' dtype)"
        if "fp16hook" in case:
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
            info["comm"] = "DDP + fp16_compress_hook"
        return ddp, model, opt, None, info
    if case == "distopt-mfsgd":
        model, opt, info = make_case("mfsgd", args.model, device, args.channels_last, args.low_dtype, args.num_classes)
        dopt = DistributedOptimizer(opt, compression=args.compression, bucket_cap_mb=args.bucket_cap_mb, telemetry=True,
                                    telemetry_history=4)
        info["comm"] = f"DistributedOptimizer(compression={args.compression!r})"
        return model, model, dopt, dopt, info
    raise ValueError(f"unknown data-parallel case {case!r}")


def time_dist_case(case: str, batch: int, args, device: torch.device, rank: int, world_size: int) -> dict:
    """One data-parallel case on this rank (all ranks call it together). Per step: forward, backward (the
    call), optimizer (the call) and the breakdown backward compute / exposed communication / update."""
    import torch.distributed as dist

    rec = {"name": f"{case}/b{batch}", "case": case, "batch": batch, "status": "ok", "reason": None,
           "mode": f"data-parallel over {world_size} ranks"}
    built, err = None, None
    try:
        built = _make_dist_case(case, args, device)
    except Unavailable as exc:
        err = str(exc)
    errs: list = [None] * world_size
    dist.all_gather_object(errs, err)              # every rank skips, or none: collectives must match
    if any(errs):
        r, e = next((r, e) for r, e in enumerate(errs) if e)
        rec.update(status="skipped", reason=f"rank {r}: {e}")
        return rec
    fwd_module, model, opt, dopt, info = built
    rec.update({f"info_{k}": v for k, v in info.items()})
    params = [p for p in model.parameters() if p.requires_grad]
    pdtype = params[0].dtype
    x, y = synthetic_imagenet(batch, device, args.channels_last, image_size=args.image_size,
                              num_classes=args.num_classes, dtype=pdtype, seed=100 + rank)
    amp = args.amp_dtype if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and pdtype == torch.float32 else None
    grad_mark: list = [None]
    train_step = _step_fn(fwd_module, opt, device, amp, scaler)

    def step(timer: PhaseTimer):
        train_step(x, y, timer)

    # one untimed step finds the parameter whose gradient is ready last; then only its hook marks the time
    order: list = []
    hooks = [p.register_post_accumulate_grad_hook(lambda _p, i=i: order.append(i)) for i, p in enumerate(params)]
    step(PhaseTimer(device))
    for h in hooks:
        h.remove()
    last = params[order[-1]] if order else params[0]
    hook = last.register_post_accumulate_grad_hook(lambda _p: grad_mark.__setitem__(0, _mark(device)))
    cols = {k: [] for k in ("repeats_s", "forward_s", "backward_s", "optimizer_s", "backward_compute_s",
                            "exposed_comm_s", "update_s", "comm_wait_in_step_s")}
    for i in range(args.warmup + args.steps):
        _barrier(device)
        sync(device)
        grad_mark[0] = None
        timer = PhaseTimer(device)
        step(timer)
        f, b, o = timer.intervals()
        if i < args.warmup:
            continue
        bc = _elapsed(device, timer.marks[1], grad_mark[0]) if grad_mark[0] is not None else b
        bc = min(max(bc, 0.0), b)
        wait = 0.0
        if dopt is not None:
            t = dopt.telemetry.last()
            if t is not None and t.step_start is not None and t.wait_end is not None:
                wait = min(max(t.wait_end - t.step_start, 0.0), o)
        for k, v in (("repeats_s", f + b + o), ("forward_s", f), ("backward_s", b), ("optimizer_s", o),
                     ("backward_compute_s", bc), ("exposed_comm_s", (b - bc) + wait), ("update_s", o - wait),
                     ("comm_wait_in_step_s", wait)):
            cols[k].append(v)
    hook.remove()
    if dopt is not None:
        dopt.remove_hooks()
    rec.update(cols, amp=str(amp).replace("torch.", "") if amp is not None else None,
               backends_used=dopt.backends_used if dopt is not None else
               dict(getattr(opt, "backends_used", None) or {"torch.optim": type(opt).__name__}))
    del fwd_module, model, opt, dopt, built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


_BREAKDOWN = ("forward_s", "backward_s", "optimizer_s", "backward_compute_s", "exposed_comm_s", "update_s",
              "comm_wait_in_step_s")


def merge_ranks(per_rank: List[dict], world_size: int) -> dict:
    """One record from every rank's record of a case: per step the slowest rank's time and breakdown."""
    r0 = per_rank[0]
    rec = {k: v for k, v in r0.items() if k not in ("repeats_s",) + _BREAKDOWN}
    statuses = [r["status"] for r in per_rank]
    if any(st != "ok" for st in statuses):
        bad = next(r for r in per_rank if r["status"] != "ok")
        rec.update(status=bad["status"], reason=bad["reason"], per_rank_status=statuses)
        return rec
    n = min(len(r["repeats_s"]) for r in per_rank)
    slow = [max(range(len(per_rank)), key=lambda k: per_rank[k]["repeats_s"][i]) for i in range(n)]
    total = [per_rank[slow[i]]["repeats_s"][i] for i in range(n)]
    s = summarize(total)
    rec.update(s)
    rec.update(repeats_s=total, slowest_rank=slow, images_per_s=rec["batch"] / s["median_s"],
               global_images_per_s=world_size * rec["batch"] / s["median_s"],
               per_rank_s=[r["repeats_s"] for r in per_rank],
               per_rank_images_per_s=[rec["batch"] / summarize(r["repeats_s"])["median_s"] for r in per_rank])
    for key in _BREAKDOWN:
        if all(key in r for r in per_rank):
            vals = [per_rank[slow[i]][key][i] for i in range(n)]
            rec[key] = vals
            rec[key[:-2] + "_median_s"] = summarize(vals)["median_s"]
    return rec


def run_torchrun(args, env: dict) -> Optional[dict]:
    """Every rank runs every case (data-parallel cases across the ranks, the others on each rank alone);
    rank 0 merges, records the timeline on a group of its own, writes the JSON and returns it (others: None)."""
    import torch.distributed as dist

    device = resolve(args, env)
    backend = args.backend or ("nccl" if device.type == "cuda" else "gloo")
    rank, world = env["rank"], env["world_size"]
    start = time.perf_counter()
    with process_group(backend, timeout_s=args.pg_timeout):   # NOTE [gloo teardown]
        machine = machine_info(device) if rank == 0 else None
        jobs = [(c, b) for b in args.batches for c in args.cases]
        mine = []
        for case, batch in (progress(jobs, total=len(jobs), desc="throughput") if rank == 0 else jobs):
            if case in DIST_CASES:
                mine.append(time_dist_case(case, batch, args, device, rank, world))
            else:
                _barrier(device)                        # the ranks run it at the same time: the same load
                rec = time_case(case, batch, args, device)
                rec["mode"] = "per rank, no communication (every rank at once)"
                mine.append(rec)
        me = {"rank": rank, "host": socket.gethostname(), "device": str(device), "threads": torch.get_num_threads(),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "records": mine}
        everyone: list = [None] * world
        dist.all_gather_object(everyone, me)
        solo = dist.new_group([0])                     # every rank creates it; rank 0 alone is in it
        result = None
        if rank == 0:
            records = [merge_ranks([e["records"][j] for e in everyone], world) for j in range(len(jobs))]
            tb = args.timeline_batch or min(args.batches)
            phases = next((r for r in records if r["case"] == "mfsgd" and r["batch"] == tb and r["status"] == "ok"),
                          None)
            timeline = measured_timeline(args, device, tb, phases, args.bucket_cap_mb, process_group=solo)
            timeline["recorded_on"] = "rank 0 alone (a 1-rank process group) while the other ranks waited"
            result = _result(args, device, machine, records, timeline, start)
            result["config"].update(launcher="torchrun", world_size=world, backend=backend,
                                    local_world_size=env["local_world_size"], compression=args.compression,
                                    bucket_cap_mb=args.bucket_cap_mb,
                                    timing="per step: the slowest rank (a barrier before each step)")
            result["ranks"] = [{k: v for k, v in e.items() if k != "records"} for e in everyone]
            result["paths"] = {"json": write_json(result, args.out, f"throughput_{device.type}_{world}ranks")}
        del solo  # NOTE [gloo teardown]: a live handle keeps the group's worker threads running
    return result


def defaults(device_type: str, quick: bool) -> dict:
    """The model, batches and step counts for a device type ("cpu" | "cuda"); the same signature in every driver."""
    if device_type == "cuda":
        return {"model": "resnet50", "batches": [32, 64, 128, 256], "image_size": 224, "steps": 20, "warmup": 5,
                "num_classes": 1000} if not quick else \
               {"model": "resnet50", "batches": [32, 64], "image_size": 224, "steps": 5, "warmup": 2, "num_classes": 1000}
    if quick:
        return {"model": "tiny", "batches": [2, 4], "image_size": 64, "steps": 3, "warmup": 1, "num_classes": 10}
    return {"model": "small", "batches": [2, 4], "image_size": 64, "steps": 5, "warmup": 2, "num_classes": 10}


def add_arguments(ap: argparse.ArgumentParser, default_out: str) -> None:
    ap.add_argument("--device", default=None, help="cuda when available, else cpu")
    ap.add_argument("--model", default=None, help="resnet50 | resnet18 | small | tiny (default: resnet50 on GPU, small on CPU)")
    ap.add_argument("--batches", type=int, nargs="*", default=None, help="per-GPU batch sizes")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--num-classes", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--cases", nargs="*", default=None, choices=CASES + DIST_CASES,
                    help=f"default: {' '.join(CASES)}; under torchrun also {' '.join(DIST_CASES)}")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "none"), help="GPU autocast dtype")
    ap.add_argument("--low-precision", default="bf16", choices=("bf16", "fp16", "none"),
                    help="GPU: fusedmf's param dtype (fp32 masters)")
    ap.add_argument("--timeline-batch", type=int, default=None, help="batch of the recorded timeline (default: smallest)")
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (per rank); default: torch's, 1 with --quick on CPU, cores // ranks under torchrun")
    ap.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                    help="torchrun: the process group's backend (default: nccl on cuda, gloo on cpu)")
    ap.add_argument("--compression", default="fp16", choices=("fp16", "bf16", "none"),
                    help="torchrun: DistributedOptimizer's allreduce dtype in distopt-mfsgd")
    ap.add_argument("--pg-timeout", type=float, default=600.0, help="torchrun: process group timeout, s")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny model (CPU), 2 batch sizes, 3 steps")
    ap.add_argument("--out", default=default_out)


_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve(args, env: Optional[dict] = None) -> torch.device:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if env and device.type == "cuda":
        device = torch.device("cuda", env["local_rank"])
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True      # the best plain-PyTorch setting, for every case alike
    d = defaults(device.type, args.quick)
    for k in ("model", "batches", "image_size", "steps", "warmup", "num_classes"):
        if getattr(args, k) in (None, []):
            setattr(args, k, d[k])
    if args.cases is None:
        args.cases = list(CASES) + (list(DIST_CASES) if env else [])
    args.amp_dtype, args.low_dtype = _DT[args.amp], _DT[args.low_precision]
    if args.threads is None and device.type == "cpu" and args.quick:
        args.threads = 1          # a smoke run: one thread does not stall when other processes share the cores
    if args.threads is None and device.type == "cpu" and env:
        args.threads = max(1, (os.cpu_count() or 1) // env["local_world_size"])
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def run(args) -> Optional[dict]:
    env = torchrun_env()
    if env:
        return run_torchrun(args, env)
    device = resolve(args)
    start = time.perf_counter()
    machine = machine_info(device)
    jobs = [(c, b) for b in args.batches for c in args.cases]
    records = []
    for case, batch in progress(jobs, total=len(jobs), desc="throughput"):
        records.append(time_case(case, batch, args, device))
    tb = args.timeline_batch or min(args.batches)
    phases = next((r for r in records if r["case"] == "mfsgd" and r["batch"] == tb and r["status"] == "ok"), None)
    timeline = measured_timeline(args, device, tb, phases, args.bucket_cap_mb)
    result = _result(args, device, machine, records, timeline, start)
    result["paths"] = {"json": write_json(result, args.out, f"throughput_{device.type}")}
    return result


def _result(args, device, machine, records, timeline, start) -> dict:
    by = {(r["case"], r["batch"]): r for r in records}
    for r in records:
        base = by.get(("torch-sgd-foreach", r["batch"]))
        if r["status"] == "ok" and base and base["status"] == "ok":
            r["speedup_vs_foreach"] = base["median_s"] / r["median_s"]
        if r["status"] == "ok" and r["case"] in NO_COMM:
            ref = next((by[(c, r["batch"])] for c in NO_COMM[r["case"]]
                        if by.get((c, r["batch"]), {}).get("status") == "ok"
                        and (r.get("info_torch_sgd") is None or c.endswith(r["info_torch_sgd"]))), None)
            if ref is not None:
                r["vs_no_comm"] = ref["median_s"] / r["median_s"]
                r["no_comm_case"] = ref["case"]
            ddp16 = by.get(("ddp-fp16hook-torch-sgd", r["batch"]))
            if ddp16 and ddp16["status"] == "ok":
                r["speedup_vs_ddp_fp16hook"] = ddp16["median_s"] / r["median_s"]
    used = {r["name"]: r["backends_used"] for r in records if r.get("backends_used")}
    used["timeline"] = {"update": timeline.get("optimizer_backends"), "distopt": timeline.get("distopt_backends")}
    return {"schema": 1, "bench": "throughput", "machine": machine, "backends_used": used,
            "config": {"device": str(device), "model": args.model, "image_size": args.image_size,
                       "num_classes": args.num_classes, "batches": args.batches, "steps": args.steps,
                       "warmup": args.warmup, "channels_last": args.channels_last,
                       "amp": args.amp if device.type == "cuda" else "none (CPU: fp32)",
                       "low_precision": args.low_precision if device.type == "cuda" else "none (CPU: fp32)",
                       "optimizer": f"SGD lr={LR} momentum={MOMENTUM} weight_decay={WD}", "quick": args.quick,
                       "threads": torch.get_num_threads(), "data": "synthetic (fusedmf.data.synthetic_imagenet)",
                       "launcher": "single process", "world_size": 1},
            "cases": records, "timeline": timeline, "elapsed_s": time.perf_counter() - start}


def format_table(result: dict) -> str:
    c, m = result["config"], result["machine"]
    lines = [f"throughput: {c['model']} {c['image_size']}x{c['image_size']} on {m.get('device_name')}, "
             f"channels_last={c['channels_last']}, amp={c['amp']}, {c['threads']} thread(s), torch {m['torch']}, "
             f"git {str(m.get('git', {}).get('commit'))[:12]}"]
    header = (f"{'case':<18} {'batch':>5} {'img/s':>9} {'step ms':>9} {'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8} "
              f"{'p20-p80 ms':>15} {'vs foreach':>10}")
    lines += [header, "-" * len(header)]
    dist_recs = [r for r in result["cases"] if r["case"] in DIST_CASES and r["status"] == "ok"]
    for r in result["cases"]:
        if r["status"] != "ok":
            if c.get("launcher") == "single process" and r["case"] in DIST_CASES:
                continue                                   # asked for without torchrun: recorded, not printed
            lines.append(f"{r['case']:<18} {r['batch']:>5} {r['status']}: {r['reason']}")
            continue
        if r in dist_recs:
            continue
        sp = f"{r['speedup_vs_foreach']:.2f}x" if r.get("speedup_vs_foreach") else "-"
        lines.append(f"{r['case']:<18} {r['batch']:>5} {r['images_per_s']:>9.1f} {r['median_s'] * 1e3:>9.2f} "
                     f"{r['forward_median_s'] * 1e3:>8.2f} {r['backward_median_s'] * 1e3:>8.2f} "
                     f"{r['optimizer_median_s'] * 1e3:>8.2f} {r['p20_s'] * 1e3:>7.2f}-{r['p80_s'] * 1e3:<7.2f} {sp:>10}")
    if c.get("launcher") == "torchrun":
        lines[0] += (f"; torchrun: {c['world_size']} {c['backend']} ranks, cases without communication ran on "
                     f"every rank at once")
    if dist_recs:
        lines.append(f"data-parallel over {c['world_size']} {c['backend']} ranks: per-GPU img/s and the slowest rank's "
                     f"breakdown per step (medians, ms)")
        h2 = (f"{'case':<23} {'batch':>5} {'img/s/GPU':>9} {'step':>7} {'fwd':>7} {'bwd':>7} {'exposed':>8} "
              f"{'update':>7} {'vs no-comm':>10} {'vs DDP fp16':>11}")
        lines += [h2, "-" * len(h2)]
        for r in dist_recs:
            nc = f"{r['vs_no_comm']:.2f}x" if r.get("vs_no_comm") else "-"
            dd = f"{r['speedup_vs_ddp_fp16hook']:.2f}x" if r.get("speedup_vs_ddp_fp16hook") else "-"
            lines.append(f"{r['case']:<23} {r['batch']:>5} {r['images_per_s']:>9.1f} {r['median_s'] * 1e3:>7.2f} "
                         f"{r['forward_median_s'] * 1e3:>7.2f} {r['backward_compute_median_s'] * 1e3:>7.2f} "
                         f"{r['exposed_comm_median_s'] * 1e3:>8.2f} {r['update_median_s'] * 1e3:>7.2f} {nc:>10} {dd:>11}")
        lines.append("bwd = backward up to the last gradient's hook; exposed = communication not hidden by it; "
                     "vs no-comm = the same optimizer with no communication, on every rank at once")
    tl = result["timeline"]["timeline"]
    lines.append(f"timeline (batch {tl['batch']}): forward {tl['forward_s'] * 1e3:.2f} ms, backward "
                 f"{tl['backward_s'] * 1e3:.2f} ms, optimizer {tl['optimizer_s'] * 1e3:.2f} ms, "
                 f"{len(tl['params'])} grads, {len(tl['buckets'])} distopt buckets "
                 f"(ready at {', '.join('%.2f' % (b['ready_s'] * 1e3) for b in tl['buckets'])} ms)")
    lines.append(f"wrote {result['paths']['json']} in {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap, os.path.join(ROOT, "benchmarks", "out", "throughput"))
    args = ap.parse_args(argv)
    result = run(args)
    if result is not None:                       # torchrun: rank 0 prints
        print(format_table(result))
    return result


if __name__ == "__main__":
    main()
