"""How fusedmf._C is built: the one list of sources, include dirs, macros and flags.

Used by setup.py (loaded by file path: fusedmf need not be importable at build time) and by
``jit_build()`` (torch.utils.cpp_extension.load with ninja), so the ahead-of-time and JIT builds
cannot drift apart (docs/style.md, one concept in one place). Keep this module free of imports of fusedmf itself.

One environment variable decides CUDA, FUSEDMF_CUDA:
  "auto" (default)  CUDA kernels iff torch is a CUDA build and nvcc is found (CUDA_HOME, PATH or
                    /usr/local/cuda, as torch.utils.cpp_extension looks for it)
  "0"               CPU kernels only
  "1"               CUDA kernels required: fail, saying what is missing
A second, FUSEDMF_CUDA_EMU ("0" default, "1"), adds the backend "cuda_emu": the same csrc/cuda/*.cu
compiled for the host with g++ against the shim in csrc/cuda/emu/ (each through a one-line
csrc/cuda/emu/<name>_emu.cpp, so both build paths compile them as C++ with the flags below), for
tests and CI; a build without it is unchanged.
TORCH_CUDA_ARCH_LIST picks the archs; unset and with no visible GPU, it defaults to "9.0" (the
project's GPUs are H200s) instead of torch's list of every arch.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent  # the checkout: csrc/ sits beside fusedmf/
CSRC = "csrc"

CPU_SOURCES = (
    "csrc/bindings.cpp",
    "csrc/cpu/cpu_ops.cpp",
    "csrc/cpu/kernels_base.cpp",
    "csrc/cpu/kernels_avx2.cpp",
    "csrc/average.cpp",
    "csrc/average_cpu_base.cpp",
    "csrc/average_cpu_avx2.cpp",
    "csrc/smega2_ops.cpp",
)
CUDA_SOURCES = (
    "csrc/cuda/mf_sgd.cu",
    "csrc/cuda/mf_adam.cu",
    "csrc/cuda/non_finite_check.cu",
    "csrc/cuda/pack.cu",
    "csrc/cuda/average.cu",
    "csrc/cuda/smega2.cu",
)

# The emulated CUDA kernels (FUSEDMF_CUDA_EMU=1): one wrapper per csrc/cuda/*.cu, the bridge to
# the bindings, and the shim's runtime (fibers, barriers, launch checks).
CUDA_EMU_SOURCES = tuple(f"csrc/cuda/emu/{Path(f).stem}_emu.cpp" for f in CUDA_SOURCES) + (
    "csrc/cuda/emu/api_emu.cpp",
    "csrc/cuda/emu/cuda_emu_runtime.cpp",
)
# Stand-ins for <cuda_runtime.h> & co. that the .cu files include, searched after every other
# folder: where a toolkit is on the path its headers are found first and the shim has already
# marked them as included (csrc/cuda/emu/cuda_emu.h), so either way only the shim's definitions count.
CUDA_EMU_INCLUDE = "csrc/cuda/emu/include"

DEFAULT_CUDA_ARCH_LIST = "9.0"

# -O3 and no -march: the CPU loops are compiled once per capability and picked at run time
# (NOTE [cpu capability] in csrc/cpu/cpu_ops.cpp).
# -ffp-contract=off: never fuse a * b + c behind our back; the kernels fuse exactly where torch
# does (NOTE [fma placement] in csrc/update_math.h).
# -fno-math-errno, -fno-trapping-math: let sqrtf be one instruction and let the vectorizer
# if-convert the loop-invariant branches; neither changes a result (torch builds with both).
# -fopenmp: at::parallel_for is a header template whose OpenMP backend is a `#pragma omp parallel`
# in our own translation unit; without the flag it silently runs on one thread (measured: ResNet-50
# fp32 SGD took as long with 2 threads as with 1). libgomp is the one torch already loaded.
CXX_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math") + (
    ("-fopenmp",) if sys.platform.startswith("linux") else ()
)
LINK_FLAGS = ("-fopenmp",) if sys.platform.startswith("linux") else ()
# nvcc keeps its default -fmad=true; the device math uses explicit __f*_rn / __fmaf_rn, so there is
# nothing left for it to contract (csrc/update_math.h). -lineinfo costs nothing at run time and
# lets profilers map SASS to source.
NVCC_FLAGS = ("-O3", "-lineinfo")


class CudaUnavailable(RuntimeError):
    """FUSEDMF_CUDA=1 but the CUDA kernels cannot be built here."""


def _is_toolkit(home: Optional[str]) -> bool:
    return bool(home) and _nvcc_path(home) is not None and (Path(home) / "include" / "cuda_runtime_api.h").exists()


def _nvcc_path(cuda_home: Optional[str]) -> Optional[Path]:
    if not cuda_home:
        return None
    nvcc = Path(cuda_home) / "bin" / ("nvcc.exe" if sys.platform == "win32" else "nvcc")
    return nvcc if nvcc.exists() else None


def cuda_home() -> Optional[str]:
    """The CUDA toolkit to build with: $CUDA_HOME / $CUDA_PATH when set, else torch's guess.

    torch guesses from `which nvcc`, which goes wrong when nvcc on PATH is a wrapper script outside
    the toolkit (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local, whose include/ has no CUDA
    headers); then /usr/local/cuda, torch's own fallback, is used if it is a toolkit.
    """
    from torch.utils import cpp_extension

    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit
    guess = cpp_extension.CUDA_HOME
    if guess is None or _is_toolkit(guess):
        return guess
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda"
    return guess


def _use_cuda_home(home: str) -> None:
    """Make torch.utils.cpp_extension (include/library paths, the nvcc it runs) use `home`."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME != home:
        print(f"fusedmf: using the CUDA toolkit at {home} (torch had guessed {cpp_extension.CUDA_HOME})")
        cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home


def cuda_missing() -> Optional[str]:
    """Why the CUDA kernels cannot be built here, or None if they can."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); install a CUDA build of torch"
    home = cuda_home()
    if home is None:
        return "nvcc was not found: set CUDA_HOME to the CUDA toolkit (the folder with bin/nvcc) or put nvcc on PATH"
    if _nvcc_path(home) is None:
        return f"CUDA_HOME={home} has no bin/nvcc; set CUDA_HOME to a CUDA toolkit"
    if not (Path(home) / "include" / "cuda_runtime_api.h").exists():
        return f"CUDA_HOME={home} has no include/cuda_runtime_api.h; set CUDA_HOME to a CUDA toolkit"
    return None


def with_cuda() -> bool:
    """Apply FUSEDMF_CUDA ("auto" | "0" | "1"); raises CudaUnavailable for "1" when CUDA is missing."""
    mode = os.environ.get("FUSEDMF_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FUSEDMF_CUDA must be 'auto', '0' or '1', got {mode!r}")
    if mode == "0":
        return False
    missing = cuda_missing()
    if mode == "1" and missing is not None:
        raise CudaUnavailable(f"FUSEDMF_CUDA=1 but the CUDA kernels cannot be built: {missing}")
    if missing is None:
        _use_cuda_home(cuda_home())
    return missing is None


def with_cuda_emu() -> bool:
    """FUSEDMF_CUDA_EMU ("0" | "1"): whether to link the emulated CUDA kernels (backend "cuda_emu")."""
    mode = os.environ.get("FUSEDMF_CUDA_EMU", "0").strip()
    if mode not in ("0", "1"):
        raise ValueError(f"FUSEDMF_CUDA_EMU must be '0' or '1', got {mode!r}")
    return mode == "1"


def configure_cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, defaulted to 9.0 when unset and no GPU is visible; returns it ("" = torch's choice)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs:
        return archs
    import torch

    if torch.cuda.is_available():
        return ""  # torch builds for the visible GPUs
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    print(f"fusedmf: TORCH_CUDA_ARCH_LIST is unset and no GPU is visible; building for {DEFAULT_CUDA_ARCH_LIST} only")
    return DEFAULT_CUDA_ARCH_LIST


def _arch_token(archs: str) -> str:
    """'8.0;9.0+PTX' -> 'sm_80,sm_90+PTX': a macro value safe in a shell and a ninja file."""
    out = []
    for arch in re.split(r"[;\s,]+", archs):
        if not arch:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", arch)
        out.append(f"sm_{m.group(1)}{m.group(2)}{m.group(3)}{m.group(4) or ''}" if m else re.sub(r"[^A-Za-z0-9_+]", "_", arch))
    return ",".join(out)


def sources(cuda: bool, root: Optional[Path] = None) -> list[str]:
    """Source files, relative to the checkout (setup.py) or absolute under `root` (JIT)."""
    files = list(CPU_SOURCES) + (list(CUDA_SOURCES) if cuda else []) + (list(CUDA_EMU_SOURCES) if with_cuda_emu() else [])
    return [str(root / f) for f in files] if root is not None else files


def nvidia_include_dirs() -> list[str]:
    """site-packages/nvidia/cu13/include (and other nvidia/*/include) of the pip CUDA wheels torch
    depends on: torch's CUDA headers include cusparse.h, cublas_v2.h... which live there."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        for sub in sorted(Path(base).iterdir()):
            inc = sub / "include"
            if sub.name.startswith("cu") and inc.is_dir() and (inc / "cusparse.h").exists():
                dirs.append(str(inc))
    return dirs


def include_dirs(cuda: bool, root: Path = ROOT) -> list[str]:
    return [str(root / CSRC)]


def define_macros(cuda: bool, cuda_archs: str = "") -> list[tuple[str, Optional[str]]]:
    macros: list[tuple[str, Optional[str]]] = []
    if cuda:
        macros.append(("FUSEDMF_WITH_CUDA", None))
        if cuda_archs:
            macros.append(("FUSEDMF_CUDA_ARCHS", _arch_token(cuda_archs)))
    if with_cuda_emu():
        macros.append(("FUSEDMF_WITH_CUDA_EMU", None))
    return macros


def _macro_flags(macros) -> list[str]:
    return [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in macros]


def extra_compile_args(cuda: bool, root: Optional[Path] = None) -> dict[str, list[str]]:
    args = {"cxx": list(CXX_FLAGS)}
    if with_cuda_emu():
        # absolute: ninja does not run in the checkout
        args["cxx"] += ["-idirafter", str((root or ROOT) / CUDA_EMU_INCLUDE)]
    if cuda:
        # The pip CUDA headers (cusparse.h, cublas_v2.h... that ATen/cuda/CUDAContext.h includes
        # from csrc/bindings.cpp) go *after* the toolkit's include/: that folder also holds a
        # cuda_runtime_api.h without its crt/ headers, which must not shadow the toolkit's.
        # The .cu files include no torch header and do not need them.
        for d in nvidia_include_dirs():
            args["cxx"] += ["-idirafter", d]
        args["nvcc"] = list(NVCC_FLAGS)
    return args


def extension_kwargs(cuda: bool) -> dict:
    """Keyword arguments of CppExtension / CUDAExtension for setup.py (paths relative to the checkout)."""
    archs = configure_cuda_arch_list() if cuda else ""
    return dict(
        name="fusedmf._C",
        sources=sources(cuda),
        include_dirs=include_dirs(cuda),
        define_macros=define_macros(cuda, archs),
        extra_compile_args=extra_compile_args(cuda),
        extra_link_args=list(LINK_FLAGS),
    )


def default_build_dir(cuda: bool) -> Path:
    import torch

    base = os.environ.get("FUSEDMF_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fusedmf")
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}-{'cuda' if cuda else 'cpu'}{'-emu' if with_cuda_emu() else ''}"
    return Path(base) / tag


def jit_build(verbose: bool = False):
    """Compile the same sources with torch.utils.cpp_extension.load (ninja) and return the module.

    The build directory is $FUSEDMF_BUILD_DIR or ~/.cache/fusedmf, one subfolder per torch/Python
    version and CPU/CUDA; ninja recompiles only what changed. Needs the csrc/ folder of a checkout.
    """
    from torch.utils import cpp_extension

    if not (ROOT / CSRC / "bindings.cpp").exists():
        raise RuntimeError(f"fusedmf JIT build: no sources at {ROOT / CSRC} (the JIT build needs a source checkout)")
    cuda = with_cuda()
    archs = configure_cuda_arch_list() if cuda else ""
    macros = _macro_flags(define_macros(cuda, archs))
    args = extra_compile_args(cuda, ROOT)
    build_dir = default_build_dir(cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="fusedmf_C_jit",
        sources=sources(cuda, ROOT),
        extra_include_paths=include_dirs(cuda),
        extra_cflags=args["cxx"] + macros,
        extra_cuda_cflags=(args["nvcc"] + macros) if cuda else None,
        extra_ldflags=list(LINK_FLAGS),
        build_directory=str(build_dir),
        with_cuda=cuda,
        verbose=verbose,
    )
