"""Where the ops' Triton kernels launch: on their tensors' device.

Triton launches a kernel on the *current* CUDA device and that device's current stream, not on the device of the
tensors it is given. With models on two GPUs (``devices={"expert": "cuda:1"}``) a launch for ``cuda:1`` tensors
while ``cuda:0`` is current would run on the wrong device (an illegal address) or unordered against the tensors'
stream. Invariant: every Triton launch of :mod:`rast_kernels.ops` runs inside :func:`on_device` of the tensors it
reads (all of an op's tensors are checked to share one device before), so it runs on their device and on that
device's current stream, whatever device is current at the call.
"""
from __future__ import annotations

import contextlib

import torch


def on_device(tensor: torch.Tensor):
    """The context to launch a Triton kernel for ``tensor`` in: ``torch.cuda.device(tensor.device)`` for a CUDA
    tensor (it makes the tensor's device current, and with it that device's current stream), else a
    ``contextlib.nullcontext()`` (CPU tensors under the Triton interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
