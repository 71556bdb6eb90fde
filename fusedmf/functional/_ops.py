"""The one table from a backend name to its torch ops (NOTE [op schemas] in csrc/bindings.cpp).

Every compiled kernel is a torch op: ``torch.ops.fusedmf.<rule>`` for the C++ CPU/CUDA kernels
(registered by csrc/bindings.cpp when fusedmf._C is imported; the dispatcher picks CPU or CUDA
from the tensors' device), ``torch.ops.fusedmf.triton_<rule>`` for the Triton kernels (registered
by fusedmf/triton_kernels/_ops.py with the signatures below). A new backend is one row of
``OP_TABLE``: the function that imports whatever registers its ops, and its op-name prefix.

Fake (meta) kernels are registered here for every op of a loaded backend, so FakeTensor,
torch.compile and meta tensors see the ops' effect (none: every op mutates its arguments in place
and returns nothing) without running a kernel.
"""

from __future__ import annotations

import functools

import torch

from .. import _backends
from .scalars import ADAM_SLOTS, SGD_SLOTS, SMEGA2_SLOTS

#: the signature of each rule, the same for every backend (csrc/bindings.cpp TORCH_LIBRARY holds
#: the C++ copy of these strings; tests/test_ops.py checks that the two agree)
SCHEMAS = {
    "mf_sgd_": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] master_params, "
               "Tensor scalars, Tensor? inv_grad_scale=None, Tensor? found_inf=None) -> ()",
    "mf_adam_": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
                "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, Tensor scalars, "
                "Tensor? inv_grad_scale=None, Tensor? found_inf=None) -> ()",
    "non_finite_check_": "(Tensor[] tensors, Tensor(a!) found_inf, Tensor(b!)? sumsq=None) -> ()",
    "pack_": "(Tensor[] grads, Tensor(a!) out, float scale, Tensor(b!)? sumsq=None) -> ()",
}
RULES = tuple(SCHEMAS)

#: backend -> (loader returning (module or None, why it is missing), op-name prefix)
OP_TABLE = {
    "cpu": (_backends.compiled_extension, ""),
    "cuda": (_backends.compiled_extension, ""),
    "triton": (_backends.triton_module, "triton_"),
    # csrc/cuda's kernels compiled for the host (FUSEDMF_CUDA_EMU=1), registered by csrc/bindings.cpp
    "cuda_emu": (_backends.cuda_emu_extension, "cuda_emu_"),
}


def _arg_names(schema: str) -> list:
    inner = schema[schema.index("(") + 1:schema.rindex(") ->")]
    return [a.split("=")[0].split()[-1] for a in inner.split(", ")]


def _make_fake(rule: str):
    """Every fusedmf op mutates its arguments in place and returns nothing, so its fake kernel has
    no outputs to make; it checks what it can see without data (one device for every tensor) so
    that a mixed call is refused on meta tensors too, with the tensor named as the kernels do."""
    names = _arg_names(SCHEMAS[rule])
    # the tensor the kernels compare the others with: pack_'s out, else the first list (params)
    anchor = names.index("out") if "out" in names else 0
    order = [anchor] + [i for i in range(len(names)) if i != anchor]

    def fake(*args, **kwargs) -> None:
        values = list(args) + [kwargs.get(n) for n in names[len(args):]]
        first = None
        for name, value in ((names[i], values[i]) for i in order):
            items = value if isinstance(value, (list, tuple)) else [value]
            for i, t in enumerate(items):
                if not isinstance(t, torch.Tensor):
                    continue
                where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
                if first is None:
                    first = (where, t.device)
                elif t.device != first[1]:
                    raise ValueError(f"fusedmf.{rule}: {where} is on {t.device} but {first[0]} is on {first[1]} "
                                     "(all tensors of one call must be on one device)")
        return None

    return fake


_faked: set = set()


def register_fakes(prefix: str, lib=None) -> None:
    """Register the fake kernel of every rule's op under ``prefix`` (once per prefix)."""
    if prefix in _faked:
        return
    for rule in RULES:
        torch.library.register_fake(f"fusedmf::{prefix}{rule}", _make_fake(rule), lib=lib)
    _faked.add(prefix)


def check_slot_layout(backend: str, index_of: dict, slots: tuple, what: str) -> None:
    """NOTE [one scalar layout]: a backend's slot constants, by name, against scalars.py's tuple."""
    got = {name: index_of.get(name) for name in slots}
    want = {name: i for i, name in enumerate(slots)}
    extra = sorted(set(index_of) - set(slots))
    if got != want or extra:
        raise RuntimeError(
            f"fusedmf: backend {backend!r} lays out the {what} scalar vector as {dict(sorted(index_of.items(), key=lambda kv: kv[1]))}"
            f" but fusedmf/functional/scalars.py says {want}; rebuild the extension from this checkout")


@functools.lru_cache(maxsize=None)
def _loaded(backend: str):
    loader, prefix = OP_TABLE[backend]
    module, why = loader()
    if module is None:
        raise RuntimeError(f"fusedmf backend {backend!r} is not available: {why}")
    check_slot_layout(backend, dict(module.SGD_SLOT_INDEX), SGD_SLOTS, "SGD")
    check_slot_layout(backend, dict(module.ADAM_SLOT_INDEX), ADAM_SLOTS, "Adam")
    if loader is not _backends.triton_module:
        # csrc/smega2_ops.cpp reads the same update_math.h constants (Triton checks its own)
        check_slot_layout(backend, dict(module.SMEGA2_SLOT_INDEX), SMEGA2_SLOTS, "SMEGA2")
        register_fakes(prefix)  # the C++ ops are defined in C++; their fakes live here
    return prefix


@functools.lru_cache(maxsize=None)
def op(backend: str, rule: str):
    """The OpOverload that runs ``rule`` on ``backend`` (e.g. ("triton", "mf_sgd_") ->
    torch.ops.fusedmf.triton_mf_sgd_.default)."""
    prefix = _loaded(backend)
    if not hasattr(torch.ops.fusedmf, prefix + rule):
        raise RuntimeError(f"fusedmf backend {backend!r} has no op {prefix + rule!r}: it was built from older sources; "
                           "rebuild it with `pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`)")
    return getattr(torch.ops.fusedmf, prefix + rule).default


# Load the compiled extension now if it is built (a failed import is recorded, not raised:
# _backends.compiled_extension), so that its ops have their fake kernels from the start, whichever
# way they are reached (torch.ops.fusedmf.*, fusedmf.functional, torch.compile).
_backends.compiled_extension()
