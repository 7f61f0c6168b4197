"""The serving-grade engine on CPU: continuous batching, paged KV, n samples, per-request settings, preemption.

Every check compares against an independent run: a solo run (one request alone in a roomy engine), or full-sequence
forwards without a cache plus the sampler's PyTorch reference with the documented seed and offset.
"""
from __future__ import annotations

import random

import pytest
import torch

from rast_kernels import RastEngine, SamplingParams, rast_sample_reference
from rast_kernels.engine import mix_seed, sample_seed

from conftest import PROMPTS, WIDTHS, make_model

CPU = "cpu"


@pytest.fixture(scope="module")
def trio():
    return [make_model("qwen2", w, s) for w, s in zip(WIDTHS.values(), (11, 12, 13))]


@pytest.fixture(scope="module")
def solo(trio, tokenizer):
    """A roomy engine that runs each request alone (the reference runs)."""
    return RastEngine(*trio, tokenizer=tokenizer, max_batch_size=1, max_seq_len=128, devices=CPU)


def _engine(trio, tokenizer, **kw):
    kw.setdefault("max_seq_len", 128)
    return RastEngine(*trio, tokenizer=tokenizer, devices=CPU, **kw)


def _settings(i):
    """Per-request settings that differ from request to request."""
    return SamplingParams(alpha=(0.5, 1.0, 1.5)[i % 3], temperature=(1.0, 0.7, 1.3, 0.0)[i % 4],
                          top_p=(1.0, 0.9)[i % 2], top_k=(0, 20)[(i // 2) % 2], max_new_tokens=6 + 3 * (i % 5),
                          eos_token_id=[], seed=1000 + i)


def _solo_tokens(solo, prompt, params):
    (out,) = solo.generate(prompt, params)
    return out.token_ids


def test_sampled_output_equals_full_forwards_and_the_reference_sampler(trio, tokenizer):
    """The engine's sampled tokens equal a loop of full-sequence forwards (no cache) + rast_sample_reference with
    Philox seed sample_seed(seed, j) and offset = the token's index (a stale offset or seed changes them)."""
    engine = _engine(trio, tokenizer, max_batch_size=4, block_size=5)
    params = SamplingParams(alpha=0.7, temperature=1.0, top_p=0.9, max_new_tokens=10, eos_token_id=[], n=2, seed=77)
    outs = engine.generate(PROMPTS[:2], params)
    V = len(tokenizer)
    for out in outs:
        seq = list(tokenizer(PROMPTS[out.prompt_index])["input_ids"])
        philox = sample_seed(77, out.sample_index)
        want = []
        with torch.no_grad():
            for t in range(10):
                x = torch.tensor([seq])
                zb, ze, zeb = (m(input_ids=x, use_cache=False).logits[:, -1, :] for m in trio)
                tok = int(rast_sample_reference(zb, ze, zeb, alpha=0.7, temperature=1.0, top_p=0.9, vocab_size=V,
                                                seed=torch.tensor([philox]), offset=torch.tensor([t]))[0])
                want.append(tok)
                seq.append(tok)
        assert out.token_ids == want
    assert outs[0].token_ids != outs[1].token_ids  # the two samples draw from their own streams


def test_requests_equal_solo_runs_whatever_the_arrival_order_batch_and_blocks(trio, tokenizer, solo):
    reqs = [(PROMPTS[i], _settings(i)) for i in range(len(PROMPTS))]
    want = [_solo_tokens(solo, p, s) for p, s in reqs]
    rng = random.Random(3)
    for max_batch, block_size in ((3, 16), (8, 1), (5, 7)):
        engine = _engine(trio, tokenizer, max_batch_size=max_batch, block_size=block_size)
        order = list(range(len(reqs)))
        rng.shuffle(order)
        got = {}
        ids = {}
        for k, i in enumerate(order):  # requests arrive while others run
            ids[engine.add_request(*reqs[i])] = i
            if k % 3 == 2:
                for out in engine.step():
                    if out.finished:
                        got[ids[out.request_id]] = out.token_ids
        for out in engine.run():
            got[ids[out.request_id]] = out.token_ids
        assert [got[i] for i in range(len(reqs))] == want, (max_batch, block_size)
        assert engine.allocator.num_free == engine.allocator.num_blocks


def test_tiny_pool_waits_and_preempts_without_changing_tokens(trio, tokenizer, solo):
    short = [p for p in PROMPTS if len(tokenizer(p)["input_ids"]) <= 12]
    reqs = [(short[i % len(short)], SamplingParams(temperature=1.0, max_new_tokens=24, eos_token_id=[],
                                                   seed=50 + i)) for i in range(10)]
    want = [_solo_tokens(solo, p, s) for p, s in reqs]
    # 6 blocks of 8 slots: two or three sequences fit at once; growth forces preemptions
    engine = _engine(trio, tokenizer, max_batch_size=4, block_size=8, kv_cache_tokens=48)
    ids = {engine.add_request(p, s): i for i, (p, s) in enumerate(reqs)}
    got, preempted = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[ids[out.request_id]] = out.token_ids
        preempted = max(preempted, sum(s.preemptions for s in engine.scheduler.running + list(engine.scheduler.waiting)))
    assert preempted > 0, "the pool was meant to force preemptions"
    assert [got[i] for i in range(len(reqs))] == want
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_padding_rows_never_write_into_reused_blocks(trio, tokenizer, solo):
    """Rows padded into a batch bucket (what the CUDA graphs run; forced here on CPU) are empty slots whose block
    tables still name blocks that other sequences got since: they must write nowhere (the scratch slot)."""
    reqs = [(PROMPTS[i % 5], SamplingParams(temperature=1.0, max_new_tokens=(4, 30, 9, 17, 25)[i % 5],
                                            eos_token_id=[], seed=300 + i)) for i in range(12)]
    want = [_solo_tokens(solo, p, s) for p, s in reqs]
    engine = _engine(trio, tokenizer, max_batch_size=5, block_size=4, kv_cache_tokens=96)
    engine.pad_to_buckets = True  # 3 running rows run as a bucket of 4, 5 as 8 (capped at 5): padding rows
    ids = {engine.add_request(p, s): i for i, (p, s) in enumerate(reqs)}
    got = {ids[o.request_id]: o.token_ids for o in engine.run()}
    assert [got[i] for i in range(len(reqs))] == want
    assert engine.allocator.num_used == 0


def test_n_samples_equal_their_solo_reproduction(trio, tokenizer, solo):
    params = SamplingParams(temperature=1.0, top_k=30, max_new_tokens=9, eos_token_id=[], n=5, seed=123)
    engine = _engine(trio, tokenizer, max_batch_size=3, block_size=4)
    outs = engine.generate([PROMPTS[0], PROMPTS[2]], params)
    assert [(o.prompt_index, o.sample_index) for o in outs] == [(p, j) for p in range(2) for j in range(5)]
    for o in outs:
        alone = SamplingParams(temperature=1.0, top_k=30, max_new_tokens=9, eos_token_id=[],
                               seed=sample_seed(123, o.sample_index))
        assert o.token_ids == _solo_tokens(solo, [PROMPTS[0], PROMPTS[2]][o.prompt_index], alone)
    assert len({tuple(o.token_ids) for o in outs}) == 10


def test_generate_seeds_and_settings_per_prompt(trio, tokenizer, solo):
    engine = _engine(trio, tokenizer, max_batch_size=4)
    plist = [_settings(i) for i in range(4)]
    outs = engine.generate(PROMPTS[:4], plist)
    assert [o.token_ids for o in outs] == [_solo_tokens(solo, PROMPTS[i], plist[i]) for i in range(4)]
    # an int seed: prompt i uses mix_seed(seed, i)
    kw = dict(temperature=1.0, max_new_tokens=6, eos_token_id=[])
    a = engine.generate(PROMPTS[:3], seed=9, **kw)
    for i, o in enumerate(a):
        assert o.token_ids == _solo_tokens(solo, PROMPTS[i], SamplingParams(seed=mix_seed(9, i), **kw))


def test_blocks_return_to_the_pool_and_a_soak_does_not_grow(trio, tokenizer):
    engine = _engine(trio, tokenizer, max_batch_size=8, block_size=4, max_seq_len=32)
    rng = random.Random(5)
    for rnd in range(3):
        for i in range(300):
            engine.add_request([rng.randrange(2, 290) for _ in range(rng.randint(1, 6))],
                               SamplingParams(temperature=1.0, max_new_tokens=rng.randint(1, 3), seed=i, n=rng.choice([1, 2])))
        done = sum(o.finished for o in engine.run())
        assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0
        assert not engine.has_unfinished_requests()  # finished requests are let go
        assert done >= 300
    assert engine.runner.graphs_captured == 0  # CPU: nothing captured


def test_abort_frees_at_once(trio, tokenizer):
    engine = _engine(trio, tokenizer, max_batch_size=2, block_size=4)
    rids = [engine.add_request(p, SamplingParams(max_new_tokens=40, eos_token_id=[], seed=i))
            for i, p in enumerate(PROMPTS[:4])]
    engine.step()
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 2
    for rid in rids[:3]:
        engine.abort_request(rid)
    assert engine.stats()["waiting"] == 1 and engine.stats()["running"] == 0
    assert engine.allocator.num_used == 0
    outs = [o for o in engine.run()]
    assert [o.request_id for o in outs] == [rids[3]] and len(outs[0].token_ids) == 40


def test_step_reports_progress_and_text(trio, tokenizer):
    engine = _engine(trio, tokenizer, max_batch_size=2)
    rid = engine.add_request("the quick", max_new_tokens=12, temperature=0.0, eos_token_id=[])
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            seen.append(out)
    assert [o.finished for o in seen][-1] and not any(o.finished for o in seen[:-1])
    counts = [len(o.token_ids) for o in seen]
    assert counts == sorted(counts) and counts[-1] == 12
    assert all(seen[-1].text.startswith(o.text) for o in seen)


def test_max_seq_len_boundary_and_pool_limits(trio, tokenizer):
    engine = _engine(trio, tokenizer, max_batch_size=2, max_seq_len=16, block_size=4, kv_cache_tokens=12)
    ids = list(range(2, 8))  # 6 prompt tokens
    with pytest.raises(ValueError, match=r"prompts\[0\].*max_seq_len=16"):
        engine.generate([ids], max_new_tokens=11, eos_token_id=[])
    with pytest.raises(ValueError, match=r"prompts\[0\].*KV blocks"):  # fits max_seq_len, not the 12-slot pool
        engine.generate([ids], max_new_tokens=8, eos_token_id=[])
    (out,) = engine.generate([[2, 3, 4, 5]], max_new_tokens=9, eos_token_id=[], temperature=0.0)
    assert len(out.token_ids) == 9  # 4 + 9 - 1 = 12 KV positions: exactly the pool
    roomy = _engine(trio, tokenizer, max_batch_size=1, max_seq_len=16)
    (out,) = roomy.generate([ids], max_new_tokens=10, eos_token_id=[], temperature=0.0)  # 6 + 10 == max_seq_len
    assert len(out.token_ids) == 10


def test_bad_requests_fail_before_anything_runs(trio, tokenizer):
    engine = _engine(trio, tokenizer, max_batch_size=2, max_seq_len=32)
    good = ["the", "a"]
    cases = [
        (dict(n=0), ValueError, "n:"), (dict(n=1.5), TypeError, "n:"), (dict(top_p=0.0), ValueError, "top_p:"),
        (dict(temperature=-1.0), ValueError, "temperature:"), (dict(alpha=float("nan")), ValueError, "alpha:"),
        (dict(top_k=-1), ValueError, "top_k:"), (dict(top_k=10**20), ValueError, "top_k:"),
        (dict(min_p=2.0), ValueError, "min_p:"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens:"), (dict(stop=[""]), ValueError, "stop:"),
        (dict(stop=[3]), TypeError, "stop:"), (dict(eos_token_id=[-1]), ValueError, "eos_token_id:"),
        (dict(eos_token_id=[10**6]), ValueError, "eos_token_id:"), (dict(return_logprobs=1), TypeError,
                                                                    "return_logprobs:"),
        (dict(bogus=1), TypeError, "bogus"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            engine.generate(good, **{"max_new_tokens": 4, **kw})
    with pytest.raises(ValueError, match="sampling_params"):
        engine.generate(good, [SamplingParams()])  # one per prompt needed
    with pytest.raises(TypeError, match=r"sampling_params\[1\]"):
        engine.generate(good, [SamplingParams(), dict()])
    with pytest.raises(TypeError, match="not both"):
        engine.generate(good, SamplingParams(), temperature=0.0)
    with pytest.raises(ValueError, match="seed"):
        engine.generate(good, seed=[1])
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        engine.generate(["the", "x" * 200], max_new_tokens=4)
    assert engine.stats()["waiting"] == 0 and not engine.has_unfinished_requests()  # nothing was queued
    # a bad add_request leaves the queued ones alone
    rid = engine.add_request("the", max_new_tokens=3, eos_token_id=[])
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request("the", max_new_tokens=0)
    outs = list(engine.run())
    assert [o.request_id for o in outs] == [rid] and len(outs[0].token_ids) == 3
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        _engine(trio, tokenizer, kv_cache_tokens=8, block_size=16)
    with pytest.raises(ValueError, match="scheduling"):
        _engine(trio, tokenizer, scheduling="fifo")
    with pytest.raises(TypeError, match="block_size"):
        _engine(trio, tokenizer, block_size=4.0)


def test_static_scheduling_gives_the_same_tokens(trio, tokenizer, solo):
    reqs = [(PROMPTS[i], _settings(i)) for i in range(6)]
    engine = _engine(trio, tokenizer, max_batch_size=3, scheduling="static")
    outs = engine.generate([p for p, _ in reqs], [s for _, s in reqs])
    assert [o.token_ids for o in outs] == [_solo_tokens(solo, p, s) for p, s in reqs]
    # n samples of a prompt share its prefill: every sample must see the prompt's K/V (a static batch gives each
    # its own slab, which the prefill fills through the first sample's blocks and copies)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, eos_token_id=[], n=3)
    outs = engine.generate(PROMPTS[:2], params)
    want = [_solo_tokens(solo, p, SamplingParams(temperature=0.0, max_new_tokens=8, eos_token_id=[]))
            for p in PROMPTS[:2]]
    assert [o.token_ids for o in outs] == [w for w in want for _ in range(3)]
