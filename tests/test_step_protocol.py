"""The step protocol: one clock (NOTE [one clock]), torch conventions (iterable param groups, tensor
lr), compiled steps (NOTE [compiled step]), steps on meta tensors, and what needs a GPU."""

import copy
import warnings

import pytest
import torch

from conftest import require_backend
from fusedmf import mf
from fusedmf.optim import MFAdam, MFAdamW, MFSGD

OPTS = [(MFSGD, dict(lr=0.1, momentum=0.9)), (MFAdam, dict(lr=1e-2))]
OPT_IDS = ["MFSGD", "MFAdam"]
# torch's options that change the kernels' work (a flag slot, a state list) must compile alike
COMPILE_OPTS = OPTS + [(MFSGD, dict(lr=0.1, momentum=0.9, maximize=True)),
                       (MFAdamW, dict(lr=1e-2, amsgrad=True, maximize=True))]
COMPILE_IDS = OPT_IDS + ["MFSGD-maximize", "MFAdamW-amsgrad-maximize"]


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, step):
        self.calls.append(step)
        return 0.5 + 0.04 * step


def _params(seed=0, shapes=((4, 3), (5,), (2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


# ---------------------------------------------------------------------------------------------
# one clock


@pytest.mark.parametrize("cls,kw", OPTS, ids=OPT_IDS)
def test_schedule_called_once_per_step_when_a_param_misses_its_grad(cls, kw):
    require_backend("cpu")
    params = [p.requires_grad_() for p in _params()]
    sched = Recorder()
    opt = cls(params, mf_schedule=sched, backend="cpu", **kw)
    for step in range(1, 5):
        for i, p in enumerate(params):
            p.grad = None if (step == 2 and i == 1) else torch.ones_like(p)
        opt.step()
    assert sched.calls == [1, 2, 3, 4]
    # per-param state stays per param, as in torch
    assert [opt.state[p]["step"] for p in params] == [4, 3, 4]


@pytest.mark.parametrize("cls,kw", OPTS, ids=OPT_IDS)
def test_skipped_step_does_not_advance_the_clock(cls, kw):
    require_backend("cpu")
    params = _params()
    sched = Recorder()
    opt = cls(params, mf_schedule=sched, backend="cpu", **kw)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step(found_inf=torch.ones(()))
    opt.step()
    assert sched.calls == [1, 2, 2]
    assert opt.state_dict()["mf_schedule"]["applied_steps"] == 2


def test_noise_adaptive_no_longer_sees_a_step_go_backwards_and_round_trips():
    require_backend("cpu")

    class Noise:  # a settled GradientNoiseScale stand-in: a large noise scale -> the MF rises
        batch_size_per_rank = 8

        def settled_value(self):
            return 1e6

        def settled_samples(self):
            return 100

    def run(opt, params, steps, miss_step=None):
        for s in range(steps):
            for i, p in enumerate(params):
                p.grad = None if (s == miss_step and i == 0) else torch.full_like(p, 0.1)
            opt.step()

    params = _params()
    sched = mf.noise_adaptive(Noise(), mf_ref=0.9, max_change=0.01)
    opt = MFSGD(params, lr=0.1, momentum=0.9, mf_schedule=sched, backend="cpu")
    run(opt, params, 3, miss_step=1)   # raised "got 2 after 3" when each launch had its own clock
    sd = copy.deepcopy(opt.state_dict())
    assert sd["mf_schedule"]["applied_steps"] == 3
    assert sd["mf_schedule"]["state"]["last_step"] == 3 and sd["mf_schedule"]["state"]["mf"] == pytest.approx(0.93)

    twin_params = [p.detach().clone() for p in params]
    twin_sched = mf.noise_adaptive(Noise(), mf_ref=0.9, max_change=0.01)
    twin = MFSGD(twin_params, lr=0.1, momentum=0.9, mf_schedule=twin_sched, backend="cpu")
    twin.load_state_dict(sd)
    assert twin_sched.state_dict() == sched.state_dict()
    run(opt, params, 2)
    run(twin, twin_params, 2)
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)
    assert sched.state_dict() == twin_sched.state_dict()
    assert sched.state_dict()["last_step"] == 5 and sched.state_dict()["mf"] == pytest.approx(0.95)


@pytest.mark.parametrize("cls,kw,option", [(MFSGD, dict(lr=0.1, momentum=0.9), "momentum"),
                                           (MFAdam, dict(lr=1e-2), "betas[0]")], ids=OPT_IDS)
def test_scheduler_writing_the_mf_while_mf_schedule_is_set_warns_once(cls, kw, option):
    require_backend("cpu")
    params = _params()
    opt = cls(params, mf_schedule=mf.constant(0.8), backend="cpu", **kw)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=True)
    for p in params:
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            opt.step()
            sched.step()
    ours = [w for w in caught if "mf_schedule" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert f"param group 0's {option} changed" in str(ours[0].message)
    assert "cycle_momentum=False" in str(ours[0].message)


def test_no_warning_without_a_conflict():
    require_backend("cpu")
    params = _params()
    opt = MFSGD(params, lr=0.1, momentum=0.9, mf_schedule=mf.constant(0.8), backend="cpu")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=False)
    for p in params:
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step()
            sched.step()


# ---------------------------------------------------------------------------------------------
# torch conventions


@pytest.mark.parametrize("cls,kw", OPTS, ids=OPT_IDS)
def test_param_group_from_a_generator_is_populated_and_updated(cls, kw):
    require_backend("cpu")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = cls(model[0].parameters(), backend="cpu", **kw)  # a generator for the first group too
    opt.add_param_group({"params": model[1].parameters()})
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("cls,kw", OPTS, ids=OPT_IDS)
def test_tensor_lr_equals_float_lr_bit_for_bit(cls, kw):
    require_backend("cpu")
    a, b = _params(), _params()
    kw_t = dict(kw, lr=torch.tensor(kw["lr"]))
    oa, ob = cls(a, backend="cpu", **kw), cls(b, backend="cpu", **kw_t)
    for s in range(4):
        for p, q in zip(a, b):
            p.grad = torch.full_like(p, 0.3 + s)
            q.grad = p.grad.clone()
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------
# torch.compile (NOTE [compiled step])


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("scheduled", [False, True], ids=["constant-mf", "changing-mf"])
@pytest.mark.parametrize("cls,kw", COMPILE_OPTS, ids=COMPILE_IDS)
def test_compiled_step_equals_eager_without_recompiling(cls, kw, scheduled, compile_backend):
    require_backend("cpu")
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    schedule = (lambda s: 0.5 + 0.035 * s) if scheduled else None
    eager_params, compiled_params = _params(), _params()
    eager = cls(eager_params, mf_schedule=schedule, backend="cpu", **kw)
    compiled = cls(compiled_params, mf_schedule=schedule, backend="cpu", **kw)
    counter = CompileCounterWithBackend(compile_backend)
    step = torch.compile(compiled.step, backend=counter)
    gen = torch.Generator().manual_seed(3)
    counts = []
    for _ in range(12):
        for p, q in zip(eager_params, compiled_params):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        eager.step()
        step()
        counts.append(counter.frame_count)
    for p, q in zip(eager_params, compiled_params):
        assert torch.equal(p, q)
    for p, q in zip(eager_params, compiled_params):
        for key, value in eager.state[p].items():
            other = compiled.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    assert counts[0] >= 1 and counts[2:] == [counts[2]] * 10, counts  # nothing new after step 3


@pytest.mark.parametrize("cls,kw,torch_cls", [(MFSGD, dict(lr=0.1, momentum=0.9), torch.optim.SGD),
                                              (MFAdam, dict(lr=1e-2), torch.optim.Adam)], ids=OPT_IDS)
def test_compiled_step_breaks_the_graph_at_no_more_sites_than_torch(cls, kw, torch_cls):
    """NOTE [compiled step]: the host part is one region outside the graph, commit included."""
    require_backend("cpu")
    from torch._dynamo.utils import counters

    sites = {}
    for name, make in (("fusedmf", lambda ps: cls(ps, backend="cpu", **kw)), ("torch", lambda ps: torch_cls(ps, **kw))):
        torch._dynamo.reset()
        counters.clear()
        params = _params()
        step = torch.compile(make(params).step, backend="aot_eager")
        for _ in range(4):
            for p in params:
                p.grad = torch.randn_like(p)
            step()
        sites[name] = set(counters["graph_break"])
    assert len(sites["fusedmf"]) <= len(sites["torch"]) == 1, sites


@pytest.mark.parametrize("cls,kw", OPTS, ids=OPT_IDS)
def test_compiled_whole_training_step_equals_eager(cls, kw):
    require_backend("cpu")
    torch._dynamo.reset()

    def make():
        torch.manual_seed(5)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        return model, cls(model.parameters(), mf_schedule=lambda s: 0.6 + 0.02 * s, backend="cpu", **kw)

    def train_step(model, opt, x):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    eager_model, eager_opt = make()
    model, opt = make()
    compiled = torch.compile(train_step, backend="aot_eager")
    gen = torch.Generator().manual_seed(6)
    for _ in range(6):
        x = torch.randn(4, 6, generator=gen)
        assert torch.equal(train_step(eager_model, eager_opt, x), compiled(model, opt, x))
    for p, q in zip(eager_model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# meta tensors: nothing reads data on the host


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-masters"])
@pytest.mark.parametrize("cls,kw", OPTS, ids=OPT_IDS)
def test_plain_step_runs_on_meta_tensors(cls, kw, dtype):
    require_backend("cpu")
    params = [torch.empty(s, device="meta", dtype=dtype) for s in ((4, 3), (5,))]
    opt = cls(params, **kw)
    for p in params:
        p.grad = torch.empty_like(p)
    opt.step()
    opt.step(grad_scale=torch.full((), 4.0, device="meta"), found_inf=torch.zeros((), device="meta"))
    assert opt.backends_used == {"cpu": 2}
    state = opt.state[params[0]]
    assert ("master_param" in state) == (dtype == torch.bfloat16)
    assert state["step"] == 2  # a meta flag cannot be read: the step counts as applied


# ---------------------------------------------------------------------------------------------
# GPU only


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (owed on a GPU machine: run tests/test_step_protocol.py there)")
    return require_backend("cuda")


@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
@pytest.mark.parametrize("cls,kw", OPTS, ids=OPT_IDS)
def test_cuda_step_with_a_device_flag_does_not_synchronise(cls, kw, capturable):
    """The default step defers its skip decision (a pinned copy); a capturable one keeps it on the device."""
    _cuda_or_skip()
    params = [torch.randn(1000, device="cuda") for _ in range(3)]
    opt = cls(params, mf_schedule=mf.constant(0.9), capturable=capturable, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    found = torch.zeros((), device="cuda")
    opt.step(found_inf=found)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step(grad_scale=torch.full((), 2.0, device="cuda"), found_inf=found)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.last_step_skipped is False


def test_distributed_optimizer_step_does_not_synchronise(tmp_path):
    _cuda_or_skip()
    import torch.distributed as dist

    from fusedmf.comm import DistributedOptimizer

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
        dopt = DistributedOptimizer(MFSGD(model.parameters(), lr=0.1, momentum=0.9, mf_schedule=mf.constant(0.9)))
        x = torch.randn(16, 64, device="cuda")
        for _ in range(3):  # buckets, launch layout and caches are built in the first steps
            model(x).square().mean().backward()
            dopt.step()
            model.zero_grad()
        model(x).square().mean().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            dopt.step()  # wait for buckets, non-finite check, fused update: no host synchronisation
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        dist.destroy_process_group()
