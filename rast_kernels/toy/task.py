"""The toy reasoning task: chained single-digit arithmetic modulo 10, with two answer styles.

A problem is ``n`` digits joined by ``+``/``-``; its answer is the running result taken mod 10 after
every operation (so every intermediate value is one digit). Text formats (character tokens)::

    prompt   Q3+5-7+2=
    direct   A3<eos>                       (answer in one token: hard for a tiny model when n > 2)
    worked   S3+5=8;8-7=1;1+2=3;A3<eos>    (one easy step per operation, then the answer)

Answers are checked exactly (:func:`check_answer`). Problems are split by a hash of their prompt text
(:func:`is_heldout`): held-out prompts never appear in any training stream (:func:`sample_problem`
rejects them), so evaluation is on unseen problems.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

EOS = "<eos>"
MIN_OPERANDS, MAX_OPERANDS = 2, 6
HELDOUT_BUCKETS = 5  # one bucket of five (20 % of all problems) is held out


@dataclass(frozen=True)
class Problem:
    """``digits``: n operands in 0..9; ``ops``: n-1 of ``'+'``/``'-'``."""

    digits: tuple
    ops: tuple

    def __post_init__(self):
        if len(self.digits) < 2 or len(self.ops) != len(self.digits) - 1:
            raise ValueError(f"digits/ops: need n >= 2 digits and n-1 ops, got {self.digits}, {self.ops}")
        if any(not (isinstance(d, int) and 0 <= d <= 9) for d in self.digits):
            raise ValueError(f"digits: each must be an int in 0..9, got {self.digits}")
        if any(o not in "+-" for o in self.ops):
            raise ValueError(f"ops: each must be '+' or '-', got {self.ops}")

    @property
    def n(self) -> int:
        return len(self.digits)

    @property
    def prompt(self) -> str:
        s = str(self.digits[0])
        for o, d in zip(self.ops, self.digits[1:]):
            s += o + str(d)
        return "Q" + s + "="

    def steps(self):
        """``[(a, op, b, c)]``: one tuple per operation, ``c = (a op b) mod 10``."""
        out, acc = [], self.digits[0]
        for o, d in zip(self.ops, self.digits[1:]):
            c = (acc + d) % 10 if o == "+" else (acc - d) % 10
            out.append((acc, o, d, c))
            acc = c
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    def direct(self) -> str:
        """The one-token answer style (completion only, EOS included)."""
        return f"A{self.answer}{EOS}"

    def worked(self) -> str:
        """The step-by-step style (completion only, EOS included)."""
        return "S" + "".join(f"{a}{o}{b}={c};" for a, o, b, c in self.steps()) + f"A{self.answer}{EOS}"


def parse_prompt(prompt: str) -> Problem:
    """Inverse of :attr:`Problem.prompt`."""
    if not (isinstance(prompt, str) and prompt.startswith("Q") and prompt.endswith("=")):
        raise ValueError(f"prompt: expected 'Q<d>(<op><d>)+=' , got {prompt!r}")
    body = prompt[1:-1]
    digits, ops = body[0::2], body[1::2]
    try:
        return Problem(tuple(int(d) for d in digits), tuple(ops))
    except (ValueError, TypeError) as e:
        raise ValueError(f"prompt: not a problem: {prompt!r}") from e


def extract_answer(completion: str):
    """The digit after the first ``A`` of a completion, or ``None`` if there is none.

    Text after the answer digit is ignored (generation stops at EOS; a stop string may cut it)."""
    i = completion.find("A")
    if i < 0 or i + 1 >= len(completion) or not completion[i + 1].isdigit():
        return None
    return int(completion[i + 1])


def check_answer(problem: Problem, completion: str) -> bool:
    """Exact-answer reward: the completion's answer digit equals the true answer."""
    return extract_answer(completion) == problem.answer


def style_of(completion: str) -> str:
    """``'worked'`` if the completion starts with ``S``, ``'direct'`` if with ``A``, else ``'other'``."""
    return {"S": "worked", "A": "direct"}.get(completion[:1], "other")


def is_heldout(prompt: str) -> bool:
    """True for the evaluation split: a fixed 1/HELDOUT_BUCKETS of all prompts by SHA-256."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return h % HELDOUT_BUCKETS == 0


def _random_problem(rng: random.Random, n: int) -> Problem:
    return Problem(tuple(rng.randrange(10) for _ in range(n)), tuple(rng.choice("+-") for _ in range(n - 1)))


def sample_problem(rng: random.Random, heldout: bool = False, n: int | None = None) -> Problem:
    """A uniformly random problem with ``n`` operands (default: uniform in 2..6) from one split.

    ``heldout=False`` never returns a held-out problem (rejection sampling)."""
    while True:
        k = rng.randint(MIN_OPERANDS, MAX_OPERANDS) if n is None else n
        p = _random_problem(rng, k)
        if is_heldout(p.prompt) == heldout:
            return p


def heldout_problems(count: int, seed: int = 1234) -> list:
    """``count`` distinct held-out problems, the same list for the same ``(count, seed)`` prefix-wise.

    Operand counts cycle 2..6 so every difficulty is equally represented in any prefix of 5."""
    rng, seen, out = random.Random(seed), set(), []
    span = MAX_OPERANDS - MIN_OPERANDS + 1
    while len(out) < count:
        n = MIN_OPERANDS + len(out) % span
        p = sample_problem(rng, heldout=True, n=n)
        if p.prompt not in seen:  # n = 2 has only 40 held-out problems: allow repeats only if exhausted
            seen.add(p.prompt)
            out.append(p)
        elif n == MIN_OPERANDS and sum(1 for q in out if q.n == 2) >= 40:
            out.append(p)
    return out


def corpus_example(rng: random.Random, worked_fraction: float) -> tuple:
    """One pretraining document ``(prompt, completion)`` from the training split: worked style with
    probability ``worked_fraction``, direct style otherwise. Both styles are always correct."""
    p = sample_problem(rng)
    return p.prompt, (p.worked() if rng.random() < worked_fraction else p.direct())
