"""Argument checks shared by the ops; every error message starts with the argument's name."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def require_tensors(**named) -> None:
    """``TypeError`` naming the first argument that is not a ``torch.Tensor``."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def require_float(name: str, t: torch.Tensor) -> None:
    """``TypeError`` unless ``t`` is float32, bfloat16 or float16."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be float32, bfloat16 or float16, got {t.dtype}")


def require_like(name: str, t: torch.Tensor, shape, dtype: torch.dtype, device: torch.device) -> None:
    """``ValueError`` unless ``t`` has exactly this shape, dtype and device."""
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name}: expected a {dtype} tensor of shape {tuple(shape)} on {device}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
