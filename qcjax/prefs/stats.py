"""Honest pass@1 figures: the rate over problems with a 95% interval, and paired before/after differences.

    m = pass1(per_problem)                        # {task_id: (n, passed)} -> {"pass@1", "ci95", "problems", "samples"}
    d = paired_difference(before, after)          # the same problems measured twice -> mean difference and its CI

pass@1 is the mean over problems of each problem's passed / n (one greedy sample: 0 or 1). Its interval is a
percentile bootstrap over problems (problems are the unit that was sampled; samples of one problem are not
independent draws of the benchmark), seeded so that a figure is reproducible. The paired difference resamples
problems once for both measurements, which is far tighter than comparing two separate intervals.
"""
from __future__ import annotations

import random
from typing import Mapping


def _rates(per: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    return {t: c / n for t, (n, c) in per.items() if n > 0}


def _bootstrap(values: list[float], rounds: int, seed: int) -> tuple[float, float]:
    if not values:
        return (float("nan"), float("nan"))
    r = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[r.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return means[int(0.025 * rounds)], means[min(rounds - 1, int(0.975 * rounds))]


def pass1(per: Mapping[str, tuple[int, int]], rounds: int = 2000, seed: int = 0) -> dict:
    """per: {task_id: (samples, passed)}. Returns pass@1 (fraction), its 95% bootstrap interval, the counts."""
    rates = _rates(per)
    vals = [rates[t] for t in sorted(rates)]
    mean = sum(vals) / len(vals) if vals else float("nan")
    lo, hi = _bootstrap(vals, rounds, seed)
    return {"pass@1": mean, "ci95": [lo, hi], "problems": len(vals), "samples": sum(n for n, _ in per.values())}


def paired_difference(before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]],
                      rounds: int = 2000, seed: int = 0) -> dict:
    """after - before on the problems both measured: the mean difference of per-problem pass rates and its 95%
    bootstrap interval (problems resampled jointly), plus how many problems got better / worse."""
    a, b = _rates(before), _rates(after)
    common = sorted(set(a) & set(b))
    diffs = [b[t] - a[t] for t in common]
    mean = sum(diffs) / len(diffs) if diffs else float("nan")
    lo, hi = _bootstrap(diffs, rounds, seed)
    return {"difference": mean, "ci95": [lo, hi], "problems": len(common),
            "improved": sum(d > 0 for d in diffs), "worsened": sum(d < 0 for d in diffs)}


def per_problem(records) -> dict[str, tuple[int, int]]:
    """Sandbox records -> {task_id: (samples, passed)}."""
    out: dict[str, list[int]] = {}
    for r in records:
        c = out.setdefault(r["task_id"], [0, 0])
        c[0] += 1
        c[1] += bool(r["passed"])
    return {t: (n, p) for t, (n, p) in out.items()}
