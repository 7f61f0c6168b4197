"""Several expert pairs and the logit-arithmetic presets on the engine (CPU, tiny random models).

Every preset is checked against an independent oracle: full-sequence forwards without a cache, the formula in
float64, argmax (greedy) or :func:`rast_sample_reference` (sampled)."""
from __future__ import annotations

import math

import pytest
import torch

from rast_kernels import RastEngine, SamplingParams, rast_generate
from rast_kernels.engine import clear_engine_cache, get_engine, sample_seed
from rast_kernels.ops.rast_sample_reference import rast_sample_reference

from conftest import make_model

CPU = "cpu"
PROMPTS = ["the quick brown fox", "héllo", "a stitch in time saves nine"]


@pytest.fixture(scope="module")
def five(tokenizer):
    """A base and two expert pairs of different sizes and LM-head widths (all >= len(tokenizer))."""
    base = make_model("qwen2", 320, 31, hidden_size=48, intermediate_size=96, num_hidden_layers=3)
    e1, eb1 = make_model("qwen2", 304, 32), make_model("qwen2", 312, 33)
    e2 = make_model("llama", 300, 34, hidden_size=16, intermediate_size=32, num_attention_heads=2)
    eb2 = make_model("llama", 300, 35, hidden_size=16, intermediate_size=32, num_attention_heads=2)
    return base, [e1, e2], [eb1, eb2]


def _full_logits(models, seq, V):
    x = torch.tensor([seq])
    return [m(input_ids=x, use_cache=False).logits[:, -1, :V] for m in models]


def _oracle_greedy(base, experts, expert_bases, tokenizer, prompt, alphas, n, plausibility=0.0):
    """Greedy decoding with ``z = base + sum_i alpha_i (expert_i - expert_base_i)`` (float64, no cache), keeping
    only tokens with ``p_base >= plausibility * max p_base``."""
    V = len(tokenizer)
    seq, out = list(tokenizer(prompt)["input_ids"]), []
    with torch.no_grad():
        for _ in range(n):
            zb, *rest = (z[0].double() for z in _full_logits([base, *experts, *expert_bases], seq, V))
            z = zb.clone()
            for a, ze, zeb in zip(alphas, rest[:len(experts)], rest[len(experts):]):
                z += a * (ze - zeb)
            if plausibility > 0:
                lp = torch.log_softmax(zb, 0)
                z[lp < lp.max() + math.log(plausibility)] = -math.inf
            t = int(torch.argmax(z))
            out.append(t)
            seq.append(t)
    return out


@pytest.mark.parametrize("alpha", [0.8, (0.6, -1.3)], ids=["one_alpha", "alpha_per_pair"])
def test_two_pairs_greedy_matches_full_forward_oracle(five, tokenizer, alpha):
    base, experts, expert_bases = five
    engine = RastEngine(base, experts, expert_bases, tokenizer=tokenizer, devices=CPU, max_seq_len=64)
    assert engine.roles == ("base", "expert[0]", "expert_base[0]", "expert[1]", "expert_base[1]")
    assert len(engine.lanes) == 5
    outs = engine.generate(PROMPTS, temperature=0.0, alpha=alpha, max_new_tokens=8, eos_token_id=[])
    alphas = alpha if isinstance(alpha, tuple) else (alpha, alpha)
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == _oracle_greedy(base, experts, expert_bases, tokenizer, p, alphas, 8)
    # the second pair matters: dropping it changes some tokens
    one = RastEngine(base, experts[0], expert_bases[0], tokenizer=tokenizer, devices=CPU, max_seq_len=64)
    single = one.generate(PROMPTS, temperature=0.0, alpha=alphas[0], max_new_tokens=8, eos_token_id=[])
    assert [o.token_ids for o in single] != [o.token_ids for o in outs]


def test_one_pair_as_a_list_equals_the_single_pair_engine(five, tokenizer):
    base, experts, expert_bases = five
    kw = dict(tokenizer=tokenizer, devices=CPU, max_seq_len=64)
    params = SamplingParams(temperature=1.0, top_p=0.9, alpha=0.7, max_new_tokens=10, eos_token_id=[], seed=5, n=2)
    a = RastEngine(base, [experts[0]], [expert_bases[0]], **kw).generate(PROMPTS, params)
    b = RastEngine(base, experts[0], expert_bases[0], **kw).generate(PROMPTS, params)
    assert [(o.token_ids, o.text) for o in a] == [(o.token_ids, o.text) for o in b]


def test_two_pairs_sampled_with_plausibility_equal_full_forwards_and_the_reference(five, tokenizer):
    """Sampled rows with per-request alphas and base plausibility: the reference sampler on full forwards, with
    Philox seed sample_seed(seed, j) and offset = token index."""
    base, experts, expert_bases = five
    engine = RastEngine(base, experts, expert_bases, tokenizer=tokenizer, devices=CPU, max_seq_len=64,
                        max_batch_size=4)
    V = len(tokenizer)
    settings = [SamplingParams(alpha=(0.5, 1.0), base_plausibility=0.05, temperature=1.0, top_p=0.95,
                               max_new_tokens=8, eos_token_id=[], seed=11, n=2),
                SamplingParams(alpha=(-0.4, 2.0), base_plausibility=0.0, temperature=0.8, max_new_tokens=8,
                               eos_token_id=[], seed=12)]
    outs = engine.generate(PROMPTS[:2], settings)
    for out in outs:
        p = settings[out.prompt_index]
        seq = list(tokenizer(PROMPTS[out.prompt_index])["input_ids"])
        want = []
        with torch.no_grad():
            for t in range(8):
                zb, e1, e2, eb1, eb2 = _full_logits([base, *experts, *expert_bases], seq, V)
                tok = int(rast_sample_reference(zb, [e1, e2], [eb1, eb2], alpha=list(p.alpha),
                                                base_plausibility=p.base_plausibility, temperature=p.temperature,
                                                top_p=p.top_p, vocab_size=V,
                                                seed=torch.tensor([sample_seed(p.seed, out.sample_index)]),
                                                offset=torch.tensor([t]))[0])
                want.append(tok)
                seq.append(tok)
        assert out.token_ids == want, out.prompt_index


def _count_forwards(model):
    """Calls of the model's embedding (once per forward, transformers' or the fused decoder's)."""
    calls = [0]
    model.get_input_embeddings().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("fused", [False, True], ids=["transformers_forward", "fused_decode"])
def test_contrastive_decoding_runs_the_base_once_and_matches_the_oracle(tokenizer, fused):
    """Contrastive decoding: z = (1 + beta) z_expert - beta z_amateur over the expert's plausible tokens
    (p >= a * max p) is RAST with base = expert = the strong model, expert_base = the amateur, alpha = beta,
    base_plausibility = a. The strong model is loaded once and run once per step."""
    strong = make_model("qwen2", 320, 41, hidden_size=48, intermediate_size=96)
    amateur = make_model("qwen2", 304, 42)
    calls = {"strong": _count_forwards(strong), "amateur": _count_forwards(amateur)}
    engine = RastEngine(strong, strong, amateur, tokenizer=tokenizer, devices=CPU, max_seq_len=64,
                        fused_decode=fused)
    assert engine.lane_roles == ("base", "expert_base") and len(engine.lanes) == 2
    beta, a = 2.0, 0.3
    outs = engine.generate(PROMPTS, temperature=0.0, alpha=beta, base_plausibility=a, max_new_tokens=8,
                           eos_token_id=[])
    assert calls["strong"][0] == calls["amateur"][0] > 0  # one forward of the strong model per step, not two
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == _oracle_greedy(strong, [strong], [amateur], tokenizer, p, (beta,), 8, plausibility=a)
    # the plausibility mask matters here: without it some tokens differ
    loose = engine.generate(PROMPTS, temperature=0.0, alpha=beta, max_new_tokens=8, eos_token_id=[])
    assert [o.token_ids for o in loose] != [o.token_ids for o in outs]


def test_proxy_tuning_preset_matches_the_oracle(tokenizer, tmp_path):
    """Proxy-tuning / DExperts: z = base + alpha (expert - anti_expert), a large base with small experts given as
    paths; the same path in two roles is loaded once."""
    large = make_model("llama", 320, 51, hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    small_tuned, small = make_model("llama", 304, 52), make_model("llama", 312, 53)
    paths = {}
    for name, m in dict(large=large, tuned=small_tuned, small=small).items():
        paths[name] = str(tmp_path / name)
        m.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    outs = rast_generate(PROMPTS, base=paths["large"], expert=paths["tuned"], expert_base=paths["small"],
                         devices=CPU, max_seq_len=64, alpha=1.0, temperature=0.0, max_new_tokens=6, eos_token_id=[])
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == _oracle_greedy(large, [small_tuned], [small], tokenizer, p, (1.0,), 6)
    # a path given twice (pair 2's expert base is pair 1's): four roles, three distinct models
    engine = get_engine(paths["large"], [paths["tuned"], paths["small"]], [paths["small"], paths["small"] + "/"],
                        devices=CPU, max_seq_len=64)
    assert len(engine.lanes) == 3 and engine.shared == {"expert[1]": "expert_base[0]", "expert_base[1]": "expert_base[0]"}
    assert get_engine(paths["large"], [paths["tuned"], paths["small"]], [paths["small"], paths["small"] + "/"],
                      devices=CPU, max_seq_len=64) is engine  # list specs are cache keys too
    clear_engine_cache()


def test_pair_arguments_are_checked(five, tokenizer):
    base, experts, expert_bases = five
    kw = dict(tokenizer=tokenizer, devices=CPU, max_seq_len=64)
    with pytest.raises(ValueError, match="expert, expert_base: the lists must pair up"):
        RastEngine(base, experts, expert_bases[:1], **kw)
    with pytest.raises(ValueError, match="expert, expert_base: give two lists"):
        RastEngine(base, experts, expert_bases[0], **kw)
    with pytest.raises(ValueError, match="empty lists"):
        RastEngine(base, [], [], **kw)
    with pytest.raises(TypeError, match=r"expert\[1\]: expected a model id"):
        RastEngine(base, [experts[0], 3], expert_bases, **kw)
    with pytest.raises(ValueError, match="devices: unknown key 'expert\\[2\\]'"):
        RastEngine(base, experts, expert_bases, tokenizer=tokenizer, devices={"expert[2]": CPU}, max_seq_len=64)
    engine = RastEngine(base, experts, expert_bases, tokenizer=tokenizer, max_seq_len=64,
                        devices={"expert": CPU, "expert_base[1]": CPU, "base": CPU})
    with pytest.raises(ValueError, match="alpha: 3 weights given, the engine has 2 expert pair"):
        engine.generate("a", alpha=[1.0, 2.0, 3.0], max_new_tokens=4)
    with pytest.raises(ValueError, match="alpha: must be finite"):
        engine.generate("a", alpha=[1.0, math.nan], max_new_tokens=4)
    with pytest.raises(TypeError, match=r"alpha\[1\]: expected a number"):
        SamplingParams(alpha=[1.0, "x"])
    with pytest.raises(ValueError, match="alpha: a list of weights must not be empty"):
        SamplingParams(alpha=[])
    with pytest.raises(ValueError, match=r"base_plausibility: must be in \[0, 1\]"):
        SamplingParams(base_plausibility=1.5)
    alone = RastEngine(base, None, None, **kw)
    with pytest.raises(ValueError, match="alpha: a list of weights needs expert pairs"):
        alone.add_request("a", alpha=[1.0], max_new_tokens=4)
    assert not engine.has_unfinished_requests() and not alone.has_unfinished_requests()
    # a bad request among good ones: the good ones still run
    out = engine.generate(["a", "b"], temperature=0.0, alpha=(1.0, 0.5), max_new_tokens=3, eos_token_id=[])
    assert [len(o.token_ids) for o in out] == [3, 3]


def test_base_alone_with_plausibility_equals_top_of_the_base(tokenizer):
    """base_plausibility = 1 keeps only the base's argmax: sampling at any temperature is then greedy."""
    base = make_model("qwen2", 320, 61)
    engine = RastEngine(base, None, None, tokenizer=tokenizer, devices=CPU, max_seq_len=64)
    greedy = engine.generate(PROMPTS, temperature=0.0, max_new_tokens=6, eos_token_id=[])
    hot = engine.generate(PROMPTS, temperature=2.0, base_plausibility=1.0, max_new_tokens=6, eos_token_id=[], seed=3)
    assert [o.token_ids for o in hot] == [o.token_ids for o in greedy]


def test_delta_diagnostics_with_two_pairs(five, tokenizer):
    """argmax_flip says whether the two deltas together moved the base's argmax (checked on full forwards)."""
    base, experts, expert_bases = five
    engine = RastEngine(base, experts, expert_bases, tokenizer=tokenizer, devices=CPU, max_seq_len=64,
                        diagnostics=True)
    (out,) = engine.generate(PROMPTS[0], temperature=0.0, alpha=(0.6, -1.3), max_new_tokens=8, eos_token_id=[])
    seq, V = list(tokenizer(PROMPTS[0])["input_ids"]), len(tokenizer)
    flips = []
    with torch.no_grad():
        for t in out.token_ids:
            flips.append(int(_full_logits([base], seq, V)[0][0].argmax()) != t)
            seq.append(t)
    assert out.diagnostics["argmax_flip"] == flips and any(flips)
    assert all(p > 0 for p in out.diagnostics["p_rast"])
