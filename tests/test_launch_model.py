"""benchmarks/launch_model.py: its arithmetic against hand-computed numbers, and its replay
of the launcher's packing loop against the real loop of csrc/cuda/multi_tensor_apply.cuh, compiled
for the host with a recording launch (tests/cpp/launch_packing.cpp; no GPU, no nvcc)."""

import math
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import launch_model as lm  # noqa: E402

CHUNK = lm.CHUNK_SIZE


def test_limits_are_read_from_the_launcher_header():
    limits = lm.launch_limits()
    assert set(limits) == {(a, d) for a in (4096, 32764) for d in (1, 2, 4, 5, 6)}
    assert limits[(4096, 4)] == (48, 320)  # 48 tensors at depth 4


def test_meta_bytes_by_hand():
    # depth 4, 48 tensors, 320 blocks: 4*8*48 + 8*48 + (4 + 1)*320 = 1536 + 384 + 1600
    assert lm.meta_bytes(4, 48, 320) == 3520
    # past 256 tensors the tensor index is 2 bytes: 5*8*416 + 8*416 + 6*2048 = 16640 + 3328 + 12288
    assert lm.meta_bytes(5, 416, 2048) == 32256
    assert lm.meta_bytes(1, 1, 1) == 24  # 8 + 8 + 5 = 21, padded to 8


def test_every_limit_leaves_room_for_the_op():
    for (arg_bytes, depth), (tensors, blocks) in lm.launch_limits().items():
        headroom = arg_bytes - lm.meta_bytes(depth, tensors, blocks)
        assert headroom >= 96, (arg_bytes, depth, headroom)


def test_blocks_per_sm_by_hand():
    # 512 threads per block; registers per warp in units of 256: 65536 / (regs * 512) blocks
    assert lm.blocks_per_sm(32) == 4  # also the 2048-thread limit
    assert lm.blocks_per_sm(40) == 3
    assert lm.blocks_per_sm(46) == 2  # rounds to 48: 24576 per block
    assert lm.blocks_per_sm(64) == 2
    assert lm.blocks_per_sm(65) == 1  # rounds to 72: 36864 per block
    assert lm.blocks_per_sm(128) == 1


def test_packing_by_hand():
    small4 = (4096, 4)
    # 50 one-element tensors at 48 per launch
    assert [len(b) for b in lm.pack_launches([1] * 50, 4, 4096)] == [48, 2]
    # zero-size tensors take no slot, also as the last tensor
    assert [len(b) for b in lm.pack_launches([0, 1, 0] * 49 + [0], 4, 4096)] == [48, 1]
    # a tensor of 321 chunks and 5 elements: 320 blocks, then its last 2 (one full, one of 5)
    launches = lm.pack_launches([321 * CHUNK + 5], 4, 4096)
    assert [len(b) for b in launches] == [320, 2]
    assert launches[1] == [CHUNK, 5]
    # the 48th tensor fills the tensors at its last chunk: 47 one-chunk tensors and a 3-chunk one
    launches = lm.pack_launches([1] * 47 + [3 * CHUNK, 7], 4, 4096)
    assert [len(b) for b in launches] == [50, 1]
    assert lm.launch_limits()[small4] == (48, 320)


def test_bytes_and_floors_match_performance_md():
    numels = lm.resnet50_numels()
    assert (len(numels), sum(numels)) == (161, 25_557_032)
    floors = {r: lm.predict(numels, lm.RULES[r], lm.DESIGNS["after"], 650e-9)["floor_us"] for r in lm.RULES}
    # docs/performance.md: 20 B/param -> 119 us, mixed Adam 28 B/param -> 166 us (at 4.3 TB/s)
    assert lm.RULES["mf_sgd_mixed"].bytes_per_element == 20
    assert lm.RULES["mf_adam_mixed"].bytes_per_element == 28
    assert lm.RULES["mf_adam_fp32"].bytes_per_element == 4 * 4 + 3 * 4  # reads p, g, m, v; writes p, m, v
    assert round(floors["mf_sgd_mixed"]) == 119
    assert round(floors["mf_adam_mixed"]) == 166
    assert floors["mf_sgd_mixed"] == pytest.approx(25_557_032 * 20 / 4.3e12 * 1e6)


def test_simulated_launch_by_hand():
    rule = lm.RULES["mf_sgd_mixed"]  # 20 B per element
    x = CHUNK * 20
    # one block alone streams at its own (latency-bound) rate
    assert lm.simulate_launch([CHUNK], rule, 10, block_rate=1e9, bandwidth=1e12) == pytest.approx(x / 1e9)
    # many blocks share the bandwidth
    assert lm.simulate_launch([CHUNK] * 100, rule, 100, 1e9, 10e9) == pytest.approx(100 * x / 10e9)
    # one slot: blocks one after the other
    assert lm.simulate_launch([CHUNK, CHUNK], rule, 1, 1e9, 1e12) == pytest.approx(2 * x / 1e9)
    # a short block finishes, the long one then runs alone at its block rate:
    # both at 1e9 (2e9 <= bandwidth) until the short one ends, then the rest at 1e9
    assert lm.simulate_launch([CHUNK, CHUNK // 2], rule, 2, 1e9, 2e9) == pytest.approx(x / 1e9)


def test_prediction_arithmetic_by_hand():
    rule = lm.RULES["mf_sgd_mixed"]
    design = lm.Design("two iterations in flight", lm.LARGE_ARGS, 2, "after")   # the arithmetic, whatever kUnroll is
    # 2 iterations x 4 elements x (4 + 4 + 2) read bytes
    assert lm.bytes_in_flight_per_thread(rule, design) == 80
    assert lm.bytes_in_flight_per_thread(rule, lm.DESIGNS["before"]) == 40
    p = lm.predict([CHUNK], rule, design, latency_s=500e-9, bandwidth=1e15, launch_overhead_s=1e-6)
    # one block: 512 threads x 80 B / 500 ns of loads, times 20/10 for the writes alongside
    block_rate = 512 * 80 / 500e-9 * 2
    assert p["launches"] == 1
    assert p["time_us"] == pytest.approx((CHUNK * 20 / block_rate + 1e-6) * 1e6)


def test_resnet50_one_launch_per_rule_with_large_arguments():
    numels = lm.resnet50_numels()
    chunks = sum(math.ceil(n / CHUNK) for n in numels)
    for rule in lm.RULES.values():
        launches = lm.pack_launches(numels, rule.depth, lm.arg_bytes_for_driver(12010))
        assert len(launches) == 1 and len(launches[0]) == chunks
        small = lm.pack_launches(numels, rule.depth, lm.arg_bytes_for_driver(12000))
        max_tensors = lm.launch_limits()[(4096, rule.depth)][0]
        assert len(small) >= math.ceil(161 / max_tensors)
    assert len(lm.pack_launches(numels, 4, 4096)) == 4  # 4 launches at depth 4


# ---- the launcher's own loop, compiled for the host ---------------------------------------------


def _cuda_include():
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:
        CUDA_HOME = None
    for home in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    return None


@pytest.fixture(scope="module")
def packing_binary(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    include = _cuda_include()
    if cxx is None or include is None:
        pytest.skip(f"needs a C++ compiler ({cxx}) and the CUDA runtime headers ({include})")
    out = tmp_path_factory.mktemp("packing") / "launch_packing"
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wno-unknown-pragmas", f"-I{ROOT}/csrc", f"-I{include}",
           os.path.join(ROOT, "tests", "cpp", "launch_packing.cpp"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(out)


def _run_packing(binary, numels):
    proc = subprocess.run([binary], input="\n".join(map(str, numels)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = {}
    for line in proc.stdout.splitlines():
        key, depth, *blocks = line.split()
        table[(key, int(depth))] = [int(b) for b in blocks]
    return table


EDGE_CASES = {
    "resnet50": None,
    # more than 256 tensors (uint16 tensor index), zero-size ones, an empty last tensor
    "many_small": [3, 0, 65536, 65537] * 120 + [0],
    # one tensor crossing the 2048-block limit and the 320-block one several times
    "long": [7, 2100 * CHUNK + 3, 1, 0],
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_model_packs_like_the_launcher(packing_binary, case):
    numels = EDGE_CASES[case] or lm.resnet50_numels()
    table = _run_packing(packing_binary, numels)
    for arg_bytes in (4096, 32764):
        for depth in (1, 2, 4, 5, 6):
            model = [len(b) for b in lm.pack_launches(numels, depth, arg_bytes)]
            assert table[(str(arg_bytes), depth)] == model, (case, arg_bytes, depth)
    # multi_tensor_apply's own choice of limit by driver version, as the model picks it
    for driver in (12000, 12010, 13000):
        for depth in (1, 2, 4, 5, 6):
            model = [len(b) for b in lm.pack_launches(numels, depth, lm.arg_bytes_for_driver(driver))]
            assert table[(f"driver{driver}", depth)] == model, (case, driver, depth)


def test_chunk_apply_covers_every_element_once_with_kunroll_iterations_in_flight(packing_binary):
    """chunk_apply's aligned (unrolled), unaligned and tail paths on full, odd and tiny chunks."""
    proc = subprocess.run([packing_binary, "coverage"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "coverage failures 0" in proc.stdout
    # kUnroll (csrc/cuda/multi_tensor_apply.cuh) iterations loaded before computing
    assert f"aligned vector loads in flight {lm.read_kunroll()}" in proc.stdout
