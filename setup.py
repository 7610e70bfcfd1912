"""Build step for the custom-op library; all other metadata lives in pyproject.toml.

``build_ext`` configures and builds custom_ops/ with CMake (Release, Ninja when available) and puts the
shared library next to ``optimum/adaround/custom_ops/__init__.py``: into the wheel's package folder, or
into custom_ops/python/ for editable installs (``pip install -e .``). The library does not link against
Python or onnxruntime, so one build serves every interpreter.

Environment: ``OPTIMUM_ADAROUND_CUDA=ON|OFF|AUTO`` (CUDA kernels: AUTO builds them when nvcc is found;
they add about a minute of nvcc time for sm_80 + sm_90 + PTX), ``OPTIMUM_ADAROUND_CUDA_ARCHS`` (CMake CUDA
architectures), ``CMAKE_BUILD_PARALLEL_LEVEL``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LIB_NAMES = {"win32": "optimum_adaround_ops.dll", "darwin": "liboptimum_adaround_ops.dylib"}
LIB_NAME = LIB_NAMES.get(sys.platform, "liboptimum_adaround_ops.so")


def _tool(name: str, module: str, attr: str) -> str | None:
    """A build tool from PATH, else from its PyPI wrapper package (build requirements cmake/ninja)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        mod = __import__(module)
        candidate = Path(getattr(mod, attr)) / name
        return str(candidate) if candidate.exists() else None
    except (ImportError, AttributeError):
        return None


class CMakeExtension(Extension):
    """The custom-op library: built by CMake, not by distutils (no sources of its own here)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        # The loader looks for the plain library name (it is not a Python extension module).
        return os.path.join(*fullname.split(".")[:-1], LIB_NAME)

    def build_extension(self, ext: Extension) -> None:
        cmake = _tool("cmake", "cmake", "CMAKE_BIN_DIR")
        if cmake is None:
            raise RuntimeError("building the custom-op library needs CMake >= 3.18 (pip install cmake)")
        build_dir = Path(self.build_temp).resolve() / "custom_ops"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"]
        ninja = _tool("ninja", "ninja", "BIN_DIR")
        if ninja is not None and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.run(args, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        built = build_dir / "custom_ops" / LIB_NAME
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target)


setup(
    ext_modules=[CMakeExtension("optimum.adaround.custom_ops.liboptimum_adaround_ops")],
    cmdclass={"build_ext": CMakeBuild},
)
