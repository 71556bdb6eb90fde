#!/usr/bin/env bash
# The README's test command: set up (scripts/env.sh), build, run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
# The CUDA kernel sources also run on CPU tensors (backend "cuda_emu", csrc/cuda/emu/, built by
# scripts/env.sh unless FUSEDMF_CUDA_EMU=0), so every CUDA test runs here without a GPU.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# Triton runs on CPU tensors through its interpreter where there is no GPU.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
  echo "[fusedmf] no GPU: Triton kernels run on CPU tensors under TRITON_INTERPRET=1"
fi
exec "$PY" -m pytest tests -q -ra "$@"
