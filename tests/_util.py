"""Comparison helpers whose failure messages show the count, first indices and values."""

import torch

F32_EPS = torch.finfo(torch.float32).eps


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, name: str) -> str:
    idx = bad.nonzero()[:5].tolist()
    a, e = actual.detach().double(), expected.detach().double()
    rows = ", ".join(f"{i}: got {a[tuple(i)].item():.9g} want {e[tuple(i)].item():.9g}" for i in idx)
    return f"{name}: {int(bad.sum())} of {bad.numel()} elements differ; first {rows}"


def assert_close_ulps(actual, expected, ulps: float = 4, name: str = "tensor"):
    """|a - e| <= ulps * eps32 * (|e| + mean|e|): a few float32 ulps of each value or of the tensor's
    typical magnitude. The second term matters where a value crosses zero: there two correct
    kernels differ by the rounding of the *update* (a few ulps of lr-sized quantities), not of the
    value itself. A wrong rule (say a misplaced eps or dampening) is off by orders of magnitude more."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    if actual.numel() == 0:
        return
    a, e = actual.detach().double(), expected.detach().double()
    floor = e.abs().mean().clamp_min(1e-30)
    bad = (a - e).abs() > ulps * F32_EPS * (e.abs() + floor)
    bad |= a.isnan() != e.isnan()
    assert not bad.any(), describe_mismatch(actual, expected, bad, name)


def assert_bit_identical(actual, expected, name: str = "tensor"):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    def raw(t):
        return t.detach().contiguous().reshape(-1).view(torch.uint8)

    if actual.numel() and not torch.equal(raw(actual), raw(expected)):
        bad = (actual != expected) & ~(actual.isnan() & expected.isnan())
        raise AssertionError(describe_mismatch(actual, expected, bad, name) + " (bitwise)")


def max_abs_err(actual, expected) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max()) if actual.numel() else 0.0
