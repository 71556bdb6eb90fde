"""ResNet training throughput (images/s; forward / backward / optimizer split) for torch.optim.SGD
foreach / fused and fusedmf MFSGD over per-GPU batch sizes, synthetic data, channels_last, plus the
gradient-ready timeline of one step that the scaling predictor consumes. Under torchrun also the
data-parallel cases (torch DDP default / fp16_compress_hook, MFSGD + DistributedOptimizer) across the
ranks: per-GPU images/s and the slowest rank's forward / backward / exposed communication / update.

    python benchmarks/throughput.py            # GPU: ResNet-50, AMP bf16, batches 32 64 128 256
    python benchmarks/throughput.py --quick    # CPU smoke run: tiny ResNet, 64x64, batches 2 4
    torchrun --nproc-per-node 8 benchmarks/throughput.py       # NCCL, one rank per GPU (gloo on CPUs)

The logic lives in fusedmf/bench/throughput.py (also ``python -m fusedmf.bench throughput``);
results go to benchmarks/out/throughput/ (rank 0 writes the JSON under torchrun).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fusedmf.bench import throughput  # noqa: E402

if __name__ == "__main__":
    throughput.main(default_out=os.path.join(ROOT, "benchmarks", "out", "throughput"))
