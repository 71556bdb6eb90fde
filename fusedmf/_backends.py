"""Which backends this build and machine can run, and the one place a backend gets chosen.

Importing fusedmf never fails because the compiled extension is missing (a top complaint about apex: docs/backends.md):
the reason is recorded and reported by ``available_backends()`` and by the error raised when a
missing backend is asked for. The "auto" choice never falls back silently either: a fallback to
the reference backend warns once, naming the reason, instead of silently running something slower.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from typing import NamedTuple, Optional

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton", "cuda_emu")
_BUILD_HINT = (
    "build it with `pip install --no-build-isolation .` in the fusedmf checkout "
    "(FUSEDMF_CUDA=1 to require the CUDA kernels), or set FUSEDMF_JIT=1 to compile it with "
    "ninja on first import"
)


class BackendStatus(NamedTuple):
    available: bool
    detail: str  # what runs when available, why not otherwise

    def __repr__(self) -> str:  # short, for printing the dict
        return f"{'yes' if self.available else 'no'}: {self.detail}"


@functools.lru_cache(maxsize=None)
def compiled_extension():
    """Return (module or None, reason it is missing). The fake kernels of its ops are registered
    by fusedmf/functional/_ops.py, the layer above, which calls this on import."""
    try:
        # by name at run time: the extension is an optional plug-in, built or not, and this runs
        # while fusedmf itself is still initialising (`from fusedmf import _C` would then report a
        # missing build as "partially initialized module 'fusedmf' (... circular import)")
        return importlib.import_module("fusedmf._C"), ""
    except ImportError as exc:
        import_error = f"fusedmf._C could not be imported ({exc})"
    if os.environ.get("FUSEDMF_JIT", "0") == "1":
        try:
            from fusedmf import _build  # the build tooling, needed only for an opt-in JIT build

            return _build.jit_build(verbose=os.environ.get("FUSEDMF_JIT_VERBOSE") == "1"), ""
        except Exception as exc:  # a failed JIT build is reported, not raised at import
            return None, f"{import_error}; the FUSEDMF_JIT=1 build failed: {exc}"
    return None, f"{import_error}; {_BUILD_HINT}"


@functools.lru_cache(maxsize=None)
def cuda_emu_extension():
    """Return (fusedmf._C or None, reason): the emulated CUDA kernels (backend "cuda_emu": csrc/cuda
    compiled for the host, run on CPU tensors; a testing backend, never chosen by "auto")."""
    ext, why = compiled_extension()
    if ext is None:
        return None, why
    if not ext.has_cuda_emu():
        return None, ("fusedmf._C was built without FUSEDMF_CUDA_EMU=1; rebuild with "
                      "`FUSEDMF_CUDA_EMU=1 pip install --no-build-isolation .` to run csrc/cuda on CPU tensors")
    return ext, ""


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_module():
    """Return (triton_kernels module or None, reason it is missing)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return None, f"triton is not installed ({exc})"
    # A source checkout (setup.py beside fusedmf/): its triton_kernels/ folder, not whatever the
    # import system maps "fusedmf.triton_kernels" to: an editable install of another checkout
    # (one virtualenv shared between checkouts) maps it to that checkout's kernels, which would
    # then run against this checkout's fusedmf. Outside a checkout (an installed fusedmf) only the
    # installed fusedmf.triton_kernels, never an unrelated top-level "triton_kernels" package.
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidate = os.path.join(repo_root, "triton_kernels", "__init__.py")
    checkout = os.path.exists(os.path.join(repo_root, "setup.py")) and os.path.exists(candidate)
    if "fusedmf.triton_kernels" in sys.modules or not checkout:
        try:
            return importlib.import_module("fusedmf.triton_kernels"), ""
        except ImportError:
            return None, "fusedmf.triton_kernels is not installed"
    spec = importlib.util.spec_from_file_location(
        "fusedmf.triton_kernels", candidate,
        submodule_search_locations=[os.path.dirname(candidate)],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fusedmf.triton_kernels"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules["fusedmf.triton_kernels"]
        return None, f"triton_kernels failed to import: {exc}"
    return module, ""


def available_backends() -> dict[str, BackendStatus]:
    """What this build and machine can run, with the reason for each missing backend."""
    status = {"reference": BackendStatus(True, "pure PyTorch (any device, float64-capable)")}
    ext, why = compiled_extension()
    status["cpu"] = (
        BackendStatus(True, "fusedmf._C CPU kernels") if ext is not None else BackendStatus(False, why)
    )
    if ext is None:
        status["cuda"] = BackendStatus(False, why)
    elif not ext.has_cuda():
        status["cuda"] = BackendStatus(
            False, "fusedmf._C was built without CUDA kernels; rebuild with "
            "`FUSEDMF_CUDA=1 pip install --no-build-isolation .` (needs nvcc and a CUDA build of torch)"
        )
    elif not torch.cuda.is_available():
        status["cuda"] = BackendStatus(False, "no CUDA device is visible (torch.cuda.is_available() is False)")
    else:
        status["cuda"] = BackendStatus(True, f"fusedmf._C CUDA kernels on {torch.cuda.get_device_name()}")
    tk, why = triton_module()
    if tk is None:
        status["triton"] = BackendStatus(False, why)
    elif torch.cuda.is_available():
        status["triton"] = BackendStatus(True, "Triton kernels on the GPU")
    elif _triton_interpreting():
        status["triton"] = BackendStatus(True, "Triton kernels on CPU tensors (TRITON_INTERPRET=1, slow)")
    else:
        status["triton"] = BackendStatus(
            False, "no CUDA device is visible; set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors"
        )
    emu, why = cuda_emu_extension()
    status["cuda_emu"] = (
        BackendStatus(True, "csrc/cuda kernels emulated on CPU tensors (FUSEDMF_CUDA_EMU=1 build; for tests, slow)")
        if emu is not None else BackendStatus(False, why)
    )
    return status


_warned: set = set()


def resolve(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """Map a requested backend ("auto" or a name) to the one that will run for tensors on `device`.

    Meta tensors run any loaded backend's ops through their fake kernels (fusedmf/functional/_ops.py):
    "auto" picks the compiled ops when they are built, so a step on meta tensors goes through the
    same ops and the same host code as one on real tensors.
    """
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"unknown backend {backend!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    if device.type == "meta":
        return _resolve_meta(backend, dtype)
    status = available_backends()
    if backend == "auto":
        if dtype == torch.float64:
            return "reference"  # compiled kernels keep fp32 state; float64 is the spec's own territory
        preferred = ("cuda", "triton") if device.type == "cuda" else ("cpu",) if device.type == "cpu" else ()
        for name in preferred:
            if status[name].available:
                return name
        key = (device.type, preferred)
        if key not in _warned:
            _warned.add(key)
            reasons = "; ".join(f"{n}: {status[n].detail}" for n in preferred) or "no fused kernels for this device"
            warnings.warn(
                f"fusedmf: running the slow reference backend for {device.type} tensors ({reasons})",
                RuntimeWarning, stacklevel=3,
            )
        return "reference"
    if not status[backend].available:
        raise RuntimeError(f"fusedmf backend {backend!r} is not available: {status[backend].detail}")
    if backend == "cpu" and device.type != "cpu":
        raise RuntimeError(f"fusedmf backend 'cpu' runs on CPU tensors, got tensors on {device}")
    if backend == "cuda_emu" and device.type != "cpu":
        raise RuntimeError(f"fusedmf backend 'cuda_emu' runs the CUDA kernels on CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise RuntimeError(f"fusedmf backend 'cuda' runs on CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type == "cpu" and not _triton_interpreting():
        raise RuntimeError("fusedmf backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return backend


def _resolve_meta(backend: str, dtype: Optional[torch.dtype]) -> str:
    if backend == "auto":
        if dtype == torch.float64 or compiled_extension()[0] is None:
            return "reference"
        return "cpu"
    if backend in ("cpu", "cuda") and compiled_extension()[0] is None:
        raise RuntimeError(f"fusedmf backend {backend!r} is not available: {compiled_extension()[1]}")
    if backend == "cuda_emu" and cuda_emu_extension()[0] is None:
        raise RuntimeError(f"fusedmf backend 'cuda_emu' is not available: {cuda_emu_extension()[1]}")
    if backend == "triton" and triton_module()[0] is None:
        raise RuntimeError(f"fusedmf backend 'triton' is not available: {triton_module()[1]}")
    return backend
