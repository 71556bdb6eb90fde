"""Triton backend of fusedmf: fused MF-SGD / MF-Adam / SMEGA2 updates, the non-finite check and pack_.

Imported under one name only, ``fusedmf.triton_kernels`` (setup.py maps this folder there), so
there is one module object and one table cache. Importing it registers the kernels as torch ops
``torch.ops.fusedmf.triton_<rule>`` (_ops.py); fusedmf.functional calls those.

Same contract as the compiled binding (fusedmf/functional/__init__.py): in-place, returns None,
all tensors on one device, ``scalars`` a float32 device vector laid out as SGD_SLOTS / ADAM_SLOTS,
``inv_grad_scale`` / ``found_inf`` optional 1-element float32 device tensors read inside the
kernels (no host synchronisation, so a step can be captured in a CUDA graph).

On a GPU the kernels are compiled by Triton. On CPU tensors they run under Triton's interpreter
when TRITON_INTERPRET=1 is set before triton is first imported (that is how CI tests them). Both
run the same code: one multi-tensor launch per call, reading tensor addresses from a cached int64
table (NOTE [multi-tensor tables] in _common.py), which the interpreter supports for CPU tensors.
"""

if __name__ != "fusedmf.triton_kernels":  # a second module object would hold a second cache
    raise ImportError(f"import the Triton kernels as fusedmf.triton_kernels, not as {__name__!r}")

from ._multi_tensor import InputError, clear_table_cache, table_cache_stats
from ._slots import (
    ADAM_BETA1,
    ADAM_BETA2,
    ADAM_BIAS_CORRECTION2_SQRT,
    ADAM_DECAY_FACTOR,
    ADAM_EPS,
    ADAM_L2_WEIGHT_DECAY,
    ADAM_LR,
    ADAM_MAXIMIZE,
    ADAM_NEG_STEP_SIZE,
    ADAM_NUM_SCALARS,
    ADAM_ONE_MINUS_BETA1,
    ADAM_ONE_MINUS_BETA2,
    ADAM_SLOTS,
    SGD_DECAY_FACTOR,
    SGD_FIRST_STEP,
    SGD_L2_WEIGHT_DECAY,
    SGD_LR,
    SGD_MAXIMIZE,
    SGD_MOMENTUM,
    SGD_NESTEROV,
    SGD_NUM_SCALARS,
    SGD_ONE_MINUS_DAMPENING,
    SGD_SLOTS,
    ADAM_SLOT_INDEX,
    SGD_SLOT_INDEX,
)
from . import _ops  # noqa: F401  (registers torch.ops.fusedmf.triton_*)
from .adam import mf_adam_
from .average import apply_average_, pack_delta_
from .non_finite import non_finite_check_
from .pack import pack_
from .sgd import mf_sgd_
from .smega2 import smega2_, smega2_estimate_

__all__ = [
    "mf_sgd_", "mf_adam_", "non_finite_check_", "pack_", "pack_delta_", "apply_average_", "smega2_", "smega2_estimate_",
    "InputError", "table_cache_stats", "clear_table_cache",
    "SGD_SLOTS", "ADAM_SLOTS", "SGD_SLOT_INDEX", "ADAM_SLOT_INDEX", "SGD_NUM_SCALARS", "ADAM_NUM_SCALARS",
    "SGD_LR", "SGD_MOMENTUM", "SGD_ONE_MINUS_DAMPENING", "SGD_L2_WEIGHT_DECAY", "SGD_DECAY_FACTOR",
    "SGD_NESTEROV", "SGD_FIRST_STEP", "SGD_MAXIMIZE",
    "ADAM_LR", "ADAM_BETA1", "ADAM_ONE_MINUS_BETA1", "ADAM_BETA2", "ADAM_ONE_MINUS_BETA2", "ADAM_EPS",
    "ADAM_L2_WEIGHT_DECAY", "ADAM_DECAY_FACTOR", "ADAM_NEG_STEP_SIZE", "ADAM_BIAS_CORRECTION2_SQRT", "ADAM_MAXIMIZE",
]
