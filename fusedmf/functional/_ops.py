"""The one table from a backend name to its torch ops (NOTE [op schemas] in csrc/bindings.cpp).

Every compiled kernel is a torch op: ``torch.ops.fusedmf.<rule>`` for the C++ CPU/CUDA kernels
(registered by csrc/bindings.cpp when fusedmf._C is imported; the dispatcher picks CPU or CUDA
from the tensors' device), ``torch.ops.fusedmf.triton_<rule>`` for the Triton kernels (registered
by fusedmf/triton_kernels/_ops.py with the signatures of schemas.py). A new backend is one row of
``OP_TABLE``: the function that imports whatever registers its ops, and its op-name prefix.

The signatures and the fake kernels live in schemas.py (a leaf the Triton kernels import too);
this module registers the fakes of the C++ ops, which csrc/bindings.cpp names as their Python
module, and of every other loaded backend's ops.
"""

from __future__ import annotations

import functools

import torch

from .. import _backends
from .scalars import ADAM_SLOTS, SGD_SLOTS, SMEGA2_SLOTS
from .schemas import RULES, SCHEMAS, make_fake  # noqa: F401  (SCHEMAS: re-exported)

#: backend -> (loader returning (module or None, why it is missing), op-name prefix)
OP_TABLE = {
    "cpu": (_backends.compiled_extension, ""),
    "cuda": (_backends.compiled_extension, ""),
    "triton": (_backends.triton_module, "triton_"),
    # csrc/cuda's kernels compiled for the host (FUSEDMF_CUDA_EMU=1), registered by csrc/bindings.cpp
    "cuda_emu": (_backends.cuda_emu_extension, "cuda_emu_"),
}


_faked: set = set()


def register_fakes(prefix: str) -> None:
    """Register the fake kernel of every rule's C++ op under ``prefix`` (once per prefix). Called here,
    in the module csrc/bindings.cpp names with set_python_module: torch refuses the fakes of a C++
    op registered from any other module."""
    if prefix in _faked:
        return
    for rule in RULES:
        torch.library.register_fake(f"fusedmf::{prefix}{rule}", make_fake(rule))
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
# way they are reached (torch.ops.fusedmf.*, fusedmf.functional, torch.compile). Done here, above
# _backends, rather than by the loader: the loader stays free of the layer that uses it.
if _backends.compiled_extension()[0] is not None:
    register_fakes("")
