"""Graph safety without a GPU: the engine's decode step must never read a device value on the host or produce a
data-dependent shape (either would break or stall CUDA-graph capture). The step runs on CPU under a
``TorchDispatchMode`` that fails on such ops; later engine changes must keep passing this.

One exemption: the argument checks of the ops (functions named ``_check*`` in ``rast_kernels/ops/``) may read
CPU tensors' values (e.g. ``rope_cache_write`` range-checks ``col`` on CPU), because they skip that for CUDA
tensors; on a GPU, ``tests/engine/test_engine_cuda.py`` runs the same step under CUDA's sync-debug mode."""
from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rast_kernels import RastEngine, SamplingParams

from conftest import WIDTHS, make_model

_HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "tolist"}
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                   "repeat_interleave", "argwhere"}


def _in_cpu_only_check() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if "rast_kernels/ops/" in code.co_filename.replace("\\", "/") and code.co_name.startswith("_check"):
            return True
        frame = frame.f_back
    return False


class NoHostSync(TorchDispatchMode):
    """Raises on ops that read device values to the host or whose output shape depends on the data; records every
    op name it sees (so the test can check the step really ran through it)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.seen.add(name)
        if name in _HOST_READS and _in_cpu_only_check():
            return func(*args, **kwargs)
        if name in _HOST_READS or name in _DATA_DEPENDENT:
            raise AssertionError(f"{func}: reads a device value on the host or has a data-dependent shape")
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool
                for t in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])):
            raise AssertionError(f"{func}: boolean-mask indexing has a data-dependent shape")
        return func(*args, **kwargs)


def _running_engine(tokenizer, pairs=1, plausibility=0.0, **kw):
    models = [make_model("qwen2", w, s) for w, s in zip(WIDTHS.values(), (21, 22, 23))]
    if pairs == 1:
        args = models
    else:  # two pairs of different widths (a second pair: the expert base against the expert)
        args = (models[0], [models[1], models[2]], [models[2], models[1]])
    engine = RastEngine(*args, tokenizer=tokenizer, devices="cpu", max_batch_size=4, max_seq_len=64, block_size=4,
                        **kw)
    for i, p in enumerate(["the quick", "héllo wörld", "a"]):
        engine.add_request(p, SamplingParams(temperature=(1.0, 0.0, 0.8)[i], top_p=0.9, top_k=(0, 5, 0)[i],
                                             max_new_tokens=20, eos_token_id=[], seed=i,
                                             alpha=1.0 if pairs == 1 else (0.5, -0.25), base_plausibility=plausibility))
    engine.step()  # admits and prefills (eager, host-driven: allowed to read the host)
    engine.step()
    assert engine.scheduler.num_running == 3
    return engine


@pytest.mark.parametrize("pairs,plausibility", [(1, 0.0), (2, 0.1)], ids=["one_pair", "two_pairs_plausibility"])
@pytest.mark.parametrize("fused", [False, True], ids=["transformers_forward", "fused_decode"])
def test_decode_step_has_no_host_reads(fused, pairs, plausibility, tokenizer):
    engine = _running_engine(tokenizer, pairs, plausibility, fused_decode=fused)
    runner = engine.runner
    before = runner.state.n_gen.clone()
    mode = NoHostSync()
    with torch.no_grad(), mode:
        runner.step_rows(4, 64, plausibility > 0)  # a padded bucket: row 3 is an empty, inert slot
    assert (runner.state.n_gen[:3] == before[:3] + 1).all() and runner.state.n_gen[3] == before[3]
    assert {"index_put_", "where"} <= mode.seen  # the bookkeeping (ring writes, masks) ran under the mode


def test_the_mode_catches_host_reads():
    with pytest.raises(AssertionError, match="_local_scalar_dense"):
        with NoHostSync():
            torch.ones(3).sum().item()
    with pytest.raises(AssertionError, match="nonzero"):
        with NoHostSync():
            torch.ones(3).nonzero()


@pytest.mark.parametrize("fused", [False, True], ids=["transformers_forward", "fused_decode"])
def test_a_speculative_round_has_no_host_reads(fused, tokenizer):
    """A speculative round (k drafts, the verify pass, one sampler call over every position, the commit) is captured
    as one graph on CUDA: the same rules as a plain step."""
    models = [make_model("qwen2", w, s) for w, s in zip(WIDTHS.values(), (1, 2, 3))]
    engine = RastEngine(*models, tokenizer=tokenizer, devices="cpu", max_batch_size=4, max_seq_len=128, block_size=4,
                        fused_decode=fused, speculative_tokens=3)
    for i, p in enumerate(["the quick", "héllo wörld", "a"]):
        engine.add_request(p, SamplingParams(temperature=(1.0, 0.0, 0.8)[i], top_p=0.9, max_new_tokens=80,
                                             eos_token_id=[], seed=i))
    engine.step()  # admits, prefills (host-driven) and runs a first window
    assert engine.scheduler.num_running == 3
    runner = engine.runner
    before = runner.state.n_gen.clone()
    mode = NoHostSync()
    with torch.no_grad(), mode:
        runner.step_rows(4, 64, False)
    kept = runner.state.n_gen[:3] - before[:3]
    assert ((kept >= 1) & (kept <= 4)).all() and runner.state.n_gen[3] == before[3]
    assert {"cumprod", "index_put_", "gather"} <= mode.seen
