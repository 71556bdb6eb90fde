"""Single-process ResNet training throughput: images/s and the forward / backward / optimizer split.

Cases, each over the per-GPU batch sizes, synthetic data, channels_last by default:
    torch-sgd-foreach    torch.optim.SGD(foreach=True)
    torch-sgd-fused      torch.optim.SGD(fused=True)            (skipped with its reason where unsupported)
    mfsgd                fusedmf MFSGD
On GPUs the torch cases run fp32 params under ``torch.autocast`` (bf16 by default: AMP, the best plain-PyTorch
configuration) and fusedmf runs bf16 (or fp16) params with fp32 master weights under the same autocast;
on CPUs every case is fp32.

One more, untimed step of the MFSGD case records the gradient timeline the scaling predictor consumes:
each parameter's gradient-ready time after backward's start (post-accumulate-grad hooks; CUDA events on
GPUs) and the buckets of a world-size-1 ``DistributedOptimizer`` (telemetry: ready time, bytes).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ._common import PhaseTimer, machine_info, progress, summarize, sync, write_json
from .predictor import Bucket, ParamGrad, Timeline

CASES = ("torch-sgd-foreach", "torch-sgd-fused", "mfsgd")
LR, MOMENTUM, WD = 0.1, 0.9, 5e-5


def build_model(name: str, num_classes: int = 1000) -> nn.Module:
    from ..models import resnet, resnet18, resnet50

    if name == "resnet50":
        return resnet50(num_classes=num_classes)
    if name == "resnet18":
        return resnet18(num_classes=num_classes)
    if name == "small":            # CPU default: one basic block per stage, width 16
        return resnet(18, blocks=(1, 1, 1, 1), width=16, num_classes=num_classes)
    if name == "tiny":
        return resnet(18, blocks=(1, 1, 1, 1), width=8, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r} (resnet50, resnet18, small, tiny)")


class Unavailable(Exception):
    pass


def make_case(case: str, model_name: str, device: torch.device, channels_last: bool, low_dtype: Optional[torch.dtype],
              num_classes: int):
    """(model, optimizer, param dtype, info) for one case."""
    from ..optim import MFSGD

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
    try:
        model, opt, info = make_case(case, args.model, device, args.channels_last, args.low_dtype, args.num_classes)
    except Unavailable as exc:
        rec.update(status="skipped", reason=str(exc))
        return rec
    rec.update({f"info_{k}": v for k, v in info.items()})
    pdtype = next(model.parameters()).dtype
    from ..data import synthetic_imagenet

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
               amp=str(amp).replace("torch.", "") if amp is not None else None)
    del model, opt
    return rec


def record_timeline(args, device: torch.device, batch: int, phases: Optional[dict] = None,
                    bucket_cap_mb: float = 25.0) -> dict:
    """Per-param gradient-ready times (hooks) + world-size-1 DistributedOptimizer buckets for one MFSGD step."""
    from ..comm import DistributedOptimizer
    from ..data import synthetic_imagenet

    model, opt, _ = make_case("mfsgd", args.model, device, args.channels_last, args.low_dtype, args.num_classes)
    params = [p for p in model.parameters() if p.requires_grad]
    dopt = DistributedOptimizer(opt, compression="fp16", bucket_cap_mb=bucket_cap_mb, telemetry=True)
    pdtype = params[0].dtype
    x, y = synthetic_imagenet(batch, device, args.channels_last, image_size=args.image_size,
                              num_classes=args.num_classes, dtype=pdtype)
    amp = args.amp_dtype if device.type == "cuda" else None
    loss_fn = nn.CrossEntropyLoss()
    marks: List = [None] * len(params)
    recording = [False]

    def mark():
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def hook_for(i):
        def hook(_p):
            if recording[0]:
                marks[i] = mark()
        return hook

    handles = [p.register_post_accumulate_grad_hook(hook_for(i)) for i, p in enumerate(params)]
    try:
        for it in range(args.warmup + 2):
            recording[0] = it == args.warmup + 1
            t0 = mark()
            if amp is not None:
                with torch.autocast(device.type, dtype=amp):
                    loss = loss_fn(model(x), y)
            else:
                loss = loss_fn(model(x), y)
            tb = mark()
            loss.backward()
            te = mark()
            dopt.step()
            tu = mark()
            dopt.zero_grad(set_to_none=True)
        sync(device)
    finally:
        for h in handles:
            h.remove()

    def rel(a, b):
        if device.type == "cuda":
            return a.elapsed_time(b) * 1e-3
        return b - a

    ready = [rel(tb, m) if m is not None else rel(tb, te) for m in marks]
    step_rec = dopt.telemetry.last()
    buckets = []
    origin = step_rec.backward_start
    for bt in step_rec.buckets:
        if bt.ready is not None and origin is not None:
            buckets.append(Bucket(ready_s=bt.ready - origin, nbytes=bt.bytes, num_params=bt.num_params))
    fwd = phases["forward_median_s"] if phases else rel(t0, tb)
    bwd = phases["backward_median_s"] if phases else rel(tb, te)
    opt_s = phases["optimizer_median_s"] if phases else rel(te, tu)
    # the hooks' times come from the recorded step; scale them onto the median backward when one is given
    hook_bwd = rel(tb, te)
    scale = bwd / hook_bwd if phases and hook_bwd > 0 else 1.0
    tl = Timeline(forward_s=fwd, backward_s=bwd, optimizer_s=opt_s,
                  params=[ParamGrad(numel=p.numel(), ready_s=min(r * scale, bwd)) for p, r in zip(params, ready)],
                  buckets=[Bucket(ready_s=min(b.ready_s * scale, bwd), nbytes=b.nbytes, num_params=b.num_params)
                           for b in buckets],
                  batch=batch,
                  source=(f"measured: {args.model} batch {batch} on {device}, MFSGD; phases = medians of the timed "
                          f"steps{'' if phases else ' (one step)'}; grad-ready times from post-accumulate-grad hooks "
                          f"of one step (scaled x{scale:.3f} onto the median backward); buckets from a world-size-1 "
                          f"DistributedOptimizer (fp16, cap {bucket_cap_mb} MB; ready after its first grad hook)"))
    dopt.remove_hooks()
    return {"timeline": tl.as_dict(), "distopt_telemetry": step_rec.as_dict(), "bucket_layout": dopt.bucket_layout(),
            "num_params": sum(p.numel() for p in params), "num_tensors": len(params)}


def defaults(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
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
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "none"), help="GPU autocast dtype")
    ap.add_argument("--low-precision", default="bf16", choices=("bf16", "fp16", "none"),
                    help="GPU: fusedmf's param dtype (fp32 masters)")
    ap.add_argument("--timeline-batch", type=int, default=None, help="batch of the recorded timeline (default: smallest)")
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny model (CPU), 2 batch sizes, 3 steps")
    ap.add_argument("--out", default=default_out)


_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve(args) -> torch.device:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = defaults(device, args.quick)
    for k in ("model", "batches", "image_size", "steps", "warmup", "num_classes"):
        if getattr(args, k) in (None, []):
            setattr(args, k, d[k])
    args.amp_dtype, args.low_dtype = _DT[args.amp], _DT[args.low_precision]
    if args.threads is None and device.type == "cpu" and args.quick:
        args.threads = 1          # a smoke run: one thread does not stall when other processes share the cores
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def run(args) -> dict:
    device = resolve(args)
    warnings.simplefilter("ignore", RuntimeWarning)
    start = time.perf_counter()
    machine = machine_info(device)
    jobs = [(c, b) for b in args.batches for c in args.cases]
    records = []
    for case, batch in progress(jobs, total=len(jobs), desc="throughput"):
        records.append(time_case(case, batch, args, device))
    tb = args.timeline_batch or min(args.batches)
    phases = next((r for r in records if r["case"] == "mfsgd" and r["batch"] == tb and r["status"] == "ok"), None)
    timeline = record_timeline(args, device, tb, phases, args.bucket_cap_mb)
    by = {(r["case"], r["batch"]): r for r in records}
    for r in records:
        base = by.get(("torch-sgd-foreach", r["batch"]))
        if r["status"] == "ok" and base and base["status"] == "ok":
            r["speedup_vs_foreach"] = base["median_s"] / r["median_s"]
    result = {"schema": 1, "bench": "throughput", "machine": machine,
              "config": {"device": str(device), "model": args.model, "image_size": args.image_size,
                         "num_classes": args.num_classes, "batches": args.batches, "steps": args.steps,
                         "warmup": args.warmup, "channels_last": args.channels_last,
                         "amp": args.amp if device.type == "cuda" else "none (CPU: fp32)",
                         "low_precision": args.low_precision if device.type == "cuda" else "none (CPU: fp32)",
                         "optimizer": f"SGD lr={LR} momentum={MOMENTUM} weight_decay={WD}", "quick": args.quick,
                         "threads": torch.get_num_threads(), "data": "synthetic (fusedmf.data.synthetic_imagenet)"},
              "cases": records, "timeline": timeline, "elapsed_s": time.perf_counter() - start}
    result["paths"] = {"json": write_json(result, args.out, f"throughput_{device.type}")}
    return result


def format_table(result: dict) -> str:
    c, m = result["config"], result["machine"]
    lines = [f"throughput: {c['model']} {c['image_size']}x{c['image_size']} on {m.get('device_name')}, "
             f"channels_last={c['channels_last']}, amp={c['amp']}, {c['threads']} thread(s), torch {m['torch']}, "
             f"git {str(m.get('git', {}).get('commit'))[:12]}"]
    header = (f"{'case':<18} {'batch':>5} {'img/s':>9} {'step ms':>9} {'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8} "
              f"{'p20-p80 ms':>15} {'vs foreach':>10}")
    lines += [header, "-" * len(header)]
    for r in result["cases"]:
        if r["status"] != "ok":
            lines.append(f"{r['case']:<18} {r['batch']:>5} {r['status']}: {r['reason']}")
            continue
        sp = f"{r['speedup_vs_foreach']:.2f}x" if r.get("speedup_vs_foreach") else "-"
        lines.append(f"{r['case']:<18} {r['batch']:>5} {r['images_per_s']:>9.1f} {r['median_s'] * 1e3:>9.2f} "
                     f"{r['forward_median_s'] * 1e3:>8.2f} {r['backward_median_s'] * 1e3:>8.2f} "
                     f"{r['optimizer_median_s'] * 1e3:>8.2f} {r['p20_s'] * 1e3:>7.2f}-{r['p80_s'] * 1e3:<7.2f} {sp:>10}")
    tl = result["timeline"]["timeline"]
    lines.append(f"timeline (batch {tl['batch']}): forward {tl['forward_s'] * 1e3:.2f} ms, backward "
                 f"{tl['backward_s'] * 1e3:.2f} ms, optimizer {tl['optimizer_s'] * 1e3:.2f} ms, "
                 f"{len(tl['params'])} grads, {len(tl['buckets'])} distopt buckets "
                 f"(ready at {', '.join('%.2f' % (b['ready_s'] * 1e3) for b in tl['buckets'])} ms)")
    lines.append(f"wrote {result['paths']['json']} in {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, default_out: Optional[str] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap, default_out or os.path.join("benchmarks", "out", "throughput"))
    args = ap.parse_args(argv)
    result = run(args)
    print(format_table(result))
    return result
