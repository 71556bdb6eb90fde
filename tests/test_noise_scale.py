"""Gradient noise scale (fusedmf.noise): the sums of squares folded into pack_ and the non-finite check
on every backend, the estimator's formulas and smoothing, the DistributedOptimizer path on gloo ranks
against the unfused computation and against a synthetic problem with known G and Σ, and the
noise-adaptive MF schedule.

Statistical tolerance (test_estimate_recovers_the_known_noise_scale): the gradients do not depend on
the parameters, so the per-step raw estimates (tr_t, g2_t) are independent draws. The smoothed value
is Σ w_t·tr_t / Σ w_t·g2_t with the EMA's weights w_t; its standard error follows from the empirical
covariance of (tr_t, g2_t) by the delta method, and the test asserts the estimate lies within 4
standard errors of the truth (a false failure about once in 10^4 runs) while that error is itself
below 5% of the truth (so a wrong estimator cannot hide in a wide band).
"""

from __future__ import annotations

import math

import pytest
import torch

import _comm_workers as W
from fusedmf import functional as F
from fusedmf import mf
from fusedmf.functional.pack import pack_offsets
from fusedmf.noise import GradientNoiseScale, estimate_from_norms, squared_norm

PG_TIMEOUT = 10.0


# ------------------------------------------------------------------------------------------ kernels
def _grads(device, dtype):
    g = torch.Generator().manual_seed(3)
    shapes = [(1,), (4097,), (0,), (70001,), (33,), (6, 5, 7, 3)]
    out = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    out[-1] = out[-1].to(memory_format=torch.channels_last)
    out.append(torch.randn(40, generator=g).to(device=device, dtype=dtype)[::3])      # not dense
    return out


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_pack_sum_of_squares_equals_the_unfused_sum(backend, grad_dtype, out_dtype):
    name, device = backend
    grads = _grads(device, grad_dtype)
    scale = 0.37
    _, total = pack_offsets([g.numel() for g in grads], torch.empty(0, dtype=out_dtype).element_size())
    out_plain = torch.zeros(total, dtype=out_dtype, device=device)
    F.pack(grads, out_plain, scale=scale, backend=name)
    out = torch.zeros(total, dtype=out_dtype, device=device)
    sumsq = torch.full((1,), 2.5, device=device)                    # accumulates onto what is there
    assert F.pack(grads, out, scale=scale, sumsq=sumsq, backend=name) == name
    expected = 2.5 + sum(float((g.float() * scale).double().square().sum()) for g in grads)   # fp32 products
    assert abs(sumsq.item() - expected) <= 2e-6 * expected, (sumsq.item(), expected)
    assert torch.equal(out, out_plain), "asking for the sum of squares changed the packed values"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_check_sum_of_squares(backend, dtype):
    name, device = backend
    tensors = [t.contiguous() for t in _grads(device, dtype)]
    found, sumsq = torch.zeros(1, device=device), torch.zeros(1, device=device)
    F.non_finite_check(tensors, found, sumsq=sumsq, backend=name)
    expected = squared_norm(tensors)
    assert found.item() == 0.0
    assert abs(sumsq.item() - expected) <= 2e-6 * expected
    # with an inf the flag is set as before (the sum is then unspecified)
    tensors[3][12345] = float("inf")
    found.zero_()
    F.non_finite_check(tensors, found, sumsq=sumsq, backend=name)
    assert found.item() == 1.0


def test_sum_of_squares_argument_errors_change_nothing(fused_backend):
    name, device = fused_backend
    grads = [torch.randn(10, device=device), torch.randn(7, device=device)]
    out = torch.zeros(32, device=device)
    for bad, what in ((torch.zeros(2, device=device), "1-element"), (torch.zeros(1, dtype=torch.float64, device=device),
                                                                     "float32"), (out[20:21], "inside out")):
        with pytest.raises((ValueError, TypeError, RuntimeError), match=what):
            F.pack(grads, out, scale=1.0, sumsq=bad, backend=name)
        assert not out.any(), "a rejected call wrote into out"
    found = torch.zeros(1, device=device)
    with pytest.raises((ValueError, RuntimeError), match="same memory"):
        _backend_op(name)(grads, found, found)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="sumsq"):
        F.non_finite_check(grads, found, sumsq=torch.zeros(3, device=device), backend=name)


def _backend_op(name):
    from fusedmf.functional import _ops, reference
    return reference.non_finite_check_ if name == "reference" else _ops.op(name, "non_finite_check_")


# ------------------------------------------------------------------------------------------ estimator
def test_estimate_from_norms_hand_computed():
    # |G|² = 4, tr Σ = 64, b = 8, B = 32: E|g_b|² = 4 + 64/8 = 12, E|g_B|² = 4 + 64/32 = 6
    g2, trace = estimate_from_norms(12.0, 6.0, 8, 32)
    assert g2 == pytest.approx(4.0, rel=1e-12) and trace == pytest.approx(64.0, rel=1e-12)
    with pytest.raises(ValueError, match="B > b"):
        estimate_from_norms(1.0, 1.0, 8, 8)


def test_smoothing_is_separate_for_numerator_and_denominator():
    beta = 0.5
    ns = GradientNoiseScale(4, beta=beta)
    samples = [(12.0, 7.0), (20.0, 12.0), (9.0, 8.5)]          # raw (|G|², tr Σ): (2, 40), (4, 64), (8, 4)
    raw = [estimate_from_norms(a, c, 4, 8) for a, c in samples]
    for a, c in samples:
        ns.update(a, c, world_size=2)
    w = [beta ** 2 * (1 - beta), beta * (1 - beta), 1 - beta]
    corr = 1 - beta ** 3
    g2 = sum(wi * r[0] for wi, r in zip(w, raw)) / corr
    tr = sum(wi * r[1] for wi, r in zip(w, raw)) / corr
    assert ns.gradient_sq == pytest.approx(g2, rel=1e-12)
    assert ns.trace_sigma == pytest.approx(tr, rel=1e-12)
    assert ns.value == pytest.approx(tr / g2, rel=1e-12)
    # not the mean of the per-step ratios
    assert ns.value != pytest.approx(sum(wi * r[1] / r[0] for wi, r in zip(w, raw)) / corr, rel=1e-3)
    assert [h["b_simple_raw"] for h in ns.history] == pytest.approx([r[1] / r[0] for r in raw])


def test_invalid_samples_are_kept_out_and_state_round_trips():
    ns = GradientNoiseScale(4, beta=0.9)
    assert ns.value is None and ns.samples == 0
    ns.update(12.0, 6.0, world_size=2)
    v = ns.value
    ns.update(1e9, 1.0, world_size=2, valid=False)          # a skipped step
    ns.update(float("nan"), 1.0, world_size=2)                # a non-finite norm
    ns.update(12.0, 6.0, world_size=1)                        # one rank: no second batch size
    assert ns.samples == 1 and ns.value == v
    assert [h["used"] for h in ns.history] == [True, False, False, False]
    copy = GradientNoiseScale(4, beta=0.9)
    copy.load_state_dict(ns.state_dict())
    ns.update(20.0, 4.0, world_size=2)
    copy.update(20.0, 4.0, world_size=2)
    assert copy.value == ns.value and copy.samples == 2
    with pytest.raises(ValueError, match="batch_size_per_rank"):
        GradientNoiseScale(8).load_state_dict(ns.state_dict())
    # noise that swamps the signal: the |G|² estimate goes negative and B_simple is infinite
    big = GradientNoiseScale(4)
    big.update(10.0, 5.5, world_size=2)                      # g2 = (8·5.5 − 4·10)/4 = 1 > 0
    assert math.isfinite(big.value)
    big.update(10.0, 4.0, world_size=2)
    big.update(10.0, 4.0, world_size=2)
    assert big.value == math.inf


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_batch_size_is_validated(bad):
    with pytest.raises(ValueError, match="batch_size_per_rank"):
        GradientNoiseScale(bad)
    with pytest.raises(ValueError, match="beta"):
        GradientNoiseScale(4, beta=1.0)


# ------------------------------------------------------------------------------------------ noise-adaptive MF
class _FakeNoise:
    batch_size_per_rank = 16

    def __init__(self):
        self.v, self._count = None, 0

    def settled_value(self):
        return self.v

    def settled_samples(self):
        return self._count


def test_noise_adaptive_schedule_hand_computed():
    noise = _FakeNoise()
    s = mf.noise_adaptive(noise, mf_ref=0.9, mf_max=0.99, min_samples=3, max_change=0.01)
    assert s.target(None) == 0.9 and s.target(8.0) == 0.9            # b = 16 >= B_simple: mf_ref
    assert s.target(64.0) == pytest.approx(1 - 0.1 * 16 / 64)        # 0.975
    assert s.target(math.inf) == 0.99                                 # clamped to mf_max
    assert s(1) == 0.9                                                # no estimate yet
    noise.v, noise._count = 64.0, 2
    assert s(2) == 0.9                                                # fewer than min_samples
    noise._count = 3
    assert s(3) == pytest.approx(0.91)                                # at most max_change per update
    assert s(3) == pytest.approx(0.91)                                # same update again: same value
    values = [s(t) for t in range(4, 12)]
    assert values[-1] == pytest.approx(0.975) and max(values) <= 0.975 + 1e-12
    noise.v = 8.0                                                     # noise scale falls below b: back down
    assert s(12) == pytest.approx(0.965)
    with pytest.raises(ValueError, match="increasing"):
        s(5)
    with pytest.raises(TypeError, match="GradientNoiseScale"):
        mf.noise_adaptive(object())


# ------------------------------------------------------------------------------------------ on gloo ranks
@pytest.fixture(scope="module")
def four_ranks():
    return W.ok_results(W.launch(W.noise_scale_suite, 4, pg_timeout=PG_TIMEOUT))


@pytest.fixture(scope="module")
def two_ranks():
    return W.ok_results(W.launch(W.noise_scale_suite, 2, pg_timeout=PG_TIMEOUT))


def _weighted_se(history, beta):
    """The smoothed ratio and (ratio, g2, trace) standard errors from the per-step raw estimates."""
    used = [h for h in history if h["used"]]
    n = len(used)
    w = [beta ** (n - 1 - t) * (1 - beta) for t in range(n)]
    sw = sum(w)
    w = [x / sw for x in w]
    tr = [h["trace_sigma"] for h in used]
    g2 = [h["g2"] for h in used]
    A = sum(wi * x for wi, x in zip(w, tr))
    B = sum(wi * x for wi, x in zip(w, g2))
    mt, mg = sum(tr) / n, sum(g2) / n
    vt = sum((x - mt) ** 2 for x in tr) / (n - 1)
    vg = sum((x - mg) ** 2 for x in g2) / (n - 1)
    c = sum((x - mt) * (y - mg) for x, y in zip(tr, g2)) / (n - 1)
    s2 = sum(x * x for x in w)
    R = A / B
    var_r = R * R * s2 * (vt / A ** 2 + vg / B ** 2 - 2 * c / (A * B))
    return R, math.sqrt(var_r), math.sqrt(s2 * vg), math.sqrt(s2 * vt)


def test_estimate_recovers_the_known_noise_scale(four_ranks):
    r = four_ranks[0]["stat"]
    truth = r["truth"]["trace"] / r["truth"]["g2"]
    assert truth == pytest.approx(64.0)
    R, se, se_g2, se_tr = _weighted_se(r["history"], beta=0.95)
    assert R == pytest.approx(r["value"], rel=1e-9)
    assert se < 0.05 * truth, f"the test would be too loose: standard error {se:.3g} of {truth}"
    assert abs(r["value"] - truth) <= 4 * se, f"B_simple {r['value']:.4g} vs {truth:.4g} (se {se:.3g})"
    assert abs(r["g2"] - r["truth"]["g2"]) <= 4 * se_g2
    assert abs(r["trace"] - r["truth"]["trace"]) <= 4 * se_tr


def test_fused_norms_equal_the_unfused_computation(four_ranks, two_ranks):
    for res in (four_ranks[0]["stat"], two_ranks[0]["stat"], two_ranks[0]["fp16_scaled"]):
        hist, unf = res["history"], res["unfused"]
        assert len(hist) == len(unf) - 1, "the sample of step t is completed at step t + 1"
        assert res["recorded"] == len(hist)
        for h, u in zip(hist, unf):
            if not h["valid"]:
                continue
            assert h["local_sq"] == pytest.approx(u["local"], rel=2e-6)
            # the kernel's |G_B|² is the norm of the reduced (possibly fp16) buffers it read
            assert h["global_sq"] == pytest.approx(u["global_reduced"], rel=2e-6)
        # and the host-side estimator fed the unfused norms gives the same value
        host = GradientNoiseScale(res["state"]["batch_size_per_rank"], beta=res["state"]["beta"])
        for h, u in zip(hist, unf):
            host.update(u["local"], u["global_reduced"], h["world_size"], valid=not u["skipped"])
        assert host.value == pytest.approx(res["value"], rel=1e-5)


def test_compressed_norms_are_unscaled_and_skipped_steps_give_no_sample(two_ranks):
    res = two_ranks[0]["fp16_scaled"]
    hist, unf = res["history"], res["unfused"]
    # loss scales 1024, 64, 4096 in turn: the recorded norms are those of the unscaled gradients;
    # fp16 rounding of the reduced buffer moves |G_B|² by ~2^-11 relative at most
    for h, u in zip(hist, unf):
        if h["valid"]:
            assert h["global_sq"] == pytest.approx(u["global_exact"], rel=2e-3)
    assert [h["valid"] for h in hist] == [t != 5 for t in range(len(hist))]
    assert unf[5]["skipped"] and not any(u["skipped"] for i, u in enumerate(unf) if i != 5)
    assert res["samples"] == len(hist) - 1


def test_every_rank_sees_the_same_samples_and_stays_identical(four_ranks, two_ranks):
    runs = [[r["stat"] for r in four_ranks], [r["stat"] for r in two_ranks], [r["fp16_scaled"] for r in two_ranks]]
    for ranks in runs:
        for r in ranks[1:]:
            assert r["history"] == ranks[0]["history"], "noise samples differ between ranks"
            assert r["mfs"] == ranks[0]["mfs"]
            for a, b in zip(r["params"], ranks[0]["params"]):
                assert torch.equal(a, b), "replicas diverged under the noise-adaptive MF"


def test_noise_adaptive_mf_rises_when_the_per_rank_batch_is_below_the_noise_scale(four_ranks):
    r = four_ranks[0]["stat"]
    mfs = r["mfs"]
    assert mfs[0] == 0.9 and all(b - a <= 0.002 + 1e-12 for a, b in zip(mfs, mfs[1:]))
    # b = 16, B_simple ≈ 64: the target is 1 − 0.1·16/64 = 0.975, reached within 160 steps
    target = 1 - 0.1 * min(1.0, 16 / r["value"])
    assert mfs[-1] == pytest.approx(target, abs=0.004)


def test_distributed_optimizer_rejects_bad_noise_arguments_without_touching_the_model():
    from fusedmf.comm import DistributedOptimizer
    from fusedmf.optim import MFSGD

    model = torch.nn.Linear(4, 3)
    opt = MFSGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="world size >= 2"):        # one process: one batch size only
        DistributedOptimizer(opt, noise_scale=GradientNoiseScale(8))
    with pytest.raises(TypeError, match="GradientNoiseScale"):
        DistributedOptimizer(opt, noise_scale=8)
    # no hooks were left behind: a plain backward + step still works and updates the params
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
