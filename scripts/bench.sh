#!/usr/bin/env bash
# The README's main command: set up (scripts/env.sh), build, then run the benchmarks on a small
# default (a few minutes on a CPU): the optimizer step over ResNet-50's parameters, the bucketed
# allreduce over bucket sizes and compressions, a data-parallel training step against torch DDP,
# training throughput, measured + predicted scaling efficiency, and the MF experiment.
# JSON/CSV (Chrome traces, PNG plots) go under benchmarks/out/; each prints its table.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  "$PY" benchmarks/optim_step.py --device cuda
  "$PY" -m torch.distributed.run --nproc-per-node "$NGPU" benchmarks/comm_allreduce.py --backend nccl
  "$PY" -m torch.distributed.run --nproc-per-node "$NGPU" benchmarks/comm_train_step.py --backend nccl
  "$PY" benchmarks/throughput.py --device cuda
else
  "$PY" benchmarks/optim_step.py --device cpu
  "$PY" benchmarks/comm_allreduce.py      # 2 gloo ranks
  "$PY" benchmarks/comm_train_step.py     # 2 gloo ranks, vs DDP + fp16_compress_hook
  "$PY" benchmarks/throughput.py --device cpu
fi
"$PY" benchmarks/scaling.py --quick       # gloo ranks on this machine + predicted NVLink/IB curves
"$PY" benchmarks/mf_experiment.py --quick # constant global batch over K simulated ranks
