"""fusedmf.comm.LocalSGD and its fused averaging kernels (pack_delta_, apply_average_).

Multi-rank checks run in one launch of 2 and one of 4 gloo processes (tests/_local_sgd_workers.py).

Tolerances:
- period 1, no momentum, no compression against single-process SGD on the union of the batches: per
  step each rank's update w - lr·g_r rounds once, the difference w_r - c, the sum of the N halves and
  c + avg once each: <= 3 ulps of the operands (|w| before and after) per step, plus the order of the
  fp32 sums of the gradient (per-rank means of B/N samples, then N terms, against one mean of B):
  lr·B·2^-24·(|g| + mean|g|), the mean standing in where an element's per-sample terms cancel. Summed over the steps and doubled for the trajectory's feedback (as in test_comm).
- fp16 against uncompressed, 10 steps, warm-up 2, period 4: the relative difference must stay under
  1e-2 (the issue's figure); first-order it is about lr·T/(1-μ)·N·2^-11·|g| from the warm-up
  gradients plus 2^-11·|w - c| per average, orders of magnitude below, so 1e-2 only catches a broken
  scale or cast, and the check that the two runs differ at all shows that fp16 was really used.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import _comm_workers as W
import _local_sgd_workers as L
from fusedmf import _backends
from fusedmf.comm import LocalSGD
from fusedmf.comm.local_sgd import check_hierarchy
from fusedmf.functional import average as A
from fusedmf.optim import MFSGD

from _util import assert_bit_identical, assert_close_ulps

PG_TIMEOUT = 10.0
U32 = 2.0 ** -24


@pytest.fixture(autouse=True)
def _quiet_fallback_notices():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reference.*", category=RuntimeWarning)
        yield


@pytest.fixture(scope="module")
def two_ranks():
    return W.ok_results(W.launch(L.suite_two_ranks, 2, pg_timeout=PG_TIMEOUT, timeout=300.0))


@pytest.fixture(scope="module")
def four_ranks():
    return W.ok_results(W.launch(L.suite_four_ranks, 4, pg_timeout=PG_TIMEOUT, timeout=300.0))


def identical(tensors) -> bool:
    return all(torch.equal(t, tensors[0]) for t in tensors[1:])


# ------------------------------------------------------------------------------------------ kernels
BACKENDS = ["cpu", "cpu/base", "triton", pytest.param("cuda", marks=pytest.mark.skipif(
    not _backends.available_backends()["cuda"].available, reason="needs a GPU and a CUDA build of fusedmf._C"))]


@pytest.fixture
def backend(request):
    """The backend to run; "cpu/base" is the CPU backend with its portable loops (NOTE [cpu capability])
    instead of the AVX2 ones this machine picks."""
    name = request.param
    if name != "cpu/base":
        yield name
        return
    C = _backends.compiled_extension()[0]
    before = C._cpu_capability()
    assert C._set_cpu_capability("base")
    try:
        yield "cpu"
    finally:
        C._set_cpu_capability(before)
SHAPES = [(1,), (4097,), (123, 457), (0,), (2, 3, 4, 4), (7,)]
LOW = (torch.float32, torch.float16, torch.bfloat16)


def _make(shapes, dtype, seed, device, scale=1.0, channels_last_at=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, s in enumerate(shapes):
        t = (torch.randn(s, generator=g) * scale).to(dtype)
        if k == channels_last_at and len(s) == 4:
            t = t.to(memory_format=torch.channels_last)
        out.append(t.to(device))
    return out


def _like(tensors, dtype):
    return [torch.zeros_like(t, dtype=dtype, memory_format=torch.preserve_format) for t in tensors]


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("src_dtype", LOW, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("out_dtype", LOW, ids=lambda d: str(d)[6:])
def test_pack_delta_matches_the_reference_bit_for_bit(backend, src_dtype, out_dtype):
    dev = _device(backend)
    src = _make(SHAPES, src_dtype, 0, dev)
    cons = [(w.float() + 1e-2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)).to(dev))
            .contiguous(memory_format=torch.channels_last if w.dim() == 4 and not w.is_contiguous() else
                        torch.contiguous_format) for w in src]
    want, got = _like(src, out_dtype), _like(src, out_dtype)
    want = [o.cpu() for o in want]
    A.reference_pack_delta_([w.cpu() for w in src], [c.cpu() for c in cons], want, 1.0 / 3)
    assert A.pack_delta(src, cons, got, scale=1.0 / 3, backend=backend) == backend
    for i, (g, w) in enumerate(zip(got, want)):
        assert_bit_identical(g.cpu(), w, f"out[{i}]")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("avg_dtype", LOW, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("param_dtype", LOW, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("master", [True, False], ids=["master", "no_master"])
@pytest.mark.parametrize("update", [True, False], ids=["update", "keep"])
def test_apply_average_matches_the_reference_bit_for_bit(backend, avg_dtype, param_dtype, master, update):
    dev = _device(backend)
    runs = {}
    for who in ("reference", backend):
        avg = _make(SHAPES, avg_dtype, 2, dev, scale=1e-3)
        cons = _make(SHAPES, torch.float32, 3, dev)
        masters = _like(cons, torch.float32) if master else None
        params = _like(cons, param_dtype)
        if who == "reference":
            avg, cons, params = [t.cpu() for t in avg], [t.cpu() for t in cons], [t.cpu() for t in params]
            masters = [t.cpu() for t in masters] if master else None
        A.apply_average(avg, cons, params=params, masters=masters, update_consensus=update, backend=who)
        runs[who] = (cons, masters or [], params)
    for name, ref, got in zip(("consensus", "masters", "params"), runs["reference"], runs[backend]):
        for i, (r, g) in enumerate(zip(ref, got)):
            assert_bit_identical(g.cpu(), r, f"{name}[{i}]")
    if not update:   # the consensus was only read
        for i, c in enumerate(runs[backend][0]):
            assert_bit_identical(c.cpu(), _make(SHAPES, torch.float32, 3, "cpu")[i], f"consensus[{i}]")


def test_differences_keep_the_digits_fp16_weights_lose():
    """The point of NOTE [model averaging rounding]: w = 1 + 2^-20 is 1 in fp16, w - c = 2^-20 is exact."""
    w = torch.tensor([1.0 + 2.0 ** -20, 3.0 - 2.0 ** -19])
    c = torch.tensor([1.0, 3.0])
    out = torch.empty(2, dtype=torch.float16)
    A.pack_delta([w], [c], [out], scale=0.5, backend="reference")
    assert out.tolist() == [2.0 ** -21, -(2.0 ** -20)]
    assert w.half().tolist() == [1.0, 3.0]
    params, masters = [torch.empty(2, dtype=torch.bfloat16)], [torch.empty(2)]
    A.apply_average([out * 2], [c], params=params, masters=masters, backend="reference")
    assert torch.equal(masters[0], w) and torch.equal(c, w)
    assert torch.equal(params[0], w.to(torch.bfloat16))


def _bad_calls():
    """(name, pack_delta or apply_average kwargs) that must be refused."""
    w = [torch.randn(5), torch.randn(3, 4)]
    c = [t.clone() for t in w]
    o = [torch.zeros_like(t, dtype=torch.float16) for t in w]
    p = [torch.zeros_like(t, dtype=torch.bfloat16) for t in w]
    m = [torch.zeros_like(t) for t in w]
    nd = lambda dtype: torch.zeros(3, 8, dtype=dtype)[:, ::2]   # noqa: E731  (every other column: not dense)
    return [
        ("pack", "consensus dtype", dict(sources=w, consensus=[t.half() for t in c], out=o)),
        ("pack", "shape", dict(sources=w, consensus=[c[0], torch.zeros(4, 3)], out=o)),
        ("pack", "length", dict(sources=w, consensus=c[:1], out=o)),
        ("pack", "int out", dict(sources=w, consensus=c, out=[t.int() for t in o])),
        ("pack", "strides", dict(sources=w, consensus=[c[0], torch.zeros(4, 3).t()], out=o)),
        ("apply", "masters dtype", dict(averages=o, consensus=c, params=p, masters=[t.half() for t in m])),
        ("apply", "params length", dict(averages=o, consensus=c, params=p[:1], masters=m)),
        ("apply", "alias", dict(averages=o, consensus=c, params=p, masters=[m[0], c[1]])),
        ("apply", "mixed dtypes", dict(averages=o, consensus=c, params=[p[0], p[1].half()], masters=m)),
        ("apply", "non-dense", dict(averages=[o[0], nd(torch.float16)], consensus=[c[0], nd(torch.float32)],
                                    params=[p[0], nd(torch.bfloat16)], masters=None)),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[f"{k}-{n}" for k, n, _ in _bad_calls()])
def test_bad_input_is_refused_with_nothing_modified(backend, case):
    kind, what, kw = _bad_calls()[case]
    before = {k: [t.clone() for t in v] for k, v in kw.items() if v is not None}
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        if kind == "pack":
            A.pack_delta(kw["sources"], kw["consensus"], kw["out"], scale=0.5, backend=backend)
        else:
            A.apply_average(kw["averages"], kw["consensus"], params=kw["params"], masters=kw["masters"],
                            backend=backend)
    assert any(name in str(info.value) for name in ("sources", "consensus", "out", "averages", "params", "masters"))
    for k, ts in before.items():
        for i, (t, b) in enumerate(zip(kw[k], ts)):
            assert_bit_identical(t, b, f"{k}[{i}] after a refused call")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compiled_ops_check_their_own_arguments(backend):
    """The torch ops themselves (not only the Python dispatch) refuse bad input before writing."""
    A.pack_delta([torch.ones(3)], [torch.zeros(3)], [torch.zeros(3, dtype=torch.float16)], scale=1.0, backend=backend)
    op = torch.ops.fusedmf.pack_delta_ if backend == "cpu" else torch.ops.fusedmf.triton_pack_delta_
    out = torch.zeros(3, dtype=torch.float16)
    with pytest.raises(Exception, match="consensus"):
        op([torch.ones(3)], [torch.zeros(3, dtype=torch.float16)], [out], 1.0)
    with pytest.raises(Exception, match="out"):
        op([torch.ones(3)], [torch.zeros(3)], [torch.zeros(4, dtype=torch.float16)], 1.0)
    assert not out.any()
    apply = torch.ops.fusedmf.apply_average_ if backend == "cpu" else torch.ops.fusedmf.triton_apply_average_
    params = torch.zeros(3)
    with pytest.raises(Exception, match="masters"):
        apply([torch.ones(3)], [torch.zeros(3)], [torch.zeros(3, dtype=torch.bfloat16)], [params], True)
    assert not params.any()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_ops_have_fake_kernels(backend):
    """torch.compile / FakeTensorMode can trace the ops: the fake kernels return nothing, leave every
    argument's metadata as it was (the ops write in place), and agree with the real kernels
    (torch.library.opcheck runs both and compares)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    A.pack_delta([torch.ones(1)], [torch.zeros(1)], [torch.zeros(1)], scale=1.0, backend=backend)  # loads the ops
    prefix = "" if backend == "cpu" else "triton_"
    pack, apply = getattr(torch.ops.fusedmf, prefix + "pack_delta_"), getattr(torch.ops.fusedmf, prefix + "apply_average_")

    def meta(ts):
        return [(t.shape, t.dtype, t.stride(), t.device) for t in ts]

    gen = torch.Generator().manual_seed(0)
    real = dict(w=torch.randn(8, 3, generator=gen), c=torch.randn(8, 3, generator=gen),
                o=torch.randn(8, 3, generator=gen).half(), m=torch.randn(8, 3, generator=gen),
                p=torch.randn(8, 3, generator=gen).bfloat16())
    before = {k: t.clone() for k, t in real.items()}
    # no fallback to running the real kernel on zero-filled stand-ins: the fake kernel answers
    with FakeTensorMode(allow_fallback_kernels=False) as mode:
        f = {k: mode.from_tensor(t) for k, t in real.items()}
        shapes = meta(f.values())
        assert pack([f["w"]], [f["c"]], [f["o"]], 0.5) is None
        assert apply([f["o"]], [f["c"]], [f["m"]], [f["p"]], True) is None
        assert meta(f.values()) == shapes and all(isinstance(t, FakeTensor) for t in f.values())
    for k, t in real.items():  # the fake run read and wrote no real data
        assert_bit_identical(t, before[k], f"{k} after the fake run")
    torch.library.opcheck(pack.default, ([real["w"]], [real["c"]], [real["o"]], 0.5),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(apply.default, ([real["o"]], [real["c"]], [real["m"]], [real["p"]], True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(apply.default, ([real["o"]], [real["c"]], [], [real["w"]], False),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------ construction
def _lopt(**kw):
    model = W.Net(0)
    return LocalSGD(MFSGD(model.parameters(), lr=0.1, momentum=0.9), **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(period=0), "period must be an integer >= 1"),
    (dict(period=True), "period must be an integer"),
    (dict(period=2.5), "period must be an integer"),
    (dict(period=4, warmup_steps=-1), "warmup_steps must be an integer >= 0"),
    (dict(period=4, compression="int8"), "compression must be one of"),
    (dict(period=4, bucket_cap_mb=0), "bucket_cap_mb must be > 0"),
    (dict(period=4, hierarchy={2: 2}), "group size 2 .* must be >= 2, smaller than the world size 1"),
    (dict(period=4, hierarchy={}), "hierarchy must be None or a non-empty dict"),
])
def test_constructor_rejects_bad_schedules(kw, match):
    with pytest.raises(ValueError, match=match):
        _lopt(**kw)


@pytest.mark.parametrize("hierarchy, match", [
    ({3: 2}, "hierarchy period 3 does not divide period=16"),
    ({32: 4}, "larger than period=16"),
    ({16: 4}, "its group size must be the world size 8"),
    ({4: 3}, "group size 3 .* divide it"),
    ({4: 4, 8: 2}, "do not nest"),
    ({2: 2, 8: 2}, "do not nest"),
    ({0: 2}, "hierarchy period 0"),
])
def test_hierarchy_must_nest(hierarchy, match):
    with pytest.raises(ValueError, match=match):
        check_hierarchy(hierarchy, 16, 8)


def test_hierarchy_levels_in_order():
    assert check_hierarchy({8: 4, 2: 2, 16: 8}, 16, 8) == [(2, 2), (8, 4)]
    assert check_hierarchy(None, 4, 1) == []


def test_wraps_optimizers_only():
    model = W.Net(0)
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        LocalSGD(model, period=2)
    with pytest.raises(TypeError, match="not another fusedmf.comm wrapper"):
        LocalSGD(LocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), period=2), period=2)


def test_load_state_dict_needs_the_local_sgd_entry():
    lopt = _lopt(period=2)
    with pytest.raises(ValueError, match="no 'local_sgd' entry"):
        lopt.load_state_dict(lopt.optimizer.state_dict())


# ------------------------------------------------------------------------------------------ one rank
def _run_single(opt_like, model, steps, scheduler=None):
    for t in range(steps):
        x, y = W.batch(t)
        opt_like.zero_grad()
        W.loss_fn(model, x, y).backward()
        opt_like.step()
        if scheduler is not None:
            scheduler.step()


def test_world_size_one_follows_the_optimizer_with_mf_schedule_and_lr_scheduler():
    """One rank: averaging is c + (w - c) = w, so LocalSGD is the plain optimizer; the MF schedule is
    called with the optimizer's own step numbers and an LR scheduler attached to the wrapper drives it."""
    schedule_calls = {"plain": [], "local": []}

    def run(kind):
        model = W.Net(0)
        opt = MFSGD(model.parameters(), lr=0.1, momentum=0.9,
                    mf_schedule=lambda t: schedule_calls[kind].append(t) or min(0.95, 0.8 + 0.01 * t))
        target = opt if kind == "plain" else LocalSGD(opt, period=3, warmup_steps=2, compression="none")
        sched = torch.optim.lr_scheduler.StepLR(target, step_size=2, gamma=0.5)
        _run_single(target, model, 9, sched)
        return model, opt

    plain, plain_opt = run("plain")
    local, local_opt = run("local")
    assert schedule_calls["plain"] == schedule_calls["local"]
    assert plain_opt.param_groups[0]["lr"] == local_opt.param_groups[0]["lr"] == 0.1 * 0.5 ** 4
    for i, (a, b) in enumerate(zip(local.parameters(), plain.parameters())):
        assert_close_ulps(a, b, ulps=4, name=f"param {i}")


# ------------------------------------------------------------------------------------------ 2 ranks
def test_period_one_without_momentum_is_synchronous_sgd(two_ranks):
    """== single-process SGD on the union of the batches within fp32 rounding; ranks bit-identical."""
    model = W.Net(0)
    opt = MFSGD(model.parameters(), lr=L.LR, momentum=0.0)
    bound = torch.zeros_like(L.flat(model), dtype=torch.float64)
    prev = L.flat(model).double()
    for t, everyone in enumerate(two_ranks[0]["sync"]["everyone"]):
        assert identical(everyone), f"ranks differ after step {t + 1}"
        x, y = W.batch(t)
        opt.zero_grad()
        W.loss_fn(model, x, y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        opt.step()
        p = L.flat(model).double()
        # roundings are relative to the operands (the weights before and after), the sum order's to the
        # gradient's magnitude (its typical one where an element's terms cancel)
        bound += 3 * U32 * (prev.abs() + p.abs()) + L.LR * W.GLOBAL_BATCH * U32 * (g.abs() + g.abs().mean())
        prev = p
        diff = (everyone[0].double() - p).abs()
        assert (diff <= 2 * bound + 1e-30).all(), f"step {t + 1}: max |diff| {diff.max():.3g}, bound {bound.max():.3g}"


def test_warmup_then_period_averages_on_the_right_steps(two_ranks):
    """Warm-up 2, period 4, momentum 0.9, fp16: identical after 1, 2, 6, 10, different in between."""
    runs = two_ranks[0]["schedule"]["fp16"]
    for t, everyone in enumerate(runs, start=1):
        if t in (1, 2, 6, 10):
            assert identical(everyone), f"ranks differ after step {t}"
        else:
            assert not torch.equal(everyone[0], everyone[1]), f"ranks identical after local step {t}"


def test_fp16_is_within_1e_2_of_uncompressed(two_ranks):
    results = [r["schedule"] for r in two_ranks]
    for rank, res in enumerate(results):
        fp16, none = res["fp16"][-1][rank], res["none"][-1]
        rel = ((fp16 - none).norm() / none.norm()).item()
        assert rel < 1e-2, f"rank {rank}: relative difference {rel:.3g}"
        assert not torch.equal(fp16, none), "the fp16 run equals the uncompressed one: was it compressed?"


def test_bf16_params_and_fp32_masters_written_from_one_consensus(two_ranks):
    res = two_ranks[0]["schedule"]
    for t, everyone in enumerate(res["bf16"], start=1):
        assert identical(everyone) == (t in (1, 2, 6)), f"step {t}"
    assert identical(res["bf16_masters"])
    assert all(r["schedule"]["bf16_cast"] for r in two_ranks), "params are not the bf16 cast of the masters"


def test_telemetry_bytes_and_averaging_time(two_ranks):
    res = two_ranks[0]["schedule"]
    kinds = [s["kind"] for s in res["telemetry"]]
    assert kinds == ["gradient allreduce"] * 2 + (["local step"] * 3 + ["model average (global)"]) * 2
    for s in res["telemetry"]:
        if s["kind"] == "local step":
            assert s["bytes"] == 0 and s["average_s"] is None
        elif s["kind"].startswith("model average"):
            assert s["bytes"] == res["param_bucket_bytes"] and s["average_s"] > 0
        else:  # the warm-up allreduces the gradients in the same fp16 buckets as the averages
            assert s["bytes"] == res["param_bucket_bytes"]
    assert {"local update", "model average (global)", "pack bucket 0", "allreduce bucket 0"} <= set(res["trace_names"])


def test_overflow_on_one_rank_counts_on_no_rank(two_ranks):
    r0, r1 = (r["overflow"] for r in two_ranks)
    assert [s["action"] for s in r0] == [s["action"] for s in r1]
    assert [s["action"] for s in r0] == ["local", "local", "skipped", "average (global)", "local", "local",
                                         "average (global)", "local"]
    assert [s["local_steps"] for s in r0] == [s["local_steps"] for s in r1] == [1, 2, 2, 3, 4, 5, 6, 7]
    assert [s["opt_step"] for s in r0] == [s["opt_step"] for s in r1] == [1, 2, 2, 3, 4, 5, 6, 7]
    assert [s["scale"] for s in r0] == [s["scale"] for s in r1]
    assert r0[2]["scale"] == r0[1]["scale"] / 2, "the loss scale did not back off on both ranks"
    assert torch.equal(r0[2]["params"][0], r0[1]["params"][0])   # the skipped step changed nothing
    for t in (3, 6):
        assert identical(r0[t]["params"]), f"ranks differ after the average at call {t + 1}"


def test_state_dict_mid_period_resumes_bit_identically(two_ranks):
    for rank, r in enumerate(two_ranks):
        res = r["resume"]
        assert res["saved_calls"] == 5 and res["saved_local_steps"] == 3
        assert res["warmup_after_load"] is False, "a resume past the warm-up went back to gradient averaging"
        for t, (a, b) in enumerate(zip(res["resumed"], res["straight"]), start=1):
            assert_bit_identical(a, b, f"rank {rank}, params after step {t}")


def test_module_buffers_and_moments_averaged_with_the_params(two_ranks):
    steps = two_ranks[0]["buffers"]
    assert [s["action"] for s in steps] == ["warm-up", "local", "average (global)", "local", "average (global)"]
    for t, s in enumerate(steps, start=1):
        synced = s["action"] != "local"
        assert identical(s["buffers"]) == synced, f"BatchNorm buffers after step {t}"
        assert identical(s["params"]) == synced, f"params after step {t}"
        if s["action"].startswith("average"):
            assert identical(s["moments"]), f"momentum buffers after step {t}"
            mean = (s["local"][0] + s["local"][1]) / 2
            assert_close_ulps(s["buffers"][0], mean, ulps=2, name=f"buffers after step {t}")
        elif s["action"] == "local":
            assert not identical(s["moments"])


# ------------------------------------------------------------------------------------------ 4 ranks
def test_hierarchy_subgroup_and_global_averages(four_ranks):
    steps = four_ranks[0]["hierarchy"]
    actions = [s["action"] for s in steps]
    assert actions == ["local", "average (group of 2)", "local", "average (global)"] * 2
    for t, s in enumerate(steps, start=1):
        p = s["params"]
        groups = {"local": [[0], [1], [2], [3]], "average (group of 2)": [[0, 1], [2, 3]],
                  "average (global)": [[0, 1, 2, 3]]}[s["action"]]
        for members in groups:
            assert identical([p[r] for r in members]), f"step {t}: ranks {members} differ"
            expected = torch.stack([s["local"][r].double() for r in members]).mean(0)
            for r in members:
                err = (p[r].double() - expected).abs()
                allowed = 4 * U32 * (expected.abs() + expected.abs().mean())
                assert (err <= allowed).all(), f"step {t}, rank {r}: max error {err.max():.3g} vs the group mean"
        if len(groups) > 1:
            assert not torch.equal(p[groups[0][0]], p[groups[1][0]]), f"step {t}: groups should differ"


def test_one_average_per_step_whatever_the_param_groups():
    """torch PR #74737: averaging once per param group made the period drift. Here the k-th applied
    step averages once when period divides k, with any number of groups."""
    model = W.Net(0)
    groups = [{"params": [model.conv.weight, model.conv.bias]}, {"params": list(model.fc1.parameters()), "lr": 0.01},
              {"params": list(model.fc2.parameters())}]
    lopt = LocalSGD(MFSGD(groups, lr=0.1, momentum=0.9), period=2, compression="none")
    actions = []
    for t in range(6):
        x, y = W.batch(t)
        lopt.zero_grad()
        W.loss_fn(model, x, y).backward()
        lopt.step()
        actions.append(lopt.last_action)
    assert actions == ["local", "average (global)"] * 3
    assert lopt.local_steps == 6


def test_any_torch_optimizer():
    """The generic path: a torch optimizer (warm-up through DistributedOptimizer's generic path, then
    local steps), the averaging kernels do the rest; a loss
    scale is refused (torch optimizers do not unscale) before anything changes."""
    model, ref = W.Net(0), W.Net(0)
    lopt = LocalSGD(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), period=2, warmup_steps=1,
                    compression="none")
    plain = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    _run_single(lopt, model, 4)
    _run_single(plain, ref, 4)
    for i, (a, b) in enumerate(zip(model.parameters(), ref.parameters())):
        assert_close_ulps(a, b, ulps=4, name=f"param {i}")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="loss scale needs a fusedmf optimizer"):
        lopt.step(grad_scale=torch.tensor(2.0))
    assert lopt.local_steps == 3     # 4 steps, the first a warm-up one
    for a, b in zip(model.parameters(), before):
        assert_bit_identical(a.detach(), b)
