"""Communication layer: bucketed, compressed gradient allreduce fused with the update.

    from fusedmf.comm import DistributedOptimizer, Compression
    dopt = DistributedOptimizer(MFSGD(model.parameters(), lr=0.1, momentum=0.9), module=model,
                                compression=Compression.fp16)       # any torch optimizer works too
    loss.backward(); dopt.step(); dopt.zero_grad()

    # Horovod-style scripts: broadcast_parameters(model.state_dict(), root_rank=0),
    # broadcast_optimizer_state(opt, root_rank=0), named_parameters=, op=Average | Sum.

    # or keep torch DDP and give it fusedmf's fused compress/prescale (and, optionally, the update):
    state, hook = fusedmf.comm.ddp_comm_hook(compression="fp16", optimizer=opt)
    ddp_model.register_comm_hook(state, hook)

Files, one concept each: distributed_optimizer.py (the Optimizer), bucket_round.py (one round of
packs and allreduces), buckets.py (which param goes to which bucket), rank_check.py (the ranks
agree: at construction, every round, every k steps), broadcast.py (replica consistency),
noise_probe.py (the gradient noise scale from the allreduce), compression.py, group.py (waiting
and CommError), telemetry.py, ddp_hook.py.
"""

from .broadcast import broadcast_optimizer_state, broadcast_parameters
from .buckets import BucketSpec, assign_buckets
from .compression import COMPRESSION, Average, Compression, ReduceOp, Sum
from .ddp_hook import FusedCommHookState, ddp_comm_hook, fused_comm_hook
from .distributed_optimizer import DistributedOptimizer
from .group import CommError, RankMismatchError
from .local_sgd import LocalSGD
from .telemetry import BucketTiming, CommTelemetry, StepTelemetry, chrome_trace, merge_chrome_traces, write_chrome_trace

__all__ = [
    "DistributedOptimizer", "LocalSGD", "CommError", "RankMismatchError", "COMPRESSION", "Compression", "Average", "Sum",
    "ReduceOp", "broadcast_parameters", "broadcast_optimizer_state",
    "ddp_comm_hook", "fused_comm_hook", "FusedCommHookState",
    "CommTelemetry", "StepTelemetry", "BucketTiming", "chrome_trace", "merge_chrome_traces", "write_chrome_trace",
    "BucketSpec", "assign_buckets",
]
