#!/usr/bin/env bash
# The README's main command: set up (scripts/env.sh), build, then run the benchmarks on a small
# default (a few minutes on a CPU): the optimizer step over ResNet-50's parameters, the bucketed
# allreduce over bucket sizes and compressions, a data-parallel training step against torch DDP,
# training throughput, measured + predicted scaling efficiency (spawned gloo ranks on a CPU; torchrun +
# NCCL over the GPUs on a machine with several), and the MF experiment.
# JSON/CSV (Chrome traces, PNG plots) go under benchmarks/out/; each prints its table.
#
#   bash scripts/bench.sh --results NAME   # regenerate every committed CPU result, at the sizes the
#                                          # README quotes, into benchmarks/results/NAME/ with one log
#                                          # per benchmark (run it on a quiet machine, then commit);
#                                          # the network lab's sweep too when this machine can host it (root)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ "${1:-}" = "--results" ]; then
  NAME="${2:?usage: bash scripts/bench.sh --results NAME}"
  OUT="benchmarks/results/$NAME"
  mkdir -p "$OUT/scaling" "$OUT/mf_experiment" "$OUT/local_sgd" "$OUT/smega2_experiment"
  run() { local log="$1"; shift; echo "[fusedmf] $* > $log"; "$PY" "$@" 2>&1 | tee "$log"; }
  run "$OUT/optim_step.log" benchmarks/optim_step.py --device cpu --out "$OUT"
  run "$OUT/comm_allreduce.log" benchmarks/comm_allreduce.py --out "$OUT"
  run "$OUT/comm_train_step.log" benchmarks/comm_train_step.py --out "$OUT"
  run "$OUT/local_sgd/local_sgd.log" benchmarks/local_sgd.py --out "$OUT/local_sgd"
  run "$OUT/scaling.log" benchmarks/scaling.py --world-sizes 2 4 --out "$OUT/scaling"
  run "$OUT/mf_experiment/mf_experiment.log" benchmarks/mf_experiment.py --world-sizes 1 8 \
    --rules const horizon noise --mf-values 0.99 --steps 100 --out "$OUT/mf_experiment"
  run "$OUT/smega2_experiment/smega2_experiment.log" benchmarks/smega2_experiment.py --out "$OUT/smega2_experiment"
  if why=$("$PY" -m fusedmf.bench.netlab --check 2>&1); then
    mkdir -p "$OUT/scaling_netns"
    run "$OUT/scaling_netns/scaling_netns.log" -m fusedmf.bench scaling --netns --bandwidths 0.1 0.3 1 3 10 \
      --out "$OUT/scaling_netns"
  else
    echo "[fusedmf] network lab not run (python -m fusedmf.bench.netlab --check): $why"
  fi
  exit 0
fi
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  "$PY" benchmarks/optim_step.py --device cuda
  "$PY" -m torch.distributed.run --nproc-per-node "$NGPU" benchmarks/comm_allreduce.py --backend nccl
  "$PY" -m torch.distributed.run --nproc-per-node "$NGPU" benchmarks/comm_train_step.py --backend nccl
  "$PY" benchmarks/throughput.py --device cuda
  if [ "$NGPU" -gt 1 ]; then
    # DDP / DistributedOptimizer across the GPUs; measured E(NGPU) + the predictor's error on it
    "$PY" -m torch.distributed.run --nproc-per-node "$NGPU" benchmarks/throughput.py --device cuda --quick
    "$PY" -m torch.distributed.run --nproc-per-node "$NGPU" benchmarks/scaling.py --backend nccl --quick
  else
    "$PY" benchmarks/scaling.py --device cuda --world-sizes 1 --quick   # timeline + predicted curves
  fi
else
  "$PY" benchmarks/optim_step.py --device cpu
  "$PY" benchmarks/comm_allreduce.py      # 2 gloo ranks
  "$PY" benchmarks/comm_train_step.py     # 2 gloo ranks, vs DDP + fp16_compress_hook
  "$PY" benchmarks/local_sgd.py           # 2 gloo ranks: LocalSGD H=1,4,16 vs DistributedOptimizer vs torch PostLocalSGD
  "$PY" benchmarks/throughput.py --device cpu
  # 2 and 4 gloo ranks on this machine (the same threads per rank for every N: cores // 4, at least 1;
  # on fewer than 4 cores the 4 ranks oversubscribe them) + the predictor's error + NVLink/IB curves
  "$PY" benchmarks/scaling.py --quick --world-sizes 2 4
fi
"$PY" benchmarks/mf_experiment.py --quick # constant global batch over K simulated ranks
"$PY" benchmarks/smega2_experiment.py    # N = 4..32 simulated async workers: SMEGA2 vs ASGD, DANA-Zero, sync SGD (CPU quick; --gpu: ResNet-20)
