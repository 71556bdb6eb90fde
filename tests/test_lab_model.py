"""benchmarks/lab_model.py: what the network lab adds to the predictor, on hand-computed schedules."""

import math

import pytest

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from lab_model import (LabFit, cpu_share, fit_ring, interpolate_fit, launch_order, predict_lab,  # noqa: E402
                       recommend_cap, with_pack_time)
from fusedmf.bench.predictor import Bucket, ParamGrad, Timeline, ring_allreduce_time, simulate


def _fit(alpha=1e-4, bw=100e6, cpu=0.0, n=2):
    return LabFit(dtype="float16", n=n, alpha_s=alpha, bw_Bps=bw, intercept_s=2 * (n - 1) * alpha,
                  slope_s_per_B=2 * (n - 1) / n / bw, cpu_s_per_byte=cpu, points={}, cpu_points={},
                  max_rel_residual=0.0)


def test_fit_ring_recovers_alpha_bandwidth_and_cpu_per_byte():
    n, alpha, bw = 4, 250e-6, 37.5e6
    sizes = [1 << 18, 1 << 21, 1 << 24]
    times = {s: ring_allreduce_time(s, n, bw, alpha) for s in sizes}
    cpu = {s: 1e-3 + 3e-9 * s for s in sizes}
    f = fit_ring(times, cpu, n, "float32")
    assert f.alpha_s == pytest.approx(alpha, rel=1e-9) and f.bw_Bps == pytest.approx(bw, rel=1e-9)
    assert f.cpu_s_per_byte == pytest.approx(3e-9, rel=1e-9) and f.max_rel_residual < 1e-9
    with pytest.raises(ValueError, match="ring fit"):
        fit_ring({1: 1.0}, {1: 1.0}, n, "float32")


def test_launch_order_holds_a_bucket_until_the_ones_before_it():
    b = launch_order([Bucket(0.3, 10), Bucket(0.1, 10), Bucket(0.2, 10), Bucket(0.5, 10)])
    assert [x.ready_s for x in b] == [0.3, 0.3, 0.3, 0.5]
    assert [x.ready_s for x in launch_order([Bucket(0.1, 1), Bucket(0.2, 1)])] == [0.1, 0.2]


def test_bucket_order_changes_the_schedule_as_computed_by_hand():
    # bucket 0 (the first to launch) is ready last: in index order bucket 1 waits for it
    tl = Timeline(forward_s=0.1, backward_s=1.0, optimizer_s=0.05)
    fit = _fit(alpha=0.0, bw=1e6)                     # 2 ranks: t = S / B
    buckets = [Bucket(0.9, 200_000), Bucket(0.1, 500_000)]
    p = predict_lab(tl, buckets, 2, fit, t1_s=tl.single_gpu_s, share=0.0)
    # index order: 0 runs 0.9..1.1, then 1 runs 1.1..1.6
    assert p["step_s"] == pytest.approx(0.1 + 1.6 + 0.05)
    assert p["exposed_comm_s"] == pytest.approx(0.6)
    ready_order = simulate(tl, buckets, 2, fit.network("x"))        # 1 runs 0.1..0.6, then 0 runs 0.9..1.1
    assert ready_order.step_s == pytest.approx(0.1 + 1.1 + 0.05) and ready_order.step_s < p["step_s"]
    assert p["E"] == pytest.approx(tl.single_gpu_s / p["step_s"])


def test_cpu_time_of_overlapped_communication_stretches_backward():
    tl = Timeline(forward_s=0.1, backward_s=1.0, optimizer_s=0.05, params=[ParamGrad(10, 0.0)])
    fit = _fit(alpha=0.0, bw=1e6, cpu=2e-7)
    b = [Bucket(0.0, 100_000)]                        # 0.1 s of comm inside backward: 0.02 s of CPU
    p = predict_lab(tl, b, 2, fit, t1_s=1.15, share=1.0)
    assert p["backward_cpu_stretch_s"] == pytest.approx(0.02, rel=1e-6)
    assert p["step_s"] == pytest.approx(0.1 + 1.02 + 0.05, rel=1e-6)
    half = predict_lab(tl, b, 2, fit, t1_s=1.15, share=0.5)
    assert half["backward_cpu_stretch_s"] == pytest.approx(0.01, rel=1e-6)
    free = predict_lab(tl, b, 2, fit, t1_s=1.15, share=0.0)
    assert free["backward_cpu_stretch_s"] == 0.0 and free["step_s"] == pytest.approx(1.15)
    # communication after backward's end takes no CPU from it
    late = predict_lab(tl, [Bucket(1.0, 100_000)], 2, fit, t1_s=1.15, share=1.0)
    assert late["backward_cpu_stretch_s"] == 0.0 and late["step_s"] == pytest.approx(0.1 + 1.1 + 0.05)


def test_pack_time_delays_the_launch():
    b = with_pack_time([Bucket(0.2, 1000), Bucket(0.5, 4000)], 1e-6)
    assert [x.ready_s for x in b] == pytest.approx([0.201, 0.504])
    b = with_pack_time([Bucket(0.2, 1000), Bucket(0.5, 4000)], 1e-6, pack_fixed_s=0.01)
    assert [x.ready_s for x in b] == pytest.approx([0.211, 0.514])


def test_launch_time_of_the_fit_delays_every_bucket():
    tl = Timeline(forward_s=0.1, backward_s=1.0, optimizer_s=0.05)
    fit = _fit(alpha=0.0, bw=1e6)
    fit.launch_s = 0.03
    p = predict_lab(tl, [Bucket(0.95, 100_000)], 2, fit, t1_s=1.15, share=0.0)
    assert p["schedule"][0]["start_s"] == pytest.approx(0.98) and p["step_s"] == pytest.approx(0.1 + 1.08 + 0.05)


def test_cpu_share():
    assert cpu_share(2, 1, 2) == 1.0 and cpu_share(4, 1, 2) == 1.0
    assert cpu_share(2, 1, 4) == 0.0 and cpu_share(2, 1, 3) == 0.5


def test_interpolate_fit_between_measured_rates():
    fits = {0.1: _fit(alpha=1e-4, bw=12e6), 10.0: _fit(alpha=3e-4, bw=1.2e9)}
    mid = interpolate_fit(fits, 1.0)
    assert mid.bw_Bps == pytest.approx(math.sqrt(12e6 * 1.2e9)) and mid.alpha_s == pytest.approx(2e-4)
    assert interpolate_fit(fits, 0.1) is fits[0.1] and interpolate_fit(fits, 20.0) is fits[10.0]


def test_recommend_cap_is_the_sweeps_fastest():
    params = [ParamGrad(numel=2_000_000, ready_s=1.0 - 0.1 * k) for k in range(10)]   # last registered: ready first
    tl = Timeline(forward_s=0.3, backward_s=1.0, optimizer_s=0.05, params=params)
    rec = recommend_cap(tl, 2, _fit(alpha=1e-3, bw=50e6), t1_s=tl.single_gpu_s, share=0.0)
    assert rec["best"]["step_s"] == min(r["step_s"] for r in rec["sweep"])
    assert rec["best_cap_mb"] < 25          # small buckets overlap the long backward; one 40 MB bucket cannot


def test_forward_broadcast_adds_to_forward_only_with_peers():
    tl = Timeline(forward_s=0.1, backward_s=1.0, optimizer_s=0.05)
    fit = _fit(alpha=1e-3, bw=1e6)
    p = predict_lab(tl, [], 2, fit, t1_s=1.15, share=0.0, forward_comm_bytes=50_000)
    assert p["forward_broadcast_s"] == pytest.approx(2e-3 + 0.05) and p["step_s"] == pytest.approx(1.15 + 0.052)
    assert predict_lab(tl, [], 1, fit, t1_s=1.15, share=0.0, forward_comm_bytes=50_000)["forward_broadcast_s"] == 0.0


def test_localsgd_step_is_its_local_step_plus_one_average_per_period():
    """LocalSGD in the network lab: the loaded world-size-1 step (local updates, the pack and apply of every
    H-th step) plus one ring allreduce per bucket of the average's payload, spread over the period; its step
    time is the mean over whole periods, where every other configuration's is the median."""
    import scaling_netns as sn

    fit = LabFit("float16", 2, alpha_s=1e-3, bw_Bps=1e8, intercept_s=2e-3, slope_s_per_B=1e-8,
                 cpu_s_per_byte=0.0, points={}, cpu_points={}, max_rel_residual=0.0)
    payload = 30 * 2 ** 20                                  # two 25 MB buckets
    state = {"world_size": 2, "t1_alone_s": {"mfsgd": 0.100},
             "timelines": {"localsgd-H16": {"step_s": 0.120, "average_bytes": payload}}}
    cfg = sn.IMPLS["localsgd-H16"]
    pred = sn._predict(state, "localsgd-H16", cfg, {"float16": fit})
    comm = 2 * 2e-3 + 1e-8 * payload                       # by hand: 0.3186 s per average
    assert pred["num_buckets"] == 2
    assert pred["step_s"] == pytest.approx(0.120 + comm / 16, rel=1e-12)
    assert pred["E"] == pytest.approx(0.100 / (0.120 + comm / 16), rel=1e-12)
    assert pred["exposed_comm_s"] == pytest.approx(comm / 16, rel=1e-12)
    # alone, nothing is sent
    alone = sn._predict(dict(state, world_size=1), "localsgd-H16", cfg, {"float16": fit})
    assert alone["step_s"] == pytest.approx(0.120)
    # the statistic: mean for LocalSGD (the averaging step counts), median for the rest
    steps = [1.0] * 15 + [17.0]
    assert sn.step_time(cfg, steps) == pytest.approx(2.0)
    assert sn.step_time(sn.IMPLS["distopt-fp16"], steps) == 1.0
    assert sn._steps_of(cfg, {"steps": 10}) == 16 and sn._steps_of(cfg, {"steps": 17}) == 32
    assert sn._steps_of(sn.IMPLS["ddp"], {"steps": 10}) == 10
