"""Scaling efficiency E(N) = throughput(N) / (N throughput(1)) and the "actual average single-GPU
training time" from real multi-process runs, the predictor's prediction for each measured N and its
error (with the inputs it used: the world-size-1 timeline and the ring fitted to allreduces timed on the
same ranks), and predicted curves (8-GPU NVLink nodes, 400 Gb/s InfiniBand, N = 1..1024) for fusedmf vs
DDP bucketing.

    python benchmarks/scaling.py --quick                         # 2 gloo ranks spawned on this CPU
    python benchmarks/scaling.py --quick --world-sizes 2 4       # 2 and 4 ranks (threads per rank: cores // 4)
    torchrun --nproc-per-node 8 benchmarks/scaling.py            # NCCL, one rank per GPU (gloo without GPUs)
    python benchmarks/scaling.py --device cuda --world-sizes 1   # one GPU: its timeline + predicted curves
    python benchmarks/scaling.py --timeline-json benchmarks/out/throughput/throughput_cuda_<utc>.json

The logic lives in fusedmf/bench/scaling.py (also ``python -m fusedmf.bench scaling``); results (JSON,
PNG when matplotlib is installed) go to benchmarks/out/scaling/.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fusedmf.bench import scaling  # noqa: E402

if __name__ == "__main__":
    scaling.main(default_out=os.path.join(ROOT, "benchmarks", "out", "scaling"))
