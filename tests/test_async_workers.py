"""Real asynchronous workers (fusedmf.asynchronous.Master / Worker) on gloo ranks of this machine:
1 master + 3 workers train a small model; a killed and a hung worker are dropped while the master
finishes; the master's checkpoint round-trips and resumes. No timing assertions: the timeouts only
bound how long a dead worker is waited for."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _async_workers as aw  # noqa: E402

from fusedmf.optim import __all__ as _optim_names  # noqa: E402

OPTIMIZERS = ["dana"] + (["smega2"] if "SMEGA2" in _optim_names else [])


def _ok(results):
    bad = {r: v for r, v in results.items() if v[0] != "ok"}
    assert not bad, "ranks failed:\n" + "\n".join(f"--- rank {r}: {v[0]}\n{v[1]}" for r, v in sorted(bad.items()))
    return [results[r][1] for r in sorted(results)]


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("optimizer,compression,weight_compression",
                         [(o, None, None) for o in OPTIMIZERS] + [("dana", "fp16", None), ("dana", "bf16", "bf16")])
def test_one_master_three_workers_train(optimizer, compression, weight_compression):
    share = 30                                 # each worker sends 30 gradients, then leaves
    steps = 3 * share
    master, *workers = _ok(aw.launch(aw.train_async, 4, optimizer=optimizer, steps=steps, compression=compression,
                                     weight_compression=weight_compression, max_steps={1: share, 2: share, 3: share}))
    s = master["summary"]
    assert s.steps == steps and len(s.losses) == steps and s.dropped == {} and master["warnings"] == []
    # one master step per gradient, every gradient applied, each worker left by itself (BYE)
    assert s.gradients_from == {1: share, 2: share, 3: share} and s.discarded == 0
    assert sorted(s.left) == [1, 2, 3] and sorted(s.workers) == sorted([1, 2, 3] * share)
    assert all(w[0] == {"steps": share, "losses": w[0]["losses"], "stopped": "max_steps"} for w in workers)
    # the losses the master recorded are the ones the workers reported, in arrival order
    per_rank = {r: [l for l, w in zip(s.losses, s.workers) if w == r] for r in (1, 2, 3)}
    assert all(per_rank[r] == workers[r - 1][0]["losses"] for r in (1, 2, 3))
    # asynchronous: gradients are applied on stale weights (steps taken since that worker's weights)
    assert max(s.staleness) >= 1
    # and the loss (reported by the workers at the weights they were sent) goes down
    assert _mean(s.losses[-15:]) < 0.5 * _mean(s.losses[:15]), (s.losses[:15], s.losses[-15:])


def test_killed_and_hung_workers_do_not_stop_the_master():
    # rank 2 is killed at its 6th gradient (5 sent), rank 3 hangs after 8; rank 1 sends the rest and
    # leaves, so the master's 60 steps need exactly 5 + 8 + 47 gradients whatever the timing.
    # timeout 6 s: far above one gradient here (milliseconds), even on a loaded machine.
    steps = 60
    res = aw.launch(aw.train_async, 4, optimizer="dana", steps=steps, timeout=6.0,
                    die={2: 5}, stall={3: 8}, stall_s=10.0, max_steps={1: steps - 13})
    assert res[2] == ("exit", -9), res[2]               # killed by SIGKILL mid-run
    bad = {r: v for r, v in res.items() if r != 2 and v[0] != "ok"}
    assert not bad, bad
    master, w1, w3 = res[0][1], res[1][1], res[3][1]
    s = master["summary"]
    assert s.steps == steps                             # the master finished its steps
    assert set(s.dropped) == {2, 3}, s.dropped
    assert len(master["warnings"]) == 2 and all("dropped worker rank" in w for w in master["warnings"])
    assert s.gradients_from == {1: steps - 13, 2: 5, 3: 8}
    assert w1[0]["stopped"] == "max_steps" and s.left == [1]
    assert "lost_master" in w3[0]                       # the hung worker finds its master gone
    assert _mean(s.losses[-10:]) < _mean(s.losses[:10])


def test_master_checkpoint_round_trip_and_resume(tmp_path):
    path = str(tmp_path / "master.pt")
    master, *_ = _ok(aw.launch(aw.checkpoint_resume, 4, path=path, first=15, total=30))
    before, loaded = master["before"], master["loaded"]
    assert loaded["step"] == before["step"] == 15
    for a, b in zip(before["params"], loaded["params"]):
        assert torch.equal(a, b)
    sa, sb = before["optimizer"]["state"], loaded["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)
    assert loaded["gradients_from"] == before["gradients_from"] and loaded["losses"] == before["losses"]
    second = master["second"]
    assert second.steps == 30 and second.losses[:15] == before["losses"] and len(second.losses) == 30
    # the checkpoint on disk is the final state
    final = torch.load(path, weights_only=False)
    assert final["step"] == 30


def test_a_worker_with_other_params_is_refused_with_a_clear_error():
    master, w1, w2, w3 = _ok(aw.launch(aw.mismatched_worker, 4))
    assert master["error"] and "do not match the master's" in master["error"], master
    assert "lost_master" in w2[0]                     # never sent weights: it gives up after its timeout


def test_master_and_worker_need_an_initialised_process_group():
    from fusedmf.asynchronous import ASGD, Master, Worker

    model = aw.Net()
    with pytest.raises(RuntimeError, match="not initialised"):
        Master(ASGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="not initialised"):
        Worker(model.parameters())
