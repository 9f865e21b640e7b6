"""Repository-level fill-in-the-middle on any local repository: held-out files, one masked line each.

    name, files = qcjax.prompts.read_repo("path/to/repo")
    tasks = build_tasks(name, files, held_out=20, seed=0)

`held_out` files (among those whose names end with one of `exts`) are chosen with `random.Random(seed)`; in each, one
line with at least 3 non-space characters is masked (the middle, with its newline). The prompt is the repo-level FIM
layout (`qcjax.prompts.repo_prompt`): the repository's other files first (in dependency order, as `read_repo` lists
them; none of the held-out files, so no task sees another's answer), then the held-out file in FIM form at the gap.
Scored like single-line infilling (`qcjax.eval.fim`): the infill's first line, exact match after strip and edit
similarity; repository code is not executed.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from qcjax.eval import fim as F


@dataclasses.dataclass(frozen=True)
class RepoTask:
    task_id: str  # "path/to/file.py:L12" (0-based line index)
    path: str
    prefix: str
    middle: str
    suffix: str


def build_tasks(files: Sequence[tuple[str, str]], held_out: int, seed: int = 0, exts: Sequence[str] = (".py",)
                ) -> tuple[list[RepoTask], list[tuple[str, str]]]:
    """(tasks sorted by path, the context files: every file but the held-out ones, in their given order)."""
    if held_out < 1:
        raise ValueError(f"--held_out={held_out}: must be >= 1")

    def maskable(text: str) -> list[int]:
        return [i for i, ln in enumerate(text.splitlines(keepends=True)) if len(ln.strip()) >= 3]

    cands = sorted(p for p, text in files if p.endswith(tuple(exts)) and maskable(text))
    if not cands:
        raise ValueError(f"no file ending with {', '.join(exts)} has a line to mask")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(cands, min(held_out, len(cands))))
    text_of = dict(files)
    tasks = []
    for path in chosen:
        lines = text_of[path].splitlines(keepends=True)
        i = rng.choice(maskable(text_of[path]))
        middle = lines[i] if lines[i].endswith("\n") else lines[i] + "\n"
        tasks.append(RepoTask(f"{path}:L{i}", path, "".join(lines[:i]), middle, "".join(lines[i + 1:])))
    held = set(chosen)
    return tasks, [(p, t) for p, t in files if p not in held]


def fit_file(count, prefix: str, suffix: str, limit: int) -> tuple[str, str]:
    """Trim the held-out file around the gap until count(prefix, suffix) <= limit: whole lines go from the start of
    the prefix and the end of the suffix, a quarter of the longer side at a time (the lines next to the gap stay)."""
    pre, suf = prefix.splitlines(keepends=True), suffix.splitlines(keepends=True)
    while count("".join(pre), "".join(suf)) > limit:
        if not pre and not suf:
            break
        if len(pre) >= len(suf):
            pre = pre[max(1, len(pre) // 4):]
        else:
            suf = suf[: len(suf) - max(1, len(suf) // 4)]
    return "".join(pre), "".join(suf)


def score(tasks: Sequence[RepoTask], raws: Sequence[str]) -> list[dict]:
    out = []
    for t, raw in zip(tasks, raws):
        pred = F.postprocess(raw, "single-line", t.middle)
        out.append({"task_id": t.task_id, "path": t.path, "middle": t.middle, "completion": raw, "prediction": pred,
                    "exact_match": F.exact_match(pred, t.middle),
                    "edit_similarity": round(F.edit_similarity(pred, t.middle), 6)})
    return out


def summarize(records: Sequence[dict], **info) -> dict:
    n = len(records)
    out = dict(info)
    out.update(benchmark="repo-fim", n_tasks=n,
               exact_match=sum(r["exact_match"] for r in records) / n if n else None,
               edit_similarity=sum(r["edit_similarity"] for r in records) / n if n else None)
    return out


def format_table(s: dict) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731  (summary.json holds the fractions)
    return "\n".join([f"repo-fim on {s.get('repo', '?')}: {s['n_tasks']} held-out files, one masked line each",
                      f"{'exact match':>14}{'edit sim':>10}",
                      f"{pct(s['exact_match']):>14}{pct(s['edit_similarity']):>10}"])
