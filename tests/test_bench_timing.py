"""The harness's device / host time split (NOTE [device and host time] in benchmarks/harness.py), on a
fake clock: host time is the Python call alone, never the synchronisation; the CPU branch keeps its
meaning and reports no device time, with the reason; table and CSV carry the new fields.
The CUDA branch (CUDA-graph replay) needs a GPU: owed to scripts/gpu_verify.sh's optim stage."""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import harness  # noqa: E402


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_host_time_is_the_call_and_excludes_the_sync():
    clock = FakeClock()
    costs = iter([3e-6, 5e-6, 4e-6, 7e-6])
    syncs = []

    def step():
        clock.t += next(costs)

    def sync():  # waiting for the device: long, and not the host's cost of the call
        syncs.append(clock.t)
        clock.t += 1.0

    out = harness.time_host_calls(step, repeats=4, clock=clock, sync=sync)
    assert [round(x, 12) for x in out] == [3e-6, 5e-6, 4e-6, 7e-6]
    assert len(syncs) == 5  # before each call and once at the end
    fields = harness.host_fields(out)
    assert fields["host_median_s"] == harness.summarize(out)["median_s"]
    assert abs(fields["host_median_s"] - 4.5e-6) < 1e-12


def test_cpu_timing_keeps_its_meaning_and_has_no_device_time():
    calls = []
    timing = harness._time(lambda: calls.append(1), torch.device("cpu"), warmup=1, repeats=5)
    assert timing["timer"] == "time.perf_counter" and len(timing["repeats_s"]) == 5
    assert timing["host_repeats_s"] == timing["repeats_s"]
    assert timing["host_median_s"] == harness.summarize(timing["repeats_s"])["median_s"]
    assert timing["device_median_s"] is None and timing["device_repeats_s"] is None
    assert "CPU" in timing["device_time_reason"]


def _result(cases):
    machine = {"device_name": "fake", "torch": torch.__version__, "torch_threads": 1, "git": {"commit": "0" * 40},
               "loadavg_at_start": None, "loadavg_at_end": None}
    bw = {"gbps": 1.0, "bytes_per_call": 1e9, "p20_s": 1.0, "p80_s": 1.0}
    return {"bench": "b", "machine": machine, "config": {"device": "cuda"}, "copy_bandwidth": bw, "cases": cases,
            "paths": {"json": "x.json", "csv": "x.csv"}, "elapsed_s": 1.0}


def _rec(name, **kw):
    rec = {"name": name, "status": "ok", "median_s": 2e-4, "p20_s": 1e-4, "p80_s": 3e-4, "gbps": 1.0,
           "bytes_per_call": 100, "n": 3}
    rec.update(kw)
    return rec


def test_table_and_csv_report_device_and_host_time():
    gpu = [_rec("a", wall_s=2.5e-4, device_median_s=1.25e-4, host_median_s=4e-5, device_gbps=0.8,
                device_time_reason=None),
           _rec("b", wall_s=2.5e-4, device_median_s=None, host_median_s=4e-5,
                device_time_reason="the step could not be captured in a CUDA graph: RuntimeError: x")]
    table = harness.format_table(_result(gpu))
    assert "device ms  host ms" in table
    row_a = next(line for line in table.splitlines() if line.startswith("a "))
    assert "0.125" in row_a and "0.040" in row_a
    row = harness._csv_row(gpu[0])
    assert row["device_median_ms"] == 0.125 and row["host_median_ms"] == 0.04 and row["device_gbps"] == 0.8
    assert set(harness._CSV_FIELDS) >= {"device_median_ms", "host_median_ms", "device_gbps", "device_time_reason"}
    assert "captured" in harness._csv_row(gpu[1])["device_time_reason"]
    # a CPU run's table is unchanged: no device / host columns
    cpu = [_rec("c", host_median_s=2e-4, device_median_s=None, device_time_reason="CPU: ...")]
    assert "device ms" not in harness.format_table(_result(cpu))
