"""fusedmf.lr: Goyal et al. linear scaling + warm-up and LEGW, at chosen steps and composed with
torch's ChainedScheduler / SequentialLR."""

import math

import pytest
import torch
from torch.optim.lr_scheduler import ChainedScheduler, CosineAnnealingLR, MultiStepLR, SequentialLR

from fusedmf import MFSGD
from fusedmf.lr import GoyalWarmup, LEGW, goyal_warmup, legw


def _opt(lr=1.0, cls=torch.optim.SGD):
    return cls([torch.zeros(2, requires_grad=True)], lr=lr, momentum=0.9)


def _lrs(opt, sched, n):
    """The lr each of the first n updates runs with (scheduler stepped once per update)."""
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_goyal_values():
    opt = _opt()
    s = goyal_warmup(opt, 0.1, batch_size=8192, warmup_steps=4)  # k = 32, eta = 3.2
    assert isinstance(s, GoyalWarmup) and s.k == 32 and s.peak_lrs == pytest.approx([3.2])
    start = 0.1  # eta / k
    want = [start + (3.2 - start) * t / 4 for t in range(4)] + [3.2] * 3
    assert _lrs(opt, s, 7) == pytest.approx(want, rel=1e-12)


def test_goyal_small_batch_no_warmup_and_group_lr():
    opt = _opt(lr=0.2)
    s = goyal_warmup(opt, None, batch_size=128, warmup_steps=5)  # base from the group, k = 0.5
    assert _lrs(opt, s, 3) == pytest.approx([0.1] * 3)
    with pytest.raises(ValueError):
        goyal_warmup(_opt(), 0.1, batch_size=0, warmup_steps=5)
    with pytest.raises(ValueError):
        goyal_warmup(_opt(), 0.1, batch_size=512, warmup_steps=-1)


def test_goyal_chained_with_multistep_decay():
    opt = _opt(cls=MFSGD)
    warm = goyal_warmup(opt, 0.1, batch_size=1024, warmup_steps=3)  # k = 4, eta = 0.4
    decay = MultiStepLR(opt, milestones=[5, 7], gamma=0.1)
    chained = ChainedScheduler([warm, decay])
    got = _lrs(opt, chained, 9)
    want = [0.1, 0.2, 0.3, 0.4, 0.4, 0.04, 0.04, 0.004, 0.004]
    assert got == pytest.approx(want, rel=1e-9)


def test_legw_values():
    # tuned at B0 = 128, eta0 = 0.5, w0 = 1 epoch; B = 512: k = 4, eta = 1.0, 4 epochs of warm-up
    opt = _opt()
    s = legw(opt, 0.5, batch0=128, batch=512, warmup_epochs0=1, steps_per_epoch=2)
    assert isinstance(s, LEGW) and s.warmup_steps == 8 and s.peak_lrs == pytest.approx([1.0])
    assert _lrs(opt, s, 10) == pytest.approx([t / 8 for t in range(1, 9)] + [1.0, 1.0], rel=1e-12)


def test_legw_poly_and_cosine_decay():
    opt = _opt()
    s = legw(opt, 0.5, 128, 512, 0.5, 2, decay="poly", total_epochs=4, power=2.0)  # W = 4, T = 8
    got = _lrs(opt, s, 10)
    want = [0.25, 0.5, 0.75, 1.0, 1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    assert got == pytest.approx(want, abs=1e-12)

    opt = _opt()
    s = legw(opt, 0.5, 128, 512, 0.5, 2, decay="cosine", total_epochs=4)
    got = _lrs(opt, s, 9)
    want = [0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * p / 4)) for p in range(5)]
    assert got == pytest.approx(want, abs=1e-12)


def test_legw_callable_decay_and_errors():
    opt = _opt()
    s = legw(opt, 0.1, 256, 256, 1, 2, decay=lambda epoch: 0.1 if epoch >= 2 else 1.0)  # k = 1
    assert _lrs(opt, s, 6) == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="total_epochs"):
        legw(_opt(), 0.1, 256, 512, 1, 2, decay="poly")
    with pytest.raises(ValueError, match="no steps after"):
        legw(_opt(), 0.1, 256, 512, 1, 2, decay="cosine", total_epochs=2)
    with pytest.raises(ValueError):
        legw(_opt(), 0.1, 256, 512, 1, 2, decay="linear")
    with pytest.raises(ValueError):
        legw(_opt(), 0.1, 256, 512, -1, 2)


def test_legw_in_sequential_lr_then_cosine():
    opt = _opt()
    warm = legw(opt, 0.5, 128, 512, 0.5, 2)  # W = 4, peak 1.0
    cos = CosineAnnealingLR(opt, T_max=4)
    seq = SequentialLR(opt, [warm, cos], milestones=[4])
    got = _lrs(opt, seq, 9)
    want = [0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(5)]
    assert got == pytest.approx(want, abs=1e-12)


def test_state_dict_roundtrip_resumes():
    opt = _opt()
    s = legw(opt, 0.5, 128, 512, 1, 2)
    _lrs(opt, s, 3)
    sd_opt, sd_s = opt.state_dict(), s.state_dict()
    opt2 = _opt()  # torch's resume order: build both, then load both
    s2 = legw(opt2, 0.5, 128, 512, 1, 2)
    opt2.load_state_dict(sd_opt)
    s2.load_state_dict(sd_s)
    assert _lrs(opt2, s2, 3) == pytest.approx(_lrs(opt, s, 3))
