"""The tasks online RL samples and scores: a prompt the model continues, and the program its completion makes.

    tasks = load_tasks(RlConfig(...), seed=0)       # rl.problems (a JSONL) or the procedural family, with rl.fim_fraction
    ids = tasks[0].prompt_ids(tok)                  # the prompt tokens (the training layouts: raw text or FIM)
    tasks[0].program(completion_text)               # sandbox.Tested: the code and its tests, one verdict per test

Two kinds:
- complete: a human-eval / MBPP-format problem; the prompt is the base-model prompt (qcjax.eval.problems.base_prompt:
  the problem's prompt stripped, plus a newline), the program that prompt + the completion (as qcjax.eval scores it);
- fim: a file of the procedural family (three functions of three instances, each its docstring and one-line body)
  with the middle function's body removed, posed in the training FIM layout (qcjax.prompts.fim_prompt: PSM) or, with
  fim_layout "repo", as the last file of a repository (qcjax.prompts.repo_prompt) whose other files (a README naming
  the functions and a test file of the other two) are context. The program is the whole file with the completion as
  the middle, under the removed function's tests: they pass only when the middle is filled right.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from qcjax.eval.problems import Problem, base_prompt, load_problems, program_code
from qcjax.eval.sandbox import Tested


@dataclasses.dataclass(frozen=True)
class RlTask:
    task_id: str
    kind: str  # "complete" | "fim"
    problem: Problem  # the tests (and, complete, the prompt)
    prefix: str = ""  # fim: the file before the hole
    suffix: str = ""  # fim: the file after it
    context: tuple[tuple[str, str], ...] = ()  # fim, repo layout: the repository's other files (path, text)
    path: str = ""  # fim, repo layout: the file's path

    @property
    def prompt_text(self) -> str:
        return base_prompt(self.problem) if self.kind == "complete" else self.prefix

    def prompt_ids(self, tok) -> list[int]:
        from qcjax import prompts as P

        if self.kind == "complete":
            return tok.encode(self.prompt_text)
        if self.context:
            return P.encode(tok, P.repo_prompt("qcjax-rl", list(self.context), self.path, self.prefix, self.suffix))
        return P.encode(tok, P.fim_prompt(self.prefix, self.suffix))

    def code(self, completion: str) -> str:
        """The program text under test for a completion."""
        if self.kind == "complete":
            return program_code(self.problem, self.prompt_text, completion, "base")
        return self.prefix + completion + self.suffix

    def program(self, completion: str) -> Tested:
        return self.problem.program(self.code(completion))

    def stop_strings(self) -> tuple[str, ...]:
        """Where a completion's text ends for scoring (the engine also stops at the tokenizer's FIM stop ids): a
        complete task at the next top-level statement (qcjax.eval.generate's human-eval stops); a FIM middle at the
        suffix's first function (the model went on past the hole)."""
        from qcjax.eval.generate import stop_strings

        if self.kind == "complete":
            return tuple(stop_strings("humaneval", "base"))
        return ("\ndef ", "\nclass ", "\nif __name__")


def _family_problem(t) -> Problem:
    return Problem(t.task_id, t.prompt, t.entry_point, t.canonical_solution, t.test)


def fim_tasks(family: Sequence, layout: str = "file", seed: int = 0) -> list[RlTask]:
    """One FIM task per instance of `family` (qcjax.prefs.tasks.Task): a file of three functions, the instance's in
    the middle with its body removed; its neighbours are other instances of the same list, of other templates
    (seeded)."""
    if layout not in ("file", "repo"):
        raise ValueError(f"rl.fim_layout={layout!r}: expected file or repo")
    out = []
    n = len(family)
    for i, t in enumerate(family):
        r = random.Random(f"{seed}\0fim\0{t.task_id}")
        others = [u for u in family if u.template != t.template] or [u for u in family if u is not t] or [t]
        a, b = r.sample(others, 2) if len(others) >= 2 else (others[0], others[0])
        prefix = a.prompt + a.canonical_solution + "\n\n" + t.prompt
        suffix = "\n\n" + b.prompt + b.canonical_solution
        p = Problem(f"{t.task_id}/fim", prefix, t.entry_point, t.canonical_solution, t.test)
        if layout == "file":
            out.append(RlTask(p.task_id, "fim", p, prefix, suffix))
            continue
        readme = ("# ops\n\nSmall helpers, one per function in ops.py: "
                  + ", ".join(f"`{u.entry_point}`" for u in (a, t, b)) + ".\n")
        tests = ("from ops import " + ", ".join(sorted({a.entry_point, b.entry_point})) + "\n\n\n"
                 + a.test.replace("def check(candidate)", f"def test_{a.entry_point}(candidate={a.entry_point})")
                 + "\n\n" + b.test.replace("def check(candidate)", f"def test_{b.entry_point}(candidate={b.entry_point})"))
        out.append(RlTask(f"{t.task_id}/repofim", "fim", p, prefix, suffix,
                          context=(("README.md", readme), ("tests/test_ops.py", tests)), path="ops.py"))
    return out


def load_tasks(rl, seed: int = 0) -> list[RlTask]:
    """The run's task list, in a fixed order (the rollout order is a seeded permutation of it, per epoch): rl.problems
    (every problem of the file, posed as completion) or the procedural family's train split of rl.n_problems
    instances (never one of the rl.n_held_out held-out ones); with rl.fim_fraction > 0, that share of the family's instances posed as FIM instead (the rest as
    completion). Bad input raises ValueError naming the field."""
    if not 0.0 <= rl.fim_fraction <= 1.0:
        raise ValueError(f"rl.fim_fraction={rl.fim_fraction}: must be in [0, 1]")
    if rl.problems:
        if rl.fim_fraction:
            raise ValueError("rl.fim_fraction > 0 needs the procedural family (rl.problems=''): FIM tasks are cut "
                             "from its files")
        try:
            problems = load_problems(rl.problems)
        except (OSError, ValueError) as e:
            raise ValueError(f"rl.problems={rl.problems}: {e}") from None
        return [RlTask(p.task_id, "complete", p) for p in problems]
    from qcjax.prefs.tasks import make_splits

    if rl.n_problems < 1:
        raise ValueError(f"rl.n_problems={rl.n_problems}: must be >= 1")
    try:
        train, _ = make_splits(rl.n_problems, rl.n_held_out, seed)
    except ValueError as e:
        raise ValueError(f"rl.n_problems={rl.n_problems}, rl.n_held_out={rl.n_held_out}: {e}") from None
    n_fim = round(rl.fim_fraction * len(train))
    r = random.Random(f"{seed}\0fim-pick")
    fim_ids = set(r.sample(range(len(train)), n_fim))
    fims = fim_tasks(train, rl.fim_layout, seed) if n_fim else []
    return [fims[i] if i in fim_ids else RlTask(t.task_id, "complete", _family_problem(t))
            for i, t in enumerate(train)]
