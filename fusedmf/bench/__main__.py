"""``python -m fusedmf.bench {throughput,scaling,predict}``: small defaults, results under benchmarks/out/.

``predict`` is part of the package; ``throughput`` and ``scaling`` run the drivers of the source
checkout (benchmarks/throughput.py, benchmarks/scaling.py, with the same arguments): the benchmarks
and their harness live in benchmarks/, which fusedmf never imports.

    python -m fusedmf.bench throughput --quick            # single-process training throughput + timeline
    python -m fusedmf.bench scaling --quick               # 2 gloo ranks vs 1, predictor error, curves
    python -m fusedmf.bench scaling --quick --world-sizes 2 4
    python -m fusedmf.bench scaling --netns --bandwidths 0.1 0.3 1 3 10   # root: ranks in rate-limited netns
    torchrun --nproc-per-node 8 -m fusedmf.bench scaling  # NCCL (gloo on CPUs): rank 0 measures N=1, all N=8
    torchrun --nproc-per-node 8 -m fusedmf.bench throughput  # + DDP / DistributedOptimizer across the ranks
    python -m fusedmf.bench predict --timeline-json benchmarks/out/throughput/throughput_cuda_*.json \
        --network nvlink-ib400 --n 8 64                   # predictions from a recorded timeline
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from . import predictor


def _predict(argv):
    ap = argparse.ArgumentParser(prog="python -m fusedmf.bench predict",
                                 description="Predicted step time / efficiency from a timeline and a network model")
    ap.add_argument("--timeline-json", default=None,
                    help="throughput JSON (its timeline) or a bare Timeline JSON; default: illustrative ResNet-50")
    ap.add_argument("--step-ms", type=float, default=10.0, help="illustrative timeline's single-GPU step (no JSON)")
    ap.add_argument("--network", default="nvlink-ib400", choices=sorted(predictor.NETWORKS))
    ap.add_argument("--n", type=int, nargs="*", default=list(predictor.DEFAULT_NS))
    ap.add_argument("--cap-mb", type=float, default=25.0)
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    args = ap.parse_args(argv)
    if args.timeline_json:
        with open(args.timeline_json) as f:
            d = json.load(f)
        tl = predictor.Timeline.from_dict(d["timeline"]["timeline"] if "timeline" in d else d)
    else:
        tl = predictor.resnet50_like_timeline(args.step_ms * 1e-3)
    net = predictor.NETWORKS[args.network]
    out = {"timeline_source": tl.source, "network": net.as_dict(), "series": {}}
    for scheme in ("fusedmf-fp16", "ddp-fp32", "ddp-fp16"):
        out["series"][scheme] = predictor.efficiency_curve(tl, net, ns=args.n, scheme=scheme, cap_mb=args.cap_mb)
    out["recommended"] = {n: predictor.recommend_bucket_cap(tl, net, n)["best"] for n in args.n if n > 1}
    if args.json:
        print(json.dumps(out, indent=1))
        return out
    print(f"predict: {net.name} ({net.note}); timeline: {tl.source}; T(1) {tl.single_gpu_s * 1e3:.2f} ms; cap {args.cap_mb} MB")
    print(f"{'N':>5} " + " ".join(f"{s:>14}" for s in out["series"]) + f" {'best cap MB':>12} {'E at best':>10}")
    for i, n in enumerate(args.n):
        rec = out["recommended"].get(n)
        print(f"{n:>5} " + " ".join(f"{out['series'][s][i]['efficiency']:>14.4f}" for s in out["series"])
              + (f" {rec['cap_mb']:>12} {rec['efficiency']:>10.4f}" if rec else f" {'-':>12} {'-':>10}"))
    return out


def _driver(name: str, rest: list) -> int:
    """Hand over to benchmarks/<name>.py of the checkout this package was installed from (editable)."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "benchmarks", f"{name}.py")
    if not os.path.exists(script):
        print(f"python -m fusedmf.bench {name}: the benchmark drivers live in the source checkout's benchmarks/ "
              f"folder ({script} does not exist); install fusedmf from a clone with `pip install -e .`",
              file=sys.stderr)
        return 2
    argv = [sys.executable, script] + list(rest)
    if os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, argv)  # same process (and torchrun environment), the driver's own __main__
    return subprocess.call(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = ("throughput", "scaling", "predict")
    if not argv or argv[0] not in cmds:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "scaling" and "--netns" in rest:         # ranks in the network lab (scaling_netns.py)
        return _driver("scaling_netns", [a for a in rest if a != "--netns"])
    if cmd in ("throughput", "scaling"):
        return _driver(cmd, rest)
    _predict(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
