# Sourced by scripts/test.sh, scripts/bench.sh and scripts/gpu_verify.sh: picks (or makes) the
# Python environment and builds fusedmf into it. Exports PY (the interpreter to use).
#
# - A Python that already has torch 2.11 (the GPU machines: torch preinstalled, no network) is used
#   as it is: nothing is downloaded, the extension is built with --no-build-isolation --no-deps.
# - Otherwise a virtual environment .venv is made and torch 2.11.0 (the CUDA build from PyPI, so
#   that the CUDA kernels compile even on a machine without a GPU), ninja, pybind11, triton,
#   pytest, expecttest (imported by torch.testing._internal, whose optimizer database
#   tests/test_torch_optim_db.py runs), import-linter >= 2.17 (the layer contracts of pyproject.toml,
#   tests/test_layers.py), matplotlib and tqdm are installed into it, and the
#   disassembly tools of tests/test_codegen.py
#   (cuobjdump, nvdisasm: the PyPI wheels nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm, pinned below;
#   on the GPU machines the toolkit's own, from PATH or CUDA_HOME, see scripts/codegen.py find_tool).
# Set FUSEDMF_PYTHON to force an interpreter. FUSEDMF_TORCH_VERSION (default 2.11.0) picks the torch
# of .venv; "newest" takes the newest release pip resolves and upgrades a reused .venv on every run, so
# that a new release is tried as soon as it is out (scripts/compat.sh, CI's compatibility step).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TORCH_VERSION="${FUSEDMF_TORCH_VERSION:-2.11.0}"
# cuobjdump -sass / nvdisasm of the sm_90 cubins (tests/test_codegen.py). Any CUDA 13 release reads
# nvcc 13.0's cubins; one version for both, since cuobjdump -sass runs nvdisasm.
CODEGEN_TOOLS=("nvidia-cuda-cuobjdump==13.5.37" "nvidia-cuda-nvdisasm==13.5.37")

has_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; }
if [ "$TORCH_VERSION" = newest ]; then
  TORCH_REQ=torch UPGRADE=--upgrade
else
  TORCH_REQ="torch==$TORCH_VERSION" UPGRADE=
fi

if [ -n "${FUSEDMF_PYTHON:-}" ]; then
  PY="$FUSEDMF_PYTHON"
elif [ "$TORCH_VERSION" != newest ] && has_torch python3; then
  PY="$(command -v python3)"
else
  if [ ! -x .venv/bin/python ]; then
    echo "[fusedmf] creating .venv"
    python3 -m venv .venv
  fi
  PY="$ROOT/.venv/bin/python"
  # one interpreter start for both checks: importing torch is most of a set-up that has nothing to do
  # (the codegen tools: both executables of the wheels present in site-packages/nvidia/cu13/bin)
  # ("newest" never counts as set up: pip decides, and has nothing to do when torch is up to date)
  if [ "$TORCH_VERSION" = newest ] || ! "$PY" -c "import sys, torch, ninja, pybind11, triton, pytest, expecttest, importlinter, matplotlib, tqdm, setuptools, wheel, os, sysconfig; b = os.path.join(sysconfig.get_paths()['purelib'], 'nvidia', 'cu13', 'bin'); sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') and all(os.access(os.path.join(b, t), os.X_OK) for t in ('cuobjdump', 'nvdisasm')) else 1)" 2>/dev/null; then
    echo "[fusedmf] installing $TORCH_REQ (CUDA build${UPGRADE:+, upgraded to the newest release}), the build/test tools and cuobjdump/nvdisasm into .venv"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q $UPGRADE "$TORCH_REQ" ninja pybind11 triton pytest expecttest "import-linter>=2.17" numpy matplotlib tqdm "setuptools>=64" wheel \
      "${CODEGEN_TOOLS[@]}"
    echo "[fusedmf] .venv has torch $("$PY" -c "import torch; print(torch.__version__)")"
  fi
fi
export PY

# Build the extension (CPU kernels always; CUDA kernels when nvcc and a CUDA torch are present,
# or required with FUSEDMF_CUDA=1). Editable, so tests and benchmarks see the checkout.
# Skipped when nothing it depends on changed since the last build in this checkout: the digest of
# scripts/build_stamp.py (csrc/, _build.py, setup.py, the build's environment variables, torch,
# the interpreter) is recorded in build/fusedmf-build.stamp after each successful build. A checkout
# that is already installed rebuilds with `setup.py build_ext --inplace` (ninja in build/: only what
# changed is recompiled); a new one is installed with pip (editable).
# Both README commands (scripts/test.sh, scripts/bench.sh) build the same extension, the emulated
# CUDA kernels included, so running one after the other builds once; set FUSEDMF_CUDA_EMU=0 to build
# without them. The compiler's output goes to build/fusedmf-build.log; the console gets one line (and
# the log's tail if the build fails).
export FUSEDMF_CUDA_EMU="${FUSEDMF_CUDA_EMU:-1}"
STAMP="$ROOT/build/fusedmf-build.stamp"
BUILD_LOG="$ROOT/build/fusedmf-build.log"
if [ "${FUSEDMF_SKIP_BUILD:-0}" != "1" ]; then
  if "$PY" scripts/build_stamp.py check "$STAMP"; then
    echo "[fusedmf] fusedmf._C is up to date (sources, build flags and torch unchanged since the last build here): build skipped"
  else
    echo "[fusedmf] building fusedmf._C (FUSEDMF_CUDA=${FUSEDMF_CUDA:-auto}, FUSEDMF_CUDA_EMU=$FUSEDMF_CUDA_EMU, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default}); compiler output in build/fusedmf-build.log"
    start=$(date +%s)
    rm -f "$STAMP"
    mkdir -p "$ROOT/build"
    if (cd / && "$PY" -c "import fusedmf, os, sys; sys.exit(0 if os.path.samefile(os.path.dirname(fusedmf.__file__), '$ROOT/fusedmf') else 1)" 2>/dev/null); then
      build=("$PY" setup.py -q build_ext --inplace)    # an editable install of this checkout: ninja rebuilds what changed
    else
      build=("$PY" -m pip install -q --no-build-isolation --no-deps -e .)
    fi
    if ! "${build[@]}" > "$BUILD_LOG" 2>&1; then
      tail -n 40 "$BUILD_LOG" >&2
      echo "[fusedmf] build FAILED after $(( $(date +%s) - start )) s: the last 40 lines of build/fusedmf-build.log are above" >&2
      exit 1
    fi
    "$PY" scripts/build_stamp.py write "$STAMP"
    echo "[fusedmf] build done in $(( $(date +%s) - start )) s"
    "$PY" -c "import fusedmf; [print(f'  {k:9s} {v!r}') for k, v in fusedmf.available_backends().items()]"
  fi
fi
