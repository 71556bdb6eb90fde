"""Smoke run of benchmarks/local_sgd.py (2 gloo ranks, --quick): it runs, its replicas agree, and the
communication volume (measured by the telemetry, not timed) falls as H grows."""

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_local_sgd_benchmark_quick(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "local_sgd.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, f"local_sgd.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (path,) = glob.glob(os.path.join(str(tmp_path), "*.json"))
    with open(path) as f:
        result = json.load(f)
    assert os.path.exists(path.replace(".json", ".png"))
    assert result["machine"]["git"] and result["machine"]["command"]
    cases = {r["name"]: r for r in result["cases"]}
    assert set(cases) == {"fusedmf/distopt-fp16"} | {f"{impl}-H{h}" for impl in ("fusedmf/localsgd", "torch/postlocal")
                                                     for h in (1, 4, 16)}
    for name, r in cases.items():
        assert r["status"] == "ok", (name, r["reason"])
        if name.startswith("fusedmf/"):
            assert r["replicas_identical"], name
    base = cases["fusedmf/distopt-fp16"]["comm_bytes_per_step"]
    for h in (1, 4, 16):
        ours = cases[f"fusedmf/localsgd-H{h}"]["comm_bytes_per_step"]
        # the gradients' fp16 payload every H steps (padding is per slot, so equal whatever the buckets)
        assert abs(base / ours - h) < 1e-9, (h, base, ours)
        # torch sends fp32 params (4 bytes each), we fp16 differences (2 bytes, slots padded to 16 bytes)
        assert 1.9 < cases[f"torch/postlocal-H{h}"]["comm_bytes_per_step"] / ours <= 2.0, h
    assert base / cases["fusedmf/localsgd-H16"]["comm_bytes_per_step"] >= 10
    tr = result["training"]
    assert set(tr["test_accuracy"]) == {"sync", "post-local H=4", "post-local H=16"}
    assert tr["bytes_per_step"]["post-local H=16"] < tr["bytes_per_step"]["post-local H=4"] < tr["bytes_per_step"]["sync"]
