"""The one rank lifecycle: join a process group, run, and leave it with no communication thread left.

Every multi-process benchmark (benchmarks/) and the tests' rank launcher (tests/_comm_workers.py) go
through :func:`process_group`, so that a rank can neither exit while a collective is in flight nor
leave gloo's worker threads running into interpreter shutdown.

NOTE [gloo teardown]: a 2-rank run aborted at exit now and then ("terminate called without an active
exception"). From a core dump: at interpreter exit a gloo worker thread (``ProcessGroupGloo::runLoop``)
was still destroying a finished work object; that frees Python tensors and takes the GIL while the
main thread is in ``Py_FinalizeEx``; Python kills the thread, the unwind runs through a noexcept
destructor and C++ calls ``std::terminate``. The worker threads outlived ``destroy_process_group()``
because the first ``torch.optim`` optimizer built after ``init_process_group`` imports
``torch._dynamo``, and that import takes references to the default group that are never released
(its refcount went 10 -> 20; after destroy + gc 6 OS threads were left instead of 2, two of them
``pt_gloo_runloop``). Importing ``torch._dynamo`` *before* the group exists leaves the refcount at 10
and the threads end in ``destroy_process_group()`` (measured with ``gloo_threads()``: 2 -> 0). So:
import dynamo first, barrier (every rank is past its last collective; gloo runs a group's
collectives in order, so every earlier work object has finished), destroy, collect, and check that
the runloop threads are gone before returning; if they are not, raise instead of aborting at exit
by chance.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import sys
import time
from typing import Iterator, Optional

GLOO_THREAD = "pt_gloo_runloop"  # the name torch gives ProcessGroupGloo's worker threads (Linux)


def gloo_threads() -> Optional[int]:
    """How many of this process's OS threads are gloo worker threads; None where /proc cannot tell."""
    task = f"/proc/{os.getpid()}/task"
    if not sys.platform.startswith("linux") or not os.path.isdir(task):
        return None
    n = 0
    for tid in os.listdir(task):
        try:
            with open(os.path.join(task, tid, "comm")) as f:
                n += f.read().strip() == GLOO_THREAD
        except OSError:  # the thread ended while we looked
            pass
    return n


def _device_barrier(backend: str) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl" and torch.cuda.is_available():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def leave(*, barrier: bool = True, check: bool = True, wait_s: float = 10.0) -> None:
    """Leave the default process group: barrier, destroy, collect, and wait until gloo's threads end.

    Drop (``del``) every work handle and every tensor a collective used before calling this: a live
    handle keeps its work object, and with it the worker thread's last reference, alive. Raises
    RuntimeError if gloo worker threads are still running after ``wait_s`` seconds (NOTE [gloo teardown]);
    ``check=False`` (a rank that already failed) waits the same but does not raise.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        backend = str(dist.get_backend())
        try:
            if barrier:
                _device_barrier(backend)
        finally:
            dist.destroy_process_group()
    gc.collect()
    deadline = time.monotonic() + wait_s
    left = gloo_threads()
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        gc.collect()
        left = gloo_threads()
    if left and check:
        raise RuntimeError(f"{left} gloo worker thread(s) ({GLOO_THREAD}) still run {wait_s:g} s after "
                           "destroy_process_group(): something still holds the process group or one of its "
                           "work objects (NOTE [gloo teardown] in fusedmf/_ranks.py)")


@contextlib.contextmanager
def process_group(backend: str, *, rank: Optional[int] = None, world_size: Optional[int] = None,
                  init_method: Optional[str] = None, port: Optional[int] = None,
                  timeout_s: float = 300.0, barrier: bool = True) -> Iterator[None]:
    """``with process_group("gloo", rank=r, world_size=n, port=p): ...`` (spawned ranks on 127.0.0.1)
    or ``with process_group("nccl"): ...`` (torchrun's environment).

    Imports torch._dynamo before the group exists, initialises it, and on the way out calls
    :func:`leave` (with its barrier only when the body finished without an exception, and only if
    ``barrier``: a rank that failed must not wait for peers that may never arrive).
    """
    import torch._dynamo  # noqa: F401  NOTE [gloo teardown]: before init_process_group, never after
    import torch.distributed as dist

    if port is not None and init_method is None:
        init_method = f"tcp://127.0.0.1:{port}"
        if backend == "gloo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback interface the rendezvous uses
    kwargs = {} if init_method is None else {"init_method": init_method, "rank": rank, "world_size": world_size}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    ok = False
    try:
        yield
        ok = True
    finally:
        leave(barrier=ok and barrier, check=ok)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a spawned group's rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_rank(rank, fn, world_size, port, backend, timeout_s, args):
    with process_group(backend, rank=rank, world_size=world_size, port=port, timeout_s=timeout_s):
        fn(rank, world_size, *args)


def spawn(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = 300.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes on this machine, each inside
    :func:`process_group` (rendezvous on 127.0.0.1); raises if any rank fails. ``fn`` must be a
    module-level function (it is pickled by name)."""
    import torch.multiprocessing as mp

    mp.spawn(_spawned_rank, args=(fn, world_size, free_port(), backend, timeout_s, args), nprocs=world_size)
