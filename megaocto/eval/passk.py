"""pass@k: the unbiased estimator of Chen et al. (2021), as used by bigcode-evaluation-harness.

``pass_at_k(n, c, k) = 1 - C(n-c, k) / C(n, k)`` computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (numerically
stable); 1.0 when ``n - c < k``. :func:`pass_at_k_summary` averages over problems and reports only the k with
``k <= n`` for every problem (n = 20 gives pass@1 and pass@10).
"""
from __future__ import annotations

from typing import Iterable, Sequence

DEFAULT_KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not (0 <= c <= n) or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_summary(counts: Sequence[tuple[int, int]], ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """{'pass@k': mean over problems} for each k <= min n; `counts` holds one (n, c) per problem."""
    if not counts:
        return {}
    min_n = min(n for n, _ in counts)
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
            for k in ks if 1 <= k <= min_n}
