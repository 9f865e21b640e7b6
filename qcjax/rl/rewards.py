"""Rewards from the sandbox's verdicts and group-relative advantages: pure functions of plain values (numpy).

    r = reward(result, format_ok, format_weight)          # one completion: partial credit + format term, 0 if killed
    adv = group_advantages(rewards, group_size, "group")  # [rows] (reward - group mean) / group std
"""
from __future__ import annotations

import numpy as np

# Verdicts that score 0 whatever the tests said: the program ran out of time, was killed (CPU or memory limit, a
# signal), flooded its output, or did not finish (sandbox reasons, qcjax.eval.sandbox.run_program).
ZERO_REASONS = ("timeout", "killed by", "output limit", "exited early")
SCALES = ("group", "none", "batch")


def test_credit(passed: bool, reason: str, tests: list | None) -> float:
    """The fraction of the problem's tests passed (each test run and judged on its own by the sandbox's tester, so one
    failing assert does not hide the others); 0 for a program the sandbox stopped (ZERO_REASONS); a run with no
    per-test verdicts (a crash before the tests) counts whole: 1 if passed else 0."""
    if reason.startswith(ZERO_REASONS):
        return 0.0
    if tests:
        return sum(1 for ok, _ in tests if ok) / len(tests)
    return 1.0 if passed else 0.0


def reward(passed: bool, reason: str, tests: list | None, format_ok: bool, format_weight: float = 0.0) -> float:
    """test_credit plus format_weight when the completion ended by itself and parses; 0 in all for a program the
    sandbox stopped (a timeout or an escape attempt earns no format bonus either)."""
    if reason.startswith(ZERO_REASONS):
        return 0.0
    return test_credit(passed, reason, tests) + (format_weight if format_ok else 0.0)


def group_advantages(rewards, group_size: int, scale: str = "group", eps: float = 1e-6) -> np.ndarray:
    """rewards [groups x group_size] (a group's completions adjacent) -> advantages, float32:
    group: (r - group mean) / (group std + eps)  (GRPO; std with ddof 0)
    none:  r - group mean                        (Dr. GRPO: no difficulty bias from the std)
    batch: (r - group mean) / (batch std + eps)  (one scale for the whole batch)
    A group whose rewards are all equal gets 0 (no signal)."""
    r = np.asarray(rewards, np.float64)
    if group_size < 1 or r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of rl.group_size={group_size}")
    if scale not in SCALES:
        raise ValueError(f"rl.advantage_scale={scale!r}: expected one of {', '.join(SCALES)}")
    g = r.reshape(-1, group_size)
    centred = g - g.mean(axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (g.std(axis=1, keepdims=True) + eps)
    elif scale == "batch":
        centred = centred / (r.std() + eps)
    return centred.reshape(-1).astype(np.float32)
