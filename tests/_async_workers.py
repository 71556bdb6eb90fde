"""Multi-process helpers for tests/test_async_workers.py: gloo ranks on 127.0.0.1 running one master
(rank 0) and N workers of fusedmf.asynchronous. Kept out of the test module so that child processes
import only this.

NOTE: the launcher mirrors tests/_comm_workers.launch (whose children can only run functions of
that module); the project's one rank-lifecycle helper is being written in another stream and
should replace both.
"""

from __future__ import annotations

import copy
import datetime
import io
import os
import signal
import time
import traceback
import warnings
from typing import Callable, Dict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from fusedmf.asynchronous import ASGD, DANAZero, Master, Worker

IN, HIDDEN = 8, 16
BATCH = 16


def free_port() -> int:
    from _comm_workers import free_port as _free_port   # the one free_port of the test suite
    return _free_port()


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _child(fn_name, rank, world_size, port, kwargs, queue):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        result = globals()[fn_name](rank, world_size, **kwargs)
        queue.put((rank, "ok", _dumps(result)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "fusedmf", "_async_workers"])
    return _CTX


def launch(fn: Callable, world_size: int, *, launch_timeout: float = 240.0, **kwargs) -> Dict:
    """Run ``fn(rank, world_size, **kwargs)`` on ``world_size`` gloo ranks; return
    ``{rank: ("ok", result) | ("error", traceback) | ("exit", exitcode)}``."""
    ctx = _context()
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn.__name__, r, world_size, port, kwargs, q), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: Dict = {}
    deadline = time.monotonic() + launch_timeout
    while len(results) < world_size and time.monotonic() < deadline:
        try:
            rank, status, payload = q.get(timeout=0.2)
            results[rank] = (status, _loads(payload) if status == "ok" else payload)
        except Exception:
            if all(not p.is_alive() for p in procs) and q.empty():
                break
    for r, p in enumerate(procs):
        p.join(timeout=max(0.0, deadline - time.monotonic()) if r not in results else 10.0)
        if p.is_alive():
            p.kill()   # this launcher's own child, by its handle
            p.join()
            results.setdefault(r, ("error", f"rank {r} did not finish within {launch_timeout} s (killed)"))
        results.setdefault(r, ("exit", p.exitcode))
    return results


# ------------------------------------------------------------------------------------------ model and data
class Net(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


_TEACHER = torch.Generator().manual_seed(123)
TEACHER_W = torch.randn(IN, generator=_TEACHER)


def batch(rank: int, k: int):
    g = torch.Generator().manual_seed(10_000 * rank + k)
    x = torch.randn(BATCH, IN, generator=g)
    return x, (x @ TEACHER_W).unsqueeze(1)


def make_optimizer(name: str, params, num_workers: int):
    if name == "asgd":
        return ASGD(params, lr=0.02, momentum=0.0)
    if name == "dana":
        return DANAZero(params, lr=0.01, momentum=0.9, num_workers=num_workers)
    if name == "smega2":
        from fusedmf.optim import SMEGA2
        return SMEGA2(params, lr=0.01, momentum=0.9, num_workers=num_workers, backend="reference")
    raise ValueError(name)


def _worker_loop(rank: int, *, timeout: float, compression=None, weight_compression=None, die_after=None,
                 stall_after=None, stall_s: float = 0.0, phases: int = 1, model=None, connect_timeout=300.0,
                 max_steps=None):
    model = model or Net(seed=rank)   # a different init on purpose: the master's weights must overwrite it
    out = []
    for _ in range(phases):
        worker = Worker(model.parameters(), master=0, timeout=timeout, compression=compression,
                        weight_compression=weight_compression, connect_timeout=connect_timeout)

        def compute(k):
            if die_after is not None and k == die_after:
                os.kill(os.getpid(), signal.SIGKILL)     # a crash: no goodbye, the socket just closes
            if stall_after is not None and k == stall_after:
                time.sleep(stall_s)                      # a hang longer than the master's timeout
            x, y = batch(rank, k + 1000 * len(out))
            model.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss.item()

        try:
            out.append(worker.run(compute, max_steps=max_steps))
        except ConnectionError as exc:
            out.append({"lost_master": str(exc)})
    return out


# ------------------------------------------------------------------------------------------ rank functions
def train_async(rank, world_size, *, optimizer="dana", steps=60, timeout=30.0, compression=None,
                weight_compression=None, die=None, stall=None, stall_s=0.0, max_steps=None):
    """Rank 0 is the master; ``die``: {rank: k} kills that worker at its k-th gradient;
    ``stall``: {rank: k} makes it sleep ``stall_s`` there; ``max_steps``: {rank: k} makes it leave
    (BYE) after k gradients. With the master's ``steps`` equal to what the workers send in total,
    every worker's share is fixed whatever the timing."""
    die, stall, max_steps = die or {}, stall or {}, max_steps or {}
    if rank != 0:
        return _worker_loop(rank, timeout=timeout, compression=compression, weight_compression=weight_compression,
                            die_after=die.get(rank), stall_after=stall.get(rank), stall_s=stall_s,
                            max_steps=max_steps.get(rank))
    model = Net(seed=0)
    opt = make_optimizer(optimizer, model.parameters(), world_size - 1)
    master = Master(opt, timeout=timeout, compression=compression, weight_compression=weight_compression)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        summary = master.run(steps)
    return {"summary": summary, "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                                             and "fusedmf.asynchronous" in str(w.message)]}


def checkpoint_resume(rank, world_size, *, path, optimizer="dana", first=15, total=30, timeout=30.0):
    """Master: run ``first`` steps and checkpoint; a fresh master loads the file, must equal the
    first master's state, and runs to ``total``. Workers serve both phases."""
    if rank != 0:
        return _worker_loop(rank, timeout=timeout, phases=2)
    model = Net(seed=0)
    opt = make_optimizer(optimizer, model.parameters(), world_size - 1)
    m1 = Master(opt, timeout=timeout)
    s1 = m1.run(first, checkpoint=path, checkpoint_every=5)
    before = copy.deepcopy(m1.state_dict())     # state_dict holds references (torch convention)
    model2 = Net(seed=99)
    opt2 = make_optimizer(optimizer, model2.parameters(), world_size - 1)
    m2 = Master(opt2, timeout=timeout)
    m2.load(path)
    loaded = copy.deepcopy(m2.state_dict())
    s2 = m2.run(total, checkpoint=path)
    return {"first": s1, "before": before, "loaded": loaded, "second": s2}


def mismatched_worker(rank, world_size, *, timeout=3.0):
    """Worker 2 has a different model: the master must refuse it with a clear error."""
    if rank == 2:
        wide = nn.Sequential(nn.Linear(IN, HIDDEN + 1), nn.Tanh(), nn.Linear(HIDDEN + 1, 1))
        return _worker_loop(rank, timeout=timeout, model=wide, connect_timeout=3 * timeout)
    if rank != 0:
        return _worker_loop(rank, timeout=timeout)
    opt = make_optimizer("asgd", Net(seed=0).parameters(), world_size - 1)
    try:
        Master(opt, timeout=timeout).run(1000)
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}
