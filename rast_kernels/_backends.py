"""Which backends this installation has: Triton, the compiled extension's CPU and CUDA kernels."""
from __future__ import annotations

import functools
import importlib
import os


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def cpp_module():
    """The compiled extension ``rast_kernels._C``, or None when it is not built."""
    try:
        return importlib.import_module("rast_kernels._C")
    except ImportError:
        return None


def has_cpp_cpu() -> bool:
    return cpp_module() is not None


def has_cpp_cuda() -> bool:
    mod = cpp_module()
    return mod is not None and bool(getattr(mod, "WITH_CUDA", False))
