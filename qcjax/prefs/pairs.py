"""Preference pairs from execution feedback: K scored samples per problem -> (chosen passes, rejected fails) pairs.

    records = qcjax.eval.score.score(problems, samples, limits, iso)    # passed / reason per sample
    pairs, stats = make_pairs(records, pairs_per_problem=4, seed=0)
    chosen = chosen_records(records)                                     # SFT-on-chosen baseline data

Pure functions over the sandbox's records ({task_id, sample, prompt, completion, passed, reason}). A pair is the
DPO record train.py reads (qcjax.data, format "dpo": prompt, chosen, rejected), with where it came from and why the
rejected sample failed. A problem where every sample passes, or none does, gives no pair (there is nothing to
prefer); `stats` counts them.
"""
from __future__ import annotations

import collections
import random
from typing import Sequence


def _distinct(rows: list[dict], dedup: bool) -> list[dict]:
    if not dedup:
        return rows
    seen, out = set(), []
    for r in rows:
        key = r["completion"].strip()
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _grouped(records: Sequence[dict]) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = collections.OrderedDict()
    for r in records:
        by.setdefault(r["task_id"], []).append(r)
    return by


def make_pairs(records: Sequence[dict], pairs_per_problem: int = 4, dedup: bool = True,
               seed: int = 0) -> tuple[list[dict], dict]:
    """Up to `pairs_per_problem` (chosen, rejected) pairs per problem, no pair twice; chosen and rejected samples
    are each used as evenly as possible (a seeded order, then the diagonals of the chosen x rejected grid).
    dedup: identical completions (after strip) count once, so a pair never repeats and two equal texts never face
    each other. Returns (pairs, stats)."""
    if pairs_per_problem < 1:
        raise ValueError(f"--pairs_per_problem={pairs_per_problem}: must be >= 1")
    pairs: list[dict] = []
    stats = collections.Counter()
    for task_id, rows in _grouped(records).items():
        stats["problems"] += 1
        stats["samples"] += len(rows)
        good = _distinct([r for r in rows if r["passed"]], dedup)
        bad = _distinct([r for r in rows if not r["passed"]], dedup)
        if not good:
            stats["none_passed"] += 1
            continue
        if not bad:
            stats["all_passed"] += 1
            continue
        stats["mixed"] += 1
        rng = random.Random(f"{seed}\0{task_id}")
        rng.shuffle(good)
        rng.shuffle(bad)
        got = 0
        for d in range(len(bad)):  # diagonal d pairs chosen i with rejected (i + d) mod len(bad): all distinct
            for i in range(len(good)):
                if got == pairs_per_problem:
                    break
                c, r = good[i], bad[(i + d) % len(bad)]
                pairs.append({"task_id": task_id, "prompt": c["prompt"], "chosen": c["completion"],
                              "rejected": r["completion"], "rejected_reason": r["reason"],
                              "chosen_sample": c["sample"], "rejected_sample": r["sample"]})
                got += 1
        stats["pairs"] += got
    for k in ("problems", "samples", "pairs", "mixed", "all_passed", "none_passed"):
        stats.setdefault(k, 0)
    return pairs, dict(stats)


def chosen_records(records: Sequence[dict], dedup: bool = True) -> list[dict]:
    """The passing completions as SFT text records ({"text": prompt + completion}): the SFT-on-chosen baseline."""
    out = []
    for rows in _grouped(records).values():
        for r in _distinct([r for r in rows if r["passed"]], dedup):
            out.append({"task_id": r["task_id"], "text": r["prompt"] + r["completion"]})
    return out


def failure_reasons(records: Sequence[dict]) -> dict[str, int]:
    """How the failing samples failed ('failed: AssertionError', 'timeout', ...), most common first."""
    from qcjax.eval.score import _reason_class

    c = collections.Counter(_reason_class(r["reason"]) for r in records if not r["passed"])
    return dict(c.most_common())
