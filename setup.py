"""Builds the optional native extension `nvlm_kernels._C` from csrc/ through CMake.

Install with torch already present:  pip install --no-build-isolation -e .

Switches (environment variables):
  NVLM_KERNELS_SKIP_NATIVE=1   build no extension (the torch and triton backends still work)
  NVLM_KERNELS_FORCE_CUDA=1    compile the CUDA sources even without a GPU (needs a CUDA build of
                               torch to link, and nvcc)
  NVLM_KERNELS_CUDA_ARCHS      CUDA architectures, CMake style (default "80;90")
  MAX_JOBS                     parallel compile jobs (default: the number of cores)
  NVLM_KERNELS_BUILD_TYPE      CMake build type (default Release)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _import_torch():
    try:
        import torch
    except ImportError:
        sys.exit(
            "nvlm: torch must be installed before this package is built, because the native "
            "extension compiles against it.\n"
            "  CPU machine:  pip install torch==2.13.0   (or any torch >= 2.8)\n"
            "  then:         pip install --no-build-isolation -e .\n"
            "To install without the extension, set NVLM_KERNELS_SKIP_NATIVE=1 "
            "(torch is still needed at run time)."
        )
    return torch


def _load_toolchain():
    """nvlm_kernels/_toolchain.py by path: importing the package here would need it built."""
    spec = importlib.util.spec_from_file_location("_nvlm_toolchain",
                                                  ROOT / "nvlm_kernels" / "_toolchain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        torch = _import_torch()
        import pybind11

        toolchain = _load_toolchain()
        nvcc = toolchain.find_nvcc()
        force_cuda = _env_flag("NVLM_KERNELS_FORCE_CUDA")
        with_cuda = force_cuda or (torch.version.cuda is not None and nvcc is not None)
        if with_cuda and torch.version.cuda is None:
            sys.exit(
                "nvlm: NVLM_KERNELS_FORCE_CUDA=1 needs a CUDA build of torch to link the CUDA "
                f"extension, but torch {torch.__version__} is a CPU build. To compile-check the "
                "CUDA kernels without it, run: pytest tests/test_compile_gate.py -k nvcc"
            )
        if with_cuda and nvcc is None:
            sys.exit("nvlm: the CUDA extension was requested but nvcc was not found "
                     "(set CUDA_HOME or put nvcc on PATH).")

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)

        from torch.utils import cpp_extension

        cmake_args = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('NVLM_KERNELS_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_PREFIX_PATH={pybind11.get_cmake_dir()}",
            f"-DNVLM_TORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
            f"-DNVLM_TORCH_LIBRARY_DIR={cpp_extension.library_paths()[0]}",
            f"-DNVLM_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DNVLM_OUTPUT_DIR={out_path.parent}",
            f"-DNVLM_OUTPUT_NAME={out_path.name}",
            f"-DNVLM_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if shutil.which("ninja"):
            cmake_args.append("-GNinja")
        if with_cuda:
            archs = os.environ.get("NVLM_KERNELS_CUDA_ARCHS", "80;90")
            cmake_args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
            cutlass = toolchain.cutlass_include_dir()
            if cutlass is None:
                sys.exit("nvlm: the CUDA extension needs the CUTLASS headers: "
                         "pip install nvidia-cutlass")
            cmake_args.append(f"-DNVLM_CUTLASS_INCLUDE_DIR={cutlass}")

        # the cmake next to this Python (pip's `cmake` package) before the system one
        local_cmake = Path(sys.executable).parent / "cmake"
        cmake = str(local_cmake) if local_cmake.exists() else "cmake"
        print(f"nvlm: building nvlm_kernels._C (CUDA: {with_cuda}) in {build_dir}", flush=True)
        subprocess.check_call([cmake, str(ROOT), *cmake_args], cwd=build_dir)
        subprocess.check_call([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir)


ext_modules = [] if _env_flag("NVLM_KERNELS_SKIP_NATIVE") else [CMakeExtension("nvlm_kernels._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
