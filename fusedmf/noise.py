"""Gradient noise scale B_simple, measured inside the communication path.

McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training" (2018,
arXiv:1812.06162): B_simple = tr(Σ) / |G|², where G is the true gradient and Σ the per-sample
covariance of the gradient. A mean over a batch of b samples has E|g_b|² = |G|² + tr(Σ)/b, so two
batch sizes give both unknowns (their appendix A.1):

    |G|²  ≈ (B·|G_B|² − b·|G_b|²) / (B − b)          tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

In data-parallel training on N ranks the two batches are free: b is the per-rank batch, whose
gradient each rank holds before the allreduce (|G_b|² is averaged over the ranks, which lowers its
variance), and B = N·b is the global batch, whose mean gradient is the allreduce's result. Both
estimates are noisy, so -- as the paper advises -- numerator and denominator are smoothed
separately (exponential moving averages) before dividing.

NOTE [noise scale from the allreduce]
How DistributedOptimizer(noise_scale=...) measures it without another pass over memory:

    backward   pack_ of every bucket adds Σ (g·s)² of the gradients it packs to a local fp32
               scalar (s = 1/(N·passes), the prescale; NOTE [sums of squares] in
               csrc/cpu/kernels_impl.h) -- the loop reads and writes every element anyway.
    end of     one 3-float allreduce: [local Σ(g·s)², carried |G_B|² of the previous step, carried
    backward   validity of the previous step]. Launched after the buckets, so it overlaps them.
    step()     the non-finite check of the reduced buffers adds Σ x² of the reduced gradient
               (|G_B|² times the loss scale²) in the same read, then the carry for the next step
               is formed on the device: no host synchronisation anywhere.

The local norm needs an allreduce to be averaged over ranks; the global norm does not, but its fp32
sum is accumulated by atomics on GPUs and may differ in the last bits between ranks. Carrying it
through the *next* step's small allreduce makes every number the estimator sees bit-identical on
every rank, so anything computed from it -- an MF schedule -- keeps the replicas identical. The
price is a one-step lag: the sample of step t is complete at step t + 1. A step skipped for
overflow gives no sample. Both norms are divided by the loss scale² of their step, so a changing
dynamic loss scale does not bias the averages.

Fused == unfused: ``DistributedOptimizer.noise_scale.history`` holds, per step, the two squared
norms it used; tests/test_noise_scale.py recomputes them from the ranks' own gradients and the
reduced buffers, and checks the estimate on a synthetic problem with known G and Σ.
"""

from __future__ import annotations

import collections
import math
from typing import Deque, Dict, List, Optional, Tuple

import torch

__all__ = ["GradientNoiseScale", "estimate_from_norms", "squared_norm"]


def estimate_from_norms(local_sq: float, global_sq: float, b: float, B: float) -> Tuple[float, float]:
    """(|G|², tr(Σ)) from the squared norm of a mean over ``b`` samples and of one over ``B`` > b."""
    if not B > b > 0:
        raise ValueError(f"the noise-scale estimate needs two batch sizes B > b > 0, got b={b}, B={B}")
    g2 = (B * global_sq - b * local_sq) / (B - b)
    trace = (local_sq - global_sq) / (1.0 / b - 1.0 / B)
    return g2, trace


def squared_norm(tensors) -> float:
    """Σ x² over every element of the tensors, in float64: the unfused computation."""
    total = 0.0
    for t in tensors:
        if t is not None and t.numel():
            total += float(t.detach().double().square().sum())
    return total


class GradientNoiseScale:
    """Smoothed gradient noise scale B_simple = tr(Σ)/|G|², in samples.

    Args:
        batch_size_per_rank: b, the samples behind each rank's gradient at every optimizer step
            (micro-batch × accumulation steps); the global batch is B = N·b.
        beta: smoothing of the EMAs of |G|² and tr(Σ) (bias-corrected like Adam's moments).
        history: how many per-step samples ``history`` keeps.

    Fed by :class:`fusedmf.comm.DistributedOptimizer` (``noise_scale=``) from the fused kernels, or
    by hand with :meth:`update` (e.g. from K simulated ranks). Reading :attr:`value` waits for the
    samples already recorded on a GPU (their copies to the host); :meth:`settled_value` does not
    wait for the newest one, which is what a schedule read every step should use.
    """

    def __init__(self, batch_size_per_rank: int, *, beta: float = 0.99, history: int = 1000):
        if isinstance(batch_size_per_rank, bool) or int(batch_size_per_rank) != batch_size_per_rank \
                or batch_size_per_rank < 1:
            raise ValueError(f"batch_size_per_rank must be an integer >= 1, got {batch_size_per_rank!r}")
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.batch_size_per_rank = int(batch_size_per_rank)
        self.beta = float(beta)
        self.history: Deque[Dict[str, float]] = collections.deque(maxlen=int(history))
        self._g2_ema = 0.0
        self._trace_ema = 0.0
        self._count = 0                 # samples in the EMAs
        self._seen = 0                  # samples offered (including skipped or non-finite ones)
        self._pending: List[tuple] = []  # (host tensor, event or None, world_size) not yet folded in

    # ------------------------------------------------------------------ feeding
    def update(self, local_sq: float, global_sq: float, world_size: int, *, valid: bool = True) -> None:
        """One step's sample: ``local_sq`` = |G_b|² averaged over the ranks (each rank's gradient is a
        mean over b samples), ``global_sq`` = |G_B|² of their mean. ``valid=False`` (a skipped step)
        or a non-finite value is counted in ``history`` but not in the averages."""
        self._drain(wait=True)
        self._fold(float(local_sq), float(global_sq), int(world_size), bool(valid))

    def record(self, sample: torch.Tensor, world_size: int) -> None:
        """Queue a device sample [local_sq, global_sq, valid] (float32, already unscaled). Its copy to
        the host is started now, without waiting; it is folded in when a value is read."""
        if sample.device.type == "cuda":
            host = torch.empty(sample.shape, dtype=sample.dtype, pin_memory=True)
            host.copy_(sample, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(sample.device))
            self._pending.append((host, event, int(world_size)))
        else:
            self._pending.append((sample.detach().clone(), None, int(world_size)))

    def _drain(self, wait: bool, keep_newest: bool = False) -> None:
        keep = 1 if keep_newest else 0
        while len(self._pending) > keep:
            host, event, n = self._pending[0]
            if event is not None:
                if not wait and not event.query():
                    return
                event.synchronize()
            self._pending.pop(0)
            local_sq, global_sq, valid = (float(x) for x in host.tolist())
            self._fold(local_sq, global_sq, n, valid > 0.5)

    def _fold(self, local_sq: float, global_sq: float, world_size: int, valid: bool) -> None:
        b = self.batch_size_per_rank
        B = b * world_size
        self._seen += 1
        entry = {"sample": self._seen, "local_sq": local_sq, "global_sq": global_sq, "world_size": world_size,
                 "valid": valid}
        ok = valid and world_size > 1 and math.isfinite(local_sq) and math.isfinite(global_sq)
        if ok:
            g2, trace = estimate_from_norms(local_sq, global_sq, b, B)
            self._g2_ema = self.beta * self._g2_ema + (1.0 - self.beta) * g2
            self._trace_ema = self.beta * self._trace_ema + (1.0 - self.beta) * trace
            self._count += 1
            entry.update(g2=g2, trace_sigma=trace, b_simple_raw=_ratio(trace, g2), b_simple=self._value())
        entry["used"] = ok
        self.history.append(entry)

    # ------------------------------------------------------------------ reading
    def _corrected(self) -> Tuple[float, float]:
        c = 1.0 - self.beta ** self._count
        return self._g2_ema / c, self._trace_ema / c

    def _value(self) -> Optional[float]:
        if self._count == 0:
            return None
        g2, trace = self._corrected()
        return _ratio(trace, g2)

    @property
    def value(self) -> Optional[float]:
        """Smoothed B_simple in samples (None before the first sample; inf while the smoothed |G|²
        estimate is <= 0, i.e. noise dominates; 0 while the smoothed tr(Σ) is <= 0)."""
        self._drain(wait=True)
        return self._value()

    def settled_value(self) -> Optional[float]:
        """:attr:`value` without the newest recorded sample (whose copy may still be in flight), so
        that reading it every step never waits for the step being enqueued. Deterministic: every
        rank records the same samples in the same order."""
        self._drain(wait=True, keep_newest=True)
        return self._value()

    def settled_samples(self) -> int:
        """:attr:`samples` without the newest recorded sample, like :meth:`settled_value`."""
        self._drain(wait=True, keep_newest=True)
        return self._count

    @property
    def gradient_sq(self) -> Optional[float]:
        """Smoothed estimate of |G|² (unscaled)."""
        self._drain(wait=True)
        return self._corrected()[0] if self._count else None

    @property
    def trace_sigma(self) -> Optional[float]:
        """Smoothed estimate of tr(Σ), the per-sample gradient variance summed over parameters."""
        self._drain(wait=True)
        return self._corrected()[1] if self._count else None

    @property
    def samples(self) -> int:
        """Samples folded into the averages so far."""
        self._drain(wait=True)
        return self._count

    @property
    def last(self) -> Optional[Dict[str, float]]:
        """The newest folded sample's entry (local_sq, global_sq, g2, trace_sigma, b_simple_raw, b_simple)."""
        self._drain(wait=True)
        return self.history[-1] if self.history else None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        self._drain(wait=True)
        return {"batch_size_per_rank": self.batch_size_per_rank, "beta": self.beta, "g2_ema": self._g2_ema,
                "trace_ema": self._trace_ema, "count": self._count, "seen": self._seen}

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size_per_rank", "beta"):
            if state[key] != getattr(self, key):
                raise ValueError(f"GradientNoiseScale.load_state_dict: {key} is {state[key]!r} in the state but "
                                 f"{getattr(self, key)!r} here")
        self._pending.clear()
        self._g2_ema, self._trace_ema = float(state["g2_ema"]), float(state["trace_ema"])
        self._count, self._seen = int(state["count"]), int(state["seen"])

    def __repr__(self) -> str:
        v = self._value()
        return (f"GradientNoiseScale(batch_size_per_rank={self.batch_size_per_rank}, beta={self.beta}, "
                f"samples={self._count}, value={'None' if v is None else f'{v:.4g}'})")


def _ratio(trace: float, g2: float) -> float:
    if trace <= 0.0:
        return 0.0
    if g2 <= 0.0:
        return math.inf
    return trace / g2
