"""@triton.jit helpers shared by every kernel: table look-ups, loads/stores with exact casts.

NOTE [exact bf16 casts]
fp32 -> bf16 is written here as integer arithmetic (round to nearest, ties to even, NaN -> 0x7FC0),
exactly c10::BFloat16's round_to_nearest_even, and bf16 -> fp32 as a 16-bit shift. On a GPU
``x.to(tl.bfloat16)`` would round correctly too (cvt.rn.bf16.f32), but Triton's interpreter
(TRITON_INTERPRET=1, how CI runs these kernels) truncates toward zero instead
(triton/runtime/interpreter.py::_convert_float with rounding_mode None), so the builtin cast would
make the CPU tests pass on code that rounds differently from torch's ``.to()``. The integer form
costs four integer ops per element in a memory-bound kernel and is one code path on both.
fp32 -> fp16 uses the builtin cast: cvt.rn.f16.f32 on the GPU, numpy's (also RNE) in the interpreter.

NOTE [multi-tensor tables]
One launch covers every tensor of a call. The host (_multi_tensor.py) builds two int64 tables on
the device and caches them:
  tensor table, one row of NCOLS per non-empty tensor tuple i (cached per set of addresses):
      [numel_i, address of list 0 tensor i, address of list 1 tensor i, ...]  (0 for absent lists)
  block table, two entries per program (cached per set of element counts):
      [row offset of its tensor (i * NCOLS), first element of its block]
A program reads its two entries at ``block_table + 2 * program_id``, then its row, turns the
addresses into typed pointers (int64 -> pointer cast) and updates BLOCK consecutive elements of the
flat memory of its tensors. Full blocks take an unmasked path so that the compiler can use vector
accesses when every address is aligned to 4 elements (ALIGNED, decided on the host); only the last
block of a tensor is masked. The interpreter supports the int64 -> pointer cast on CPU tensors
(their addresses are real host addresses), so CI runs this same path.

NOTE [explicit fp fusion]
Every launch states whether the compiler may contract ``a * b + c`` into one fused multiply-add
(the launch option ``enable_fp_fusion``; mt.launch requires it). Left to Triton, the choice is
TRITON_DEFAULT_FP_FUSION, whose default Triton announces will change from enabled to disabled,
and an enabled choice lets LLVM and ptxas pick which products to fuse. Every kernel here launches
with fp fusion disabled (FP_FUSION below) and writes ``tl.fma`` exactly where the specification
rounds once: reference.py runs on torch's CPU kernels, which fuse ``t.add(o, alpha=a)``,
``t.lerp(e, w)`` and ``t.addcmul(a, b, value=s)`` on CPUs with FMA (NOTE [fma placement] in
csrc/update_math.h) and round everything else (mul, div, sqrt, add of two tensors, addcdiv)
separately. Disabled, the compiled code carries the IEEE round-to-nearest forms of each operation
(``mul.rn.f32`` / ``add.rn.f32`` in PTX, which ptxas may not fuse either), so a GPU rounds as the
CUDA and CPU backends do. Kernels without a multiply-add in their math (pack_delta_,
apply_average_) and the sums of squares (non_finite_check_, pack_: the reference sums in float64,
so any order is an approximation) take the same choice: the interpreter (TRITON_INTERPRET=1, how
CI runs them) rounds every product and sum, and so the GPU computes what CI tests. (The interpreter
evaluates ``tl.fma`` as a product and a sum, each rounded; there the fused operations differ from
the reference by a few fp32 ulps.)
"""

import triton
import triton.language as tl

# NOTE [explicit fp fusion]: the launch options of every kernel (passed to mt.launch).
FP_FUSION = dict(enable_fp_fusion=False)

# Column of the element count in every tensor-table row; the tensor addresses follow it.
COL_NUMEL = tl.constexpr(0)


@triton.jit
def _load_f32(row_ptr, COL: tl.constexpr, start, offs, mask, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
              MASKED: tl.constexpr):
    """Load the block of the tensor whose address is in column COL of the row (masked only for the
    last block of a tensor) and widen it to fp32.

    Loads and stores compute their own pointer rather than calling a helper: under the interpreter
    every @triton.jit call costs ~0.5 ms of Python (triton.language is re-patched), about half of
    a program's time, while on the GPU the extra scalar load of the address hits L1.
    """
    ptr = tl.load(row_ptr + COL).to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:
        # NOTE [four elements per thread]: every address is a multiple of 4 elements (checked on
        # the host) and ``start`` a multiple of BLOCK; the compiler cannot know it for a pointer
        # read from memory, so say it. Exactly 4 elements, not 16 bytes: fp32 stores are capped
        # at 4 per thread (128 bits), and an fp16/bf16 tensor hinted at 16 bytes would get 8 per
        # thread, a different layout, and a shared-memory layout conversion (a barrier) between
        # the two. With one layout, fp32 moves as 128-bit and fp16/bf16 as 64-bit accesses.
        ptr = tl.multiple_of(ptr, DTYPE.primitive_bitwidth // 2)
    if MASKED:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + offs)
    if DTYPE == tl.bfloat16:
        # NOTE [exact bf16 casts]
        y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _store_f32(row_ptr, COL: tl.constexpr, start, offs, x, mask, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
               MASKED: tl.constexpr):
    """Round an fp32 block to DTYPE (to nearest, ties to even) and store it into the block of the
    tensor in column COL."""
    ptr = tl.load(row_ptr + COL).to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:
        ptr = tl.multiple_of(ptr, DTYPE.primitive_bitwidth // 2)  # NOTE [four elements per thread]
    if DTYPE == tl.bfloat16:
        # NOTE [exact bf16 casts]: round to nearest even on the bits, NaN -> canonical quiet NaN.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        y = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    if MASKED:
        tl.store(ptr + offs, y, mask=mask)
    else:
        tl.store(ptr + offs, y)
