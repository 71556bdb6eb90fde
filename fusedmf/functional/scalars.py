"""Per-step hyperparameters of every update rule, computed once per step by one function.

NOTE [per-step scalars are data]
Every backend (reference, cpu, cuda, triton) receives the same float32 vector, laid out as the
``*_SLOTS`` tuples below say. The vector is computed here, in float64 on the host, and only then
rounded to float32, so that host-side products such as ``1 - lr * weight_decay`` or ``lr / bc1``
are rounded once, exactly as torch.optim rounds them (it also computes them as Python floats).
Compiled kernels read the vector from device memory, which is what lets a step be captured in a
CUDA graph: only the contents of the vector change between steps, never the kernel arguments.

Flags (nesterov, first_step, maximize) travel in the same vector as 0.0 / 1.0 so that a kernel has a single
scalar argument; a kernel tests them with ``!= 0``.

NOTE [capturable scalars]
A ``capturable=True`` step (fusedmf/optim/_base.py) cannot compute the vector on the host: its step
counts, beta1 product and MF live on the device. The slot formulas below (``sgd_slots``,
``adam_slots``) are therefore written once for values that are Python floats *or* 0-dim float64
tensors, and the device path evaluates the very same expressions with tensor ops in float64
before the one rounding to float32, as the host does. Two torch conveniences would round twice
and are avoided (``_div``): ``float / tensor`` multiplies by the reciprocal, and on CUDA so does
``tensor / float``. Validation stays on the host path (the device values are checked where the
host writes them: the MF table, the group's settings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Slot order of the MF-SGD / MF-NAG scalar vector. Keep in sync with csrc/update_math.h
# (kSgd* constants) and triton_kernels/ (SGD_* constants).
SGD_SLOTS = (
    "lr",                   # η_t
    "momentum",             # μ_t, the MF
    "one_minus_dampening",  # 1 − τ
    "l2_weight_decay",      # λ when weight decay is L2 (added to the gradient), else 0
    "decay_factor",         # 1 − η_t·λ when weight decay is decoupled, else 1
    "nesterov",             # 1.0 for NAG
    "first_step",           # 1.0 when the momentum buffer starts as g (no buffer read)
    "maximize",             # 1.0: ascend (the unscaled gradient is negated first, torch's maximize)
)

# Slot order of the MF-Adam / MF-AdamW scalar vector. Keep in sync with csrc/update_math.h
# (kAdam* constants) and triton_kernels/ (ADAM_* constants).
ADAM_SLOTS = (
    "lr",                     # η_t (only for reference/logging; the update uses neg_step_size)
    "beta1",                  # μ_t, the MF
    "one_minus_beta1",        # 1 − μ_t, the lerp weight torch uses
    "beta2",
    "one_minus_beta2",
    "eps",
    "l2_weight_decay",        # λ when weight decay is L2, else 0
    "decay_factor",           # 1 − η_t·λ when decoupled (AdamW), else 1
    "neg_step_size",          # −η_t / (1 − P_t), P_t the running product of beta1 values
    "bias_correction2_sqrt",  # sqrt(1 − β2^t)
    "maximize",               # 1.0: ascend (the unscaled gradient is negated first, torch's maximize)
)

SGD_NUM_SCALARS = len(SGD_SLOTS)
ADAM_NUM_SCALARS = len(ADAM_SLOTS)


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


# The messages start as torch.optim's do ("Invalid ... value: x"), so code that matches torch's
# errors matches these too.
def check_mf(name: str, value: float) -> float:
    """A momentum-like factor must lie in [0, 1)."""
    value = _check_finite(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name} value: {value!r} (the momentum-like factor must be in [0, 1))")
    return value


def check_lr(value: float) -> float:
    value = _check_finite("lr", value)
    if value < 0.0:
        raise ValueError(f"Invalid learning rate: {value!r}: lr must be >= 0")
    return value


def check_weight_decay(value: float) -> float:
    value = _check_finite("weight_decay", value)
    if value < 0.0:
        raise ValueError(f"Invalid weight_decay value: {value!r}: weight_decay must be >= 0")
    return value


@dataclass(frozen=True)
class SGDStepScalars:
    lr: float
    momentum: float
    one_minus_dampening: float
    l2_weight_decay: float
    decay_factor: float
    nesterov: float
    first_step: float
    maximize: float = 0.0

    def slot_values(self) -> list:
        """The slots in vector order: floats, or 0-dim tensors in a capturable step."""
        return [getattr(self, name) for name in SGD_SLOTS]

    def as_list(self) -> list[float]:
        return [float(v) for v in self.slot_values()]


@dataclass(frozen=True)
class AdamStepScalars:
    lr: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    l2_weight_decay: float
    decay_factor: float
    neg_step_size: float
    bias_correction2_sqrt: float
    maximize: float = 0.0

    def slot_values(self) -> list:
        """The slots in vector order: floats, or 0-dim tensors in a capturable step."""
        return [getattr(self, name) for name in ADAM_SLOTS]

    def as_list(self) -> list[float]:
        return [float(v) for v in self.slot_values()]


def sgd_step_scalars(
    *,
    lr: float,
    momentum: float,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    decoupled_weight_decay: bool = False,
    first_step: bool = False,
    maximize: bool = False,
) -> SGDStepScalars:
    """The scalar vector of one MF-SGD/MF-NAG step (the only place these values are derived)."""
    lr = check_lr(lr)
    momentum = check_mf("momentum", momentum)
    dampening = _check_finite("dampening", dampening)
    weight_decay = check_weight_decay(weight_decay)
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening "
                         "(nesterov momentum requires a momentum > 0 and zero dampening)")
    return sgd_slots(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                     decoupled_weight_decay=decoupled_weight_decay, first_step=first_step, maximize=maximize)


def _flag(x):
    """A flag slot: 1.0 / 0.0 from a bool, or a bool tensor as float64 (NOTE [capturable scalars])."""
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else (1.0 if x else 0.0)


def _div(a, b):
    """``a / b`` rounded once, as Python floats divide, for floats or float64 tensors
    (NOTE [capturable scalars]: a float operand is made a tensor, so no reciprocal is taken)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        like = a if isinstance(a, torch.Tensor) else b
        a = a if isinstance(a, torch.Tensor) else torch.full_like(like, a)
        b = b if isinstance(b, torch.Tensor) else torch.full_like(like, b)
    return a / b


def sgd_slots(*, lr, momentum, dampening, weight_decay, nesterov, decoupled_weight_decay, first_step,
              maximize=False) -> SGDStepScalars:
    """The MF-SGD slot formulas, unchecked: floats, or 0-dim float64 tensors for ``lr``, ``momentum``,
    ``dampening`` and ``first_step`` (a bool tensor) in a capturable step (NOTE [capturable scalars])."""
    return SGDStepScalars(
        lr=lr,
        momentum=momentum,
        one_minus_dampening=1.0 - dampening,
        l2_weight_decay=0.0 if decoupled_weight_decay else weight_decay,
        decay_factor=1.0 - lr * weight_decay if decoupled_weight_decay else 1.0,
        nesterov=1.0 if nesterov else 0.0,
        first_step=_flag(first_step),
        maximize=1.0 if maximize else 0.0,
    )


def adam_step_scalars(
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    step: int,
    beta1_product: float,
    maximize: bool = False,
) -> AdamStepScalars:
    """The scalar vector of one MF-Adam/AdamW step.

    ``step`` is the 1-based number of the update about to be applied and ``beta1_product`` is
    P_t = prod_{s<=t} beta1_s *including* this step's beta1 (kept in float64 by the caller). With a
    constant beta1, P_t == beta1**t and this reproduces torch.optim.Adam's bias correction.
    """
    lr = check_lr(lr)
    beta1 = check_mf("beta1", beta1)
    beta2 = _check_finite("beta2", beta2)
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2!r}: beta2 must be in [0, 1)")
    eps = _check_finite("eps", eps)
    if eps < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps!r}: eps must be >= 0")
    weight_decay = check_weight_decay(weight_decay)
    if step < 1:
        raise ValueError(f"step must be >= 1 (the 1-based update number), got {step}")
    bias_correction1 = 1.0 - float(beta1_product)
    if bias_correction1 <= 0.0:
        raise ValueError(f"beta1 product {beta1_product!r} gives a non-positive bias correction")
    return adam_slots(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                      decoupled_weight_decay=decoupled_weight_decay, step=step, beta1_product=float(beta1_product),
                      maximize=maximize)


def adam_slots(*, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, step, beta1_product,
               maximize=False) -> AdamStepScalars:
    """The MF-Adam slot formulas, unchecked: floats, or 0-dim tensors for ``lr``, ``beta1``, ``step``
    and ``beta1_product`` (float64; ``step`` any dtype) in a capturable step (NOTE [capturable scalars])."""
    if isinstance(step, torch.Tensor):
        step = step.to(torch.float64)  # beta2 ** int tensor would be computed in float32
    bias_correction1 = 1.0 - beta1_product
    bias_correction2 = 1.0 - beta2**step
    return AdamStepScalars(
        lr=lr,
        beta1=beta1,
        one_minus_beta1=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        eps=eps,
        l2_weight_decay=0.0 if decoupled_weight_decay else weight_decay,
        decay_factor=1.0 - lr * weight_decay if decoupled_weight_decay else 1.0,
        neg_step_size=-_div(lr, bias_correction1),
        bias_correction2_sqrt=bias_correction2**0.5,  # as torch.optim.Adam writes it
        maximize=1.0 if maximize else 0.0,
    )


def write_slots(scalars, out: "torch.Tensor") -> None:
    """Write a scalars dataclass whose slots are floats or 0-dim tensors into the float64 device
    tensor ``out`` (one element per slot) with fill_ / copy_ only: no host read, capture-safe."""
    for i, value in enumerate(scalars.slot_values()):
        if isinstance(value, torch.Tensor):
            out[i].copy_(value)
        else:
            out[i].fill_(value)


# ---------------------------------------------------------------------------------------------
# SMEGA2 (docs/algorithms.md). Keep in sync with csrc/update_math.h (kSmega2* constants) and
# triton_kernels/_slots.py (SMEGA2_* constants).
SMEGA2_SLOTS = (
    "lr",               # η
    "momentum",         # γ, the MF of this master step
    "momentum_scale",   # (1 − τ)/N: the weight of the accumulated gradients in the refreshed buffer
    "l2_weight_decay",  # λ (added to the gradient)
    "cycle_end",        # 1.0 when this step closes a cycle of N gradients (s becomes 0): v is refreshed
    "maximize",         # 1.0: ascend (the unscaled gradient is negated first, torch's maximize)
)

# The look-ahead estimate θ̂ = θ + accumulator_coef·G + momentum_coef·v, one fused pass.
SMEGA2_ESTIMATE_SLOTS = (
    "accumulator_coef",  # −η·γ·s/N (advanced), 0 (naive: G is then not read)
    "momentum_coef",     # −η·γ·(N + s·(γ − 1)) (advanced), −η·γ·N (naive)
)

SMEGA2_NUM_SCALARS = len(SMEGA2_SLOTS)
SMEGA2_ESTIMATE_NUM_SCALARS = len(SMEGA2_ESTIMATE_SLOTS)
SMEGA2_ESTIMATES = ("advanced", "naive")


@dataclass(frozen=True)
class SMEGA2StepScalars:
    lr: float
    momentum: float
    momentum_scale: float
    l2_weight_decay: float
    cycle_end: float
    #: the cycle position s after this step (host bookkeeping, not sent to the kernels)
    next_cycle: int
    maximize: float = 0.0

    def as_list(self) -> list[float]:
        return [float(getattr(self, name)) for name in SMEGA2_SLOTS]


@dataclass(frozen=True)
class SMEGA2EstimateScalars:
    accumulator_coef: float
    momentum_coef: float

    def as_list(self) -> list[float]:
        return [float(getattr(self, name)) for name in SMEGA2_ESTIMATE_SLOTS]


def check_num_workers(num_workers) -> int:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
    return num_workers


def _check_cycle(cycle, num_workers: int) -> int:
    if isinstance(cycle, bool) or not isinstance(cycle, int) or not 0 <= cycle < num_workers:
        raise ValueError(f"cycle (the SMEGA2 cycle position s) must be an int in [0, num_workers={num_workers}), "
                         f"got {cycle!r}")
    return cycle


def smega2_step_scalars(*, lr: float, momentum: float, dampening: float = 0.0, weight_decay: float = 0.0,
                        num_workers: int, cycle: int, maximize: bool = False) -> SMEGA2StepScalars:
    """The scalar vector of one SMEGA2 master step; ``cycle`` is s *before* the step."""
    lr = check_lr(lr)
    momentum = check_mf("momentum", momentum)
    dampening = _check_finite("dampening", dampening)
    weight_decay = check_weight_decay(weight_decay)
    n = check_num_workers(num_workers)
    next_cycle = (_check_cycle(cycle, n) + 1) % n
    return SMEGA2StepScalars(
        lr=lr,
        momentum=momentum,
        momentum_scale=(1.0 - dampening) / n,
        l2_weight_decay=weight_decay,
        cycle_end=1.0 if next_cycle == 0 else 0.0,
        next_cycle=next_cycle,
        maximize=1.0 if maximize else 0.0,
    )


def smega2_estimate_scalars(*, lr: float, momentum: float, num_workers: int, cycle: int,
                            estimate: str = "advanced") -> SMEGA2EstimateScalars:
    """The coefficients of the look-ahead estimate at cycle position ``cycle`` (s now)."""
    lr = check_lr(lr)
    momentum = check_mf("momentum", momentum)
    n = check_num_workers(num_workers)
    s = _check_cycle(cycle, n)
    if estimate == "advanced":
        return SMEGA2EstimateScalars(accumulator_coef=-(lr * momentum * (s / n)),
                                     momentum_coef=-(lr * momentum * (n + s * (momentum - 1.0))))
    if estimate == "naive":
        return SMEGA2EstimateScalars(accumulator_coef=0.0, momentum_coef=-(lr * momentum * n))
    raise ValueError(f"estimate must be one of {SMEGA2_ESTIMATES}, got {estimate!r}")
