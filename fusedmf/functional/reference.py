"""The "reference" backend: pure PyTorch, readable, float64-capable. It is the specification.

Every compiled backend is tested against these functions. They follow the same in-place contract
as the kernels (see fusedmf/functional/__init__.py) and the same order of floating-point
operations, so that in float32 a kernel agrees with them to a few ulps:

- arithmetic happens in float32, or in float64 when the weights are float64;
- grads are unscaled first (``g * inv_grad_scale``), negated when the rule maximizes (torch's
  ``maximize``; negation is exact, so its place before or after unscaling changes no bit), then L2
  weight decay is added;
- with master weights, the fp32 master is updated and the low-precision param is written as its
  round-to-nearest-even cast; without masters the param itself is updated (in fp32 arithmetic);
- NOTE [skip on overflow]: when ``found_inf`` is non-zero nothing at all is written.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .scalars import AdamStepScalars, SGDStepScalars, SMEGA2EstimateScalars, SMEGA2StepScalars

Tensor = torch.Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _skipped(found_inf: Optional[Tensor]) -> bool:
    # The reference may synchronise; compiled backends read found_inf on the device.
    return found_inf is not None and bool(found_inf.reshape(-1)[0].item() != 0)


def _unscaled(grad: Tensor, dtype: torch.dtype, inv_grad_scale: Optional[Tensor], maximize: float = 0.0) -> Tensor:
    g = grad.to(dtype)
    if inv_grad_scale is not None:
        g = g * inv_grad_scale.reshape(()).to(device=g.device, dtype=dtype)
    if maximize:
        g = g.neg()
    return g


@torch.no_grad()
def non_finite_check_(tensors: Sequence[Tensor], found_inf: Tensor, sumsq: Optional[Tensor] = None) -> None:
    """Set ``found_inf`` to 1 if any element of ``tensors`` is inf or NaN (never clears it).

    ``sumsq``: add Σ x² over every element (computed in float64, added once) -- the reduced
    gradient's squared norm of the noise-scale estimate (fusedmf/noise.py). Its value is not
    specified when found_inf is or becomes set: the compiled kernels stop early then.
    """
    if sumsq is not None:
        if bool(found_inf.ne(0).any()):
            return
        total = sum((t.double().square().sum() for t in tensors if t.numel()), torch.zeros((), dtype=torch.float64,
                                                                                    device=found_inf.device))
        sumsq.add_(total.to(sumsq.dtype))
    for t in tensors:
        if t.numel() and not bool(torch.isfinite(t).all()):
            found_inf.fill_(1.0)
            return


@torch.no_grad()
def mf_sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    master_params: Sequence[Tensor],
    scalars: SGDStepScalars,
    inv_grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    if _skipped(found_inf):
        return
    s = scalars
    use_momentum = len(momentum_buffers) > 0
    for i, param in enumerate(params):
        weights = master_params[i] if master_params else param
        dtype = _compute_dtype(weights)
        w = weights.to(dtype)
        g = _unscaled(grads[i], dtype, inv_grad_scale, s.maximize)
        if s.l2_weight_decay != 0.0:
            g = g.add(w, alpha=s.l2_weight_decay)
        if use_momentum:
            buf = momentum_buffers[i]
            if s.first_step:
                u = g.clone()
            else:
                u = buf.to(dtype, copy=True).mul_(s.momentum).add_(g, alpha=s.one_minus_dampening)
            buf.copy_(u)
            d = g.add(u, alpha=s.momentum) if s.nesterov else u
        else:
            d = g
        if s.decay_factor != 1.0:
            w = w.mul(s.decay_factor)
        w = w.add(d, alpha=-s.lr)
        weights.copy_(w)
        if master_params:
            param.copy_(w)


@torch.no_grad()
def mf_adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    master_params: Sequence[Tensor],
    scalars: AdamStepScalars,
    inv_grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """One MF-Adam / MF-AdamW step. ``max_exp_avg_sqs`` non-empty is AMSGrad (torch's ``amsgrad``):
    the running elementwise maximum of the second moment (torch.maximum, so a NaN propagates) is
    kept there and is what the denominator uses."""
    if _skipped(found_inf):
        return
    s = scalars
    for i, param in enumerate(params):
        weights = master_params[i] if master_params else param
        dtype = _compute_dtype(weights)
        w = weights.to(dtype)
        g = _unscaled(grads[i], dtype, inv_grad_scale, s.maximize)
        if s.l2_weight_decay != 0.0:
            g = g.add(w, alpha=s.l2_weight_decay)
        if s.decay_factor != 1.0:
            w = w.mul(s.decay_factor)
        # m = μ·m + (1 − μ)·g, written as torch writes it: lerp(m, g, 1 − μ)
        m = exp_avgs[i].to(dtype, copy=True).lerp_(g, s.one_minus_beta1)
        v = exp_avg_sqs[i].to(dtype, copy=True).mul_(s.beta2).addcmul_(g, g, value=s.one_minus_beta2)
        if max_exp_avg_sqs:
            v_max = torch.maximum(max_exp_avg_sqs[i].to(dtype), v)
            max_exp_avg_sqs[i].copy_(v_max)
            denom = (v_max.sqrt() / s.bias_correction2_sqrt).add_(s.eps)
        else:
            denom = (v.sqrt() / s.bias_correction2_sqrt).add_(s.eps)
        w = w.addcdiv(m, denom, value=s.neg_step_size)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        weights.copy_(w)
        if master_params:
            param.copy_(w)


@torch.no_grad()
def smega2_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    grad_accumulators: Sequence[Tensor],
    master_params: Sequence[Tensor],
    scalars: SMEGA2StepScalars,
    inv_grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """One SMEGA2 master step (docs/algorithms.md): the gradient of one worker.

    The momentum buffer v is written only when the step closes a cycle (``cycle_end``); the
    accumulator G is always written (G + g, or 0 at the end of a cycle)."""
    if _skipped(found_inf):
        return
    s = scalars
    for i, param in enumerate(params):
        weights = master_params[i] if master_params else param
        dtype = _compute_dtype(weights)
        w = weights.to(dtype)
        g = _unscaled(grads[i], dtype, inv_grad_scale, s.maximize)
        if s.l2_weight_decay != 0.0:
            g = g.add(w, alpha=s.l2_weight_decay)
        v = momentum_buffers[i].to(dtype)
        acc = grad_accumulators[i].to(dtype).add(g)
        d = g.add(v, alpha=s.momentum)  # the old buffer: refreshed below, after d is formed
        if s.cycle_end:
            momentum_buffers[i].copy_(v.mul(s.momentum).add(acc, alpha=s.momentum_scale))
            grad_accumulators[i].zero_()
        else:
            grad_accumulators[i].copy_(acc)
        w = w.add(d, alpha=-s.lr)
        weights.copy_(w)
        if master_params:
            param.copy_(w)


@torch.no_grad()
def smega2_estimate_(
    params: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    grad_accumulators: Sequence[Tensor],
    master_params: Sequence[Tensor],
    out: Sequence[Tensor],
    scalars: SMEGA2EstimateScalars,
) -> None:
    """SMEGA2's look-ahead weights into ``out``: θ + accumulator_coef·G + momentum_coef·v, from the
    master when there is one; G is not read when accumulator_coef is 0 (the naive estimate)."""
    s = scalars
    for i, param in enumerate(params):
        weights = master_params[i] if master_params else param
        dtype = _compute_dtype(weights)
        e = weights.to(dtype)
        if s.accumulator_coef != 0.0:
            e = e.add(grad_accumulators[i].to(dtype), alpha=s.accumulator_coef)
        e = e.add(momentum_buffers[i].to(dtype), alpha=s.momentum_coef)
        out[i].copy_(e)
