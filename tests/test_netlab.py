"""The network lab (fusedmf/bench/netlab.py): set up, a 2-rank gloo allreduce across its namespaces, the
rate limits as configured, and teardown with nothing left behind, on exit, on error, on SIGINT/SIGTERM and
after a crash (stale labs). Skipped, with the reason, where the machine cannot host a lab (not root, no
iproute2, no tbf). No timing is asserted: rates are read back from the kernel, not measured."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fusedmf.bench import netlab
from fusedmf.bench.netlab import LabUnavailable, NetLab

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REASON = netlab.lab_unavailable_reason()
needs_lab = pytest.mark.skipif(REASON is not None, reason=f"network lab unavailable here: {REASON}")


def _host_links(kind: str) -> set:
    out = subprocess.run(["ip", "-j", "link", "show", "type", kind], capture_output=True, text=True).stdout
    return {d["ifname"] for d in json.loads(out or "[]")}


def _gone(tag: str) -> None:
    """Nothing of the lab ``tag`` is left: no namespace (hence none of its veths or its bridge, which lived
    only there), no bind file under /run/netns."""
    assert [ns for ns in netlab.lab_namespaces() if ns.startswith(tag + "-")] == []
    assert not any(f.startswith(tag + "-") for f in os.listdir("/run/netns")) if os.path.isdir("/run/netns") else True


@needs_lab
@pytest.mark.parametrize("n", [2, 4])
def test_allreduce_across_namespaces_and_teardown(tmp_path, n):
    veth0, bridges0 = _host_links("veth"), _host_links("bridge")
    outs = [tmp_path / f"rank{r}.json" for r in range(n)]
    with NetLab(n, rate_gbps=1.0) as lab:
        assert lab.describe()["oversubscribed"] == (n > lab.cores)
        tag, namespaces = lab.tag, list(lab.namespaces)
        assert set(namespaces + [lab.switch]) <= set(netlab.lab_namespaces())
        # inside the lab: no default route, only the lab subnet (NOTE [lab isolation])
        routes = subprocess.run(lab.command(1, ["ip", "-j", "route", "show"]), capture_output=True, text=True).stdout
        assert [r["dst"] for r in json.loads(routes)] == [f"{netlab.SUBNET}.0/24"]
        procs = [lab.spawn(r, [sys.executable, os.path.join(HERE, "_netlab_worker.py"), str(outs[r])],
                           env=lab.rank_env(r, port=29611, threads=1), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(n)]
        logs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * n, logs
    res = [json.loads(o.read_text()) for o in outs]
    host_netns = os.readlink("/proc/self/ns/net")
    for r, d in enumerate(res):
        assert d["rank"] == r and d["world_size"] == n and d["max_abs_err"] == 0.0
        assert d["ifname"] == "eth0"
        assert sorted(d["addresses"]) == sorted(["127.0.0.1/8", f"{netlab.rank_address(r)}/24"])
        assert d["netns"] != host_netns
    assert len({d["netns"] for d in res}) == n
    _gone(tag)
    assert _host_links("veth") == veth0 and _host_links("bridge") == bridges0
    assert all(p.poll() is not None for p in procs)


@needs_lab
def test_rate_limit_is_configured_as_asked():
    with NetLab(2, rate_gbps=0.3) as lab:
        for r in range(2):
            q = lab.qdiscs(r)
            for side in ("send", "receive"):
                assert q[side]["kind"] == "tbf" and q[side]["rate_bps"] == 300_000_000, (r, side, q)
                assert q[side]["options"]["burst"] >= 64 * 1024     # a 64 KiB GSO packet fits the bucket
        lab.set_rate(2.5)
        assert all(lab.qdiscs(r)[s]["rate_bps"] == 2_500_000_000 for r in range(2) for s in ("send", "receive"))
        lab.set_rate(None)
        assert all(lab.qdiscs(r)[s]["kind"] != "tbf" for r in range(2) for s in ("send", "receive"))
        assert lab.describe()["rate_gbps_per_link_per_direction"] is None
        tag = lab.tag
    _gone(tag)


def test_bad_arguments_are_refused_before_anything_is_made():
    for bad in (1, 0, 17, 2.0):
        with pytest.raises(ValueError, match="n \\(ranks\\)"):
            NetLab(bad)
    for bad in (0, -1.0, "1"):
        with pytest.raises(ValueError, match="rate_gbps"):
            NetLab(2, rate_gbps=bad)
    with pytest.raises(ValueError, match="prefix"):
        NetLab(2, prefix="Bad-1")


def test_refuses_without_root_or_tc(monkeypatch):
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 1000)
    assert "root" in netlab.lab_unavailable_reason()
    with pytest.raises(LabUnavailable, match="needs root"):
        NetLab(2).setup()
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 0)
    real_which = netlab.shutil.which
    monkeypatch.setattr(netlab.shutil, "which", lambda t: None if t == "tc" else real_which(t))
    assert "`tc`" in netlab.lab_unavailable_reason()


_HOLDER = textwrap.dedent("""
    import sys, time
    from fusedmf.bench.netlab import NetLab
    mode = sys.argv[1]
    with NetLab(2, rate_gbps=0.5) as lab:
        print(lab.tag, flush=True)
        if mode == "error":
            sys.stdin.readline()  # the parent has seen the lab (else the teardown races its check)
            raise RuntimeError("boom inside the lab")
        time.sleep(120)
""")


def _holder(mode):
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, mode], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tag = p.stdout.readline().strip()
    assert tag.startswith(netlab.PREFIX), p.stderr.read() if p.poll() is not None else tag
    assert any(ns.startswith(tag + "-") for ns in netlab.lab_namespaces())
    return p, tag


@needs_lab
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "error", "SIGKILL then stale cleanup"])
def test_teardown_on_signal_error_and_crash(how):
    p, tag = _holder("error" if how == "error" else "hold")
    if how in ("SIGINT", "SIGTERM"):
        time.sleep(0.3)
        p.send_signal(getattr(signal, how))
    elif how.startswith("SIGKILL"):
        p.kill()
    _, err = p.communicate("go\n" if how == "error" else None, timeout=60)
    if how == "error":
        assert p.returncode == 1 and "boom inside the lab" in err
    elif how.startswith("SIGKILL"):
        assert p.returncode == -signal.SIGKILL
        left = [ns for ns in netlab.lab_namespaces() if ns.startswith(tag + "-")]
        assert len(left) == 3                  # a crash leaves the lab behind ...
        removed = netlab.cleanup_stale()       # ... and the next lab (or --cleanup) removes it
        assert set(left) <= set(removed)
    else:
        assert p.returncode == 128 + getattr(signal, how), err
    _gone(tag)


@needs_lab
def test_scaling_netns_quick_smoke(tmp_path):
    """The driver end to end (tiny model, 2 steps, two rates, three configurations): it runs, writes the JSON,
    the log and the plot, every point has a finite measured and predicted E, and the lab is gone."""
    cmd = [sys.executable, "-m", "fusedmf.bench", "scaling", "--netns", "--quick", "--bandwidths", "0.5", "2",
           "--impls", "distopt-fp16-rec", "ddp-fp16hook", "localsgd-H16", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    res = json.loads(path.read_text())
    assert res["bench"] == "scaling_netns" and res["config"]["ranks"] == 2
    assert res["provenance"]["git_commit"] and res["provenance"]["command"].startswith(
        "python -m fusedmf.bench scaling --netns --quick")
    pts = res["points"]
    assert {(p["bandwidth_gbps"], p["impl"]) for p in pts} == {
        (b, i) for b in (0.5, 2.0) for i in ("distopt-fp16", "distopt-fp16-rec", "ddp-fp16hook", "localsgd-H16")}
    by = {(p["bandwidth_gbps"], p["impl"]): p for p in pts}
    for bw in (0.5, 2.0):   # LocalSGD (H = 16): one average in 16 steps -> >= 10x fewer bytes than DistributedOptimizer
        assert by[(bw, "distopt-fp16")]["bytes_per_step_rank0"] >= 10 * by[(bw, "localsgd-H16")]["bytes_per_step_rank0"] > 0
    for p in pts:
        assert p["world_size"] == 2 and math.isfinite(p["E_measured"]) and p["E_measured"] > 0
        assert math.isfinite(p["E_predicted"]) and p["E_predicted"] > 0
        assert p["error"] == p["E_predicted"] - p["E_measured"]
        assert p["impl"] == "localsgd-H16" or p["buckets_rank0_last_step"]
        assert all(b["end_s"] >= b["start_s"] for b in p["buckets_rank0_last_step"] or [])
    for bw in ("0.5", "2"):
        nets = res["fitted"][bw]["networks"]
        assert set(nets) == {"float16", "bfloat16", "float32"} and all(d["bw_Bps"] > 0 for d in nets.values())
        assert res["fitted"][bw]["recommended_cap"]["best_cap_mb"] in [p["bucket_cap_mb"] for p in pts
                                                                    if p["impl"] == "distopt-fp16-rec"]
    assert set(res["backends_used"]) == {"distopt-fp16", "distopt-fp16-rec", "ddp-fp16hook", "localsgd-H16"}
    # the loaded baseline is measured again with every rate's runs (and the prediction of a rate starts from it)
    assert set(res["timelines_world_size_1_loaded"]) == set(res["loaded_world_size_1"]) == {"0.5", "2"}
    for bw in ("0.5", "2"):
        assert set(res["timelines_world_size_1_loaded"][bw]) == {"distopt-fp16", "ddp-fp16hook", "localsgd-H16"}
    for name in ("distopt-fp16", "localsgd-H16"):       # the fused update ran on the compiled CPU kernels
        assert res["backends_used"][name]["update"].get("cpu", 0) > 0, res["backends_used"][name]
    assert res["backends_used"]["ddp-fp16hook"]["update"].startswith("torch.optim.SGD")
    assert set(res["predicted_curves"]) == {"distopt-fp16", "distopt-fp16-rec", "ddp-fp16hook", "localsgd-H16"}
    assert (tmp_path / path.name.replace(".json", "_E.png")).stat().st_size > 0
    assert "predictor |E_pred - E_meas|" in (tmp_path / path.name.replace(".json", ".log")).read_text()
    # the driver has exited: a namespace of its lab would be one whose owner is gone
    assert not [ns for ns in netlab.lab_namespaces() if not netlab._alive(netlab._owner(ns))]
