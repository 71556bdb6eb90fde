"""Codegen of the shipped CUDA kernels, read from the sm_90 SASS inside fusedmf/_C*.so (no GPU needed).

What a GPU-less CI can still see of the device code: that the hot kernels (every
multi_tensor_kernel instantiation of csrc/cuda/{mf_sgd,mf_adam,pack,non_finite_check,smega2,average}.cu)
  - use no local memory (no spills, no stack frame),
  - move their vector path (load_pack / store_pack, NOTE [ILP-4]) as vector accesses, 128-bit for fp32,
  - keep kUnroll aligned iterations' loads in flight: all issued before the first of their stores,
  - contain no FFMA that nvcc contracted from a separate multiply and add (NOTE [fma placement]: every
    FFMA must sit on a source line that asks for one, __fmaf_rn / fmaf, or inside the correctly rounded
    division and square root),
  - fit the register file with two 512-thread blocks per SM, with the occupancy benchmarks/launch_model.py
    assumes.
The parsing lives in scripts/codegen.py (also the report: `python scripts/codegen.py --json ...`).

The tools are cuobjdump and nvdisasm (scripts/env.sh installs the PyPI wheels; a CUDA toolkit on
PATH / CUDA_HOME works too). Where they or the CUDA kernels are missing the tests skip with the reason,
except in CI (CI=true or FUSEDMF_REQUIRE_CODEGEN=1), where they fail.
FUSEDMF_CODEGEN_SO points the tests at another binary (an .so or a .o with an sm_90 fatbin).
"""

import os
import re
import sys

import pytest

from scripts import codegen

sys.path.insert(0, str(codegen.ROOT / "benchmarks"))
import launch_model as lm  # noqa: E402  (kUnroll, and the registers the model assumes)

REQUIRED = os.environ.get("FUSEDMF_REQUIRE_CODEGEN") == "1" or os.environ.get("CI", "").lower() in ("1", "true")

# Kernels allowed a stack frame, with the most bytes and local accesses seen and why. A kernel that
# no longer needs its entry fails test_known_spills_are_current, so the list cannot go stale.
KNOWN_LOCAL: dict = {
    # empty since the Adam kernels got __launch_bounds__(512, 2): until then
    # AdamOp<float, f16, false> kept its converted f16 grad on an 8-byte stack frame across the
    # calls of the correctly rounded division / square root in its unaligned path
}

VECTOR = re.compile(r"(LDG|STG)\.E(\.[A-Z0-9_]+)*\.(64|128)(\.[A-Z0-9_]+)*")


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"codegen checks are required here (CI / FUSEDMF_REQUIRE_CODEGEN=1): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def kernels():
    try:
        codegen.tools()
    except codegen.ToolMissing as e:
        _unavailable(str(e))
    so = os.environ.get("FUSEDMF_CODEGEN_SO")
    if not so:
        from fusedmf._backends import compiled_extension

        ext, why = compiled_extension()
        if ext is None:
            _unavailable(f"fusedmf._C is not built: {why}")
        if not ext.has_cuda():
            _unavailable("fusedmf._C was built without CUDA kernels (FUSEDMF_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0)")
        so = ext.__file__
    try:
        ks = codegen.read_kernels(so)
    except RuntimeError as e:
        _unavailable(str(e))
    assert ks, "no multi_tensor_kernel in the extension's sm_90 cubins"
    return ks


def _fail_list(items):
    return "\n  ".join(items)


def test_every_family_is_checked(kernels):
    if os.environ.get("FUSEDMF_CODEGEN_SO"):
        pytest.skip("FUSEDMF_CODEGEN_SO: checking a partial binary")
    assert {k.family for k in kernels} == set(codegen.FAMILIES)
    # the line table is what the contraction and vector checks read: -lineinfo must be on
    for k in kernels:
        assert any(i.line for i in k.instrs), f"{k.op}: no line information (built without -lineinfo?)"


def test_no_local_memory(kernels):
    bad = []
    for k in kernels:
        allowed_stack, allowed_accesses = KNOWN_LOCAL.get(k.op, (0, 0))
        n = len(codegen.local_accesses(k))
        if k.local != 0 or k.stack > allowed_stack or n > allowed_accesses:
            bad.append(f"{k.family} {k.op}: LOCAL {k.local} B, STACK {k.stack} B, {n} LDL/STL")
    assert not bad, "local memory (spills or a stack frame) in hot kernels:\n  " + _fail_list(bad)


def test_known_spills_are_current(kernels):
    ops = {k.op: k for k in kernels}
    for op in KNOWN_LOCAL:
        if op in ops:
            assert ops[op].stack > 0, f"{op} no longer uses a stack frame: remove it from KNOWN_LOCAL"


def _count(acc: dict, kind: str, bits: int) -> int:
    return sum(n for op, n in acc.items() if op.startswith(kind) and re.search(rf"\.{bits}(\.|$)", op))


def test_vector_path_uses_vector_accesses(kernels):
    """Every load_pack / store_pack is one vector access (NOTE [ILP-4]): 128-bit for an fp32 stream,
    at least 64-bit for a 16-bit one, and each stream of the Op has at least one."""
    bad = []
    for k in kernels:
        acc = codegen.vector_accesses(k)
        s = codegen.streams(k)
        if s is None:
            bad.append(f"{k.family} {k.op}: unknown Op, add its streams to scripts/codegen.py streams()")
            continue
        loads, stores = s
        scalar = {op: n for op, n in acc.items() if not VECTOR.fullmatch(op)}
        if scalar:
            bad.append(f"{k.family} {k.op}: scalar accesses on the vector path {scalar}")
        for kind, want in (("LDG", loads), ("STG", stores)):
            f32 = sum(1 for t in want if t == "float")
            have128 = _count(acc, kind, 128)
            have = have128 + _count(acc, kind, 64)
            if have128 < f32 or have < len(want):
                bad.append(f"{k.family} {k.op}: {kind} of {want} needs >= {f32} x 128-bit and >= {len(want)} "
                           f"vector accesses, has {acc}")
    assert not bad, "vector path lost its vector accesses:\n  " + _fail_list(bad)


def test_unrolled_loads_are_in_flight_together(kernels):
    """The aligned loop issues the loads of kUnroll iterations, every stream, before it stores either
    (NOTE [ILP-4]: a launch of few waves is bound by memory latency, so each thread
    must keep 2 x kIlp elements of every list in flight)."""
    unroll = lm.read_kunroll()
    assert unroll >= 2, f"kUnroll = {unroll}: two aligned iterations in flight are required"
    bad = []
    for k in kernels:
        s = codegen.streams(k)
        if s is None:
            continue  # test_vector_path_uses_vector_accesses names it
        want = unroll * len(s[0])
        have = codegen.loads_in_flight(k)
        if have < want:
            bad.append(f"{k.family} {k.op}: {have} vector loads before a store, want {unroll} x {len(s[0])}")
    assert not bad, "aligned iterations not in flight together:\n  " + _fail_list(bad)


def test_no_fp_contraction(kernels):
    bad = []
    for k in kernels:
        for i in codegen.contracted_ffma(k)[:3]:
            bad.append(f"{k.family} {k.op}: {i.text} at {i.file}:{i.line}: {codegen.source_line(i.file, i.line)!r}")
    assert not bad, "FFMA where the source rounds the multiply and the add separately:\n  " + _fail_list(bad)


def test_registers_fit_one_block_per_sm(kernels):
    """512 threads x regs <= 65536: at least one block per SM (the __launch_bounds__(512) contract; a
    kernel squeezed into it shows up as local memory above). The target is two blocks per SM (<= 64
    registers, 50% occupancy); scripts/codegen.py reports blocks/SM per kernel."""
    bad = [f"{k.family} {k.op}: {k.regs} registers" for k in kernels
           if k.regs is None or k.regs > codegen.REG_CEILING]
    assert not bad, f"over {codegen.REG_CEILING} registers per thread:\n  " + _fail_list(bad)


def test_launch_model_occupancy_is_the_built_kernels(kernels):
    """benchmarks/launch_model.py's "after" design models the shipped kernels: the registers it assumes
    give each rule's kernel the resident blocks per SM that the built cubin's registers give."""
    by_op = {k.op.replace("fusedmf::", ""): k for k in kernels}
    bad = []
    for rule in lm.RULES.values():
        k = by_op.get(rule.kernel)
        if k is None:
            bad.append(f"{rule.name}: no kernel {rule.kernel} in the extension")
            continue
        assumed = lm.REGISTERS["after"][rule.name]
        if lm.blocks_per_sm(assumed) != k.blocks_per_sm():
            bad.append(f"{rule.name}: the model assumes {assumed} registers ({lm.blocks_per_sm(assumed)} blocks/SM), "
                       f"{rule.kernel} has {k.regs} ({k.blocks_per_sm()} blocks/SM): update REGISTERS")
    assert not bad, "launch model out of date:\n  " + _fail_list(bad)


def test_two_blocks_per_sm(kernels):
    """Every kernel reaches the occupancy target of two 512-thread blocks per SM (<= 64 registers):
    with two iterations in flight one block per SM keeps no more bytes in flight than two blocks
    with one, and has half the warps to hide latency. An Op over the budget asks
    __launch_bounds__ for it (kMinBlocksPerSm), and test_no_local_memory checks that ptxas fits it
    without spills."""
    bad = sorted({f"{k.family} {k.op}: {k.regs} registers, {k.blocks_per_sm()} block(s)/SM" for k in kernels
                  if k.regs is not None and k.blocks_per_sm() < 2})
    assert not bad, "below two blocks per SM (give the Op kMinBlocksPerSm = 2):\n  " + _fail_list(bad)


# ---- the parsers, on fixed text (run everywhere, tools or not) ----------------------------------

_SASS = """\
	.section	.text._Z1kv,"ax",@progbits
_Z1kv:
	//## File "{src}", line 2 inlined at "{src}", line 9
	//## File "{src}", line 9
        /*0000*/                   FFMA R1, R2, R3, R4 ;
	//## File "{src}", line 3
        /*0010*/                   FFMA R5, R2, R3, R4 ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0030*/                   STL [R1], R5 ;
$__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath:
	//## File "{src}", line 3
        /*0040*/                   FFMA R6, R2, R3, R4 ;
"""

# Vector loads (line 2) and stores (line 3) in runs cut by a label, a branch and a store: the longest
# run of loads before a store is the three after .L_x_1 (the branch and the label cut the others).
_RUNS = """\
	.section	.text._Z1kv,"ax",@progbits
_Z1kv:
	//## File "{src}", line 2
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
.L_x_1:
        /*0020*/                   LDG.E.128 R12, desc[UR4][R2.64+0x20] ;
        /*0030*/                   LDG.E.64 R16, desc[UR4][R2.64+0x30] ;
	//## File "{src}", line 1
        /*0040*/                   FADD R4, R4, R8 ;
	//## File "{src}", line 2
        /*0050*/                   LDG.E.128 R12, desc[UR4][R2.64+0x40] ;
	//## File "{src}", line 3
        /*0060*/                   STG.E.128 desc[UR4][R2.64], R4 ;
	//## File "{src}", line 2
        /*0070*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0080*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0090*/               @P0 BRA `(.L_x_1) ;
        /*00a0*/                   LDG.E.128 R12, desc[UR4][R2.64+0x20] ;
        /*00b0*/                   EXIT ;
"""


def test_parsers_on_fixed_text(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("x\n  return __fmaf_rn(a, b, c);\n  return a * b + c;\n"
                   "  const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(p);\n" + "y\n" * 6)
    instrs = codegen.parse_disassembly(_SASS.format(src=src))["_Z1kv"]
    assert [(i.opcode, i.line) for i in instrs] == [("FFMA", 2), ("FFMA", 3), ("LDG.E.128", 3), ("STL", 3),
                                                    ("FFMA", None)]
    k = codegen.Kernel("_Z1kv", "void fusedmf::cuda::multi_tensor_kernel<1, x>()", "pack", instrs=instrs)
    # line 2 asks for the fma, the slow path is the toolkit's: only line 3's FFMA is a contraction
    assert [i.offset for i in codegen.contracted_ffma(k)] == [0x10]
    assert [i.opcode for i in codegen.local_accesses(k)] == ["STL"]
    assert codegen.vector_accesses(k) == {}  # line 3 is no Pack access
    res = codegen.parse_res_usage(" Function _Z1kv:\n  REG:88 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:4049\n")
    assert res == {"_Z1kv": (88, 8, 0, 0)}
    k.regs = 88
    assert k.blocks_per_sm() == 1
    k.regs = 64
    assert k.blocks_per_sm() == 2
    k.regs = 31
    assert k.blocks_per_sm() == 4


def test_loads_in_flight_on_fixed_text(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("x\n  const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(p);\n"
                   '  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p));\n')
    instrs = codegen.parse_disassembly(_RUNS.format(src=src))["_Z1kv"]
    assert [i.offset for i in instrs if i.target] == [0x20]
    k = codegen.Kernel("_Z1kv", "void fusedmf::cuda::multi_tensor_kernel<1, x>()", "pack", instrs=instrs)
    assert codegen.vector_accesses(k) == {"LDG.E.128": 7, "LDG.E.64": 1, "STG.E.128": 1}
    assert codegen.loads_in_flight(k) == 3
