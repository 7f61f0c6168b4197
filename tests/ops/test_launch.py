"""Every Triton launch of the ops runs inside ``launch.on_device`` of its tensors (rast_kernels/ops/launch.py):
Triton launches on the current device and stream, so without it a model on a second GPU would launch its kernels
on the first. Checked on CPU: the helper is replaced by a recording wrapper and every kernel launch (Triton's
``run``, interpreted or compiled) records whether it happened inside it."""
import contextlib
import types

import pytest
import torch

from op_testing import DEVICE, needs_triton
from rast_kernels.ops import (add_rms_norm, decode_attention, launch, paged_decode_attention,
                              paged_multi_token_attention, rast_sample, rope_cache_write, silu_mul)


def test_on_device_is_a_null_context_on_cpu():
    assert isinstance(launch.on_device(torch.zeros(1)), contextlib.nullcontext)


def test_on_device_selects_the_tensors_cuda_device():
    # constructing torch.cuda.device needs no GPU; a stand-in with a CUDA device is enough
    ctx = launch.on_device(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1


@pytest.fixture
def launches(monkeypatch):
    """Records ``(kernel name, inside on_device, devices on_device was entered for)`` per kernel launch."""
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    real = launch.on_device
    state = dict(depth=0, devices=[])
    log = []

    @contextlib.contextmanager
    def recording(t):
        state["devices"].append(t.device)
        state["depth"] += 1
        try:
            with real(t):
                yield
        finally:
            state["depth"] -= 1

    def recorded(run):
        def wrapper(self, *args, **kwargs):
            log.append((self.fn.__name__, state["depth"] > 0))
            return run(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(launch, "on_device", recording)
    for cls in (interpreter.InterpretedFunction, jit.JITFunction):
        monkeypatch.setattr(cls, "run", recorded(cls.run))
    return types.SimpleNamespace(log=log, devices=state["devices"])


def _op_calls():
    """``(op name, call)`` running each op's Triton path once on tiny tensors, with the kernels it launches."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    x, r, w = randn(2, 16), randn(2, 16), randn(16)
    q3, k, v, cos, sin = randn(2, 4, 8), randn(2, 2, 8), randn(2, 2, 8), randn(2, 8), randn(2, 8)
    cache_k, cache_v = randn(2, 2, 5, 8), randn(2, 2, 5, 8)
    col = torch.tensor([1, 3], device=DEVICE)
    qa, kc, vc = randn(2, 4, 16), randn(2, 2, 20, 16), randn(2, 2, 20, 16)
    start, end = torch.tensor([0, 2], device=DEVICE), torch.tensor([20, 9], device=DEVICE)
    pool_k, pool_v = randn(6, 4, 2, 16), randn(6, 4, 2, 16)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([11, 5], device=DEVICE)
    q4 = randn(2, 3, 4, 16)
    return [
        ("add_rms_norm", lambda: add_rms_norm(x, w, 1e-6, r, backend="triton")),
        ("rope_cache_write", lambda: rope_cache_write(q3, k, v, cos, sin, cache_k, cache_v, col, backend="triton")),
        ("silu_mul", lambda: silu_mul(x, r, backend="triton")),
        ("decode_attention", lambda: decode_attention(qa, kc, vc, start, end, backend="triton", num_splits=2)),
        ("paged_decode_attention",
         lambda: paged_decode_attention(qa, pool_k, pool_v, table, lens, backend="triton", num_splits=2)),
        ("paged_multi_token_attention",
         lambda: paged_multi_token_attention(q4, pool_k, pool_v, table, lens, backend="triton", num_splits=2)),
        ("rast_sample", lambda: rast_sample(randn(2, 40), randn(2, 40), randn(2, 40), alpha=0.5, top_p=0.9,
                                            seed=torch.tensor([1, 2], device=DEVICE), backend="triton")),
    ]


@needs_triton
@pytest.mark.parametrize("name,call", _op_calls(), ids=[name for name, _ in _op_calls()])
def test_every_launch_runs_inside_on_device(launches, name, call):
    call()
    assert launches.log, f"{name} launched no kernel"
    outside = [kernel for kernel, inside in launches.log if not inside]
    assert not outside, f"{name} launched {outside} outside launch.on_device"
    assert launches.devices and all(d.type == DEVICE for d in launches.devices)  # entered for the op's tensors
    if "attention" in name:  # two splits: the split kernel and the combine, both inside
        assert len(launches.log) == 2, launches.log
