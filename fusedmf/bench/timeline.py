"""The gradient-ready timeline of one training step: what the scaling predictor consumes.

:func:`record_timeline` times one step of a model and optimizer (host clock on CPUs, CUDA events on
GPUs): forward, backward with the moment each parameter's gradient is accumulated (post-accumulate
grad hooks) and each DistributedOptimizer bucket becomes ready, and the optimizer. The result feeds
:func:`fusedmf.bench.predictor.predict`; benchmarks/throughput.py and benchmarks/scaling.py record it
on their ResNets.
"""

from __future__ import annotations

import time
from typing import List, Optional

import torch
import torch.nn as nn

from .predictor import Bucket, ParamGrad, Timeline


def record_timeline(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, *, warmup: int = 1,
                    phases: Optional[dict] = None, bucket_cap_mb: float = 25.0, process_group=None,
                    amp_dtype: Optional[torch.dtype] = None, loss_fn=None, label: str = "") -> dict:
    """Per-param gradient-ready times (hooks) + world-size-1 DistributedOptimizer buckets for one step
    of ``opt`` on ``model`` (batch ``x``, targets ``y``; ``warmup`` untimed steps first).

    ``phases``: medians measured elsewhere (``forward_median_s``, ``backward_median_s``,
    ``optimizer_median_s``) that replace the single recorded step's phases; the hooks' times are
    scaled onto that backward. ``process_group``: where a default process group is up (torchrun), a
    group of this rank alone (``dist.new_group([rank])``), so that the DistributedOptimizer has world
    size 1 and makes no collective. Returns ``{"timeline": Timeline.as_dict(), ...}`` (the input of
    :func:`fusedmf.bench.predictor.predict`)."""
    from ..comm import DistributedOptimizer

    device = x.device
    batch = x.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    dopt = DistributedOptimizer(opt, process_group=process_group, compression="fp16", bucket_cap_mb=bucket_cap_mb,
                                telemetry=True)
    amp = amp_dtype
    loss_fn = loss_fn or nn.CrossEntropyLoss()
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
        for it in range(warmup + 2):
            recording[0] = it == warmup + 1
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
        if device.type == "cuda":
            torch.cuda.synchronize(device)
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
                  source=(f"measured: {label or f'batch {batch} on {device}'}; phases = medians of the timed "
                          f"steps{'' if phases else ' (one step)'}; grad-ready times from post-accumulate-grad hooks "
                          f"of one step (scaled x{scale:.3f} onto the median backward); buckets from a world-size-1 "
                          f"DistributedOptimizer (fp16, cap {bucket_cap_mb} MB; ready after its first grad hook)"))
    dopt.remove_hooks()
    return {"timeline": tl.as_dict(), "distopt_telemetry": step_rec.as_dict(), "bucket_layout": dopt.bucket_layout(),
            "num_params": sum(p.numel() for p in params), "num_tensors": len(params),
            "optimizer_backends": dict(getattr(opt, "backends_used", {})), "distopt_backends": dopt.backends_used}
