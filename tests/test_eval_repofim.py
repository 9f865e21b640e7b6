"""Repository-level FIM (qcjax.eval.repofim): held-out files, masked lines, context without the held-out files."""
import pytest

from qcjax.eval import repofim as R

FILES = [("pkg/a.py", "import os\n\nx = 1\n"), ("pkg/b.py", "def f():\n    return 2\n"), ("README.txt", "hello world\n"),
         ("pkg/empty.py", "\n\n"), ("pkg/c.py", "from pkg.a import x\ny = x + 1\n")]


def test_tasks_mask_one_line_of_each_held_out_file():
    tasks, context = R.build_tasks(FILES, held_out=2, seed=0)
    assert len(tasks) == 2 and [t.path for t in tasks] == sorted(t.path for t in tasks)
    text = dict(FILES)
    for t in tasks:
        assert t.prefix + t.middle + t.suffix == text[t.path]
        assert len(t.middle.strip()) >= 3 and t.middle.endswith("\n")
        assert t.task_id == f"{t.path}:L{t.prefix.count(chr(10))}"
    held = {t.path for t in tasks}
    assert [p for p, _ in context] == [p for p, _ in FILES if p not in held]  # order kept, no held-out file
    assert R.build_tasks(FILES, held_out=2, seed=0) == (tasks, context)  # deterministic
    others = {tuple(t.task_id for t in R.build_tasks(FILES, held_out=2, seed=s)[0]) for s in range(8)}
    assert len(others) > 1  # the seed picks files and lines


def test_every_candidate_when_held_out_exceeds_them():
    tasks, context = R.build_tasks(FILES, held_out=50, seed=1)
    assert [t.path for t in tasks] == ["pkg/a.py", "pkg/b.py", "pkg/c.py"]  # not README.txt, not the blank file
    assert [p for p, _ in context] == ["README.txt", "pkg/empty.py"]
    assert [t.path for t in R.build_tasks(FILES, 50, exts=(".txt",))[0]] == ["README.txt"]
    with pytest.raises(ValueError, match="--held_out"):
        R.build_tasks(FILES, held_out=0)
    with pytest.raises(ValueError, match="no file ending with .rs"):
        R.build_tasks(FILES, held_out=1, exts=(".rs",))


def test_fit_file_trims_far_lines_first():
    pre = "".join(f"p{i}\n" for i in range(40))
    suf = "".join(f"s{i}\n" for i in range(10))
    count = lambda a, b: len(a) + len(b)  # noqa: E731
    a, b = R.fit_file(count, pre, suf, 60)
    assert count(a, b) <= 60 and pre.endswith(a) and suf.startswith(b) and a.endswith("p39\n")
    assert R.fit_file(count, pre, suf, 10_000) == (pre, suf)
    assert R.fit_file(count, pre, suf, 0) == ("", "")


def test_scoring_the_masked_line_itself_is_exact():
    tasks, _ = R.build_tasks(FILES, held_out=3, seed=0)
    recs = R.score(tasks, [t.middle for t in tasks])
    assert all(r["exact_match"] and r["edit_similarity"] == 1.0 for r in recs)
    s = R.summarize(recs, repo="x")
    assert (s["exact_match"], s["n_tasks"]) == (1.0, 3) and "100.0" in R.format_table(s)
    bad = R.score(tasks, ["\nzzz\n"] * 3)
    assert not any(r["exact_match"] for r in bad) and R.summarize(bad)["exact_match"] == 0.0
