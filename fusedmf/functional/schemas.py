"""The signature of every fusedmf op and its fake kernel (NOTE [op schemas] in csrc/bindings.cpp).

Shared by the dispatcher (fusedmf/functional/_ops.py, which registers the fakes of the C++ ops) and
by the backends that define their ops in Python (the Triton kernels, fusedmf.triton_kernels): a
leaf module, importing nothing from fusedmf, so that a backend can use it without importing the
dispatcher that loads that backend.

Fake (meta) kernels: FakeTensor, torch.compile and meta tensors see the ops' effect (none: every
op mutates its arguments in place and returns nothing) without running a kernel. This module makes
them; each registrar registers them from its own module, because torch checks that the fakes of a
C++ op are registered by the module its TORCH_LIBRARY names (set_python_module).
"""

from __future__ import annotations

import torch

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


def _arg_names(schema: str) -> list:
    inner = schema[schema.index("(") + 1:schema.rindex(") ->")]
    return [a.split("=")[0].split()[-1] for a in inner.split(", ")]


def make_fake(rule: str):
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

