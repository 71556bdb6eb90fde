# Sourced by scripts/test.sh, scripts/bench.sh and scripts/gpu_verify.sh: picks (or makes) the
# Python environment and builds fusedmf into it. Exports PY (the interpreter to use).
#
# - A Python that already has torch 2.11 (the GPU machines: torch preinstalled, no network) is used
#   as it is: nothing is downloaded, the extension is built with --no-build-isolation --no-deps.
# - Otherwise a virtual environment .venv is made and torch 2.11.0 (the CUDA build from PyPI, so
#   that the CUDA kernels compile even on a machine without a GPU), ninja, pybind11, triton,
#   pytest, matplotlib and tqdm are installed into it.
# Set FUSEDMF_PYTHON to force an interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TORCH_VERSION="2.11.0"

has_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; }

if [ -n "${FUSEDMF_PYTHON:-}" ]; then
  PY="$FUSEDMF_PYTHON"
elif has_torch python3; then
  PY="$(command -v python3)"
else
  if [ ! -x .venv/bin/python ]; then
    echo "[fusedmf] creating .venv"
    python3 -m venv .venv
  fi
  PY="$ROOT/.venv/bin/python"
  if ! has_torch "$PY" || ! "$PY" -c "import ninja, pybind11, triton, pytest, matplotlib, tqdm, setuptools, wheel" 2>/dev/null; then
    echo "[fusedmf] installing torch==$TORCH_VERSION (CUDA build) and the build/test tools into .venv"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "torch==$TORCH_VERSION" ninja pybind11 triton pytest numpy matplotlib tqdm "setuptools>=64" wheel
  fi
fi
export PY

# Build the extension (CPU kernels always; CUDA kernels when nvcc and a CUDA torch are present,
# or required with FUSEDMF_CUDA=1). Editable, so tests and benchmarks see the checkout.
if [ "${FUSEDMF_SKIP_BUILD:-0}" != "1" ]; then
  echo "[fusedmf] building fusedmf._C (FUSEDMF_CUDA=${FUSEDMF_CUDA:-auto}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
  start=$(date +%s)
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . 
  echo "[fusedmf] build done in $(( $(date +%s) - start )) s"
  "$PY" -c "import fusedmf; [print(f'  {k:9s} {v!r}') for k, v in fusedmf.available_backends().items()]"
fi
