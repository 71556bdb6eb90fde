"""fusedmf.bench.predictor on cases that can be computed by hand."""

import math

import pytest

from fusedmf.bench.predictor import (NETWORKS, Bucket, Network, ParamGrad, Timeline, allreduce_time, ddp_buckets,
                                     efficiency_curve, fusedmf_buckets, make_buckets, predict,
                                     recommend_bucket_cap, resnet50_like_timeline, ring_allreduce_time, simulate)

MBB = 1 << 20
NET = Network("test", gpus_per_node=8, intra_bw=100e9, intra_alpha=5e-6, inter_bw_per_nic=10e9, nics_per_node=2,
              inter_alpha=20e-6)


def tl(fwd=0.01, bwd=0.02, opt=0.001, buckets=(), params=()):
    return Timeline(forward_s=fwd, backward_s=bwd, optimizer_s=opt, buckets=list(buckets), params=list(params))


def test_ring_formula():
    assert ring_allreduce_time(1e9, 1, 1e9, 1e-3) == 0.0
    assert ring_allreduce_time(1e9, 2, 100e9, 5e-6) == pytest.approx(2 * 5e-6 + 1e9 / 100e9)
    assert ring_allreduce_time(8e8, 8, 100e9, 5e-6) == pytest.approx(14 * 5e-6 + 14 / 8 * 8e8 / 100e9)
    # beyond one node: intra ring over 8 + inter ring over nodes with 2 NICs x 10 GB/s
    s = 1e8
    exp = ring_allreduce_time(s, 8, 100e9, 5e-6) + ring_allreduce_time(s, 4, 20e9, 20e-6)
    assert allreduce_time(s, 32, NET) == pytest.approx(exp)
    assert allreduce_time(s, 9, NET) == pytest.approx(ring_allreduce_time(s, 8, 100e9, 5e-6)
                                                      + ring_allreduce_time(s, 2, 20e9, 20e-6))


def test_n1_efficiency_is_one():
    t = tl(buckets=[Bucket(0.02, 100 * MBB)])
    p = simulate(t, t.buckets, 1, NET)
    assert p.efficiency == 1.0 and p.step_s == pytest.approx(0.031) and p.exposed_comm_s == 0.0
    t2 = resnet50_like_timeline(0.01)
    for scheme in ("fusedmf-fp16", "ddp-fp32", "ddp-fp16"):
        assert efficiency_curve(t2, NETWORKS["nvlink-ib400"], ns=[1], scheme=scheme)[0]["efficiency"] == 1.0


def test_one_bucket_no_overlap():
    s = 50 * MBB
    t = tl(buckets=[Bucket(0.02, s)])               # ready at backward end
    for n in (2, 8, 64):
        ar = allreduce_time(s, n, NET)
        p = simulate(t, t.buckets, n, NET)
        assert p.exposed_comm_s == pytest.approx(ar)
        assert p.step_s == pytest.approx(0.031 + ar)
        assert p.efficiency == pytest.approx(0.031 / (0.031 + ar))


def test_perfect_overlap():
    fast = Network("fast", 8, 1e15, 1e-9)
    buckets = [Bucket(0.001 * (k + 1), 64 * 1024) for k in range(10)]   # ready from 1 ms to 10 ms; bwd 20 ms
    t = tl(buckets=buckets)
    for n in (2, 8):
        p = simulate(t, buckets, n, fast)
        assert p.exposed_comm_s == 0.0
        assert p.step_s == pytest.approx(t.single_gpu_s) and p.efficiency == pytest.approx(1.0)
        assert all(s["start_s"] == s["ready_s"] for s in p.schedule)


def test_latency_bound_tiny_buckets():
    alpha = 1e-3
    slow = Network("latency", 8, 1e15, alpha)
    k = 50
    buckets = [Bucket(0.02, 4) for _ in range(k)]    # all ready at backward end, negligible bytes
    t = tl(buckets=buckets)
    for n in (2, 4, 8):
        p = simulate(t, buckets, n, slow)
        assert p.exposed_comm_s == pytest.approx(k * 2 * (n - 1) * alpha, rel=1e-6)
        assert p.comm_total_s == pytest.approx(p.exposed_comm_s)


def test_queueing_on_one_stream():
    # two buckets ready at 0 and 1 ms each taking 5 ms: the second waits for the first
    net = Network("q", 8, 1.0, 0.0)                 # t = 2(n-1)/n * S / 1 B/s; n=2 -> S seconds
    t = tl(bwd=0.004, buckets=[Bucket(0.0, 0.005), Bucket(0.001, 0.005)])
    p = simulate(t, t.buckets, 2, net)
    assert [s["start_s"] for s in p.schedule] == pytest.approx([0.0, 0.005])
    assert p.comm_end_s == pytest.approx(0.010) and p.exposed_comm_s == pytest.approx(0.006)


def test_bucketing_rules():
    # registration order; grads ready in reverse order
    params = [ParamGrad(numel=n, ready_s=r) for n, r in
              [(1 << 20, 0.010), (1 << 18, 0.008), (1 << 18, 0.006), (1 << 17, 0.004), (1 << 16, 0.002)]]
    # fusedmf fp16, caps 1 MB in fp16 bytes: 64K+128K+256K elements = 896 KB first bucket
    b = fusedmf_buckets(params, cap_mb=1.0, first_cap_mb=1.0)
    assert [x.num_params for x in b] == [3, 1, 1] and b[0].nbytes == (1 << 16 | 1 << 17 | 1 << 18) * 2
    assert b[0].ready_s == 0.006 and b[-1].ready_s == 0.010
    assert sum(x.nbytes for x in b) == sum(p.numel for p in params) * 2
    # DDP fp32: the cap counts 4-byte grads, so the same 1 MB cap holds half as many elements
    d = ddp_buckets(params, cap_mb=1.0, first_cap_mb=1.0)
    assert [x.num_params for x in d] == [2, 1, 1, 1] and sum(x.nbytes for x in d) == sum(p.numel for p in params) * 4
    d16 = ddp_buckets(params, cap_mb=1.0, first_cap_mb=1.0, fp16_hook=True)
    assert [x.num_params for x in d16] == [2, 1, 1, 1] and sum(x.nbytes for x in d16) * 2 == sum(x.nbytes for x in d)
    with pytest.raises(ValueError):
        make_buckets(params, cap_mb=0)


def test_predict_schemes_and_recommendation():
    t = resnet50_like_timeline(0.01)
    net = NETWORKS["nvlink-ib400"]
    assert sum(p.numel for p in t.params) == 25_557_032
    ddp = predict(t, 8, net, scheme="ddp-fp32")
    fm = predict(t, 8, net, scheme="fusedmf-fp16")
    assert fm.bytes_per_step * 2 == ddp.bytes_per_step
    curve = efficiency_curve(t, net)
    effs = [r["efficiency"] for r in curve]
    assert effs[0] == 1.0 and all(a >= b - 1e-12 for a, b in zip(effs, effs[1:]))     # monotone in N
    rec = recommend_bucket_cap(t, net, 64)
    assert rec["best"]["step_s"] == min(r["step_s"] for r in rec["sweep"])
    assert rec["best_cap_mb"] in [r["cap_mb"] for r in rec["sweep"]]
    with pytest.raises(ValueError, match="per-param"):
        predict(tl(), 8, net, scheme="ddp-fp32")


def test_timeline_roundtrip():
    t = tl(buckets=[Bucket(0.01, 10, 2)], params=[ParamGrad(5, 0.01)])
    assert Timeline.from_dict(t.as_dict()) == t
