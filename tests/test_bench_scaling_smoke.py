"""Smoke runs of benchmarks/throughput.py and benchmarks/scaling.py (--quick, CPU) and of the
``python -m fusedmf.bench predict`` CLI: they run and write JSON with sane values."""

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, out_dir=None, timeout=120):
    cmd = [sys.executable] + args + (["--out", str(out_dir)] if out_dir else [])
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if out_dir is None:
        return None, proc.stdout
    (path,) = glob.glob(os.path.join(str(out_dir), "*.json"))
    with open(path) as f:
        return json.load(f), proc.stdout


def test_throughput_quick(tmp_path):
    res, out = _run([os.path.join("benchmarks", "throughput.py"), "--quick", "--device", "cpu"], tmp_path)
    assert res["bench"] == "throughput" and res["machine"]["torch"] and res["config"]["device"] == "cpu"
    cases = {r["name"]: r for r in res["cases"]}
    assert {"torch-sgd-foreach/b2", "mfsgd/b2", "torch-sgd-fused/b4", "mfsgd/b4"} <= set(cases)
    for r in res["cases"]:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":
            assert r["images_per_s"] > 0 and len(r["repeats_s"]) == 3
            parts = r["forward_median_s"] + r["backward_median_s"] + r["optimizer_median_s"]
            assert 0 < parts < 3 * r["median_s"]
    assert cases["mfsgd/b2"]["status"] == "ok"
    tl = res["timeline"]["timeline"]
    assert tl["forward_s"] > 0 and tl["backward_s"] > 0 and tl["optimizer_s"] > 0
    assert len(tl["params"]) == res["timeline"]["num_tensors"] and tl["buckets"]
    assert all(0 <= p["ready_s"] <= tl["backward_s"] for p in tl["params"])
    assert sum(b["nbytes"] for b in tl["buckets"]) >= 2 * res["timeline"]["num_params"]      # fp16 payload
    assert "img/s" in out and "timeline" in out


def test_scaling_quick(tmp_path):
    res, out = _run([os.path.join("benchmarks", "scaling.py"), "--quick"], tmp_path)
    assert res["bench"] == "scaling" and res["config"]["world_size"] == 2
    pts = res["measured"]["points"]
    assert [p["n"] for p in pts] == [1, 2] and pts[0]["efficiency"] == 1.0
    assert 0 < pts[1]["efficiency"] < 2 and pts[1]["step_s"] > 0
    assert pts[1]["avg_single_gpu_time_per_sample_s"] == pts[1]["step_s"] / res["config"]["batch_per_rank"]
    p = res["prediction"]
    assert 0 < p["predicted_efficiency"] <= 1 and p["network_fit"]["alpha_s"] >= 0 and p["network_fit"]["bw_Bps"] > 0
    assert abs(p["error_efficiency"] - (p["predicted_efficiency"] - pts[1]["efficiency"])) < 1e-12
    assert p["timeline_used"]["buckets"]
    for cur in res["curves"].values():
        d = cur["networks"]["nvlink-ib400"]
        for s in d["series"].values():
            assert [r["n"] for r in s][0] == 1 and s[0]["efficiency"] == 1.0 and s[-1]["n"] == 1024
            assert all(0 < r["efficiency"] <= 1 for r in s)
        assert d["recommended_cap"]["64"]["best_cap_mb"] > 0
    assert "predicted for N=2" in out and "E(64)" in out


def test_predict_cli():
    _, out = _run(["-m", "fusedmf.bench", "predict", "--n", "1", "8", "64"])
    assert "nvlink-ib400" in out and "fusedmf-fp16" in out
    lines = [ln for ln in out.splitlines() if ln.strip().startswith(("1 ", "8 ", "64 "))]
    assert len(lines) == 3 and lines[0].split()[1] == "1.0000"
