#!/usr/bin/env bash
# GPU verification in stages, for a session that has the device machine (one command there may run at
# most 10 minutes, so run the stages over several commands, e.g. `build tests`, then `optim comm`, then
# `throughput scaling mf`; a machine that went back starts bare, and every stage builds first when the
# CUDA kernels are not built there yet).
#
#   bash scripts/gpu_verify.sh [OUTDIR] [--dry-run] [stage ...]
#
# stages (default: all, in this order)
#   build       build fusedmf._C with the CUDA kernels (sm_90) and list the backends
#   tests       the whole test suite with the cuda and triton backends REQUIRED (nothing may skip for
#               want of them); extra pytest arguments in $PYTEST_ARGS (e.g. PYTEST_ARGS="-k comm")
#   optim       benchmarks/optim_step.py --device cuda
#   comm        comm_allreduce.py and comm_train_step.py under torchrun + NCCL over every visible GPU
#   throughput  ResNet-50 training throughput, AMP bf16, batches 32 64 128 256, every case (~2-3 min on an
#               H200); with more than one GPU also the data-parallel cases under torchrun + NCCL
#   scaling     the single-GPU timeline (ResNet-50, batch 32) + predicted E(8) on one NVLink node and
#               E(64) over 400 Gb/s InfiniBand (curves also from the throughput stage's timeline when it
#               ran first); with more than one GPU the measured E(N) under torchrun + NCCL and the
#               predictor's error on it
#   mf          benchmarks/mf_experiment.py --gpu-sweep (ResNet-50, loss vs MF at a fixed global batch over
#               K simulated ranks) on the GPU, optimizers $MF_OPTIMIZERS (default "sgd adam"), $MF_STEPS steps
#               (default 150), into OUTDIR/mf_<optimizers>/; CIFAR-10 from $CIFAR10_DIR when it holds
#               data_batch_*.bin, else synthetic.
#
# Each stage appends its output to OUTDIR/log.txt and writes its JSON / PNG / pytest XML into OUTDIR;
# the exit status is non-zero when any stage failed. --dry-run (or FUSEDMF_DRY_RUN=1) prints the
# commands of the stages without running them. OUTDIR defaults to benchmarks/results/gpu-<UTC time>.
# On the device tool: bash scripts/gpu_verify.sh "$OUT" build tests   ...   then copy $OUT into benchmarks/results/.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALL_STAGES=(build tests optim comm throughput scaling mf)
DRY_RUN="${FUSEDMF_DRY_RUN:-0}"
OUTDIR=""
STAGES=()
is_stage() { local s; for s in "${ALL_STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then DRY_RUN=1
  elif [ "$a" = "-h" ] || [ "$a" = "--help" ]; then sed -n '2,/^set -uo/{/^set -uo/!p}' "${BASH_SOURCE[0]}"; exit 0
  elif is_stage "$a"; then STAGES+=("$a")
  elif [ -z "$OUTDIR" ] && [ ${#STAGES[@]} -eq 0 ]; then OUTDIR="$a"
  else echo "gpu_verify: unknown stage '$a' (stages: ${ALL_STAGES[*]})" >&2; exit 2
  fi
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL_STAGES[@]}")
OUTDIR="${OUTDIR:-$ROOT/benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOG="$OUTDIR/log.txt"
export FUSEDMF_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYTHONUNBUFFERED=1
export FUSEDMF_REQUIRE_BACKENDS=cpu,cuda,triton
export MAX_JOBS="${MAX_JOBS:-16}"
cd "$ROOT"

# The interpreter scripts/env.sh picks, without building (the build stage builds).
if [ "$DRY_RUN" = 1 ]; then
  PY="${FUSEDMF_PYTHON:-python3}"
else
  PY="$(FUSEDMF_SKIP_BUILD=1 bash -c 'source "$0/scripts/env.sh" >/dev/null && echo "$PY"' "$ROOT")" || {
    echo "gpu_verify: scripts/env.sh found no Python with torch" | tee -a "$LOG"; exit 1; }
fi
if [ -z "${NGPU:-}" ]; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  [ "$DRY_RUN" = 1 ] && [ "$NGPU" = 0 ] && NGPU=1      # show the commands as on a one-GPU machine
fi

STAGE_RC=0
x() {   # run one command of a stage (print it with --dry-run); a failure marks the stage failed, the stage goes on
  echo "+ $*"
  [ "$DRY_RUN" = 1 ] && return 0
  "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then echo "[gpu_verify] FAILED (exit $rc): $*"; STAGE_RC=1; fi
  return $rc
}

build_ext() { x bash -c 'source "$0/scripts/env.sh"' "$ROOT"; }

ensure_built() {   # every stage but build: build first when the CUDA kernels are not there (a bare machine)
  [ "$DRY_RUN" = 1 ] && return 0
  if ! "$PY" -c "import fusedmf, sys; sys.exit(0 if fusedmf.available_backends()['cuda'].available else 1)" 2>/dev/null; then
    echo "[gpu_verify] the CUDA kernels are not built here: building first"
    build_ext || return 1
  fi
}

latest() { ls -t "$@" 2>/dev/null | head -n 1; }

stage_build() {
  x nvidia-smi
  build_ext
  x "$PY" -c "import fusedmf, sys; b = fusedmf.available_backends(); [print(f'  {k:9s} {v!r}') for k, v in b.items()]; sys.exit(0 if b['cuda'].available and b['triton'].available else 1)"
}

stage_tests() {
  ensure_built || return 1
  # shellcheck disable=SC2086
  x "$PY" -m pytest "$ROOT/tests" -q -ra --junitxml="$OUTDIR/pytest.xml" ${PYTEST_ARGS:-}
}

stage_optim() {
  ensure_built || return 1
  x "$PY" "$ROOT/benchmarks/optim_step.py" --device cuda --out "$OUTDIR"
  # device time (CUDA-graph replay) against host time (the Python call) per case, NOTE [device and host
  # time] in benchmarks/harness.py: docs/performance.md's target is host below device (the host stays ahead)
  local oj
  oj="$(latest "$OUTDIR"/optim_step_cuda_2*.json)"
  [ -n "$oj" ] && x "$PY" - "$oj" <<'PYEOF'
import json, sys
cases = json.load(open(sys.argv[1]))["cases"]
print(f"{'case':44s} {'events ms':>9s} {'device ms':>9s} {'host ms':>8s}  host<device")
for r in cases:
    if r.get("median_s") is None:
        continue
    d, h = r.get("device_median_s"), r.get("host_median_s")
    ms = lambda v: "-" if v is None else f"{v * 1e3:.3f}"
    verdict = "?" if d is None or h is None else ("yes" if h < d else "NO")
    print(f"{r['name']:44s} {ms(r['median_s']):>9s} {ms(d):>9s} {ms(h):>8s}  {verdict}"
          + (f"  ({r['device_time_reason']})" if d is None else ""))
PYEOF
}

stage_comm() {
  ensure_built || return 1
  x "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" "$ROOT/benchmarks/comm_allreduce.py" --backend nccl --out "$OUTDIR"
  x "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" "$ROOT/benchmarks/comm_train_step.py" --backend nccl --out "$OUTDIR"
}

stage_throughput() {
  ensure_built || return 1
  x "$PY" -m fusedmf.bench throughput --device cuda --model resnet50 --batches 32 64 128 256 --amp bf16 \
    --low-precision bf16 --steps 100 --warmup 10 --out "$OUTDIR"
  if [ "$NGPU" -gt 1 ]; then
    x "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" "$ROOT/benchmarks/throughput.py" \
      --device cuda --model resnet50 --batches 32 256 --amp bf16 --steps 50 --warmup 10 --out "$OUTDIR"
  fi
}

stage_scaling() {
  ensure_built || return 1
  local tl_args=() tj
  tj="$(latest "$OUTDIR"/throughput_cuda_2*.json)"              # the single-process throughput run's timeline
  [ -n "$tj" ] && tl_args=(--timeline-json "$tj")
  [ -z "$tj" ] && echo "[gpu_verify] no throughput_cuda_*.json in OUTDIR (run the throughput stage first for curves from its timeline too)"
  x "$PY" -m fusedmf.bench scaling --device cuda --world-sizes 1 --model resnet50 --batch 32 "${tl_args[@]}" --out "$OUTDIR"
  if [ "$NGPU" -gt 1 ]; then
    x "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" "$ROOT/benchmarks/scaling.py" \
      --backend nccl --model resnet50 --batch 32 "${tl_args[@]}" --out "$OUTDIR"
  fi
}

stage_mf() {
  ensure_built || return 1
  local data_args=() mf="$ROOT/benchmarks/mf_experiment.py"
  if [ -n "${CIFAR10_DIR:-}" ] && ls "$CIFAR10_DIR"/data_batch_*.bin >/dev/null 2>&1; then
    data_args=(--data "$CIFAR10_DIR")
  else
    echo "[gpu_verify] no CIFAR-10 binary files (\$CIFAR10_DIR): synthetic CIFAR-shaped data"
  fi
  # ResNet-50, K in {1,2,4,8}, B = 256, every rule, bf16 on the GPU; the optimizers and steps are cut to fit
  # one 10-minute command (MF_OPTIMIZERS="nag" etc. in a later command for the rest: each set has its folder)
  local opts="${MF_OPTIMIZERS:-sgd adam}" steps="${MF_STEPS:-150}"
  # shellcheck disable=SC2086
  x "$PY" "$mf" --gpu-sweep --device cuda --optimizers $opts --steps "$steps" "${data_args[@]}" \
    --out "$OUTDIR/mf_${opts// /_}"
}

{
  echo "== fusedmf GPU verification, $(date -u), commit $(git -C "$ROOT" rev-parse HEAD 2>/dev/null), stages: ${STAGES[*]}$([ "$DRY_RUN" = 1 ] && echo ' (dry run)')"
  echo "   OUTDIR $OUTDIR, python $PY, $NGPU GPU(s)"
} | tee -a "$LOG"

failed=()
summary=()
for s in "${STAGES[@]}"; do
  t0=$(date +%s)
  ( STAGE_RC=0; echo "== stage $s ($(date -u +%H:%M:%SZ))"; "stage_$s"; rc=$?; [ $STAGE_RC -ne 0 ] && rc=1; exit $rc ) 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  dt=$(( $(date +%s) - t0 ))
  if [ "$rc" -ne 0 ]; then failed+=("$s"); summary+=("$s: FAILED in ${dt} s"); else summary+=("$s: ok in ${dt} s"); fi
  echo "== stage $s: $([ "$rc" -ne 0 ] && echo FAILED || echo ok) in ${dt} s" | tee -a "$LOG"
done
{
  echo "== summary: ${summary[*]/%/;}"
  if [ ${#failed[@]} -gt 0 ]; then echo "== FAILED stages: ${failed[*]}"; else echo "== all stages ok"; fi
} | tee -a "$LOG"
[ ${#failed[@]} -eq 0 ]
