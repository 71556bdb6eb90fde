"""Smoke runs of benchmarks/throughput.py and benchmarks/scaling.py (--quick, CPU) and of the
``python -m fusedmf.bench predict`` CLI: they run and write JSON with sane values. Spawned gloo ranks
(2 and 4, one thread each: 4 ranks oversubscribe a 2-core machine, which only makes E(4) small) and
the torchrun mode of both (``python -m torch.distributed.run --nproc-per-node 2 --standalone``)."""

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]


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
        if r["case"] in ("ddp-torch-sgd", "ddp-fp16hook-torch-sgd", "distopt-mfsgd"):   # torchrun only
            assert r["status"] == "skipped" and "torchrun" in r["reason"], r
            continue
        assert r["status"] == "ok", r              # torch 2.11 has fused SGD on CPU: every case runs here
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_s"], rel=1e-12)
        assert len(r["repeats_s"]) == 3
        parts = r["forward_median_s"] + r["backward_median_s"] + r["optimizer_median_s"]
        assert 0 < parts < 3 * r["median_s"]
    assert cases["mfsgd/b2"]["status"] == "ok"
    tl = res["timeline"]["timeline"]
    assert tl["forward_s"] > 0 and tl["backward_s"] > 0 and tl["optimizer_s"] > 0
    assert len(tl["params"]) == res["timeline"]["num_tensors"] and tl["buckets"]
    assert all(0 <= p["ready_s"] <= tl["backward_s"] for p in tl["params"])
    assert sum(b["nbytes"] for b in tl["buckets"]) >= 2 * res["timeline"]["num_params"]      # fp16 payload
    assert "img/s" in out and "timeline" in out
    assert res["config"]["launcher"] == "single process" and res["config"]["world_size"] == 1
    assert all(r.get("mode") is None for r in res["cases"])     # no data-parallel case without torchrun


def _finite_pos(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _check_prediction(p: dict, point: dict, n: int) -> None:
    """The predictor's figures for the measured run of n ranks, its inputs and its error."""
    assert p["n"] == n == point["n"]
    assert 0 < p["predicted_efficiency"] <= 1 and _finite_pos(p["predicted_step_s"])
    assert p["measured_efficiency"] == point["efficiency"] and p["measured_step_s"] == point["step_s"]
    assert abs(p["error_efficiency"] - (p["predicted_efficiency"] - point["efficiency"])) < 1e-12
    assert abs(p["relative_error_step"] - (p["predicted_step_s"] - point["step_s"]) / point["step_s"]) < 1e-12
    fit = p["network_fit"]                          # the ring fitted to allreduces timed on these n ranks
    assert fit["alpha_s"] >= 0 and _finite_pos(fit["bw_Bps"]) and len(fit["points"]) == 4
    assert all(_finite_pos(t) for t in fit["points"].values())
    assert p["network"]["gpus_per_node"] == n and p["network"]["intra_bw"] == fit["bw_Bps"]
    tl = p["timeline_used"]                         # the world-size-1 timeline the prediction replayed
    assert tl["buckets"] and tl["params"] and tl["forward_s"] > 0 and tl["backward_s"] > 0
    assert p["measured_buckets"]["num_buckets"] == len(tl["buckets"]) and p["measured_buckets"]["n"] == n


def _check_point(pt: dict, n: int, batch: int, steps: int) -> None:
    # no bound on the value: E(N) is a timing, and a shared machine's load can put it anywhere (a run
    # measured E(2) = 2.75 while other processes slowed the world-size-1 steps); its definition is checked
    assert pt["n"] == n and _finite_pos(pt["step_s"]) and _finite_pos(pt["efficiency"])
    assert _finite_pos(pt["throughput_img_s"]) and _finite_pos(pt["avg_single_gpu_time_per_sample_s"])
    assert abs(pt["avg_single_gpu_time_per_sample_s"] - pt["step_s"] / batch) < 1e-12
    assert len(pt["per_rank_s"]) == n and all(len(ts) == steps for ts in pt["per_rank_s"])
    # the step of N ranks is the slowest rank's
    assert pt["repeats_s"] == [max(ts[i] for ts in pt["per_rank_s"]) for i in range(steps)]
    assert [r["rank"] for r in pt["ranks"]] == list(range(n))
    assert all(_finite_pos(r["step_s_median"]) and len(r["allreduce_s"]) == 4 for r in pt["ranks"])


def test_scaling_quick_world_sizes_2_and_4(tmp_path):
    res, out = _run([os.path.join("benchmarks", "scaling.py"), "--quick", "--world-sizes", "2", "4",
                     "--threads", "1"], tmp_path, timeout=180)
    c = res["config"]
    assert res["bench"] == "scaling" and c["launcher"] == "spawn" and c["backend"] == "gloo"
    assert c["world_sizes"] == [2, 4] and c["world_size"] == 4 and c["threads_per_rank"] == 1
    assert c["oversubscribed"] == (4 > os.cpu_count())
    pts = res["measured"]["points"]
    assert [p["n"] for p in pts] == [1, 2, 4] and pts[0]["efficiency"] == 1.0
    for pt, n in zip(pts[1:], (2, 4)):
        _check_point(pt, n, c["batch_per_rank"], c["steps"])
        assert abs(pt["efficiency"] - pts[0]["step_s"] / pt["step_s"]) < 1e-12
    preds = res["predictions"]
    assert [p["n"] for p in preds] == [2, 4] and res["prediction"] == preds[-1]
    for p, pt in zip(preds, pts[1:]):
        _check_prediction(p, pt, pt["n"])
    for cur in res["curves"].values():
        d = cur["networks"]["nvlink-ib400"]
        for s in d["series"].values():
            assert [r["n"] for r in s][0] == 1 and s[0]["efficiency"] == 1.0 and s[-1]["n"] == 1024
            assert all(0 < r["efficiency"] <= 1 for r in s)
        # the recommended cap is the swept cap with the shortest predicted step, the larger on a tie
        # (on this tiny model several caps give one bucket and the same step)
        rc = d["recommended_cap"]["64"]
        assert rc["best"] in rc["sweep"] and rc["best_cap_mb"] == rc["best"]["cap_mb"]
        shortest = min(r["step_s"] for r in rc["sweep"])
        assert rc["best_cap_mb"] == max(r["cap_mb"] for r in rc["sweep"]
                                        if r["step_s"] <= shortest + 1e-12), rc["sweep"]
    tg = res["predicted_targets"]
    assert tg["targets"] == {"8": 0.98, "64": 0.975}
    assert all(0 < e <= 1 for by in tg["by_timeline"].values() for s in by.values() for e in s.values())
    assert "predicted for N=2" in out and "predicted for N=4" in out and "E(64)" in out
    if importlib.util.find_spec("matplotlib") is None:
        assert res["plots_skipped"] and not res["paths"].get("plots")
    else:                                           # matplotlib is there: both plots must have been drawn
        assert len(res["paths"]["plots"]) == 2 and all(os.path.getsize(p) > 0 for p in res["paths"]["plots"])


def test_scaling_torchrun(tmp_path):
    """torchrun mode: the default group from the environment, rank 0 measures world size 1 on a group of its
    own while rank 1 waits, both measure N = 2, rank 0 alone writes the JSON and prints."""
    res, out = _run(TORCHRUN + [os.path.join("benchmarks", "scaling.py"), "--quick"], tmp_path, timeout=180)
    c = res["config"]
    assert c["launcher"] == "torchrun" and c["backend"] == "gloo" and c["device"] == "cpu"
    assert c["world_size"] == 2 and c["world_sizes"] == [2]
    pts = res["measured"]["points"]
    assert [p["n"] for p in pts] == [1, 2]
    assert len(pts[0]["per_rank_s"]) == 1 and pts[0]["ranks"][0]["rank"] == 0      # world size 1: rank 0 alone
    assert len(pts[0]["repeats_s"]) == c["steps"] and all(_finite_pos(t) for t in pts[0]["repeats_s"])
    _check_point(pts[1], 2, c["batch_per_rank"], c["steps"])
    assert abs(pts[1]["efficiency"] - pts[0]["step_s"] / pts[1]["step_s"]) < 1e-12
    (p,) = res["predictions"]
    _check_prediction(p, pts[1], 2)
    assert "rank 0" in p["timeline_from"] and res["measured_timeline"]["timeline"] == p["timeline_used"]
    assert out.count("predicted for N=2") == 1 and out.count("wrote ") == 1


def test_throughput_torchrun(tmp_path):
    """Under torchrun the DDP and DistributedOptimizer cases run across the 2 ranks; per step the slowest
    rank's time and breakdown; the single-process cases run on every rank at once, without communication."""
    res, out = _run(TORCHRUN + [os.path.join("benchmarks", "throughput.py"), "--quick", "--device", "cpu",
                                "--batches", "2"], tmp_path, timeout=180)
    c = res["config"]
    assert c["launcher"] == "torchrun" and c["world_size"] == 2 and c["backend"] == "gloo"
    assert [r["rank"] for r in res["ranks"]] == [0, 1]
    recs = {r["case"]: r for r in res["cases"]}
    assert set(recs) == {"torch-sgd-foreach", "torch-sgd-fused", "mfsgd", "ddp-torch-sgd", "ddp-fp16hook-torch-sgd",
                         "distopt-mfsgd"}
    steps = c["steps"]
    for name in ("ddp-torch-sgd", "ddp-fp16hook-torch-sgd", "distopt-mfsgd"):
        r = recs[name]
        assert r["status"] == "ok" and r["mode"] == "data-parallel over 2 ranks", r
        assert len(r["per_rank_s"]) == 2 and all(len(ts) == steps for ts in r["per_rank_s"])
        assert r["repeats_s"] == [max(ts[i] for ts in r["per_rank_s"]) for i in range(steps)]
        assert abs(r["images_per_s"] - 2 / r["median_s"]) < 1e-9
        assert abs(r["global_images_per_s"] - 2 * r["images_per_s"]) < 1e-9
        for i in range(steps):       # the breakdown of the slowest rank adds up to its step
            parts = r["forward_s"][i] + r["backward_compute_s"][i] + r["exposed_comm_s"][i] + r["update_s"][i]
            assert abs(parts - r["repeats_s"][i]) < 1e-9 and r["exposed_comm_s"][i] >= 0
            assert r["backward_compute_s"][i] <= r["backward_s"][i]
        assert _finite_pos(r["exposed_comm_median_s"]) or r["exposed_comm_median_s"] == 0.0
        no_comm = next(x for x in res["cases"] if x["case"] == r["no_comm_case"])
        ddp16 = recs["ddp-fp16hook-torch-sgd"]
        assert r["vs_no_comm"] == pytest.approx(no_comm["median_s"] / r["median_s"], rel=1e-12)
        assert r["speedup_vs_ddp_fp16hook"] == pytest.approx(ddp16["median_s"] / r["median_s"], rel=1e-12)
    assert recs["distopt-mfsgd"]["no_comm_case"] == "mfsgd"
    assert recs["ddp-fp16hook-torch-sgd"]["info_comm"] == "DDP + fp16_compress_hook"
    for name in ("torch-sgd-foreach", "mfsgd"):
        r = recs[name]
        assert r["status"] == "ok" and r["mode"].startswith("per rank, no communication")
        assert len(r["per_rank_s"]) == 2 and r["images_per_s"] > 0
    tl = res["timeline"]
    assert tl["timeline"]["buckets"] and "rank 0" in tl["recorded_on"]
    assert out.count("data-parallel over 2 gloo ranks") == 1 and "distopt-mfsgd" in out


def test_predict_cli():
    _, out = _run(["-m", "fusedmf.bench", "predict", "--n", "1", "8", "64"])
    assert "nvlink-ib400" in out and "fusedmf-fp16" in out
    lines = [ln for ln in out.splitlines() if ln.strip().startswith(("1 ", "8 ", "64 "))]
    assert len(lines) == 3 and lines[0].split()[1] == "1.0000"
