#!/usr/bin/env bash
# The emulated CUDA kernels (backend "cuda_emu", csrc/cuda/emu/) under AddressSanitizer and
# UndefinedBehaviorSanitizer, and the emulated tests against them.
#
# The checkout's tracked and untracked, not ignored, files are copied to build/sanitize/src (or
# $FUSEDMF_SANITIZE_DIR/src) and built there with FUSEDMF_CUDA=0 FUSEDMF_CUDA_EMU=1 and the
# sanitizers in CFLAGS / LDFLAGS: its own fusedmf._C and ninja folder, so the normal build of the
# checkout is untouched. Then `pytest tests -k cuda_emu` runs in the copy with libasan preloaded
# (python itself is not instrumented). Any report fails the run (halt_on_error, no recovery).
# Extra arguments go to pytest.
#
# -fno-sanitize=vptr: the vptr check needs RTTI-compatible instrumentation of every library whose
# objects it sees (torch's are not instrumented). Leaks are not checked: python and torch keep
# allocations for the life of the process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FUSEDMF_SKIP_BUILD=1 source scripts/env.sh   # PY, without building the checkout
DEST="${FUSEDMF_SANITIZE_DIR:-$ROOT/build/sanitize}/src"
mkdir -p "$DEST"
# a fresh copy of the sources (the ninja folder under $DEST/build survives: only what changed rebuilds)
git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$DEST"
cd "$DEST"
CXX_BIN="${CXX:-c++}"
SAN="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=all -fno-omit-frame-pointer"
start=$(date +%s)
echo "[fusedmf] sanitizer build in $DEST ($SAN)"
nice -n 19 env FUSEDMF_CUDA=0 FUSEDMF_CUDA_EMU=1 CFLAGS="$SAN" LDFLAGS="$SAN" "$PY" setup.py -q build_ext --inplace
echo "[fusedmf] sanitizer build done in $(( $(date +%s) - start )) s"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
export FUSEDMF_REQUIRE_BACKENDS="${FUSEDMF_REQUIRE_BACKENDS:-cpu,cuda_emu}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:halt_on_error=1:abort_on_error=1:verify_asan_link_order=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
# the copy's fusedmf, not the checkout's editable install (tests/conftest.py puts the copy first)
LD_PRELOAD="$("$CXX_BIN" -print-file-name=libasan.so) $("$CXX_BIN" -print-file-name=libubsan.so)" \
  "$PY" -c "import fusedmf, os, sys; assert os.path.samefile(os.path.dirname(fusedmf.__file__), '$DEST/fusedmf'), fusedmf.__file__"
start=$(date +%s)
LD_PRELOAD="$("$CXX_BIN" -print-file-name=libasan.so) $("$CXX_BIN" -print-file-name=libubsan.so)" \
  nice -n 19 "$PY" -m pytest tests -q -ra -p no:cacheprovider -k cuda_emu "$@"
echo "[fusedmf] sanitized emulated tests done in $(( $(date +%s) - start )) s"
