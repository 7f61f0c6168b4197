"""Speculative RAST: the same tokens as plain decoding, whatever the draft does, on both decode forwards.

The oracle is the plain engine (``speculative_tokens=0``), itself checked against no-cache full forwards in
test_engine.py / test_serving.py; every speculative run here changes the batch size, the block size, the pool (small
enough to preempt) and the arrival order too, so each is also an invariance test.
"""
from __future__ import annotations

import copy
import os
import random

import pytest
import torch

from rast_kernels import RastEngine, SamplingParams
from rast_kernels.params import ParamError
from rast_kernels.toy.common import DEFAULT_OUT, ROLES

from conftest import PROMPTS, WIDTHS, make_model

CPU = "cpu"


@pytest.fixture(scope="module")
def trio():
    return [make_model("qwen2", w, s) for w, s in zip(WIDTHS.values(), (21, 22, 23))]


def _workload(tokenizer):
    """Requests with different settings: greedy and sampled rows, alphas, filters, plausibility, n samples, EOS ids
    that do occur (tokens these random models emit often), stop strings, lengths."""
    eos_ids = [0, 2, 21, 24, 27, 57, 75, 100, 135, 155]
    reqs = []
    for i, p in enumerate(PROMPTS):
        reqs.append((p, SamplingParams(
            alpha=(0.5, 1.0, 1.5)[i % 3], temperature=(1.0, 0.0, 0.8, 1.3)[i % 4], top_p=(1.0, 0.9)[i % 2],
            top_k=(0, 20)[(i // 2) % 2], min_p=(0.0, 0.05)[(i // 3) % 2], max_new_tokens=5 + 4 * (i % 4),
            eos_token_id=eos_ids if i % 3 == 1 else [], stop="文4" if i == 5 else None, n=2 if i == 2 else 1,
            base_plausibility=0.05 if i == 6 else 0.0, seed=500 + i, return_logprobs=True)))
    return reqs


def _run(engine, reqs, order, every=3):
    """Feed ``reqs`` in ``order`` while the engine runs; ``{(request index, sample): output}``."""
    ids, got = {}, {}

    def collect(outs):
        for out in outs:
            if out.finished:
                got[(ids[out.request_id], out.sample_index)] = out

    for k, i in enumerate(order):
        ids[engine.add_request(*reqs[i])] = i
        if k % every == every - 1:
            collect(engine.step())
    collect(engine.run())
    assert engine.allocator.num_free == engine.allocator.num_blocks  # every block is back, drafts included
    return got


def _same(want: dict, got: dict):
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g = got[key]
        assert g.token_ids == w.token_ids, key
        assert (g.text, g.finish_reason, g.stop_reason) == (w.text, w.finish_reason, w.stop_reason), key
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4), key


# (speculative tokens, max batch, block size, KV pool tokens or None, arrival-order seed)
CONFIGS = [(1, 3, 16, None, 1), (2, 8, 5, None, 2), (4, 4, 8, 96, 3), (7, 2, 7, None, 4)]


@pytest.mark.parametrize("fused", [False, True], ids=["transformers_forward", "fused_decode"])
def test_speculative_tokens_equal_plain_decoding(trio, tokenizer, fused):
    reqs = _workload(tokenizer)
    plain = RastEngine(*trio, tokenizer=tokenizer, devices=CPU, max_batch_size=8, max_seq_len=64,
                       fused_decode=fused)
    want = _run(plain, reqs, list(range(len(reqs))))
    assert any(o.finish_reason == "stop" and isinstance(o.stop_reason, int) for o in want.values())  # an EOS
    assert any(o.stop_reason == "文4" for o in want.values())                                   # a stop string
    for k, batch, block, pool, order_seed in CONFIGS:
        engine = RastEngine(*trio, tokenizer=tokenizer, devices=CPU, max_batch_size=batch, block_size=block,
                            max_seq_len=64, kv_cache_tokens=pool, fused_decode=fused, speculative_tokens=k)
        order = list(range(len(reqs)))
        random.Random(order_seed).shuffle(order)
        _same(want, _run(engine, reqs, order))
        stats = engine.stats()
        assert stats["speculative_drafted"] == k * stats["speculative_rounds"] > 0


def test_the_tight_pool_preempts_under_speculation(trio, tokenizer):
    reqs = [(PROMPTS[i % 4], SamplingParams(temperature=1.0, max_new_tokens=24, eos_token_id=[], seed=50 + i))
            for i in range(8)]
    want = _run(RastEngine(*trio, tokenizer=tokenizer, devices=CPU, max_seq_len=64), reqs, list(range(8)))
    engine = RastEngine(*trio, tokenizer=tokenizer, devices=CPU, max_batch_size=4, block_size=8,
                        kv_cache_tokens=64, max_seq_len=64, speculative_tokens=3)
    ids, got, preempted = {}, {}, 0
    for i, (p, s) in enumerate(reqs):
        ids[engine.add_request(p, s)] = i
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[(ids[out.request_id], 0)] = out
        rows = engine.scheduler.running + list(engine.scheduler.waiting)
        preempted = max(preempted, sum(s.preemptions for s in rows))
    assert preempted > 0, "the pool was meant to force preemptions"
    assert {key: o.token_ids for key, o in got.items()} == {key: o.token_ids for key, o in want.items()}
    assert engine.allocator.num_free == engine.allocator.num_blocks


@pytest.mark.parametrize("draft", ["expert", "combination"])
def test_two_pairs_with_per_pair_alpha_and_plausibility(tokenizer, draft):
    base, e1, eb1, e2, eb2 = (make_model(f, w, s) for f, w, s in (
        ("qwen2", 320, 31), ("llama", 304, 32), ("llama", 312, 33), ("qwen2", 304, 34), ("qwen2", 312, 35)))
    params = [SamplingParams(alpha=(0.7, -0.3), temperature=t, top_p=0.95, base_plausibility=bp, max_new_tokens=12,
                             eos_token_id=[], seed=9, n=2, return_logprobs=True)
              for t, bp in ((1.0, 0.0), (0.0, 0.1), (0.9, 0.05))]
    kw = dict(tokenizer=tokenizer, devices=CPU, max_seq_len=64)
    want = RastEngine(base, [e1, e2], [eb1, eb2], **kw).generate(PROMPTS[:3], params)
    got = RastEngine(base, [e1, e2], [eb1, eb2], speculative_tokens=2, speculative_draft=draft,
                     **kw).generate(PROMPTS[:3], params)
    _same(dict(enumerate(want)), dict(enumerate(got)))


@pytest.fixture(scope="module")
def toy_paths():
    return [os.path.join(DEFAULT_OUT, r) for r in ROLES]


@pytest.mark.parametrize("temperature,alpha", [(0.0, 1.0), (1.0, 0.5)])
def test_the_trained_trio_accepts_most_drafts(toy_paths, temperature, alpha):
    """The shipped trio's expert agrees with RAST's target almost always: several tokens per round, same tokens."""
    rng = random.Random(0)
    prompts = ["Q" + "".join(rng.choice("01") for _ in range(16)) + "=" for _ in range(12)]
    kw = dict(temperature=temperature, alpha=alpha, max_new_tokens=24, seed=3, return_logprobs=True)
    want = RastEngine(*toy_paths, max_batch_size=8, max_seq_len=48).generate(prompts, **kw)
    for draft in ("expert", "combination"):
        engine = RastEngine(*toy_paths, max_batch_size=8, max_seq_len=48, speculative_tokens=4,
                            speculative_draft=draft)
        _same(dict(enumerate(want)), dict(enumerate(engine.generate(prompts, **kw))))
        assert engine.stats()["speculative_tokens_per_round"] > 3.0, (draft, engine.stats())


def test_a_draft_that_never_agrees_still_gives_plain_tokens_one_per_round(trio, tokenizer, monkeypatch):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, eos_token_id=[], seed=4, return_logprobs=True)
    want = RastEngine(*trio, tokenizer=tokenizer, devices=CPU, max_seq_len=64).generate(PROMPTS[:4], params)
    engine = RastEngine(*trio, tokenizer=tokenizer, devices=CPU, max_seq_len=64, speculative_tokens=3)
    draft = type(engine.speculation)._draft_token

    def wrong(self, runner, logits, b, offset):  # a token the target never picks: the vocabulary's last column
        return torch.full_like(draft(self, runner, logits, b, offset), runner.vocab_size - 1)

    assert all(runner_tok != len(tokenizer) - 1 for o in want for runner_tok in o.token_ids)
    monkeypatch.setattr(type(engine.speculation), "_draft_token", wrong)
    _same(dict(enumerate(want)), dict(enumerate(engine.generate(PROMPTS[:4], params))))
    stats = engine.stats()
    assert stats["speculative_accepted"] == 0 and stats["speculative_emitted"] == stats["speculative_rounds"]


@pytest.mark.parametrize("k", [1, 4])
def test_a_draft_that_always_agrees_gives_k_plus_one_per_round(trio, tokenizer, k):
    """alpha = 0 makes the target the base alone; a copy of the base as the expert drafts exactly its tokens."""
    base = trio[0]
    twin = copy.deepcopy(base)
    rounds = 3
    params = SamplingParams(alpha=0.0, temperature=0.0, max_new_tokens=1 + rounds * (k + 1), eos_token_id=[],
                            seed=2)
    kw = dict(tokenizer=tokenizer, devices=CPU, max_seq_len=64)
    want = RastEngine(base, twin, trio[2], **kw).generate(PROMPTS[:3], params)
    engine = RastEngine(base, twin, trio[2], speculative_tokens=k, **kw)
    _same(dict(enumerate(want)), dict(enumerate(engine.generate(PROMPTS[:3], params))))
    stats = engine.stats()
    assert stats["speculative_rounds"] == 3 * rounds
    assert stats["speculative_emitted"] == 3 * rounds * (k + 1) and stats["speculative_tokens_per_round"] == k + 1


def test_speculation_arguments_are_checked(trio, tokenizer):
    kw = dict(tokenizer=tokenizer, devices=CPU, max_seq_len=64)
    for bad, exc in ((-1, ParamError), (16, ParamError), (1.5, TypeError), ("2", TypeError), (True, TypeError)):
        with pytest.raises(exc, match="speculative_tokens") as info:
            RastEngine(*trio, speculative_tokens=bad, **kw)
        assert info.value.param == "speculative_tokens"
    with pytest.raises(ParamError, match="speculative_draft"):
        RastEngine(*trio, speculative_tokens=2, speculative_draft="base", **kw)
    with pytest.raises(ParamError, match="speculative_tokens: needs expert pairs"):
        RastEngine(trio[0], None, None, speculative_tokens=2, **kw)
    with pytest.raises(ParamError, match="speculative_draft: 'expert' would draft with the base model itself"):
        RastEngine(trio[0], trio[0], trio[2], speculative_tokens=2, **kw)  # contrastive decoding: expert = base
