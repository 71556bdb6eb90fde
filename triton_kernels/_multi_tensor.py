"""Host side of the multi-tensor launcher: input validation, cached tables, launch.

NOTE [multi-tensor tables] (see _common.py) describes what the kernels read. This module checks
every input before anything is launched (messages name the list and the index), builds the tables
for a set of tensors once and caches them, and launches one kernel per call over all tensors.

A tensor table is keyed by (device, BLOCK, every tensor's element count and address) and a block
table by the element counts (and BLOCK) alone: their contents are functions of exactly those keys, so a hit is
correct even when new tensors sit at the old addresses. Building happens on the host (torch CPU
ops) and reaches the device by a non-blocking copy from pinned memory, so it never synchronises
the GPU. Steady-state training steps (the same parameters, gradients and states every step) only
look the key up; if the grads move every step (zero_grad(set_to_none=True) without a flat grad
buffer), only the tensor table (NCOLS int64 per tensor) is rebuilt and copied.

CUDA graphs: run one step before capture (as for any Triton kernel, which also compiles on first
use); the captured launches then read the cached tables, the scalar vector, inv_grad_scale and
found_inf from device memory, so replaying the graph after updating those tensors is correct.
"""

from __future__ import annotations

import collections
import itertools
import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton.language as tl

# Elements per program and warps per program: 8 elements per thread, two 4-element vector
# accesses per tensor (NOTE [four elements per thread]). Chosen from the sm_90 compile (ptxas -v,
# no GPU was available to time it): MF-Adam with fp16 params + fp32 masters needs 64 registers,
# so 4 programs (32 warps) fit per SM with ~128 KiB of loads in flight per SM; BLOCK 2048 with
# 4 warps needs 128 registers (half the occupancy), 4096 with 8 warps 178. Re-measure on the target
# GPU before changing.
# Under TRITON_INTERPRET=1 a program costs ~5-10 ms of Python whatever its size (the interpreter
# re-patches triton.language on every @triton.jit call), so CPU runs use larger blocks; the kernels
# are generic in BLOCK and the tests exercise block and tail boundaries at several sizes.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK_SIZE = 16384 if INTERPRETING else 2048
NUM_WARPS = 8
# A launch never has more programs than this (CUDA's grid.x limit). Tests lower it to exercise the
# split into several launches.
MAX_BLOCKS_PER_LAUNCH = 2**31 - 1
# Distinct tensor sets whose tables are kept (a few per optimizer: one per param group and dtype).
TABLE_CACHE_SIZE = 64

TORCH_TO_TL = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}
LOW_OR_FULL = (torch.float32, torch.float16, torch.bfloat16)
FP32_ONLY = (torch.float32,)


class InputError(ValueError, RuntimeError):
    """Invalid arguments. A ValueError, and a RuntimeError like the compiled binding's TORCH_CHECK."""


def _names(dtypes) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def _is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same flat element order: equal strides on every dimension longer than 1."""
    sa, sb = a.stride(), b.stride()
    return sa == sb or all(x == y for x, y, n in zip(sa, sb, a.shape) if n != 1)


class TensorList:
    """One list argument: its name, tensors, whether it may be empty, allowed dtypes."""

    __slots__ = ("name", "tensors", "optional", "dtypes")

    def __init__(self, name: str, tensors: Sequence[torch.Tensor], dtypes: Tuple[torch.dtype, ...],
                 optional: bool = False):
        self.name, self.tensors, self.dtypes, self.optional = name, tensors, dtypes, optional


def check_update_inputs(op: str, lists: List[TensorList], scalars: torch.Tensor, num_scalars: int,
                        inv_grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]):
    """Validate an update call before anything is launched.

    Returns None for a no-op (empty lists), else (device, dtypes, rows): the dtype of each list
    (None for an empty optional list) and, for every non-empty tensor tuple, rows[k] = (numel,
    address of the tensor in each list, 0 for an empty list). lists[0] are the params: the other
    lists must match them index by index.

    The checks run as a few list comprehensions (a training step validates hundreds of tensors);
    only when one fails does _explain() walk the lists again to name the offending list and index.
    """
    head = lists[0]
    n = len(head.tensors)
    for lst in lists:
        if not isinstance(lst.tensors, (list, tuple)):
            raise InputError(f"{op}: {lst.name} must be a list of tensors, got {type(lst.tensors).__name__}")
        if len(lst.tensors) != n and not (lst.optional and len(lst.tensors) == 0):
            allowed = f"{n} (or 0)" if lst.optional else f"{n}"
            raise InputError(f"{op}: {lst.name} has {len(lst.tensors)} tensors but {head.name} has {n}; "
                             f"expected {allowed}")
    if n == 0:
        return None
    try:
        checked = _validate_fast(lists)
    except Exception:  # e.g. a non-tensor element or a sparse tensor: explained below
        checked = None
    if checked is None:
        _explain(op, lists)
        raise InputError(f"{op}: invalid tensor lists")  # _explain() raises first; kept as a safety net
    device, dtypes, rows = checked
    _check_scalar_vector(op, scalars, num_scalars, device)
    check_device_scalar(op, "inv_grad_scale", inv_grad_scale, device)
    check_device_scalar(op, "found_inf", found_inf, device)
    return device, dtypes, rows


def _validate_fast(lists: List[TensorList]):
    """(device, dtypes, rows) if every check passes, else None."""
    params = lists[0].tensors
    device = params[0].device
    shapes = [t.shape for t in params]
    strides = [t.stride() for t in params]
    numels = [t.numel() for t in params]
    if not all([t.is_contiguous() for t in params]):
        if not all(_is_non_overlapping_and_dense(t) for t, k in zip(params, numels) if k):
            return None
    dtypes, columns = [], []
    for lst in lists:
        tensors = lst.tensors
        if not tensors:
            dtypes.append(None)
            columns.append(itertools.repeat(0))
            continue
        dtype = tensors[0].dtype
        if dtype not in lst.dtypes:
            return None
        if any([t.dtype is not dtype or t.device != device for t in tensors]):
            return None
        if tensors is not params:
            if [t.shape for t in tensors] != shapes:
                return None
            if [t.stride() for t in tensors] != strides and not all(
                    _same_layout(t, p) for t, p, k in zip(tensors, params, numels) if k):
                return None
        dtypes.append(dtype)
        columns.append([t.data_ptr() for t in tensors])
    rows = [row for row in zip(numels, *columns) if row[0]]  # zero-size tensors are skipped
    return device, dtypes, rows


def _explain(op: str, lists: List[TensorList]) -> None:
    """Raise an InputError naming the first offending list and index."""
    head = lists[0]
    dtypes = []
    for lst in lists:
        if not len(lst.tensors):
            dtypes.append(None)
            continue
        t0 = lst.tensors[0]
        if not isinstance(t0, torch.Tensor):
            raise InputError(f"{op}: {lst.name}[0] is a {type(t0).__name__}, not a tensor")
        if t0.dtype not in lst.dtypes:
            raise InputError(
                f"{op}: {lst.name}[0] has dtype {t0.dtype}; the Triton backend supports params "
                f"{_names(LOW_OR_FULL)}, grads {_names(LOW_OR_FULL)} (independently of the params), "
                f"and {_names(FP32_ONLY)} states and master weights; {lst.name} must be {_names(lst.dtypes)}")
        dtypes.append(t0.dtype)
    device = head.tensors[0].device
    for i, p in enumerate(head.tensors):
        for lst, dtype in zip(lists, dtypes):
            if dtype is None:
                continue
            t = lst.tensors[i]
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{op}: {lst.name}[{i}] is a {type(t).__name__}, not a tensor")
            if t.device != device:
                raise InputError(f"{op}: {lst.name}[{i}] is on {t.device} but {head.name}[0] is on {device}; "
                                 f"all tensors of one call must be on one device")
            if t.dtype != dtype:
                raise InputError(f"{op}: {lst.name}[{i}] has dtype {t.dtype} but {lst.name}[0] has {dtype}; "
                                 f"dtypes must be uniform within a list")
            if t.layout != torch.strided:
                raise InputError(f"{op}: {lst.name}[{i}] has layout {t.layout}; only strided tensors are supported")
            if t.shape != p.shape:
                raise InputError(f"{op}: {lst.name}[{i}] has shape {list(t.shape)} but {head.name}[{i}] has "
                                 f"{list(p.shape)}")
        if p.numel() == 0:
            continue
        if not _is_non_overlapping_and_dense(p):
            raise InputError(f"{op}: {head.name}[{i}] (shape {list(p.shape)}, strides {list(p.stride())}) is not "
                             f"dense and non-overlapping; the kernels treat each tensor as flat memory")
        for lst, dtype in zip(lists, dtypes):
            if dtype is not None and not _same_layout(lst.tensors[i], p):
                raise InputError(f"{op}: {lst.name}[{i}] has strides {list(lst.tensors[i].stride())} but "
                                 f"{head.name}[{i}] has {list(p.stride())}; every tensor of a tuple must share "
                                 f"the param's layout")


def _check_scalar_vector(op: str, scalars, num_scalars: int, device: torch.device) -> None:
    if not isinstance(scalars, torch.Tensor):
        raise InputError(f"{op}: scalars must be a float32 tensor of {num_scalars} values on {device}, "
                         f"got {type(scalars).__name__}")
    if scalars.dtype != torch.float32 or scalars.numel() != num_scalars or scalars.device != device:
        raise InputError(f"{op}: scalars must be a float32 tensor of {num_scalars} values on {device}, got "
                         f"{scalars.dtype} of shape {list(scalars.shape)} on {scalars.device}")
    if scalars.dim() > 1 or (scalars.dim() == 1 and scalars.stride(0) != 1):
        raise InputError(f"{op}: scalars must be a contiguous 1-D tensor, got shape {list(scalars.shape)} "
                         f"and strides {list(scalars.stride())}")


def check_device_scalar(op: str, name: str, t: Optional[torch.Tensor], device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != 1 or t.device != device:
        what = (f"{t.dtype} of shape {list(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
                else type(t).__name__)
        raise InputError(f"{op}: {name} must be a 1-element float32 tensor on {device}, got {what}")


class _DeviceTable:
    """An int64 table copied to the device, with the stream it was allocated on."""

    __slots__ = ("data", "stream")

    def __init__(self, host: torch.Tensor, device: torch.device):
        if device.type == "cuda":
            # Pinned source + non_blocking: no host-device synchronisation. The caching host
            # allocator keeps the pinned buffer alive until the copy has run.
            self.data = host.pin_memory().to(device, non_blocking=True)
            self.stream = torch.cuda.current_stream(device)
        else:
            self.data = host.to(device)
            self.stream = None


class Tables:
    """What one launch reads (NOTE [multi-tensor tables]): the tensor table of a tensor set and
    the block table of its element counts."""

    __slots__ = ("tensors", "blocks", "num_blocks", "block", "aligned")

    def __init__(self, tensors: _DeviceTable, blocks: _DeviceTable, num_blocks: int, block: int, aligned: bool):
        self.tensors, self.blocks = tensors, blocks
        self.num_blocks, self.block, self.aligned = num_blocks, block, aligned

    @property
    def tensor_table(self) -> torch.Tensor:
        return self.tensors.data

    @property
    def block_table(self) -> torch.Tensor:
        return self.blocks.data


# Two caches. Block tables depend only on the element counts, so they survive tensors moving
# (e.g. grads reallocated by zero_grad(set_to_none=True) land at new addresses): then only the
# small tensor table (NCOLS int64 per tensor) is rebuilt and copied, still without a sync.
_TABLES: "collections.OrderedDict[tuple, Tables]" = collections.OrderedDict()
_BLOCKS: "collections.OrderedDict[tuple, Tuple[_DeviceTable, int]]" = collections.OrderedDict()
_STATS = {"builds": 0, "block_builds": 0, "hits": 0}


def table_cache_stats() -> dict:
    """{"builds": tensor tables built, "block_builds": block tables built, "hits": calls served
    entirely from the cache, "entries": cached tensor sets}."""
    return dict(_STATS, entries=len(_TABLES))


def clear_table_cache() -> None:
    _TABLES.clear()
    _BLOCKS.clear()


def _lru_get(cache: collections.OrderedDict, key):
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _lru_put(cache: collections.OrderedDict, key, value) -> None:
    cache[key] = value
    while len(cache) > TABLE_CACHE_SIZE:
        cache.popitem(last=False)


def get_tables(device: torch.device, rows: List[tuple], dtypes: Sequence[Optional[torch.dtype]],
               block: Optional[int] = None) -> Tables:
    """Tables for ``rows`` ((numel, address per list) per tensor tuple); ``dtypes`` gives each
    address column's dtype (None for an absent list, whose addresses are 0)."""
    block = int(block or BLOCK_SIZE)
    # NOTE [four elements per thread]: a column is vector-accessible if its addresses are
    # multiples of 4 elements.
    align = tuple(4 * d.itemsize if d is not None else 1 for d in dtypes)
    key = (device, block, align, tuple(rows))
    tables = _lru_get(_TABLES, key)
    if tables is not None:
        _STATS["hits"] += 1
        return tables
    ncols = len(rows[0])
    numels = tuple(row[0] for row in rows)
    block_key = (device, block, ncols, numels)
    blocks = _lru_get(_BLOCKS, block_key)
    if blocks is None:
        blocks = _build_block_table(device, numels, ncols, block)
        _lru_put(_BLOCKS, block_key, blocks)
        _STATS["block_builds"] += 1
    aligned = all(addr % a == 0 for row in rows for addr, a in zip(row[1:], align))
    tensors = _DeviceTable(torch.tensor(rows, dtype=torch.int64).reshape(-1), device)
    tables = Tables(tensors, blocks[0], blocks[1], block, aligned)
    _lru_put(_TABLES, key, tables)
    _STATS["builds"] += 1
    return tables


def _build_block_table(device: torch.device, numels: tuple, ncols: int, block: int):
    """[row offset of the tensor, first element] per block of every tensor, in tensor order."""
    counts = (torch.tensor(numels, dtype=torch.int64) + (block - 1)) // block
    num_blocks = int(counts.sum())
    first_block = torch.cumsum(counts, 0) - counts
    row_offset = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64) * ncols, counts)
    start = (torch.arange(num_blocks, dtype=torch.int64) - torch.repeat_interleave(first_block, counts)) * block
    return _DeviceTable(torch.stack([row_offset, start], 1).reshape(-1), device), num_blocks


def launch(kernel, tables: Tables, args: tuple, meta: dict, *, enable_fp_fusion: bool) -> None:
    """One launch (more only past MAX_BLOCKS_PER_LAUNCH programs) over every block of ``tables``.

    ``enable_fp_fusion`` is required (NOTE [explicit fp fusion] in _common.py): whether the compiler
    may contract a * b + c into one fma changes the rounding, so each kernel states its choice
    rather than inheriting Triton's default (TRITON_DEFAULT_FP_FUSION, whose value changes between
    releases).
    """
    device = tables.tensor_table.device
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        for table in (tables.tensors, tables.blocks):
            if stream != table.stream:
                # Allocated on another stream: keep the allocator from reusing the memory (after
                # a cache eviction) before this stream's kernels have read it.
                table.data.record_stream(stream)
        guard = torch.cuda.device(device)
    else:
        guard = _NULL_GUARD
    with guard:
        for lo in range(0, tables.num_blocks, MAX_BLOCKS_PER_LAUNCH):
            count = min(MAX_BLOCKS_PER_LAUNCH, tables.num_blocks - lo)
            block_table = tables.block_table if lo == 0 else tables.block_table[2 * lo:]
            kernel[(count,)](tables.tensor_table, block_table, *args,
                             ALIGNED=tables.aligned, BLOCK=tables.block, num_warps=NUM_WARPS,
                             enable_fp_fusion=bool(enable_fp_fusion), **meta)


class _NullGuard:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL_GUARD = _NullGuard()
