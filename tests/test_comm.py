"""fusedmf.comm: DistributedOptimizer, the DDP hook, telemetry and the pack op, on gloo ranks (CPU).

The multi-rank checks run in a few launches of 2 or 4 processes on 127.0.0.1 (tests/_comm_workers.py);
a failure on any rank fails the test with that rank's traceback.

Tolerances (derived, not guessed; see also fusedmf/comm/distributed_optimizer.py):
a reduced gradient element differs from the exact mean of the ranks' gradients by at most
e = N·u·mean_r|g_r| (+ N·2^-25 for fp16, where subnormals end), u = 2^-11 (fp16), 2^-8 (bf16): one
rounding of each g_r/N and N - 1 rounded additions. With compression "none" the only difference to
single-process training on the whole batch is the order of the fp32 sums (per-rank means of B/N
samples, then N terms, against one mean of B samples): u = B·2^-24 with B the global batch.
These per-element errors are propagated to first order through the actual reference trajectory
(SGD: lr·Σ_t Σ_s μ^(t-s)·e_s; Adam: the derivative of lr·m̂/(√v̂+ε) in m and v, with m, v of the
reference run), and the test asserts |Δp| <= 2·bound + 4·T·2^-24·|p|: measured errors sit at 5–30%
of the bound, so the factor 2 covers the second-order (trajectory feedback) terms, and a wrong scale,
a missing prescale or a double rounding would exceed it by orders of magnitude.
"""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch

import _comm_workers as W
from fusedmf import DynamicLossScaler
from fusedmf import functional as F
from fusedmf.comm import DistributedOptimizer, assign_buckets, merge_chrome_traces
from fusedmf.functional.pack import PACK_ALIGN_BYTES, pack_, slot_strides, slot_view
from fusedmf.optim import MFSGD

from _util import assert_bit_identical

U = {"none": None, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
PG_TIMEOUT = 10.0


#: what every step of these tests must have run: the compiled CPU kernels (NOTE [compiled backends ran])
COMPILED = {"pack": "cpu", "non_finite_check": "cpu"}


@pytest.fixture(autouse=True)
def _compiled_backends_only():
    """NOTE [compiled backends ran]: the comm suite is about the compiled pack / non-finite-check /
    update kernels, so a silent fallback to the reference backend must fail it, not pass it: the
    fallback notices are errors here (and in every rank, W.fallback_warnings_are_errors), and the tests
    assert the backends_used values. Without the CPU extension the suite skips with the reason (fails
    where FUSEDMF_REQUIRE_BACKENDS lists cpu, as in CI)."""
    from conftest import require_backend

    require_backend("cpu")
    with warnings.catch_warnings():
        W.fallback_warnings_are_errors()
        yield


# ------------------------------------------------------------------------------------------ references
def reference_with_bound(opt_name: str, compression: str, world_size: int, steps: int):
    """Single-process training on the whole batch, and the per-element first-order bound of how far
    DistributedOptimizer's result may be from it (module docstring)."""
    model = W.Net(0)
    opt = W.make_optimizer(opt_name, model.parameters())
    params = list(model.parameters())
    u = U[compression] if U[compression] is not None else W.GLOBAL_BATCH * 2.0 ** -24
    floor = world_size * 2.0 ** -25 if compression == "fp16" else 0.0
    z = lambda: [torch.zeros_like(p, dtype=torch.float64) for p in params]  # noqa: E731
    bound, acc, m, v, me, ve = z(), z(), z(), z(), z(), z()
    for t in range(steps):
        x, y = W.batch(t)
        mean_abs = z()
        for r in range(world_size):  # mean_r |g_r|
            model.zero_grad()
            W.loss_fn(model, W.shard(x, r, world_size), W.shard(y, r, world_size)).backward()
            for a, p in zip(mean_abs, params):
                a += p.grad.double().abs() / world_size
        model.zero_grad()
        W.loss_fn(model, x, y).backward()
        for i, p in enumerate(params):
            e = world_size * u * mean_abs[i] + floor
            if opt_name == "sgd":
                mu = min(0.95, 0.8 + 0.01 * (t + 1))
                acc[i].mul_(mu if t else 0.0).add_(e)
                bound[i].add_(W.SGD_KW["lr"] * acc[i])
            else:
                (b1, b2), lr, eps = W.ADAM_KW["betas"], W.ADAM_KW["lr"], 1e-8
                g = p.grad.double() + W.ADAM_KW["weight_decay"] * p.detach().double()
                m[i].mul_(b1).add_((1 - b1) * g)
                v[i].mul_(b2).add_((1 - b2) * g * g)
                me[i].mul_(b1).add_((1 - b1) * e)
                ve[i].mul_(b2).add_((1 - b2) * 2 * g.abs() * e)
                bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
                sv = (v[i] / bc2).sqrt()
                bound[i].add_(lr * (me[i] / bc1 / (sv + eps)
                                    + m[i].abs() / bc1 / (sv + eps) ** 2 * (ve[i] / bc2) / (2 * sv + 1e-300)))
        opt.step()
        opt.zero_grad()
    return W.params_of(model), bound


def assert_within_bound(actual, expected, bound, steps, name):
    for i, (a, e, b) in enumerate(zip(actual, expected, bound)):
        err = (a.double() - e.double()).abs()
        tol = 2 * b + 4 * steps * 2.0 ** -24 * e.double().abs()
        bad = err > tol
        if bad.any():
            idx = bad.nonzero()[:3].tolist()
            rows = ", ".join(f"{tuple(j)}: err {err[tuple(j)].item():.3g} > tol {tol[tuple(j)].item():.3g}" for j in idx)
            raise AssertionError(f"{name}, param {i}: {int(bad.sum())} of {bad.numel()} elements outside the "
                                 f"compression bound; {rows}")


def assert_same_on_every_rank(per_rank_params, name):
    for r, ps in enumerate(per_rank_params[1:], start=1):
        for i, (a, b) in enumerate(zip(per_rank_params[0], ps)):
            assert_bit_identical(b, a, f"{name}: param {i} on rank {r} vs rank 0")


# ------------------------------------------------------------------------------------------ launches
@pytest.fixture(scope="module")
def two_ranks():
    return W.ok_results(W.launch(W.suite_two_ranks, 2, pg_timeout=PG_TIMEOUT))


@pytest.fixture(scope="module")
def four_ranks():
    return W.ok_results(W.launch(W.suite_four_ranks, 4, pg_timeout=PG_TIMEOUT))


# ------------------------------------------------------------------------------------------ pack op
def test_pack_layout_values_and_padding():
    torch.manual_seed(0)
    grads = [torch.randn(3, 5), torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last),
             torch.randn(7).bfloat16(), torch.randn(0), torch.randn(1, dtype=torch.float64), torch.randn(9)[::2]]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        elem = torch.empty((), dtype=dtype).element_size()
        offsets, total = F.pack_offsets([g.numel() for g in grads], elem)
        assert all(o * elem % PACK_ALIGN_BYTES == 0 for o in offsets), offsets
        assert offsets[0] == 0 and total >= sum(g.numel() for g in grads)
        out = torch.full((total + 3,), 7.0, dtype=dtype)
        used = torch.zeros(total + 3, dtype=torch.bool)
        ran = F.pack(grads, out, scale=0.25)
        assert ran in ("reference", "cpu")
        for g, off in zip(grads, offsets):
            view = slot_view(out, off, g.shape, slot_strides(g))
            want = (g.to(torch.float64) * 0.25).to(torch.float32 if g.dtype != torch.float64 else torch.float64).to(dtype)
            assert_bit_identical(view, want, f"slot of a {g.dtype} grad {list(g.shape)} in {dtype}")
            used[off:off + g.numel()] = True
        assert (out[~used] == 7.0).all(), "pack wrote outside the slots (padding must be left alone)"
    cl = slot_strides(grads[1])
    assert cl == grads[1].stride(), "a channels_last grad keeps its layout in its slot"


def test_pack_checks_its_arguments():
    g = [torch.randn(10)]
    with pytest.raises(ValueError, match="elements of out"):
        F.pack(g, torch.zeros(8), scale=1.0)
    with pytest.raises(ValueError, match="1-D"):
        F.pack(g, torch.zeros(4, 4), scale=1.0)
    with pytest.raises(ValueError, match="16-byte"):
        F.pack(g, torch.zeros(40)[1:], scale=1.0)
    with pytest.raises(TypeError, match="dtype"):
        F.pack(g, torch.zeros(16, dtype=torch.int32), scale=1.0)


def test_pack_fp16_prescale_does_not_overflow():
    """g/N is formed before the cast: 60000·8 would overflow fp16 if summed first; /8 is exact."""
    g = torch.full((4,), 60000.0)
    out = torch.zeros(8, dtype=torch.float16)
    pack_([g], out, 1.0 / 8)
    assert torch.isfinite(out).all() and out[:4].float().eq(7500.0).all()


# ------------------------------------------------------------------------------------------ buckets
def test_bucket_assignment_rules():
    params = [torch.zeros(n) for n in (10, 300_000, 20, 40_000, 40_000, 5)] + [torch.zeros(8, dtype=torch.bfloat16)]
    buckets = assign_buckets(params, comm_dtype_of=lambda p: p.dtype, bucket_cap_mb=0.2, first_bucket_cap_mb=0.01)
    seen = [i for b in buckets for i in b.params]
    assert sorted(seen) == list(range(len(params))), "every param in exactly one bucket, never split"
    # reverse registration order; the bf16 param has its own (device, dtype) bucket
    assert buckets[0].params == [6] and buckets[0].dtype == torch.bfloat16
    assert buckets[1].params == [5], "the first fp32 bucket is small (first_bucket_cap_mb)"
    assert [b.params for b in buckets[2:]] == [[4], [3, 2], [1], [0]], "closed before a param would overflow the cap"
    assert buckets[4].nbytes > 0.2 * 2**20, "a param larger than the cap gets a bucket of its own"
    for b in buckets:
        assert b.params == sorted(b.params, reverse=True)
        elem = torch.empty((), dtype=b.dtype).element_size()
        assert all(o * elem % 16 == 0 for o in b.offsets)
    fp16 = assign_buckets(params, comm_dtype_of=lambda p: torch.float16, bucket_cap_mb=0.2, first_bucket_cap_mb=0.01)
    assert {b.dtype for b in fp16} == {torch.float16} and fp16[0].params == [6, 5]


# ------------------------------------------------------------------------------------------ world size 1, in process
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_world_size_one_without_process_group_matches_the_optimizer(opt_name):
    a, b = W.Net(0), W.Net(0)
    dopt = DistributedOptimizer(W.make_optimizer(opt_name, a.parameters()), compression="none", **W.BUCKETS)
    opt = W.make_optimizer(opt_name, b.parameters())
    assert dopt.world_size == 1 and len(dopt.buckets) == 3
    for t in range(5):
        x, y = W.batch(t)
        W.loss_fn(a, x, y).backward()
        dopt.step()
        dopt.zero_grad()
        W.loss_fn(b, x, y).backward()
        opt.step()
        opt.zero_grad()
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        assert_bit_identical(p, q, f"param {i}")
    sd = dopt.state_dict()
    assert sd.pop("distributed") == {"steps": 5}
    assert W.state_digest(sd) == W.state_digest(opt.state_dict())
    assert dopt.backends_used == {**COMPILED, "update": {"cpu": 6}}, dopt.backends_used


def test_fp16_params_with_loss_scaler_match_the_plain_optimizer():
    """fp16 params + fp32 masters, DynamicLossScaler.step(dopt): the unscale happens in the update,
    the scaler's found_inf is updated in place by the reduced-buffer check (an inf makes it back off)."""
    a, b = W.Net(0).half(), W.Net(0).half()
    dopt = DistributedOptimizer(MFSGD(a.parameters(), lr=0.05, momentum=0.9), compression="fp16")
    opt = MFSGD(b.parameters(), lr=0.05, momentum=0.9)
    sa, sb = DynamicLossScaler(init_scale=2.0 ** 10), DynamicLossScaler(init_scale=2.0 ** 10)
    for t in range(4):
        x, y = W.batch(t)
        for model, scaler, o in ((a, sa, dopt), (b, sb, opt)):
            xx = x.half().clone()
            if t == 2:
                xx[0, 0, 0, 0] = float("inf")
            scaler.scale(W.loss_fn(model, xx, y.half())).backward()
            scaler.step(o)
            scaler.update()
            o.zero_grad()
    assert dopt.last_step_skipped is False and sa.get_scale() == sb.get_scale() == 2.0 ** 9
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        assert_bit_identical(p, q, f"param {i}")


def test_fp16_unscale_and_clip_equal_the_fp32_recipe():
    """fp16 params (fp32 masters) with DynamicLossScaler.unscale_ + clip_grad_norm_ against fp32 params
    with torch.amp.GradScaler.unscale_ + clip_grad_norm_, from the same gradients (fp16 values, scaled by
    S = 2^10, exact in both). Differences: the fp16 norm (each per-tensor norm and the total rounded
    once: <= 3·u16 relative) and the fp16 multiply by the clip coefficient (one more rounding), so each
    clipped gradient is within 4·u16·|g_clipped| of fp32's; propagated through SGD with momentum as in
    reference_with_bound, plus half an fp16 ulp for the model copy."""
    torch.manual_seed(3)
    shapes, lr, mu, S, max_norm = ((37,), (5, 7)), 0.1, 0.9, 2.0 ** 10, 0.5
    init = [torch.randn(s).half() for s in shapes]
    p16 = [x.clone().requires_grad_() for x in init]
    p32 = [x.float().requires_grad_() for x in init]
    o16, o32 = MFSGD(p16, lr=lr, momentum=mu), MFSGD(p32, lr=lr, momentum=mu)
    s16 = DynamicLossScaler(init_scale=S)
    s32 = torch.amp.GradScaler("cpu", init_scale=S)
    s16.scale(torch.ones(())), s32.scale(torch.ones(()))
    u16 = 2.0 ** -11
    acc = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    bound = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for t in range(3):
        grads = [(torch.randn(s) * 0.5).half() for s in shapes]
        for p, g in zip(p16, grads):
            p.grad = g * S                       # exact: a power of 2, no overflow
        for p, g in zip(p32, grads):
            p.grad = g.float() * S
        s16.unscale_(o16)
        assert all(torch.equal(p.grad, g) for p, g in zip(p16, grads)), "unscale_ by 2^10 is exact"
        n16 = torch.nn.utils.clip_grad_norm_(p16, max_norm)
        s32.unscale_(o32)
        n32 = torch.nn.utils.clip_grad_norm_(p32, max_norm)
        assert n32 > max_norm, "the test should clip"
        assert abs(float(n16) - float(n32)) <= 3 * u16 * float(n32), (float(n16), float(n32))
        for a, b in zip(p16, p32):
            assert ((a.grad.double() - b.grad.double()).abs() <= 4 * u16 * b.grad.double().abs()).all()
        for i, b in enumerate(p32):
            acc[i].mul_(mu if t else 0.0).add_(4 * u16 * b.grad.double().abs())
            bound[i].add_(lr * acc[i])
        s16.step(o16), s32.step(o32)
        s16.update(), s32.update()
    for i, (a, b) in enumerate(zip(p16, p32)):
        master = o16.state[a]["master_param"]
        err = (master.double() - b.detach().double()).abs()
        assert (err <= 2 * bound[i] + 4 * 2.0 ** -24 * b.detach().double().abs()).all(), f"master {i}: {err.max()}"
        assert torch.equal(a.detach(), master.half()), "the fp16 model copy is the rounded master"
    with pytest.raises(RuntimeError, match="already called"):
        for p in p16:
            p.grad = torch.ones_like(p)
        s16.unscale_(o16)
        s16.unscale_(o16)


@pytest.mark.parametrize("kind", ["mfsgd", "torch_sgd"])
def test_add_param_group_and_zero_grad_after_synchronize(kind):
    """add_param_group on the wrapper rebuilds the buckets (the new param is updated from them);
    after synchronize() p.grad is a view of a bucket, and zero_grad never leaves one behind."""
    a = W.Net(0)
    extra = torch.nn.Parameter(torch.ones(5))
    dopt = DistributedOptimizer(W.make_inner(kind, a.parameters()), compression="none", **W.BUCKETS)
    dopt.add_param_group({"params": [extra], "lr": 0.5})
    assert dopt.param_groups is dopt.optimizer.param_groups and len(dopt.param_groups) == 2
    assert sum(len(b.params) for b in dopt.buckets) == 7
    x, y = W.batch(0)
    (W.loss_fn(a, x, y) + extra.sum()).backward()
    dopt.synchronize()
    views = dopt.reduced_grads()
    assert extra.grad.data_ptr() == views[extra].data_ptr(), "p.grad is the bucket view (same dtype)"
    dopt.step()
    assert torch.equal(extra.detach(), torch.full((5,), 0.5)), "the added group's lr was used"
    dopt.zero_grad(set_to_none=False)
    assert all(p.grad is None or p.grad.data_ptr() != views[p].data_ptr() for p in views)
    assert all(not p.grad.any() for p in views if p.grad is not None)


@pytest.mark.parametrize("kind", ["mfsgd", "torch_sgd"])
def test_torch_grad_scaler_recipe_and_overflow_skip_through_the_wrapper(kind):
    """World size 1, compression "none" (the reduced gradient is the gradient times 1/1, exactly):
    torch.amp.GradScaler with synchronize + unscale_ + clip_grad_norm_ through the wrapper equals the same
    recipe on the plain optimizer bit for bit, and an overflowing step is skipped by both, state untouched."""
    a, b = W.Net(0), W.Net(0)
    dopt = DistributedOptimizer(W.make_inner(kind, a.parameters()), compression="none", **W.BUCKETS)
    opt = W.make_inner(kind, b.parameters())
    sa, sb = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6), torch.amp.GradScaler("cpu", init_scale=2.0 ** 6)
    for t in range(4):
        x, y = W.batch(t)
        for model, scaler, o in ((a, sa, dopt), (b, sb, opt)):
            xx = x.clone()
            if t == 2:
                xx[0, 0, 0, 0] = float("inf")
            scaler.scale(W.loss_fn(model, xx, y)).backward()
            if o is dopt:
                o.synchronize()
            scaler.unscale_(o)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(o)
            scaler.update()
            o.zero_grad()
        if t == 2:
            assert dopt.last_step_skipped is True
    assert sa.get_scale() == sb.get_scale() == 2.0 ** 5
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        assert_bit_identical(p, q, f"param {i}")
    sd = dopt.state_dict()
    sd.pop("distributed")
    assert W.state_digest(sd) == W.state_digest(opt.state_dict())


def test_constructor_and_step_errors():
    model = W.Net(0)
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        DistributedOptimizer(object())
    with pytest.raises(ValueError, match="compression"):
        DistributedOptimizer(MFSGD(model.parameters(), lr=0.1), compression="int8")
    with pytest.raises(ValueError, match="backward_passes_per_step"):
        DistributedOptimizer(MFSGD(model.parameters(), lr=0.1), backward_passes_per_step=0)
    model = W.Net(0, extra=True)          # branch and spare get no gradient
    dopt = DistributedOptimizer(MFSGD(model.parameters(), lr=0.1), find_unused_parameters=False)
    x, y = W.batch(0)
    with pytest.raises(RuntimeError, match=r"4 parameter\(s\) got no gradient .*find_unused_parameters=True"):
        W.loss_fn(model, x, y).backward()   # raised when backward ends
    dopt.remove_hooks()


@pytest.mark.parametrize("mode", ["no_sync", "passes", "early_step"])
def test_grad_from_an_earlier_micro_batch_only_is_communicated(mode):
    """`branch` is used in the first micro-batch only: its accumulated gradient still takes part.
    early_step: step() after 1 of backward_passes_per_step=3 passes communicates what there is."""
    a, b = W.Net(2, extra=True), W.Net(2, extra=True)
    k = 3 if mode == "early_step" else 2
    dopt = DistributedOptimizer(MFSGD(a.parameters(), lr=0.1, momentum=0.9), compression="none",
                                backward_passes_per_step=1 if mode == "no_sync" else k, **W.BUCKETS)
    opt = MFSGD(b.parameters(), lr=0.1, momentum=0.9)
    x, y = W.batch(0)
    micro = 1 if mode == "early_step" else 2
    for m in range(micro):
        xm, ym = W.shard(x, m, 2), W.shard(y, m, 2)
        if mode == "no_sync" and m == 0:
            with dopt.no_sync():
                W.loss_fn(a, xm, ym, use_branch=True).backward()
        else:
            W.loss_fn(a, xm, ym, use_branch=m == 0).backward()
        W.loss_fn(b, xm, ym, use_branch=m == 0).div(micro).backward()
    dopt.step()
    opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), n
    assert not torch.equal(a.branch.weight, W.Net(2, extra=True).branch.weight), "branch was not updated"


def test_unused_parameters_world_size_one():
    model = W.Net(2, extra=True)
    dopt = DistributedOptimizer(MFSGD(model.parameters(), lr=0.1, momentum=0.9), compression="none")
    before = W.params_of(model)
    x, y = W.batch(0)
    W.loss_fn(model, x, y).backward()
    dopt.step()
    names = [n for n, _ in model.named_parameters()]
    for n, p, q in zip(names, model.parameters(), before):
        assert torch.equal(p, q) == n.startswith(("branch", "spare")), n
    assert all(i not in dopt.state_dict()["state"] for i, n in enumerate(names) if n.startswith(("branch", "spare")))


# ------------------------------------------------------------------------------------------ 2 and 4 ranks
@pytest.mark.parametrize("compression", ["none", "fp16", "bf16"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_two_ranks_match_single_process_training(two_ranks, opt_name, compression):
    key = f"train/{opt_name}/{compression}"
    per_rank = [r[key]["params"] for r in two_ranks]
    for r in two_ranks:
        assert r[key]["backends"] == {**COMPILED, "update": {"cpu": 6}}, r[key]["backends"]
    assert_same_on_every_rank(per_rank, key)
    assert len({r[key]["state"] for r in two_ranks}) == 1, "state_dict differs between ranks"
    assert len(two_ranks[0][key]["layout"]) == 3, "the test model should spread over several buckets"
    ref, bound = reference_with_bound(opt_name, compression, 2, 20)
    assert_within_bound(per_rank[0], ref, bound, 20, key)
    if compression != "none":   # the compression really happened: not bit-equal to the uncompressed run
        none = two_ranks[0][f"train/{opt_name}/none"]["params"]
        assert any(not torch.equal(a, b) for a, b in zip(per_rank[0], none))


@pytest.mark.parametrize("key", ["train/sgd/none", "train/adam/none", "train/sgd/fp16", "train/adam/bf16"])
def test_four_ranks_match_single_process_training(four_ranks, key):
    _, opt_name, compression = key.split("/")
    per_rank = [r[key]["params"] for r in four_ranks]
    for r in four_ranks:
        assert r[key]["backends"] == {**COMPILED, "update": {"cpu": 6}}, r[key]["backends"]
    assert_same_on_every_rank(per_rank, key)
    assert len({r[key]["state"] for r in four_ranks}) == 1
    ref, bound = reference_with_bound(opt_name, compression, 4, 20)
    assert_within_bound(per_rank[0], ref, bound, 20, key)


@pytest.mark.parametrize("mode", ["passes", "no_sync"])
def test_accumulation_equals_one_step_on_the_union(two_ranks, mode):
    """2 micro-batches per rank per step (backward_passes_per_step=2, or no_sync for the first): the
    same as single-process steps on the union (the whole batch)."""
    per_rank = [r[f"accum/{mode}"]["params"] for r in two_ranks]
    assert_same_on_every_rank(per_rank, mode)
    ref, bound = reference_with_bound("sgd", "none", 2, 10)
    assert_within_bound(per_rank[0], ref, bound, 10, f"accumulation ({mode})")


def test_accumulation_four_ranks(four_ranks):
    per_rank = [r["accum/passes"]["params"] for r in four_ranks]
    assert_same_on_every_rank(per_rank, "accum/passes")
    ref, bound = reference_with_bound("adam", "none", 4, 8)
    assert_within_bound(per_rank[0], ref, bound, 8, "accumulation, 4 ranks")


@pytest.mark.parametrize("case", ["sgd/0", "sgd/3", "adam/0", "adam/3"])
def test_non_finite_grad_on_one_rank_skips_everywhere(two_ranks, case):
    for rank, r in enumerate(two_ranks):
        s = r["skip"][case]
        assert s["skipped"] is True, f"rank {rank} did not skip"
        assert s["params_unchanged"], f"rank {rank}: params changed on a skipped step"
        first = case.endswith("/0")
        assert s["steps"] == ([0] if first else [3]), f"rank {rank}: step counts advanced: {s['steps']}"
        if first:   # the optimizer may allocate its (zero) buffers; nothing may hold a value yet
            assert s["state_zero"], f"rank {rank}: state written on a skipped first step"
        else:
            assert s["state_unchanged"], f"rank {rank}: optimizer state changed on a skipped step"
        after = r["skip"][f"{case}/after"]
        assert after["skipped"] is False and after["steps"] == ([1] if first else [4])
    assert_same_on_every_rank([r["skip"][f"{case}/after"]["params"] for r in two_ranks], case)


def test_loss_scaler_decides_the_same_on_every_rank(two_ranks):
    for rank, r in enumerate(two_ranks):
        assert r["scaler"]["skipped"] == [False, True, False], f"rank {rank}: {r['scaler']['skipped']}"
        assert r["scaler"]["scales"] == [2.0 ** 8, 2.0 ** 7, 2.0 ** 7], f"rank {rank}: {r['scaler']['scales']}"
    assert_same_on_every_rank([r["scaler"]["params"] for r in two_ranks], "loss scaler")


def test_unused_parameters_across_ranks(two_ranks):
    """`spare` gets no grad anywhere (not updated, no state); `branch` only on rank 0 (updated with
    the average, zeros from rank 1), identically on both ranks, as single-process training of the
    same objective."""
    u0, u1 = two_ranks[0]["unused"], two_ranks[1]["unused"]
    assert_same_on_every_rank([u0["params"], u1["params"]], "unused")
    for name, p, q in zip(u0["names"], u0["params"], u0["before"]):
        assert torch.equal(p, q) == name.startswith("spare"), name
        assert (u0["steps"][name] is None) == name.startswith("spare"), (name, u0["steps"][name])
    model = W.Net(2, extra=True)
    opt = W.make_optimizer("sgd", model.parameters())
    for t in range(4):
        x, y = W.batch(t)
        loss = sum(W.loss_fn(model, W.shard(x, r, 2), W.shard(y, r, 2), use_branch=r == 0) for r in range(2)) / 2
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, a, e in zip(u0["names"], u0["params"], W.params_of(model)):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-6), f"{name}: max err {(a - e).abs().max().item():.3g}"


def test_state_dict_identical_on_every_rank_and_round_trips(two_ranks):
    rt = [r["roundtrip"] for r in two_ranks]
    assert rt[0]["digest_at_6"] == rt[1]["digest_at_6"]
    for r in rt:
        for i, (a, b) in enumerate(zip(r["resumed"], r["full"])):
            assert_bit_identical(a, b, f"param {i} after resuming from the step-6 checkpoint")
        assert r["digest_resumed_state"] == r["digest_full_state"]


def test_telemetry_shows_overlap_in_the_timeline(two_ranks, tmp_path):
    for rank, r in enumerate(two_ranks):
        tel = r["telemetry"]
        assert all(tel["overlapped"]), f"rank {rank}: a step without overlap: {tel['overlapped']}"
        last = tel["steps"][-1]
        assert last["bytes_sent"] == sum(b["bytes"] for b in last["buckets"]) > 0
        assert last["wire_bytes"] == pytest.approx(last["bytes_sent"])    # 2(N-1)/N = 1 for N = 2
        assert last["exposed_comm_s"] is not None and last["exposed_comm_s"] >= 0
        for b in last["buckets"]:
            assert b["ready"] <= b["packed"] <= b["start"] <= b["end"], b
        # the same fact, read from the Chrome trace: an allreduce span starts inside the backward span
        events = [e for e in tel["trace"]["traceEvents"] if e["ph"] == "X"]
        backward = [e for e in events if e["name"].startswith("backward")]
        allreduce = [e for e in events if e["name"].startswith("allreduce")]
        assert len(backward) == 4 and len(allreduce) == 4 * len(last["buckets"])
        bw = backward[-1]
        assert any(bw["ts"] <= e["ts"] < bw["ts"] + bw["dur"] for e in allreduce), "no allreduce started during backward"
        assert tel["summary"]["overlapped_steps"] == 4
    merged = merge_chrome_traces([r["telemetry"]["trace"] for r in two_ranks])
    path = tmp_path / "comm_trace.json"
    path.write_text(json.dumps(merged))
    pids = {e["pid"] for e in json.loads(path.read_text())["traceEvents"]}
    assert pids == {0, 1}


def test_ddp_hook_compresses_and_fuses_the_update(two_ranks):
    d0 = two_ranks[0]["ddp"]
    # decompress mode: fp16 grads within the compression bound of the uncompressed (mean) grads
    model = W.Net(0)
    x, y = W.batch(0)
    mean_abs = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    for r in range(2):
        model.zero_grad()
        W.loss_fn(model, W.shard(x, r, 2), W.shard(y, r, 2)).backward()
        for a, p in zip(mean_abs, model.parameters()):
            a += p.grad.double().abs() / 2
    for i, (g16, g, a) in enumerate(zip(d0["grads/fp16"], d0["grads/none"], mean_abs)):
        tol = 2 * 2.0 ** -11 * a + 2 * 2.0 ** -25
        assert ((g16.double() - g.double()).abs() <= tol).all(), f"grad {i}"
        assert g16.dtype == torch.float32
    assert not all(torch.equal(a, b) for a, b in zip(d0["grads/fp16"], d0["grads/none"]))
    # fused update inside the hook == DistributedOptimizer with the same compression, bit for bit
    for i, (a, b) in enumerate(zip(d0["fused_update"], d0["distopt"])):
        assert_bit_identical(a, b, f"param {i}: DDP hook with fused update vs DistributedOptimizer")
    assert_same_on_every_rank([r["ddp"]["fused_update"] for r in two_ranks], "ddp fused update")
    assert d0["fused_update_backends"] == {**COMPILED, "update": {"cpu": 6}}, d0["fused_update_backends"]


def test_second_backward_without_no_sync_is_a_clear_error(two_ranks):
    for r in two_ranks:
        assert "no_sync" in r["no_grad_twice"]["message"]
    assert_same_on_every_rank([r["no_grad_twice"]["params"] for r in two_ranks], "after zero_grad drained the round")


# ------------------------------------------------------------------------------------------ failures
def test_mismatched_models_raise_a_clear_error_on_every_rank():
    results = W.ok_results(W.launch(W.mismatch_scenario, 2, pg_timeout=PG_TIMEOUT))
    expected = {
        "shape": "parameter 2 (param group 0, index 2) has shape [16, 144], dtype float32 on rank 0 but "
                 "parameter 2 (param group 0, index 2) has shape [17, 144], dtype float32 on rank 1",
        "count": "rank 0 has 6 parameters, rank 1 has 10",
        "dtype": "dtype float32 on rank 0 but parameter 0 (param group 0, index 0) has shape [4, 2, 3, 3], "
                 "dtype float64 on rank 1",
        "compression": "setting compression is 'fp16' on rank 0 but 'bf16' on rank 1",
    }
    for rank, r in enumerate(results):
        for case, text in expected.items():
            assert r[case] is not None, f"rank {rank}: no error for a {case} mismatch"
            assert text in r[case], f"rank {rank}, {case}: {r[case]}"


def test_killed_rank_gives_an_error_not_a_hang():
    start = time.monotonic()
    results = W.launch(W.killed_scenario, 2, pg_timeout=PG_TIMEOUT, timeout=60)
    elapsed = time.monotonic() - start
    assert results[1] == ("exit", 3), results[1]
    status, r0 = results[0]
    assert status == "ok", r0
    assert r0["error"] is not None and r0["error"].startswith("CommError"), r0
    assert "rank 0 of 2" in r0["error"] and r0["step"] == 2
    assert r0["elapsed"] < PG_TIMEOUT + 5, f"the error took {r0['elapsed']:.1f} s"
    assert elapsed < 60


def test_rank_that_never_joins_times_out():
    results = W.ok_results(W.launch(W.never_joins_scenario, 2, pg_timeout=PG_TIMEOUT, wait_s=2.0, sleep=6.0))
    r0 = results[0]
    assert r0["error"] is not None and r0["error"].startswith("CommError"), r0
    assert "within 2 s" in r0["error"] and "construct" in r0["error"]
    assert 1.5 < r0["elapsed"] < PG_TIMEOUT, r0["elapsed"]


def test_process_group_of_one_rank():
    (r,) = W.ok_results(W.launch(W.one_rank_scenario, 1, pg_timeout=PG_TIMEOUT))
    # not bit-identical to this process: the child runs 1 thread, so conv/matmul sum in another order
    ref, bound = reference_with_bound("adam", "none", 1, 5)
    assert_within_bound(r["params"], ref, bound, 5, "process group of one rank")


# ------------------------------------------------------------------------------------------ a torch Optimizer
@pytest.fixture(scope="module")
def surface():
    return W.ok_results(W.launch(W.surface_suite, 2, pg_timeout=PG_TIMEOUT))


@pytest.mark.parametrize("kind", ["mfsgd", "torch_sgd"])
def test_replicas_start_from_rank_0_and_stay_bit_identical(surface, kind):
    """Different seeds per rank, BatchNorm, module=: after construction every parameter and buffer is
    rank 0's; after 5 steps parameters and running statistics are bit-identical on both ranks."""
    r0, r1 = (r[f"surface/{kind}"] for r in surface)
    init0 = W.BNNet(10).state_dict()
    assert any(not torch.equal(a, b) for a, b in zip(init0.values(), W.BNNet(11).state_dict().values()))
    for r in (r0, r1):
        for name, v in r["after_construction"].items():
            assert_bit_identical(v, init0[name], f"{name} after construction")
    for name in r0["final"]:
        assert_bit_identical(r1["final"][name], r0["final"][name], f"{name} after training, rank 1 vs rank 0")
    assert not torch.equal(r0["final"]["bn.running_mean"], init0["bn.running_mean"]), "BN statistics never moved"


def test_broadcast_buffers_false_keeps_each_ranks_statistics(surface):
    """broadcast_buffers=False: buffers are broadcast at construction only; afterwards each rank's BatchNorm
    statistics follow its own batches, while the parameters stay identical."""
    r0, r1 = (r["surface/own_buffers"] for r in surface)
    init0 = W.BNNet(10).state_dict()
    for name, v in r1["after_construction"].items():
        assert_bit_identical(v, init0[name], f"{name} after construction")
    assert not torch.equal(r0["final"]["bn.running_mean"], r1["final"]["bn.running_mean"])
    for name, _ in W.BNNet(0).named_parameters():
        assert_bit_identical(r1["final"][name], r0["final"][name], name)


@pytest.mark.parametrize("kind", ["mfsgd", "torch_sgd"])
def test_wrapper_is_an_optimizer_for_schedulers_and_hooks(surface, kind):
    for r in (s[f"surface/{kind}"] for s in surface):
        assert r["is_optimizer"] and r["same_groups"]
        assert r["fired"] == {"pre": 5, "post": 5, "inner_post": 5}, r["fired"]
        assert r["lrs"] == [0.1, 0.1, 0.05, 0.05, 0.025], r["lrs"]
        assert not any("lr_scheduler.step()" in w for w in r["warnings"]), r["warnings"]
        assert r["layout_names"][0] == ["fc.bias"], "bucket reports use named_parameters"
        assert sorted(n for b in r["layout_names"] for n in b) == sorted(n for n, _ in W.BNNet(0).named_parameters())
        want = {"cpu": 6} if kind == "mfsgd" else {"torch.optim.sgd.SGD": 6}
        assert r["backends"] == {**COMPILED, "update": want}, r["backends"]


@pytest.mark.parametrize("variant", ["", "/sum", "/predivide"])
@pytest.mark.parametrize("kind", ["mfsgd", "torch_sgd"])
def test_step_lr_on_the_wrapper_sets_the_lr_the_update_uses(surface, kind, variant):
    """w_{t+1} = w_t - lr_t · G_t with lr_t = 2^-t and G_t the mean of the ranks' gradients (op=Sum:
    their sum; gradient_predivide_factor=4: /4 before the sum, ·2 after, the mean again): every number
    is exact in binary, so the check is bitwise."""
    w = torch.zeros(8)
    for t, got in enumerate(surface[0][f"lr/{kind}{variant}"]):
        total = sum(torch.arange(8, dtype=torch.float32) * (r + 1) + t for r in range(2))
        w = w - 0.5 ** t * (total if variant == "/sum" else total / 2)
        assert_bit_identical(got, w, f"w after step {t}")
    assert_bit_identical(surface[1][f"lr/{kind}{variant}"][-1], w, "rank 1")


def test_broadcast_parameters_and_optimizer_state(surface):
    b0, b1 = surface[0]["broadcast"], surface[1]["broadcast"]
    for name, v in W.BNNet(20).state_dict().items():
        assert_bit_identical(b1["params"][name], v, name)
    assert b0["state"] == b1["state"], "optimizer state (momentum, lr) differs after broadcast_optimizer_state"


def test_clipping_sees_the_reduced_gradients(surface):
    """fp16 params, DynamicLossScaler.unscale_(dopt): p.grad is the reduced gradient (the mean of the
    ranks' local gradients within the fp16 compression bound), identical on both ranks, and
    clip_grad_norm_ clips it identically."""
    c0, c1 = surface[0]["clip"], surface[1]["clip"]
    assert c0["norm"] == c1["norm"] and c0["skipped"] is False
    for i, (a, b) in enumerate(zip(c0["seen"], c1["seen"])):
        assert_bit_identical(b, a, f"reduced grad {i}, rank 1 vs rank 0")
    local = c0["local_all"]
    for i, g in enumerate(c0["seen"]):
        mean = (local[0][i].double() + local[1][i].double()) / 2
        mean_abs = (local[0][i].double().abs() + local[1][i].double().abs()) / 2
        # fp16 grads (one rounding u16·|g_r| each), fp16 compression (2·u16·mean|g|), the fp16 unscale (exact, 2^8)
        tol = 4 * 2.0 ** -11 * mean_abs + 2 * 2.0 ** -24 * 2 ** 8
        assert ((g.double() - mean).abs() <= tol).all(), f"grad {i}"
    total = torch.stack([g.double().norm() for g in c0["seen"]]).norm().item()
    assert c0["norm"] == pytest.approx(total, rel=2 * 2.0 ** -11)
    assert total > 0.05, "the test should clip"
    for a, b in zip(c0["clipped"], c0["seen"]):
        assert torch.allclose(a.double(), b.double() * 0.05 / total, rtol=4 * 2.0 ** -11, atol=2.0 ** -24)
    assert_same_on_every_rank([c0["params"], c1["params"]], "after the clipped step")


def test_ranks_that_disagree_raise_on_every_rank_naming_them():
    results = W.ok_results(W.launch(W.disagree_suite, 2, pg_timeout=PG_TIMEOUT, timeout=120))
    expect = {
        "skipped_step": ([3, 3], ["ranks disagree on the step", "rank 0: step 3", "rank 1: step 2"]),
        "forward_error": ([2, 3], ["training forward passes", "rank 0: training forward passes 3",
                                   "rank 1: training forward passes 4"]),
        "skipped_step_deferred": ([4, 4], ["found one round late, that round was skipped", "rank 0: step 3",
                                           "rank 1: step 2"]),
        "passes": ([1, 1], ["backward passes", "rank 0: backward passes 1", "rank 1: backward passes 2"]),
        "replica": ([3, 3], ["diverged by step 4", "parameter 'fc1.weight'", "on rank 1"]),
    }
    for case, (steps, texts) in expect.items():
        for rank, r in enumerate(results):
            got = r[case]
            assert got["error"] is not None, f"rank {rank}: no error for {case}"
            assert got["error"].startswith("RankMismatchError"), (case, got["error"])
            assert got["step"] == steps[rank], (case, rank, got)
            for text in texts:
                assert text in got["error"], (case, rank, got["error"])
            assert got["elapsed"] < 5.0, (case, got["elapsed"])
    for rank, r in enumerate(results):      # deferred: the mismatched round 3 was skipped, nothing written
        assert r["skipped_step_deferred"]["skipped"][3] == (True, True), (rank, r["skipped_step_deferred"])
        assert r["skipped_step_deferred"]["skipped"][1] == (False, False)


def test_resume_with_noise_scale_and_noise_adaptive_is_bit_identical():
    results = W.ok_results(W.launch(W.noise_resume_suite, 2, pg_timeout=PG_TIMEOUT))
    for rank, r in enumerate(results):
        full, resumed = r["full"], r["resumed"]
        assert full["mfs"][15:] == resumed["mfs"], f"rank {rank}: MF schedule after resume"
        assert len(set(full["mfs"])) > 3, "the noise-adaptive MF should move in this run"
        for i, (a, b) in enumerate(zip(resumed["params"], full["params"])):
            assert_bit_identical(a, b, f"rank {rank}: param {i} after resuming at step 15")
        assert resumed["noise"] == full["noise"] and resumed["value"] == full["value"]


def test_ported_horovod_synthetic_benchmark_runs_on_two_gloo_ranks(tmp_path):
    """examples/pytorch_synthetic_benchmark.py (Horovod's, 11 lines changed) under torchrun, tiny sizes."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                          "pytorch_synthetic_benchmark.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(W.free_port()), script, "--no-cuda", "--model", "resnet18", "--image-size", "32",
           "--batch-size", "2", "--num-warmup-batches", "1", "--num-batches-per-iter", "1", "--num-iters", "2",
           "--fp16-allreduce"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Number of CPUs: 2" in proc.stdout and "Total img/sec on 2 CPU(s)" in proc.stdout, proc.stdout
