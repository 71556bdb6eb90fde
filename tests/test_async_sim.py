"""fusedmf.asynchronous in one process: the worker-time model against its distribution (order
statistics, renewal structure, stragglers), the simulator's determinism and semantics, and the
baselines' update rules against hand-computed values and torch.optim.SGD."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from fusedmf.asynchronous import ASGD, DANAZero, Simulator, WorkerTimes, master_step

# ------------------------------------------------------------------------------ the time model's CDFs


def gamma_cdf(x, shape, scale):
    return torch.special.gammainc(torch.tensor(float(shape), dtype=torch.float64),
                                  torch.as_tensor(x, dtype=torch.float64) / scale)


def lognormal_cdf(x, mean, sigma):
    mu = math.log(mean) - 0.5 * sigma ** 2
    x = torch.as_tensor(x, dtype=torch.float64)
    return 0.5 * torch.erfc(-(x.log() - mu) / (sigma * math.sqrt(2.0)))


def pareto_cdf(x, mean, alpha):
    xm = mean * (alpha - 1.0) / alpha
    x = torch.as_tensor(x, dtype=torch.float64)
    return (1.0 - (xm / x) ** alpha).clamp_min(0.0)


def ks_distance(samples, cdf) -> float:
    """Kolmogorov-Smirnov statistic sup |F_n - F| of the samples against the model's CDF."""
    x = torch.tensor(sorted(samples), dtype=torch.float64)
    n = len(x)
    f = cdf(x)
    hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    lo = torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(hi - f, f - lo).max())


def ks_critical(n: int) -> float:
    return 1.63 / math.sqrt(n)     # the 1% level of the one-sample KS test, n large


def durations_by_worker(reports, n):
    """Reconstruct each worker's clock: its report times must be the running sums of its durations."""
    per = {w: [] for w in range(n)}
    clocks = [0.0] * n
    for r in reports:
        clocks[r.worker] += r.duration
        assert r.time == pytest.approx(clocks[r.worker], rel=1e-12), "a report's time is not its worker's clock"
        per[r.worker].append(r.duration)
    return per


# ------------------------------------------------------------------------------ WorkerTimes


def test_worker_times_seed_reproduces_and_seeds_differ():
    a = [WorkerTimes(8, seed=3).next() for _ in range(1)]
    t1, t2, t3 = WorkerTimes(8, seed=3), WorkerTimes(8, seed=3), WorkerTimes(8, seed=4)
    r1 = [t1.next() for _ in range(500)]
    r2 = [t2.next() for _ in range(500)]
    r3 = [t3.next() for _ in range(500)]
    assert r1 == r2 and r1[0] == a[0]
    assert [r.worker for r in r1] != [r.worker for r in r3]


def test_worker_order_is_earliest_finish_first():
    """Every report is the earliest pending finish time; times never go backwards."""
    t = WorkerTimes(5, seed=1, shape=2.0)   # a wide distribution: the order is far from round robin
    prev = -1.0
    for _ in range(300):
        pending = t.pending()
        r = t.next()
        assert (r.worker, r.time) == pending[0]
        assert all(r.time <= other for _, other in pending[1:])
        assert r.time >= prev
        prev = r.time


def test_gamma_durations_and_first_finisher_follow_the_model():
    n, mean, shape = 8, 128.0, 100.0
    t = WorkerTimes(n, mean=mean, shape=shape, seed=0)
    reports = [t.next() for _ in range(4000)]
    per = durations_by_worker(reports, n)
    pooled = [d for ds in per.values() for d in ds]
    # durations: Gamma(shape, mean / shape), checked against its CDF
    assert ks_distance(pooled, lambda x: gamma_cdf(x, shape, mean / shape)) < ks_critical(len(pooled))
    # order statistics: the first report is the minimum of n iid Gamma draws. Its law is
    # 1 - (1 - F)^n; over many seeds, the first report times must follow it.
    firsts = [WorkerTimes(n, mean=mean, shape=shape, seed=s).next().time for s in range(400)]
    min_cdf = lambda x: 1.0 - (1.0 - gamma_cdf(x, shape, mean / shape)) ** n  # noqa: E731
    assert ks_distance(firsts, min_cdf) < ks_critical(len(firsts))
    # and so is the last of the first round: the maximum, F^n
    lasts = []
    for s in range(400):
        tt = WorkerTimes(n, mean=mean, shape=shape, seed=1000 + s)
        lasts.append([tt.next() for _ in range(n)])
    assert all(sorted(r.worker for r in first_round) == list(range(n)) for first_round in lasts)  # CV 0.1: round 1 is everyone
    assert ks_distance([fr[-1].time for fr in lasts], lambda x: gamma_cdf(x, shape, mean / shape) ** n) \
        < ks_critical(len(lasts))


@pytest.mark.parametrize("distribution,kw,cdf", [
    ("lognormal", dict(sigma=1.0), lambda x: lognormal_cdf(x, 128.0, 1.0)),
    ("pareto", dict(alpha=1.5), lambda x: pareto_cdf(x, 128.0, 1.5)),
])
def test_heavy_tailed_durations_follow_their_model(distribution, kw, cdf):
    t = WorkerTimes(4, mean=128.0, distribution=distribution, seed=2, **kw)
    per = durations_by_worker([t.next() for _ in range(3000)], 4)
    pooled = [d for ds in per.values() for d in ds]
    assert ks_distance(pooled, cdf) < ks_critical(len(pooled))
    # and not Gamma(100): the test can tell the models apart
    assert ks_distance(pooled, lambda x: gamma_cdf(x, 100.0, 1.28)) > 5 * ks_critical(len(pooled))


def test_one_slow_worker_reports_at_its_rate():
    """Renewal theorem: worker i reports at rate 1 / E[D_i]; a worker twice as slow reports half as often."""
    n, factor, m = 4, 2.0, 6000
    t = WorkerTimes(n, seed=5, slow={1: factor})
    reports = [t.next() for _ in range(m)]
    per = durations_by_worker(reports, n)
    rate = [1.0] * n
    rate[1] = 1.0 / factor
    expected = rate[1] / sum(rate)
    share = len(per[1]) / m
    # the count of a renewal process with CV 0.1 has a standard deviation far below the binomial's
    assert abs(share - expected) < 3 * math.sqrt(expected * (1 - expected) / m), (share, expected)
    assert ks_distance(per[1], lambda x: gamma_cdf(x, 100.0, factor * 1.28)) < ks_critical(len(per[1]))


def test_worker_times_state_round_trip():
    t = WorkerTimes(6, seed=9, distribution="lognormal")
    for _ in range(37):
        t.next()
    u = WorkerTimes(6, seed=0, distribution="lognormal")
    u.load_state_dict(t.state_dict())
    assert [t.next() for _ in range(50)] == [u.next() for _ in range(50)]


@pytest.mark.parametrize("kw,match", [
    (dict(num_workers=0), "num_workers"), (dict(num_workers=3, mean=-1.0), "mean"),
    (dict(num_workers=3, distribution="cauchy"), "distribution"), (dict(num_workers=3, slow={5: 2.0}), "slow worker"),
    (dict(num_workers=3, distribution="pareto", alpha=1.0), "alpha"),
])
def test_worker_times_bad_input(kw, match):
    n = kw.pop("num_workers")
    with pytest.raises(ValueError, match=match):
        WorkerTimes(n, **kw)


# ------------------------------------------------------------------------------ the simulator


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _data(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _optimizer(name, params, n):
    if name == "asgd":
        return ASGD(params, lr=0.05)
    if name == "asgd_m":
        return ASGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    if name == "dana":
        return DANAZero(params, lr=0.05, momentum=0.9, weight_decay=1e-4, num_workers=n)
    from fusedmf.optim import SMEGA2
    return SMEGA2(params, lr=0.05, momentum=0.9, weight_decay=1e-4, num_workers=n, estimate=name.split("_")[1])


def _smega2_names():
    from fusedmf.optim import __all__ as names
    return ["smega2_advanced", "smega2_naive"] if "SMEGA2" in names else []


def _simulate(name, seed, steps=40, n=4):
    model = _model()
    opt = _optimizer(name, model.parameters(), n)
    sim = Simulator(opt, WorkerTimes(n, seed=seed))

    def compute(report):
        x, y = _data(len(sim.history))
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.item()

    losses = [sim.step(compute) for _ in range(steps)]
    return model, sim, losses


@pytest.mark.parametrize("name", ["asgd_m", "dana"] + _smega2_names())
def test_simulator_reproduces_a_run_for_a_seed(name):
    m1, s1, l1 = _simulate(name, seed=7)
    m2, s2, l2 = _simulate(name, seed=7)
    m3, s3, _ = _simulate(name, seed=8)
    assert [r.worker for r in s1.history] == [r.worker for r in s2.history]
    assert l1 == l2
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for wa, wb in zip(s1.worker_weights, s2.worker_weights):
        assert all(torch.equal(a, b) for a, b in zip(wa, wb))
    # another seed: another order, other weights
    assert [r.worker for r in s1.history] != [r.worker for r in s3.history]
    assert any(not torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))


def test_simulator_computes_gradients_at_the_workers_stale_copies():
    """Against an independent loop (loss ½|w|², so the gradient is the weights it is computed at):
    master θ, one copy c_r per worker; on worker r's report θ ← θ − η·c_r, then c_r ← θ."""
    n, lr, steps = 3, 0.1, 20
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = ASGD([w], lr=lr)
    sim = Simulator(opt, WorkerTimes(n, seed=11, shape=3.0))

    def compute(report):
        opt.zero_grad(set_to_none=True)
        (0.5 * w.square().sum()).backward()

    for _ in range(steps):
        sim.step(compute)
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    copies = [theta.clone() for _ in range(n)]
    written = [0] * n
    staleness = []
    for k, r in enumerate(sim.history):
        theta = theta - lr * copies[r.worker]
        staleness.append(k - written[r.worker])
        copies[r.worker] = theta.clone()
        written[r.worker] = k + 1
    torch.testing.assert_close(w.detach(), theta, rtol=1e-14, atol=1e-14)
    assert sim.staleness == staleness and max(staleness) > 0
    for c, ref in zip(sim.worker_weights, copies):
        torch.testing.assert_close(c[0], ref, rtol=1e-14, atol=1e-14)


def test_simulator_state_round_trip():
    model, sim, _ = _simulate("dana", seed=3, steps=17)
    opt = sim.optimizer
    state = sim.state_dict()
    ostate = copy.deepcopy(opt.state_dict())   # torch's state_dict holds references
    model2 = _model(seed=5)
    with torch.no_grad():
        for a, b in zip(model2.parameters(), model.parameters()):
            a.copy_(b)
    opt2 = _optimizer("dana", model2.parameters(), 4)
    opt2.load_state_dict(ostate)
    sim2 = Simulator(opt2, WorkerTimes(4, seed=0))
    sim2.load_state_dict(state)

    def run(m, o, s, k):
        def compute(report):
            x, y = _data(len(s.history))
            o.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
        for _ in range(k):
            s.step(compute)

    run(model, opt, sim, 9)
    run(model2, opt2, sim2, 9)
    assert [r.worker for r in sim.history] == [r.worker for r in sim2.history]
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_simulator_rejects_mismatched_worker_count_and_unfinished_steps():
    model = _model()
    with pytest.raises(ValueError, match="num_workers=4"):
        Simulator(DANAZero(model.parameters(), lr=0.1, num_workers=4), WorkerTimes(3))
    if _smega2_names():                     # SMEGA2 param groups may set their own N: every group must match
        from fusedmf.optim import SMEGA2
        groups = [{"params": [model[0].weight], "num_workers": 3}, {"params": [model[2].weight]}]
        with pytest.raises(ValueError, match="num_workers=4"):
            Simulator(SMEGA2(groups, lr=0.1, num_workers=4), WorkerTimes(3))
    with pytest.raises(TypeError, match="estimate"):
        Simulator(torch.optim.SGD(model.parameters(), lr=0.1), WorkerTimes(3))
    sim = Simulator(ASGD(model.parameters(), lr=0.1), WorkerTimes(3))
    with pytest.raises(RuntimeError, match="finish"):
        sim.finish()
    sim.begin()
    with pytest.raises(RuntimeError, match="not finished"):
        sim.begin()


# ------------------------------------------------------------------------------ baselines, by hand


def _p(*values):
    return nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_asgd_plain_by_hand():
    p = _p(1.0, -2.0)
    opt = ASGD([p], lr=0.1, weight_decay=0.01)
    p.grad = torch.tensor([0.5, 1.0], dtype=torch.float64)
    opt.step()
    # θ − η(g + λθ) = [1 − 0.1(0.5 + 0.01), −2 − 0.1(1 − 0.02)]
    assert p.tolist() == pytest.approx([0.949, -2.098], abs=1e-15)
    assert opt.estimate()[0].tolist() == p.tolist()


def test_asgd_momentum_matches_torch_sgd_and_hand_values():
    p, q = _p(1.0, -2.0), _p(1.0, -2.0)
    mine = ASGD([p], lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    grads = [torch.tensor(g, dtype=torch.float64) for g in ([0.5, 1.0], [-1.0, 0.25], [2.0, 0.0])]
    for g in grads:
        p.grad, q.grad = g.clone(), g.clone()
        mine.step()
        ref.step()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-15)
    # by hand, first element: u1 = 0.5 + 0.01 = 0.51 (starts as g, undampened); θ1 = 1 − 0.051 = 0.949
    # g2 = −1 + 0.00949 = −0.99051; u2 = 0.9·0.51 + 0.9·g2 = −0.432459; θ2 = 0.949 + 0.0432459
    assert p[0].item() != 1.0
    p2 = _p(1.0)
    o2 = ASGD([p2], lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    for g in (0.5, -1.0):
        p2.grad = torch.tensor([g], dtype=torch.float64)
        o2.step()
    assert p2.item() == pytest.approx(0.949 + 0.0432459, abs=1e-12)


def test_dana_zero_by_hand():
    """N = 2, γ = 0.5, η = 0.1, λ = 0: gradients from workers 0, 1, 0."""
    p = _p(1.0)
    opt = DANAZero([p], lr=0.1, momentum=0.5, num_workers=2)
    seq = [(0, 1.0), (1, 2.0), (0, -1.0)]
    expected = [
        # v0 = 1;          θ = 1 − 0.1·1 = 0.9;       estimate θ − 0.1·0.5·(v0 + v1) = 0.9 − 0.05·1
        (0.9, 0.85),
        # v1 = 2;          θ = 0.9 − 0.2 = 0.7;       estimate 0.7 − 0.05·(1 + 2)
        (0.7, 0.55),
        # v0 = 0.5 − 1 = −0.5; θ = 0.7 + 0.05 = 0.75; estimate 0.75 − 0.05·(−0.5 + 2)
        (0.75, 0.675),
    ]
    for (worker, g), (theta, est) in zip(seq, expected):
        p.grad = torch.tensor([g], dtype=torch.float64)
        master_step(opt, worker)
        assert p.item() == pytest.approx(theta, abs=1e-15)
        assert opt.estimate()[0].item() == pytest.approx(est, abs=1e-15)
    assert opt.state[p]["momenta"].flatten().tolist() == pytest.approx([-0.5, 2.0], abs=1e-15)


def test_dana_zero_weight_decay_by_hand():
    p = _p(2.0)
    opt = DANAZero([p], lr=0.1, momentum=0.9, weight_decay=0.5, num_workers=3)
    p.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step(worker=2)
    # g = 1 + 0.5·2 = 2; v2 = 2; θ = 2 − 0.2 = 1.8; estimate 1.8 − 0.1·0.9·2
    assert p.item() == pytest.approx(1.8, abs=1e-15)
    out = [torch.empty(1, dtype=torch.float64)]
    res = opt.estimate(out=out)
    assert res[0] is out[0] and out[0].item() == pytest.approx(1.8 - 0.18, abs=1e-15)


def test_baselines_grads_callable_scale_and_skip():
    p = _p(1.0, 1.0)
    opt = ASGD([p], lr=0.5)
    g = torch.tensor([2.0, 4.0], dtype=torch.float64)
    opt.step(grads=lambda t: g, grad_scale=2.0)            # grads / loss scale
    assert p.tolist() == [0.5, 0.0]
    opt.step(grads=lambda t: g, found_inf=torch.tensor(1.0))  # skipped: nothing changes
    assert p.tolist() == [0.5, 0.0]
    opt.step(grads=lambda t: None)                           # no grad: left alone
    assert p.tolist() == [0.5, 0.0]


def test_baselines_bad_input_changes_nothing():
    p = _p(1.0, 2.0)
    opt = DANAZero([p], lr=0.1, num_workers=2)
    p.grad = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="worker"):
        opt.step()
    with pytest.raises(ValueError, match=r"worker must be an int in \[0, 2\)"):
        opt.step(worker=2)
    with pytest.raises(ValueError, match="gradient of a param"):
        opt.step(worker=0, grads=lambda t: torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"out\[0\]"):
        opt.estimate(out=[torch.empty(3)])
    assert p.tolist() == [1.0, 2.0] and not opt.state
    with pytest.raises(ValueError, match="momentum"):
        ASGD([p], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        ASGD([p], lr=-0.1)


def test_baselines_state_dict_round_trip():
    p, q = _p(1.0, 2.0), _p(0.0, 0.0)
    a = DANAZero([p], lr=0.1, momentum=0.9, num_workers=3)
    for w, g in ((0, 1.0), (2, -0.5)):
        p.grad = torch.full((2,), g, dtype=torch.float64)
        a.step(worker=w)
    b = DANAZero([q], lr=0.1, momentum=0.9, num_workers=3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    with torch.no_grad():
        q.copy_(p)
    for opt, t in ((a, p), (b, q)):
        t.grad = torch.full((2,), 0.25, dtype=torch.float64)
        opt.step(worker=1)
    assert torch.equal(p, q) and torch.equal(a.estimate()[0], b.estimate()[0])
    with pytest.raises(ValueError, match="num_workers=2"):
        DANAZero([_p(0.0, 0.0)], lr=0.1, num_workers=2).load_state_dict(a.state_dict())
