import itertools
import math

import pytest

from rast_kernels.eval.metrics import majority_score, mean_se, pass_at_k, summarize


def brute_pass_at_k(n, c, k):
    # the definition: the share of k-subsets of the n samples that hold at least one correct one
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_subset_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 3) == 1.0
    assert pass_at_k(10, 1, 10) == 1.0  # k = n: the one correct sample is always drawn
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # large n: the exact binomial formula through Python ints agrees, and nothing overflows
    n, c, k = 1000, 7, 50
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


def test_pass_at_k_bad_arguments():
    with pytest.raises(ValueError, match="k"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="k"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="c"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="n"):
        pass_at_k(0, 0, 1)
    with pytest.raises(TypeError, match="k"):
        pass_at_k(4, 1, 1.0)


def test_majority_ties_and_abstentions():
    assert majority_score(["3", "3", "4"], [True, True, False]) == 1.0
    assert majority_score(["3", "4", "4"], [True, False, False]) == 0.0
    assert majority_score(["3", "4"], [True, False]) == 0.5  # a tie scores the correct share of the tied answers
    assert majority_score(["3", "4", "5", "5"], [False, False, True, True]) == 1.0
    assert majority_score([None, None, "4"], [False, False, False]) == 0.0  # None never votes
    assert majority_score([None, None, "4"], [False, False, True]) == 1.0
    assert majority_score([None, None], [False, False]) == 0.0
    with pytest.raises(ValueError, match="lengths"):
        majority_score(["1"], [True, False])


def test_mean_se():
    m, se = mean_se([0.0, 1.0, 1.0, 0.0])
    assert m == 0.5
    assert se == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))
    assert math.isnan(mean_se([1.0])[1])
    with pytest.raises(ValueError, match="values"):
        mean_se([])


def test_summarize():
    probs = [dict(correct=[True, False, False, False], answers=["1", "2", "2", "3"]),
             dict(correct=[True, True, True, True], answers=["5", "5", "5", "5"])]
    s = summarize(probs, [1, 2, 4])
    assert s["problems"] == 2 and s["samples"] == 8
    assert s["pass@1"][0] == pytest.approx((0.25 + 1.0) / 2)
    assert s["pass@2"][0] == pytest.approx((brute_pass_at_k(4, 1, 2) + 1.0) / 2)
    assert s["pass@4"][0] == 1.0
    assert s["maj@1"][0] == pytest.approx(1.0)  # the first sample of each is right
    assert s["maj@2"][0] == pytest.approx((0.5 + 1.0) / 2)  # "1" and "2" tie on problem 0
    assert s["maj@4"][0] == pytest.approx(0.5)  # "2" wins problem 0
    with pytest.raises(ValueError, match="ks"):
        summarize(probs, [5])
