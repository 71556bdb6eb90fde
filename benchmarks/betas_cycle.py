"""MFAdam against torch.optim.Adam when a scheduler cycles beta1 (OneCycleLR's cycle_momentum).

A scheduler that writes ``betas[0]`` every step makes beta1 a changing MF. torch.optim.Adam then
corrects the first moment's bias with ``1 - beta1_t ** t`` (the *current* beta1 raised to the step
count), MFAdam with ``1 - P_t``, P_t the product of the beta1 values actually used. The two agree
for a constant beta1 and differ while beta1 moves; this measures by how much:

1. the bias corrections themselves over the schedule: r_t = (1 - P_t) / (1 - beta1_t ** t), the
   ratio of torch's effective step to MFAdam's (an exact computation in float64, no training);
2. whole trajectories of a small MLP regression trained with each optimizer under the same
   OneCycleLR, next to a control run with ``cycle_momentum=False`` (the same code path, constant
   beta1: the differences there are rounding only).

    python benchmarks/betas_cycle.py --out benchmarks/results/betas-cycle
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import machine_info, write_json  # noqa: E402

from fusedmf.optim import MFAdam  # noqa: E402


def _schedule(opt, steps: int, cycle: bool):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.3,
                                               cycle_momentum=cycle, base_momentum=0.85, max_momentum=0.95)


def bias_corrections(steps: int) -> dict:
    """r_t along OneCycleLR's beta1 values (read from a scheduler driving a throwaway Adam)."""
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = _schedule(opt, steps, cycle=True)
    product, ratios, betas = 1.0, [], []
    for t in range(1, steps + 1):
        beta1 = float(opt.param_groups[0]["betas"][0])
        betas.append(beta1)
        product *= beta1
        ratios.append((1.0 - product) / (1.0 - beta1 ** t))
        opt.step()
        sched.step()
    worst = max(range(steps), key=lambda i: abs(ratios[i] - 1.0))
    late = [abs(r - 1.0) for r in ratios[steps // 10:]]
    return {"beta1_first": betas[0], "beta1_min": min(betas), "beta1_last": betas[-1],
            "max_abs_ratio_minus_1": abs(ratios[worst] - 1.0), "at_step": worst + 1,
            "ratio_at_steps_1_to_10": ratios[:10], "max_abs_ratio_minus_1_after_first_tenth": max(late)}


def trajectories(steps: int, cycle: bool, backend: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 32, generator=gen)
    y = torch.sin(x @ torch.randn(32, 1, generator=gen))

    def model():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

    runs = {}
    for name in ("torch", "fusedmf"):
        net = model()
        opt = (torch.optim.Adam(net.parameters(), lr=1e-3, foreach=False) if name == "torch"
               else MFAdam(net.parameters(), lr=1e-3, backend=backend))
        sched = _schedule(opt, steps, cycle)
        losses = []
        for t in range(steps):
            i = (t * 64) % 512
            loss = torch.nn.functional.mse_loss(net(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        with torch.no_grad():
            full = float(torch.nn.functional.mse_loss(net(x), y))
        runs[name] = (net, losses, full)
    (a, la, fa), (b, lb, fb) = runs["torch"], runs["fusedmf"]
    with torch.no_grad():
        rel = max(float((p - q).abs().max() / p.abs().max().clamp_min(1e-30))
                  for p, q in zip(a.parameters(), b.parameters()))
    return {"cycle_momentum": cycle, "final_loss_torch": fa, "final_loss_fusedmf": fb,
            "final_loss_rel_diff": abs(fa - fb) / fa, "max_param_rel_diff": rel,
            "max_step_loss_rel_diff": max(abs(p - q) / max(abs(p), 1e-30) for p, q in zip(la, lb))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--out", default="benchmarks/out/betas-cycle")
    args = ap.parse_args(argv)
    result = {"schema": 1, "bench": "betas_cycle", "machine": machine_info(torch.device("cpu")),
              "config": {"steps": args.steps, "backend": args.backend, "schedule": "OneCycleLR(max_lr=1e-3, "
                         "pct_start=0.3, base_momentum=0.85, max_momentum=0.95)"},
              "bias_correction": bias_corrections(args.steps),
              "trajectory_cycling": trajectories(args.steps, True, args.backend),
              "trajectory_control": trajectories(args.steps, False, args.backend),
              "backends_used": {args.backend: "MFAdam"}}
    path = write_json(result, args.out, "betas_cycle")
    bc, cyc, ctl = result["bias_correction"], result["trajectory_cycling"], result["trajectory_control"]
    print(f"bias correction ratio torch/MFAdam: max |r - 1| = {bc['max_abs_ratio_minus_1']:.3%} at step "
          f"{bc['at_step']}; after the first tenth of the run <= {bc['max_abs_ratio_minus_1_after_first_tenth']:.2e}")
    for label, r in (("cycling beta1", cyc), ("constant beta1 (control)", ctl)):
        print(f"{label:26s} final loss torch {r['final_loss_torch']:.6f} fusedmf {r['final_loss_fusedmf']:.6f} "
              f"(rel diff {r['final_loss_rel_diff']:.2e}); max param rel diff {r['max_param_rel_diff']:.2e}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
