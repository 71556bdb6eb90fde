"""Rank functions for tests/test_rank_lifecycle.py (a module of its own: spawned children import it)."""

import importlib.util
import os

import torch
import torch.distributed as dist

# fusedmf._ranks loaded by file path, not through the fusedmf package: importing fusedmf registers
# its ops' fake kernels through torch.library, which imports torch._dynamo, and the late-import case
# below needs a process where dynamo is not imported yet (_ranks itself imports only the stdlib).
_spec = importlib.util.spec_from_file_location(
    "_fusedmf_ranks_standalone",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fusedmf", "_ranks.py"))
_ranks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ranks)


def _work(world_size):
    """What made gloo's threads outlive the group: a torch.optim optimizer built after init (it imports
    torch._dynamo) and collectives, async ones included."""
    opt = torch.optim.SGD(torch.nn.Linear(3, 3).parameters(), lr=0.1)
    out = [torch.zeros(3) for _ in range(world_size)]
    work = dist.all_gather(out, torch.ones(3), async_op=True)
    work.wait()
    del work
    everyone = [None] * world_size
    dist.all_gather_object(everyone, dist.get_rank())
    del opt
    return everyone


def through_the_helper(rank, world_size, port, queue):
    try:
        with _ranks.process_group("gloo", rank=rank, world_size=world_size, port=port, timeout_s=60):
            everyone = _work(world_size)
            inside = _ranks.gloo_threads()
        queue.put((rank, "ok", {"inside": inside, "after": _ranks.gloo_threads(), "gathered": everyone}))
    except BaseException as exc:  # noqa: BLE001  reported to the test
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}"))


def dynamo_after_init(rank, world_size, port, queue):
    """init_process_group first, torch._dynamo imported afterwards (by the optimizer): leave() must say
    that the threads survived instead of letting the process abort at exit by chance."""
    import os
    import sys

    if "torch._dynamo" in sys.modules:
        queue.put((rank, "error", "torch._dynamo was imported before the group: nothing to show"))
        return
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    _work(world_size)
    try:
        _ranks.leave(wait_s=1.0)
        queue.put((rank, "ok", {"after": _ranks.gloo_threads()}))
    except RuntimeError as exc:
        queue.put((rank, "raised", str(exc)))
