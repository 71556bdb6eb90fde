"""Smoke runs of the communication benchmarks (2 gloo ranks on CPU, --quick): they run, check the
replicas, and write JSON with the machine, the raw repeats and the comparisons."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, out_dir):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--out", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (path,) = [p for p in glob.glob(os.path.join(str(out_dir), "*.json")) if not p.endswith("_trace.json")]
    with open(path) as f:
        return json.load(f), proc.stdout


def test_comm_allreduce_quick(tmp_path):
    result, stdout = _run("comm_allreduce.py", tmp_path)
    assert result["config"]["world_size"] == 2 and result["config"]["backend"] == "gloo"
    assert result["machine"]["torch"] and result["machine"]["cpu_count"]
    names = {r["name"] for r in result["cases"]}
    assert names == {f"{impl}/{c}/cap25MB" for impl in ("fusedmf", "torch-style") for c in ("none", "fp16")}
    for r in result["cases"]:
        assert r["status"] == "ok" and len(r["repeats_s"]) == 2, r["name"]
        assert r["median_s"] == pytest.approx(sum(r["repeats_s"]) / 2, rel=1e-12), r["name"]  # of two repeats
        expected = 25_557_032 * (2 if "/fp16/" in r["name"] else 4)
        assert expected <= r["bytes_per_call"] < expected * 1.01, r["name"]    # payload (+ slot padding)
    assert "algbw GB/s" in stdout


def test_comm_train_step_quick(tmp_path):
    result, stdout = _run("comm_train_step.py", tmp_path)
    cases = {r["name"]: r for r in result["cases"]}
    assert set(cases) == {"ddp/allreduce/torch-sgd", "ddp/fp16_compress_hook/torch-sgd", "ddp/fp16_compress_hook/mfsgd",
                          "ddp/fusedmf-hook-fp16/mfsgd-in-hook", "fusedmf/distopt-fp16/mfsgd",
                          "fusedmf/distopt-none/mfsgd"}
    for name, r in cases.items():
        assert r["status"] == "ok" and r["replicas_identical"], f"{name}: {r['reason']}"
        assert len(r["repeats_s"]) == 4 and len(r["per_rank_s"]) == 2
    base, ours = cases["ddp/fp16_compress_hook/torch-sgd"], cases["fusedmf/distopt-fp16/mfsgd"]
    assert result["comparisons"]["distopt fp16 vs DDP fp16_compress_hook (speedup, same run)"] == \
        pytest.approx(base["median_s"] / ours["median_s"], rel=1e-12)
    used = result["backends_used"]["fusedmf/distopt-fp16/mfsgd"]["dopt"]    # the compiled kernels ran, no fallback
    assert (used["pack"], set(used["update"]), used["non_finite_check"]) == ("cpu", {"cpu"}, "cpu"), used
    tel = result["telemetry"][0]
    assert tel["summary"]["steps"] == 3
    last, n = tel["last_step"], result["config"]["num_params"]
    # the fp16 payload of every param (2 bytes each, slots padded), the sum of the buckets' payloads
    assert last["bytes_sent"] == sum(b["bytes"] for b in last["buckets"]) == tel["summary"]["bytes_per_step"]
    assert 2 * n <= last["bytes_sent"] < 2 * n * 1.01, (last["bytes_sent"], n)
    trace = glob.glob(os.path.join(str(tmp_path), "*_trace.json"))
    assert trace and {e["pid"] for e in json.load(open(trace[0]))["traceEvents"]} == {0, 1}
    assert "exposed communication" in stdout
