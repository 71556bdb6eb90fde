"""MF experiment: training loss and error vs. momentum-like factor at a fixed global batch split over K ranks.

What is measured, plainly: in synchronous data parallelism the averaged gradient does not depend
on the number of ranks K at a fixed global batch B, *except through batch-norm statistics*, which
each rank computes on its own b = B / K samples (per-rank BN, not SyncBN). This script simulates K
ranks in one process: every step, each rank's micro-batch of b samples goes through the model
separately in train mode (so BN normalises with that rank's own batch statistics), the per-rank
losses / K are back-propagated into the same .grad (= the allreduce average), and the optimizer
takes one step. Nothing else differs between K values: same initial weights, same samples in the
same order, same global batch. It then sweeps the MF (momentum μ for SGD / NAG, β1 for Adam; Tang
et al., "Increasing Momentum-Like Factors", Tsinghua Sci. Technol. 2022) over fusedmf.mf rules:

- ``const``: μ = 0.9 whatever K (torch's default behaviour); ``--mf-values 0.95 0.99`` adds
  constant rules ``const0.95``, ``const0.99`` (the papers' "try a larger MF");
- ``horizon``: fusedmf's heuristic 1 − μ = 0.1 · (b / B) (0.975 at K = 4, 0.9875 at K = 8);
- ``ramp_horizon``: ramp from 0.9 to the horizon value over the first ``--ramp`` updates;
- ``horizon_comp`` (SGD / NAG only): the horizon MF with ``lr_compensation=0.9``, which keeps the
  effective LR η/(1 − μ) of the K = 1 run, so only the averaging horizon changes;
- ``noise`` (an EXPERIMENT, fusedmf's own): ``fusedmf.mf.noise_adaptive`` -- the MF rises as the
  per-rank batch b falls below the gradient noise scale B_simple, measured every step from the K
  simulated ranks' gradients (|G_b|² from each rank's own gradient, |G_B|² from their mean; the
  unfused path of fusedmf.noise, since there is no allreduce here). At K = 1 there is no second
  batch size, so it stays at 0.9.

Recorded per step: training loss and training error (both over the global batch, in train mode),
the MF, the effective LR (SGD / NAG), and the noise scale where measured (``--measure-noise`` for
every rule, always for ``noise``). At the end: accuracy on a held-out set in eval mode (the CIFAR-10
test batch when present, else held-out samples). BN running statistics are updated K times per
step here (once per simulated rank). Data: the CIFAR-10 binary files (``data_batch_*.bin``,
``test_batch.bin``) when ``--data DIR`` holds them, else synthetic CIFAR-shaped data (class
prototypes plus noise: learnable, so losses fall). Models: ``small`` (a BasicBlock ResNet, 1 block
per stage, width 8: for CPUs), ``resnet18``, ``resnet50`` (the torchvision layout, 10 classes).

    python benchmarks/mf_experiment.py            # --quick: K in {1, 8}, 3 rules, 40 steps, ~2 min on CPU
    python benchmarks/mf_experiment.py --full     # K in {1, 2, 4, 8}, every rule, 200 steps
    python benchmarks/mf_experiment.py --gpu-sweep --data ~/cifar-10-batches-bin   # ResNet-50 on a GPU

Writes OUT/mf_experiment.json and, when matplotlib is importable, OUT/mf_experiment.png (loss and
training-error curves, one column per optimizer).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import torch
import torch.nn.functional as Fnn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):  # run from a checkout: this checkout's fusedmf, and the harness beside us
    if path not in sys.path:
        sys.path.insert(0, path)

from fusedmf import MFAdam, MFSGD, mf  # noqa: E402
from harness import build_model, machine_info, progress, write_json  # noqa: E402
from fusedmf.data.cifar10 import CIFAR10FormatError, load_cifar10  # noqa: E402
from fusedmf.models.resnet import resnet  # noqa: E402
from fusedmf.noise import GradientNoiseScale  # noqa: E402

OPTIMIZERS = ("sgd", "nag", "adam")
RULES = ("const", "horizon", "ramp_horizon", "horizon_comp", "noise")
MODELS = ("small", "resnet18", "resnet50")
MF_REF = 0.9


def load_data(n: int, n_test: int, data_dir, seed: int):
    """(x, y, x_test, y_test, source): CIFAR-10 from ``data_dir`` if its binary files are there, else
    synthetic images of the same shape, normalised per channel with the training set's statistics."""
    if data_dir:
        try:
            x, y = load_cifar10(data_dir, train=True)
            try:
                xt, yt = load_cifar10(data_dir, train=False)
            except CIFAR10FormatError:                 # no test batch: hold out the end of the train set
                x, y, xt, yt = x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:]
            x, xt = x[:n].float() / 255.0, xt[:n_test].float() / 255.0
            y, yt = y[:n].long(), yt[:n_test].long()
            source = f"cifar10:{data_dir}"
        except CIFAR10FormatError as exc:
            print(f"{exc}; using synthetic data", file=sys.stderr)
            data_dir = None
    if not data_dir:
        gen = torch.Generator().manual_seed(seed)
        prototypes = torch.randn(10, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (n + n_test,), generator=gen)
        x = 0.5 * prototypes[y] + torch.randn(n + n_test, 3, 32, 32, generator=gen)
        x, y, xt, yt = x[:n], y[:n], x[n:], y[n:]
        source = "synthetic"
    mean, std = x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / std, y, (xt - mean) / std, yt, source


def mf_rule(rule: str, k: int, global_batch: int, ramp_steps: int, noise=None):
    target = mf.horizon(MF_REF, b=global_batch / k, b_ref=global_batch)
    if rule == "const":
        return mf.constant(MF_REF)
    if rule.startswith("const"):
        return mf.constant(float(rule[len("const"):]))
    if rule in ("horizon", "horizon_comp"):
        return target
    if rule == "ramp_horizon":
        return mf.ramp(MF_REF, target, ramp_steps)
    if rule == "noise":
        if noise is None:          # K = 1: one batch size, no noise-scale estimate
            return mf.constant(MF_REF)
        return mf.noise_adaptive(noise, mf_ref=MF_REF, min_samples=10, max_change=0.002)
    raise ValueError(rule)


def make_optimizer(name: str, params, schedule, rule: str, args):
    if name == "adam":
        return MFAdam(params, lr=args.adam_lr, betas=(MF_REF, 0.999), weight_decay=args.wd,
                      mf_schedule=schedule, backend=args.backend)
    comp = MF_REF if rule == "horizon_comp" else None
    return MFSGD(params, lr=args.sgd_lr, momentum=MF_REF, weight_decay=args.wd, nesterov=name == "nag",
                 mf_schedule=schedule, lr_compensation=comp, backend=args.backend)


class _RankNorms:
    """|G_b|² (mean over simulated ranks of each rank's own gradient) and |G_B|² (of their mean) for
    fusedmf.noise: rank r's gradient is K times what its backward added to .grad."""

    def __init__(self, params, k: int):
        self.params, self.k = [p for p in params if p.requires_grad], k
        self.local = 0.0

    def before(self):
        self.prev = [p.grad.detach().clone() if p.grad is not None else None for p in self.params]

    def after(self):
        total = 0.0
        for p, q in zip(self.params, self.prev):
            if p.grad is not None:
                d = p.grad.detach().double() - (q.double() if q is not None else 0.0)
                total += float(d.square().sum())
        self.local += total * self.k      # |g_r|² = K²·|delta|², averaged over the K ranks

    def finish(self, noise: GradientNoiseScale):
        glob = sum(float(p.grad.detach().double().square().sum()) for p in self.params if p.grad is not None)
        noise.update(self.local, glob, self.k)
        self.local = 0.0


def train(opt_name: str, rule: str, k: int, data, args, device) -> dict:
    x, y, xt, yt = data
    b = args.batch // k
    torch.manual_seed(args.seed)  # the same initial weights for every run
    model = build_model(args.model, 10, width=args.width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    measure = k > 1 and (rule == "noise" or args.measure_noise)
    noise = GradientNoiseScale(b, beta=args.noise_beta) if measure else None
    schedule = mf_rule(rule, k, args.batch, args.ramp, noise)
    opt = make_optimizer(opt_name, model.parameters(), schedule, rule, args)
    norms = _RankNorms(model.parameters(), k) if measure else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
    order = torch.Generator().manual_seed(args.seed + 1)
    losses, errors, mfs, eff, noise_scale = [], [], [], [], []
    perm, pos = torch.randperm(len(x), generator=order), 0
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        if pos + args.batch > len(x):
            perm, pos = torch.randperm(len(x), generator=order), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        opt.zero_grad(set_to_none=True)
        total, wrong = torch.zeros((), device=device), torch.zeros((), device=device)
        for r in range(k):  # one simulated rank at a time: BN sees only this rank's b samples
            sl = idx[r * b:(r + 1) * b]
            xs, ys = x[sl].to(device, non_blocking=True), y[sl].to(device, non_blocking=True)
            if device.type == "cuda":
                xs = xs.contiguous(memory_format=torch.channels_last)
            if norms is not None:
                norms.before()
            with amp:
                logits = model(xs)
                loss = Fnn.cross_entropy(logits.float(), ys) / k
            loss.backward()  # grads accumulate: the sum of loss_r / K is the allreduce average
            if norms is not None:
                norms.after()
            total += loss.detach()
            wrong += (logits.argmax(1) != ys).sum()
        if norms is not None:
            norms.finish(noise)
        opt.step()
        losses.append(float(total))
        errors.append(float(wrong) / args.batch)
        mfs.append(schedule(step))
        if isinstance(opt, MFSGD):
            eff.append(opt.last_effective_lr[0])
        if noise is not None:
            noise_scale.append(noise.value)
        if not math.isfinite(losses[-1]):
            break  # diverged: the curve ends here
    accuracy = evaluate(model, xt, yt, device, args) if math.isfinite(losses[-1]) else None
    tail = min(10, len(losses))
    return dict(optimizer=opt_name, rule=rule, world_size=k, per_rank_batch=b, schedule=repr(schedule),
                backends_used=dict(opt.backends_used),
                mf_first=mfs[0], mf_last=mfs[-1], mf=mfs, loss=losses, train_error=errors,
                final_loss_mean10=sum(losses[-tail:]) / tail, final_train_error_mean10=sum(errors[-tail:]) / tail,
                test_accuracy=accuracy, effective_lr=eff or None, noise_scale=noise_scale or None,
                wall_s=time.perf_counter() - t0)


@torch.no_grad()
def evaluate(model, xt, yt, device, args) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(xt), 256):
        xs = xt[i:i + 256].to(device)
        if device.type == "cuda":
            xs = xs.contiguous(memory_format=torch.channels_last)
        with (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()):
            correct += int((model(xs).argmax(1).cpu() == yt[i:i + 256]).sum())
    model.train()
    return correct / max(1, len(xt))


def plot(results, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    opts = sorted({r["optimizer"] for r in results}, key=OPTIMIZERS.index)
    fig, axes = plt.subplots(2, len(opts), figsize=(5 * len(opts), 7), squeeze=False)
    for col, name in enumerate(opts):
        for r in (r for r in results if r["optimizer"] == name):
            label = f"K={r['world_size']} {r['rule']} (MF {r['mf_last']:.4g})"
            steps = range(1, len(r["loss"]) + 1)
            axes[0][col].plot(steps, r["loss"], label=label)
            axes[1][col].plot(steps, r["train_error"], label=label)
        axes[0][col].set_title(f"{name} (measured): global batch fixed, per-rank BN")
        axes[0][col].set_ylabel("training loss")
        axes[1][col].set_ylabel("training error")
        axes[1][col].set_xlabel("step")
        axes[0][col].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default: small sweep, ~2 min on CPU")
    mode.add_argument("--full", action="store_true", help="K in {1,2,4,8}, every rule, 200 steps")
    mode.add_argument("--gpu-sweep", action="store_true",
                      help="ResNet-50, K in {1,2,4,8}, B=256, every rule + constant 0.95/0.99, 300 steps, bf16 (GPU)")
    ap.add_argument("--world-sizes", type=int, nargs="+")
    ap.add_argument("--rules", nargs="+", choices=RULES)
    ap.add_argument("--mf-values", type=float, nargs="*", default=None, help="extra constant-MF rules")
    ap.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    ap.add_argument("--model", choices=MODELS, default=None, help="default: small (resnet50 with --gpu-sweep)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int, default=None, help="global batch B (fixed across K; default 64)")
    ap.add_argument("--samples", type=int, default=None, help="training samples used (default 1024)")
    ap.add_argument("--test-samples", type=int, default=512)
    ap.add_argument("--width", type=int, default=8, help="base width of the small model")
    ap.add_argument("--ramp", type=int, default=10, help="updates of the ramp_horizon MF ramp")
    ap.add_argument("--sgd-lr", type=float, default=0.02)
    ap.add_argument("--adam-lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--measure-noise", action="store_true", help="record the noise scale for every rule (K > 1)")
    ap.add_argument("--noise-beta", type=float, default=0.9, help="EMA smoothing of the noise-scale estimate")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--amp", choices=("bf16", "none"), default=None, help="autocast (default: bf16 on cuda)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="directory with the CIFAR-10 binary files (data_batch_*.bin, test_batch.bin)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "mf_experiment"))
    args = ap.parse_args(argv)
    full, sweep = args.full, args.gpu_sweep
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    args.model = args.model or ("resnet50" if sweep else "small")
    args.world_sizes = args.world_sizes or ([1, 2, 4, 8] if full or sweep else [1, 8])
    args.rules = args.rules or (list(RULES) if full or sweep else ["const", "horizon", "noise"])
    if args.mf_values is None:
        args.mf_values = [0.95, 0.99] if sweep else []
    args.rules = list(args.rules) + [f"const{v:g}" for v in args.mf_values]
    args.steps = args.steps or (300 if sweep else 200 if full else 40)
    args.batch = args.batch or (256 if sweep else 64)
    args.samples = args.samples or (50000 if sweep else 1024)
    if sweep and args.sgd_lr == 0.02:
        args.sgd_lr = 0.1
    for k in args.world_sizes:
        if k < 1 or args.batch % k:
            ap.error(f"the global batch {args.batch} must split evenly over K={k} ranks")
    for v in args.mf_values:
        if not 0.0 <= v < 1.0:
            ap.error(f"--mf-values: every MF must be in [0, 1), got {v}")
    if args.threads:
        torch.set_num_threads(args.threads)

    x, y, xt, yt, source = load_data(args.samples, args.test_samples, args.data, args.seed)
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    results = []
    t0 = time.perf_counter()
    jobs = [(name, rule, k) for name in args.optimizers for rule in args.rules for k in args.world_sizes
            if not (rule == "horizon_comp" and name == "adam")]
    for name, rule, k in progress(jobs, total=len(jobs), desc="mf_experiment"):
        r = train(name, rule, k, (x, y, xt, yt), args, device)
        results.append(r)
        ns = r["noise_scale"][-1] if r["noise_scale"] else None
        print(f"{name:5s} {rule:13s} K={k:<2d} b={r['per_rank_batch']:<4d} MF={r['mf_last']:.4f} "
              f"loss {r['loss'][0]:.4f} -> {r['final_loss_mean10']:.4f}, train error "
              f"{r['final_train_error_mean10']:.3f} (mean of last 10), test acc "
              f"{'-' if r['test_accuracy'] is None else format(r['test_accuracy'], '.3f')}"
              f"{'' if ns is None else f', B_simple {ns:.3g}'}  {r['wall_s']:.1f}s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    record = {
        "schema": 1, "bench": "mf_experiment",
        "measured": "training loss and error vs MF at fixed global batch B split over K simulated ranks with "
                    "per-rank batch-norm statistics (the only way K changes the averaged gradient)",
        "data": source, "machine": machine_info(device),
        "config": {k: v for k, v in vars(args).items()},
        "backends_used": {f"{r['optimizer']}/{r['rule']}/K={r['world_size']}": r["backends_used"] for r in results},
        "total_wall_s": time.perf_counter() - t0, "results": results,
    }
    json_path = write_json(record, args.out, "mf_experiment", timestamp=False)
    png = os.path.join(args.out, "mf_experiment.png")
    print(f"wrote {json_path}" + (f" and {png}" if plot(results, png) else " (no matplotlib: no PNG)"))
    return record


if __name__ == "__main__":
    main()
