#!/usr/bin/env bash
# The README's main command: set up (scripts/env.sh), build, run the benchmarks on a small default
# (minutes on a CPU), write JSON/CSV under benchmarks/out/ and print the tables.
# Extra arguments go to benchmarks/optim_step.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
DEVICE=cpu
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && DEVICE=cuda
exec "$PY" benchmarks/optim_step.py --device "$DEVICE" "$@"
