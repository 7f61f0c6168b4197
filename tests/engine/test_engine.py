"""RastEngine / rast_generate on CPU with tiny random models (see conftest.py)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rast_kernels import GenerationOutput, RastEngine, rast_generate
from rast_kernels.engine import clear_engine_cache, get_engine, mix_seed as row_seed

from conftest import WIDTHS, make_model, make_tokenizer

CPU = "cpu"  # every engine here runs on the CPU, also on a GPU machine (CUDA variants: test_engine_cuda.py)
PROMPTS = ["the quick brown fox", "héllo", "a stitch in time saves nine; the early bird gets the worm"]


@pytest.fixture(scope="module")
def qwen_engine(qwen_paths):
    return get_engine(qwen_paths["base"], qwen_paths["expert"], qwen_paths["expert_base"], max_seq_len=96, devices=CPU)


def _oracle_greedy(paths_or_models, tokenizer, prompt, alpha, n):
    """Greedy RAST decoding by plain full-sequence forwards (no cache, batch 1): the independent spec."""
    models = [AutoModelForCausalLM.from_pretrained(p).eval() if isinstance(p, str) else p for p in paths_or_models]
    V = len(tokenizer)
    seq = list(tokenizer(prompt)["input_ids"])
    out = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([seq])
            zb, ze, zeb = (m(input_ids=x, use_cache=False).logits[0, -1, :V].double() for m in models)
            t = int(torch.argmax(zb + alpha * (ze - zeb)))
            out.append(t)
            seq.append(t)
    return out


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_greedy_matches_full_forward_oracle(family, qwen_paths, llama_paths, tokenizer):
    paths = qwen_paths if family == "qwen2" else llama_paths
    outs = rast_generate(PROMPTS, base=paths["base"], expert=paths["expert"], expert_base=paths["expert_base"],
                         max_seq_len=96, devices=CPU, alpha=0.7, temperature=0.0, max_new_tokens=8, eos_token_id=[])
    assert [o.num_prompt_tokens for o in outs] == [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    for p, o in zip(PROMPTS, outs):
        assert o.finish_reason == "length" and len(o.token_ids) == 8
        assert o.token_ids == _oracle_greedy([paths[r] for r in WIDTHS], tokenizer, p, 0.7, 8)


def test_alpha_zero_is_base_greedy(qwen_engine, qwen_paths, tokenizer):
    base = AutoModelForCausalLM.from_pretrained(qwen_paths["base"]).eval()
    outs = qwen_engine.generate(PROMPTS, alpha=0.0, temperature=0.0, max_new_tokens=8, eos_token_id=[])
    for p, o in zip(PROMPTS, outs):
        ids = torch.tensor([tokenizer(p)["input_ids"]])
        ref = base.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                            min_new_tokens=8, pad_token_id=1,
                            suppress_tokens=list(range(len(tokenizer), WIDTHS["base"])))  # padded head columns
        assert o.token_ids == ref[0, ids.shape[1]:].tolist()


def test_base_alone_mode(qwen_engine, qwen_paths, tokenizer):
    """expert=expert_base=None decodes the base alone: greedy equals alpha=0 RAST, sampling draws the
    same tokens as alpha=0 RAST (z is exactly the base logits in both)."""
    alone = RastEngine(qwen_paths["base"], None, None, max_seq_len=96, devices=CPU)
    assert len(alone.lanes) == 1
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=3)):
        got = alone.generate(PROMPTS, max_new_tokens=8, eos_token_id=[], **kw)
        want = qwen_engine.generate(PROMPTS, alpha=0.0, max_new_tokens=8, eos_token_id=[], **kw)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
    with pytest.raises(ValueError, match="expert"):
        RastEngine(qwen_paths["base"], qwen_paths["expert"], None, devices=CPU)


def test_row_independent_of_batch(qwen_engine):
    target = "héllo wörld"
    kw = dict(temperature=1.0, max_new_tokens=12, eos_token_id=[], return_logprobs=True)
    alone = qwen_engine.generate(target, seed=[1234], **kw)[0]
    long = "the quick brown fox jumps over the lazy dog and more " * 2  # P + 12 > 64: attends 96 columns, not 64
    assert len(qwen_engine.tokenizer(long)["input_ids"]) + 12 > 64
    others = ["a", long, target, "nine"]
    batch = qwen_engine.generate(others, seed=[7, 8, 1234, 9], **kw)
    assert batch[2].token_ids == alone.token_ids
    assert batch[2].logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    # inert padding rows (graph buckets) and chunking (> max_batch_size) change nothing either
    qwen_engine.pad_to_buckets = True
    try:
        padded = qwen_engine.generate(others[:3], seed=[7, 8, 1234], **kw)  # 3 rows -> bucket 4
    finally:
        qwen_engine.pad_to_buckets = False
    assert [o.token_ids for o in padded] == [o.token_ids for o in batch[:3]]
    small = RastEngine(*qwen_engine.models.values(), tokenizer=qwen_engine.tokenizer, max_batch_size=2,
                       max_seq_len=96, devices=CPU)
    chunked = small.generate(others, seed=[7, 8, 1234, 9], **kw)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in batch]


def test_seeds_reproduce_and_differ(qwen_engine):
    kw = dict(temperature=1.0, max_new_tokens=12, eos_token_id=[])
    a = qwen_engine.generate(["the", "the"], seed=5, **kw)
    b = qwen_engine.generate(["the", "the"], seed=5, **kw)
    c = qwen_engine.generate(["the", "the"], seed=6, **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert a[0].token_ids != c[0].token_ids
    assert a[0].token_ids != a[1].token_ids  # prompt index enters the row's seed
    # an int seed means row_seed(seed, i) for prompt i
    assert qwen_engine.generate("the", seed=[row_seed(5, 1)], **kw)[0].token_ids == a[1].token_ids


def test_top_k_one_is_greedy(qwen_engine):
    greedy = qwen_engine.generate(PROMPTS, temperature=0.0, max_new_tokens=6, eos_token_id=[])
    topk1 = qwen_engine.generate(PROMPTS, temperature=0.8, top_k=1, max_new_tokens=6, eos_token_id=[], seed=3)
    assert [o.token_ids for o in topk1] == [o.token_ids for o in greedy]


def test_eos_stop_strings_and_length(qwen_engine, tokenizer):
    kw = dict(temperature=1.0, max_new_tokens=16, seed=[11])
    ref = qwen_engine.generate("the lazy", eos_token_id=[], **kw)[0]
    assert ref.finish_reason == "length" and len(ref.token_ids) == 16 and ref.stop_reason is None
    toks = ref.token_ids
    k = next(k for k in range(2, 16) if toks[k] not in toks[:k])
    out = qwen_engine.generate("the lazy", eos_token_id=[toks[k], 299], **kw)[0]
    assert out.finish_reason == "stop" and out.stop_reason == toks[k]
    assert out.token_ids == toks[:k]  # the EOS id itself is not returned
    # stop string: a 2-character piece of the reference text, past its first few characters
    text = ref.text
    j = next(j for j in range(3, len(text) - 1) if "\ufffd" not in text[j:j + 2] and text[j:j + 2].strip())
    stop = text[j:j + 2]
    out = qwen_engine.generate("the lazy", eos_token_id=[], stop=["never-there", stop], **kw)[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.find(stop)]
    assert out.token_ids == toks[:len(out.token_ids)]
    assert stop in tokenizer.decode(out.token_ids) and stop not in tokenizer.decode(out.token_ids[:-1])


def test_sampler_error_finishes_row(tokenizer):
    """A row whose combined logits turn NaN ends with "error" naming the step; the other rows go on."""
    models = [make_model("qwen2", w, s) for w, s in zip(WIDTHS.values(), (1, 2, 3))]
    clean = RastEngine(*models, tokenizer=tokenizer, max_seq_len=32, devices=CPU).generate([[3, 4]], max_new_tokens=4,
                                                                              eos_token_id=[], seed=[5])
    with torch.no_grad():
        models[1].get_input_embeddings().weight[7].fill_(float("nan"))  # token 7 poisons the expert's row
    engine = RastEngine(*models, tokenizer=tokenizer, max_seq_len=32, devices=CPU)
    bad, good = engine.generate([[7, 3], [3, 4]], max_new_tokens=4, eos_token_id=[], seed=[9, 5])
    assert bad.finish_reason == "error" and bad.token_ids == [] and "decode step 0" in bad.error
    assert good.finish_reason == "length" and good.token_ids == clean[0].token_ids


def test_sampler_error_mid_generation(tokenizer):
    """Poison the expert's embedding of the k-th greedy token: the row keeps tokens 0..k and fails at
    step k + 1, the first step that feeds that token back."""
    models = [make_model("llama", w, s) for w, s in zip(WIDTHS.values(), (4, 5, 6))]
    prompt = [3, 4, 5]
    ref = RastEngine(*models, tokenizer=tokenizer, max_seq_len=32, devices=CPU).generate(
        [prompt], temperature=0.0, max_new_tokens=8, eos_token_id=[])[0].token_ids
    k = next(k for k in range(1, 8) if ref[k] not in ref[:k] and ref[k] not in prompt)
    with torch.no_grad():
        models[1].get_input_embeddings().weight[ref[k]].fill_(float("nan"))
    out = RastEngine(*models, tokenizer=tokenizer, max_seq_len=32, devices=CPU).generate(
        [prompt, prompt], temperature=0.0, max_new_tokens=8, eos_token_id=[])
    for o in out:
        assert o.finish_reason == "error" and o.token_ids == ref[:k + 1]
        assert f"decode step {k + 1} " in o.error


def test_stream_equals_generate(qwen_engine):
    for seed, stop in [(1, None), (2, None), (3, ["e"]), (4, ["ab", "\n"])]:
        kw = dict(temperature=1.0, max_new_tokens=20, seed=[seed], stop=stop, eos_token_id=[])
        pieces = list(qwen_engine.stream("héllo 日本", **kw))
        assert "".join(pieces) == qwen_engine.generate("héllo 日本", **kw)[0].text
        assert all(pieces)


def test_token_id_prompts_and_output_type(qwen_engine, tokenizer):
    ids = tokenizer("the quick")["input_ids"]
    a = qwen_engine.generate(ids, temperature=0.0, max_new_tokens=5, eos_token_id=[], progress=True)
    b = qwen_engine.generate([ids, ids], temperature=0.0, max_new_tokens=5, eos_token_id=[])
    c = qwen_engine.generate("the quick", temperature=0.0, max_new_tokens=5, eos_token_id=[])
    assert len(a) == 1 and isinstance(a[0], GenerationOutput)
    assert a[0].token_ids == b[1].token_ids == c[0].token_ids
    assert a[0].text == tokenizer.decode(a[0].token_ids)


def test_bad_input(qwen_engine, qwen_paths, tokenizer):
    e = qwen_engine
    assert e.generate([]) == []
    with pytest.raises(ValueError, match=r"prompts\[0\]: empty prompt"):
        e.generate("")
    with pytest.raises(ValueError, match=r"prompts\[1\]: empty prompt"):
        e.generate([[3], []])
    with pytest.raises(ValueError, match=r"prompts\[0\].*exceed max_seq_len=96"):
        e.generate("the quick brown fox " * 8, max_new_tokens=80)
    with pytest.raises(ValueError, match=r"token id 300 outside"):
        e.generate([[1, 300]])
    with pytest.raises(ValueError, match="temperature"):
        e.generate("a", temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        e.generate("a", top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        e.generate("a", max_new_tokens=0)
    with pytest.raises(ValueError, match="stop"):
        e.generate("a", stop=[""])
    with pytest.raises(ValueError, match="seed"):
        e.generate(["a", "b"], seed=[1])
    with pytest.raises(TypeError, match="prompts"):
        e.generate(3)
    m = list(e.models.values())
    with pytest.raises(ValueError, match=r"devices: unknown key 'bass'"):
        RastEngine(*m, tokenizer=tokenizer, devices={"bass": "cpu"})
    with pytest.raises(ValueError, match=r"devices\['expert'\]"):
        RastEngine(*m, tokenizer=tokenizer, devices={"expert": "tpu:0"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"devices\['base'\].*CUDA is not available"):
            RastEngine(*m, tokenizer=tokenizer, devices={"base": "cuda:0"})
    with pytest.raises(ValueError, match=r"max_seq_len"):
        RastEngine(*m, tokenizer=tokenizer, max_seq_len=0, devices=CPU)
    with pytest.raises(TypeError, match=r"max_batch_size"):
        RastEngine(*m, tokenizer=tokenizer, max_batch_size=2.5, devices=CPU)
    with pytest.raises(TypeError, match=r"use_cuda_graph"):
        RastEngine(*m, tokenizer=tokenizer, use_cuda_graph="yes", devices=CPU)
    with pytest.raises(ValueError, match=r"attn_implementation"):
        RastEngine(*m, tokenizer=tokenizer, attn_implementation="flash", devices=CPU)
    with pytest.raises(ValueError, match=r"dtype"):
        RastEngine(*m, tokenizer=tokenizer, dtype="int8", devices=CPU)


def test_mismatched_tokenizers(qwen_paths, tokenizer):
    other = make_tokenizer(extra_corpus=["zzzz qqqq xxxx " * 10])  # same size, different merges
    assert len(other) == len(tokenizer) and other.get_vocab() != tokenizer.get_vocab()
    with pytest.raises(ValueError, match=r"tokenizers differ: id \d+ is .* in the given's tokenizer but .* in base's"):
        RastEngine(qwen_paths["base"], qwen_paths["expert"], qwen_paths["expert_base"], tokenizer=other, devices=CPU)
    models = [make_model("qwen2", w, s) for w, s in zip(WIDTHS.values(), (1, 2, 3))]  # no saved tokenizer
    with pytest.raises(ValueError, match="tokenizer: none given"):
        RastEngine(*models, devices=CPU)
    narrow = make_model("qwen2", 200, 1)
    with pytest.raises(ValueError, match=r"expert: embedding / LM-head widths \(200, 200\) are smaller"):
        RastEngine(models[0], narrow, models[2], tokenizer=tokenizer, devices=CPU)


def test_sliding_window_refused(tokenizer):
    sw = make_model("qwen2", 304, 2, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    base, eb = make_model("qwen2", 320, 1), make_model("qwen2", 312, 3)
    with pytest.raises(ValueError, match=r"expert: has sliding-window attention layers \(window 16\)"):
        RastEngine(base, sw, eb, tokenizer=tokenizer, max_seq_len=64, devices=CPU)
    RastEngine(base, sw, eb, tokenizer=tokenizer, max_seq_len=16, devices=CPU)  # window covers the whole cache: fine


def test_mixed_families_same_tokenizer(tokenizer, qwen_paths, llama_paths):
    """A Qwen2 base with Llama expert / expert base sharing the tokenizer: allowed, and exact."""
    paths = [qwen_paths["base"], llama_paths["expert"], llama_paths["expert_base"]]
    engine = RastEngine(*paths, max_seq_len=64, devices=CPU)
    outs = engine.generate(PROMPTS[:2], alpha=1.5, temperature=0.0, max_new_tokens=6, eos_token_id=[])
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == _oracle_greedy(paths, tokenizer, p, 1.5, 6)


def test_engine_cache_reused(qwen_paths):
    clear_engine_cache()
    a = get_engine(qwen_paths["base"], qwen_paths["expert"], qwen_paths["expert_base"], max_seq_len=64, devices=CPU)
    b = get_engine(qwen_paths["base"], qwen_paths["expert"], qwen_paths["expert_base"], max_seq_len=64, devices=CPU)
    c = get_engine(qwen_paths["base"], qwen_paths["expert"], qwen_paths["expert_base"], max_seq_len=80, devices=CPU)
    assert a is b and c is not a


def test_rast_decode_attention_matches_sdpa(qwen_paths):
    """attn_implementation="rast_decode" (the decode-attention kernel fed each row's cache range; Triton
    under the interpreter when tests/conftest.py sets TRITON_INTERPRET, hence the small run) gives the
    same tokens as SDPA with the engine's masks, left padding included."""
    trio = [qwen_paths[r] for r in WIDTHS]
    prompts = [PROMPTS[0], PROMPTS[2]]
    kw = dict(alpha=0.7, temperature=1.0, max_new_tokens=4, eos_token_id=[], seed=[1, 2], return_logprobs=True)
    ref = RastEngine(*trio, max_seq_len=48, devices=CPU).generate(prompts, **kw)
    got = RastEngine(*trio, max_seq_len=48, devices=CPU, attn_implementation="rast_decode").generate(prompts, **kw)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    for a, b in zip(got, ref):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_state_fully_reset_between_calls(qwen_engine):
    """Whatever a call, or decode steps of an idle engine (what the graph warm-up runs: every slot inert), leave
    in the slot state and the pools is reset by the next admission: results equal a fresh engine's."""
    kw = dict(temperature=1.0, max_new_tokens=10, eos_token_id=[], seed=[3, 4])
    fresh = RastEngine(*qwen_engine.models.values(), tokenizer=qwen_engine.tokenizer, max_seq_len=96, devices=CPU)
    expect = fresh.generate(PROMPTS[:2], **kw)
    qwen_engine.generate(PROMPTS[2:], temperature=1.0, max_new_tokens=30, stop="x", seed=1)  # a longer call
    state = qwen_engine.runner.state
    # inert rows change nothing but the ring's scratch column (and the pools' scratch block)
    rows = lambda: [t.clone() for t in state.per_slot() if t is not state.ring_tok and t is not state.ring_lp] + \
        [state.ring_tok[:, :-1].clone(), state.ring_lp[:, :-1].clone()]  # noqa: E731
    before = rows()
    with torch.no_grad():
        for _ in range(3):
            qwen_engine.runner.step_rows(4, 96, False)
    assert all(torch.equal(a, b) for a, b in zip(before, rows()))
    got = qwen_engine.generate(PROMPTS[:2], **kw)
    assert [o.token_ids for o in got] == [o.token_ids for o in expect]


def test_deferred_polling_gives_the_same_outputs(qwen_engine):
    """The CUDA host loop (poll every few steps, read each poll one poll later) exercised on the CPU:
    rows ending early by EOS or stop strings, and the rest, come out exactly as with per-step polls."""
    defaults = qwen_engine.poll_interval, qwen_engine.defer_polls
    qwen_engine.poll_interval, qwen_engine.defer_polls = 1, False  # the reference: every step, read at once
    prompts = PROMPTS + ["nine"]
    kw = dict(temperature=1.0, max_new_tokens=25, seed=[1, 2, 3, 4], return_logprobs=True)
    plain = qwen_engine.generate(prompts, eos_token_id=[], **kw)
    # stop strings that end rows 1 and 2 early: characters of their own texts
    stops = [next(c for c in o.text[j:] if c != "\ufffd") for o, j in ((plain[1], 6), (plain[2], 10))]
    kw["stop"] = stops
    ref = qwen_engine.generate(prompts, **kw)
    assert ref[1].finish_reason == ref[2].finish_reason == "stop"
    eos = ref[0].token_ids[5] if len(ref[0].token_ids) > 5 else 17
    ref_eos = qwen_engine.generate(prompts, eos_token_id=[eos], **kw)
    try:
        qwen_engine.poll_interval, qwen_engine.defer_polls = 3, True
        got = qwen_engine.generate(prompts, **kw)
        got_eos = qwen_engine.generate(prompts, eos_token_id=[eos], **kw)
    finally:
        qwen_engine.poll_interval, qwen_engine.defer_polls = defaults
    for a, b in zip(got + got_eos, ref + ref_eos):
        assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == \
               (b.token_ids, b.text, b.finish_reason, b.stop_reason)
        # rows that end early leave the batch one window later here, so the others run in other batch shapes for
        # a few steps: the GEMMs may round the last bits differently (tokens are unaffected)
        assert a.logprobs == pytest.approx(b.logprobs, rel=1e-5, abs=1e-5)
    assert {o.finish_reason for o in ref + ref_eos} >= {"stop"}
