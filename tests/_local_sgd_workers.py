"""What each gloo rank runs for tests/test_local_sgd.py (launched by tests/_comm_workers.launch).

Every scenario returns plain tensors / lists (pickled back to the test process); the assertions live
in the test module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

import _comm_workers as W
from fusedmf import DynamicLossScaler
from fusedmf.comm import LocalSGD
from fusedmf.optim import MFSGD

LR = 0.05


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def gathered(t: torch.Tensor, group=None) -> list:
    """This tensor from every rank of the group (all_gather)."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def local_batch(step: int, rank: int, world_size: int):
    x, y = W.batch(step)
    return W.shard(x, rank, world_size), W.shard(y, rank, world_size)


def train(rank, world_size, *, steps, model=None, momentum=0.9, compression="fp16", period=4, warmup_steps=2,
          first=0, lopt=None, **kw):
    """``steps`` LocalSGD steps on this rank's shard of each global batch; the flat params after each step."""
    model = model if model is not None else W.Net(0)
    if lopt is None:
        opt = MFSGD(model.parameters(), lr=LR, momentum=momentum)
        lopt = LocalSGD(opt, period=period, warmup_steps=warmup_steps, compression=compression,
                        bucket_cap_mb=4e-3, **kw)
    after = []
    for t in range(first, first + steps):
        x, y = local_batch(t, rank, world_size)
        dtype = next(model.parameters()).dtype
        lopt.zero_grad()
        W.loss_fn(model, x.to(dtype), y.to(dtype)).float().backward()
        lopt.step()
        after.append(flat(model))
    return model, lopt, after


# ------------------------------------------------------------------------------------------ 2 ranks
def sync_sgd_scenario(rank, world_size):
    """No momentum, period 1, no compression: synchronous SGD."""
    _, _, after = train(rank, world_size, steps=6, momentum=0.0, compression="none", period=1, warmup_steps=0)
    return {"after": after, "everyone": [gathered(p) for p in after]}


def schedule_scenario(rank, world_size):
    """Warm-up 2, period 4, momentum 0.9: fp16 (with telemetry) and uncompressed runs, and bf16
    params with fp32 masters."""
    out = {}
    _, lopt, after = train(rank, world_size, steps=10, compression="fp16", telemetry=True)
    out["fp16"] = [gathered(p) for p in after]
    out["actions"] = None
    steps = lopt.telemetry.steps
    out["telemetry"] = [{"kind": s.kind, "bytes": s.bytes_sent, "average_s": s.average_s} for s in steps]
    out["param_bucket_bytes"] = sum(b.nbytes for b in lopt.buckets)
    out["trace_names"] = sorted({e["name"] for e in lopt.telemetry.to_chrome_trace()["traceEvents"] if e["ph"] == "X"})
    _, _, after = train(rank, world_size, steps=10, compression="none")
    out["none"] = after
    model = W.Net(0).to(torch.bfloat16)
    _, lopt, after = train(rank, world_size, steps=6, model=model, compression="bf16")
    masters = torch.cat([lopt.state[p]["master_param"].reshape(-1) for p in model.parameters()])
    out["bf16"] = [gathered(p) for p in after]
    out["bf16_masters"] = gathered(masters)
    out["bf16_cast"] = torch.equal(masters.to(torch.bfloat16).float(), after[-1])
    return out


def overflow_scenario(rank, world_size, *, bad_rank=1, bad_call=3):
    """Period 3, no warm-up, DynamicLossScaler; call ``bad_call`` (1-based) overflows on ``bad_rank`` only."""
    model = W.Net(0)
    opt = MFSGD(model.parameters(), lr=LR, momentum=0.9)
    lopt = LocalSGD(opt, period=3, compression="fp16")
    scaler = DynamicLossScaler(init_scale=2.0 ** 10, growth_interval=1000)
    record = []
    for t in range(8):
        x, y = local_batch(t, rank, world_size)
        lopt.zero_grad()
        scaler.scale(W.loss_fn(model, x, y)).backward()
        if rank == bad_rank and t + 1 == bad_call:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(lopt)
        scaler.update()
        record.append({"action": lopt.last_action, "local_steps": lopt.local_steps, "scale": scaler.get_scale(),
                       "opt_step": opt.state[next(model.parameters())]["step"], "params": gathered(flat(model))})
    return record


def resume_scenario(rank, world_size):
    """10 steps straight, against 5 steps + state_dict + a fresh run that loads it and does 5 more."""
    _, _, straight = train(rank, world_size, steps=10)
    model, lopt, first = train(rank, world_size, steps=5)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = lopt.state_dict()
    model2 = W.Net(1)   # other initial weights: everything must come from the checkpoint
    opt2 = MFSGD(model2.parameters(), lr=LR, momentum=0.9)
    lopt2 = LocalSGD(opt2, period=4, warmup_steps=2, compression="fp16", bucket_cap_mb=4e-3)
    model2.load_state_dict(saved_model)
    lopt2.load_state_dict(saved)
    _, _, rest = train(rank, world_size, steps=5, model=model2, lopt=lopt2, first=5)
    return {"straight": straight, "resumed": first + rest, "saved_local_steps": saved["local_sgd"]["local_steps"],
            "saved_calls": saved["local_sgd"]["calls"], "warmup_after_load": lopt2.in_warmup}


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(W.IMAGE[0] * W.IMAGE[1] * W.IMAGE[2], 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, W.OUT)

    def forward(self, x, use_branch=False):
        return self.out(torch.tanh(self.bn(self.fc(x.flatten(1)))))


def buffers_scenario(rank, world_size):
    """module=: BatchNorm running statistics averaged with the params (and after each warm-up step)."""
    model = BNNet()
    opt = MFSGD(model.parameters(), lr=LR, momentum=0.9)
    lopt = LocalSGD(opt, period=2, warmup_steps=1, compression="fp16", module=model, average_momentum=True)
    out = []
    for t in range(5):
        x, y = local_batch(t, rank, world_size)
        before = torch.cat([model.bn.running_mean, model.bn.running_var])
        lopt.zero_grad()
        W.loss_fn(model, x, y).backward()      # the forward updated the running statistics locally
        after_forward = torch.cat([model.bn.running_mean, model.bn.running_var])
        lopt.step()
        moments = torch.cat([lopt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
        out.append({"action": lopt.last_action, "before": before, "local": gathered(after_forward),
                    "buffers": gathered(torch.cat([model.bn.running_mean, model.bn.running_var])),
                    "moments": gathered(moments), "params": gathered(flat(model))})
    return out


def suite_two_ranks(rank, world_size):
    return {"sync": sync_sgd_scenario(rank, world_size), "schedule": schedule_scenario(rank, world_size),
            "overflow": overflow_scenario(rank, world_size), "resume": resume_scenario(rank, world_size),
            "buffers": buffers_scenario(rank, world_size)}


# ------------------------------------------------------------------------------------------ 4 ranks
def hierarchy_scenario(rank, world_size):
    """period 4, hierarchy {2: 2}: groups {0, 1}, {2, 3} average after local steps 2, 6; everyone after
    4 and 8. Plain SGD without compression, so the expected averages can be computed from each rank's
    local update (the same fused MF-SGD kernel, on a copy)."""
    model = W.Net(0)
    opt = MFSGD(model.parameters(), lr=LR, momentum=0.0)
    lopt = LocalSGD(opt, period=4, hierarchy={2: 2}, compression="none")
    shadow = W.Net(0)
    shadow_opt = MFSGD(shadow.parameters(), lr=LR, momentum=0.0)
    out = []
    for t in range(8):
        x, y = local_batch(t, rank, world_size)
        with torch.no_grad():
            for s, p in zip(shadow.parameters(), model.parameters()):
                s.copy_(p)
        shadow_opt.zero_grad()
        W.loss_fn(shadow, x, y).backward()
        shadow_opt.step()                        # this rank's local update, before any average
        lopt.zero_grad()
        W.loss_fn(model, x, y).backward()
        lopt.step()
        out.append({"action": lopt.last_action, "local": gathered(flat(shadow)), "params": gathered(flat(model))})
    return out


def suite_four_ranks(rank, world_size):
    return {"hierarchy": hierarchy_scenario(rank, world_size)}
