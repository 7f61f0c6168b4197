"""KV pool sizing from a measured peak (rast_kernels.engine.memory), checked on CPU with fake memory counters."""
from __future__ import annotations

import pytest

from rast_kernels import RastEngine
from rast_kernels.engine import build, memory
from rast_kernels.params import ParamError

from conftest import WIDTHS, make_model

GIB = 1 << 30


class FakeProbe:
    """``total`` / ``free`` bytes and a peak per profiling phase (prefill, decode), in the order they are read."""

    def __init__(self, total, free, peaks):
        self.total, self.free, self.peaks, self.resets = total, free, list(peaks), 0

    def mem_get_info(self):
        return self.free, self.total

    def reset_peak(self):
        self.resets += 1

    def peak(self):
        return self.peaks.pop(0)


def test_the_arithmetic():
    tokens, budget = memory.pool_tokens(total=80 * GIB, free=60 * GIB, utilization=0.9, peak=3 * GIB,
                                        graph_reserve=GIB, per_token_bytes=1 << 20, block_size=16, cap=1 << 30)
    assert budget == int(80 * GIB * 0.9) - 20 * GIB - 3 * GIB - GIB - memory.GPU_MARGIN_BYTES
    assert tokens == budget // (1 << 20) // 16 * 16 and tokens % 16 == 0
    assert memory.pool_tokens(80 * GIB, 60 * GIB, 0.9, 3 * GIB, GIB, 1 << 20, 16, cap=1000)[0] == 1000
    assert memory.pool_tokens(80 * GIB, 10 * GIB, 0.9, 3 * GIB, GIB, 1 << 20, 16, cap=1000)[0] == 0  # no room


@pytest.fixture(scope="module")
def trio():
    return [make_model("qwen2", w, s) for w, s in zip(WIDTHS.values(), (41, 42, 43))]


def test_the_engine_sizes_its_pool_from_the_measured_peak(trio, tokenizer, monkeypatch):
    per_token = 3 * 2 * 2 * 2 * 8 * 4  # three models x (K, V) x 2 layers x 2 KV heads x head dim 8 x fp32
    free = GIB
    peaks = [5 << 20, 7 << 20]  # what the fake reports for the prefill chunk, then the decode step
    fake = FakeProbe(total=GIB, free=free, peaks=peaks)
    monkeypatch.setattr(build, "probe", lambda device: fake)
    # utilization chosen so the budget holds 100 tokens and a bit: the pool is 96 (six blocks of 16)
    budget = 100 * per_token + 50
    util = (budget + (7 << 20) + memory.GPU_MARGIN_BYTES) / GIB
    engine = RastEngine(*trio, tokenizer=tokenizer, devices="cpu", max_seq_len=64, max_batch_size=4,
                        gpu_memory_utilization=util)
    s = engine.pool_sizing
    assert fake.resets == 2 and (s.prefill_peak, s.decode_peak) == (5 << 20, 7 << 20)  # both phases ran
    assert s.source == "measured" and s.per_token_bytes == per_token and s.graph_reserve == 0  # no graphs on CPU
    assert abs(s.budget - budget) <= 1 and engine.kv_cache_tokens == s.tokens == 96
    assert engine.allocator.num_blocks == 6
    out = engine.generate(["the quick brown fox", "héllo"], max_new_tokens=8, temperature=0.0)
    assert all(len(o.token_ids) > 0 for o in out)


def test_no_room_is_a_clear_error(trio, tokenizer, monkeypatch):
    monkeypatch.setattr(build, "probe", lambda device: FakeProbe(total=GIB, free=GIB // 10, peaks=[0, 0]))
    with pytest.raises(ParamError, match="kv_cache_tokens: no room for a KV pool") as info:
        RastEngine(*trio, tokenizer=tokenizer, devices="cpu", max_seq_len=64)
    assert info.value.param == "kv_cache_tokens"


def test_a_given_pool_is_not_measured(trio, tokenizer, monkeypatch):
    monkeypatch.setattr(build, "probe", lambda device: pytest.fail("measured although kv_cache_tokens was given"))
    engine = RastEngine(*trio, tokenizer=tokenizer, devices="cpu", max_seq_len=64, kv_cache_tokens=80)
    assert engine.pool_sizing.source == "given" and engine.kv_cache_tokens == 80
