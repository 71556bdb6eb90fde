"""Build fusedmf and its compiled extension fusedmf._C (CPU kernels, plus CUDA kernels when possible).

    pip install --no-build-isolation .             # FUSEDMF_CUDA=auto: CUDA iff nvcc + CUDA torch
    FUSEDMF_CUDA=0 pip install --no-build-isolation .   # CPU kernels only
    FUSEDMF_CUDA=1 pip install --no-build-isolation .   # CUDA kernels required
    FUSEDMF_CUDA_EMU=1 ...                          # also csrc/cuda on the host: backend "cuda_emu" (tests, CI)
    TORCH_CUDA_ARCH_LIST="9.0" ...                 # archs to build (default 9.0 when no GPU is visible)

--no-build-isolation: torch comes from the environment (the extension must match the torch it
runs with). Sources, flags and the CUDA decision live in fusedmf/_build.py, shared with the JIT
build (FUSEDMF_JIT=1).
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = Path(__file__).resolve().parent


def _load_build_module():
    # by file path: importing the fusedmf package may need a built fusedmf._C, or other deps
    spec = importlib.util.spec_from_file_location("_fusedmf_build", HERE / "fusedmf" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_extensions():
    build = _load_build_module()
    try:
        cuda = build.with_cuda()
    except build.CudaUnavailable as exc:  # FUSEDMF_CUDA=1 that cannot be honoured: say why, no traceback
        sys.exit(f"error: {exc}")
    print(f"fusedmf: building fusedmf._C with {'CPU and CUDA' if cuda else 'CPU-only'} kernels"
          + ("" if cuda else f" ({build.cuda_missing() or 'FUSEDMF_CUDA=0'})")
          + (", plus the emulated CUDA kernels (FUSEDMF_CUDA_EMU=1)" if build.with_cuda_emu() else ""))
    extension = CUDAExtension if cuda else CppExtension
    return [extension(**build.extension_kwargs(cuda))]


setup(
    name="fusedmf",
    version="0.1.0",
    description="Fused MF-momentum optimizers with in-kernel mixed precision and bucketed allreduce",
    packages=find_packages(include=["fusedmf", "fusedmf.*"]) + ["fusedmf.triton_kernels"],
    package_dir={"fusedmf.triton_kernels": "triton_kernels"},
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch"],
    python_requires=">=3.9",
)
