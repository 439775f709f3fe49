"""pass@k: the unbiased estimator against brute force over all k-subsets; only k <= n is reported."""
from __future__ import annotations

import itertools
import math

import pytest

from megaocto.eval.passk import pass_at_k, pass_at_k_summary


def _brute(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 7, 10])
def test_estimator_equals_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute(n, c, k), abs=1e-12), (n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_edge_cases_and_errors():
    assert pass_at_k(20, 0, 10) == 0.0
    assert pass_at_k(20, 11, 10) == 1.0  # n - c < k
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    for bad in ((5, 6, 1), (5, 1, 0), (5, 1, 6), (5, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_summary_reports_only_k_up_to_min_n():
    counts = [(20, 5), (20, 0), (20, 20)]
    s = pass_at_k_summary(counts)
    assert sorted(s) == ["pass@1", "pass@10"]  # n = 20: no pass@100, as in the harness
    assert s["pass@1"] == pytest.approx((5 / 20 + 0 + 1) / 3)
    assert s["pass@10"] == pytest.approx((pass_at_k(20, 5, 10) + 0 + 1) / 3)
    assert pass_at_k_summary([(1, 1), (1, 0)]) == {"pass@1": 0.5}
    assert pass_at_k_summary([]) == {}
