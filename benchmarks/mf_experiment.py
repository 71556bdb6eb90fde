"""MF experiment: training loss vs. momentum-like factor at a fixed global batch split over K ranks.

What is measured, plainly: in synchronous data parallelism the averaged gradient does not depend
on the number of ranks K at a fixed global batch B, *except through batch-norm statistics*, which
each rank computes on its own b = B / K samples (per-rank BN, not SyncBN). This script simulates K
ranks in one process: every step, each rank's micro-batch of b samples goes through the model
separately in train mode (so BN normalises with that rank's own batch statistics), the per-rank
losses / K are back-propagated into the same .grad (= the allreduce average), and the optimizer
takes one step. Nothing else differs between K values: same initial weights, same samples in the
same order, same global batch. It then sweeps the MF (momentum μ for SGD / NAG, β1 for Adam; Tang
et al., "Increasing Momentum-Like Factors", Tsinghua Sci. Technol. 2022) over fusedmf.mf rules:

- ``const``: μ = 0.9 whatever K (torch's default behaviour);
- ``horizon``: fusedmf's heuristic 1 − μ = 0.1 · (b / B) (0.975 at K = 4, 0.9875 at K = 8);
- ``ramp_horizon``: ramp from 0.9 to the horizon value over the first ``--ramp`` updates;
- ``horizon_comp`` (SGD / NAG only): the horizon MF with ``lr_compensation=0.9``, which keeps the
  effective LR η/(1 − μ) of the K = 1 run, so only the averaging horizon changes.

Only the training loss (mean over the global batch, in train mode) is recorded; BN running
statistics are updated K times per step here and are not used. Data: synthetic CIFAR-shaped
(3x32x32, 10 classes, class prototypes plus noise: learnable, so losses fall), or the CIFAR-10
binary files (``data_batch_1.bin`` ...) when ``--data DIR`` holds them. The model is a small
fusedmf.models.resnet (BasicBlocks, 1 block per stage, width 8 by default).

    python benchmarks/mf_experiment.py            # --quick: K in {1, 8}, 2 rules, 40 steps, < 2 min on CPU
    python benchmarks/mf_experiment.py --full     # K in {1, 2, 4, 8}, every rule, 200 steps

Writes benchmarks/out/mf_experiment/mf_experiment.json and, when matplotlib is importable,
mf_experiment.png (loss curves, one panel per optimizer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as Fnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fusedmf import MFAdam, MFSGD, mf  # noqa: E402
from fusedmf.models.resnet import resnet  # noqa: E402

OPTIMIZERS = ("sgd", "nag", "adam")
RULES = ("const", "horizon", "ramp_horizon", "horizon_comp")
MF_REF = 0.9


def load_data(n: int, data_dir, seed: int):
    """(x, y): n CIFAR-10 training images from ``data_dir`` if its binary files are there, else
    synthetic ones of the same shape."""
    if data_dir:
        files = sorted(f for f in os.listdir(data_dir) if f.startswith("data_batch_") and f.endswith(".bin"))
        if files:
            raw = b"".join(open(os.path.join(data_dir, f), "rb").read() for f in files)
            rec = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, 3073)[:n]
            y = rec[:, 0].long()
            x = rec[:, 1:].float().reshape(-1, 3, 32, 32) / 255.0
            x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
            return x, y, f"cifar10:{data_dir}"
        print(f"no CIFAR-10 binary files in {data_dir}; using synthetic data", file=sys.stderr)
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = 0.5 * prototypes[y] + torch.randn(n, 3, 32, 32, generator=gen)
    return x, y, "synthetic"


def mf_rule(rule: str, k: int, global_batch: int, ramp_steps: int):
    target = mf.horizon(MF_REF, b=global_batch / k, b_ref=global_batch)
    if rule == "const":
        return mf.constant(MF_REF)
    if rule in ("horizon", "horizon_comp"):
        return target
    if rule == "ramp_horizon":
        return mf.ramp(MF_REF, target, ramp_steps)
    raise ValueError(rule)


def make_optimizer(name: str, params, schedule, rule: str, args):
    if name == "adam":
        return MFAdam(params, lr=args.adam_lr, betas=(MF_REF, 0.999), weight_decay=args.wd,
                      mf_schedule=schedule, backend=args.backend)
    comp = MF_REF if rule == "horizon_comp" else None
    return MFSGD(params, lr=args.sgd_lr, momentum=MF_REF, weight_decay=args.wd, nesterov=name == "nag",
                 mf_schedule=schedule, lr_compensation=comp, backend=args.backend)


def train(opt_name: str, rule: str, k: int, x, y, args) -> dict:
    b = args.batch // k
    torch.manual_seed(args.seed)  # the same initial weights for every run
    model = resnet(blocks=(1, 1, 1, 1), width=args.width, bottleneck=False, num_classes=10)
    model.train()
    schedule = mf_rule(rule, k, args.batch, args.ramp)
    opt = make_optimizer(opt_name, model.parameters(), schedule, rule, args)
    order = torch.Generator().manual_seed(args.seed + 1)
    losses, mfs, eff = [], [], []
    perm, pos = torch.randperm(len(x), generator=order), 0
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        if pos + args.batch > len(x):
            perm, pos = torch.randperm(len(x), generator=order), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for r in range(k):  # one simulated rank at a time: BN sees only this rank's b samples
            sl = idx[r * b:(r + 1) * b]
            loss = Fnn.cross_entropy(model(x[sl]), y[sl]) / k
            loss.backward()  # grads accumulate: the sum of loss_r / K is the allreduce average
            total += loss.item()
        opt.step()
        losses.append(total)
        mfs.append(schedule(step))
        if isinstance(opt, MFSGD):
            eff.append(opt.last_effective_lr[0])
        if not math.isfinite(total):
            break  # diverged: the curve ends here
    tail = losses[-min(10, len(losses)):]
    return dict(optimizer=opt_name, rule=rule, world_size=k, per_rank_batch=b, schedule=repr(schedule),
                mf_first=mfs[0], mf_last=mfs[-1], loss=losses, final_loss_mean10=sum(tail) / len(tail),
                effective_lr=eff or None, wall_s=time.perf_counter() - t0)


def plot(results, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    opts = sorted({r["optimizer"] for r in results}, key=OPTIMIZERS.index)
    fig, axes = plt.subplots(1, len(opts), figsize=(5 * len(opts), 4), squeeze=False)
    for ax, name in zip(axes[0], opts):
        for r in (r for r in results if r["optimizer"] == name):
            ax.plot(range(1, len(r["loss"]) + 1), r["loss"], label=f"K={r['world_size']} {r['rule']} (MF {r['mf_last']:.4g})")
        ax.set_title(f"{name}: train loss, global batch fixed, per-rank BN")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default: small sweep, < 2 min on CPU")
    mode.add_argument("--full", action="store_true", help="K in {1,2,4,8}, every rule, 200 steps")
    ap.add_argument("--world-sizes", type=int, nargs="+")
    ap.add_argument("--rules", nargs="+", choices=RULES)
    ap.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int, default=64, help="global batch B (fixed across K)")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--ramp", type=int, default=10, help="updates of the ramp_horizon MF ramp")
    ap.add_argument("--sgd-lr", type=float, default=0.02)
    ap.add_argument("--adam-lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="directory with CIFAR-10 binary files (data_batch_*.bin)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "mf_experiment"))
    args = ap.parse_args(argv)
    full = args.full
    args.world_sizes = args.world_sizes or ([1, 2, 4, 8] if full else [1, 8])
    args.rules = args.rules or (list(RULES) if full else ["const", "horizon"])
    args.steps = args.steps or (200 if full else 40)
    for k in args.world_sizes:
        if k < 1 or args.batch % k:
            ap.error(f"the global batch {args.batch} must split evenly over K={k} ranks")
    if args.threads:
        torch.set_num_threads(args.threads)

    x, y, source = load_data(args.samples, args.data, args.seed)
    results = []
    t0 = time.perf_counter()
    for name in args.optimizers:
        for rule in args.rules:
            if rule == "horizon_comp" and name == "adam":
                continue
            for k in args.world_sizes:
                r = train(name, rule, k, x, y, args)
                results.append(r)
                print(f"{name:5s} {rule:13s} K={k:<2d} b={r['per_rank_batch']:<4d} MF={r['mf_last']:.4f} "
                      f"loss {r['loss'][0]:.4f} -> {r['final_loss_mean10']:.4f} (mean of last 10)  "
                      f"{r['wall_s']:.1f}s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    record = dict(
        benchmark="mf_experiment",
        measured="training loss vs MF at fixed global batch B split over K simulated ranks with per-rank "
                 "batch-norm statistics (the only way K changes the averaged gradient)",
        data=source, command=" ".join([sys.executable] + sys.argv), config={k: v for k, v in vars(args).items()},
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=torch.get_num_threads()),
        total_wall_s=time.perf_counter() - t0, results=results,
    )
    json_path = os.path.join(args.out, "mf_experiment.json")
    with open(json_path, "w") as f:
        json.dump(record, f, indent=1)
    png = os.path.join(args.out, "mf_experiment.png")
    print(f"wrote {json_path}" + (f" and {png}" if plot(results, png) else " (no matplotlib: no PNG)"))
    return record


if __name__ == "__main__":
    main()
