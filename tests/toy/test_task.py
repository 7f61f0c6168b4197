"""The toy task: formats, answer checking, tokenizer agreement, and the train/held-out split."""
import random
import re

import pytest

from rast_kernels.toy import task
from rast_kernels.toy.tokenizer import EOS_ID, PAD_ID, VOCAB, build_tokenizer, decode, encode


def test_answers_and_formats():
    rng = random.Random(3)
    for _ in range(300):
        p = task.sample_problem(rng)
        bits = p.prompt[1:-1]
        assert len(bits) == task.N_BITS and p.answer == bits.count("1") % 2  # independent of steps()
        assert task.parse_prompt(p.prompt) == p
        assert task.check_answer(p, p.direct()) and task.check_answer(p, p.worked())
        assert task.style_of(p.direct()) == "direct" and task.style_of(p.worked()) == "worked"
        m = re.fullmatch(r"S([0-9a-g]+)([EO])" + re.escape(task.EOS), p.worked())
        running = [int(c, 17) for c in m.group(1)]  # counts 10..16 are written a..g
        assert len(running) == task.N_BITS and m.group(2) == "EO"[running[-1] % 2]
        assert p.direct() == "EO"[p.answer] + task.EOS
        for k in range(task.N_BITS):  # each step is the count of ones so far
            assert running[k] == bits[:k + 1].count("1")
        assert not task.check_answer(p, "EO"[1 - p.answer] + task.EOS)
    assert task.extract_answer("S0112") is None and task.extract_answer("") is None
    assert task.extract_answer("S0112O") == 1 and task.extract_answer("E") == 0
    assert task.style_of("S01") == "worked" and task.style_of("O") == "direct" and task.style_of("") == "other"


@pytest.mark.parametrize("bad", ["0101=", "Q0121=", "Q=", 5, "Q01", "Qab="])
def test_parse_prompt_rejects(bad):
    with pytest.raises(ValueError, match="prompt"):
        task.parse_prompt(bad)


def test_problem_validation():
    for bad in ((), (0, 2), (True, 0)):
        with pytest.raises(ValueError, match="bits"):
            task.Problem(bad)


def test_heldout_split_is_disjoint_from_training_streams():
    # the same generators that pretraining (corpus_example) and RL (sample_problem) draw from
    held = {p.prompt for p in task.heldout_problems(500)}
    assert all(task.is_heldout(p) for p in held)
    rng = random.Random(0)
    for _ in range(5000):
        prompt, _ = task.corpus_example(rng, 0.5)
        assert not task.is_heldout(prompt) and prompt not in held
        assert not task.is_heldout(task.sample_problem(rng).prompt)
    # the split is a real one: about 1/5 of all problems
    r = random.Random(5)
    share = sum(task.is_heldout(task._random_problem(r).prompt) for _ in range(4000)) / 4000
    assert 0.17 < share < 0.23, share


def test_heldout_prefix_and_distinct():
    a, b = task.heldout_problems(200), task.heldout_problems(20)
    assert a[:20] == b and len({p.prompt for p in a}) == 200


def test_tokenizer_matches_fast_encoder():
    tok = build_tokenizer()
    rng = random.Random(1)
    for _ in range(50):
        p = task.sample_problem(rng)
        text = p.prompt + p.worked()
        assert tok(text)["input_ids"] == encode(text)
        assert decode(encode(text)) == text.replace(task.EOS, "")
        assert tok.decode(encode(text), skip_special_tokens=True) == decode(encode(text))
    assert tok.eos_token_id == EOS_ID and tok.pad_token_id == PAD_ID and len(tok) == len(VOCAB)
