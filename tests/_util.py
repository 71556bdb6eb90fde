"""Comparison helpers whose failure messages show the count, first indices and values."""

import torch

F32_EPS = torch.finfo(torch.float32).eps

# Tolerances of fusedmf against torch.optim on CPU, stated once for every test that compares them.
# MF-SGD rounds exactly the operations torch rounds (NOTE [fma placement] in csrc/update_math.h), so
# on CPU it is bit-identical; where a backend fuses differently (the Triton interpreter never fuses)
# a param differs by the rounding of a few updates, and a momentum buffer, which sums about
# 1/(1 - momentum) rounded terms, by that factor more.
SGD_ULPS = 4
MOMENTUM_BUFFER_ULPS = 16
# MF-Adam: torch's CPU sqrt (MKL's vsSqrt) is 1 ulp off in about 20% of float32 results and ours is
# correctly rounded, so the denominator, hence the update, differs by an ulp or two of the update;
# through L2 weight decay that difference reaches the moments of the next steps. A few ulps of
# each value (or of the tensor's typical magnitude, see assert_close_ulps) per run of 20 steps.
ADAM_ULPS = 8


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, name: str) -> str:
    idx = bad.nonzero()[:5].tolist()
    a, e = actual.detach().double(), expected.detach().double()
    rows = ", ".join(f"{i}: got {a[tuple(i)].item():.9g} want {e[tuple(i)].item():.9g}" for i in idx)
    return f"{name}: {int(bad.sum())} of {bad.numel()} elements differ; first {rows}"


def assert_close_ulps(actual, expected, ulps: float = 4, name: str = "tensor", eps: float = F32_EPS):
    """|a - e| <= ulps * eps * (|e| + mean|e|): a few ulps (of float32 unless `eps` says otherwise,
    e.g. torch.finfo(torch.float64).eps) of each value or of the tensor's typical magnitude. The
    second term matters where a value crosses zero: there two correct
    kernels differ by the rounding of the *update* (a few ulps of lr-sized quantities), not of the
    value itself. A wrong rule (say a misplaced eps or dampening) is off by orders of magnitude more."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    if actual.numel() == 0:
        return
    bad = _scaled_error(actual, expected, eps) > ulps
    assert not bad.any(), describe_mismatch(actual, expected, bad, name)


def _scaled_error(actual, expected, eps: float) -> torch.Tensor:
    """|a - e| / (eps * (|e| + mean|e|)) elementwise: assert_close_ulps's measure (inf where exactly
    one of the two is NaN, 0 where both are)."""
    a, e = actual.detach().double(), expected.detach().double()
    floor = e.abs().mean().clamp_min(1e-30)
    err = (a - e).abs() / (eps * (e.abs() + floor))
    err = torch.where(a.isnan() != e.isnan(), torch.inf, err)
    return torch.where(a.isnan() & e.isnan(), 0.0, err)


def scaled_ulps(actual, expected, eps: float = F32_EPS) -> float:
    """The largest error in assert_close_ulps's measure: what `ulps` would have to be to pass."""
    return float(_scaled_error(actual, expected, eps).max()) if actual.numel() else 0.0


def assert_bit_identical(actual, expected, name: str = "tensor"):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    def raw(t):
        return t.detach().contiguous().reshape(-1).view(torch.uint8)

    if actual.numel() and not torch.equal(raw(actual), raw(expected)):
        bad = (actual != expected) & ~(actual.isnan() & expected.isnan())
        raise AssertionError(describe_mismatch(actual, expected, bad, name) + " (bitwise)")


_ORDERED_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
                torch.bfloat16: torch.int16}


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Integers whose difference is the distance in ulps (monotone in the float value)."""
    int_dtype = _ORDERED_INT[t.dtype]
    i = t.contiguous().view(int_dtype).to(torch.int64)
    sign_bit = 1 << (torch.iinfo(int_dtype).bits - 1)
    # float64: -(i + 2**63) computed as -(i + 2**62) - 2**62 (2**63 is not an int64)
    return torch.where(i < 0, -(i + sign_bit // 2) - sign_bit // 2, i)


def max_ulps(actual: torch.Tensor, expected: torch.Tensor) -> int:
    """The largest distance in ulps of `expected`'s dtype (`actual` is cast to it first; NaN against
    NaN counts as 0)."""
    a = actual.detach().to(expected.dtype).reshape(-1)
    e = expected.detach().reshape(-1)
    if e.numel() == 0:
        return 0
    ulps = (ordered_bits(a) - ordered_bits(e)).abs()
    ulps = torch.where(a.isnan() & e.isnan(), 0, ulps)
    return int(ulps.max())


def max_abs_err(actual, expected) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max()) if actual.numel() else 0.0
