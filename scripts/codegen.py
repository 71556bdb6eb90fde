"""Codegen facts of the shipped CUDA kernels, read from the sm_90 cubins inside fusedmf/_C*.so.

Used by tests/test_codegen.py (the assertions) and runnable as a report:

    python scripts/codegen.py [--so PATH] [--json OUT]

prints, per multi_tensor_kernel instantiation, registers, stack frame, local-memory accesses, the
widths of the global loads and stores of the vector path, how many of its loads a thread issues
before any of its stores (loads_in_flight), and the FFMA instructions with the source line nvcc
attributes them to; --json writes the same with provenance (benchmarks/harness.py's
machine_info) for benchmarks/results/.

Tools (NOTE [codegen tools]): cuobjdump extracts the cubins and their resource usage from the
extension's fatbin, nvdisasm disassembles them with line information (-gi: the inline chain of every
instruction, innermost first; the build passes -lineinfo). cuobjdump -sass itself needs nvdisasm.
Looked up in this order: FUSEDMF_CUOBJDUMP / FUSEDMF_NVDISASM, the PyPI wheels nvidia-cuda-cuobjdump
and nvidia-cuda-nvdisasm (site-packages/nvidia/cu13/bin, installed by scripts/env.sh), PATH, then
$CUDA_HOME/bin and /usr/local/cuda/bin (the GPU machines: a toolkit, no network).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent

# Threads per block of every multi-tensor kernel (csrc/cuda/multi_tensor_apply.cuh kBlockSize, also
# its __launch_bounds__) and the sm_90 register file: 64 K 32-bit registers and at most 2048
# resident threads per SM, registers allocated per warp in units of 256 (8 per thread).
def _block_size() -> int:
    m = re.search(r"constexpr int kBlockSize = (\d+);", (ROOT / "csrc/cuda/multi_tensor_apply.cuh").read_text())
    return int(m.group(1)) if m else 512


BLOCK_SIZE = _block_size()
SM90_REGS_PER_SM = 65536
SM90_MAX_THREADS_PER_SM = 2048
REG_ALLOC_UNIT = 8
# One block per SM is the floor (a kernel above it cannot launch with BLOCK_SIZE threads): 128 at 512.
REG_CEILING = SM90_REGS_PER_SM // BLOCK_SIZE  # 128

# Source lines whose FFMA is the source's own fused multiply-add, not nvcc's contraction: madd()
# (__fmaf_rn), the sums of squares (fmaf), and the correctly rounded division and square root,
# whose expansions are FFMA sequences (__fdiv_rn / __fsqrt_rn, the *_rn helpers of update_math.h).
EXPLICIT_FMA_RE = re.compile(r"\b(__fmaf_rn|fmaf|__fmaf_r[nzdu]|__fdiv_rn|__fsqrt_rn)\s*\(")
# The vector path's accesses: load_pack, the non-finite check's own pack load, and store_pack's
# PTX stores (store_global_words).
VECTOR_ACCESS_RE = re.compile(r"reinterpret_cast<\s*(const\s+)?Pack<|st\.global\.v[24]\.b32")
HOT_KERNEL = "fusedmf::cuda::multi_tensor_kernel<"
# csrc/cuda/<family>.cu -> the kernels it defines (the cubin is named after its source file)
FAMILIES = ("mf_sgd", "mf_adam", "pack", "non_finite_check", "smega2", "average")


class ToolMissing(RuntimeError):
    pass


def _wheel_bin() -> List[Path]:
    """bin/ folders of the nvidia-cuda-* wheels in this interpreter's site-packages."""
    out = []
    for entry in sys.path:
        for sub in ("cu13", "cu12", "cuda_cuobjdump", "cuda_nvdisasm"):
            p = Path(entry) / "nvidia" / sub / "bin"
            if p.is_dir():
                out.append(p)
    return out


def find_tool(name: str) -> Optional[str]:
    """Path of cuobjdump / nvdisasm, or None (NOTE [codegen tools] in the module docstring)."""
    env = os.environ.get(f"FUSEDMF_{name.upper()}")
    if env:
        return env
    candidates = [p / name for p in _wheel_bin()]
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(Path(home) / "bin" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def tools() -> Dict[str, str]:
    found = {n: find_tool(n) for n in ("cuobjdump", "nvdisasm")}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise ToolMissing(
            f"{' and '.join(missing)} not found: install the PyPI wheels nvidia-cuda-cuobjdump and "
            f"nvidia-cuda-nvdisasm (scripts/env.sh does), or put a CUDA toolkit's bin/ on PATH or in CUDA_HOME")
    return found


def extension_path() -> str:
    import fusedmf._C as ext  # noqa: PLC0415 (only the report needs the extension)

    return ext.__file__


@dataclass
class Instr:
    offset: int
    text: str  # e.g. "@!P0 FFMA R9, -R16, R23, R27"
    opcode: str  # e.g. "FFMA", "LDG.E.128"
    file: Optional[str]  # innermost source location nvcc recorded
    line: Optional[int]
    target: bool = False  # a branch target (a `.L_x_N:` label precedes it): a basic block starts here


@dataclass
class Kernel:
    mangled: str
    name: str  # demangled
    family: str  # csrc/cuda/<family>.cu
    regs: Optional[int] = None
    stack: Optional[int] = None
    local: Optional[int] = None
    shared: Optional[int] = None
    instrs: List[Instr] = field(default_factory=list, repr=False)

    @property
    def op(self) -> str:
        """The Op template argument: `SgdOp<float, fusedmf::bf16, true, true>`."""
        m = re.search(r"\(anonymous namespace\)::(\w+<[^()]*?>) ?>\(", self.name)
        return m.group(1) if m else self.name

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for i in self.instrs if rx.fullmatch(i.opcode))

    def blocks_per_sm(self) -> int:
        regs = -(-self.regs // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
        return min(SM90_REGS_PER_SM // (regs * BLOCK_SIZE), SM90_MAX_THREADS_PER_SM // BLOCK_SIZE)


def _run(args: List[str], cwd: Optional[str] = None) -> str:
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r.stdout


def demangle(names: List[str]) -> Dict[str, str]:
    cxxfilt = shutil.which("c++filt") or find_tool("cu++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


_RES_FUNC = re.compile(r"^\s*Function (\S+):\s*$")
_RES_VALS = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_LOC = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_SECTION = re.compile(r"^\s*\.section\s+\.text\.(\S+?),")
# A subroutine of the toolkit inside a kernel's section, e.g. `$__internal_2_$__cuda_sm3x_div_rn_noftz_f32_slowpath:`
# (its instructions carry no line information of their own; nvdisasm repeats the last one).
_SUBROUTINE = re.compile(r"^\$__internal_\d+_\$(\S+):\s*$")
_LABEL = re.compile(r"^\s*\.L\w*:\s*$")
TOOLKIT = "<cuda toolkit>"


def _opcode(text: str) -> str:
    t = re.sub(r"^@!?U?P\w+\s+", "", text)
    return t.split()[0] if t else ""


def parse_res_usage(text: str) -> Dict[str, tuple]:
    out, func = {}, None
    for line in text.splitlines():
        m = _RES_FUNC.match(line)
        if m:
            func = m.group(1)
            continue
        m = _RES_VALS.search(line)
        if m and func:
            out[func] = tuple(int(x) for x in m.groups())
            func = None
    return out


def parse_disassembly(text: str) -> Dict[str, List[Instr]]:
    """nvdisasm -gi -c output -> instructions per function, each with its innermost source line (the
    first `//## File` line of the block that precedes it)."""
    funcs: Dict[str, List[Instr]] = {}
    cur: Optional[List[Instr]] = None
    loc, in_block, target = (None, None), False, False
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            loc, in_block, target = (None, None), False, False
            continue
        m = _SUBROUTINE.match(line)
        if m:
            loc, in_block, target = (TOOLKIT + " " + m.group(1), None), False, True
            continue
        if _LABEL.match(line):
            target = True
            continue
        if loc[0] is not None and loc[0].startswith(TOOLKIT):
            pass  # stays in the subroutine up to the next kernel section
        elif _LOC.match(line):
            m = _LOC.match(line)
            if not in_block:  # first line of a chain: the innermost location
                loc = (m.group(1), int(m.group(2)))
            in_block = True
            continue
        in_block = False
        m = _INSTR.match(line)
        if m and cur is not None:
            text_ = m.group(2)
            cur.append(Instr(int(m.group(1), 16), text_, _opcode(text_), loc[0], loc[1], target))
            target = False
    return funcs


def read_kernels(so: Optional[str] = None) -> List[Kernel]:
    """Every multi_tensor_kernel of the extension's sm_90 cubins."""
    so = so or extension_path()
    t = tools()
    res = parse_res_usage(_run([t["cuobjdump"], "-res-usage", "-arch", "sm_90", so]))
    kernels: List[Kernel] = []
    with tempfile.TemporaryDirectory(prefix="fusedmf-cubin-") as tmp:
        _run([t["cuobjdump"], "-xelf", "all", os.path.abspath(so)], cwd=tmp)
        cubins = sorted(Path(tmp).glob("*.sm_90.cubin"))
        if not cubins:
            raise RuntimeError(f"{so} has no sm_90 cubin (built without TORCH_CUDA_ARCH_LIST=9.0?)")
        for cubin in cubins:
            family = cubin.name.split(".")[0]
            funcs = parse_disassembly(_run([t["nvdisasm"], "-gi", "-c", str(cubin)]))
            names = demangle(list(funcs))
            for mangled, instrs in funcs.items():
                if not names[mangled].startswith("void " + HOT_KERNEL):
                    continue
                k = Kernel(mangled, names[mangled], family, instrs=instrs)
                if mangled in res:
                    k.regs, k.stack, k.shared, k.local = res[mangled]
                kernels.append(k)
    return kernels


_source_cache: Dict[str, List[str]] = {}


def source_line(path: Optional[str], line: Optional[int]) -> Optional[str]:
    if not path or not line:
        return None
    if path not in _source_cache:
        try:
            _source_cache[path] = Path(path).read_text().splitlines()
        except OSError:
            _source_cache[path] = []
    lines = _source_cache[path]
    return lines[line - 1] if 0 < line <= len(lines) else None


def contracted_ffma(k: Kernel) -> List[Instr]:
    """FFMA whose innermost source line is no explicit fused multiply-add (EXPLICIT_FMA_RE): nvcc
    contracted a separate multiply and add there. A line in a CUDA header is the toolkit's own code
    (the division's slow path) and counts as explicit, as do the toolkit's correctly rounded
    division and square-root subroutines (`..._div_rn_...`, `..._sqrt_rn_...`)."""
    bad = []
    for i in k.instrs:
        if not i.opcode.startswith("FFMA"):
            continue
        if i.file and i.file.startswith(TOOLKIT):
            if "_rn_" not in i.file:
                bad.append(i)
            continue
        src = source_line(i.file, i.line)
        if src is None:
            if i.file and not Path(i.file).resolve().is_relative_to(ROOT):
                continue  # toolkit header
            bad.append(i)  # no line information, or an unreadable project file: cannot vouch for it
        elif not EXPLICIT_FMA_RE.search(src):
            bad.append(i)
    return bad


def _on_vector_path(i: Instr) -> bool:
    if not i.opcode.startswith(("LDG", "STG")):
        return False
    src = source_line(i.file, i.line)
    return src is not None and VECTOR_ACCESS_RE.search(src) is not None


def vector_accesses(k: Kernel) -> Dict[str, int]:
    """Opcode counts of the global accesses that the vector path's source lines compiled to."""
    out: Dict[str, int] = {}
    for i in k.instrs:
        if _on_vector_path(i):
            out[i.opcode] = out.get(i.opcode, 0) + 1
    return out


# Instructions that end a straight-line run: control flow, and the warp / block synchronisation.
_RUN_END = re.compile(r"(BRA|BRX|JMP|JMX|CALL|RET|EXIT|BSSY|BSYNC|WARPSYNC|BAR|YIELD)(\..*)?")


def loads_in_flight(k: Kernel) -> int:
    """The most vector-path loads one thread issues in a straight-line run before any vector-path
    store: a run ends at a branch target, a branch, a call, an exit or a barrier. In the aligned loop
    of chunk_apply (NOTE [ILP-4]) that is kUnroll iterations' loads of every stream, all issued before
    either iteration's result is stored; a loop that kept one iteration in flight shows one
    iteration's worth. (A load the scheduler sinks below a store, or a branch inside the run, shows
    fewer: the count is a lower bound of what the hardware sees in flight.)"""
    best = cur = 0
    for i in k.instrs:
        if i.target:
            cur = 0
        if _RUN_END.fullmatch(i.opcode):
            cur = 0
        elif _on_vector_path(i):
            if i.opcode.startswith("STG"):
                cur = 0
            else:
                cur += 1
                best = max(best, cur)
    return best


def local_accesses(k: Kernel) -> List[Instr]:
    return [i for i in k.instrs if i.opcode.startswith(("LDL", "STL"))]


def _op_args(k: Kernel) -> List[str]:
    op = k.op
    return [a.strip() for a in op[op.index("<") + 1:op.rindex(">")].split(",")] if "<" in op else []


# Element types of the streams each Op's vector path loads and stores, from its template arguments
# (csrc/cuda/*.cu: load_vec / store_vec): "float", "fusedmf::bf16", "fusedmf::f16". Optional fp32
# streams appear when their bool argument is true; Adam, SMEGA2 and the averages always keep fp32 state.
def streams(k: Kernel) -> Optional[tuple]:
    a = _op_args(k)
    name = k.op.split("<")[0]
    t = lambda flag: flag == "true"  # noqa: E731
    f32 = "float"
    if name == "SgdOp" and len(a) == 4:  # <P, G, kUseMaster, kUseMomentum>
        p, g, m, u = a[0], a[1], t(a[2]), t(a[3])
        return [f32 if m else p, g] + [f32] * u, [f32] * u + [f32] * m + [p]
    if name == "AdamOp" and len(a) == 4:  # <P, G, kUseMaster, kAmsgrad>: m, v (and vmax with AMSGrad) fp32
        p, g, m, ams = a[0], a[1], t(a[2]), t(a[3])
        return [f32 if m else p, g, f32, f32] + [f32] * ams, [f32, f32] + [f32] * ams + [f32] * m + [p]
    if name == "Smega2Op" and len(a) == 3:  # <P, G, kUseMaster>: momentum, accumulator fp32
        p, g, m = a[0], a[1], t(a[2])
        return [f32 if m else p, g, f32, f32], [f32, f32] + [f32] * m + [p]
    if name == "EstimateOp" and len(a) == 3:  # <W, O, kUseMaster>: weights, momentum -> out
        return [a[0], f32], [a[1]]
    if name == "PackOp" and len(a) == 3:  # <G, O, kSumsq>
        return [a[0]], [a[1]]
    if name == "NonFiniteOp" and len(a) == 2:  # <T, kSumsq>
        return [a[0]], []
    if name == "DeltaOp" and len(a) == 2:  # <S, O>: source, consensus -> out
        return [a[0], f32], [a[1]]
    if name == "ApplyOp" and len(a) == 4:  # <A, P, kMaster, kUpdate>: avg, consensus -> consensus, master, param
        return [a[0], f32], [f32] * t(a[3]) + [f32] * t(a[2]) + [a[1]]
    return None  # an Op this table does not know: the test names it


def summary(k: Kernel) -> dict:
    ffma = [i for i in k.instrs if i.opcode.startswith("FFMA")]
    return {
        "family": k.family, "op": k.op, "regs": k.regs, "stack_bytes": k.stack, "local_bytes": k.local,
        "shared_bytes": k.shared, "blocks_per_sm_at_512": k.blocks_per_sm() if k.regs else None,
        "local_accesses": len(local_accesses(k)), "vector_accesses": vector_accesses(k),
        "vector_loads_in_flight": loads_in_flight(k),
        "ffma": len(ffma), "ffma_contracted": len(contracted_ffma(k)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", help="the extension (default: fusedmf._C of this interpreter)")
    ap.add_argument("--json", help="write the report (with provenance) to this file")
    a = ap.parse_args(argv)
    kernels = read_kernels(a.so)
    rows = [summary(k) for k in kernels]
    print(f"{'family':17s} {'op':55s} {'reg':>4s} {'stk':>4s} {'LDL/STL':>7s} {'blk/SM':>6s} "
          f"{'FFMA':>5s} {'contr':>5s} {'inflt':>5s}  vector accesses")
    for r in rows:
        print(f"{r['family']:17s} {r['op'][:55]:55s} {r['regs']:4d} {r['stack_bytes']:4d} {r['local_accesses']:7d} "
              f"{r['blocks_per_sm_at_512']:6d} {r['ffma']:5d} {r['ffma_contracted']:5d} {r['vector_loads_in_flight']:5d}  "
              + " ".join(f"{op}:{n}" for op, n in sorted(r["vector_accesses"].items())))
    if a.json:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import torch  # noqa: PLC0415
        from harness import machine_info  # noqa: PLC0415
        from launch_model import read_kunroll  # noqa: PLC0415

        record = {"bench": "codegen", "machine": machine_info(torch.device("cpu")),
                  "tools": {n: next((ln for ln in _run([p, "--version"]).splitlines() if "release" in ln), "?").strip()
                            for n, p in tools().items()},
                  "extension": os.path.relpath(a.so or extension_path(), ROOT), "block_size": BLOCK_SIZE,
                  "unroll": read_kunroll(),
                  "reg_ceiling": REG_CEILING,
                  "backends_used": ["cuda: the sm_90 SASS of fusedmf._C, read (not executed)"],
                  "kernels": rows}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
