"""Communication layer: bucketed, compressed gradient allreduce fused with the update.

    from fusedmf.comm import DistributedOptimizer
    dopt = DistributedOptimizer(MFSGD(model.parameters(), lr=0.1, momentum=0.9), compression="fp16")
    loss.backward(); dopt.step(); dopt.zero_grad()

    # or keep torch DDP and give it fusedmf's fused compress/prescale (and, optionally, the update):
    state, hook = fusedmf.comm.ddp_comm_hook(compression="fp16", optimizer=opt)
    ddp_model.register_comm_hook(state, hook)

Built on fusedmf.functional (pack, non_finite_check, the update rules) and the optimizer's own
planning and state; see distributed_optimizer.py for the data flow of a step.
"""

from .buckets import BucketSpec, assign_buckets
from .ddp_hook import FusedCommHookState, ddp_comm_hook, fused_comm_hook
from .distributed_optimizer import COMPRESSION, CommError, DistributedOptimizer
from .local_sgd import LocalSGD
from .telemetry import BucketTiming, CommTelemetry, StepTelemetry, chrome_trace, merge_chrome_traces, write_chrome_trace

__all__ = [
    "DistributedOptimizer", "LocalSGD", "CommError", "COMPRESSION",
    "ddp_comm_hook", "fused_comm_hook", "FusedCommHookState",
    "CommTelemetry", "StepTelemetry", "BucketTiming", "chrome_trace", "merge_chrome_traces", "write_chrome_trace",
    "BucketSpec", "assign_buckets",
]
