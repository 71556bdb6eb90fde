"""Smoke tests of the benchmark harness and of benchmarks/optim_step.py (CPU, --quick)."""

import csv
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import fusedmf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import harness  # noqa: E402

MACHINE_KEYS = ("utc", "command", "device_name", "driver", "torch", "torch_cuda", "triton", "cpu_model",
                "cpu_count", "torch_threads", "git", "loadavg_at_start")
TORCH_CASES = [f"{rule}/torch-{impl}/fp32" for rule in ("sgd", "adam") for impl in ("forloop", "foreach", "fused")] + [
    f"{rule}/torch-{impl}/bf16+master" for rule in ("sgd", "adam") for impl in ("fused+copy", "fused-flat+copy")]
FUSEDMF_CPU_CASES = [f"{rule}/fusedmf-cpu/{prec}" for rule in ("sgd", "adam") for prec in ("fp32", "bf16+master")] + [
    f"{rule}/fusedmf-cpu-functional/fp32" for rule in ("sgd", "adam")]
KEY_LABEL = "cpu backend fp32 MF-SGD vs torch.optim.SGD(fused=True), same run"


# docs/performance.md's floors, bytes per parameter: SGD reads w, g, m and writes w, m (5 x fp32);
# Adam reads w, g, m, v and writes w, m, v (7 x fp32). bf16 with fp32 masters moves the same count:
# master 4 + 4, grad 2, param 2 (written), the fp32 state as before.
FLOOR_BYTES_PER_PARAM = {"sgd": 5 * 4, "adam": 7 * 4}


def _lin_quantile(values, q):
    """Quantile by linear interpolation between order statistics, written here, not the harness's."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _assert_timed(rec: dict, repeats: int, copy_gbps: float, bytes_per_call: int) -> None:
    """The record's statistics are those of its own repeats, and GB/s and % copy follow from them."""
    name = rec["name"]
    assert rec["status"] == "ok", f"{name}: {rec['status']}: {rec.get('reason')}"
    assert len(rec["repeats_s"]) == repeats == rec["n"], f"{name}: {len(rec['repeats_s'])} repeats"
    assert all(t > 0 for t in rec["repeats_s"]), f"{name}: non-positive repeat {rec['repeats_s']}"
    for key, q in (("median_s", 0.5), ("p20_s", 0.2), ("p80_s", 0.8)):
        assert rec[key] == pytest.approx(_lin_quantile(rec["repeats_s"], q), rel=1e-12), (name, key)
    assert rec["bytes_per_call"] == bytes_per_call, name
    assert rec["gbps"] == pytest.approx(bytes_per_call / rec["median_s"] / 1e9, rel=1e-12), name
    assert rec["pct_copy_bw"] == pytest.approx(100.0 * rec["gbps"] / copy_gbps, rel=1e-12), name


def _floor_bytes(name: str, params: int) -> int:
    return FLOOR_BYTES_PER_PARAM[name.split("/")[0]] * params


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("optim_step")
    cmd = [sys.executable, os.path.join(BENCH, "optim_step.py"), "--quick", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    files = glob.glob(os.path.join(str(out), "optim_step_cpu_*.json"))
    assert len(files) == 1, f"expected one JSON record in {out}, found {files}"
    with open(files[0]) as f:
        data = json.load(f)
    return data, proc.stdout, files[0]


def test_record_has_machine_and_config(quick_run):
    data, _, path = quick_run
    m = data["machine"]
    missing = [k for k in MACHINE_KEYS if k not in m]
    assert not missing, f"machine info lacks {missing}"
    assert m["torch"] == torch.__version__ and m["cpu_count"] >= 1
    assert "optim_step.py" in m["command"] and "--quick" in m["command"]
    assert "commit" in m["git"]
    assert data["config"]["device"] == "cpu" and data["config"]["quick"] is True
    assert data["workload"]["tensors"] == 161 and data["workload"]["params"] == 25_557_032
    assert 0 < data["copy_bandwidth"]["gbps"] < 1000 and data["copy_bandwidth"]["repeats_s"]
    assert os.path.exists(path[:-len(".json")] + ".csv")


def test_torch_cases_timed(quick_run):
    data, _, _ = quick_run
    recs = {r["name"]: r for r in data["cases"]}
    repeats = data["config"]["repeats"]
    copy_gbps, params = data["copy_bandwidth"]["gbps"], data["workload"]["params"]
    for name in TORCH_CASES:
        assert name in recs, f"missing case {name}"
        _assert_timed(recs[name], repeats, copy_gbps, _floor_bytes(name, params))
    r = recs["sgd/torch-foreach/fp32"]           # vs its baseline (torch fused SGD), same run: ratio of medians
    assert r["speedup"] == pytest.approx(recs[r["baseline"]]["median_s"] / r["median_s"], rel=1e-12)


def test_fusedmf_cases_timed_or_skipped_with_reason(quick_run):
    """A backend that is not there is recorded with the reason available_backends() gives."""
    data, _, _ = quick_run
    recs = {r["name"]: r for r in data["cases"]}
    cpu = fusedmf.available_backends()["cpu"]
    assert data["backends"]["cpu"] == {"available": cpu.available, "detail": cpu.detail}
    assert set(data["backends"]) == set(fusedmf.available_backends())   # every backend, with its reason
    for name in FUSEDMF_CPU_CASES:
        assert name in recs, f"case {name} was dropped instead of recorded"
        rec = recs[name]
        if cpu.available:
            _assert_timed(rec, data["config"]["repeats"], data["copy_bandwidth"]["gbps"],
                          _floor_bytes(name, data["workload"]["params"]))
            if "functional" not in name:
                assert rec["check"]["ok"], f"{name}: {rec['check']}"
        else:
            assert rec["status"] == "skipped", f"{name}: {rec['status']}"
            assert cpu.detail in rec["reason"], rec["reason"]
    for name in ("sgd/fusedmf-reference/fp32", "adam/fusedmf-reference/bf16+master"):
        assert recs[name]["status"] == "skipped" and "--include-reference" in recs[name]["reason"]


def test_key_comparison_printed(quick_run):
    data, stdout, _ = quick_run
    assert KEY_LABEL in stdout
    comp = next(c for c in data["comparisons"] if c["label"] == KEY_LABEL)
    assert comp["case"] == "sgd/fusedmf-cpu/fp32" and comp["vs"] == "sgd/torch-fused/fp32"
    if fusedmf.available_backends()["cpu"].available:
        # the interleaved figure when there is one: the median of the per-round ratios vs/case
        recs = {r["name"]: r for r in data["cases"]}
        pair = next(p for p in data["pairs"] if (p["a"], p["b"]) == (comp["case"], comp["vs"]))
        rounds = [b / a for a, b in zip(pair["a_s"], pair["b_s"])]
        assert comp["interleaved"] == pytest.approx(_lin_quantile(rounds, 0.5), rel=1e-12)
        assert comp["value"] == comp["interleaved"]
        assert comp["separate"] == pytest.approx(recs[comp["vs"]]["median_s"] / recs[comp["case"]]["median_s"],
                                                 rel=1e-12)
    else:
        assert comp["value"] is None and "skipped" in comp["missing"]


# ---------------------------------------------------------------------------------------- harness units
def test_quantiles_match_linear_interpolation():
    s = harness.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median_s"], s["p20_s"], s["p80_s"], s["n"]) == (3.0, 1.8, 4.2, 5)


def test_harness_records_skips_errors_and_pairs(tmp_path):
    x = torch.rand(1 << 16)
    y = torch.rand(1 << 16)

    def unavailable():
        raise harness.Unavailable("no such backend here")

    def broken():
        raise RuntimeError("boom")

    cases = [
        harness.Case("add", lambda: (lambda: x.add_(y, alpha=1e-9)), 3 * x.numel() * 4),
        harness.Case("mul", lambda: (lambda: x.mul_(1.0)), 2 * x.numel() * 4, baseline="add",
                     check=lambda: {"ok": True}),
        harness.Case("missing", unavailable, 1),
        harness.Case("declared", lambda: None, 1, skip="not on this device"),
        harness.Case("broken", broken, 1),
    ]
    res = harness.run("unit", cases, device="cpu", repeats=3, warmup=1, out_dir=str(tmp_path),
                      copy_repeats=3, pairs=[("mul", "add"), ("missing", "add")], pair_rounds=3,
                      print_table=False)
    recs = {r["name"]: r for r in res["cases"]}
    for name, nbytes in (("add", 3 * x.numel() * 4), ("mul", 2 * x.numel() * 4)):
        _assert_timed(recs[name], 3, res["copy_bandwidth"]["gbps"], nbytes)
    assert recs["mul"]["speedup"] == pytest.approx(recs["add"]["median_s"] / recs["mul"]["median_s"], rel=1e-12)
    assert recs["mul"]["check"] == {"ok": True}
    assert (recs["missing"]["status"], recs["missing"]["reason"]) == ("skipped", "no such backend here")
    assert (recs["declared"]["status"], recs["declared"]["reason"]) == ("skipped", "not on this device")
    assert recs["broken"]["status"] == "error" and "boom" in recs["broken"]["reason"]
    ok_pair, skipped_pair = res["pairs"]
    assert ok_pair["status"] == "ok" and len(ok_pair["a_s"]) == len(ok_pair["b_s"]) == 3
    # the median of the per-round ratios b/a (interleaved), not the ratio of the medians
    ratios = sorted(b / a for a, b in zip(ok_pair["a_s"], ok_pair["b_s"]))
    assert ok_pair["speedup"] == pytest.approx(ratios[1], rel=1e-12)
    assert skipped_pair["status"] == "skipped" and "no such backend here" in skipped_pair["reason"]
    with open(res["paths"]["csv"]) as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert set(rows) == set(recs) and float(rows["add"]["median_ms"]) > 0
    with open(res["paths"]["json"]) as f:
        assert json.load(f)["cases"][0]["name"] == "add"
    assert "add" in harness.format_table(res)
