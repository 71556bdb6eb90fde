#!/usr/bin/env python
"""One data-parallel training step: fusedmf's DistributedOptimizer against torch DDP, same model and run.

    python benchmarks/comm_train_step.py                     # 2 gloo ranks on CPU, spawned here (~1-2 min)
    python benchmarks/comm_train_step.py --quick             # a smaller model, seconds (used by the tests)
    torchrun --nproc-per-node 8 benchmarks/comm_train_step.py --backend nccl

The model is a batch-norm-free stack of Linear+ReLU layers (width 2048, depth 6: 25.2M parameters,
about ResNet-50's 25.6M), MSE loss on random data; each rank has its own shard of the batch. A
step is forward, backward (with whatever communication overlaps it), the optimizer step and
zero_grad; the step time of a step is the slowest rank's, timed with perf_counter between barriers
(GPU: after a synchronize). Cases, each SGD with momentum 0.9, lr 0.01:

    ddp/allreduce/torch-sgd                torch DDP, default hook (fp32 allreduce), torch.optim.SGD
    ddp/fp16_compress_hook/torch-sgd       torch DDP + fp16_compress_hook, torch.optim.SGD   <- baseline
    ddp/fp16_compress_hook/mfsgd           the same with fusedmf's MFSGD (isolates the optimizer)
    ddp/fusedmf-hook-fp16/mfsgd-in-hook    torch DDP + fusedmf.comm.ddp_comm_hook(optimizer=...)
    fusedmf/distopt-fp16/mfsgd             fusedmf.comm.DistributedOptimizer(MFSGD, compression="fp16")
    fusedmf/distopt-none/mfsgd             the same without compression (fp32 allreduce)

torch.optim.SGD runs fused=True where this torch has it for the device, else foreach. The cases are
interleaved round by round (machine load drifts); every case's replicas are checked to be identical
on every rank after timing. A final, untimed run of the DistributedOptimizer case with telemetry on
records the bucket timeline (Chrome trace next to the JSON) and the exposed communication.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from fusedmf._ranks import process_group, spawn  # noqa: E402
from fusedmf.comm import DistributedOptimizer, ddp_comm_hook, merge_chrome_traces, write_chrome_trace  # noqa: E402
from fusedmf.optim import MFSGD  # noqa: E402
from harness import build_model, machine_info, summarize, write  # noqa: E402

BASELINE = "ddp/fp16_compress_hook/torch-sgd"
CASES = ("ddp/allreduce/torch-sgd", BASELINE, "ddp/fp16_compress_hook/mfsgd",
         "ddp/fusedmf-hook-fp16/mfsgd-in-hook", "fusedmf/distopt-fp16/mfsgd", "fusedmf/distopt-none/mfsgd")
LR, MOMENTUM = 0.01, 0.9


def mlp(args, device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", width=args.width, depth=args.depth).to(device)


def torch_sgd(params, device):
    try:
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, fused=True), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=True), "foreach"


def make_case(name: str, args, device):
    """(step function, model, info) for one case on this rank."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model = mlp(args, device)
    info = {}
    ddp_kw = dict(bucket_cap_mb=args.bucket_cap_mb, device_ids=[device.index] if device.type == "cuda" else None)
    if name.startswith("ddp/"):
        ddp = nn.parallel.DistributedDataParallel(model, **ddp_kw)
        if "fusedmf-hook" in name:
            opt = MFSGD(model.parameters(), lr=LR, momentum=MOMENTUM)
            state, hook = ddp_comm_hook(compression="fp16", optimizer=opt)
            ddp.register_comm_hook(state, hook)
            info["hook_state"] = state
        else:
            if "fp16_compress_hook" in name:
                ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
            if name.endswith("torch-sgd"):
                opt, impl = torch_sgd(model.parameters(), device)
                info["torch_sgd"] = impl
            else:
                opt = MFSGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        step_in_hook = "in-hook" in name
        forward = ddp
    else:
        opt = DistributedOptimizer(MFSGD(model.parameters(), lr=LR, momentum=MOMENTUM),
                                   compression=name.split("/")[1].split("-")[1], bucket_cap_mb=args.bucket_cap_mb)
        info["dopt"] = opt
        step_in_hook = False
        forward = model

    def step(x, y):
        loss = (forward(x) - y).pow(2).mean()
        loss.backward()
        if not step_in_hook:
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model, info


def params_digest(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rank(rank: int, world_size: int, args, out_path: str) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    names = [c for c in CASES if any(fnmatch.fnmatch(c, pat) for pat in args.cases)]
    cases = {n: make_case(n, args, device) for n in names}
    g = torch.Generator().manual_seed(100 + rank)
    batches = [(torch.randn(args.batch, args.width, generator=g).to(device),
                torch.randn(args.batch, args.width, generator=g).to(device)) for _ in range(4)]
    times = {n: [] for n in names}
    for n in names:                                      # warm-up (buffers, DDP's bucket rebuild)
        for i in range(args.warmup):
            cases[n][0](*batches[i % len(batches)])
    sync(device)
    for rnd in range(args.rounds):
        for n in names:
            step = cases[n][0]
            for i in range(args.steps_per_round):
                x, y = batches[(rnd + i) % len(batches)]
                dist.barrier()
                sync(device)
                t0 = time.perf_counter()
                step(x, y)
                sync(device)
                times[n].append(time.perf_counter() - t0)
    # correctness: every rank holds the same replica of every case
    digests = {n: params_digest(cases[n][1]) for n in names}
    everyone = [None] * world_size
    dist.all_gather_object(everyone, {"times": times, "digests": digests})
    extra = {}
    if "fusedmf/distopt-fp16/mfsgd" in names:             # untimed telemetry run: the bucket timeline
        model = mlp(args, device)
        dopt = DistributedOptimizer(MFSGD(model.parameters(), lr=LR, momentum=MOMENTUM), compression="fp16",
                                    bucket_cap_mb=args.bucket_cap_mb, telemetry=True)
        for i in range(3):
            x, y = batches[i % len(batches)]
            ((model(x) - y).pow(2).mean()).backward()
            dopt.step()
            dopt.zero_grad()
        traces = [None] * world_size
        dist.all_gather_object(traces, {"trace": dopt.telemetry.to_chrome_trace(),
                                        "summary": dopt.telemetry.summary(),
                                        "last": dopt.telemetry.last().as_dict(),
                                        "layout": dopt.bucket_layout(), "backends": dopt.backends_used})
        extra["telemetry"] = traces
    info = {n: {k: v for k, v in cases[n][2].items() if isinstance(v, str)} for n in names}
    for n in names:  # what ran in each fusedmf case (its DistributedOptimizer's or optimizer's record)
        used = {k: v.backends_used for k, v in cases[n][2].items() if hasattr(v, "backends_used")}
        if used:
            info[n]["backends"] = used
    if rank == 0:
        torch.save({"per_rank": everyone, "extra": extra, "info": info,
                    "num_params": sum(p.numel() for p in cases[names[0]][1].parameters()),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None}, out_path)


def summarize_results(raw, args, world_size, elapsed):
    device = "cuda" if args.backend == "nccl" else "cpu"
    machine = machine_info(torch.device(device if device == "cpu" or torch.cuda.is_available() else "cpu"))
    if raw["device_name"]:
        machine["device_name"] = raw["device_name"]
    per_rank = raw["per_rank"]
    names = list(per_rank[0]["times"])
    records = []
    for n in names:
        # the step of all ranks ends when the slowest rank's does
        steps = [max(r["times"][n][i] for r in per_rank) for i in range(len(per_rank[0]["times"][n]))]
        identical = len({r["digests"][n] for r in per_rank}) == 1
        rec = {"name": n, "status": "ok" if identical else "incorrect",
               "reason": None if identical else "replicas differ between ranks after timing",
               "bytes_per_call": None, "baseline": BASELINE if n != BASELINE else None,
               "repeats_s": steps, "per_rank_s": [r["times"][n] for r in per_rank], "replicas_identical": identical,
               **summarize(steps), **{f"info_{k}": v for k, v in raw["info"].get(n, {}).items()}}
        records.append(rec)
    by = {r["name"]: r for r in records}
    for r in records:
        if r["baseline"] in by:
            r["speedup"] = by[r["baseline"]]["median_s"] / r["median_s"]
    result = {"schema": 1, "bench": "comm_train_step", "machine": machine,
              "config": {"device": device, "backend": args.backend, "world_size": world_size, "width": args.width,
                         "depth": args.depth, "num_params": raw["num_params"], "batch_per_rank": args.batch,
                         "bucket_cap_mb": args.bucket_cap_mb, "rounds": args.rounds,
                         "steps_per_round": args.steps_per_round, "warmup": args.warmup, "threads": args.threads,
                         "optimizer": f"SGD lr={LR} momentum={MOMENTUM}"},
              "cases": records, "elapsed_s": elapsed,
              "backends_used": {n: raw["info"][n]["backends"] for n in names if "backends" in raw["info"].get(n, {})}}
    tel = raw["extra"].get("telemetry")
    if tel:
        result["telemetry"] = [{"rank": i, "summary": t["summary"], "last_step": t["last"], "buckets": t["layout"],
                                "backends": t["backends"]} for i, t in enumerate(tel)]
    key = by.get("fusedmf/distopt-fp16/mfsgd")
    if key and BASELINE in by:
        result["comparisons"] = {"distopt fp16 vs DDP fp16_compress_hook (speedup, same run)": key.get("speedup")}
    os.makedirs(args.out, exist_ok=True)
    paths = write(result, args.out)
    if tel:
        trace_path = paths["json"].replace(".json", "_trace.json")
        write_chrome_trace(trace_path, merge_chrome_traces(t["trace"] for t in tel))
        paths["trace"] = trace_path
    result["paths"] = paths
    return result


def format_table(result) -> str:
    c, m = result["config"], result["machine"]
    lines = [f"comm_train_step: {c['world_size']} {c['backend']} ranks on {m['device_name']}, "
             f"{c['num_params'] / 1e6:.1f}M params (Linear {c['width']}x{c['depth']}), batch {c['batch_per_rank']}/rank, "
             f"{c['threads']} thread(s)/rank, torch {m['torch']}, git {str(m['git']['commit'])[:12]}"]
    w = max(len(r["name"]) for r in result["cases"])
    header = f"{'case':<{w}}  {'median ms':>9}  {'p20-p80 ms':>17}  {'speedup':>7}  ranks equal"
    lines += [header, "-" * len(header)]
    for r in result["cases"]:
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        lines.append(f"{r['name']:<{w}}  {r['median_s'] * 1e3:>9.1f}  "
                     f"{r['p20_s'] * 1e3:>8.1f}-{r['p80_s'] * 1e3:<8.1f}  {sp:>7}  {r['replicas_identical']}")
    lines.append(f"speedup = {BASELINE} median / case median (same run, cases interleaved)")
    for t in result.get("telemetry", [])[:1]:
        s = t["summary"]
        last = t["last_step"]
        lines.append(f"distopt telemetry (rank 0, {len(t['buckets'])} buckets, {last['bytes_sent'] / 1e6:.1f} MB/step): "
                     f"backward {s['median_backward_s'] * 1e3:.1f} ms, exposed communication "
                     f"{s['median_exposed_comm_s'] * 1e3:.1f} ms, update {s['median_update_s'] * 1e3:.1f} ms, "
                     f"buckets launched during backward {sum(b['in_backward'] for b in last['buckets'])}/{len(last['buckets'])}; "
                     f"backends {t['backends']}")
    lines.append(f"wrote {result['paths']['json']} (+ .csv{', trace' if 'trace' in result['paths'] else ''}) "
                 f"in {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--world-size", type=int, default=2, help="ranks to spawn (gloo, without torchrun)")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32, help="samples per rank")
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    ap.add_argument("--cases", nargs="*", default=["*"], help="fnmatch patterns of case names")
    ap.add_argument("--quick", action="store_true", help="width 512, depth 4, 2 rounds: a smoke run")
    ap.add_argument("--pg-timeout", type=float, default=300.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "comm"))
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.rounds, args.steps_per_round, args.warmup = 512, 4, 2, 2, 1
    start = time.perf_counter()
    tmp = os.path.join(args.out, f".comm_train_step_{os.getpid()}.pt")
    os.makedirs(args.out, exist_ok=True)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:          # torchrun
        world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        args.threads = args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        tmp = os.path.join(args.out, ".comm_train_step_torchrun.pt")
        with process_group(args.backend, timeout_s=args.pg_timeout):
            run_rank(rank, world_size, args, tmp)
        if rank != 0:
            return None
    else:
        if args.backend == "nccl":
            raise SystemExit("--backend nccl runs under torchrun (one process per GPU)")
        world_size = args.world_size
        args.threads = args.threads or max(1, (os.cpu_count() or 1) // world_size)
        spawn(run_rank, world_size, args, tmp, timeout_s=args.pg_timeout)
    raw = torch.load(tmp, weights_only=False)
    os.remove(tmp)
    result = summarize_results(raw, args, world_size, time.perf_counter() - start)
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
