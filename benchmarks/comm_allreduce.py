#!/usr/bin/env python
"""Allreduce of a ResNet-50-sized gradient set over bucket sizes and compression modes.

    python benchmarks/comm_allreduce.py                    # 2 gloo ranks on CPU, spawned here (~1 min)
    python benchmarks/comm_allreduce.py --quick            # one bucket size, seconds (used by the tests)
    torchrun --nproc-per-node 8 benchmarks/comm_allreduce.py --backend nccl

The gradients have ResNet-50's shapes (161 tensors, 25,557,032 values, fp32; fusedmf.models), random,
never zeros. One call communicates all of them, the way a step does once backward has finished:

    fusedmf      buckets from fusedmf.comm.assign_buckets (reverse order, small first bucket);
                 per bucket ONE fusedmf.functional.pack (cast(g / N) into the flat buffer), an async
                 allreduce; then wait for all (what DistributedOptimizer does, minus the overlap)
    torch-style  per bucket: torch.cat of the flattened grads, cast and divide (two more passes for
                 fp16/bf16, as fp16_compress_hook), async allreduce; after the waits, cast back and copy
                 into the grads (DDP's decompress + unflatten)

Reported per (bucket cap, compression, implementation): median time per call, the payload, and the
algorithm bandwidth (payload / time) with the ring's bus bandwidth (x 2(N-1)/N), over the slowest
rank. Cases are interleaved round by round.
"""

from __future__ import annotations

import argparse
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

from fusedmf import functional as F  # noqa: E402
from fusedmf._ranks import process_group, spawn  # noqa: E402
from harness import machine_info, summarize, write  # noqa: E402
from fusedmf.comm import assign_buckets  # noqa: E402
from fusedmf.models import RESNET50_NUM_PARAMS, resnet50_param_shapes  # noqa: E402

DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class FusedmfPath:
    def __init__(self, grads, cap_mb, comm_dtype, world_size):
        self.grads, self.world_size = grads, world_size
        self.buckets = assign_buckets(grads, comm_dtype_of=lambda g: comm_dtype or g.dtype,
                                      bucket_cap_mb=cap_mb, first_bucket_cap_mb=min(1.0, cap_mb))
        self.buffers = [torch.zeros(b.numel, dtype=b.dtype, device=b.device) for b in self.buckets]
        self.payload = sum(b.nbytes for b in self.buckets)
        self.backend = None

    def __call__(self):
        works = []
        for b, buf in zip(self.buckets, self.buffers):
            self.backend = F.pack([self.grads[i] for i in b.params], buf, scale=1.0 / self.world_size)
            works.append(dist.all_reduce(buf, async_op=True))
        for w in works:
            w.wait()


class TorchStylePath:
    def __init__(self, grads, cap_mb, comm_dtype, world_size):
        self.grads, self.comm_dtype, self.world_size = grads, comm_dtype, world_size
        self.buckets = assign_buckets(grads, comm_dtype_of=lambda g: g.dtype, bucket_cap_mb=cap_mb,
                                      first_bucket_cap_mb=min(1.0, cap_mb))
        self.payload = sum(sum(grads[i].numel() for i in b.params) *
                           (torch.empty((), dtype=comm_dtype or torch.float32).element_size()) for b in self.buckets)

    def __call__(self):
        pending = []
        for b in self.buckets:
            flat = torch.cat([self.grads[i].reshape(-1) for i in b.params])
            if self.comm_dtype is not None:
                comm = flat.to(self.comm_dtype)
                comm.div_(self.world_size)
            else:
                comm = flat.div_(self.world_size)
            pending.append((b, comm, dist.all_reduce(comm, async_op=True)))
        for b, comm, work in pending:
            work.wait()
            flat = comm.to(torch.float32) if self.comm_dtype is not None else comm
            offset = 0
            for i in b.params:
                n = self.grads[i].numel()
                self.grads[i].view(-1).copy_(flat[offset:offset + n])
                offset += n


def run_rank(rank, world_size, args, out_path):
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    g = torch.Generator().manual_seed(rank)
    shapes = resnet50_param_shapes()
    grads = [torch.randn(s, generator=g).to(device) for s in shapes]
    assert sum(t.numel() for t in grads) == RESNET50_NUM_PARAMS
    cases = {}
    for cap in args.bucket_cap_mb:
        for comp in args.compression:
            for impl, cls in (("fusedmf", FusedmfPath), ("torch-style", TorchStylePath)):
                # the torch-style path writes the averaged grads back: give it its own copy
                cases[f"{impl}/{comp}/cap{cap:g}MB"] = cls(grads if impl == "fusedmf" else [t.clone() for t in grads],
                                                           cap, DTYPES[comp], world_size)
    times = {n: [] for n in cases}
    for n, fn in cases.items():
        for _ in range(args.warmup):
            fn()
    for _ in range(args.repeats):
        for n, fn in cases.items():
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[n].append(time.perf_counter() - t0)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, times)
    if rank == 0:
        meta = {n: {"payload_bytes": c.payload, "buckets": len(c.buckets),
                    "pack_backend": getattr(c, "backend", None)} for n, c in cases.items()}
        torch.save({"per_rank": everyone, "meta": meta,
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None}, out_path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--bucket-cap-mb", type=float, nargs="+", default=[1.0, 5.0, 25.0, 100.0])
    ap.add_argument("--compression", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="cap 25 MB, none and fp16, 2 repeats: a smoke run")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "comm"))
    args = ap.parse_args(argv)
    if args.quick:
        args.bucket_cap_mb, args.compression, args.repeats = [25.0], ["none", "fp16"], 2
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        args.threads = args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        tmp = os.path.join(args.out, ".comm_allreduce_torchrun.pt")
        with process_group(args.backend, timeout_s=300):
            run_rank(rank, world_size, args, tmp)
        if rank != 0:
            return None
    else:
        if args.backend == "nccl":
            raise SystemExit("--backend nccl runs under torchrun (one process per GPU)")
        world_size = args.world_size
        args.threads = args.threads or max(1, (os.cpu_count() or 1) // world_size)
        tmp = os.path.join(args.out, f".comm_allreduce_{os.getpid()}.pt")
        spawn(run_rank, world_size, args, tmp, timeout_s=300)
    raw = torch.load(tmp, weights_only=False)
    os.remove(tmp)
    result = summarize_results(raw, args, world_size, time.perf_counter() - start)
    print(format_table(result))
    return result


def summarize_results(raw, args, world_size, elapsed):
    device = "cuda" if args.backend == "nccl" else "cpu"
    machine = machine_info(torch.device("cpu"))
    machine["device_name"] = raw["device_name"] or machine["device_name"]
    per_rank = raw["per_rank"]
    records = []
    for n, meta in raw["meta"].items():
        steps = [max(r[n][i] for r in per_rank) for i in range(len(per_rank[0][n]))]
        stats = summarize(steps)
        impl, comp, cap = n.split("/")
        algbw = meta["payload_bytes"] / stats["median_s"] / 1e9
        baseline = f"torch-style/{comp}/{cap}" if impl == "fusedmf" else None
        records.append({"name": n, "status": "ok", "reason": None, "bytes_per_call": meta["payload_bytes"],
                        "baseline": baseline, "repeats_s": steps, **stats, "gbps": algbw,
                        "bus_gbps": algbw * 2 * (world_size - 1) / world_size, "info_buckets": meta["buckets"],
                        "info_pack_backend": meta["pack_backend"], "info_compression": comp, "info_impl": impl})
    by = {r["name"]: r for r in records}
    for r in records:
        if r["baseline"] in by:
            r["speedup"] = by[r["baseline"]]["median_s"] / r["median_s"]
    result = {"schema": 1, "bench": "comm_allreduce", "machine": machine,
              "config": {"device": device, "backend": args.backend, "world_size": world_size,
                         "gradients": "ResNet-50 shapes, fp32, 25,557,032 values in 161 tensors",
                         "bucket_cap_mb": args.bucket_cap_mb, "compression": args.compression,
                         "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads},
              "cases": records, "elapsed_s": elapsed,
              "backends_used": {r["name"]: {"pack": r["info_pack_backend"]} for r in records if r["info_pack_backend"]}}
    result["paths"] = write(result, args.out)
    return result


def format_table(result) -> str:
    c, m = result["config"], result["machine"]
    lines = [f"comm_allreduce: {c['world_size']} {c['backend']} ranks on {m['device_name']}, ResNet-50 gradients "
             f"(25.6M values), {c['threads']} thread(s)/rank, torch {m['torch']}, git {str(m['git']['commit'])[:12]}"]
    w = max(len(r["name"]) for r in result["cases"])
    header = f"{'case':<{w}}  {'buckets':>7}  {'MB':>6}  {'median ms':>9}  {'p20-p80 ms':>15}  {'algbw GB/s':>10}  {'busbw':>6}  {'speedup':>7}"
    lines += [header, "-" * len(header)]
    for r in sorted(result["cases"], key=lambda r: (r["info_compression"], float(r["name"].split("cap")[1][:-2]), r["info_impl"])):
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        lines.append(f"{r['name']:<{w}}  {r['info_buckets']:>7}  {r['bytes_per_call'] / 1e6:>6.1f}  {r['median_s'] * 1e3:>9.1f}  "
                     f"{r['p20_s'] * 1e3:>7.1f}-{r['p80_s'] * 1e3:<7.1f}  {r['gbps']:>10.2f}  {r['bus_gbps']:>6.2f}  {sp:>7}")
    lines.append("speedup = torch-style median / fusedmf median at the same cap and compression (same run); "
                 f"pack backend: {sorted({r['info_pack_backend'] for r in result['cases'] if r['info_pack_backend']})}")
    lines.append(f"wrote {result['paths']['json']} (+ .csv) in {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
