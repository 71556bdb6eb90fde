#!/usr/bin/env python
"""One optimizer step over ResNet-50's parameter set: fusedmf's backends against torch.optim.

    python benchmarks/optim_step.py                      # CPU here, CUDA when a GPU is visible
    python benchmarks/optim_step.py --device cpu --quick # ~20 s smoke run (used by the tests)
    python benchmarks/optim_step.py --list               # case names, for --cases
    python benchmarks/optim_step.py --cases 'sgd/*fused*' 'sgd/fusedmf-*/fp32'

The parameter set is ResNet-50's (torchvision layout, 161 tensors, 25,557,032 params; built from
fusedmf.models, no torchvision), filled with random values and random gradients (never zeros).
Every case times steady-state steps (the first, buffer-initialising step is part of warm-up).

Bytes per parameter are the floors' counts of docs/performance.md: the bytes the update itself must
move, not what an implementation happens to move. So GB/s is "effective" bandwidth and every
implementation of one result is charged the same bytes (a torch path that casts grads to fp32
first moves more, and shows up slower, not as more GB/s):

    fp32 SGD momentum    read p, g, m; write p, m                          20 B
    mixed SGD            read g16, master, m; write master, m, p16          20 B
    fp32 Adam            read p, g, m, v; write p, m, v                     28 B
    mixed Adam           read g16, master, m, v; write master, m, v, p16    28 B

Each case's "speedup" is torch.optim's fused implementation of the same rule (fp32) divided by the
case, measured in the same run; the comparisons that docs/performance.md's targets name are printed
at the end and stored under "comparisons" in the JSON.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):  # run from a checkout: this checkout's fusedmf, and the harness beside us
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import fusedmf  # noqa: E402
from fusedmf.models import RESNET50_NUM_PARAMS, RESNET50_NUM_TENSORS, resnet50_param_shapes  # noqa: E402
from harness import Case, Unavailable, run, speedup  # noqa: E402

SGD_LR, SGD_MOMENTUM = 0.01, 0.9
ADAM_LR, ADAM_BETAS = 1e-3, (0.9, 0.999)
LOSS_SCALE = 1024.0  # a power of two: unscaling is exact, so the correctness check stays tight
BYTES_PER_PARAM = {("sgd", False): 20, ("sgd", True): 20, ("adam", False): 28, ("adam", True): 28}
BASELINE = {"sgd": "sgd/torch-fused/fp32", "adam": "adam/torch-fused/fp32"}


@dataclass(frozen=True)
class Precision:
    """How params, grads and the loss scale are set up for one case."""

    tag: str
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    master: bool = False
    scale: str = "none"  # "none" | "given": step(grad_scale=, found_inf=) | "gradscaler": torch.amp.GradScaler


FP32 = Precision("fp32", torch.float32, torch.float32)
FP32_GRADSCALER = Precision("fp32+gradscaler", torch.float32, torch.float32, scale="gradscaler")
BF16_MASTER = Precision("bf16+master", torch.bfloat16, torch.bfloat16, master=True)
FP16_MASTER_SCALE = Precision("fp16+master+scale", torch.float16, torch.float16, master=True, scale="given")
FP16_MASTER_GRADSCALER = Precision("fp16+master+gradscaler", torch.float16, torch.float16, master=True,
                                   scale="gradscaler")


# ---------------------------------------------------------------------------------------- inputs
@functools.lru_cache(maxsize=None)
def _shapes() -> tuple:
    return tuple(resnet50_param_shapes())


_POOL = 1 << 20  # random values per pool; tensors are filled by repeating a pool from an offset


def _random_list(shapes, dtype: torch.dtype, device: torch.device, seed: int, bound: float) -> list:
    """Separately allocated tensors (as a model's params are) with values uniform in [-bound, bound].

    A pool of 2^20 random values (its own seed per list) is repeated to fill them: generating 25M
    values costs ~0.3 s of CPU per list, repeating costs a copy, and a period of 4 MiB gives no
    cache anything to exploit in a 100 MB stream.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    total = sum(math.prod(s) for s in shapes)
    pool = torch.empty(min(total, _POOL), dtype=torch.float32, device=device).uniform_(-bound, bound, generator=gen)
    flat = pool.repeat(math.ceil(total / pool.numel()))[:total]
    out, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[offset:offset + n].view(shape).to(dtype, copy=True))
        offset += n
    return out


def model_tensors(shapes, prec: Precision, device: torch.device, seed: int = 0):
    """(params, grads) with the grads set on the params; grads carry the loss scale when prec has one."""
    scale = LOSS_SCALE if prec.scale != "none" else 1.0
    params = _random_list(shapes, prec.param_dtype, device, seed, 0.1)
    grads = _random_list(shapes, prec.grad_dtype, device, seed + 1, 1e-2 * scale)
    for p, g in zip(params, grads):
        p.grad = g
    return params, grads


def _require(backend: str) -> None:
    status = fusedmf.available_backends()[backend]
    if not status.available:
        raise Unavailable(f"backend {backend!r} unavailable: {status.detail}")


def _fusedmf_optimizer(rule: str, params, backend: str):
    if rule == "sgd":
        return fusedmf.MFSGD(params, lr=SGD_LR, momentum=SGD_MOMENTUM, backend=backend)
    return fusedmf.MFAdam(params, lr=ADAM_LR, betas=ADAM_BETAS, backend=backend)


def _torch_optimizer(rule: str, params, **impl):
    if rule == "sgd":
        return torch.optim.SGD(params, lr=SGD_LR, momentum=SGD_MOMENTUM, **impl)
    return torch.optim.Adam(params, lr=ADAM_LR, betas=ADAM_BETAS, **impl)


def _grad_scaler(device: torch.device, init_scale: float) -> torch.amp.GradScaler:
    """A GradScaler that never grows its scale, its lazy state created (scale() makes it)."""
    scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, growth_interval=2**30)
    scaler.scale(torch.ones((), device=device))
    return scaler


def _stepper(opt, prec: Precision, device: torch.device) -> Callable[[], None]:
    """The step as a training loop calls it under prec's loss-scaling protocol."""
    if prec.scale == "given":  # what fusedmf.comm / DynamicLossScaler hand over: device scalars
        grad_scale = torch.full((), LOSS_SCALE, dtype=torch.float32, device=device)
        found_inf = torch.zeros((), dtype=torch.float32, device=device)
        return lambda: opt.step(grad_scale=grad_scale, found_inf=found_inf)
    if prec.scale == "gradscaler":  # GradScaler's fused protocol: check, then step() unscales inside
        scaler = _grad_scaler(device, LOSS_SCALE)

        def step():
            scaler.step(opt)
            scaler.update()

        return step
    return opt.step


# ---------------------------------------------------------------------------------------- case factories
def fusedmf_case(rule: str, backend: str, prec: Precision, device: torch.device, shapes, *,
                 functional: bool = False, skip: Optional[str] = None) -> Case:
    impl = f"fusedmf-{backend}" + ("-functional" if functional else "")
    name = f"{rule}/{impl}/{prec.tag}"

    def setup():
        _require(backend)
        params, grads = model_tensors(shapes, prec, device)
        if not functional:
            opt = _fusedmf_optimizer(rule, params, backend)
            step = _stepper(opt, prec, device)

            def stepped():
                step()

            stepped.backends_used = lambda: {"update": dict(opt.backends_used)}  # what ran (harness records it)
            return stepped
        # fusedmf.functional directly, state built by hand: the class's per-step Python cost is the gap
        state = lambda seed, bound: _random_list(shapes, torch.float32, device, seed, bound)  # noqa: E731
        masters = [p.float() for p in params] if prec.master else []
        ran = {}
        if rule == "sgd":
            bufs = state(2, 1e-2)

            def call():
                ran[rule] = fusedmf.functional.mf_sgd(params, grads, bufs, master_params=masters, lr=SGD_LR,
                                                      momentum=SGD_MOMENTUM, backend=backend)
        else:
            m, v = state(2, 1e-2), [t.abs_() for t in state(3, 1e-4)]

            def call():
                ran[rule] = fusedmf.functional.mf_adam(params, grads, m, v, master_params=masters, lr=ADAM_LR,
                                                       beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], eps=1e-8, step=10,
                                                       beta1_product=ADAM_BETAS[0] ** 10, backend=backend)
        call.backends_used = lambda: {"functional": dict(ran)}
        return call

    return Case(name, setup, BYTES_PER_PARAM[(rule, prec.master)] * sum(math.prod(s) for s in shapes),
                info={"rule": rule, "impl": impl, "backend": backend, "precision": prec.tag},
                baseline=BASELINE[rule], check=None if functional else _check(rule, backend, prec, device),
                skip=skip)


def torch_case(rule: str, impl: str, device: torch.device, shapes) -> Case:
    """torch.optim on fp32 params: for-loop, foreach, fused, and (GPU) fused + GradScaler."""
    kwargs = {"forloop": dict(foreach=False), "foreach": dict(foreach=True)}.get(impl, dict(fused=True))
    # grads carry the loss scale only where the step divides by it (unscale_ uses a scale of 1.0)
    prec = FP32_GRADSCALER if impl == "fused+gradscaler-fused" else FP32

    def setup():
        params, grads = model_tensors(shapes, prec, device)
        opt = _torch_optimizer(rule, params, **kwargs)
        if impl == "fused+gradscaler-unscale":
            # The usual AMP loop: unscale_ (non-finite check + an in-place pass over the grads), then
            # step and update. unscale_ divides the grads in place, so a scale != 1 would shrink them
            # every repeat; with 1.0 the same memory traffic happens and the inputs stay put.
            scaler = _grad_scaler(device, 1.0)

            def step():
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()

            return step
        if impl == "fused+gradscaler-fused":
            # torch's own fused protocol: GradScaler checks the grads, the fused kernel unscales inside
            return _stepper(opt, prec, device)
        return opt.step

    bytes_ = BYTES_PER_PARAM[(rule, False)] * sum(math.prod(s) for s in shapes)
    return Case(f"{rule}/torch-{impl}/fp32", setup, bytes_,
                info={"rule": rule, "impl": f"torch-{impl}", "backend": "torch", "precision": "fp32"},
                baseline=None if impl == "fused" else BASELINE[rule])


def torch_master_case(rule: str, flat: bool, device: torch.device, shapes) -> Case:
    """The best torch way to bf16 params + fp32 masters: cast grads up, fused step on fp32 masters,
    copy the masters down into the bf16 params. ``flat``: the model's params and grads are views of
    one flat buffer each (apex style), so each cast is a single large copy_ and the fused step sees
    one tensor."""
    impl = "fused-flat+copy" if flat else "fused+copy"

    def setup():
        params16, grads16 = model_tensors(shapes, BF16_MASTER, device)
        if flat:
            p16 = torch.cat([p.reshape(-1) for p in params16])
            g16 = torch.cat([g.reshape(-1) for g in grads16])
            del params16, grads16
            master = p16.float()
            master.grad = torch.empty_like(master)
            opt = _torch_optimizer(rule, [master], fused=True)

            def step():
                master.grad.copy_(g16)
                opt.step()
                p16.copy_(master)

            return step
        masters = [p.float() for p in params16]
        master_grads = [torch.empty_like(m) for m in masters]
        for m, g in zip(masters, master_grads):
            m.grad = g
        opt = _torch_optimizer(rule, masters, fused=True)

        def step():
            torch._foreach_copy_(master_grads, grads16)
            opt.step()
            torch._foreach_copy_(params16, masters)

        return step

    return Case(f"{rule}/torch-{impl}/bf16+master", setup,
                BYTES_PER_PARAM[(rule, True)] * sum(math.prod(s) for s in shapes),
                info={"rule": rule, "impl": f"torch-{impl}", "backend": "torch", "precision": "bf16+master"},
                baseline=BASELINE[rule])


# ---------------------------------------------------------------------------------------- correctness
CHECK_STEPS = 3


def _check(rule: str, backend: str, prec: Precision, device: torch.device) -> Callable[[], dict]:
    """Three steps on a few of ResNet-50's tensors against torch.optim's for-loop in fp32 (float64
    would be tighter but is not what users compare against); masters and params both checked."""

    def check():
        _require(backend)
        shapes = _shapes()[:13] + _shapes()[-1:]
        params, grads = model_tensors(shapes, prec, device, seed=7)
        scale = LOSS_SCALE if prec.scale != "none" else 1.0
        ref = [p.detach().float().clone() for p in params]
        for r, g in zip(ref, grads):
            r.grad = g.float() / scale
        ref_opt = _torch_optimizer(rule, ref, foreach=False)
        opt = _fusedmf_optimizer(rule, params, backend)
        step = _stepper(opt, prec, device)
        for _ in range(CHECK_STEPS):
            step()
            ref_opt.step()
        weights = [opt.state[p]["master_param"] for p in params] if prec.master else params
        err = max(float((w.double() - r.double()).abs().max()) for w, r in zip(weights, ref))
        rel = max(float(((w.double() - r.double()).abs() / r.double().abs().clamp_min(1e-6)).max())
                  for w, r in zip(weights, ref))
        ok = all(torch.allclose(w.float(), r, rtol=1e-5, atol=1e-7) for w, r in zip(weights, ref))
        out = {"ok": ok, "vs": f"torch.optim {rule} foreach=False fp32, {CHECK_STEPS} steps on {len(shapes)} "
               "tensors", "max_abs_err": err, "max_rel_err": rel, "tol": "rtol 1e-5, atol 1e-7"}
        if prec.master:  # the low-precision params must be the masters' round-to-nearest copy
            copy_ok = all(torch.equal(p, w.to(p.dtype)) for p, w in zip(params, weights))
            out["model_copy_is_rounded_master"] = copy_ok
            out["ok"] = ok and copy_ok
        return out

    return check


# ---------------------------------------------------------------------------------------- the case list
def build_cases(device: torch.device, include_reference: bool, shapes) -> list:
    cuda = device.type == "cuda"
    backends = ("cuda", "triton") if cuda else ("cpu",)
    precisions = (FP32, BF16_MASTER) + ((FP16_MASTER_SCALE, FP16_MASTER_GRADSCALER) if cuda else ())
    ref_skip = None if include_reference else "the reference backend is slow; pass --include-reference"
    cases = []
    for rule in ("sgd", "adam"):
        rule_precisions = precisions if rule == "sgd" else (FP32, BF16_MASTER)
        for backend in backends:
            for prec in rule_precisions:
                cases.append(fusedmf_case(rule, backend, prec, device, shapes))
            cases.append(fusedmf_case(rule, backend, FP32, device, shapes, functional=True))
        for prec in (FP32, BF16_MASTER):
            cases.append(fusedmf_case(rule, "reference", prec, device, shapes, skip=ref_skip))
        for impl in ("forloop", "foreach", "fused"):
            cases.append(torch_case(rule, impl, device, shapes))
        if cuda and rule == "sgd":
            cases.append(torch_case(rule, "fused+gradscaler-unscale", device, shapes))
            cases.append(torch_case(rule, "fused+gradscaler-fused", device, shapes))
        for flat in (False, True):
            cases.append(torch_master_case(rule, flat, device, shapes))
    return cases


def select(cases: list, patterns) -> list:
    if not patterns:
        return cases
    return [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) or p in c.name for p in patterns)]


# ---------------------------------------------------------------------------------------- comparisons
def key_ratios(cuda: bool) -> list:
    """(label, case, vs, target speedup) for the ratios docs/performance.md's targets name; ``vs`` may be
    a tuple of ways to the same result, of which the fastest measured one counts."""
    out = []
    for rule, rule_name in (("sgd", "MF-SGD"), ("adam", "MF-Adam")):
        torch_name = "torch.optim.SGD" if rule == "sgd" else "torch.optim.Adam"
        best_master = (f"{rule}/torch-fused+copy/bf16+master", f"{rule}/torch-fused-flat+copy/bf16+master")
        if not cuda:
            out.append((f"cpu backend fp32 {rule_name} vs {torch_name}(fused=True), same run",
                        f"{rule}/fusedmf-cpu/fp32", BASELINE[rule], 1.0))
            out.append((f"cpu backend bf16+fp32-master {rule_name} vs the best torch way to the same result",
                        f"{rule}/fusedmf-cpu/bf16+master", best_master, 1.0))
        else:
            for backend in ("cuda", "triton"):
                out.append((f"{backend} backend bf16+fp32-master {rule_name} vs the best torch way to the same "
                            "result", f"{rule}/fusedmf-{backend}/bf16+master", best_master, 1.0))
    if cuda:
        for backend in ("cuda", "triton"):
            out.append((f"{backend} MF-SGD fp16+masters under GradScaler vs torch fused SGD + GradScaler "
                        "(unscale_+step)", f"sgd/fusedmf-{backend}/fp16+master+gradscaler",
                        "sgd/torch-fused+gradscaler-unscale/fp32", 1.3))
            out.append((f"{backend} MF-SGD fp16+masters, grad_scale/found_inf given, vs torch fused SGD + "
                        "GradScaler (unscale_+step)", f"sgd/fusedmf-{backend}/fp16+master+scale",
                        "sgd/torch-fused+gradscaler-unscale/fp32", 1.3))
    return out


def comparisons(result: dict) -> dict:
    """The ratios docs/performance.md's targets name, each from this run only. A speedup is the
    interleaved measurement (harness.run_pair) when there is one, else the ratio of the two cases'
    medians; both are recorded."""
    recs = {r["name"]: r for r in result["cases"]}
    pairs = {(p["a"], p["b"]): p for p in result.get("pairs", [])}
    cuda = result["config"]["device"].startswith("cuda")
    out = []

    def timed(name):
        r = recs.get(name)
        return r if r and r.get("median_s") is not None else None

    def why_missing(*names):  # short: the full reasons are in the case records
        reasons = []
        for n in names:
            r = recs.get(n)
            if r is None:
                reasons.append(f"{n} not selected")
            elif r.get("median_s") is None:
                reasons.append(f"{n} {r['status']}" + (f": {r['reason'][:80]}..." if r["status"] == "skipped" and
                                                       len(r["reason"] or "") > 80 else f": {r['reason']}"))
        return "; ".join(reasons)

    def add(label, case, vs, kind, value, target, **more):
        out.append({"label": label, "case": case, "vs": vs, "kind": kind, "value": value, "target": target,
                    "meets": None if value is None else value >= target,
                    "missing": None if value is not None else why_missing(case, vs), **more})

    for label, case, vs, target in key_ratios(cuda):
        if isinstance(vs, tuple):  # the fastest of several ways to the same result
            measured = [v for v in vs if timed(v)]
            vs = min(measured, key=lambda v: recs[v]["median_s"]) if measured else vs[0]
        separate = speedup(recs, case, vs)
        pair = pairs.get((case, vs))
        interleaved = pair["speedup"] if pair and pair.get("status") == "ok" else None
        add(label, case, vs, "speedup", interleaved if interleaved is not None else separate, target,
            interleaved=interleaved, separate=separate,
            interleaved_p20_p80=[pair["speedup_p20"], pair["speedup_p80"]] if interleaved is not None else None)
    if cuda:
        for backend in ("cuda", "triton"):
            for label, case, target in (("MF-SGD mixed step", f"sgd/fusedmf-{backend}/fp16+master+scale", 85.0),
                                        ("MF-Adam mixed step", f"adam/fusedmf-{backend}/bf16+master", 80.0)):
                r = timed(case)
                add(f"{backend} {label}, % of copy bandwidth", case, "copy bandwidth", "pct_copy_bw",
                    r.get("pct_copy_bw") if r else None, target)
        for pattern in ("sgd/{}/fp32", "sgd/{}/fp16+master+scale", "adam/{}/fp32", "adam/{}/bf16+master"):
            case, vs = pattern.format("fusedmf-triton"), pattern.format("fusedmf-cuda")
            a, b = timed(case), timed(vs)
            add(f"triton / cuda bandwidth, {pattern.format('*')}", case, vs, "bandwidth_ratio",
                a["gbps"] / b["gbps"] if a and b else None, 0.8)
    return {"comparisons": out}


def format_comparisons(comps: list) -> str:
    lines = ["key comparisons (same run):"]
    for c in comps:
        if c["value"] is None:
            lines.append(f"  {c['label']}: not measured ({c['missing']})")
            continue
        if c["kind"] == "pct_copy_bw":
            value, target = f"{c['value']:.1f}%", f">= {c['target']:.0f}%"
        else:
            value, target = f"{c['value']:.2f}x", f">= {c['target']:.2f}x"
            if c.get("interleaved") is not None:
                lo, hi = c["interleaved_p20_p80"]
                value += f" interleaved [p20 {lo:.2f}, p80 {hi:.2f}]"
                if c.get("separate") is not None:
                    value += f"; {c['separate']:.2f}x from the separate medians"
        verdict = "meets" if c["meets"] else "MISSES"
        lines.append(f"  {c['label']}: {value} (target {target}: {verdict})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main
def _ext_info(ext) -> dict:
    """What the compiled extension says about itself (build flags, CPU loop variant), if anything."""
    if ext is None:
        return {}
    info = {}
    for key, attr in (("build_info", "build_info"), ("cpu_capability", "_cpu_capability"), ("has_cuda", "has_cuda")):
        fn = getattr(ext, attr, None)
        if callable(fn):
            try:
                info[key] = fn()
            except Exception as exc:  # informational only
                info[key] = f"unavailable: {exc}"
    return info


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default: CPU 10, GPU 100)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls per case (default: CPU 2, GPU 10)")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "optim_step"), help="output directory")
    ap.add_argument("--cases", nargs="*", default=None, help="glob patterns or substrings of case names")
    ap.add_argument("--quick", action="store_true", help="a short smoke run: few repeats")
    ap.add_argument("--include-reference", action="store_true", help="also time the (slow) reference backend")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's choice); on a shared CPU machine whose cores "
                         "are busy, 1 thread gives steadier numbers")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    shapes = _shapes()
    n_params = sum(math.prod(s) for s in shapes)
    assert (len(shapes), n_params) == (RESNET50_NUM_TENSORS, RESNET50_NUM_PARAMS), (len(shapes), n_params)
    cases = select(build_cases(device, args.include_reference, shapes), args.cases)
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    if not cases:
        print(f"no case matches {args.cases}; --list shows the names", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    repeats = args.repeats or ((20 if gpu else 3) if args.quick else (100 if gpu else 10))
    warmup = args.warmup if args.warmup is not None else ((3 if gpu else 1) if args.quick else (10 if gpu else 2))
    status = fusedmf.available_backends()
    ext, _ = fusedmf._backends.compiled_extension()
    extra = {
        "workload": {"model": "resnet50 (torchvision layout)", "tensors": len(shapes), "params": n_params,
                     "sgd": {"lr": SGD_LR, "momentum": SGD_MOMENTUM}, "adam": {"lr": ADAM_LR, "betas": ADAM_BETAS},
                     "loss_scale": LOSS_SCALE, "bytes_per_param": {f"{r}/{'mixed' if m else 'fp32'}": b
                                                                   for (r, m), b in BYTES_PER_PARAM.items()}},
        "backends": {name: {"available": s.available, "detail": s.detail} for name, s in status.items()},
        "fusedmf_path": os.path.dirname(fusedmf.__file__),
        "fusedmf_ext": getattr(ext, "__file__", None),
        "fusedmf_ext_info": _ext_info(ext),
    }
    result = run("optim_step", cases, device=device, repeats=repeats, warmup=warmup, out_dir=args.out,
                 config={"quick": args.quick, "cases": args.cases, "include_reference": args.include_reference,
                         "threads": torch.get_num_threads()},
                 extra=extra, pairs=[(case, vs) for _, case, vs, _ in key_ratios(gpu)],
                 pair_rounds=3 if args.quick else max(repeats, 10), analyze=comparisons)
    print(format_comparisons(result["comparisons"]))
    if result.get("contended"):
        print("  WARNING: measured on a busy machine (see the warning above): do not quote these ratios")
    failed = [r["name"] for r in result["cases"] if r["status"] in ("error", "incorrect")]
    if failed:
        print(f"FAILED cases: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
