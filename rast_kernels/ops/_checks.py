"""Argument checks shared by the ops; every error message starts with the argument's name."""
from __future__ import annotations

import math
import numbers

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


def attention_options(q: torch.Tensor, scale, num_splits, out, max_splits: int):
    """The decode-attention ops' common options, checked: ``(scale as a float, default D ** -0.5; num_splits as an
    int in [1, max_splits] or None)``; ``out``, when given, must be exactly like ``q``."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    elif not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: must be a finite number > 0, got {scale!r}")
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
            raise TypeError(f"num_splits: expected an int or None, got {type(num_splits).__name__}")
        if not 1 <= num_splits <= max_splits:
            raise ValueError(f"num_splits: must be in [1, {max_splits}], got {num_splits}")
        num_splits = int(num_splits)
    if out is not None:
        require_tensors(out=out)
        require_like("out", out, q.shape, q.dtype, q.device)
    return float(scale), num_splits
