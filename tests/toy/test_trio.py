"""The shipped trio: loads through transformers and rast_generate, shares one tokenizer, and reproduces
its shipped evaluation table on a held-out subset."""
import filecmp
import json
import os

import pytest
import torch

from rast_kernels.toy import task
from rast_kernels.toy.tokenizer import EOS_ID, VOCAB, decode, encode
from rast_kernels.ops.philox import mix_seed
from rast_kernels.toy.common import DEFAULT_OUT, MAX_NEW_TOKENS, load_trio
from rast_kernels.toy.train import generate

ROLES = ("base", "expert", "expert_base")
# the shipped table was measured in fp32 on the CPU and the tolerances below are calibrated to that;
# without these the engine would pick bf16 on a GPU machine and flip many more near-ties
CPU_FP32 = dict(devices="cpu", dtype=torch.float32)
K = 50  # held-out problems recomputed here: the first K of the shipped evaluation set


@pytest.fixture(scope="module")
def shipped():
    with open(os.path.join(DEFAULT_OUT, "eval.json")) as f:
        ev = json.load(f)
    return ev


@pytest.fixture(scope="module")
def trio():
    return load_trio(DEFAULT_OUT)


def _row(ev, name, decoding):
    return next(r for r in ev["table"] if r["row"] == name and r["decoding"] == decoding)


def test_files_and_shared_tokenizer():
    total = 0
    for role in ROLES:
        d = os.path.join(DEFAULT_OUT, role)
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert os.path.isfile(os.path.join(d, f)), (role, f)
        total += os.path.getsize(os.path.join(d, "model.safetensors"))
        assert filecmp.cmp(os.path.join(d, "tokenizer.json"), os.path.join(DEFAULT_OUT, "base", "tokenizer.json"),
                           shallow=False)
    assert total < 10 * 2**20, f"trio weighs {total / 2**20:.1f} MiB"


def test_loads_with_plain_transformers(trio):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sizes = {}
    for role in ROLES:
        path = os.path.join(DEFAULT_OUT, role)
        m = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert type(m).__name__ == "LlamaForCausalLM"
        assert m.config.vocab_size == len(VOCAB) == len(tok)
        assert tok.eos_token_id == EOS_ID == m.config.eos_token_id
        sizes[role] = sum(p.numel() for p in m.parameters())
        # the shipped tokenizer is the training encoder
        p = task.heldout_problems(3)[2]
        assert tok(p.prompt + p.worked())["input_ids"] == encode(p.prompt + p.worked())
    assert sizes["base"] > 2 * sizes["expert"] and sizes["expert"] == sizes["expert_base"]
    # RL changed the expert: its weights differ from its base's
    eb, ex = trio["expert_base"].state_dict(), trio["expert"].state_dict()
    assert any(not torch.equal(eb[k], ex[k]) for k in eb)


def test_table_shape_and_claim(shipped):
    # the headline: base + delta beats base alone by more than two paired standard errors (greedy, alpha=1)
    g = shipped["gain_over_base"]["alpha=1 greedy"]
    assert g["gain"] > 2 * g["paired_stderr"], g
    names = {r["row"] for r in shipped["table"]}
    assert {"base", "expert", "expert_base", "base + delta (alpha=1)"} <= names
    for r in shipped["table"]:
        assert len(r["correct"]) == shipped["eval"]["problems"] and abs(sum(r["correct"]) / r["n"] - r["accuracy"]) < 1e-12


@pytest.mark.parametrize("name,alpha", [("base", None), ("expert", None), ("base + delta (alpha=1)", 1.0)])
def test_recompute_with_training_loop(trio, shipped, name, alpha):
    """The training-time decoder on the first K shipped problems: greedy and sampled rows use the same
    row keys as the shipped run, so per-problem results must agree; 1 flip in K is allowed for
    floating-point near-ties (batch size changes the GEMM blocking)."""
    problems = task.heldout_problems(K, shipped["eval"]["eval_seed"])
    prompts = [encode(p.prompt) for p in problems]
    models = (trio["base"], trio["expert"], trio["expert_base"]) if alpha is not None else trio[name]
    for decoding in ("greedy", "sample"):
        ref = _row(shipped, name, decoding)
        comps = generate(models, prompts, alpha=alpha or 0.0, temperature=ref["temperature"],
                         seed=shipped["eval"]["sample_seed"])
        got = [int(task.check_answer(p, decode(c))) for p, c in zip(problems, comps)]
        flips = sum(a != b for a, b in zip(got, ref["correct"][:K]))
        assert flips <= 1, (name, decoding, flips)


def _rast_generate():
    try:
        from rast_kernels.engine import rast_generate
    except ImportError as e:  # the engine is a separate module of this package
        pytest.fail(f"rast_kernels.engine.rast_generate not importable: {e}")
    return rast_generate


def _engine_row(rast_generate, trio, tok, problems, name, alpha, temperature, seed):
    roles = ("base", "expert", "expert_base") if alpha is not None else (name,) * 3
    res = rast_generate([p.prompt for p in problems], base=trio[roles[0]], expert=trio[roles[1]],
                        expert_base=trio[roles[2]], tokenizer=tok, alpha=alpha or 0.0, temperature=temperature,
                        max_new_tokens=MAX_NEW_TOKENS, seed=[mix_seed(seed, i) for i in range(len(problems))],
                        max_batch_size=len(problems), max_seq_len=64, **CPU_FP32)
    return res


def test_loads_through_rast_generate(trio):
    from transformers import AutoTokenizer

    rast_generate = _rast_generate()
    p = task.heldout_problems(4)[3]
    paths = {r: os.path.join(DEFAULT_OUT, r) for r in ROLES}
    out = rast_generate([p.prompt], base=paths["base"], expert=paths["expert"], expert_base=paths["expert_base"],
                        alpha=1.0, temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, max_batch_size=1, max_seq_len=64,
                        **CPU_FP32)
    assert len(out) == 1 and out[0].finish_reason in ("stop", "length")
    tok = AutoTokenizer.from_pretrained(paths["base"])
    assert out[0].text == tok.decode(out[0].token_ids, skip_special_tokens=True)
    # same tokens as the training-time decoder on the same loaded weights
    ref = generate((trio["base"], trio["expert"], trio["expert_base"]), [encode(p.prompt)], alpha=1.0)[0]
    assert out[0].token_ids == [t for t in ref if t != EOS_ID]


@pytest.mark.parametrize("name,alpha", [("base", None), ("expert", None), ("base + delta (alpha=1)", 1.0)])
def test_recompute_table_through_rast_generate(trio, shipped, name, alpha):
    """The shipped table's rows recomputed through ``rast_generate`` on the first K held-out problems.

    Same weights, same per-row Philox seeds (``mix_seed``) and offsets, so each problem's result can
    only change where the engine's floating-point logits (own KV cache, other batch shapes) flip a
    near-tie. Allowed: 2 of K problems per row, i.e. 0.04 in accuracy at K = 50, well under one binomial
    standard error of a K-problem accuracy (sqrt(0.25 / 50) = 0.07) and under that of the shipped
    500-problem number (<= 0.022) plus it, so a real mismatch (other weights, other decoding) fails."""
    from transformers import AutoTokenizer

    rast_generate = _rast_generate()
    tok = AutoTokenizer.from_pretrained(os.path.join(DEFAULT_OUT, "base"))
    problems = task.heldout_problems(K, shipped["eval"]["eval_seed"])
    for decoding in ("greedy", "sample"):
        ref = _row(shipped, name, decoding)
        res = _engine_row(rast_generate, trio, tok, problems, name if alpha is None else None, alpha,
                          ref["temperature"], shipped["eval"]["sample_seed"])
        got = [int(task.check_answer(p, r.text)) for p, r in zip(problems, res)]
        flips = sum(a != b for a, b in zip(got, ref["correct"][:K]))
        acc, ref_acc = sum(got) / K, sum(ref["correct"][:K]) / K
        assert flips <= 2, (name, decoding, flips, acc, ref_acc)
