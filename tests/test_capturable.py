"""capturable=True (NOTE [capturable step] in fusedmf/optim/_base.py): step counts, beta1 products, the
MF and every per-step scalar live on the device, and the skip decision never leaves it.

On CPU the capturable path runs the same kernels with scalars computed by tensor ops, so it must give
the default path's bits exactly; on meta tensors it must run at all (nothing is read on the host).
What only a GPU shows (a CUDA graph capture replayed with new MF values, no host synchronisation)
is at the end and skips without one."""

import copy

import pytest
import torch

from conftest import require_backend
from fusedmf import mf
from fusedmf.optim import MFAdam, MFAdamW, MFSGD

CONFIGS = {
    "sgd-l2": (MFSGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
    "nesterov": (MFSGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    "sgdw-tied-compensated": (MFSGD, dict(lr=0.1, momentum=0.9, dampening="tied", weight_decay=1e-2,
                                          decoupled_weight_decay=True, lr_compensation=0.9)),
    "adam-l2": (MFAdam, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (MFAdam, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2, decoupled_weight_decay=True)),
    "nesterov-maximize": (MFSGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True)),
    "adamw-amsgrad-maximize": (MFAdamW, dict(lr=1e-2, amsgrad=True, maximize=True)),
}
SHAPES = ((40, 3), (50,), (7,), (0,))


def _schedule():
    return mf.ramp(0.5, 0.95, 5)


def _pair(cls, kw, dtype, backend, schedule=None, shapes=SHAPES, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    qs = [p.clone() for p in ps]
    default = cls(ps, mf_schedule=schedule, backend=backend, **copy.deepcopy(kw))
    capturable = cls(qs, mf_schedule=copy.deepcopy(schedule), backend=backend, capturable=True, **copy.deepcopy(kw))
    return ps, qs, default, capturable


def _run(ps, qs, a, b, steps=7, seed=1, skip_at=3, missing=(2, 1)):
    """Identical steps on both: one param misses its grad in one step, one step overflows."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for i, (p, q) in enumerate(zip(ps, qs)):
            g = None if (step, i) == missing else torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
            p.grad, q.grad = g, None if g is None else g.clone()
        flag = 1.0 if step == skip_at else 0.0
        for opt in (a, b):
            opt.step(grad_scale=torch.full((), 4.0, device=ps[0].device),
                     found_inf=torch.full((), flag, device=ps[0].device))


def _assert_same(ps, qs, a, b):
    for i, (p, q) in enumerate(zip(ps, qs)):
        assert torch.equal(p, q), f"param {i}"
        assert set(a.state[p]) == set(b.state[q])
        for key, value in a.state[p].items():
            other = b.state[q][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (i, key)
            elif value is None:
                assert other is None, (i, key)
            else:  # host count / product vs its device tensor
                assert isinstance(other, torch.Tensor) and float(other) == float(value), (i, key, value, other)


def test_device_slot_formulas_equal_the_host_ones_in_float64():
    """NOTE [capturable scalars]: the same expressions on 0-dim float64 tensors give the host's float64
    values exactly, before the rounding to float32 that would hide most differences (``float / tensor``
    alone, torch's reciprocal-and-multiply, differs in about a quarter of these cases)."""
    from fusedmf.functional.scalars import adam_slots, adam_step_scalars, sgd_slots, sgd_step_scalars

    gen = torch.Generator().manual_seed(7)
    opt = MFSGD([torch.zeros(1)], lr=0.1, momentum=0.9, dampening="tied", lr_compensation=0.85, capturable=True)
    group = opt.param_groups[0]

    def t(x):
        return torch.tensor(x, dtype=torch.float64)

    for _ in range(400):
        lr, mf_, beta2, wd, product = (float(x) for x in torch.rand(5, generator=gen, dtype=torch.float64))
        step = int(torch.randint(1, 10**6, (1,), generator=gen))
        beta2 = 0.9 + 0.0999 * beta2
        product = product * mf_
        host = adam_step_scalars(lr=lr, beta1=mf_, beta2=beta2, eps=1e-8, weight_decay=wd, decoupled_weight_decay=True,
                                 step=step, beta1_product=product).as_list()
        for device_lr in (lr, t(lr)):  # a float lr (a graph constant) or a tensor lr
            device = adam_slots(lr=device_lr, beta1=t(mf_), beta2=beta2, eps=1e-8, weight_decay=wd,
                                decoupled_weight_decay=True, step=torch.tensor(step), beta1_product=t(product))
            assert host == [float(v) for v in device.slot_values()]
        settings = opt._settings(group, lr, mf_)
        device_settings = opt._settings(group, t(lr), t(mf_))
        assert sgd_step_scalars(**settings, first_step=False).as_list() == \
            [float(v) for v in sgd_slots(**device_settings, first_step=torch.tensor(False)).slot_values()]
        opt._log_effective_lr(group, settings)
        host_effective = opt.last_effective_lr[0]
        opt._log_effective_lr(group, device_settings)
        assert float(opt.last_effective_lr[0]) == host_effective


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant-mf", "mf-schedule"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-masters"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_capturable_equals_default_bit_for_bit_on_cpu(config, dtype, scheduled):
    require_backend("cpu")
    cls, kw = CONFIGS[config]
    ps, qs, a, b = _pair(cls, kw, dtype, "cpu", _schedule() if scheduled else None)
    _run(ps, qs, a, b)
    _assert_same(ps, qs, a, b)
    assert b.state[qs[1]]["step"].dtype == torch.int64
    assert int(b.state[qs[1]]["step"]) == 5 and int(b.state[qs[0]]["step"]) == 6  # 7 steps, 1 skipped, 1 missed
    assert b.state_dict()["mf_schedule"]["applied_steps"] == a.state_dict()["mf_schedule"]["applied_steps"] == 6
    assert b.last_step_skipped is False


@pytest.mark.parametrize("config", ["sgdw-tied-compensated", "adamw", "nesterov-maximize", "adamw-amsgrad-maximize"])
def test_capturable_equals_default_on_every_backend(backend, config):
    name, device = backend
    cls, kw = CONFIGS[config]
    ps, qs, a, b = _pair(cls, kw, torch.bfloat16, name, _schedule(), device=device)
    _run(ps, qs, a, b, steps=5)
    _assert_same(ps, qs, a, b)
    assert b.backends_used == {name: len(SHAPES)}


def test_a_skipped_step_is_decided_on_the_device():
    require_backend("cpu")
    ps, qs, a, b = _pair(MFAdam, CONFIGS["adamw"][1], torch.float32, "cpu")
    for q in qs:
        q.grad = torch.ones_like(q)
    before = [q.clone() for q in qs]
    b.step(found_inf=torch.ones(()))
    assert all(torch.equal(x, q) for x, q in zip(before, qs))
    assert int(b.state[qs[0]]["step"]) == 0 and float(b.state[qs[0]]["beta1_product"]) == 1.0
    assert b.last_step_skipped is True
    b.step(found_inf=torch.zeros(()))
    assert int(b.state[qs[0]]["step"]) == 1 and float(b.state[qs[0]]["beta1_product"]) == 0.8
    assert b.last_step_skipped is False


@pytest.mark.parametrize("cls,kw", [CONFIGS["sgdw-tied-compensated"], CONFIGS["adamw"]], ids=["MFSGD", "MFAdam"])
def test_tensor_lr_changed_in_place_equals_float_lr(cls, kw):
    """The pattern of a replayed graph: the host writes the next lr into the same tensor."""
    require_backend("cpu")
    ps, qs, a, _ = _pair(cls, kw, torch.float32, "cpu", _schedule())
    lr = torch.tensor(kw["lr"], dtype=torch.float64)
    b = cls(qs, mf_schedule=_schedule(), backend="cpu", capturable=True, **dict(kw, lr=lr))
    gen = torch.Generator().manual_seed(5)
    for step in range(5):
        new = kw["lr"] * (0.7 ** step)
        a.param_groups[0]["lr"] = new
        lr.fill_(new)
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    _assert_same(ps, qs, a, b)


@pytest.mark.parametrize("direction", ["default->capturable", "capturable->default"])
@pytest.mark.parametrize("cls,kw", [CONFIGS["nesterov"], CONFIGS["adamw"]], ids=["MFSGD", "MFAdam"])
def test_state_dict_moves_between_the_two_paths(cls, kw, direction):
    require_backend("cpu")
    ps, qs, a, b = _pair(cls, kw, torch.bfloat16, "cpu", _schedule())
    _run(ps, qs, a, b, steps=4)
    src = a if direction == "default->capturable" else b
    params = [p.clone() for p in (ps if src is a else qs)]
    loaded = cls(params, mf_schedule=_schedule(), backend="cpu", capturable=src is a, **copy.deepcopy(kw))
    loaded.load_state_dict(copy.deepcopy(src.state_dict()))
    if loaded.capturable:
        assert isinstance(loaded.state[params[0]]["step"], torch.Tensor)
    else:
        assert isinstance(loaded.state[params[0]]["step"], int)
    # continue both from the same point: the loaded one must follow the source bit for bit
    _run(ps if src is a else qs, params, src, loaded, steps=4, seed=9, skip_at=1, missing=(0, 2))
    _assert_same(params, ps if src is a else qs, loaded, src) if not loaded.capturable else \
        _assert_same(ps, params, src, loaded)


def test_mf_table_follows_the_one_clock_and_is_filled_ahead():
    require_backend("cpu")
    calls = []

    def schedule(step):
        calls.append(step)
        return 0.5 + 0.0001 * step

    qs = [torch.randn(5)]
    opt = MFSGD(qs, lr=0.1, mf_schedule=schedule, capturable=True, backend="cpu")
    opt.reserve_mf_steps(3)
    assert calls == [1, 2, 3]  # once per update number, in order
    qs[0].grad = torch.ones(5)
    opt.step()
    opt.step(found_inf=torch.ones(()))   # skipped: the clock stays at 1
    opt.step()
    assert calls == [1, 2, 3]            # three calls cannot get past update 3
    assert opt.state_dict()["mf_schedule"]["applied_steps"] == 2
    assert float(opt.last_effective_lr[0]) == pytest.approx(0.1 / (1 - 0.5002), rel=1e-12)  # the MF of update 2
    opt.step()
    assert calls == list(range(1, 1025))  # the fourth might need update 4: the table grows ahead, each number once
    assert float(opt.last_effective_lr[0]) == pytest.approx(0.1 / (1 - 0.5003), rel=1e-12)
    # past the table's end (a replayed graph can get there) the last value repeats, never a read out of bounds
    opt._clock(qs[0].device).fill_(10**6)
    opt.step()
    assert float(opt.last_effective_lr[0]) == pytest.approx(0.1 / (1 - (0.5 + 0.0001 * 1024)), rel=1e-12)


def test_bad_mf_table_values_are_refused_before_anything_changes():
    require_backend("cpu")
    qs = [torch.randn(5)]
    opt = MFSGD(qs, lr=0.1, nesterov=True, mf_schedule=lambda s: 0.9 if s < 3 else 0.0, capturable=True,
                backend="cpu")
    with pytest.raises(ValueError, match=r"nesterov momentum requires a momentum > 0; mf_schedule\(3\)"):
        opt.reserve_mf_steps(4)
    assert opt._mf_values == []
    qs[0].grad = torch.ones(5)
    before = qs[0].clone()
    with pytest.raises(ValueError, match="mf_schedule"):
        opt.step()
    assert torch.equal(qs[0], before) and opt.state[qs[0]] == {}


def test_capturable_argument_errors():
    require_backend("cpu")
    with pytest.raises(TypeError, match="capturable must be True or False"):
        MFSGD([torch.zeros(2)], lr=0.1, capturable=1)

    class Noise:
        batch_size_per_rank = 8

        def settled_value(self):
            return None

        def settled_samples(self):
            return 0

    stateful = mf.noise_adaptive(Noise())
    for schedule in (stateful, mf.sequence([(10, 0.9), (None, stateful)])):
        with pytest.raises(ValueError, match="capturable=True needs an MF schedule that can be tabulated"):
            MFAdam([torch.zeros(2)], mf_schedule=schedule, capturable=True)
    with pytest.raises(RuntimeError, match="only for capturable=True with an mf_schedule"):
        MFSGD([torch.zeros(2)], lr=0.1, capturable=True).reserve_mf_steps(10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-masters"])
@pytest.mark.parametrize("cls,kw", [CONFIGS["nesterov"], CONFIGS["adamw"]], ids=["MFSGD", "MFAdam"])
def test_capturable_step_runs_on_meta_tensors(cls, kw, dtype):
    """Meta tensors have no data: a step that read anything on the host would raise."""
    require_backend("cpu")
    params = [torch.empty(s, device="meta", dtype=dtype) for s in ((4, 3), (5,))]
    lr = torch.tensor(kw["lr"], device="meta")
    opt = cls(params, mf_schedule=_schedule(), capturable=True, **dict(kw, lr=lr))
    for p in params:
        p.grad = torch.empty_like(p)
    for _ in range(2):
        opt.step(grad_scale=torch.full((), 4.0, device="meta"), found_inf=torch.zeros((), device="meta"))
    assert opt.backends_used == {"cpu": 2}
    state = opt.state[params[0]]
    assert state["step"].device.type == "meta" and state["step"].dtype == torch.int64
    assert ("master_param" in state) == (dtype == torch.bfloat16)


@pytest.mark.parametrize("cls,kw", [CONFIGS["sgd-l2"], CONFIGS["adamw"], CONFIGS["nesterov-maximize"],
                                    CONFIGS["adamw-amsgrad-maximize"]],
                         ids=["MFSGD", "MFAdam", "MFSGD-maximize", "MFAdamW-amsgrad-maximize"])
def test_compiled_capturable_step_equals_eager(cls, kw):
    require_backend("cpu")
    torch._dynamo.reset()
    ps, qs, a, b = _pair(cls, kw, torch.float32, "cpu", _schedule(), shapes=((4, 3), (5,)))
    step = torch.compile(b.step, backend="aot_eager")
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        a.step()
        step()
    _assert_same(ps, qs, a, b)


def test_distributed_optimizer_over_a_capturable_optimizer_equals_the_default(tmp_path):
    """fusedmf.comm hands the update its grads as views into the reduced buffer (``grads=``): the
    capturable path takes them the same way."""
    require_backend("cpu")
    import torch.distributed as dist

    from fusedmf.comm import DistributedOptimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        runs = []
        for capturable in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            opt = DistributedOptimizer(MFSGD(model.parameters(), lr=0.1, momentum=0.9, mf_schedule=_schedule(),
                                             capturable=capturable, backend="cpu"), module=model)
            gen = torch.Generator().manual_seed(1)
            for _ in range(5):
                model(torch.randn(4, 8, generator=gen)).square().mean().backward()
                opt.step()
                model.zero_grad()
            assert opt.backends_used["update"] == {"cpu": 4}
            runs.append([p.detach().clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# GPU only


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (owed on a GPU machine: run tests/test_capturable.py there)")
    return require_backend("cuda")


@pytest.mark.parametrize("cls,kw", [CONFIGS["nesterov"], CONFIGS["adamw"]], ids=["MFSGD", "MFAdam"])
def test_cuda_graph_replay_with_new_mf_values_equals_eager(cls, kw):
    _cuda_or_skip()
    ps, qs, a, b = _pair(cls, kw, torch.bfloat16, "cuda", _schedule(), device="cuda")
    b.reserve_mf_steps(64)
    grads = [torch.zeros_like(q) for q in qs]
    for q, g in zip(qs, grads):
        q.grad = g
    found = torch.zeros((), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(4)

    def next_grads(k):
        new = [torch.randn(p.shape, generator=gen, device="cuda").to(p.dtype) for p in ps]
        for p, g, n in zip(ps, grads, new):
            p.grad = n.clone()
            g.copy_(n)
        found.fill_(1.0 if k == 5 else 0.0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: layout, state, buffers
        for k in range(3):
            next_grads(k)
            a.step(found_inf=found.clone())
            b.step(found_inf=found)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        b.step(found_inf=found)
    for k in range(3, 12):  # the MF changes every step (ramp), one step overflows
        next_grads(k)
        a.step(found_inf=found.clone())
        graph.replay()
    torch.cuda.synchronize()
    _assert_same(ps, qs, a, b)


def test_capturing_a_default_step_is_refused():
    _cuda_or_skip()
    q = torch.randn(10, device="cuda")
    opt = MFSGD([q], lr=0.1, momentum=0.9)
    q.grad = torch.ones_like(q)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=False"):
        with torch.cuda.graph(graph):
            opt.step()
