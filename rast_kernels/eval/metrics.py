"""Accuracy metrics over problems with several samples each, with standard errors across problems.

Every metric is a per-problem score averaged over problems; its standard error is the sample standard deviation
of the per-problem scores (``ddof=1``) over ``sqrt(#problems)``: the uncertainty from which problems were drawn,
the usual error bar of a benchmark table (the per-problem sampling noise is inside that spread). With one problem
the standard error is ``nan`` (undefined).

* **pass@1** (mean accuracy over the samples): per problem ``c / n``.
* **pass@k**: per problem the unbiased estimator of Chen et al. 2021, :func:`pass_at_k`.
* **maj@k**: per problem, a vote over the extracted answers of its first ``k`` samples (sample index order).
  Samples without an extracted answer (``None``) do not vote; when none voted the score is 0. A tie between
  several most-voted answers scores the share of them that are correct: the expected score of breaking the tie
  uniformly at random, so ties neither favour nor punish a configuration.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Optional, Sequence


def _count(name, value, low=0):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of ``k`` samples drawn without replacement from ``n`` samples, ``c`` of
    them correct, is correct: ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021, unbiased for pass@k).

    Computed as ``1 - prod_{i = n-c+1}^{n} (1 - k / i)``, a product of factors in ``[0, 1]`` (no huge
    binomials, no cancellation). ``ValueError`` naming the argument for ``n < 1``, ``c`` outside ``[0, n]``,
    ``k < 1`` or ``k > n``."""
    _count("n", n, 1)
    _count("c", c, 0)
    _count("k", k, 1)
    if c > n:
        raise ValueError(f"c: must be <= n = {n}, got {c}")
    if k > n:
        raise ValueError(f"k: must be <= n = {n} (pass@k needs at least k samples), got {k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_score(answers: Sequence[Optional[str]], correct: Sequence[bool]) -> float:
    """maj@k of one problem over the given samples (all of them; the caller picks the first ``k``): module
    docstring. ``answers[i]`` is sample ``i``'s extracted answer (None: none), ``correct[i]`` its grade."""
    if len(answers) != len(correct):
        raise ValueError(f"answers, correct: lengths differ ({len(answers)} vs {len(correct)})")
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winners = [a for a, v in votes.items() if v == top]
    right = {a for a, ok in zip(answers, correct) if a is not None and ok}
    return sum(a in right for a in winners) / len(winners)


def mean_se(values: Sequence[float]) -> tuple:
    """``(mean, standard error)`` of per-problem scores (``nan`` s.e. for fewer than 2; ``ValueError`` if empty)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("values: no problems to average")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var / len(vals))


def summarize(per_problem: Sequence[dict], ks: Sequence[int]) -> dict:
    """Metrics of one configuration on one dataset.

    ``per_problem``: one dict per problem with ``correct`` (list of bools, by sample index) and ``answers``
    (extracted answers, same order). Every problem must have at least ``max(ks)`` samples (``ValueError`` naming
    ``ks`` otherwise). Returns ``{"problems", "samples", "pass@1": [mean, se], "pass@k": ..., "maj@k": ...}``
    for each ``k`` in ``ks``."""
    if not per_problem:
        raise ValueError("per_problem: no problems")
    n_min = min(len(p["correct"]) for p in per_problem)
    for k in ks:
        _count("k", k, 1)
        if k > n_min:
            raise ValueError(f"ks: k = {k} is more than the {n_min} samples a problem has")
    out = {"problems": len(per_problem), "samples": sum(len(p["correct"]) for p in per_problem)}
    out["pass@1"] = list(mean_se([sum(p["correct"]) / len(p["correct"]) for p in per_problem]))
    for k in ks:
        out[f"pass@{k}"] = list(mean_se([pass_at_k(len(p["correct"]), sum(p["correct"]), k) for p in per_problem]))
        out[f"maj@{k}"] = list(mean_se([majority_score(p["answers"][:k], p["correct"][:k]) for p in per_problem]))
    return out
