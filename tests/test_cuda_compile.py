"""Compile-only check of the CUDA sources (csrc/cuda/*.cu) with nvcc for sm_90, against the
installed torch's headers, with the flags torch.utils.cpp_extension gives a real build.

It needs nvcc, not a GPU: a syntax or template error in a kernel fails here (and in CI)
instead of on the first GPU machine. Skipped when nvcc is missing. Running the kernels is
tests/test_ops_* (the "cuda" backend joins their grids when a GPU is present).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()


def _cuda_include() -> Path:
    """CUDA's include dir: beside nvcc's real location (it may be a symlink in /usr/local/bin)."""
    return Path(os.path.realpath(NVCC)).parent.parent / "include"


def nvcc_command(source: Path, output: Path, arch: str = "sm_90"):
    torch_include = Path(torch.__file__).parent / "include"
    return [
        NVCC, "-c", str(source), "-o", str(output), f"-arch={arch}", "-O1", "-std=c++20",
        "-I", str(torch_include), "-I", str(torch_include / "torch" / "csrc" / "api" / "include"),
        "-I", str(_cuda_include()), "-I", sysconfig.get_paths()["include"],
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DUNIREP_WITH_CUDA",
        # A CPU build of torch ships c10/cuda's headers without the file CMake generates for
        # them (export macros only); this define skips it, as torch's HIP build does.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        *cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC",
        "-Werror", "all-warnings",
    ]


def test_every_op_has_a_cuda_source():
    names = {p.stem for p in CUDA_SOURCES}
    assert {"domain_batch_norm_kernel", "domain_instance_norm_kernel"} <= names, names
    for p in CUDA_SOURCES:
        assert "TORCH_LIBRARY_IMPL(unirep, CUDA" in p.read_text(), f"{p.name} registers no CUDA kernels"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_cuda_sources_compile_for_sm90(tmp_path):
    def compile_one(source: Path):
        cmd = nvcc_command(source, tmp_path / (source.stem + ".o"))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return source, proc

    with ThreadPoolExecutor(max_workers=max(1, min(len(CUDA_SOURCES), os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_one, CUDA_SOURCES))
    failures = [f"{src.name}:\n{proc.stderr[-4000:]}" for src, proc in results if proc.returncode != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    for src, _ in results:
        assert (tmp_path / (src.stem + ".o")).stat().st_size > 0


if __name__ == "__main__":  # print the command, for running nvcc by hand
    for src in CUDA_SOURCES:
        print(" ".join(nvcc_command(src, Path("/tmp") / (src.stem + ".o"))), file=sys.stdout)
