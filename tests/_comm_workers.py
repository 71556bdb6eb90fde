"""Multi-process helpers for tests/test_comm.py: a launcher for gloo ranks on 127.0.0.1 and the
functions each rank runs. Kept out of the test module so that child processes import only this."""

from __future__ import annotations

import datetime
import hashlib
import importlib
import io
import os
import socket
import time
import traceback
import warnings
from typing import Callable, Dict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from fusedmf._ranks import free_port, process_group
from fusedmf.comm import DistributedOptimizer, ddp_comm_hook
from fusedmf.optim import MFAdam, MFSGD

IMAGE = (2, 6, 6)
OUT = 3
GLOBAL_BATCH = 16
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)
ADAM_KW = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-4)
# small caps so that the ~2.5k-parameter model spreads over several buckets
BUCKETS = dict(bucket_cap_mb=4e-3, first_bucket_cap_mb=5e-4)


# ------------------------------------------------------------------------------------------ launcher
def fallback_warnings_are_errors() -> None:
    """A run of the reference backend in place of a compiled one raises (NOTE [compiled backends ran])."""
    warnings.filterwarnings("error", message="fusedmf: running the slow reference backend", category=RuntimeWarning)
    warnings.filterwarnings("error", message="fusedmf.pack: backend .* the reference pack runs", category=RuntimeWarning)
    warnings.filterwarnings("error", message=".*are not dense; the reference backend", category=RuntimeWarning)



def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _child(fn_name, rank, world_size, port, pg_timeout, kwargs, queue):
    """One rank: run ``fn``, leave the group (fusedmf._ranks: no gloo thread left behind), then report
    once. A teardown that leaves gloo's threads running turns the rank's result into an error."""
    torch.set_num_threads(1)
    fallback_warnings_are_errors()          # NOTE [compiled backends ran] in tests/test_comm.py
    report = None
    try:
        with process_group("gloo", rank=rank, world_size=world_size, port=port, timeout_s=pg_timeout, barrier=False):
            try:
                module, _, name = fn_name.rpartition(":")   # workers of other files: "module:function"
                fn = getattr(importlib.import_module(module), name) if module else globals()[name]
                report = (rank, "ok", _dumps(fn(rank, world_size, **kwargs)))
            except BaseException:
                report = (rank, "error", traceback.format_exc())
            try:
                dist.barrier()  # every rank is past its last collective before any tears down
            except Exception:
                pass  # a peer that died (on purpose or not) reports itself; the thread check below still runs
    except BaseException:
        failure = traceback.format_exc()
        if report is not None and report[1] == "error":
            failure = f"{report[2]}\n--- and then, leaving the process group:\n{failure}"
        report = (rank, "error", failure)
    queue.put(report)


_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context(os.environ.get("COMM_TEST_START", "forkserver"))
        if _CTX.get_start_method() == "forkserver":
            _CTX.set_forkserver_preload(["torch", "fusedmf", "_comm_workers"])
    return _CTX


def launch(fn: Callable, world_size: int, *, timeout: float = 150.0, pg_timeout: float = 10.0, **kwargs) -> Dict:
    """Run ``fn(rank, world_size, **kwargs)`` on ``world_size`` gloo ranks; return
    ``{rank: ("ok", result) | ("error", traceback) | ("exit", exitcode)}`` for every rank."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    fn_name = fn.__name__ if fn.__module__ == __name__ else f"{fn.__module__}:{fn.__name__}"
    procs = [ctx.Process(target=_child, args=(fn_name, r, world_size, port, pg_timeout, kwargs, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: Dict = {}
    deadline = time.monotonic() + timeout
    while len(results) < world_size and time.monotonic() < deadline:
        try:
            rank, status, payload = queue.get(timeout=0.2)
            results[rank] = (status, _loads(payload) if status == "ok" else payload)
        except Exception:
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
    for r, p in enumerate(procs):
        p.join(timeout=max(0.0, deadline - time.monotonic()) if r not in results else 10.0)
        if p.is_alive():
            p.kill()  # this launcher's own child, by its handle
            p.join()
            results.setdefault(r, ("error", f"rank {r} did not finish within {timeout} s (killed)"))
        results.setdefault(r, ("exit", p.exitcode))
    return results


def ok_results(results: Dict) -> list:
    """The per-rank results, or an AssertionError carrying every failing rank's traceback."""
    bad = {r: v for r, v in results.items() if v[0] != "ok"}
    if bad:
        raise AssertionError("ranks failed:\n" + "\n".join(f"--- rank {r}: {v[0]}\n{v[1]}" for r, v in sorted(bad.items())))
    return [results[r][1] for r in sorted(results)]


# ------------------------------------------------------------------------------------------ model and data
class Net(nn.Module):
    """Batch-norm free: conv -> tanh -> linear -> tanh -> linear. ``branch`` adds a head used only
    where the caller says (for unused-parameter tests); ``spare`` is never used."""

    def __init__(self, seed: int = 0, hidden: int = 16, extra: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(IMAGE[0], 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * IMAGE[1] * IMAGE[2], hidden)
        self.fc2 = nn.Linear(hidden, OUT)
        if extra:
            self.branch = nn.Linear(hidden, OUT)
            self.spare = nn.Linear(5, 7)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p.shape[-1]) ** 0.5))

    def forward(self, x, use_branch: bool = False):
        h = torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1)))
        out = self.fc2(h)
        if use_branch:
            out = out + self.branch(h)
        return out


def batch(step: int, size: int = GLOBAL_BATCH):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn((size,) + IMAGE, generator=g)
    y = torch.randn(size, OUT, generator=g)
    return x, y


def shard(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    n = t.shape[0] // world_size
    return t[rank * n:(rank + 1) * n]


def make_optimizer(name: str, params, backend: str = "auto"):
    if name == "sgd":
        return MFSGD(params, **SGD_KW, mf_schedule=lambda t: min(0.95, 0.8 + 0.01 * t), backend=backend)
    if name == "adam":
        return MFAdam(params, **ADAM_KW, backend=backend)
    raise ValueError(name)


def loss_fn(model, x, y, use_branch=False):
    return (model(x, use_branch) - y).pow(2).mean()


def params_of(model) -> list:
    return [p.detach().clone() for p in model.parameters()]


def state_digest(state_dict: dict) -> str:
    """A hash of a state dict's contents (tensors by bytes, everything else by repr), order-independent of ids."""
    h = hashlib.sha256()

    def feed(obj):
        if isinstance(obj, torch.Tensor):
            h.update(str((obj.dtype, tuple(obj.shape))).encode())
            h.update(obj.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=repr):
                h.update(repr(k).encode())
                feed(obj[k])
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                feed(v)
        else:
            h.update(repr(obj).encode())

    feed(state_dict)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ scenarios
def train_distributed(rank, world_size, *, opt_name, compression, steps, micro=1, accumulate=None,
                      telemetry=False, seed=0, first_step=0):
    """``steps`` steps; each rank's shard of each (global) batch, split into ``micro`` micro-batches
    accumulated with ``accumulate`` = "passes" (backward_passes_per_step) or "no_sync"."""
    model = Net(seed)
    dopt = DistributedOptimizer(make_optimizer(opt_name, model.parameters()), compression=compression,
                                backward_passes_per_step=micro if accumulate == "passes" else 1,
                                telemetry=telemetry, **BUCKETS)
    for t in range(first_step, first_step + steps):
        x, y = batch(t, GLOBAL_BATCH)
        xs, ys = shard(x, rank, world_size), shard(y, rank, world_size)
        for m in range(micro):
            xm, ym = shard(xs, m, micro), shard(ys, m, micro)
            if accumulate == "no_sync" and m < micro - 1:
                with dopt.no_sync():
                    loss_fn(model, xm, ym).backward()
            else:
                loss_fn(model, xm, ym).backward()
        dopt.step()
        dopt.zero_grad()
    sd = dopt.state_dict()
    return {"params": params_of(model), "state": state_digest(sd), "state_only": state_digest(sd["state"]),
            "layout": dopt.bucket_layout(), "backends": dict(dopt.backends_used)}


def suite_two_ranks(rank, world_size):
    """Everything the 2-rank tests check, in one process group (one launch)."""
    out = {}
    for opt_name in ("sgd", "adam"):
        for comp in ("none", "fp16", "bf16"):
            out[f"train/{opt_name}/{comp}"] = train_distributed(rank, world_size, opt_name=opt_name,
                                                               compression=comp, steps=20)
    for mode in ("passes", "no_sync"):
        out[f"accum/{mode}"] = train_distributed(rank, world_size, opt_name="sgd", compression="none",
                                                 steps=10, micro=2, accumulate=mode)
    out["skip"] = skip_scenario(rank, world_size)
    out["unused"] = unused_scenario(rank, world_size)
    out["roundtrip"] = roundtrip_scenario(rank, world_size)
    out["telemetry"] = telemetry_scenario(rank, world_size)
    out["ddp"] = ddp_scenario(rank, world_size)
    out["no_grad_twice"] = backward_twice_scenario(rank, world_size)
    out["scaler"] = loss_scaler_scenario(rank, world_size)
    return out


def loss_scaler_scenario(rank, world_size):
    """DynamicLossScaler.step(dopt) with an overflow on rank 1 only: both ranks skip, and both scalers
    back off (the scaler's found_inf is updated in place with the reduced-buffer check)."""
    from fusedmf import DynamicLossScaler

    model = Net(0)
    dopt = DistributedOptimizer(make_optimizer("sgd", model.parameters()), compression="fp16", **BUCKETS)
    scaler = DynamicLossScaler(init_scale=2.0 ** 8)
    skipped, scales = [], []
    for t in range(3):
        x, y = batch(t)
        x, y = shard(x, rank, world_size), shard(y, rank, world_size)
        if t == 1 and rank == 1:
            x = x.clone()
            x[0, 0, 0, 0] = float("inf")
        scaler.scale(loss_fn(model, x, y)).backward()
        scaler.step(dopt)
        scaler.update()
        dopt.zero_grad()
        skipped.append(dopt.last_step_skipped)
        scales.append(scaler.get_scale())
    return {"skipped": skipped, "scales": scales, "params": params_of(model)}


def skip_scenario(rank, world_size):
    """An inf/NaN gradient on rank 1 only, on the first step and on a later step."""
    res = {}
    for opt_name in ("sgd", "adam"):
        for when in (0, 3):
            model = Net(1)
            dopt = DistributedOptimizer(make_optimizer(opt_name, model.parameters()), compression="fp16", **BUCKETS)
            for t in range(when + 2):
                x, y = batch(t)
                x, y = shard(x, rank, world_size), shard(y, rank, world_size)
                if t == when:
                    before_params = params_of(model)
                    before_state = state_digest(dopt.optimizer.state_dict())
                    if rank == 1:
                        x = x.clone()
                        x[0, 0, 0, 0] = float("inf") if opt_name == "sgd" else float("nan")
                loss_fn(model, x, y).backward()
                dopt.step()
                dopt.zero_grad()
                if t == when:
                    res[f"{opt_name}/{when}"] = {
                        "skipped": dopt.last_step_skipped,
                        "params_unchanged": all(torch.equal(a, b) for a, b in zip(before_params, params_of(model))),
                        "state_unchanged": state_digest(dopt.optimizer.state_dict()) == before_state,
                        "state_zero": all(not torch.is_tensor(v) or not v.any()
                                          for st in dopt.state_dict()["state"].values() for v in st.values()),
                        "steps": sorted({s.get("step") for s in dopt.state_dict()["state"].values()}),
                    }
            res[f"{opt_name}/{when}/after"] = {"skipped": dopt.last_step_skipped, "params": params_of(model),
                                               "steps": sorted({s.get("step") for s in dopt.state_dict()["state"].values()})}
    return res


def unused_scenario(rank, world_size):
    """``spare`` never gets a gradient; ``branch`` only on rank 0."""
    model = Net(2, extra=True)
    before = params_of(model)
    dopt = DistributedOptimizer(make_optimizer("sgd", model.parameters()), compression="none", **BUCKETS)
    for t in range(4):
        x, y = batch(t)
        loss_fn(model, shard(x, rank, world_size), shard(y, rank, world_size), use_branch=rank == 0).backward()
        dopt.step()
        dopt.zero_grad()
    state = dopt.state_dict()["state"]
    names = [n for n, _ in model.named_parameters()]
    return {"params": params_of(model), "before": before, "names": names,
            "steps": {names[i]: state.get(i, {}).get("step") for i in range(len(names))}}


def roundtrip_scenario(rank, world_size):
    """state_dict identical on every rank; save at step 6, reload into fresh objects, continue: the
    same as uninterrupted training."""
    full = train_distributed(rank, world_size, opt_name="adam", compression="fp16", steps=12)
    model = Net(0)
    dopt = DistributedOptimizer(make_optimizer("adam", model.parameters()), compression="fp16", **BUCKETS)
    for t in range(6):
        x, y = batch(t)
        loss_fn(model, shard(x, rank, world_size), shard(y, rank, world_size)).backward()
        dopt.step()
        dopt.zero_grad()
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": dopt.state_dict()}, saved)
    digest = state_digest(dopt.state_dict())
    saved.seek(0)
    ckpt = torch.load(saved, weights_only=False)
    model2 = Net(5)                                       # different init: everything comes from the checkpoint
    model2.load_state_dict(ckpt["model"])
    dopt2 = DistributedOptimizer(make_optimizer("adam", model2.parameters()), compression="fp16", **BUCKETS)
    dopt2.load_state_dict(ckpt["opt"])
    for t in range(6, 12):
        x, y = batch(t)
        loss_fn(model2, shard(x, rank, world_size), shard(y, rank, world_size)).backward()
        dopt2.step()
        dopt2.zero_grad()
    dopt.remove_hooks()
    # state only: torch's load_state_dict adds a `differentiable` key to the param groups
    return {"digest_at_6": digest, "resumed": params_of(model2), "full": full["params"],
            "digest_resumed_state": state_digest(dopt2.state_dict()["state"]), "digest_full_state": full["state_only"]}


class Deep(nn.Module):
    """Enough layers that backward visibly outlasts the first bucket's allreduce."""

    def __init__(self, width=256, depth=8):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / width ** 0.5)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def telemetry_scenario(rank, world_size):
    model = Deep()
    dopt = DistributedOptimizer(make_optimizer("sgd", model.parameters()), compression="fp16", telemetry=True,
                                bucket_cap_mb=0.3, first_bucket_cap_mb=0.3)
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        x = torch.randn(256, 256, generator=g)
        model(x).pow(2).mean().backward()
        dopt.step()
        dopt.zero_grad()
    steps = dopt.telemetry.steps
    return {"steps": [s.as_dict() for s in steps], "trace": dopt.telemetry.to_chrome_trace(),
            "summary": dopt.telemetry.summary(), "overlapped": [s.overlapped for s in steps]}


def ddp_scenario(rank, world_size):
    """torch DDP with fusedmf's hook: grads after backward (decompress mode) and training with the
    fused update inside the hook, against DistributedOptimizer with the same compression."""
    res = {}
    for comp in ("fp16", "none"):
        model = Net(0)
        ddp = nn.parallel.DistributedDataParallel(model)
        state, hook = ddp_comm_hook(compression=comp)
        ddp.register_comm_hook(state, hook)
        x, y = batch(0)
        loss_fn(ddp, shard(x, rank, world_size), shard(y, rank, world_size)).backward()
        res[f"grads/{comp}"] = [p.grad.clone() for p in model.parameters()]
    model = Net(0)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer("sgd", model.parameters())
    state, hook = ddp_comm_hook(compression="fp16", optimizer=opt)
    ddp.register_comm_hook(state, hook)
    for t in range(10):
        x, y = batch(t)
        loss_fn(ddp, shard(x, rank, world_size), shard(y, rank, world_size)).backward()
        opt.zero_grad()
    res["fused_update"] = params_of(model)
    res["fused_update_backends"] = dict(state.backends_used)
    res["distopt"] = train_distributed(rank, world_size, opt_name="sgd", compression="fp16", steps=10)["params"]
    return res


def backward_twice_scenario(rank, world_size):
    """A second backward after the gradients were communicated (no no_sync) is a clear error; the
    round is drained by zero_grad and training goes on."""
    model = Net(0)
    dopt = DistributedOptimizer(make_optimizer("sgd", model.parameters()), compression="none", **BUCKETS)
    x, y = batch(0)
    x, y = shard(x, rank, world_size), shard(y, rank, world_size)
    loss_fn(model, x, y).backward()
    try:
        loss_fn(model, x, y).backward()
        message = None
    except RuntimeError as exc:
        message = str(exc)
    dopt.zero_grad()
    loss_fn(model, x, y).backward()
    dopt.step()
    return {"message": message, "params": params_of(model)}


def suite_four_ranks(rank, world_size):
    out = {}
    for opt_name, comp in (("sgd", "none"), ("adam", "none"), ("sgd", "fp16"), ("adam", "bf16")):
        out[f"train/{opt_name}/{comp}"] = train_distributed(rank, world_size, opt_name=opt_name, compression=comp,
                                                           steps=20)
    out["accum/passes"] = train_distributed(rank, world_size, opt_name="adam", compression="none", steps=8,
                                            micro=2, accumulate="passes")
    return out


def mismatch_scenario(rank, world_size):
    """Different models or settings on rank 1: every rank raises a ValueError naming the mismatch."""
    cases = {
        "shape": lambda: (Net(0, hidden=16 if rank == 0 else 17), {}),
        "count": lambda: (Net(0, extra=rank == 1), {}),
        "dtype": lambda: (Net(0).to(torch.float64 if rank == 1 else torch.float32), {}),
        "compression": lambda: (Net(0), {"compression": "fp16" if rank == 0 else "bf16"}),
    }
    out = {}
    for name, make in cases.items():
        model, kw = make()
        try:
            DistributedOptimizer(make_optimizer("sgd", model.parameters(), backend="reference"), timeout=20, **kw)
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    return out


def killed_scenario(rank, world_size, *, die_at_step=2, wait_s=None):
    """Rank 1 dies in the middle of a step (after its forward); the others must raise, not hang."""
    model = Net(0)
    dopt = DistributedOptimizer(make_optimizer("sgd", model.parameters()), compression="fp16", timeout=wait_s,
                                **BUCKETS)
    for t in range(die_at_step + 1):
        x, y = batch(t)
        loss = loss_fn(model, shard(x, rank, world_size), shard(y, rank, world_size))
        if rank == 1 and t == die_at_step:
            os._exit(3)
        start = time.monotonic()
        try:
            loss.backward()
            dopt.step()
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}", "elapsed": time.monotonic() - start, "step": t}
        dopt.zero_grad()
    return {"error": None}


def never_joins_scenario(rank, world_size, *, wait_s=2.0, sleep=6.0):
    """Rank 1 is alive but never constructs the DistributedOptimizer (until much later)."""
    if rank == 1:
        time.sleep(sleep)
        return {"slept": sleep}
    start = time.monotonic()
    try:
        DistributedOptimizer(make_optimizer("sgd", Net(0).parameters()), timeout=wait_s)
        return {"error": None, "elapsed": time.monotonic() - start}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "elapsed": time.monotonic() - start}


def one_rank_scenario(rank, world_size):
    """A process group of size 1: no collectives, same result as the plain optimizer."""
    return train_distributed(rank, world_size, opt_name="adam", compression="none", steps=5)


# ------------------------------------------------------------------------------------------ noise scale
NOISE_SHAPES = ((2000,), (40, 50), (2, 3, 4, 4))     # 4096 values; the last one channels_last


def noise_problem(seed: int = 0, b_simple: float = 64.0):
    """The synthetic problem of tests/test_noise_scale.py: per-sample gradients G + ξ, ξ ~ N(0, diag(σ²)),
    with σ² in [0.5, 1.5] and |G|² set so that tr(Σ)/|G|² = b_simple."""
    g = torch.Generator().manual_seed(seed)
    d = sum(torch.Size(s).numel() for s in NOISE_SHAPES)
    sigma2 = 0.5 + torch.rand(d, generator=g, dtype=torch.float64)
    G = torch.randn(d, generator=g, dtype=torch.float64)
    G *= (float(sigma2.sum()) / b_simple / float(G.square().sum())) ** 0.5
    return G, sigma2


class NoiseModel(nn.Module):
    """Parameters whose gradient is exactly the vector the loss is built from: loss = Σ_p <p, v_p>."""

    def __init__(self):
        super().__init__()
        ps = [nn.Parameter(torch.zeros(s)) for s in NOISE_SHAPES]
        ps[2].data = ps[2].data.to(memory_format=torch.channels_last)
        self.ps = nn.ParameterList(ps)

    def loss(self, v: torch.Tensor) -> torch.Tensor:
        total, pos = 0.0, 0
        for p in self.ps:
            n = p.numel()
            total = total + (p * v[pos:pos + n].reshape(p.shape)).sum()
            pos += n
        return total


def noise_scale_run(rank, world_size, *, b, steps, compression="none", beta=0.95, scales=None, bad_step=None,
                    adaptive=False, seed=0):
    """``steps`` steps of DistributedOptimizer(noise_scale=...) on the synthetic problem; every rank also
    computes the unfused norms from the gathered gradients and the reduced buffers."""
    from fusedmf import mf
    from fusedmf.noise import GradientNoiseScale, squared_norm

    G, sigma2 = noise_problem(seed)
    model = NoiseModel()
    noise = GradientNoiseScale(b, beta=beta)
    sched = mf.noise_adaptive(noise, mf_ref=0.9, mf_max=0.995, min_samples=10, max_change=0.002) if adaptive else None
    opt = MFSGD(model.parameters(), lr=1e-3, momentum=0.9, mf_schedule=sched)
    dopt = DistributedOptimizer(opt, compression=compression, noise_scale=noise, bucket_cap_mb=4e-3,
                                first_bucket_cap_mb=2e-3)
    unfused, mfs = [], []
    for t in range(steps):
        g = torch.Generator().manual_seed(100003 * seed + 1009 * t + rank)
        samples = G + torch.randn(b, G.numel(), generator=g, dtype=torch.float64) * sigma2.sqrt()
        v = samples.mean(0).float()
        if bad_step is not None and t == bad_step and rank == world_size - 1:
            v[17] = float("inf")
        scale = 1.0 if scales is None else scales[t % len(scales)]
        (model.loss(v) * scale).backward()
        dopt.step(grad_scale=scale if scales is not None else None)
        everyone = [torch.empty_like(v) for _ in range(world_size)]
        dist.all_gather(everyone, v)
        local = sum(squared_norm([x]) for x in everyone) / world_size
        exact_global = squared_norm([torch.stack(everyone).double().mean(0)])
        reduced = squared_norm(dopt.reduced_grads().values()) / scale ** 2
        unfused.append({"local": local, "global_exact": exact_global, "global_reduced": reduced,
                        "skipped": bool(dopt.last_step_skipped)})
        if sched is not None:
            mfs.append(opt.param_groups[0]["momentum"] if sched.last is None else sched.last[3])
        dopt.zero_grad()
    recorded = len(noise.history) + len(noise._pending)       # folded + still in flight
    value = noise.value
    return {"history": list(noise.history), "value": value, "g2": noise.gradient_sq,
            "trace": noise.trace_sigma, "samples": noise.samples, "recorded": recorded,
            "unfused": unfused, "mfs": mfs, "params": params_of(model), "state": noise.state_dict(),
            "truth": {"g2": float(G.square().sum()), "trace": float(sigma2.sum()) }}


def noise_scale_suite(rank, world_size):
    out = {"stat": noise_scale_run(rank, world_size, b=16, steps=160, adaptive=True)}
    if world_size == 2:
        out["fp16_scaled"] = noise_scale_run(rank, world_size, b=8, steps=12, compression="fp16",
                                             scales=[1024.0, 64.0, 4096.0], bad_step=5, seed=1)
    return out


# ------------------------------------------------------------------------------------------ optimizer surface
class BNNet(nn.Module):
    """conv -> BatchNorm -> tanh -> linear: buffers that training changes (running statistics)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(IMAGE[0], 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * IMAGE[1] * IMAGE[2], OUT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            self.bn.running_mean.copy_(torch.randn(4, generator=g))
            self.bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
        self.fail_next_forward = False

    def forward(self, x, use_branch: bool = False):
        h = torch.tanh(self.bn(self.conv(x)))
        if self.fail_next_forward:          # a forward that raises half-way (after the pre-hooks ran)
            self.fail_next_forward = False
            raise ValueError("simulated forward error")
        return self.fc(h.flatten(1))


def model_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_inner(kind: str, params):
    if kind == "mfsgd":
        return MFSGD(params, lr=0.1, momentum=0.9)
    if kind == "torch_sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    raise ValueError(kind)


def surface_scenario(rank, world_size, *, kind, broadcast_buffers=True):
    """Different initial models per rank, BatchNorm, module=, named_parameters, Compression.fp16, StepLR on
    the wrapper, step hooks on the wrapper."""
    from fusedmf.comm import Compression

    model = BNNet(10 + rank)                 # every rank starts from its own init
    dopt = DistributedOptimizer(make_inner(kind, model.parameters()), module=model,
                                named_parameters=model.named_parameters(), compression=Compression.fp16,
                                broadcast_buffers=broadcast_buffers, **BUCKETS)
    after_construction = model_state(model)
    sched = torch.optim.lr_scheduler.StepLR(dopt, step_size=2, gamma=0.5)
    fired = {"pre": 0, "post": 0, "inner_post": 0}
    dopt.register_step_pre_hook(lambda opt, a, k: fired.__setitem__("pre", fired["pre"] + 1))
    dopt.register_step_post_hook(lambda opt, a, k: fired.__setitem__("post", fired["post"] + 1))
    dopt.optimizer.register_step_post_hook(lambda opt, a, k: fired.__setitem__("inner_post", fired["inner_post"] + 1))
    lrs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback_warnings_are_errors()
        for t in range(5):
            x, y = batch(t)
            loss_fn(model, shard(x, rank, world_size), shard(y, rank, world_size)).backward()
            lrs.append(dopt.param_groups[0]["lr"])
            dopt.step()
            dopt.zero_grad()
            sched.step()
    return {"after_construction": after_construction, "final": model_state(model),
            "is_optimizer": isinstance(dopt, torch.optim.Optimizer), "fired": fired, "lrs": lrs,
            "warnings": [str(w.message) for w in caught if "reference" not in str(w.message)],
            "layout_names": [b["names"] for b in dopt.bucket_layout()], "backends": dict(dopt.backends_used),
            "same_groups": dopt.param_groups is dopt.optimizer.param_groups and dopt.state is dopt.optimizer.state}


def lr_used_scenario(rank, world_size, *, kind, op="average", predivide=None):
    """w (8 values) with loss <w, x_r>: the grad on rank r is x_r. Plain SGD steps (no momentum) with a
    halving StepLR on the wrapper: w_{t+1} = w_t - lr_t · mean_r x_r (op=Sum: the sum), exact in binary
    (powers of 2), also with a predivide factor (x/f before the sum, ·f/N after)."""
    from fusedmf.comm import Average, Sum

    w = nn.Parameter(torch.zeros(8))
    inner = MFSGD([w], lr=1.0) if kind == "mfsgd" else torch.optim.SGD([w], lr=1.0)
    dopt = DistributedOptimizer(inner, compression="none", op=Average if op == "average" else Sum,
                                gradient_predivide_factor=predivide)
    sched = torch.optim.lr_scheduler.StepLR(dopt, step_size=1, gamma=0.5)
    ws = []
    for t in range(4):
        x = torch.arange(8, dtype=torch.float32) * (rank + 1) + t
        (w * x).sum().backward()
        dopt.step()
        dopt.zero_grad()
        sched.step()
        ws.append(w.detach().clone())
    return ws


def broadcast_scenario(rank, world_size):
    """broadcast_parameters(state_dict) and broadcast_optimizer_state(torch SGD with momentum state)."""
    from fusedmf.comm import broadcast_optimizer_state, broadcast_parameters

    model = BNNet(20 + rank)
    broadcast_parameters(model.state_dict(), root_rank=0)
    params = model_state(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if rank == 0:                        # only rank 0 has momentum state
        x, y = batch(0)
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    opt.param_groups[0]["lr"] = 0.1 * (rank + 1)
    broadcast_optimizer_state(opt, root_rank=0)
    return {"params": params, "state": state_digest(opt.state_dict())}


def surface_suite(rank, world_size):
    out = {f"surface/{k}": surface_scenario(rank, world_size, kind=k) for k in ("mfsgd", "torch_sgd")}
    out["surface/own_buffers"] = surface_scenario(rank, world_size, kind="mfsgd", broadcast_buffers=False)
    for k in ("mfsgd", "torch_sgd"):
        out[f"lr/{k}"] = lr_used_scenario(rank, world_size, kind=k)
        out[f"lr/{k}/sum"] = lr_used_scenario(rank, world_size, kind=k, op="sum")
        out[f"lr/{k}/predivide"] = lr_used_scenario(rank, world_size, kind=k, predivide=4.0)
    out["broadcast"] = broadcast_scenario(rank, world_size)
    out["clip"] = clip_scenario(rank, world_size)
    return out


def clip_scenario(rank, world_size):
    """fp16 params + DynamicLossScaler: unscale_(dopt) then clip_grad_norm_: clipping sees the reduced
    gradients (the same on every rank)."""
    from fusedmf import DynamicLossScaler

    model = Net(0).half()
    dopt = DistributedOptimizer(MFSGD(model.parameters(), lr=0.05, momentum=0.9), compression="fp16", **BUCKETS)
    scaler = DynamicLossScaler(init_scale=2.0 ** 8)
    x, y = batch(0)
    x, y = shard(x, rank, world_size).half(), shard(y, rank, world_size).half()
    scaler.scale(loss_fn(model, x, y)).backward()
    local = [p.grad.detach().float() / 2.0 ** 8 for p in model.parameters()]
    scaler.unscale_(dopt)
    seen = [p.grad.detach().clone() for p in model.parameters()]
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    clipped = [p.grad.detach().clone() for p in model.parameters()]
    everyone = [None] * world_size
    dist.all_gather_object(everyone, local)
    scaler.step(dopt)
    scaler.update()
    return {"seen": seen, "norm": float(norm), "clipped": clipped, "local_all": everyone,
            "params": params_of(model), "skipped": dopt.last_step_skipped}


# ------------------------------------------------------------------------------------------ ranks that disagree
def _run_until_error(step_fn, steps):
    for t in range(steps):
        start = time.monotonic()
        try:
            step_fn(t)
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}", "step": t, "elapsed": time.monotonic() - start}
    return {"error": None}


def disagree_suite(rank, world_size, *, timeout=5.0):
    """Each case on fresh objects; each raises on every rank at the same collective, so the group stays usable."""
    out = {}

    model = Net(0)
    dopt = DistributedOptimizer(make_optimizer("sgd", model.parameters()), compression="fp16", timeout=timeout,
                                **BUCKETS)

    def skip_one(t):                       # rank 1 skips step() at t = 2 (zero_grad only)
        x, y = batch(t)
        loss_fn(model, shard(x, rank, world_size), shard(y, rank, world_size)).backward()
        if not (rank == 1 and t == 2):
            dopt.step()
        dopt.zero_grad()
    out["skipped_step"] = _run_until_error(skip_one, 6)

    model = Net(0)
    dopt = DistributedOptimizer(make_optimizer("sgd", model.parameters()), compression="fp16", timeout=timeout,
                                check_ranks="deferred", **BUCKETS)
    skipped = {}

    def skip_one_deferred(t):              # the same with the check read on the device: round 3 is skipped,
        x, y = batch(t)                    # the error comes at round 4
        loss_fn(model, shard(x, rank, world_size), shard(y, rank, world_size)).backward()
        if not (rank == 1 and t == 2):
            before = params_of(model)
            dopt.step()
            skipped[t] = (dopt.last_step_skipped, all(torch.equal(a, b) for a, b in zip(before, params_of(model))))
        dopt.zero_grad()
    out["skipped_step_deferred"] = _run_until_error(skip_one_deferred, 6)
    out["skipped_step_deferred"]["skipped"] = skipped

    model = BNNet(0)
    dopt = DistributedOptimizer(make_optimizer("sgd", model.parameters()), module=model, compression="fp16",
                                timeout=timeout, **BUCKETS)

    def behind(t):                         # rank 1's forward raises at t = 2; it catches it and goes on
        x, y = batch(t)
        if rank == 1 and t == 2:
            model.fail_next_forward = True
            try:
                loss_fn(model, shard(x, rank, world_size), shard(y, rank, world_size))
            except ValueError:
                dopt.zero_grad()
                return
        loss_fn(model, shard(x, rank, world_size), shard(y, rank, world_size)).backward()
        dopt.step()
        dopt.zero_grad()
    out["forward_error"] = _run_until_error(behind, 6)

    model = Net(0)
    dopt = DistributedOptimizer(make_optimizer("sgd", model.parameters()), compression="none", timeout=timeout,
                                **BUCKETS)

    def passes(t):                         # rank 1 accumulates one more micro-batch at t = 1
        x, y = batch(t)
        xs, ys = shard(x, rank, world_size), shard(y, rank, world_size)
        if rank == 1 and t == 1:
            with dopt.no_sync():
                loss_fn(model, xs, ys).backward()
        loss_fn(model, xs, ys).backward()
        dopt.step()
        dopt.zero_grad()
    out["passes"] = _run_until_error(passes, 4)

    model = Net(0)
    dopt = DistributedOptimizer(make_optimizer("sgd", model.parameters()), compression="fp16", timeout=timeout,
                                named_parameters=model.named_parameters(), replica_check_every=2, **BUCKETS)

    def diverge(t):                        # rank 1 nudges one weight after step 3
        x, y = batch(t)
        loss_fn(model, shard(x, rank, world_size), shard(y, rank, world_size)).backward()
        dopt.step()
        dopt.zero_grad()
        if rank == 1 and t == 2:
            with torch.no_grad():
                model.fc1.weight[3, 5] += 1e-3
    out["replica"] = _run_until_error(diverge, 6)
    dist.barrier()
    return out


# ------------------------------------------------------------------------------------------ noise-scale resume
def noise_resume_run(rank, world_size, *, steps, save_at=None, resume_from=None):
    """noise_scale + mf.noise_adaptive on the synthetic problem; optionally save at ``save_at`` or start
    from a checkpoint (bytes) taken at its step."""
    from fusedmf import mf
    from fusedmf.noise import GradientNoiseScale

    G, sigma2 = noise_problem(0)
    model = NoiseModel()
    noise = GradientNoiseScale(16, beta=0.9)
    sched = mf.noise_adaptive(noise, mf_ref=0.9, mf_max=0.995, min_samples=5, max_change=0.01)
    opt = MFSGD(model.parameters(), lr=1e-3, momentum=0.9, mf_schedule=sched)
    dopt = DistributedOptimizer(opt, compression="fp16", noise_scale=noise, bucket_cap_mb=4e-3,
                                first_bucket_cap_mb=2e-3)
    first = 0
    if resume_from is not None:
        ckpt = _loads(resume_from)
        model.load_state_dict(ckpt["model"])
        dopt.load_state_dict(ckpt["opt"])
        first = ckpt["step"]
    saved, mfs = None, []
    for t in range(first, steps):
        g = torch.Generator().manual_seed(1009 * t + rank)
        samples = G + torch.randn(16, G.numel(), generator=g, dtype=torch.float64) * sigma2.sqrt()
        model.loss(samples.mean(0).float()).backward()
        dopt.step()
        dopt.zero_grad()
        mfs.append(sched.last[3])
        if save_at is not None and t + 1 == save_at:
            saved = _dumps({"model": model.state_dict(), "opt": dopt.state_dict(), "step": t + 1})
    return {"params": params_of(model), "noise": noise.state_dict(), "mfs": mfs, "saved": saved,
            "value": noise.value}


def noise_resume_suite(rank, world_size):
    full = noise_resume_run(rank, world_size, steps=30, save_at=15)
    resumed = noise_resume_run(rank, world_size, steps=30, resume_from=full["saved"])
    return {"full": full, "resumed": resumed}
