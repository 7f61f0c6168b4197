"""Prompt scoring: :func:`rast_kernels.engine.scoring.combined_logprobs` against the formula written out here,
the server's ``echo`` (OpenAI legacy, as vLLM serves it) against the same oracle, and lm-eval's own
``local-completions`` model against the server on a multiple-choice task, equal to the in-process adapter."""
import json
import math
import os

import pytest
import torch

from rast_kernels.engine.scoring import combined_logprobs
from rast_kernels.toy.common import DEFAULT_OUT, ROLES, load_trio
from serve_helpers import toy_prompts

TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval", "lm_task")


@pytest.fixture(scope="module")
def trio():
    return load_trio(DEFAULT_OUT)


def _oracle(trio, ids, alphas, vocab, pairs=None):
    """log_softmax(z_base + sum_i alpha_i (z_e_i - z_eb_i)) in float64 from plain forwards."""
    pairs = pairs or [("expert", "expert_base")] * len(alphas)
    with torch.no_grad():
        z = {r: m(input_ids=torch.tensor([ids])).logits[0, :, :vocab].double() for r, m in trio.items()}
    total = z["base"].clone()
    for a, (e, eb) in zip(alphas, pairs):
        total += a * (z[e] - z[eb])
    return torch.log_softmax(total, -1)


def test_combined_logprobs_matches_the_formula_for_0_1_2_pairs(trio):
    ids = [21, 3, 4, 4, 3, 20, 22, 3]
    vocab = 25
    got = combined_logprobs({"base": trio["base"]}, ids, (), vocab)
    assert got.shape == (len(ids), vocab) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _oracle(trio, ids, (), vocab), atol=1e-5, rtol=0)
    got = combined_logprobs(trio, ids, (0.7,), vocab)
    torch.testing.assert_close(got.double(), _oracle(trio, ids, (0.7,), vocab), atol=1e-5, rtol=0)
    # two pairs (roles as the engine names them), the second reusing models: each distinct model runs once
    calls = []
    hooks = [m.register_forward_hook(lambda mod, a, out, r=r: calls.append(r)) for r, m in trio.items()]
    try:
        two = {"base": trio["base"], "expert[0]": trio["expert"], "expert_base[0]": trio["expert_base"],
               "expert[1]": trio["expert_base"], "expert_base[1]": trio["base"]}
        got = combined_logprobs(two, ids, (1.5, -0.25), 13)  # fewer columns than the model has
    finally:
        for h in hooks:
            h.remove()
    assert sorted(calls) == sorted(ROLES)
    want = _oracle(trio, ids, (1.5, -0.25), 13, [("expert", "expert_base"), ("expert_base", "base")])
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expert_base"):
        combined_logprobs({"base": trio["base"], "expert": trio["expert"]}, ids, (1.0,), vocab)
    with pytest.raises(ValueError, match="token_ids"):
        combined_logprobs(trio, [], (1.0,), vocab)


def _lp_close(a, b):
    return a is not None and math.isclose(a, b, abs_tol=2e-4)


@pytest.mark.parametrize("alpha", [1.0, -0.5])
def test_echo_scores_the_prompt_under_the_combined_distribution(server, ref_engine, trio, alpha):
    prompt = toy_prompts(1, seed=20)[0]
    ids = ref_engine.tokenizer(prompt)["input_ids"]
    status, body = server.post("/v1/completions", dict(prompt=prompt, echo=True, max_tokens=0, logprobs=3,
                                                      alpha=alpha, n=2))
    assert status == 200, body
    c, twin = body["choices"]
    assert twin == dict(c, index=1)  # nothing sampled: the n choices of a prompt are the same
    assert c["text"] == prompt and c["finish_reason"] == "length"
    lp = c["logprobs"]
    want = _oracle(trio, ids, (alpha,), len(ref_engine.tokenizer))
    assert lp["tokens"] == [ref_engine.tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing precedes the first token
    for i in range(1, len(ids)):
        row = want[i - 1]
        assert _lp_close(lp["token_logprobs"][i], float(row[ids[i]]))
        top = lp["top_logprobs"][i]
        best = torch.topk(row, 3)
        expect = {ref_engine.tokenizer.decode([int(t)]): float(v) for t, v in zip(best.indices, best.values)}
        expect.setdefault(lp["tokens"][i], float(row[ids[i]]))
        assert top.keys() == expect.keys() and all(_lp_close(top[k], v) for k, v in expect.items())
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_echo_with_generation_and_token_prompts(server, ref_engine, trio):
    tok = ref_engine.tokenizer
    prompts = toy_prompts(2, seed=21)
    ids = [tok(p)["input_ids"] for p in prompts]
    body = dict(prompt=[ids[0], prompts[1]], echo=True, max_tokens=40, logprobs=1, temperature=0,
                return_token_ids=True)
    status, out = server.post("/v1/completions", body)
    assert status == 200, out
    for pi, c in enumerate(out["choices"]):
        gen = c["token_ids"]
        prompt_text = tok.decode(ids[0]) if pi == 0 else prompts[1]  # token ids are echoed decoded
        assert c["text"] == prompt_text + tok.decode(gen, skip_special_tokens=True)
        assert c["finish_reason"] == "stop"  # the toy answer ends with EOS well before 40 tokens
        seq = ids[pi] + gen + [tok.eos_token_id]  # the EOS that ended the row is listed, as vLLM lists it
        assert c["logprobs"]["tokens"] == [tok.decode([t]) for t in seq]
        want = _oracle(trio, seq, (1.0,), len(tok))  # the server's default alpha
        lps = c["logprobs"]["token_logprobs"]
        assert len(lps) == len(seq) and lps[0] is None
        assert all(_lp_close(lps[i], float(want[i - 1, seq[i]])) for i in range(1, len(seq)))
        for i in range(len(ids[pi]), len(seq)):  # greedy: every generated token is the distribution's argmax
            assert seq[i] == int(want[i - 1].argmax())
            assert max(c["logprobs"]["top_logprobs"][i].values()) == lps[i]
        assert out["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])
    # echo without logprobs: the text only
    status, out = server.post("/v1/completions", dict(prompt=prompts[1], echo=True, max_tokens=3, seed=2))
    assert status == 200 and out["choices"][0]["text"].startswith(prompts[1]) and out["choices"][0]["logprobs"] is None


def test_lm_eval_local_completions_equals_the_adapter(server):
    """lm-eval's own API model (echo=True, logprobs=1, max_tokens=1, prompts as token ids) on a multiple-choice
    task gives the in-process adapter's loglikelihoods for the same (context, continuation) requests."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's api extra (local-completions needs it)
    from lm_eval.tasks import TaskManager

    from rast_kernels.eval.lm_eval_adapter import RastLM

    out = lm_eval.simple_evaluate(
        model="local-completions", model_args=dict(base_url=server.url + "/v1/completions", model="rast",
                                                   tokenizer=os.path.join(DEFAULT_OUT, "base"),
                                                   tokenizer_backend="huggingface", max_retries=1, num_concurrent=1,
                                                   max_length=512),
        tasks=["rast_toy_mc"], limit=3, log_samples=True,
        task_manager=TaskManager(include_path=TASKS, include_defaults=False))  # not lm-eval's ~20 s task index
    samples = out["samples"]["rast_toy_mc"]
    assert len(samples) == 3
    rast = RastLM(**{r: os.path.join(DEFAULT_OUT, r) for r in ROLES}, alpha=1.0)  # the server's default alpha
    for s in samples:
        args = [tuple(a) for a in s["arguments"]]  # one (context, continuation) per choice
        want = rast.loglikelihood([_Req(*a) for a in args])
        got = [r[0] for r in s["resps"]]
        assert len(args) == len(got) == 2
        for (g_ll, g_greedy), (w_ll, w_greedy) in zip(got, want):
            assert math.isclose(float(g_ll), w_ll, abs_tol=1e-3) and bool(g_greedy) == w_greedy, (args, got, want)
    json.dumps(out["results"])  # plain data


class _Req:
    def __init__(self, *args):
        self.args = args
