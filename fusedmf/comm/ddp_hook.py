"""A DDP communication hook with fusedmf's fused prescale/compress and, optionally, the fused update.

For users who keep torch's DistributedDataParallel:

    state, hook = fusedmf.comm.ddp_comm_hook(compression="fp16")            # replaces fp16_compress_hook
    ddp_model.register_comm_hook(state, hook)
    ...
    loss.backward(); opt.step(); opt.zero_grad()

torch's ``fp16_compress_hook`` makes three passes per bucket (cast to fp16, divide by the world size,
and after the allreduce cast back and copy); this hook makes one before the allreduce
(``fusedmf.functional.pack``: cast(grad / N), the division first so that fp16 cannot overflow in the
sum: fp16 sums of N unscaled gradients overflow) and one after it (the copy back into DDP's bucket).

With ``optimizer=`` (an MFSGD/MFAdam over the DDP model's parameters) the copy back is dropped too: the
hook runs the fused update itself, at the end of backward, reading each parameter's gradient as a
view of the reduced compressed buffer. Then do not call ``opt.step()``; ``opt.zero_grad()`` as usual.
All buckets are checked for inf/NaN first and the update is all-or-nothing, as in ``step()``. ``p.grad``
keeps the local (unreduced) gradient in that mode. Set ``state.grad_scale`` (a tensor) when the loss
was scaled; ``state.last_found_inf`` holds the last step's flag (for a loss scaler's update).
"""

# no `from __future__ import annotations`: DDP checks the hook's annotations as objects
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd import Variable

from .. import functional as F
from ..optim import MFOptimizerBase
from .compression import as_compressor


class FusedCommHookState:
    """State of :func:`fused_comm_hook`: process group, compression, reusable buffers, optional optimizer."""

    def __init__(self, *, process_group=None, compression="fp16",
                 optimizer: Optional[MFOptimizerBase] = None, backend: str = "auto"):
        compressor = as_compressor(compression)
        if optimizer is not None and not isinstance(optimizer, MFOptimizerBase):
            raise TypeError(f"optimizer must be a fusedmf MFSGD or MFAdam, got {type(optimizer).__name__}")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.compression = compressor.name
        self.comm_dtype = compressor.dtype
        self.optimizer = optimizer
        self.backend = backend
        self.grad_scale: Optional[torch.Tensor] = None
        self.last_found_inf: Optional[torch.Tensor] = None
        self.backends_used: Dict[str, object] = {}
        self._buffers: Dict[int, torch.Tensor] = {}
        self._pending: List[Tuple[torch.futures.Future, Dict[torch.Tensor, torch.Tensor], torch.Tensor]] = []
        self._saw_last = False
        self._queued = False

    def _buffer(self, index: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zeroed flat buffer for DDP bucket ``index``, padded as pack lays out one slot."""
        padded = F.pack_offsets([numel], torch.empty((), dtype=dtype).element_size())[1]
        buf = self._buffers.get(index)
        # DDP rebuilds its buckets after the first iteration: sizes can change once
        if buf is None or buf.numel() != padded or buf.dtype != dtype or buf.device != device:
            buf = torch.zeros(padded, dtype=dtype, device=device)
            self._buffers[index] = buf
        return buf

    @torch.no_grad()
    def _apply_update(self) -> None:
        """End of backward: wait for every bucket, check them all, then one all-or-nothing update."""
        pending, self._pending = self._pending, []
        saw_last, self._saw_last, self._queued = self._saw_last, False, False
        if not saw_last:
            raise RuntimeError("fusedmf DDP hook: backward ended before DDP handed over its last bucket; "
                               "the fused update needs every bucket of the step")
        torch.futures.wait_all([fut for fut, _, _ in pending])
        per_device: Dict[torch.device, list] = {}
        views: Dict[torch.Tensor, torch.Tensor] = {}
        for _, v, out in pending:
            per_device.setdefault(out.device, []).append(out)
            views.update(v)
        found, ran = F.found_inf_over(per_device, backend=self.backend)  # NOTE [one amp helper]
        if ran is not None:
            self.backends_used["non_finite_check"] = ran
        grad_scale = self.grad_scale
        if grad_scale is not None and not isinstance(grad_scale, torch.Tensor):
            grad_scale = torch.tensor(float(grad_scale), dtype=torch.float32)
        self.optimizer.step(grads=views.get, grad_scale=grad_scale, found_inf=found)
        self.backends_used["update"] = dict(self.optimizer.backends_used)
        self.last_found_inf = found


def fused_comm_hook(state: FusedCommHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: one pack launch (prescale by 1/N + cast) into a reused buffer, async allreduce,
    then either one copy back into DDP's bucket or (with ``state.optimizer``) the fused update."""
    grads_flat = bucket.buffer()
    dtype = state.comm_dtype or grads_flat.dtype
    out = state._buffer(bucket.index(), grads_flat.numel(), dtype, grads_flat.device)
    state.backends_used["pack"] = F.pack([grads_flat], out, scale=1.0 / state.world_size, backend=state.backend)
    fut = dist.all_reduce(out, op=dist.ReduceOp.SUM, group=state.process_group, async_op=True).get_future()

    if state.optimizer is None:
        def decompress(f: torch.futures.Future) -> torch.Tensor:
            grads_flat.copy_(f.value()[0][:grads_flat.numel()])
            return grads_flat
        return fut.then(decompress)

    # the gradients DDP hands over are views of its flat bucket: the same offsets and strides in `out`
    views = {}
    base = grads_flat.storage_offset()
    for p, g in zip(bucket.parameters(), bucket.gradients()):
        views[p] = out.as_strided(g.shape, g.stride(), out.storage_offset() + g.storage_offset() - base)
    state._pending.append((fut, views, out))
    state._saw_last = state._saw_last or bucket.is_last()
    if not state._queued:
        state._queued = True
        Variable._execution_engine.queue_callback(state._apply_update)

    def keep_local(_f: torch.futures.Future) -> torch.Tensor:
        return grads_flat          # p.grad stays the local gradient; the update already has the reduced one
    return fut.then(keep_local)


def ddp_comm_hook(*, process_group=None, compression="fp16", optimizer: Optional[MFOptimizerBase] = None,
                  backend: str = "auto"):
    """``(state, hook)`` for ``ddp_model.register_comm_hook(state, hook)``; see the module docstring."""
    return FusedCommHookState(process_group=process_group, compression=compression, optimizer=optimizer,
                              backend=backend), fused_comm_hook
