"""The Triton kernels as torch ops: ``torch.ops.fusedmf.triton_<rule>`` (NOTE [op schemas]).

Registered with the signatures of the C++ ops (fusedmf/functional/schemas.py SCHEMAS), for CPU
tensors (under TRITON_INTERPRET=1) and CUDA tensors, with fake kernels for FakeTensor and meta.

Why a plain torch.library op and not ``torch.library.triton_op``: the launches read tensor
addresses from a cached int64 table (NOTE [multi-tensor tables] in _common.py), which cannot be
traced into a graph; to torch.compile the op is opaque, as the C++ ops are.
"""

import torch

from fusedmf.functional.schemas import SCHEMAS, make_fake

from .adam import mf_adam_
from .non_finite import non_finite_check_
from .pack import pack_
from .sgd import mf_sgd_

PREFIX = "triton_"
_KERNELS = {"mf_sgd_": mf_sgd_, "mf_adam_": mf_adam_, "non_finite_check_": non_finite_check_, "pack_": pack_}

_lib = torch.library.Library("fusedmf", "FRAGMENT")  # kept alive: dropping it unregisters the ops
for _rule, _fn in _KERNELS.items():
    _lib.define(PREFIX + _rule + SCHEMAS[_rule])
    for _key in ("CPU", "CUDA", "SparseCPU", "SparseCUDA"):  # the kernels refuse sparse tensors by name
        _lib.impl(PREFIX + _rule, _fn, _key)
    torch.library.register_fake(f"fusedmf::{PREFIX}{_rule}", make_fake(_rule), lib=_lib)
