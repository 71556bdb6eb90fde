"""torch's own optimizer test database, run through fusedmf.

``torch.testing._internal.common_optimizers.optim_db`` holds, per torch optimizer, the sample
configurations torch tests it with (``optim_inputs_func``) and the inputs it must reject
(``optim_error_inputs_func``). For SGD, Adam and AdamW this module takes them as torch gives them
on CPU and checks fusedmf's drop-in classes against torch's own optimizers:

- trajectories (one test id per configuration): for every sample, with the global "cliquey" flags
  torch's ``_get_optim_inputs_including_global_cliquey_kwargs`` adds on CPU (fused, differentiable;
  plus foreach=True, which that helper leaves out on CPU because torch has no foreach kernels
  there, though torch.optim and fusedmf both accept it), the torch optimizer and the fusedmf one
  are built with the same kwargs over the same params, split into two param groups (the second
  with its own lr, a tensor where the sample's lr is one), and run through the same steps with
  the same grads (one step with no grads at all, two where one param has none, as torch's own
  optimizer tests do); every param and every state tensor torch keeps is compared after
  every step. float32 and float64 for every configuration; bfloat16 where torch's own tests run it
  (where they check their fused kernels against their for-loop: the samples, fused off and on;
  torch's for-loop is the reference there, see torch_kwargs).
- backends: every configuration on the default backend ("auto": the C++ cpu backend for
  float32 and bfloat16, the reference backend for float64), and the samples without a flag in
  float32 on each other backend that runs CPU tensors here: all of them on the reference backend,
  and on cuda_emu and on triton (under TRITON_INTERPRET=1), where each launch costs milliseconds
  of Python, the few that between them switch on every option any sample does (``covering``).
- errors (one test id per error input): fusedmf raises (or warns) torch's exception class, and
  the message matches torch's regex, at construction or at the first step as ``error_on`` says,
  as torch's own tests assert it.
- ``differentiable=True`` is the one thing fusedmf does not do: those configurations assert that
  fusedmf raises NotImplementedError, and ``test_only_differentiable_is_not_run`` checks that
  nothing else in the database is left out.

Tolerances (tests/_util.py states them for every comparison with torch.optim):
- MF-SGD in float32 and float64 is bit-identical to torch's for-loop and foreach SGD on CPU: it
  rounds exactly the operations torch rounds (NOTE [fma placement] in csrc/update_math.h). Against
  torch's fused CPU kernel, which itself differs from torch's for-loop by an ulp in a few momentum
  elements, and on the Triton interpreter, which never fuses a multiply-add, SGD_ULPS (params) and
  MOMENTUM_BUFFER_ULPS apply.
- MF-Adam and MF-AdamW: ADAM_ULPS ulps of the dtype. The C++ and Triton kernels take a correctly
  rounded sqrt where torch's CPU sqrt is not; in float64 (the reference backend, torch's own sqrt)
  the bias correction differs instead: fusedmf divides by 1 - beta1_1·…·beta1_t (a running product,
  exact when beta1 changes every step) where torch takes 1 - beta1**t, and the two differ in the
  last bit from the fourth step on.
- bfloat16: the same constants in bfloat16 ulps. fusedmf computes in float32 and keeps float32
  optimizer state (by design), the param updated in place (master_weights=False, as torch has no
  masters); torch's for-loop rounds the state to bfloat16 at each of its operations, which is the
  same kind of per-operation rounding difference those constants budget for.

Every configuration records whether it matched bitwise and its largest distance in ulps;
``test_summary`` prints the counts.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
from collections import Counter, defaultdict
from typing import NamedTuple

import pytest
import torch

# torch.testing._internal imports expecttest, a test dependency of torch's that scripts/env.sh
# installs. Machines whose Python comes with torch and no network (the GPU images) may lack it;
# there the module is skipped, naming why. In CI (CI=true) a missing expecttest is an error.
if not os.environ.get("CI"):
    pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (scripts/env.sh installs it)")

from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import fusedmf
from fusedmf.optim import MFAdam, MFAdamW, MFSGD

from _util import (
    ADAM_ULPS,
    MOMENTUM_BUFFER_ULPS,
    SGD_ULPS,
    assert_bit_identical,
    assert_close_ulps,
    max_ulps,
    scaled_ulps,
)
from conftest import require_backend, required_backends

CPU = "cpu"
STEPS = 7  # as many as torch's own tests compare two implementations over
FUSEDMF_CLASSES = {"SGD": MFSGD, "Adam": MFAdam, "AdamW": MFAdamW}
INFOS = {info.name: info for info in optim_db if info.name in FUSEDMF_CLASSES}
# params of the trajectory: matrices, a vector, a 3-D tensor, a one-element tensor, a 0-dim tensor
# (torch's own tests end their params with one) and an empty tensor; the first three form group 0
SHAPES = [(10, 5), (10,), (3, 4, 2), (1,), (), (0,)]
GROUP_SPLIT = 3
# steps with grads missing, as in torch's own tests: no grad at all (a no-op step), and a
# param without a grad for two steps (its step count falls behind the others')
NO_GRADS_STEP = 2
FROZEN = (0, {3, 4})
SECOND_GROUP_LR_FACTOR = 0.5
OTHER_BACKENDS = ("reference", "cuda_emu", "triton")


def _cpu_backends() -> list:
    """The backends that run CPU tensors here, besides the default one: triton only when interpreted."""
    status = fusedmf.available_backends()
    names = []
    for name in OTHER_BACKENDS:
        if name == "triton" and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1"):
            continue
        names.append(name)
    # one that FUSEDMF_REQUIRE_BACKENDS names stays, to fail in require_backend
    return [n for n in names if status[n].available or n in required_backends()]


class Config(NamedTuple):
    optim: str            # torch's name: SGD, Adam, AdamW
    dtype: torch.dtype
    backend: str          # "auto" or a backend name
    desc: str             # torch's description, with the flags it added
    kwargs: dict

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        desc = re.sub(r"[^A-Za-z0-9&]+", "_", self.desc).replace("_&_", "&")
        return f"{self.optim}-{dt}-{self.backend}-{desc}"

    @property
    def differentiable(self) -> bool:
        return bool(self.kwargs.get("differentiable", False))


def _samples(info, dtype) -> list:
    """Torch's CPU samples of `info` with the global flags torch's tests add, for `dtype`."""
    if dtype == torch.bfloat16:
        # as torch tests its fused kernels in bfloat16: the samples for this dtype, fused off and on
        out = []
        for sample in info.optim_inputs_func(device=CPU, dtype=dtype):
            for fused in (False, True):
                kwargs = dict(copy.deepcopy(sample.kwargs), fused=fused)
                out.append(OptimizerInput(params=None, kwargs=kwargs,
                                          desc=sample.desc + (" & fused" if fused else "")))
        return out
    out = _get_optim_inputs_including_global_cliquey_kwargs(CPU, dtype, info)
    # torch accepts foreach=True on CPU (its foreach ops fall back to per-tensor loops) but the
    # helper adds that flag only where foreach kernels exist; fusedmf accepts it everywhere
    for sample in info.optim_inputs_func(device=CPU, dtype=dtype):
        kwargs = dict(copy.deepcopy(sample.kwargs), foreach=True)
        out.append(OptimizerInput(params=None, kwargs=kwargs, desc=sample.desc + " & foreach"))
    return out


def _is_plain(sample) -> bool:
    return not any(sample.kwargs.get(flag) for flag in ("foreach", "fused", "differentiable"))


def _features(sample) -> set:
    """What a sample switches on that a kernel or the host plan treats differently (a float lr of
    another value is just another number)."""
    out = {k for k, v in sample.kwargs.items() if k != "lr" and v}
    if isinstance(sample.kwargs.get("lr"), torch.Tensor):
        out.add("tensor lr")
    return out


def covering(samples: list) -> list:
    """Few samples that switch on, between them, every feature any of `samples` does (greedy, in
    torch's order): the subset run on the backends whose every launch costs milliseconds of Python
    (the Triton interpreter, the CUDA emulator)."""
    left, chosen = set().union(*(_features(s) for s in samples)), []
    while left:
        best = max(samples, key=lambda s: len(_features(s) & left))
        chosen.append(best)
        left -= _features(best)
    return [s for s in samples if any(s is c for c in chosen)]


def all_configs() -> list:
    configs = []
    for name, info in INFOS.items():
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for sample in _samples(info, dtype):
                configs.append(Config(name, dtype, "auto", sample.desc, sample.kwargs))
        plain = [s for s in _samples(info, torch.float32) if _is_plain(s)]
        for backend in _cpu_backends():
            for sample in plain if backend == "reference" else covering(plain):
                configs.append(Config(name, torch.float32, backend, sample.desc, sample.kwargs))
    return configs


CONFIGS = all_configs()
RESULTS: dict = {}  # config id -> ("bitwise" | "tolerance" | "differentiable", max ulps)


# ---- tolerances ------------------------------------------------------------------------------------


def expect_bitwise(config: Config) -> bool:
    """Where fusedmf must reproduce torch bit for bit (see the module docstring): SGD against torch's
    for-loop and foreach implementations. Not against torch's fused CPU kernel, which rounds the
    momentum update differently from torch's own for-loop (an ulp in a few elements of the buffer)."""
    if config.optim != "SGD" or config.dtype == torch.bfloat16 or config.kwargs.get("fused"):
        return False
    return config.backend != "triton"


def check_tensor(config: Config, actual: torch.Tensor, expected: torch.Tensor, what: str, momentum: bool) -> float:
    """Assert `actual` (fusedmf) matches `expected` (torch) as `config` requires; return the error:
    0 when bit-identical, else in ulps of the dtype (assert_close_ulps's measure)."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    if config.dtype == torch.bfloat16 and "state" in what:
        # fusedmf keeps every optimizer state in float32 (torch keeps it in the param's dtype)
        assert actual.dtype == torch.float32, f"{what}: fusedmf state is {actual.dtype}, not float32"
    else:
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != torch's {expected.dtype}"
    if actual.dtype == expected.dtype and max_ulps(actual, expected) == 0:
        return 0.0
    if expect_bitwise(config):
        assert_bit_identical(actual, expected, what)
    eps = torch.finfo(config.dtype).eps
    ulps = ADAM_ULPS if config.optim != "SGD" else (MOMENTUM_BUFFER_ULPS if momentum else SGD_ULPS)
    assert_close_ulps(actual, expected, ulps=ulps, name=what, eps=eps)
    return scaled_ulps(actual, expected, eps)


# ---- the trajectory --------------------------------------------------------------------------------


def _default_lr(torch_cls) -> float:
    return inspect.signature(torch_cls.__init__).parameters["lr"].default


def make_groups(config: Config, torch_cls, named: bool = False):
    """A maker of equal params and their two param groups (one for torch, one for fusedmf; with
    named=True as named_parameters() gives them, (name, tensor) pairs), and the constructor kwargs."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(shape, generator=gen, dtype=torch.float64).to(config.dtype) for shape in SHAPES]
    kwargs = copy.deepcopy(config.kwargs)
    lr = kwargs.get("lr", _default_lr(torch_cls))
    lr2 = lr * SECOND_GROUP_LR_FACTOR  # a tensor lr gives a tensor lr
    if isinstance(lr2, torch.Tensor):
        lr2 = lr2.detach().clone()

    def groups():
        params = [t.clone().requires_grad_() for t in base]
        group2_lr = lr2.clone() if isinstance(lr2, torch.Tensor) else lr2
        listed = [(f"p{i}", p) for i, p in enumerate(params)] if named else params
        return params, [{"params": listed[:GROUP_SPLIT]}, {"params": listed[GROUP_SPLIT:], "lr": group2_lr}]

    return groups, kwargs


def set_grads(param_lists, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for i, shape in enumerate(SHAPES):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        for params in param_lists:
            frozen = i == FROZEN[0] and step in FROZEN[1]
            params[i].grad = None if step == NO_GRADS_STEP or frozen else g.to(params[i].dtype)


def torch_kwargs(config: Config, kwargs: dict) -> dict:
    """The sample's kwargs for torch, except that in bfloat16 torch's for-loop implementation is the
    reference (torch checks its fused kernels against it in bfloat16):
    torch 2.11's fused CPU SGD with bfloat16 params and momentum writes a wrong momentum buffer from
    the second step on, in each tensor's whole 32-element vectors (tensors under 32 elements, like
    those of torch's own tests, come out right)."""
    kwargs = copy.deepcopy(kwargs)
    if config.dtype == torch.bfloat16:
        kwargs["fused"] = False
    return kwargs


def fusedmf_kwargs(config: Config, kwargs: dict) -> dict:
    extra = {}
    if config.backend != "auto":
        extra["backend"] = config.backend
    if config.dtype == torch.bfloat16:
        extra["master_weights"] = False  # the param updated in place, as torch does
    return dict(copy.deepcopy(kwargs), **extra)


def expected_backend(config: Config) -> str:
    """What "auto" picks for CPU tensors: the C++ kernels, except for float64 (the reference)."""
    if config.backend != "auto":
        return config.backend
    if config.dtype == torch.float64 or not fusedmf.available_backends()["cpu"].available:
        return "reference"
    return "cpu"


def _step_value(step) -> int:
    return int(step.item()) if isinstance(step, torch.Tensor) else int(step)


def compare_states(config, ours_opt, theirs_opt, ours, theirs, step) -> int:
    worst = 0
    for i, (p, q) in enumerate(zip(ours, theirs)):
        worst = max(worst, check_tensor(config, p, q, f"step {step}: param {i}", momentum=False))
        their_state = theirs_opt.state.get(q, {})
        our_state = ours_opt.state.get(p, {})
        for key, value in their_state.items():
            what = f"step {step}: state[param {i}][{key!r}]"
            assert key in our_state, f"{what}: missing in fusedmf's state (keys {sorted(our_state)})"
            mine = our_state[key]
            if key == "step":
                assert _step_value(mine) == _step_value(value), f"{what}: {mine} != torch's {value}"
            elif value is None:
                assert mine is None, f"{what}: torch keeps None, fusedmf {type(mine).__name__}"
            else:
                assert isinstance(mine, torch.Tensor), f"{what}: fusedmf keeps {mine!r}"
                worst = max(worst, check_tensor(config, mine, value, what, momentum=key == "momentum_buffer"))
    return worst


def _torch_cls(name):
    return getattr(torch.optim, name)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.id for c in CONFIGS])
def test_trajectory_matches_torch(config: Config):
    run_trajectory(config)


def run_trajectory(config: Config, named: bool = False):
    torch_cls, ours_cls = _torch_cls(config.optim), FUSEDMF_CLASSES[config.optim]
    if config.backend != "auto":
        require_backend(config.backend)  # fails when FUSEDMF_REQUIRE_BACKENDS names it
    groups, kwargs = make_groups(config, torch_cls, named)
    ours, our_groups = groups()
    if config.differentiable:
        with pytest.raises(NotImplementedError):
            ours_cls(our_groups, **fusedmf_kwargs(config, kwargs))
        RESULTS[config.id] = ("differentiable", None)
        return
    theirs, their_groups = groups()
    theirs_opt = torch_cls(their_groups, **torch_kwargs(config, kwargs))
    ours_opt = ours_cls(our_groups, **fusedmf_kwargs(config, kwargs))
    worst = 0
    for step in range(STEPS):
        set_grads([ours, theirs], step)
        theirs_opt.step()
        ours_opt.step()
        worst = max(worst, compare_states(config, ours_opt, theirs_opt, ours, theirs, step))
    assert set(ours_opt.backends_used) == {expected_backend(config)}, ours_opt.backends_used
    RESULTS[config.id] = ("bitwise" if worst == 0 else "tolerance", worst)
    return ours_opt, theirs_opt


@pytest.mark.parametrize("optim", sorted(INFOS))
def test_named_parameters(optim):
    """params as named_parameters() gives them: the same trajectory, and the names in the
    state_dict's param groups as torch records them."""
    sample = INFOS[optim].optim_inputs_func(device=CPU)[0]
    config = Config(optim, torch.float32, "auto", f"named {sample.desc}", sample.kwargs)
    ours_opt, theirs_opt = run_trajectory(config, named=True)
    ours_groups, theirs_groups = ours_opt.state_dict()["param_groups"], theirs_opt.state_dict()["param_groups"]
    assert [g.get("param_names") for g in ours_groups] == [g["param_names"] for g in theirs_groups]


# ---- error inputs ----------------------------------------------------------------------------------


def all_error_inputs() -> list:
    out = []
    for name, info in INFOS.items():
        for i, error in enumerate(info.optim_error_inputs_func(device=CPU, dtype=torch.float32)):
            desc = re.sub(r"[^A-Za-z0-9]+", "_", error.optimizer_error_input.desc).strip("_")
            out.append(pytest.param(name, error, id=f"{name}-{i}-{desc}"))
    return out


ERROR_INPUTS = all_error_inputs()


def _expect(error):
    if issubclass(error.error_type, Warning):
        return pytest.warns(error.error_type, match=error.error_regex)
    return pytest.raises(error.error_type, match=error.error_regex)


@pytest.mark.parametrize("optim,error", ERROR_INPUTS)
def test_error_inputs_raise_torchs_exception(optim, error):
    """As torch's own tests: the same class (a warning where torch warns) and a message matching
    torch's regex, at construction or at the first step."""
    ours_cls = FUSEDMF_CLASSES[optim]
    sample = error.optimizer_error_input
    params, kwargs = sample.params, sample.kwargs
    if error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with _expect(error):
            ours_cls(params, **kwargs)
    else:
        assert error.error_on == OptimizerErrorEnum.STEP_ERROR, error.error_on
        opt = ours_cls(params, **kwargs)
        with _expect(error):
            opt.step()


# ---- what is left out, and the summary -------------------------------------------------------------


def test_only_differentiable_is_not_run():
    """Every configuration of SGD, Adam and AdamW in torch's database is run here, except those with
    differentiable=True (fusedmf raises NotImplementedError for them, asserted above)."""
    assert set(INFOS) == {"SGD", "Adam", "AdamW"}
    by_optim = Counter(c.optim for c in CONFIGS if c.backend == "auto" and c.dtype != torch.bfloat16)
    for name, info in INFOS.items():
        n = len(info.optim_inputs_func(device=CPU))
        # per dtype: plain, differentiable and fused from torch's helper, and foreach=True
        assert by_optim[name] == 2 * 4 * n, (name, by_optim[name], n)
    left_out = [c for c in CONFIGS if c.differentiable]
    assert all(set(k for k, v in c.kwargs.items() if v is True) >= {"differentiable"} for c in left_out)
    assert len(ERROR_INPUTS) > 0


def test_summary(request, capsys):
    """Counts per optimizer, dtype and backend of what passed in this session (everything, unless
    tests were deselected or failed): bitwise, within tolerance (and the largest error in ulps), or
    differentiable (NotImplementedError asserted)."""
    counts = defaultdict(Counter)
    worst = defaultdict(float)
    for config in CONFIGS:
        outcome = RESULTS.get(config.id)
        key = f"{config.optim:5s} {str(config.dtype).replace('torch.', ''):8s} {config.backend:9s}"
        if outcome is None:
            counts[key]["failed or not run"] += 1
            continue
        kind, ulps = outcome
        counts[key][kind] += 1
        if kind == "tolerance":
            worst[key] = max(worst[key], ulps)
        # what each configuration may come out as: only differentiable ones are not compared, and
        # the bit-identical ones cannot have passed otherwise
        assert (kind == "differentiable") == config.differentiable, config.id
        assert kind != "tolerance" or not expect_bitwise(config), config.id
    lines = ["torch optim_db through fusedmf: configurations per optimizer / dtype / backend"]
    for key in sorted(counts):
        c = counts[key]
        lines.append(f"  {key}: {sum(c.values()):3d} configs, {c['bitwise']:3d} bitwise, "
                     f"{c['tolerance']:3d} within tolerance (max {worst[key]:.3g} ulps), "
                     f"{c['differentiable']:3d} differentiable (NotImplementedError), "
                     f"{c['failed or not run']:3d} failed or not run")
    if request.config.getoption("verbose") > 0:  # -v: each configuration's outcome
        for config in CONFIGS:
            kind, ulps = RESULTS.get(config.id, ("failed or not run", None))
            lines.append(f"    {config.id}: {kind}" + ("" if not ulps else f" ({ulps:.3g} ulps)"))
    with capsys.disabled():  # to the terminal, whatever the capture mode
        print("\n" + "\n".join(lines))
