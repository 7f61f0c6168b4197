"""The toy reasoning task: the parity of a bit string, with two answer styles.

A problem is a string of ``N_BITS`` bits; its answer is their parity (1 if the number of ones is odd).
Text formats (one token per character; counts 10..16 are the single tokens ``a``..``g``; the answer
is ``E`` for even or ``O`` for odd)::

    prompt   Q1011001110100101=
    direct   O<eos>                              (the answer in one token)
    worked   S1123334566777889O<eos>             (the running count of ones, then its parity)

Parity is the textbook case where step-by-step output turns a hard function into easy steps: the
direct answer depends on all bits at once, which small transformers do not learn from examples (they
stay near chance, 50 %), while each worked step adds one bit, sitting a fixed distance back in the
question, to the count just written, and the last step maps the count token just written to its parity;
even a 2-layer model learns that in a few hundred steps. Answers are checked exactly (:func:`check_answer`). Problems are split
by a hash of their prompt text (:func:`is_heldout`): held-out prompts never appear in any training
stream (:func:`sample_problem` rejects them), so evaluation is on unseen bit strings.
"""
from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass

EOS = "<eos>"
N_BITS = 16
COUNT_CHARS = "0123456789abcdefg"  # one token per count 0..16
ANSWER_CHARS = "EO"  # parity 0 (even), 1 (odd)
HELDOUT_BUCKETS = 5  # one bucket of five (20 % of all problems) is held out


@dataclass(frozen=True)
class Problem:
    """``bits``: a tuple of 0/1 (at least one)."""

    bits: tuple

    def __post_init__(self):
        if not self.bits or any(b not in (0, 1) or isinstance(b, bool) for b in self.bits):
            raise ValueError(f"bits: expected a non-empty tuple of 0/1 ints, got {self.bits!r}")

    @property
    def n(self) -> int:
        return len(self.bits)

    @property
    def prompt(self) -> str:
        return "Q" + "".join(map(str, self.bits)) + "="

    def steps(self) -> list:
        """The running count of ones after each bit (``n`` values)."""
        out, acc = [], 0
        for b in self.bits:
            acc += b
            out.append(acc)
        return out

    @property
    def answer(self) -> int:
        return sum(self.bits) % 2

    def direct(self) -> str:
        """The one-token answer style (completion only, EOS included)."""
        return ANSWER_CHARS[self.answer] + EOS

    def worked(self) -> str:
        """The step-by-step style (completion only, EOS included)."""
        return "S" + "".join(COUNT_CHARS[c] for c in self.steps()) + ANSWER_CHARS[self.answer] + EOS


def parse_prompt(prompt: str) -> Problem:
    """Inverse of :attr:`Problem.prompt`."""
    if not (isinstance(prompt, str) and len(prompt) > 2 and prompt[0] == "Q" and prompt[-1] == "="
            and set(prompt[1:-1]) <= {"0", "1"}):
        raise ValueError(f"prompt: expected 'Q<bits>=', got {prompt!r}")
    return Problem(tuple(int(c) for c in prompt[1:-1]))


def extract_answer(completion: str):
    """The parity (0/1) named by the first ``E``/``O`` of a completion, or ``None`` if there is none."""
    for ch in completion:
        if ch in ANSWER_CHARS:
            return ANSWER_CHARS.index(ch)
    return None


def check_answer(problem: Problem, completion: str) -> bool:
    """Exact-answer reward: the completion's answer equals the true parity."""
    return extract_answer(completion) == problem.answer


def style_of(completion: str) -> str:
    """``'worked'`` if the completion starts with ``S``, ``'direct'`` if with the answer, else ``'other'``."""
    if completion[:1] == "S":
        return "worked"
    return "direct" if completion[:1] and completion[:1] in ANSWER_CHARS else "other"


def is_heldout(prompt: str) -> bool:
    """True for the evaluation split: a fixed 1/HELDOUT_BUCKETS of all prompts by SHA-256."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return h % HELDOUT_BUCKETS == 0


HELDOUT_SIZE = 13059  # distinct held-out N_BITS-bit problems; tests/toy/test_task.py recounts it


@functools.lru_cache(maxsize=None)
def heldout_size(n_bits: int = N_BITS) -> int:
    """How many distinct ``n_bits``-bit problems the held-out split has: the most :func:`heldout_problems`
    can return (:data:`HELDOUT_SIZE` for ``N_BITS``). Counted by hashing all ``2**n_bits`` prompts."""
    return sum(is_heldout(p) for p in _all_prompts(n_bits))


def _all_prompts(n_bits: int):
    return ("Q" + format(v, f"0{n_bits}b") + "=" for v in range(2 ** n_bits))


def _random_problem(rng: random.Random, n: int = N_BITS) -> Problem:
    return Problem(tuple(rng.randrange(2) for _ in range(n)))


# Rejection sampling below is bounded so that no generator here can loop forever: one draw lands in a
# split with probability 1/5 or 4/5, so 10_000 misses in a row (p < 1e-900) means a broken rng or split.
MAX_REJECTIONS = 10_000


def sample_problem(rng: random.Random, heldout: bool = False) -> Problem:
    """A uniformly random problem from one split (``heldout=False``: never a held-out one)."""
    for _ in range(MAX_REJECTIONS):
        p = _random_problem(rng)
        if is_heldout(p.prompt) == heldout:
            return p
    raise RuntimeError(f"sample_problem: no {'held-out' if heldout else 'training'} problem in "
                       f"{MAX_REJECTIONS} draws (is rng a random.Random?)")


def heldout_problems(count: int, seed: int = 1234) -> list:
    """``count`` distinct held-out problems; the list for a smaller ``count`` (same seed) is a prefix.

    ``count`` may be at most :data:`HELDOUT_SIZE` (13059): there are no more distinct held-out problems,
    and asking for more used to wait forever. Problems are drawn at random (rejecting repeats) for the
    first ``2 * HELDOUT_SIZE`` draws; if those do not give ``count`` problems (only counts close to
    the whole split need that many), the missing ones follow from the unseen rest of the split in a
    seeded random order. The switch depends only on the draw count, never on ``count``, so the prefix
    property holds for every pair of counts, and the result is always exact and finite."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count: expected an int, got {type(count).__name__}")
    size = HELDOUT_SIZE
    if not 0 <= count <= size:
        raise ValueError(f"count: must be between 0 and {size} (the held-out split's size), got {count}")
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(2 * size):
        if len(out) >= count:
            return out
        p = sample_problem(rng, heldout=True)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    rest = [parse_prompt(q) for q in _all_prompts(N_BITS) if q not in seen and is_heldout(q)]
    rng.shuffle(rest)
    return out + rest[:count - len(out)]


def corpus_example(rng: random.Random, worked_fraction: float) -> tuple:
    """One pretraining document ``(prompt, completion)`` from the training split: worked style with
    probability ``worked_fraction``, direct style otherwise. Both styles are always correct."""
    if not 0.0 <= worked_fraction <= 1.0:  # also False for NaN
        raise ValueError(f"worked_fraction: must be in [0, 1], got {worked_fraction!r}")
    p = sample_problem(rng)
    return p.prompt, (p.worked() if rng.random() < worked_fraction else p.direct())
