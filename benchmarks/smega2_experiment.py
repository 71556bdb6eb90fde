"""SMEGA2 experiment: asynchronous training with N simulated workers, SMEGA2 vs baselines vs synchronous SGD.

The question (Cohen, Hakimi, Schuster, ICPP 2022): how does momentum behave when every gradient is
stale by about N - 1 master steps, and what does SMEGA2's single momentum buffer with a look-ahead
estimate buy? Every run uses the same total number of gradients T (each one minibatch of B
samples, the same samples in the same order), the same initial weights and the same warm-up:

- ``smega2``, ``smega2_naive``: fusedmf.optim.SMEGA2 (estimate "advanced" / "naive") under
  fusedmf.asynchronous.Simulator: N worker copies, Gamma(100, B/100) finish times (the paper's
  model), one master step per gradient, the reporting worker's copy set to the estimate;
- ``asgd`` (plain SGD on stale gradients), ``asgd_m`` (with heavy-ball momentum), ``dana_zero``
  (per-worker momentum, look-ahead θ − ηγΣv_j): fusedmf.asynchronous's pure-PyTorch baselines under
  the same simulator and seed (so the same worker order);
- ``sync``: synchronous SGD with momentum (fusedmf.optim.MFSGD): N workers compute at the same
  weights, their gradients are averaged (per-worker batch norm), one step per N gradients, so T / N
  steps at global batch N·B with the linear-scaling rule lr N·η (Goyal et al. 2017);
- ``sgd_1`` (once, the staleness-free reference): momentum SGD, one worker, T steps at lr η.

Learning rate: linear warm-up over the first ``--warmup`` of the gradients, from η/N to η for the
asynchronous methods (as the reference code does) and from η to N·η for ``sync``, then constant
(``--gpu``: then ×0.1 at 50% and 75% of the run, the paper's 80/120-of-160-epochs schedule). Then
an MF sweep at fixed N (``--sweep-n``): the momentum γ of SMEGA2 and of ASGD with momentum over
``--gammas`` -- the MF question from the asynchronous side: the effective staleness grows with N,
and a larger MF stretches the horizon over which stale gradients are averaged.

Recorded per run: the minibatch loss and error at the weights each gradient was computed on
(windows of ``--log-every`` gradients; stale weights for the asynchronous methods), the master's
training loss and error on a fixed training subset (eval mode) at ~20 points, the final master's
training loss / error and held-out accuracy, the mean staleness, and the backends that ran.

    python benchmarks/smega2_experiment.py               # quick CPU default (a couple of minutes)
    python benchmarks/smega2_experiment.py --gpu --data ~/cifar-10-batches-bin   # ResNet-20, CIFAR-10

Writes OUT/smega2_experiment.json (provenance: git commit, command, machine, backends; every curve)
and OUT/smega2_experiment.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as Fnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import fusedmf  # noqa: E402
from fusedmf.asynchronous import DISTRIBUTIONS, ASGD, DANAZero, Simulator, WorkerTimes  # noqa: E402
from fusedmf.models import cifar_resnet  # noqa: E402
from fusedmf.optim import MFSGD, SMEGA2  # noqa: E402
from harness import machine_info, progress  # noqa: E402  (provenance: git commit, command, machine)
from mf_experiment import load_data  # noqa: E402  (CIFAR-10 files or learnable synthetic data, normalised)

METHODS = ("smega2", "smega2_naive", "asgd", "asgd_m", "dana_zero", "sync")
ASYNC = ("smega2", "smega2_naive", "asgd", "asgd_m", "dana_zero")
MODELS = ("mlp", "resnet8", "resnet20")

CPU_CAVEATS = (
    "CPU quick configuration: a 2-layer MLP on 8x8-average-pooled CIFAR-shaped data ({data}), {T} gradients "
    "per run, one seed. It CAN show the mechanics and the direction of the staleness effect at small scale: "
    "every method sees the same worker order, samples and initial weights, so the differences between methods "
    "and between N come from the update rules and the staleness (about N - 1 master steps per gradient) alone. "
    "It CANNOT show the paper's accuracy numbers or their ranking on ResNet-20/CIFAR-10 (no batch norm, no "
    "convolutions, runs far shorter than 160 epochs, no learning-rate decay, one seed, no error bars), nor "
    "any wall-clock speedup: asynchrony is simulated in one process, so 'time' here is the number of gradients.")
GPU_CAVEATS = (
    "GPU configuration: ResNet-20 on CIFAR-10 ({data}), {T} gradients per run ({epochs:.1f} epochs of the "
    "training set), one seed, simulated asynchrony (the number of gradients, not wall-clock time).")


# ------------------------------------------------------------------------------------------ model and data
def build_model(name: str, width: int) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 4 * 4, width), nn.ReLU(),
                             nn.Linear(width, 10))
    return cifar_resnet(int(name[len("resnet"):]), width=width)


class Batches:
    """Minibatch k of the run: the same samples for every method (a seeded stream of permutations)."""

    def __init__(self, x, y, batch: int, seed: int, device, augment: bool):
        self.x, self.y, self.batch, self.device, self.augment = x, y, batch, device, augment
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.seed = seed

    def reset(self):
        self.gen.manual_seed(self.seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next(self):
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = torch.randperm(len(self.x), generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        xs, ys = self.x[idx].to(self.device, non_blocking=True), self.y[idx].to(self.device, non_blocking=True)
        if self.augment:      # CIFAR augmentation: a random crop of the 4-pixel-padded batch, per-sample flips
            dx, dy = (int(v) for v in torch.randint(0, 9, (2,), generator=self.gen))
            xs = Fnn.pad(xs, (4, 4, 4, 4))[:, :, dy:dy + 32, dx:dx + 32]
            flip = (torch.rand(len(xs), generator=self.gen) < 0.5).to(self.device).view(-1, 1, 1, 1)
            xs = torch.where(flip, xs.flip(3), xs)
        return xs, ys


@torch.no_grad()
def evaluate(model, x, y, device, batch: int = 500):
    """(mean cross-entropy, error) of the model on (x, y) in eval mode."""
    model.eval()
    loss, wrong = 0.0, 0
    for i in range(0, len(x), batch):
        xs, ys = x[i:i + batch].to(device), y[i:i + batch].to(device)
        out = model(xs).float()
        loss += float(Fnn.cross_entropy(out, ys, reduction="sum"))
        wrong += int((out.argmax(1) != ys).sum())
    model.train()
    return loss / len(x), wrong / len(x)


# ------------------------------------------------------------------------------------------ one run
def make_master(method: str, params, n: int, gamma: float, args):
    if method in ("smega2", "smega2_naive"):
        return SMEGA2(params, lr=args.lr, momentum=gamma, weight_decay=args.wd, num_workers=n,
                      estimate="naive" if method == "smega2_naive" else "advanced", backend=args.backend)
    if method == "asgd":
        return ASGD(params, lr=args.lr, weight_decay=args.wd)
    if method == "asgd_m":
        return ASGD(params, lr=args.lr, momentum=gamma, weight_decay=args.wd)
    if method == "dana_zero":
        return DANAZero(params, lr=args.lr, momentum=gamma, weight_decay=args.wd, num_workers=n)
    raise ValueError(method)


def lr_at(k: int, method: str, n: int, args) -> float:
    """The learning rate for gradient k (0-based) of T: warm-up, then constant or the step decay."""
    t, warm = args.gradients, max(1, int(args.warmup * args.gradients))
    peak = args.lr * (n if method == "sync" else 1)
    start = args.lr if method == "sync" else args.lr / n
    lr = start + (peak - start) * min(1.0, (k + 1) / warm)
    if args.decay:
        lr *= 0.1 ** sum(k >= f * t for f in (0.5, 0.75))
    return lr


def run(method: str, n: int, gamma: float, data, args, device) -> dict:
    x, y, xt, yt = data
    torch.manual_seed(args.seed)                       # the same initial weights for every run
    model = build_model(args.model, args.width).to(device)
    model.train()
    batches = Batches(x, y, args.batch, args.seed + 1, device, args.augment)
    batches.reset()
    sub = slice(0, min(len(x), args.eval_samples))     # fixed training subset for the master's curve
    eval_at = sorted({int(round(i * args.gradients / args.eval_points)) for i in range(1, args.eval_points + 1)})
    curve_k, curve_loss, curve_err = [], [], []
    win_loss, win_err, mb_loss, mb_err, mb_k = [], [], [], [], []
    staleness, diverged = [], False
    t0 = time.perf_counter()

    def one_gradient(xs, ys, scale=1.0):
        out = model(xs)
        loss = Fnn.cross_entropy(out.float(), ys)
        (loss * scale).backward()
        return float(loss.detach()), float((out.detach().argmax(1) != ys).float().mean())

    def record(k_done, loss, err):
        nonlocal diverged
        win_loss.append(loss)
        win_err.append(err)
        if len(win_loss) == args.log_every:
            mb_k.append(k_done)
            mb_loss.append(sum(win_loss) / len(win_loss))
            mb_err.append(sum(win_err) / len(win_err))
            win_loss.clear()
            win_err.clear()
        if not math.isfinite(loss):
            diverged = True

    def maybe_eval(k_done):
        while eval_at and eval_at[0] <= k_done:
            eval_at.pop(0)
            lo, er = evaluate(model, x[sub], y[sub], device)
            curve_k.append(k_done)
            curve_loss.append(lo)
            curve_err.append(er)

    if method in ASYNC:
        opt = make_master(method, model.parameters(), n, gamma, args)
        times = WorkerTimes(n, mean=args.batch, shape=args.gamma_shape, distribution=args.distribution,
                            slow={0: args.slow} if args.slow else None, seed=args.seed)
        sim = Simulator(opt, times)
        for k in range(args.gradients):
            for g in opt.param_groups:
                g["lr"] = lr_at(k, method, n, args)
            xs, ys = batches.next()
            sim.begin()
            opt.zero_grad(set_to_none=True)
            loss, err = one_gradient(xs, ys)
            sim.finish()
            record(k + 1, loss, err)
            maybe_eval(k + 1)
            if diverged:
                break
        staleness = sim.staleness
    else:                                              # synchronous SGD (n workers) or sgd_1 (n = 1)
        opt = MFSGD(model.parameters(), lr=args.lr, momentum=gamma, weight_decay=args.wd, backend=args.backend)
        k = 0
        while k + n <= args.gradients and not diverged:
            for g in opt.param_groups:
                g["lr"] = lr_at(k + n - 1, method, n, args)
            opt.zero_grad(set_to_none=True)
            for _ in range(n):                         # one worker at a time: per-worker batch norm
                xs, ys = batches.next()
                loss, err = one_gradient(xs, ys, 1.0 / n)
                k += 1
                record(k, loss, err)
            opt.step()
            maybe_eval(k)
    final_loss = final_err = acc = None
    if not diverged:
        final_loss, final_err = evaluate(model, x[sub], y[sub], device)
        acc = 1.0 - evaluate(model, xt, yt, device)[1]
    return dict(method=method, workers=n, gamma=0.0 if method == "asgd" else gamma,   # plain ASGD: no momentum
                gradients=args.gradients, diverged=diverged,
                final_train_loss=final_loss, final_train_error=final_err, test_accuracy=acc,
                mean_staleness=(sum(staleness) / len(staleness)) if staleness else 0.0,
                master_steps=len(staleness) if method in ASYNC else args.gradients // n,
                curve=dict(gradients=curve_k, train_loss=curve_loss, train_error=curve_err),
                minibatch=dict(gradients=mb_k, loss=mb_loss, error=mb_err),
                backends_used=dict(getattr(opt, "backends_used", {}) or {"pure PyTorch": len(staleness) or 1}),
                wall_s=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ plot
COLORS = dict(smega2="C0", smega2_naive="C1", asgd="C2", asgd_m="C3", dana_zero="C4", sync="C5", sgd_1="k")


def plot(record: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    grid = [r for r in record["results"] if r["role"] == "grid"]
    ref = next((r for r in record["results"] if r["role"] == "reference"), None)
    sweep = [r for r in record["results"] if r["role"] in ("sweep", "grid") and r["workers"] == record["config"]["sweep_n"]
             and r["method"] in ("smega2", "asgd_m")]
    ns = sorted({r["workers"] for r in grid})
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    for m in METHODS:
        rs = sorted((r for r in grid if r["method"] == m), key=lambda r: r["workers"])
        if not rs:
            continue
        ok = [r for r in rs if not r["diverged"]]
        ax[0][0].plot([r["workers"] for r in ok], [r["final_train_loss"] for r in ok], "o-", color=COLORS[m], label=m)
        bad = [r for r in rs if r["diverged"]]
        if bad:
            ax[0][0].plot([r["workers"] for r in bad], [ax[0][0].get_ylim()[1] if ok else 1.0] * len(bad), "x",
                          color=COLORS[m], markersize=10)
        ax[0][1].plot([r["workers"] for r in rs], [100 * (r["test_accuracy"] or 0.0) for r in rs], "o-",
                      color=COLORS[m], label=m)
    if ref is not None and not ref["diverged"]:
        ax[0][0].axhline(ref["final_train_loss"], color="k", ls="--", label="sgd_1 (no staleness)")
        ax[0][1].axhline(100 * ref["test_accuracy"], color="k", ls="--", label="sgd_1 (no staleness)")
    for a, title, yl in ((ax[0][0], "final training loss of the master (x: diverged)", "training loss"),
                         (ax[0][1], "held-out accuracy of the master (diverged: 0)", "accuracy %")):
        a.set_xscale("log", base=2)
        a.set_xticks(ns)
        a.set_xticklabels([str(n) for n in ns])
        a.set_xlabel("simulated workers N")
        a.set_ylabel(yl)
        a.set_title(title)
        a.legend(fontsize=8)
    ax[0][0].set_yscale("log")
    nmax = max(ns)
    for r in [r for r in grid if r["workers"] == nmax] + ([ref] if ref else []):
        c = r["curve"]
        ax[1][0].plot(c["gradients"], c["train_loss"], color=COLORS["sgd_1" if r["role"] == "reference" else r["method"]],
                      ls="--" if r["role"] == "reference" else "-",
                      label=("sgd_1" if r["role"] == "reference" else r["method"]) + (" (diverged)" if r["diverged"] else ""))
    ax[1][0].set_yscale("log")
    ax[1][0].set_xlabel("gradients applied (all workers)")
    ax[1][0].set_ylabel("master training loss (eval mode, fixed subset)")
    ax[1][0].set_title(f"training curves at N = {nmax}")
    ax[1][0].legend(fontsize=8)
    for m in ("smega2", "asgd_m"):
        rs = sorted((r for r in sweep if r["method"] == m), key=lambda r: r["gamma"])
        ok = [r for r in rs if not r["diverged"]]
        ax[1][1].plot([r["gamma"] for r in ok], [r["final_train_loss"] for r in ok], "o-", color=COLORS[m], label=m)
        for r in rs:
            if r["diverged"]:
                ax[1][1].axvline(r["gamma"], color=COLORS[m], ls=":", alpha=0.6)
    ax[1][1].set_yscale("log")
    ax[1][1].set_xlabel("momentum γ (the MF)")
    ax[1][1].set_ylabel("final training loss")
    ax[1][1].set_title(f"MF sweep at N = {record['config']['sweep_n']} (dotted: diverged)")
    ax[1][1].legend(fontsize=8)
    cfg = record["config"]
    times = (f"Gamma({cfg['gamma_shape']:g}, B/{cfg['gamma_shape']:g})" if cfg["distribution"] == "gamma"
             else cfg["distribution"]) + (f", worker 0 {cfg['slow']:g}x slower" if cfg["slow"] else "")
    fig.suptitle(f"SMEGA2 vs baselines, {cfg['model']} on {record['data']}, {cfg['gradients']} gradients per run, "
                 f"{times} worker times (simulated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ main
def _backends_used(results) -> dict:
    """{run: backends_used} over the nested results (each run records its optimizer's backends_used)."""
    out, todo = {}, [("", results)]
    while todo:
        name, node = todo.pop()
        if isinstance(node, dict) and "backends_used" in node:
            out[name or "run"] = node["backends_used"]
        elif isinstance(node, dict):
            todo.extend((f"{name}/{k}" if name else str(k), v) for k, v in node.items())
        elif isinstance(node, list):
            todo.extend((f"{name}[{i}]", v) for i, v in enumerate(node))
    return out


def observations(results, sweep_n) -> list:
    """Plain-language lines computed from the results (nothing here is written before the run)."""
    lines = []
    ref = next((r for r in results if r["role"] == "reference"), None)
    for n in sorted({r["workers"] for r in results if r["role"] == "grid"}):
        rs = [r for r in results if r["role"] == "grid" and r["workers"] == n]
        ok = sorted((r for r in rs if not r["diverged"]), key=lambda r: r["final_train_loss"])
        bad = [r["method"] for r in rs if r["diverged"]]
        line = f"N={n}: by final training loss " + " < ".join(f"{r['method']} {r['final_train_loss']:.3g}" for r in ok)
        if bad:
            line += "; diverged: " + ", ".join(bad)
        lines.append(line)
    if ref is not None and not ref["diverged"]:
        lines.append(f"sgd_1 (one worker, no staleness): final training loss {ref['final_train_loss']:.3g}, "
                     f"held-out accuracy {100 * ref['test_accuracy']:.1f}%")
    for m in ("smega2", "asgd_m"):
        rs = sorted((r for r in results if r["method"] == m and r["workers"] == sweep_n and r["role"] in ("grid", "sweep")),
                    key=lambda r: r["gamma"])
        if rs:
            lines.append(f"MF sweep, {m} at N={sweep_n}: " + ", ".join(
                f"γ={r['gamma']:g}: " + ("diverged" if r["diverged"] else f"{r['final_train_loss']:.3g}") for r in rs))
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true",
                    help="ResNet-20 on CIFAR-10 (--data; synthetic when absent), B=128, lr 0.1, wd 1e-4, on CUDA")
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--sweep-n", type=int, default=8, help="N of the MF sweep")
    ap.add_argument("--gammas", type=float, nargs="*", default=[0.5, 0.8, 0.95, 0.99],
                    help="MF values of the sweep (besides --momentum, which the grid already ran)")
    ap.add_argument("--model", choices=MODELS)
    ap.add_argument("--width", type=int, help="hidden width (mlp) or base channels (resnets)")
    ap.add_argument("--gradients", type=int, help="total gradients per run (T)")
    ap.add_argument("--batch", type=int, help="B, per worker")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--wd", type=float)
    ap.add_argument("--warmup", type=float, help="fraction of the gradients in the LR warm-up")
    ap.add_argument("--gamma-shape", type=float, default=100.0, help="shape of the Gamma worker times (CV 1/sqrt)")
    ap.add_argument("--distribution", choices=DISTRIBUTIONS, default="gamma",
                    help="worker durations: the paper's gamma, or heavy-tailed lognormal (sigma 1) / pareto (alpha 1.5)")
    ap.add_argument("--slow", type=float, default=None, help="straggler: worker 0's durations times this factor")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--test-samples", type=int)
    ap.add_argument("--eval-samples", type=int, default=1024)
    ap.add_argument("--eval-points", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--data", help="directory of the CIFAR-10 binary files (synthetic data when absent)")
    ap.add_argument("--device")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "smega2_experiment"))
    args = ap.parse_args(argv)
    gpu = args.gpu
    device = torch.device(args.device or ("cuda" if gpu else "cpu"))
    if gpu and device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--gpu needs a CUDA device (or pass --device cpu to run its configuration here)")
    defaults = (dict(model="resnet20", width=16, gradients=40 * 390, batch=128, lr=0.1, wd=1e-4, warmup=5 / 40,
                     samples=50000, test_samples=10000) if gpu else
                dict(model="mlp", width=64, gradients=800, batch=32, lr=0.05, wd=1e-4, warmup=0.1,
                     samples=4096, test_samples=1024))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.augment = gpu and args.model.startswith("resnet")
    args.decay = gpu
    for n in args.workers + [args.sweep_n]:
        if n < 1:
            ap.error(f"worker counts must be >= 1, got {n}")
    for g in args.gammas + [args.momentum]:
        if not 0.0 <= g < 1.0:
            ap.error(f"momentum values must be in [0, 1), got {g}")
    # one thread by default on CPUs: the tiny model gains nothing from more, and on a shared machine
    # torch's spinning threads make each step 100x slower (measured: 75 ms vs 0.8 ms per MLP gradient)
    torch.set_num_threads(args.threads or (torch.get_num_threads() if device.type == "cuda" else 1))

    machine = machine_info(device)       # before the runs: the commit and tree state they ran with
    x, y, xt, yt, source = load_data(args.samples, args.test_samples, args.data, args.seed)
    data = (x, y, xt, yt)
    jobs = [("grid", m, n, args.momentum) for n in args.workers for m in args.methods]
    jobs.append(("reference", "sync", 1, args.momentum))
    sweep = [("sweep", m, args.sweep_n, g) for m in ("smega2", "asgd_m") for g in args.gammas
             if g != args.momentum and m in args.methods]
    jobs += sweep
    results = []
    t0 = time.perf_counter()
    for role, m, n, g in progress(jobs, total=len(jobs), desc="smega2_experiment"):
        r = run(m, n, g, data, args, device)
        r["role"] = role
        if role == "reference":
            r["method"] = "sgd_1"
        results.append(r)
        acc = "-" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.1f}%"
        loss = "diverged" if r["diverged"] else f"{r['final_train_loss']:.4f}"
        err = "-" if r["final_train_error"] is None else f"{r['final_train_error']:.3f}"
        print(f"{role:9s} {r['method']:12s} N={n:<3d} γ={r['gamma']:<5g} train loss {loss:>9s}  train error {err:>5s}  "
              f"held-out acc {acc:>6s}  staleness {r['mean_staleness']:5.2f}  ({r['wall_s']:.1f} s)", flush=True)
    caveats = (GPU_CAVEATS.format(data=source, T=args.gradients, epochs=args.gradients * args.batch / len(x))
               if gpu else CPU_CAVEATS.format(data=source, T=args.gradients))
    notes = observations(results, args.sweep_n)
    record = dict(
        benchmark="smega2_experiment",
        measured="final master training loss/error and held-out accuracy at the same total number of gradients, "
                 "N simulated asynchronous workers (Gamma finish times), SMEGA2 vs ASGD / ASGD-momentum / "
                 "DANA-Zero vs synchronous SGD; an MF sweep at fixed N",
        what_this_can_and_cannot_show=caveats, observations=notes,
        data=source, machine=machine, config=dict(vars(args)),
        backends={k: repr(v) for k, v in fusedmf.available_backends().items()},
        backends_used=_backends_used(results),   # what ran, per run (available backends: just above)
        total_wall_s=time.perf_counter() - t0, results=results,
    )
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "smega2_experiment.json")
    with open(json_path, "w") as f:
        json.dump(record, f, indent=1, default=str)
    png = os.path.join(args.out, "smega2_experiment.png")
    wrote_png = plot(record, png)
    print("\n".join(notes))
    print(caveats)
    print(f"wrote {json_path}" + (f" and {png}" if wrote_png else " (no matplotlib: no PNG)"))
    record["paths"] = dict(json=json_path, png=png if wrote_png else None)
    return record


if __name__ == "__main__":
    main()
