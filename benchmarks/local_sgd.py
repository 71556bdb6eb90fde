#!/usr/bin/env python
"""Local SGD: communication volume and step time, and training after a fixed budget, in one run.

    python benchmarks/local_sgd.py              # 2 gloo ranks on CPU, spawned here (~1-2 min)
    python benchmarks/local_sgd.py --quick      # smaller model and budget (seconds; used by the tests)

Part 1, the same model for every case (a batch-norm-free Linear+ReLU stack, width x depth, MSE loss
on random data, each rank its own batch), SGD momentum 0.9, fp16 compression where it applies:

    fusedmf/distopt-fp16          DistributedOptimizer(MFSGD): gradients allreduced every step  <- baseline
    fusedmf/localsgd-H{1,4,16}    LocalSGD(MFSGD, period=H): fused, bucketed averages of fp16 differences
    torch/postlocal-H{1,4,16}     torch PostLocalSGDOptimizer(SGD) + PeriodicModelAverager(period=H):
                                  a torch.cat copy of the fp32 params allreduced every H steps

A round runs every case for 16 steps (so each H averages a whole number of times), cases interleaved
round by round; the time of a round is the slowest rank's, per step. Communication is the payload
allreduced per step: measured by the telemetry for fusedmf (bytes of every flat buffer sent, mean over
the steps), counted for torch (4 bytes per parameter every H steps: average_parameters allreduces one
fp32 copy of the parameters).

Part 2, a small ResNet (fusedmf.models.resnet, BasicBlocks (1,1,1,1)) on CIFAR-shaped data (CIFAR-10
from --data when given, else synthetic class prototypes + noise, as benchmarks/mf_experiment.py):
synchronous SGD (DistributedOptimizer) against post-local SGD (LocalSGD with warm-up, H = 4 and 16,
BatchNorm buffers averaged with the params), the same number of steps and samples; training loss per
step (mean over the ranks) and held-out accuracy at the end. PNG plot next to the JSON.

Timings from a shared or contended machine are not results; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from fusedmf.comm import DistributedOptimizer, LocalSGD  # noqa: E402
from fusedmf.optim import MFSGD  # noqa: E402

LR, MOMENTUM = 0.01, 0.9
BASELINE = "fusedmf/distopt-fp16"
PERIODS = (1, 4, 16)
ROUND_STEPS = 16


# ------------------------------------------------------------------------------------------ part 1
def mlp(width: int, depth: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_case(name: str, args):
    """(step(x, y), model, bytes_fn) for one case; bytes_fn() -> payload bytes per step."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    model = mlp(args.width, args.depth)
    numel = sum(p.numel() for p in model.parameters())
    if name == BASELINE:
        opt = DistributedOptimizer(MFSGD(model.parameters(), lr=LR, momentum=MOMENTUM), compression="fp16",
                                   bucket_cap_mb=args.bucket_cap_mb, telemetry=True)
    elif name.startswith("fusedmf/localsgd-H"):
        opt = LocalSGD(MFSGD(model.parameters(), lr=LR, momentum=MOMENTUM), period=int(name.rsplit("H", 1)[1]),
                       compression="fp16", bucket_cap_mb=args.bucket_cap_mb, telemetry=True)
    elif name.startswith("torch/postlocal-H"):
        h = int(name.rsplit("H", 1)[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # period 1: torch warns that DDP would do
            averager = PeriodicModelAverager(period=h, warmup_steps=0)
        opt = PostLocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, foreach=True),
                                    averager)
    else:
        raise ValueError(name)

    def step(x, y):
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    def bytes_per_step():
        if name.startswith("torch/"):
            return 4.0 * numel / int(name.rsplit("H", 1)[1])          # counted, see the module docstring
        steps = opt.telemetry.steps
        return sum(s.bytes_sent for s in steps) / len(steps)           # measured

    return step, model, bytes_per_step, opt


def comm_part(rank, world_size, args) -> dict:
    names = [BASELINE] + [f"fusedmf/localsgd-H{h}" for h in PERIODS] + [f"torch/postlocal-H{h}" for h in PERIODS]
    cases = {n: make_case(n, args) for n in names}
    g = torch.Generator().manual_seed(100 + rank)
    batches = [(torch.randn(args.batch, args.width, generator=g), torch.randn(args.batch, args.width, generator=g))
               for _ in range(4)]
    for n in names:                       # warm-up: one round each (allocations, first averages)
        for i in range(ROUND_STEPS):
            cases[n][0](*batches[i % 4])
    for n in names:
        if not n.startswith("torch/"):
            cases[n][3].telemetry.clear()
    times = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            step = cases[n][0]
            dist.barrier()
            t0 = time.perf_counter()
            for i in range(ROUND_STEPS):
                step(*batches[i % 4])
            dist.barrier()   # the round ends when the slowest rank's does
            times[n].append((time.perf_counter() - t0) / ROUND_STEPS)
    params = {n: torch.cat([p.detach().reshape(-1) for p in cases[n][1].parameters()]) for n in names}
    same = {}
    for n in names:   # every case ends a round on an average (16 is a multiple of every H): replicas agree
        everyone = [torch.empty_like(params[n]) for _ in range(world_size)]
        dist.all_gather(everyone, params[n])
        same[n] = all(torch.equal(e, everyone[0]) for e in everyone)
    local = {n: cases[n][3] for n in names if n.startswith("fusedmf/localsgd")}
    return {"times": times, "bytes_per_step": {n: cases[n][2]() for n in names}, "identical": same,
            "num_params": params[BASELINE].numel(),
            "average_s": {n: o.telemetry.summary().get("median_average_s") for n, o in local.items()},
            "backends": {n: o.backends_used for n, o in local.items()}}


# ------------------------------------------------------------------------------------------ part 2
def train_part(rank, world_size, args) -> dict:
    from fusedmf.models.resnet import resnet
    from mf_experiment import load_data

    x, y, xt, yt, source = load_data(args.train_samples, args.test_samples, args.data, seed=0)
    configs = {"sync": None, "post-local H=4": 4, "post-local H=16": 16}
    out = {"source": source, "losses": {}, "accuracy": {}, "bytes_per_step": {}}
    for name, h in configs.items():
        torch.manual_seed(0)
        model = resnet(blocks=(1, 1, 1, 1), width=args.resnet_width, bottleneck=False, num_classes=10)
        opt = MFSGD(model.parameters(), lr=args.train_lr, momentum=MOMENTUM, weight_decay=5e-4)
        if h is None:
            wrapped = DistributedOptimizer(opt, compression="fp16", telemetry=True, telemetry_history=args.train_steps)
        else:
            wrapped = LocalSGD(opt, period=h, warmup_steps=args.warmup_steps, compression="fp16", module=model,
                               telemetry=True, telemetry_history=args.train_steps)
        gen = torch.Generator().manual_seed(10 + rank)      # each rank its own samples
        losses = []
        model.train()
        for t in range(args.train_steps):
            idx = torch.randint(0, x.shape[0], (args.train_batch,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            wrapped.zero_grad()
            loss.backward()
            wrapped.step()
            mean = loss.detach().reshape(1).clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world_size)
        if h is None and world_size > 1:
            # sync training keeps per-rank BatchNorm statistics (as DDP without buffer broadcast would
            # drift); average them once so the evaluated model is the same on every rank
            for b in model.buffers():
                if b.is_floating_point():
                    dist.all_reduce(b)
                    b /= world_size
        model.eval()
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item()
        steps = wrapped.telemetry.steps
        out["losses"][name] = losses
        out["accuracy"][name] = acc
        out["bytes_per_step"][name] = sum(s.bytes_sent for s in steps) / len(steps)
    return out


# ------------------------------------------------------------------------------------------ driver
def _spawned(rank, world_size, port, args, out_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=args.pg_timeout))
    try:
        comm = comm_part(rank, world_size, args)
        everyone = [None] * world_size
        dist.all_gather_object(everyone, comm)
        train = train_part(rank, world_size, args)
        if rank == 0:
            torch.save({"comm": everyone, "train": train}, out_path)
    finally:
        dist.destroy_process_group()


def summarize(raw, args, world_size, elapsed):
    from harness import machine_info, summarize as stats, write

    machine = machine_info(torch.device("cpu"))
    machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    per_rank = raw["comm"]
    records = []
    for n in per_rank[0]["times"]:
        rounds = [max(r["times"][n][i] for r in per_rank) for i in range(len(per_rank[0]["times"][n]))]
        identical = all(r["identical"][n] for r in per_rank)
        # fusedmf's cases end every round on an average; torch's PeriodicModelAverager averages after
        # the steps its counter (0-based) is a multiple of H, i.e. after the 1st, (H+1)-th, ... step, so its
        # replicas differ after the last round for H > 1 (that is its schedule, not an error)
        ok = identical or n.startswith("torch/")
        rec = {"name": n, "status": "ok" if ok else "incorrect",
               "reason": None if ok else "replicas differ between ranks after the last round",
               "bytes_per_call": None, "baseline": BASELINE if n != BASELINE else None, "repeats_s": rounds,
               "per_rank_s": [r["times"][n] for r in per_rank], "replicas_identical": identical,
               "comm_bytes_per_step": per_rank[0]["bytes_per_step"][n],
               "comm_bytes_source": "counted" if n.startswith("torch/") else "measured (telemetry)",
               **stats(rounds)}
        if n in per_rank[0]["average_s"]:
            rec["median_average_s"] = per_rank[0]["average_s"][n]
            rec["info_backends"] = str(per_rank[0]["backends"][n])
        records.append(rec)
    by = {r["name"]: r for r in records}
    for r in records:
        if r["baseline"] in by:
            r["speedup"] = by[r["baseline"]]["median_s"] / r["median_s"]
            r["comm_reduction"] = by[r["baseline"]]["comm_bytes_per_step"] / max(r["comm_bytes_per_step"], 1e-30)
    comparisons = {}
    for h in PERIODS:
        ours, theirs = by[f"fusedmf/localsgd-H{h}"], by[f"torch/postlocal-H{h}"]
        comparisons[f"H={h}: torch PostLocalSGD step time / LocalSGD step time (same run)"] = \
            theirs["median_s"] / ours["median_s"]
        comparisons[f"H={h}: DistributedOptimizer bytes per step / LocalSGD bytes per step"] = ours["comm_reduction"]
    train = raw["train"]
    result = {"schema": 1, "bench": "local_sgd", "machine": machine,
              "config": {"device": "cpu", "backend": "gloo", "world_size": world_size, "width": args.width,
                         "depth": args.depth, "num_params": per_rank[0]["num_params"], "batch_per_rank": args.batch,
                         "bucket_cap_mb": args.bucket_cap_mb, "rounds": args.rounds, "steps_per_round": ROUND_STEPS,
                         "threads": args.threads, "optimizer": f"SGD lr={LR} momentum={MOMENTUM}",
                         "train": {"data": train["source"], "steps": args.train_steps, "batch_per_rank": args.train_batch,
                                   "warmup_steps": args.warmup_steps, "lr": args.train_lr,
                                   "resnet_width": args.resnet_width, "train_samples": args.train_samples,
                                   "test_samples": args.test_samples}},
              # what ran, per LocalSGD case (the torch and DistributedOptimizer baselines report their own ops)
              "backends_used": {n: repr(b) for n, b in per_rank[0]["backends"].items()},
              "cases": records, "comparisons": comparisons,
              "training": {"final_loss_mean_last10": {k: sum(v[-10:]) / len(v[-10:]) for k, v in train["losses"].items()},
                           "test_accuracy": train["accuracy"], "bytes_per_step": train["bytes_per_step"],
                           "losses": train["losses"]},
              "elapsed_s": elapsed}
    paths = write(result, args.out)
    paths["png"] = paths["json"].replace(".json", ".png")
    plot(result, paths["png"])
    result["paths"] = paths
    return result


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    tr = result["training"]
    for name, losses in tr["losses"].items():
        k = 5
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax1.plot(range(1, len(losses) + 1), smooth,
                 label=f"{name}: test acc {tr['test_accuracy'][name]:.3f}, {tr['bytes_per_step'][name] / 1e3:.0f} kB/step")
    w = result["config"]["train"]["warmup_steps"]
    ax1.axvline(w, color="grey", ls=":", lw=1)
    ax1.text(w, ax1.get_ylim()[1], " local steps start", va="top", fontsize=8, color="grey")
    ax1.set(xlabel="step", ylabel="training loss (mean over ranks, 5-step moving average)",
            title=f"ResNet (1,1,1,1) on {result['config']['train']['data']} data, "
                  f"{result['config']['world_size']} ranks")
    ax1.legend(fontsize=8)
    names = [c["name"] for c in result["cases"]]
    x = range(len(names))
    ax2.bar(x, [c["comm_bytes_per_step"] / 1e6 for c in result["cases"]], color="tab:blue")
    ax2.set_yscale("log")
    ax2.set_ylabel("MB allreduced per step (log)", color="tab:blue")
    ax2.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax3 = ax2.twinx()
    ax3.plot(list(x), [c["median_s"] * 1e3 for c in result["cases"]], "o", color="tab:red")
    ax3.set_ylabel("median step time, ms (contended CPU: not a result)", color="tab:red")
    ax3.set_ylim(bottom=0)
    ax2.set_title(f"{result['config']['num_params'] / 1e6:.1f}M-parameter MLP, SGD momentum 0.9")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(result) -> str:
    c, m = result["config"], result["machine"]
    lines = [f"local_sgd: {c['world_size']} gloo ranks on {m['device_name']}, {c['num_params'] / 1e6:.2f}M params, "
             f"batch {c['batch_per_rank']}/rank, {c['threads']} thread(s)/rank, torch {m['torch']}, "
             f"git {str(m['git']['commit'])[:12]}, load {m.get('loadavg_at_start')} -> {m.get('loadavg_at_end')}"]
    w = max(len(r["name"]) for r in result["cases"])
    header = f"{'case':<{w}}  {'median ms/step':>14}  {'speedup':>7}  {'kB/step':>10}  {'comm /':>7}  equal"
    lines += [header, "-" * len(header)]
    for r in result["cases"]:
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        red = f"{r['comm_reduction']:.1f}x" if r.get("comm_reduction") else "-"
        lines.append(f"{r['name']:<{w}}  {r['median_s'] * 1e3:>14.2f}  {sp:>7}  {r['comm_bytes_per_step'] / 1e3:>10.1f}  "
                     f"{red:>7}  {r['replicas_identical']}")
    lines.append(f"speedup / comm: {BASELINE} over the case (same run, rounds interleaved)")
    for k, v in result["comparisons"].items():
        lines.append(f"  {k}: {v:.2f}")
    tr = result["training"]
    lines.append(f"training ({c['train']['steps']} steps, {c['train']['data']} data): " + "; ".join(
        f"{k}: loss {tr['final_loss_mean_last10'][k]:.3f}, test acc {tr['test_accuracy'][k]:.3f}, "
        f"{tr['bytes_per_step'][k] / 1e3:.0f} kB/step" for k in tr["test_accuracy"]))
    lines.append(f"wrote {result['paths']['json']} (+ .csv, .png) in {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=160, help="a multiple of 16 after --warmup-steps")
    ap.add_argument("--warmup-steps", type=int, default=32)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--train-lr", type=float, default=0.05)
    ap.add_argument("--resnet-width", type=int, default=8)
    ap.add_argument("--train-samples", type=int, default=4096)
    ap.add_argument("--test-samples", type=int, default=1024)
    ap.add_argument("--data", default=None, help="a cifar-10-batches-bin folder (default: synthetic data)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    ap.add_argument("--quick", action="store_true", help="tiny model and budget: a smoke run")
    ap.add_argument("--pg-timeout", type=float, default=300.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "local_sgd"))
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.rounds = 128, 2, 1
        args.train_steps, args.warmup_steps, args.train_batch, args.resnet_width = 48, 16, 8, 4
        args.train_samples, args.test_samples = 256, 64
    if (args.train_steps - args.warmup_steps) % 16:
        raise SystemExit("--train-steps minus --warmup-steps must be a multiple of 16 (the run ends on an average)")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.world_size)
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, f".local_sgd_{os.getpid()}.pt")
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(args.world_size, port, args, tmp), nprocs=args.world_size)
    raw = torch.load(tmp, weights_only=False)
    os.remove(tmp)
    result = summarize(raw, args, args.world_size, time.perf_counter() - start)
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
