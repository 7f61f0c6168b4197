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


def test_heldout_size_is_the_count_of_the_split():
    assert task.heldout_size() == task.HELDOUT_SIZE
    assert task.heldout_size(4) == sum(task.is_heldout("Q" + format(v, "04b") + "=") for v in range(16))


def test_heldout_problems_whole_split_terminates_and_keeps_prefixes():
    # asking for the whole split used to take the coupon-collector tail; more than it used to hang
    full = task.heldout_problems(task.HELDOUT_SIZE)
    assert len({p.prompt for p in full}) == task.HELDOUT_SIZE and all(task.is_heldout(p.prompt) for p in full)
    assert full[:500] == task.heldout_problems(500)  # the shipped evaluation set is unchanged
    # a count the random draws alone do not reach (it takes the seeded remainder too) is still a prefix
    assert task.heldout_problems(12500) == full[:12500]
    assert task.heldout_problems(0) == []


@pytest.mark.parametrize("count,exc", [(task.HELDOUT_SIZE + 1, ValueError), (100000, ValueError), (-1, ValueError),
                                       (2.0, TypeError), (True, TypeError)])
def test_heldout_problems_rejects_impossible_counts(count, exc):
    with pytest.raises(exc, match="count"):
        task.heldout_problems(count)


def test_sample_problem_raises_instead_of_looping():
    class Stuck(random.Random):  # always the same bits: only one split can ever be hit
        def randrange(self, *a, **k):
            return 0

    other_split = not task.is_heldout("Q" + "0" * task.N_BITS + "=")
    with pytest.raises(RuntimeError, match="sample_problem"):
        task.sample_problem(Stuck(0), heldout=other_split)
    assert task.sample_problem(Stuck(0), heldout=not other_split).bits == (0,) * task.N_BITS


@pytest.mark.parametrize("frac", [-0.1, 1.5, float("nan")])
def test_corpus_example_rejects_bad_fraction(frac):
    with pytest.raises(ValueError, match="worked_fraction"):
        task.corpus_example(random.Random(0), frac)
