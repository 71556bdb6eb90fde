"""Mutation runs of the CUDA launcher and kernels (the last run is recorded in
benchmarks/results/mutations-20261203/mutations.md): each mutation of csrc/cuda is applied, one
at a time, to a copy of the checkout (build/mutate/src, FUSEDMF_CUDA=0 FUSEDMF_CUDA_EMU=1: only the
emulated kernels and the CPU kernels they are compared with), rebuilt, the emulated suite
(`pytest tests -k cuda_emu`) run, and the mutation restored. Prints one table row per mutation.

    python scripts/mutate_kernels.py [NAME ...]      # with the interpreter that builds (.venv/bin/python)
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / "build" / "mutate" / "src"
MTA = "csrc/cuda/multi_tensor_apply.cuh"

# The emulated suite, the kernel-level files first (a mutation is usually caught there), stopping
# after MAXFAIL failures: the suite takes ~6 min on 2 cores; a surviving mutation runs all of it.
FILES = ("tests/test_launch_count.py", "tests/test_cuda_emu.py", "tests/test_binding.py", "tests")
MAXFAIL = 10

# (name, file, original text, mutated text, the diff in words)
MUTATIONS = [
    ("tail-off-by-one", MTA,
     "const int64_t n = left < kChunkSize ? left : kChunkSize;",
     "const int64_t n = left < kChunkSize ? left - 1 : kChunkSize;",
     "multi_tensor_kernel: a tensor's tail chunk updates one element too few (n = left - 1)"),
    ("drop-final-launch", MTA,
     "if (loc_block > 0) launch();  // always flush what is pending",
     "// (mutation: the pending blocks are not launched)",
     "multi_tensor_apply_with: the final flush `if (loc_block > 0) launch();` removed"),
    ("lose-carried-size", MTA,
     "meta.numels[0] = meta.numels[loc_tensor - 1];",
     "/* mutation: numels[0] not carried over */",
     "carry-over of a tensor split across launches: meta.numels[0] keeps the old tensor 0's size"),
    ("skip-alignment-check", MTA,
     "return reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T>) == 0;",
     "return true;",
     "ilp_aligned() always true: misaligned chunks take the vector path"),
    ("block-sum-no-barrier", MTA,
     "  if (lane == 0) warp_sums[warp] = x;\n  __syncthreads();",
     "  if (lane == 0) warp_sums[warp] = x;",
     "block_sum: the __syncthreads between the warp sums' stores and warp 0's loads removed"),
    ("non-finite-no-barrier", "csrc/cuda/non_finite_check.cu",
     "if (threadIdx.x == 0) already_set = *found_inf != 0.0f;\n    __syncthreads();",
     "if (threadIdx.x == 0) already_set = *found_inf != 0.0f;",
     "non_finite_check kernel: the __syncthreads after thread 0 reads *found_inf into shared memory removed"),
    # the two-iterations-in-flight loop of chunk_apply (kUnroll = 2)
    ("drop-odd-last-vector", MTA,
     "    if (i < n_vec) {  // the odd last vector of this thread",
     "    if (false) {  // (mutation: the odd last vector is skipped)",
     "chunk_apply: a thread's odd last aligned vector (after the unrolled pairs) is not updated"),
    ("second-iteration-stored-at-first", MTA,
     "      op.store_vec(f[1], i + stride);",
     "      op.store_vec(f[1], i);",
     "chunk_apply: the unrolled loop stores its second iteration over the first one's elements"),
]


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, **kw)


def copy_sources():
    if (DEST / "setup.py").exists() and os.environ.get("MUTATE_RECOPY", "0") != "1":
        return  # the copy of an earlier run (MUTATE_RECOPY=1 refreshes it from the checkout)
    DEST.mkdir(parents=True, exist_ok=True)
    sh(f"cd {ROOT} && git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C {DEST}", check=True)


def build():
    env = dict(os.environ, FUSEDMF_CUDA="0", FUSEDMF_CUDA_EMU="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    r = sh(f"cd {DEST} && nice -n 19 {sys.executable} setup.py -q build_ext --inplace", env=env,
           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stdout[-3000:] + r.stderr[-3000:])


def run_suite(log):
    env = dict(os.environ, TRITON_INTERPRET="1", FUSEDMF_REQUIRE_BACKENDS="cpu,cuda_emu")
    with open(log, "w") as f:
        r = sh(f"cd {DEST} && nice -n 19 {sys.executable} -m pytest {' '.join(FILES)} -v -p no:cacheprovider -k cuda_emu -rf"
               f" --maxfail={MAXFAIL}",
               env=env, stdout=f, stderr=subprocess.STDOUT)
    text = Path(log).read_text()
    failed = sorted(set(re.findall(r"^FAILED (\S+)", text, re.M)))
    summary = (re.findall(r"^=+ (.*(?:passed|failed).*) =+$", text, re.M) or ["?"])[-1]
    crashed = None
    if r.returncode < 0 or ("Fatal Python error" in text):
        started = re.findall(r"^(tests/\S+::\S+)", text, re.M)
        crashed = f"crashed ({'signal ' + str(-r.returncode) if r.returncode < 0 else 'fatal error'}) in {started[-1] if started else '?'}"
    return failed, summary, crashed


def main(names):
    copy_sources()
    t = time.time()
    build()
    print(f"baseline build {time.time() - t:.0f} s", flush=True)
    chosen = [m for m in MUTATIONS if not names or m[0] in names]
    for name, path, old, new, words in chosen:
        f = DEST / path
        src = f.read_text()
        assert src.count(old) == 1, (name, src.count(old))
        f.write_text(src.replace(old, new))
        try:
            t = time.time()
            build()
            b = time.time() - t
            t = time.time()
            failed, summary, crashed = run_suite(ROOT / "build" / "mutate" / f"{name}.log")
            print(f"| {name} | {words} | {crashed or ''} {' '.join(failed)} | {len(failed)} | {summary} | build {b:.0f} s, tests {time.time() - t:.0f} s |",
                  flush=True)
        finally:
            f.write_text(src)
    build()  # restored


if __name__ == "__main__":
    main(sys.argv[1:])
