"""Real asynchronous workers over torch.distributed: one master rank, N worker ranks.

NOTE [async protocol]
Point-to-point messages only (``isend``/``irecv``): no collective, no barrier per step. Every
message is a header (float64, ``HEADER_LEN`` values, tag ``TAG_HEADER``), optionally followed
by a payload (one flat buffer, tag ``TAG_PAYLOAD``) in the layout of NOTE [pack layout]
(fusedmf/functional/pack.py): the params (or grads) in param-group order, each in a 16-byte
aligned slot, cast to the message's dtype (fp32, or fp16/bf16 when compressed; packed by
``fusedmf.functional.pack``, the compiled kernel where built).

    worker -> master  HELLO   [1, numel, tensors, layout hash, grad dtype, weight dtype]
    master -> worker  WEIGHTS [4, master step]                    + payload: the initial params
    worker -> master  GRAD    [2, worker's count, loss, step of the weights it used] + payload: grads
    master -> worker  WEIGHTS [4, master step]                    + payload: optimizer.estimate()
    ...                                                            (SMEGA2: the look-ahead weights)
    master -> worker  STOP    [5]                  when the master has taken its steps
    worker -> master  BYE     [3, worker's count]  when a worker leaves by itself (max_steps)

The master serves each worker from its own thread, which blocks on that worker's next message
(a thread per peer: gloo's ``wait`` with a timeout is the only way to bound a wait, and after a
timeout gloo closes that peer's connection for good). The threads hand each gradient to the main
thread through one queue, so gradients are applied one at a time, in arrival order: one master
step per gradient. Nothing waits for the slowest worker.

Failure: the handshake (HELLO and the first weights) may take up to ``connect_timeout`` seconds,
since ranks start at different times. After it, a worker that sends nothing for ``timeout``
seconds after being sent weights (it
died, hung or is partitioned), or whose connection breaks, is dropped with a ``RuntimeWarning``;
the master goes on with the others and fails only when no worker is left. A worker whose master
is gone raises ``ConnectionError`` after at most ``timeout`` seconds. Gradients in flight when the
master stops are discarded (counted in the summary).

Checkpoints: :meth:`Master.state_dict` holds the params, the optimizer's state and the master's
counters; :meth:`Master.save` writes it atomically (``checkpoint_every`` steps during
:meth:`Master.run`, and at the end). A resumed master sends every worker fresh weights; the
gradients that were in flight at the crash are lost, as in any asynchronous system.

Backends: gloo sends CPU tensors (CPU params), NCCL CUDA tensors (CUDA params; headers and
buffers on the params' device); any other pairing is refused at construction. Tested on gloo
only. NOT yet run with NCCL: NCCL's waits do not time out the way gloo's do (set
TORCH_NCCL_ASYNC_ERROR_HANDLING and the process group's timeout), and its point-to-point calls
from several threads are unverified.
"""

from __future__ import annotations

import datetime
import math
import os
import queue
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import functional as F
from ..functional.pack import pack_offsets, slot_strides, slot_view
from .simulator import check_num_workers, master_step

Tensor = torch.Tensor

__all__ = ["Master", "Worker", "FlatLayout", "HEADER_LEN", "TAG_HEADER", "TAG_PAYLOAD"]

HEADER_LEN = 6
TAG_HEADER, TAG_PAYLOAD = 4001, 4002
HELLO, GRAD, BYE, WEIGHTS, STOP = 1, 2, 3, 4, 5
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def comm_dtype(compression, what: str = "compression") -> torch.dtype:
    """None / "none" / "fp32" -> float32; "fp16" / "bf16" or the torch dtypes themselves."""
    if compression is None or compression == "none":
        return torch.float32
    if isinstance(compression, torch.dtype) and compression in _DTYPE_CODE:
        return compression
    if isinstance(compression, str) and compression in _DTYPES:
        return _DTYPES[compression]
    raise ValueError(f"{what} must be None, 'none', 'fp32', 'fp16', 'bf16' or torch.float16/bfloat16, got {compression!r}")


class FlatLayout:
    """The params' slots in one flat buffer of ``dtype`` (NOTE [pack layout]); the same on the
    master and every worker when their params have the same shapes in the same order."""

    def __init__(self, params: Sequence[Tensor], dtype: torch.dtype):
        self.shapes = [tuple(p.shape) for p in params]
        self.strides = [slot_strides(p) for p in params]
        self.dtype = dtype
        self.offsets, self.numel = pack_offsets([p.numel() for p in params], torch.empty((), dtype=dtype).element_size())
        self.device = params[0].device if len(params) else torch.device("cpu")

    def buffer(self) -> Tensor:
        # zeroed: the padding between slots is never written (NOTE [pack layout])
        return torch.zeros(max(self.numel, 1), dtype=self.dtype, device=self.device)

    def views(self, buf: Tensor) -> List[Tensor]:
        return [slot_view(buf, off, shape, st) for off, shape, st in zip(self.offsets, self.shapes, self.strides)]

    def pack(self, tensors: Sequence[Tensor], buf: Tensor) -> None:
        if tensors:
            F.pack(list(tensors), buf, scale=1.0)

    def signature(self) -> int:
        """A 50-bit hash of the shapes (exact in a float64 header)."""
        return zlib.crc32(repr(self.shapes).encode()) ^ (len(self.shapes) << 32)


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(seconds))


def _header(*values, device=None) -> Tensor:
    h = torch.zeros(HEADER_LEN, dtype=torch.float64)
    h[:len(values)] = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return h.to(device) if device is not None else h


def _comm_device(params: Sequence[Tensor], group, who: str) -> torch.device:
    """Where messages live: NCCL sends CUDA tensors, gloo CPU tensors (no staging copies here)."""
    device = params[0].device if len(params) else torch.device("cpu")
    backend = str(dist.get_backend(group))
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"fusedmf.asynchronous.{who}: the NCCL backend needs CUDA params, got params on {device}")
    if backend == "gloo" and device.type != "cpu":
        raise ValueError(f"fusedmf.asynchronous.{who}: the gloo backend sends CPU tensors; the params are on "
                         f"{device} (use NCCL for CUDA params)")
    return device


def _check_timeout(timeout) -> float:
    if not isinstance(timeout, (int, float)) or not timeout > 0 or not math.isfinite(timeout):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


class _Link:
    """The master's side of one worker: buffers, the thread serving it, the replies it waits for."""

    def __init__(self, rank: int, index: int, grad_layout: FlatLayout, weight_layout: FlatLayout):
        self.rank, self.index = rank, index
        self.recv_buf = grad_layout.buffer()
        self.send_buf = weight_layout.buffer()
        self.replies: "queue.Queue[int]" = queue.Queue()
        self.header = torch.zeros(HEADER_LEN, dtype=torch.float64, device=grad_layout.device)
        self.sent_at = 0          # master step of the weights this worker is computing on
        self.thread: Optional[threading.Thread] = None


@dataclass
class MasterSummary:
    steps: int
    gradients_from: Dict[int, int]
    dropped: Dict[int, str]
    left: List[int]
    discarded: int
    losses: List[float] = field(default_factory=list)        # reported by workers, in step order
    workers: List[int] = field(default_factory=list)         # the rank behind each step
    staleness: List[int] = field(default_factory=list)       # master steps since that worker's weights


class Master:
    """The master rank: applies each worker's gradient as it arrives (NOTE [async protocol]).

        opt = SMEGA2(model.parameters(), lr=0.1, num_workers=3)      # or ASGD / DANAZero
        master = Master(opt, workers=[1, 2, 3], timeout=30)
        summary = master.run(num_steps=1000, checkpoint="master.pt", checkpoint_every=100)

    ``workers``: their global ranks (default: every other rank of the group); worker ``i`` of the
    list is index ``i`` for optimizers that keep per-worker state. ``compression`` (gradients) and
    ``weight_compression`` (weights sent back): None, "fp16" or "bf16"; the workers must be built
    with the same. ``timeout``: seconds a worker may take for one gradient before it is dropped;
    ``connect_timeout``: seconds to wait for a worker's first message (ranks start at different times).
    """

    def __init__(self, optimizer, *, workers: Optional[Sequence[int]] = None, group=None, compression=None,
                 weight_compression=None, timeout: float = 60.0, connect_timeout: float = 300.0):
        if not dist.is_initialized():
            raise RuntimeError("fusedmf.asynchronous.Master: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        if not callable(getattr(optimizer, "estimate", None)):
            raise TypeError(f"Master: the optimizer ({type(optimizer).__name__}) has no estimate(); use SMEGA2, "
                            "ASGD or DANAZero")
        self.timeout = _check_timeout(timeout)
        self.connect_timeout = _check_timeout(connect_timeout)
        self.group = group
        me, world = dist.get_rank(), dist.get_world_size(group)
        ranks = list(workers) if workers is not None else [dist.get_global_rank(group, r) if group is not None else r
                                                           for r in range(world) if r != dist.get_rank(group)]
        if not ranks or len(set(ranks)) != len(ranks) or me in ranks:
            raise ValueError(f"Master: workers must be distinct ranks other than the master's ({me}), got {ranks}")
        check_num_workers(optimizer, len(ranks), "Master")
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        if not self.params:
            raise ValueError("Master: the optimizer has no params")
        self.device = _comm_device(self.params, group, "Master")
        self.grad_layout = FlatLayout(self.params, comm_dtype(compression))
        self.weight_layout = FlatLayout(self.params, comm_dtype(weight_compression, "weight_compression"))
        self.ranks = ranks
        self.step_count = 0
        self.gradients_from: Dict[int, int] = {r: 0 for r in ranks}
        self.dropped: Dict[int, str] = {}
        self.left: List[int] = []
        self.losses: List[float] = []
        self.step_workers: List[int] = []
        self.staleness: List[int] = []

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"params": [p.detach().clone() for p in self.params], "optimizer": self.optimizer.state_dict(),
                "step": self.step_count, "gradients_from": dict(self.gradients_from), "dropped": dict(self.dropped),
                "left": list(self.left), "losses": list(self.losses), "step_workers": list(self.step_workers),
                "staleness": list(self.staleness)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        src = state["params"]
        if len(src) != len(self.params):
            raise ValueError(f"Master.load_state_dict: the checkpoint has {len(src)} params, the optimizer has "
                             f"{len(self.params)}")
        for i, (p, s) in enumerate(zip(self.params, src)):
            if p.shape != s.shape:
                raise ValueError(f"Master.load_state_dict: param {i} has shape {list(s.shape)} in the checkpoint, "
                                 f"{list(p.shape)} here")
        self.optimizer.load_state_dict(state["optimizer"])
        for p, s in zip(self.params, src):
            p.copy_(s)
        self.step_count = int(state["step"])
        self.gradients_from = {r: int(state["gradients_from"].get(r, 0)) for r in self.ranks}
        self.dropped, self.left = dict(state["dropped"]), list(state["left"])
        self.losses, self.step_workers = list(state["losses"]), list(state["step_workers"])
        self.staleness = list(state["staleness"])

    def save(self, path: str) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (a temporary file, then a rename)."""
        tmp = f"{path}.tmp.{os.getpid()}"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        self.load_state_dict(torch.load(path, map_location=self.grad_layout.device, weights_only=False))

    # ------------------------------------------------------------------ serving
    def _serve(self, link: _Link, inbox: queue.Queue) -> None:
        """One worker's thread: handshake, initial weights, then gradient in / weights out."""
        to = _td(self.timeout)
        try:
            # the handshake waits up to connect_timeout: ranks start at different times
            dist.irecv(link.header, src=link.rank, group=self.group, tag=TAG_HEADER).wait(
                timeout=_td(self.connect_timeout))
            problem = self._check_hello(link.header)
            if problem:
                inbox.put((link, "error", problem))
                return
            self._send(link, WEIGHTS, with_payload=True, timeout=self.connect_timeout)
            while True:
                dist.irecv(link.header, src=link.rank, group=self.group, tag=TAG_HEADER).wait(timeout=to)
                kind = int(link.header[0])
                if kind == BYE:
                    inbox.put((link, "bye", link.header.clone()))
                    return
                if kind != GRAD:
                    inbox.put((link, "error", f"worker rank {link.rank} sent message kind {kind}, expected GRAD or BYE"))
                    return
                dist.irecv(link.recv_buf, src=link.rank, group=self.group, tag=TAG_PAYLOAD).wait(timeout=to)
                inbox.put((link, "grad", link.header.clone()))
                reply = link.replies.get()
                if reply == STOP:
                    self._send(link, STOP, with_payload=False)
                    return
                self._send(link, WEIGHTS, with_payload=True)
        except Exception as exc:          # a timeout, a broken connection: the worker is gone
            inbox.put((link, "dead", f"{type(exc).__name__}: {str(exc).strip()[:300]}"))

    def _send(self, link: _Link, kind: int, *, with_payload: bool, timeout: Optional[float] = None) -> None:
        to = _td(timeout or self.timeout)
        dist.isend(_header(kind, self.step_count, device=self.device), dst=link.rank, group=self.group, tag=TAG_HEADER).wait(timeout=to)
        if with_payload:
            dist.isend(link.send_buf, dst=link.rank, group=self.group, tag=TAG_PAYLOAD).wait(timeout=to)

    def _check_hello(self, h: Tensor) -> Optional[str]:
        mine = (float(HELLO), float(self.grad_layout.numel), float(len(self.params)), float(self.grad_layout.signature()),
                float(_DTYPE_CODE[self.grad_layout.dtype]), float(_DTYPE_CODE[self.weight_layout.dtype]))
        theirs = tuple(float(x) for x in h.tolist())
        if theirs == mine:
            return None
        return (f"a worker's params or compression do not match the master's: worker (kind, numel, tensors, layout "
                f"hash, grad dtype, weight dtype) = {theirs}, master = {mine}")

    @torch.no_grad()
    def _apply(self, link: _Link, header: Tensor) -> None:
        views = dict(zip(map(id, self.params), self.grad_layout.views(link.recv_buf)))
        master_step(self.optimizer, link.index, grads=lambda p: views.get(id(p)))
        self.staleness.append(self.step_count - link.sent_at)
        self.step_count += 1
        self.gradients_from[link.rank] += 1
        self.losses.append(float(header[2]))
        self.step_workers.append(link.rank)
        if all(p.dtype == self.weight_layout.dtype for p in self.params):
            self.optimizer.estimate(out=self.weight_layout.views(link.send_buf))     # straight into the message
        else:
            self.weight_layout.pack(self.optimizer.estimate(), link.send_buf)
        link.sent_at = self.step_count

    def _drop(self, link: _Link, reason: str, alive: Dict[int, _Link]) -> None:
        alive.pop(link.rank, None)
        self.dropped[link.rank] = reason
        warnings.warn(f"fusedmf.asynchronous.Master: dropped worker rank {link.rank} at master step "
                      f"{self.step_count} ({reason}); continuing with {len(alive)} worker(s)", RuntimeWarning,
                      stacklevel=3)

    def run(self, num_steps: int, *, checkpoint: Optional[str] = None, checkpoint_every: int = 0,
            on_step: Optional[Callable[[int, int, float], None]] = None) -> MasterSummary:
        """Serve the workers until the master has taken ``num_steps`` steps in total (counting
        steps restored from a checkpoint), then stop them. ``on_step(step, rank, loss)`` runs after
        each step (the loss the worker reported for that gradient)."""
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"Master.run: num_steps must be a non-negative int, got {num_steps!r}")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError(f"Master.run: checkpoint_every must be a non-negative int, got {checkpoint_every!r}")
        if checkpoint_every and checkpoint is None:
            raise ValueError("Master.run: checkpoint_every needs a checkpoint path")
        inbox: queue.Queue = queue.Queue()
        links = {r: _Link(r, i, self.grad_layout, self.weight_layout) for i, r in enumerate(self.ranks)}
        with torch.no_grad():
            for link in links.values():
                self.weight_layout.pack([p.detach() for p in self.params], link.send_buf)
                link.sent_at = self.step_count
        alive = dict(links)
        for link in links.values():
            link.thread = threading.Thread(target=self._serve, args=(link, inbox), daemon=True,
                                           name=f"fusedmf-async-worker{link.rank}")
            link.thread.start()
        discarded = 0
        try:
            while self.step_count < num_steps:
                if not alive:
                    raise RuntimeError(f"fusedmf.asynchronous.Master: every worker was dropped at step "
                                       f"{self.step_count} of {num_steps}: {self.dropped}")
                link, kind, info = self._next(inbox)
                if kind == "error":
                    alive.pop(link.rank, None)      # its thread has returned: nothing to stop
                    raise ValueError(f"fusedmf.asynchronous.Master: {info}")
                if kind == "dead":
                    self._drop(link, info, alive)
                    continue
                if kind == "bye":
                    alive.pop(link.rank, None)
                    self.left.append(link.rank)
                    continue
                self._apply(link, info)
                link.replies.put(WEIGHTS)
                if on_step is not None:
                    on_step(self.step_count, link.rank, self.losses[-1])
                if checkpoint_every and self.step_count % checkpoint_every == 0:
                    self.save(checkpoint)
        finally:
            discarded = self._stop(inbox, alive, list(links.values()))
        if checkpoint is not None:
            self.save(checkpoint)
        return MasterSummary(steps=self.step_count, gradients_from=dict(self.gradients_from), dropped=dict(self.dropped),
                             left=list(self.left), discarded=discarded, losses=list(self.losses),
                             workers=list(self.step_workers), staleness=list(self.staleness))

    def _next(self, inbox: queue.Queue):
        # every serving thread reports within its own waits' timeouts; this bound only guards
        # against a thread that died without reporting (it cannot, short of an interpreter bug)
        try:
            return inbox.get(timeout=4 * self.timeout + 10)
        except queue.Empty:
            raise RuntimeError("fusedmf.asynchronous.Master: no worker thread reported within "
                               f"{4 * self.timeout + 10:.0f} s") from None

    def _stop(self, inbox: queue.Queue, alive: Dict[int, _Link], links: Sequence[_Link]) -> int:
        """Answer STOP to every worker still serving (their last gradients are discarded)."""
        discarded = 0
        deadline = time.monotonic() + 2 * self.timeout + 5
        while alive and time.monotonic() < deadline:
            try:
                link, kind, info = inbox.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if kind == "grad":
                discarded += 1
                link.replies.put(STOP)
            elif kind == "dead":
                self._drop(link, info, alive)
                continue
            elif kind == "bye":
                self.left.append(link.rank)
            alive.pop(link.rank, None)
        for link in alive.values():       # past the deadline (cannot happen with live threads)
            link.replies.put(STOP)
        # the STOP messages leave from the serving threads: wait until they are sent, or the
        # process could exit (and close the sockets) with a STOP still unsent
        for link in links:
            if link.thread is not None:
                link.thread.join(timeout=2 * self.timeout + 5)
        return discarded


class Worker:
    """A worker rank: receives weights, computes a gradient at them, sends it (NOTE [async protocol]).

        worker = Worker(model.parameters(), master=0, timeout=30)
        def compute(k):                    # the k-th gradient (0-based), at the weights just received
            model.zero_grad(); loss = loss_fn(model(x_k), y_k); loss.backward(); return loss.item()
        worker.run(compute)                # until the master says STOP (or max_steps)

    The params are overwritten with each message's weights; their ``.grad`` is sent (None: zeros).
    """

    def __init__(self, params, *, master: int = 0, group=None, compression=None, weight_compression=None,
                 timeout: float = 60.0, connect_timeout: float = 300.0):
        if not dist.is_initialized():
            raise RuntimeError("fusedmf.asynchronous.Worker: torch.distributed is not initialised")
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("Worker: params is empty")
        self.master, self.group = master, group
        self.device = _comm_device(self.params, group, "Worker")
        self.timeout = _check_timeout(timeout)
        self.connect_timeout = _check_timeout(connect_timeout)
        self.grad_layout = FlatLayout(self.params, comm_dtype(compression))
        self.weight_layout = FlatLayout(self.params, comm_dtype(weight_compression, "weight_compression"))
        self._send_buf = self.grad_layout.buffer()
        self._recv_buf = self.weight_layout.buffer()
        self._zeros: Dict[int, Tensor] = {}

    def _send(self, header: Tensor, payload: Optional[Tensor], timeout: Optional[float] = None) -> None:
        to = _td(timeout or self.timeout)
        dist.isend(header, dst=self.master, group=self.group, tag=TAG_HEADER).wait(timeout=to)
        if payload is not None:
            dist.isend(payload, dst=self.master, group=self.group, tag=TAG_PAYLOAD).wait(timeout=to)

    def run(self, compute: Callable[[int], float], *, max_steps: Optional[int] = None) -> dict:
        """Serve until STOP (or ``max_steps`` gradients, then BYE). Returns {steps, losses, stopped}."""
        to = _td(self.timeout)
        header = torch.zeros(HEADER_LEN, dtype=torch.float64, device=self.device)
        losses: List[float] = []
        k = 0
        try:
            self._send(_header(HELLO, self.grad_layout.numel, len(self.params), self.grad_layout.signature(),
                               _DTYPE_CODE[self.grad_layout.dtype], _DTYPE_CODE[self.weight_layout.dtype], device=self.device), None,
                       timeout=self.connect_timeout)
            while True:
                # the first weights may take until the master is up (connect_timeout), later ones `timeout`
                dist.irecv(header, src=self.master, group=self.group, tag=TAG_HEADER).wait(
                    timeout=to if k else _td(self.connect_timeout))
                kind, weights_step = int(header[0]), float(header[1])
                if kind == STOP:
                    return {"steps": k, "losses": losses, "stopped": "master"}
                if kind != WEIGHTS:
                    raise RuntimeError(f"fusedmf.asynchronous.Worker: unexpected message kind {kind} from the master")
                dist.irecv(self._recv_buf, src=self.master, group=self.group, tag=TAG_PAYLOAD).wait(timeout=to)
                if max_steps is not None and k >= max_steps:
                    self._send(_header(BYE, k, device=self.device), None)
                    return {"steps": k, "losses": losses, "stopped": "max_steps"}
                with torch.no_grad():
                    for p, w in zip(self.params, self.weight_layout.views(self._recv_buf)):
                        p.copy_(w)
                loss = float(compute(k))
                grads = [p.grad if p.grad is not None else self._zero(p) for p in self.params]
                with torch.no_grad():
                    self.grad_layout.pack([g.detach() for g in grads], self._send_buf)
                self._send(_header(GRAD, k, loss, weights_step, device=self.device), self._send_buf)
                losses.append(loss)
                k += 1
        except RuntimeError as exc:
            if "fusedmf" in str(exc):
                raise
            raise ConnectionError(f"fusedmf.asynchronous.Worker: lost the master (rank {self.master}) after {k} "
                                  f"gradients: {str(exc).strip()[:300]}") from exc

    def _zero(self, p: Tensor) -> Tensor:
        z = self._zeros.get(id(p))
        if z is None:
            z = self._zeros[id(p)] = torch.zeros_like(p)
        return z
