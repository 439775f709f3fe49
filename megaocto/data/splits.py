"""Train/valid/test splits as non-overlapping document ranges (Megatron get_train_valid_test_split_)."""
from __future__ import annotations

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """'98,2,0' (or '98/2/0', or fewer numbers) -> three fractions summing to 1."""
    parts = [p for p in str(split).replace("/", ",").split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts][:3]
    except ValueError:
        raise ValueError(f"split must be comma-separated numbers like '98,2,0' (got {split!r})") from None
    if not vals or any(v < 0 for v in vals) or sum(vals) <= 0:
        raise ValueError(f"split needs non-negative numbers with a positive sum (got {split!r})")
    vals += [0.0] * (3 - len(vals))
    total = sum(vals)
    return [v / total for v in vals]


def split_boundaries(split: str, num_documents: int) -> list[int]:
    """[0, a, b, N]: train = [0, a), valid = [a, b), test = [b, N).

    Megatron's rule: cumulative round(fraction·N), then every boundary shifted so the last equals N;
    clamped to [0, N] so the ranges stay ordered and disjoint even for tiny N.
    """
    bounds = [0]
    for frac in parse_split(split):
        bounds.append(bounds[-1] + int(round(frac * float(num_documents))))
    diff = bounds[-1] - num_documents
    bounds = [0] + [min(max(b - diff, 0), num_documents) for b in bounds[1:]]
    for i in range(1, 4):
        bounds[i] = max(bounds[i], bounds[i - 1])
    return bounds


def split_ranges(split: str, num_documents: int) -> dict[str, tuple[int, int]]:
    """{'train'|'valid'|'test': (start, end)} document ranges; empty ranges have start == end."""
    b = split_boundaries(split, num_documents)
    return {name: (b[i], b[i + 1]) for i, name in enumerate(SPLIT_NAMES)}
