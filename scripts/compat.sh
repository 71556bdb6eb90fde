#!/usr/bin/env bash
# CI's compatibility step (.ci/run, after the main run): build fusedmf._C against the newest torch
# that pip resolves, CPU kernels only, and run the optimizer and parity tests on it, so that a torch
# release that breaks the build or the ops' contract with torch fails CI before a user meets it.
#
# The checkout's files (tracked, plus untracked ones git does not ignore) are mirrored into
# .compat-newest/ (git-ignored), which has its own .venv, build/ and build stamp: the checkout's
# in-place fusedmf._C, built against torch 2.11 by the main run, and its stamp are left alone.
# tar keeps file times, so a reused .compat-newest/ recompiles only what changed (nothing: the
# build is skipped). The Triton cases are left out: they test Triton, not the build against torch,
# and the main run has them. Extra arguments go to pytest.
set -euo pipefail
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$SRC/.compat-newest"
mkdir -p "$DEST"
(cd "$SRC" && git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf -) \
  | tar -xf - -C "$DEST"
export FUSEDMF_TORCH_VERSION=newest FUSEDMF_CUDA=0 FUSEDMF_CUDA_EMU=0 FUSEDMF_REQUIRE_BACKENDS=cpu
unset FUSEDMF_PYTHON
source "$DEST/scripts/env.sh"
exec "$PY" -m pytest -q -ra -k "not triton" \
  tests/test_binding.py tests/test_ops.py tests/test_optim_vs_torch.py tests/test_torch_conventions.py \
  tests/test_mixed_precision.py tests/test_overflow.py tests/test_step_protocol.py tests/test_capturable.py \
  tests/test_errors.py tests/test_state_dict.py tests/test_reference_spec.py tests/test_torch_optim_db.py "$@"
