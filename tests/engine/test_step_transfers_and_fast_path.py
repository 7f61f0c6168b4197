"""Two properties of step() a CPU can check: every host-to-device write goes through ``slot_state.upload`` (pinned,
non-blocking on CUDA, so step() never waits for the GPU; gpu_check.sh runs step() under
torch.cuda.set_sync_debug_mode("error") for the real thing), and a fast path that fails on first use says which part
failed and which setting runs without it."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from rast_kernels import RastEngine, SamplingParams
from rast_kernels.engine import fused_decode, runner, slot_state
from rast_kernels.engine.runner import FastPathError

from conftest import WIDTHS, make_model

CPU = "cpu"


@pytest.fixture(scope="module")
def trio():
    return [make_model("qwen2", w, s) for w, s in zip(WIDTHS.values(), (51, 52, 53))]


def _engine_caller() -> bool:
    """Whether the innermost frame outside torch belongs to the engine (transformers' own calls are not ours)."""
    frame = sys._getframe(2)
    while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
        frame = frame.f_back
    return frame is not None and f"rast_kernels{os.sep}engine{os.sep}" in frame.f_code.co_filename


class NoBlockingTransfers(TorchFunctionMode):
    """Fails when the engine's code calls ``torch.tensor(..., device=...)`` or ``Tensor.to`` / ``Tensor.cuda`` to a
    device without ``non_blocking=True`` (a host-to-device copy that would wait for the GPU), except inside
    ``upload``."""

    def __init__(self):
        super().__init__()
        self.allowed = 0
        self.uploads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.allowed and _engine_caller():
            name = getattr(func, "__name__", "")
            if name in ("tensor", "as_tensor") and kwargs.get("device") is not None:
                raise AssertionError(f"{name}(..., device=...) inside step(): use upload()")
            if name in ("to", "cuda") and not kwargs.get("non_blocking", False):
                if any(isinstance(a, (torch.device, str)) for a in args[1:]) or "device" in kwargs:
                    raise AssertionError(f"a blocking Tensor.{name} to a device inside step()")
        return func(*args, **kwargs)


@pytest.mark.parametrize("spec", [0, 2], ids=["plain", "speculative"])
@pytest.mark.parametrize("fused", [False, True], ids=["transformers_forward", "fused_decode"])
def test_step_writes_to_the_device_only_through_upload(trio, tokenizer, monkeypatch, fused, spec):
    engine = RastEngine(*trio, tokenizer=tokenizer, devices=CPU, max_batch_size=4, max_seq_len=64, block_size=4,
                        fused_decode=fused, speculative_tokens=spec)
    mode = NoBlockingTransfers()
    real = slot_state.upload

    def counted(host, device):
        mode.uploads += 1
        mode.allowed += 1
        try:
            return real(host, device)
        finally:
            mode.allowed -= 1

    monkeypatch.setattr(slot_state, "upload", counted)
    monkeypatch.setattr(runner, "upload", counted)
    ids = [engine.add_request(p, SamplingParams(temperature=1.0, max_new_tokens=3 + 4 * i, n=1 + i % 2, seed=i))
           for i, p in enumerate(["the quick brown fox", "héllo", "a stitch in time", "日本語"])]
    with mode:
        engine.step()
        assert engine.scheduler.slots[3] is not None and engine.scheduler.slots[3].request.request_id == ids[2]
        engine.abort_request(ids[2])  # a running row to deactivate
        while engine.has_unfinished_requests():
            engine.step()  # admissions, block growth, slot moves, finishes: every kind of host -> device write
    assert mode.uploads > 0


def test_a_failing_fused_forward_names_itself_and_the_setting_that_avoids_it(trio, tokenizer, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("triton.compiler.errors.CompilationError: at 12:4: simulated")

    monkeypatch.setattr(fused_decode, "add_rms_norm", broken)
    with pytest.raises(FastPathError, match=r"the fused decode forward failed on first use \(RuntimeError: "
                                            r"triton.compiler.errors.CompilationError.*fused_decode=False") as info:
        RastEngine(*trio, tokenizer=tokenizer, devices=CPU, max_seq_len=64, fused_decode=True)
    assert info.value.setting == "fused_decode=False"
    engine = RastEngine(*trio, tokenizer=tokenizer, devices=CPU, max_seq_len=64, fused_decode=False)
    assert engine.generate("the quick", max_new_tokens=4)[0].token_ids  # the named setting does run


def test_a_fast_path_that_fails_at_the_first_request_says_so_too(trio, tokenizer, monkeypatch):
    engine = RastEngine(*trio, tokenizer=tokenizer, devices=CPU, max_seq_len=64, fused_decode=True)

    def broken(*args, **kwargs):
        raise RuntimeError("an unsupported shape")

    monkeypatch.setattr(fused_decode, "silu_mul", broken)  # a decode key the build-time warm-up did not run
    with pytest.raises(FastPathError, match="fused_decode=False"):
        engine.generate("the quick", max_new_tokens=4)
