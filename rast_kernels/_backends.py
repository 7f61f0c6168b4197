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


_cpp_error = None  # why rast_kernels._C did not import (set by cpp_module)


@functools.lru_cache(maxsize=None)
def cpp_module():
    """The compiled extension ``rast_kernels._C``, or None when it did not import (:func:`cpp_import_error` says
    why). ``cpp_module.cache_clear()`` makes the next call try again."""
    global _cpp_error
    try:
        mod = importlib.import_module("rast_kernels._C")
    except ImportError as exc:
        # not built (ModuleNotFoundError), or built but unloadable: an undefined symbol from another torch, a
        # missing CUDA runtime library... only the message tells them apart
        _cpp_error = f"{type(exc).__name__}: {exc}"
        return None
    _cpp_error = None
    return mod


def cpp_import_error():
    """Why ``rast_kernels._C`` did not import (the ImportError's type and message), or None when it did."""
    cpp_module()
    return _cpp_error


def cpp_unavailable_reason() -> str:
    """One line for a skip or an error message: ``rast_kernels._C`` did not import, and why."""
    why = cpp_import_error()
    return "rast_kernels._C imported" if why is None else f"rast_kernels._C did not import ({why})"


def has_cpp_cpu() -> bool:
    return cpp_module() is not None


def has_cpp_cuda() -> bool:
    mod = cpp_module()
    return mod is not None and bool(getattr(mod, "WITH_CUDA", False))


TRITON_OR_TORCH = ("auto", "triton", "torch")


def require_triton(device) -> None:
    """Raise ``ValueError`` (naming ``backend``) when Triton kernels cannot run on tensors on ``device``."""
    if not has_triton():
        raise ValueError("backend: 'triton' requested but Triton is not importable")
    if device.type == "cpu" and not triton_interpreting():
        raise ValueError("backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before Triton is imported")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend: 'triton' runs on CUDA (or CPU under the interpreter), the tensors are on {device}")


def resolve_triton_or_torch(backend, device) -> str:
    """The backend of an op with a Triton kernel and a PyTorch reference: ``"auto"`` is the kernel on CUDA
    and the reference elsewhere; ``"triton"`` also runs on CPU tensors under ``TRITON_INTERPRET=1``."""
    if backend not in TRITON_OR_TORCH:
        raise ValueError(f"backend: must be one of {TRITON_OR_TORCH}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and has_triton() else "torch"
    if backend == "triton":
        require_triton(device)
    return backend
