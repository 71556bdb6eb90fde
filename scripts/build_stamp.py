"""The digest of everything the build of fusedmf._C depends on: scripts/env.sh records it after each
successful build in this checkout and skips the build when it has not changed.

    python scripts/build_stamp.py check STAMP   # exit 0 iff STAMP holds today's digest and this
                                                # checkout's fusedmf._C imports (then lists the backends)
    python scripts/build_stamp.py write STAMP   # record today's digest
    python scripts/build_stamp.py explain       # the inputs, one a line

Inputs: every file under csrc/ (new sources and headers included), fusedmf/_build.py, setup.py,
pyproject.toml; the environment variables the build reads; the interpreter, torch's version and CUDA
version, and the nvcc that FUSEDMF_CUDA=auto would find. Run with the interpreter that builds. One
process does the whole check (importing torch dominates a skipped set-up).
"""

import hashlib
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("fusedmf/_build.py", "setup.py", "pyproject.toml")
# every variable fusedmf/_build.py, setup.py or torch.utils.cpp_extension reads to decide what is built
ENV = ("FUSEDMF_CUDA", "FUSEDMF_CUDA_EMU", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH", "CXX", "CC",
       "CFLAGS", "CXXFLAGS", "LDFLAGS", "MAX_JOBS")


def inputs() -> list:
    items = []
    for path in sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file()):
        items.append((str(path.relative_to(ROOT)), hashlib.sha256(path.read_bytes()).hexdigest()))
    for name in FILES:
        path = ROOT / name
        items.append((name, hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"))
    for key in ENV:
        items.append((f"${key}", os.environ.get(key, "<unset>")))
    import torch

    items += [("python", f"{sys.prefix} {sys.version.split()[0]}"),
              ("torch", f"{torch.__version__} cuda {torch.version.cuda}"),
              ("nvcc on PATH", shutil.which("nvcc") or "<none>"),
              # TORCH_CUDA_ARCH_LIST unset: the archs follow the visible GPUs (fusedmf/_build.py)
              ("GPUs visible", str(torch.cuda.device_count()))]
    return items


def digest() -> str:
    h = hashlib.sha256()
    for key, value in inputs():
        h.update(f"{key}\0{value}\n".encode())
    return h.hexdigest()


def _installed_here() -> bool:
    """This checkout's fusedmf and its compiled extension import (from outside the checkout)."""
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != str(ROOT)]
    try:
        import fusedmf
        import fusedmf._C  # noqa: F401
    except ImportError:
        return False
    return os.path.samefile(os.path.dirname(fusedmf.__file__), ROOT / "fusedmf")


def main(argv) -> int:
    cmd = argv[1] if len(argv) > 1 else "explain"
    if cmd == "explain":
        for key, value in inputs():
            print(f"{key}: {value}")
        return 0
    stamp = Path(argv[2])
    if cmd == "write":
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest() + "\n")
        return 0
    if cmd == "check":
        if not stamp.exists() or stamp.read_text().strip() != digest() or not _installed_here():
            return 1
        import fusedmf

        for k, v in fusedmf.available_backends().items():
            print(f"  {k:9s} {v!r}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
