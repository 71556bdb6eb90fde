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
    steps = 90
    master, *workers = _ok(aw.launch(aw.train_async, 4, optimizer=optimizer, steps=steps, compression=compression,
                                     weight_compression=weight_compression))
    s = master["summary"]
    assert s.steps == steps and len(s.losses) == steps and s.dropped == {} and master["warnings"] == []
    # every worker contributed, and the master took one step per gradient it received
    assert set(s.gradients_from) == {1, 2, 3} and all(n > 0 for n in s.gradients_from.values())
    assert sum(s.gradients_from.values()) == steps
    # the workers' own counts: everything they sent was applied, except the last one in flight at STOP
    sent = {r: w[0]["steps"] for r, w in zip((1, 2, 3), workers)}
    assert all(w[0]["stopped"] == "master" for w in workers)
    assert sum(sent.values()) == steps + s.discarded and all(sent[r] - s.gradients_from[r] in (0, 1) for r in sent)
    # asynchronous: gradients are applied on stale weights (steps taken since that worker's weights)
    assert max(s.staleness) >= 1
    # and the loss (reported by the workers at the weights they were sent) goes down
    assert _mean(s.losses[-15:]) < 0.5 * _mean(s.losses[:15]), (s.losses[:15], s.losses[-15:])


def test_killed_and_hung_workers_do_not_stop_the_master():
    steps = 60
    # timeout 6 s: far above one gradient here (milliseconds), even on a loaded machine
    res = aw.launch(aw.train_async, 4, optimizer="dana", steps=steps, timeout=6.0,
                    die={2: 5}, stall={3: 8}, stall_s=10.0)
    assert res[2] == ("exit", -9), res[2]               # killed by SIGKILL mid-run
    bad = {r: v for r, v in res.items() if r != 2 and v[0] != "ok"}
    assert not bad, bad
    master, w1, w3 = res[0][1], res[1][1], res[3][1]
    s = master["summary"]
    assert s.steps == steps                             # the master finished its steps
    assert set(s.dropped) == {2, 3}, s.dropped
    assert len(master["warnings"]) == 2 and all("dropped worker rank" in w for w in master["warnings"])
    assert s.gradients_from[2] == 5 and s.gradients_from[3] == 8   # what they sent before failing
    assert s.gradients_from[1] == steps - 13
    assert w1[0]["stopped"] == "master"
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
