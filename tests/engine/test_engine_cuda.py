"""RastEngine on CUDA: the captured decode step equals the eager one token for token (GPU only)."""
from __future__ import annotations

import pytest
import torch

from rast_kernels import RastEngine

from conftest import WIDTHS, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = ["the quick brown fox", "héllo", "a stitch in time saves nine; the early bird gets the worm"]


def _models(family, dtype):
    return [make_model(family, w, s).to("cuda", dtype) for w, s in zip(WIDTHS.values(), (1, 2, 3))]


def _pair(family, dtype, tokenizer, **kw):
    models = _models(family, dtype)
    graph = RastEngine(*models, tokenizer=tokenizer, max_seq_len=128, use_cuda_graph=True, dtype=dtype, **kw)
    eager = RastEngine(*models, tokenizer=tokenizer, max_seq_len=128, use_cuda_graph=False, dtype=dtype, **kw)
    assert graph.use_cuda_graph and not eager.use_cuda_graph
    eager.pad_to_buckets = True  # same batch shapes as the graph buckets, so the same kernels run
    return graph, eager


@pytest.mark.parametrize("family,dtype,attn,fused", [
    ("qwen2", torch.float32, "sdpa", False), ("qwen2", torch.bfloat16, "sdpa", False),
    ("qwen2", torch.bfloat16, "rast_decode", False),
    ("qwen2", torch.bfloat16, "rast_decode", True), ("llama", torch.bfloat16, "rast_decode", True),
    ("llama", torch.float32, "rast_decode", True)])
def test_graph_equals_eager(family, dtype, attn, fused, tokenizer):
    graph, eager = _pair(family, dtype, tokenizer, attn_implementation=attn, fused_decode=fused)
    settings = [
        dict(temperature=0.0, max_new_tokens=24, eos_token_id=[]),
        dict(temperature=1.0, top_p=0.9, max_new_tokens=40, seed=3, eos_token_id=[]),
        dict(temperature=0.7, top_k=20, min_p=0.05, alpha=1.5, max_new_tokens=40, seed=11, stop=["e", "\n"]),
    ]
    for kw in settings:
        for prompts in (PROMPTS, PROMPTS[:1], PROMPTS * 2):  # buckets 4, 1, 8
            g = graph.generate(prompts, return_logprobs=True, **kw)
            e = eager.generate(prompts, return_logprobs=True, **kw)
            assert [o.token_ids for o in g] == [o.token_ids for o in e]
            assert [(o.finish_reason, o.stop_reason, o.text) for o in g] == \
                   [(o.finish_reason, o.stop_reason, o.text) for o in e]
            for a, b in zip(g, e):
                assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert {1, 4, 8} <= {key[0] for key in graph.runner._graphs}  # (batch bucket, gathered length)


@pytest.mark.parametrize("fused", [False, True])
def test_graph_equals_eager_with_requests_joining_and_leaving(fused, tokenizer):
    """Continuous batching on CUDA: requests of different lengths and settings arrive while others run, rows leave
    and are compacted, a small pool forces waiting; the captured step gives the eager step's tokens."""
    from rast_kernels import SamplingParams

    models = _models("qwen2", torch.bfloat16)
    outs = {}
    for graph in (True, False):
        eng = RastEngine(*models, tokenizer=tokenizer, max_seq_len=128, max_batch_size=4, use_cuda_graph=graph,
                         fused_decode=fused, kv_cache_tokens=160, block_size=8)
        eng.pad_to_buckets = True
        got, ids = {}, {}
        for i in range(10):
            p = SamplingParams(temperature=(1.0, 0.0)[i % 2], top_p=0.9, max_new_tokens=8 + 7 * (i % 4),
                               eos_token_id=[], seed=i)
            ids[eng.add_request(PROMPTS[i % 3], p)] = i
            for o in eng.step():
                if o.finished:
                    got[ids[o.request_id]] = o.token_ids
        for o in eng.run():
            got[ids[o.request_id]] = o.token_ids
        assert eng.allocator.num_used == 0
        outs[graph] = [got[i] for i in range(10)]
    assert outs[True] == outs[False]


@pytest.mark.parametrize("fused", [False, True])
def test_decode_step_has_no_host_sync(fused, tokenizer):
    """The step the graphs capture must not read anything back to the host."""
    models = _models("qwen2", torch.bfloat16)
    eng = RastEngine(*models, tokenizer=tokenizer, max_seq_len=64, use_cuda_graph=False, fused_decode=fused)
    eng.add_request([3, 4, 5], temperature=1.0, top_p=0.9, max_new_tokens=8, eos_token_id=[])
    eng.add_request([6], temperature=1.0, top_p=0.9, max_new_tokens=8, eos_token_id=[])
    eng.step()  # admission and prefill (host-driven)
    with torch.no_grad():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                eng.runner._decode_step(2, 64, False)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("fused", [False, True])
def test_cuda_greedy_matches_oracle(fused, tokenizer):
    models = _models("qwen2", torch.float32)
    eng = RastEngine(*models, tokenizer=tokenizer, max_seq_len=64, dtype=torch.float32, fused_decode=fused)
    assert eng.use_cuda_graph and eng.fused_decode is fused
    outs = eng.generate(PROMPTS, alpha=0.5, temperature=0.0, max_new_tokens=10, eos_token_id=[])
    V = len(tokenizer)
    for p, o in zip(PROMPTS, outs):
        seq = list(tokenizer(p)["input_ids"])
        with torch.no_grad():
            for t in o.token_ids:
                x = torch.tensor([seq], device="cuda")
                zb, ze, zeb = (m(input_ids=x, use_cache=False).logits[0, -1, :V].double() for m in models)
                z = zb + 0.5 * (ze - zeb)
                assert z[t] >= z.max() - 1e-4  # the engine's token is the argmax (fp32 tie tolerance)
                seq.append(t)


@pytest.mark.parametrize("attn,fused", [("rast_decode", False), ("rast_decode", True)])
def test_decode_kernels_match_sdpa_cuda(attn, fused, tokenizer):
    """The decode-attention kernel (through transformers' forward, or inside the fused decoder with the fused
    RMSNorm/rotary/SiLU kernels) in the captured step gives transformers-with-SDPA's tokens (fp32, greedy)."""
    models = _models("llama", torch.float32)
    kw = dict(alpha=0.7, temperature=0.0, max_new_tokens=16, eos_token_id=[])
    ref = RastEngine(*models, tokenizer=tokenizer, max_seq_len=96, dtype=torch.float32, attn_implementation="sdpa",
                     fused_decode=False).generate(PROMPTS, **kw)
    got = RastEngine(*models, tokenizer=tokenizer, max_seq_len=96, dtype=torch.float32,
                     attn_implementation=attn, fused_decode=fused).generate(PROMPTS, **kw)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]


def test_fused_decode_is_the_cuda_default(tokenizer):
    eng = RastEngine(*_models("qwen2", torch.bfloat16), tokenizer=tokenizer, max_seq_len=64)
    assert eng.fused_decode and set(eng.attn.values()) == {"rast_decode"}


def test_overlapped_models_give_the_same_tokens(tokenizer):
    """overlap_models: the expert and expert-base forwards on their own streams (forked and joined inside the
    captured graph, and eagerly): the same tokens as the one-stream step."""
    models = _models("qwen2", torch.bfloat16)
    kw = dict(temperature=1.0, top_p=0.9, max_new_tokens=40, seed=3, eos_token_id=[], return_logprobs=True)
    ref = RastEngine(*models, tokenizer=tokenizer, max_seq_len=128).generate(PROMPTS, **kw)
    for graph in (True, False):
        eng = RastEngine(*models, tokenizer=tokenizer, max_seq_len=128, use_cuda_graph=graph, overlap_models=True)
        assert eng.overlap_models and eng.use_cuda_graph is graph
        got = eng.generate(PROMPTS, **kw)
        assert [o.token_ids for o in got] == [o.token_ids for o in ref]
        for a, b in zip(got, ref):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
