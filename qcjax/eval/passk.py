"""pass@k: the unbiased estimator of Chen et al. (2021), exact in integers.

    pass_at_k(n=10, c=3, k=1)   # 0.3: the chance that at least one of k samples drawn without replacement from the
                                #      n generated ones (c of them correct) passes, 1 - C(n-c, k) / C(n, k)
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) for one problem with n samples of which c pass (k <= n)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float | None:
    """The mean over problems of pass@k from (n, c) pairs; None when some problem has fewer than k samples."""
    counts = list(counts)
    if not counts or any(n < k for n, _ in counts):
        return None
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def parse_ks(text: str | Sequence[int]) -> list[int]:
    """'1,10,100' -> [1, 10, 100] (sorted, unique, each >= 1)."""
    if isinstance(text, str):
        try:
            ks = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--k {text!r}: expected comma-separated integers, e.g. 1,10") from None
    else:
        ks = [int(x) for x in text]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"--k {text!r}: every k must be >= 1")
    return sorted(set(ks))
