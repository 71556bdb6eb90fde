#!/usr/bin/env bash
# All GPU verification in one call (for a session that has the device machine):
#   build with the CUDA kernels (sm_90), run the whole test suite with the cuda and triton backends
#   REQUIRED (nothing may skip for want of them), run the benchmarks on the GPU, and write the
#   results, the pytest report and the full log into one folder.
# Usage: bash scripts/gpu_verify.sh [OUTDIR]      (default benchmarks/results/gpu-<UTC time>)
# On the device tool: bash scripts/gpu_verify.sh "$OUT"   then copy $OUT into benchmarks/results/.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-$ROOT/benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUTDIR"
export FUSEDMF_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYTHONUNBUFFERED=1
export FUSEDMF_REQUIRE_BACKENDS=cpu,cuda,triton
export MAX_JOBS="${MAX_JOBS:-16}"
status=0
{
  echo "== fusedmf GPU verification, $(date -u), commit $(git -C "$ROOT" rev-parse HEAD 2>/dev/null)"
  nvidia-smi || true
  source "$ROOT/scripts/env.sh" || exit 1
  echo "== tests"
  "$PY" -m pytest "$ROOT/tests" -q -ra --junitxml="$OUTDIR/pytest.xml" || status=1
  echo "== optimizer-step benchmark"
  "$PY" "$ROOT/benchmarks/optim_step.py" --device cuda --out "$OUTDIR" || status=1
  echo "== communication benchmarks (torchrun + NCCL, every visible GPU)"
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  "$PY" -m torch.distributed.run --nproc-per-node "$NGPU" "$ROOT/benchmarks/comm_allreduce.py" --backend nccl --out "$OUTDIR" || status=1
  "$PY" -m torch.distributed.run --nproc-per-node "$NGPU" "$ROOT/benchmarks/comm_train_step.py" --backend nccl --out "$OUTDIR" || status=1
  echo "== done, status $status"
  exit $status
} 2>&1 | tee "$OUTDIR/log.txt"
exit "${PIPESTATUS[0]}"
