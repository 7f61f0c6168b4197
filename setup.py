"""Builds rast_kernels._C with CMake (CMakeLists.txt); metadata lives in pyproject.toml.

Build against the torch that is already installed: ``pip install --no-build-isolation -e .`` (or ``.``).
The CUDA sources are compiled when torch is a CUDA build and ``nvcc`` is found; otherwise the CPU kernels
only. Environment knobs: ``RAST_KERNELS_NO_CUDA=1`` (CPU only), ``TORCH_CUDA_ARCH_LIST`` (e.g. "9.0;10.0"),
``MAX_JOBS`` (parallel compile jobs), ``RAST_KERNELS_DEBUG=1`` (debug build),
``RAST_KERNELS_ALLOW_NO_EXT=1`` (a failed build installs the package without ``_C`` instead of failing).
A failed CUDA build falls back to the CPU kernels with a warning (``tests/test_build.py`` then fails).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

NO_TORCH_MESSAGE = ("rast_kernels: build with `pip install --no-build-isolation .` (torch must be importable at "
                    "build time; install torch first)")


def torch_build_problem() -> str | None:
    """The one-line reason this build cannot work, or None.

    The extension compiles against the installed torch, which pyproject.toml deliberately does not list
    as a build requirement (an isolated build would download a second, multi-GB torch). So under pip's
    default build isolation torch is missing here; saying so at once beats a long traceback from
    setuptools later. ``RAST_KERNELS_ALLOW_NO_EXT=1`` opts into a pure-Python install instead."""
    if os.environ.get("RAST_KERNELS_ALLOW_NO_EXT", "0") not in ("", "0"):
        return None
    import importlib.util

    try:
        found = importlib.util.find_spec("torch") is not None  # finds, does not import (seconds)
    except (ImportError, ValueError):
        found = False
    return None if found else NO_TORCH_MESSAGE


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles (setuptools only sees an empty source list)."""

    def __init__(self, name: str, sourcedir: Path = ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


def _find_tool(name: str, module_dir_attr: tuple[str, str] | None = None) -> str | None:
    """An executable on PATH, beside this interpreter (a venv run by full path), or in its pip package."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found or module_dir_attr is None:
        return found
    try:
        module = __import__(module_dir_attr[0])
        candidate = Path(getattr(module, module_dir_attr[1])) / name
        return str(candidate) if candidate.is_file() else None
    except (ImportError, AttributeError, TypeError):
        return None


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _cuda_archs(torch, nvcc: str) -> str:
    """sm_90 (Hopper) plus the archs torch was built for, limited to what this nvcc can compile."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        archs = {a.replace(".", "").replace("+PTX", "") for a in re.split(r"[;\s,]+", env.strip()) if a}
    else:
        archs = {"90"}
        try:
            archs |= {f[3:] for f in torch._C._cuda_getArchFlags().split() if f.startswith("sm_")}
        except Exception:  # older torch or no arch flags: Hopper only
            pass
    try:
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
        supported = {m for m in re.findall(r"compute_(\d+)", listed)}
        archs = {a for a in archs if a.rstrip("af") in supported} or {"90"}
    except (OSError, subprocess.CalledProcessError):
        pass
    return ";".join(sorted(archs, key=lambda a: (int(a.rstrip("af")), a)))


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        try:
            self._build_cmake(ext)
        except (subprocess.CalledProcessError, RuntimeError) as exc:
            if os.environ.get("RAST_KERNELS_ALLOW_NO_EXT", "0") in ("", "0"):
                raise
            # opt-in: install the pure-Python package (the "torch"/"triton" backends still work)
            print(f"rast_kernels: WARNING: rast_kernels._C was not built ({exc}); installing without it",
                  flush=True)

    def _build_cmake(self, ext: "CMakeExtension") -> None:
        try:
            import torch
        except ImportError as exc:
            raise RuntimeError("rast_kernels: building needs torch installed; "
                               "install it first and use `pip install --no-build-isolation ...`") from exc
        import pybind11

        # the folder setuptools expects the module in (the source tree for editable installs)
        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        debug = self.debug or os.environ.get("RAST_KERNELS_DEBUG", "0") not in ("", "0")

        nvcc = _find_nvcc()
        with_cuda = bool(torch.version.cuda) and nvcc is not None and \
            os.environ.get("RAST_KERNELS_NO_CUDA", "0") in ("", "0")
        cmake = _find_tool("cmake", ("cmake", "CMAKE_BIN_DIR"))
        if cmake is None:
            raise RuntimeError("rast_kernels: building needs CMake >= 3.18 (pip install cmake)")
        ninja = _find_tool("ninja", ("ninja", "BIN_DIR"))
        # Ninja when available (fast, parallel by default), else CMake's default generator
        generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
        args = [
            *generator,
            f"-DCMAKE_BUILD_TYPE={'Debug' if debug else 'Release'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DRAST_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DRAST_CUDA_ARCHS={_cuda_archs(torch, nvcc)}"]
        else:
            print("rast_kernels: building CPU kernels only (no CUDA toolkit / CPU-only torch)", flush=True)
        build = ["--build", "."]
        if os.environ.get("MAX_JOBS") or not ninja:
            build += ["--parallel", os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)]
        try:
            subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
            subprocess.run([cmake, *build], cwd=build_temp, check=True)
        except subprocess.CalledProcessError:
            if not with_cuda:
                raise
            # keep the CPU kernels installable; tests/test_build.py fails on such a build (CUDA expected)
            print("rast_kernels: WARNING: the CUDA build failed (see above); building CPU kernels only",
                  flush=True)
            shutil.rmtree(build_temp)
            build_temp.mkdir(parents=True)
            args = [a for a in args if not a.startswith(("-DRAST_WITH_CUDA=", "-DCMAKE_CUDA_COMPILER=",
                                                          "-DRAST_CUDA_ARCHS="))] + ["-DRAST_WITH_CUDA=OFF"]
            subprocess.run([cmake, ext.sourcedir, *args], cwd=build_temp, check=True)
            subprocess.run([cmake, *build], cwd=build_temp, check=True)


if __name__ == "__main__":  # setuptools.build_meta and `python setup.py` both run it as __main__; a test imports it
    _problem = torch_build_problem()
    if _problem:
        sys.exit(_problem)  # one line on stderr, exit status 1
    setup(ext_modules=[CMakeExtension("rast_kernels._C")], cmdclass={"build_ext": CMakeBuild})
