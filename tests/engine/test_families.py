"""The engine on every decoder-only family it supports: greedy RAST (and the base alone) against a full-forward
oracle, tiny random models of each family on the CPU in fp32 (transformers' forward at decode: the fused
decode forward is CUDA-only and covered by test_fused_decode.py / test_engine_cuda.py)."""
from __future__ import annotations

import pytest
import torch

from rast_kernels import RastEngine

from conftest import WIDTHS

CPU = "cpu"
PROMPTS = ["the quick brown fox jumps", "héllo"]  # different lengths: the short one is left padded
N_NEW = 10
ALPHA = 0.5

_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=0,
               bos_token_id=None, pad_token_id=1,
               initializer_range=0.2)  # 10x the usual scale: attention moves the logits (see conftest.make_model)
# model_type -> (config overrides, attention the engine picks on the CPU)
FAMILIES = {
    "llama": (dict(), "sdpa"),
    "qwen2": (dict(), "sdpa"),
    "qwen3": (dict(head_dim=8), "sdpa"),
    "mistral": (dict(sliding_window=None, head_dim=16), "sdpa"),
    "gemma": (dict(head_dim=8), "sdpa"),
    # soft-capped attention logits (attn_logit_softcapping=50 by default): eager only; sliding layers with a
    # window (4096) longer than max_seq_len
    "gemma2": (dict(head_dim=8, query_pre_attn_scalar=8, attn_logit_softcapping=2.0), "eager"),
    "phi3": (dict(), "sdpa"),
    "olmo2": (dict(), "sdpa"),
    # no grouped-query attention (the config has no num_key_value_heads; a stray one would size the engine's
    # cache wrongly, a clear ValueError)
    "gpt_neox": (dict(num_key_value_heads=4), "sdpa"),
    "qwen3_moe": (dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), "sdpa"),
    "mixtral": (dict(sliding_window=None, num_local_experts=4, num_experts_per_tok=2), "sdpa"),
    "olmoe": (dict(num_experts=4, num_experts_per_tok=2), "sdpa"),
    # attention sinks: the class refuses SDPA, eager; sliding layers (window 64 >= max_seq_len)
    "gpt_oss": (dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=64), "eager"),
    # sliding layers (window 4096) mixed with full ones, no soft-capping: SDPA
    "gemma3_text": (dict(head_dim=8, query_pre_attn_scalar=8), "sdpa"),
}


def make_family_model(family: str, vocab: int, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, vocab_size=vocab, **{**_COMMON, **FAMILIES[family][0]})
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _oracle(models, prompt_ids, tokens, alpha, vocab):
    """The greedy tokens of a full-sequence forward without a cache (batch 1) over ``prompt + tokens``: at each
    step the argmax over the tokenizer's vocabulary of base + alpha * (expert - expert_base) in fp32 (or of
    the base alone). For a causal model the logits at position t of that forward are those of the prefix
    ending at t, so this equals re-running the growing sequence at every step, in one forward per model:
    ``tokens`` is the greedy decode exactly when the result equals it (a first wrong token at step k makes
    step k differ: its prefix is the oracle's own)."""
    P, n = len(prompt_ids), len(tokens)
    with torch.no_grad():
        z = [m(input_ids=torch.tensor([list(prompt_ids) + list(tokens)], device=m.device), use_cache=False)
             .logits[0, P - 1:P - 1 + n, :vocab].float().cpu() for m in models]
    return torch.argmax(z[0] if len(z) == 1 else z[0] + alpha * (z[1] - z[2]), dim=-1).tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_greedy_matches_full_forward_oracle(family, tokenizer):
    trio = [make_family_model(family, width, seed) for width, seed in zip(WIDTHS.values(), (1, 2, 3))]
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    engine = RastEngine(*trio, tokenizer=tokenizer, max_seq_len=48, devices=CPU, use_cuda_graph=False)
    assert engine.attn == {role: FAMILIES[family][1] for role in WIDTHS}
    assert all(m.config._attn_implementation == FAMILIES[family][1] for m in trio)
    assert f"'base': '{FAMILIES[family][1]}'" in repr(engine)
    outs = engine.generate(PROMPTS, alpha=ALPHA, temperature=0.0, max_new_tokens=N_NEW, eos_token_id=[])
    got = [o.token_ids for o in outs]
    want = [_oracle(trio, i, g, ALPHA, len(tokenizer)) for i, g in zip(ids, got)]
    assert all(len(g) == N_NEW for g in got) and got == want
    assert len({tuple(w) for w in want}) == 2  # the two prompts decode differently: rows are not mixed up

    alone = RastEngine(trio[0], None, None, tokenizer=tokenizer, max_seq_len=48, devices=CPU, use_cuda_graph=False)
    outs = alone.generate(PROMPTS, temperature=0.0, max_new_tokens=N_NEW, eos_token_id=[])
    base_got = [o.token_ids for o in outs]
    base_want = [_oracle(trio[:1], i, g, ALPHA, len(tokenizer)) for i, g in zip(ids, base_got)]
    assert all(len(g) == N_NEW for g in base_got) and base_got == base_want
    assert base_want != want  # the experts change the tokens: alpha * (expert - expert_base) is not inert


def _mixed_trio(tokenizer):
    """A Llama base with Gemma2 expert / expert base (same tokenizer, soft-capped attention: eager)."""
    base = make_family_model("llama", WIDTHS["base"], 1)
    return [base] + [make_family_model("gemma2", WIDTHS[r], s) for r, s in (("expert", 2), ("expert_base", 3))]


def test_mixed_families_mixed_attention(tokenizer):
    """Each model keeps its own attention (sdpa for the Llama base, eager for the Gemma2 experts), also across
    calls, and the tokens are the oracle's."""
    trio = _mixed_trio(tokenizer)
    engine = RastEngine(*trio, tokenizer=tokenizer, max_seq_len=48, devices=CPU, use_cuda_graph=False)
    assert engine.attn == {"base": "sdpa", "expert": "eager", "expert_base": "eager"}
    for _ in range(2):
        outs = engine.generate(PROMPTS, alpha=ALPHA, temperature=0.0, max_new_tokens=N_NEW, eos_token_id=[])
        got = [o.token_ids for o in outs]
        assert all(len(g) == N_NEW for g in got)
        assert got == [_oracle(trio, tokenizer(p)["input_ids"], g, ALPHA, len(tokenizer)) for p, g in zip(PROMPTS, got)]
    assert [m.config._attn_implementation for m in trio] == ["sdpa", "eager", "eager"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the decode kernel is chosen on CUDA")
def test_mixed_attention_cuda(tokenizer):
    """On CUDA the Llama base gets the decode kernel (each row's cache range) while the Gemma2 experts run
    eager over the mask, in one decode step: fp32 tokens equal the oracle's."""
    from rast_kernels import _backends
    trio = _mixed_trio(tokenizer)
    engine = RastEngine(*trio, tokenizer=tokenizer, max_seq_len=48, devices="cuda", dtype=torch.float32)
    want = {"base": "rast_decode" if _backends.has_triton() else "sdpa", "expert": "eager", "expert_base": "eager"}
    assert engine.attn == want
    outs = engine.generate(PROMPTS, alpha=ALPHA, temperature=0.0, max_new_tokens=N_NEW, eos_token_id=[])
    got = [o.token_ids for o in outs]
    assert all(len(g) == N_NEW for g in got)
    assert got == [_oracle(trio, tokenizer(p)["input_ids"], g, ALPHA, len(tokenizer)) for p, g in zip(PROMPTS, got)]
