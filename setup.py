"""Builds unirep_kernels._C from csrc/ with torch.utils.cpp_extension.

CPU kernels are always compiled; CUDA kernels (csrc/cuda/*.cu) only when the installed torch
has CUDA and CUDA_HOME is found. Environment overrides: UNIREP_FORCE_CUDA=1 builds them
anyway (e.g. on a machine without a GPU but with nvcc), UNIREP_NO_CUDA=1 never does.
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("UNIREP_NO_CUDA"):
        return False
    if _flag("UNIREP_FORCE_CUDA"):
        return True
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    # torch 2.13 headers expect C++20. No FMA contraction: the backward's ReLU gate must
    # recompute exactly the forward's pre-activation (csrc/cpu/pass_kernels.h). The vector
    # helpers there pass 32- and 64-byte vectors between internal functions, which makes
    # GCC print an ABI note (-Wpsabi) that concerns only exported functions.
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=off", "-Wno-psabi"]
    macros = []
    if _want_cuda() and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        macros.append(("UNIREP_WITH_CUDA", None))
        return [cpp_extension.CUDAExtension(
            "unirep_kernels._C", sources + cuda_sources, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},  # lineinfo: compute-sanitizer
            extra_link_args=["-fopenmp"])]
    return [cpp_extension.CppExtension(
        "unirep_kernels._C", sources, define_macros=macros,
        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
