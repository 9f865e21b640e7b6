"""qcjax.prefs: the procedural task family, pairs from execution feedback, the pass@1 statistics and the command
(one pass on a tiny random-weight model, and a DPO round)."""
import collections
import json
import os

import pytest

from qcjax.eval.problems import load_problems
from qcjax.eval.sandbox import Limits, detect_isolation, run_programs
from qcjax.prefs import cli, tasks
from qcjax.prefs.pairs import chosen_records, failure_reasons, make_pairs
from qcjax.prefs.stats import paired_difference, pass1, per_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the task family -------------------------------------------------------------------------------------------------
def test_splits_are_seeded_disjoint_and_cover_the_templates():
    train, held = tasks.make_splits(240, 120, seed=0)
    assert len(train) == 240 and len(held) == 120
    assert (train, held) == tasks.make_splits(240, 120, seed=0)
    assert {t.task_id for t in train}.isdisjoint({t.task_id for t in held})
    # no held-out prompt, solution or test appears in training
    assert {t.prompt for t in train}.isdisjoint({t.prompt for t in held})
    assert {t.template for t in held} <= {t.template for t in train} == {t.name for t in tasks.TEMPLATES}
    assert tasks.make_splits(100, 120, seed=0)[1] == held  # the held-out set does not depend on n_train
    other = tasks.make_splits(240, 120, seed=1)
    assert {t.task_id for t in other[1]} != {t.task_id for t in held}
    with pytest.raises(ValueError, match="--n_train"):
        tasks.make_splits(10_000, 10, seed=0)


def test_written_problems_load_and_canonical_solutions_pass_bare_prompts_fail(tmp_path):
    assert tasks.main(["--out", str(tmp_path), "--n_train", "30", "--n_held_out", "15"]) == 0
    train = load_problems(str(tmp_path / "train.jsonl"))
    held = load_problems(str(tmp_path / "held_out.jsonl"))
    assert len(train) == 30 and len(held) == 15
    sft = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert sft[0]["text"] == train[0].prompt + train[0].canonical_solution
    ps = train + held
    iso, lim = detect_isolation(), Limits(timeout_s=10.0)
    good = run_programs([p.program(p.canonical_code()) for p in ps], lim, iso, workers=2)
    assert [(p.task_id, r.reason) for p, r in zip(ps, good) if not r.passed] == []
    bare = run_programs([p.program(p.prompt) for p in ps], lim, iso, workers=2)
    assert [p.task_id for p, r in zip(ps, bare) if r.passed] == []


def test_tests_tell_every_instance_from_the_others_of_its_template():
    # The solution of any other instance of the same template fails this instance's tests (all 360 x their
    # siblings; run in-process: these are the family's own solutions, not model output).
    everything = [t for split in tasks.make_splits(240, 120, seed=0) for t in split]
    by = collections.defaultdict(list)
    for t in everything:
        by[t.template].append(t)
    passing, n = [], 0
    for t in everything:
        for other in by[t.template]:
            if other.task_id == t.task_id:
                continue
            env: dict = {}
            exec(t.prompt + other.canonical_solution + t.test, env)  # noqa: S102
            n += 1
            try:
                env["check"](env[t.entry_point])
                passing.append((t.task_id, other.task_id))
            except AssertionError:
                pass
    assert n > 9000 and passing == []


def test_tasks_cli_errors(tmp_path, capsys):
    assert tasks.main(["--out", str(tmp_path), "--n_train", "0"]) == 2
    assert tasks.main(["--out", str(tmp_path), "--n_train", "100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--n_train" in err[0] and "--n_train" in err[1]


# ---- pairs ------------------------------------------------------------------------------------------------------------
def _rec(task, i, text, ok, reason=None):
    return {"task_id": task, "sample": i, "prompt": f"P{task}\n", "completion": text, "passed": ok,
            "reason": "passed" if ok else (reason or "failed: AssertionError")}


RECORDS = [
    _rec("a", 0, "good1", True), _rec("a", 1, "good1 ", True), _rec("a", 2, "good2", True),
    _rec("a", 3, "bad1", False, "timeout"), _rec("a", 4, "bad2", False, "failed: SyntaxError: x"),
    _rec("a", 5, "bad1", False, "timeout"),
    _rec("b", 0, "ok", True), _rec("b", 1, "ok2", True),  # all pass: nothing to prefer
    _rec("c", 0, "no", False), _rec("c", 1, "no2", False),  # none pass
    _rec("d", 0, "d_ok", True), _rec("d", 1, "d_bad", False),
]


def test_pairs_prefer_passing_samples_of_the_same_prompt():
    pairs, stats = make_pairs(RECORDS, pairs_per_problem=10, seed=0)
    assert stats == {"problems": 4, "samples": 12, "pairs": 5, "mixed": 2, "all_passed": 1, "none_passed": 1}
    by = collections.defaultdict(list)
    for p in pairs:
        by[p["task_id"]].append((p["chosen"], p["rejected"]))
        src = {(r["task_id"], r["sample"]): r for r in RECORDS}
        c, r = src[p["task_id"], p["chosen_sample"]], src[p["task_id"], p["rejected_sample"]]
        assert c["passed"] and not r["passed"] and p["prompt"] == c["prompt"] == r["prompt"]
        assert p["chosen"] == c["completion"] and p["rejected"] == r["completion"]
        assert p["rejected_reason"] == r["reason"]
    # dedup: "good1" / "good1 " and the two "bad1" count once -> 2 x 2 distinct pairs, none repeated
    assert sorted(by["a"]) == sorted({(c, r) for c in ("good1", "good2") for r in ("bad1", "bad2")}) and \
        len(by["a"]) == 4
    assert by["d"] == [("d_ok", "d_bad")]


def test_pairs_per_problem_spreads_the_samples_and_no_dedup_keeps_duplicates():
    pairs, _ = make_pairs(RECORDS, pairs_per_problem=2, seed=3)
    a = [(p["chosen"], p["rejected"]) for p in pairs if p["task_id"] == "a"]
    assert len(a) == 2 and len({c for c, _ in a}) == 2 and len({r for _, r in a}) == 2  # each sample used once
    assert make_pairs(RECORDS, pairs_per_problem=2, seed=3) == (pairs, make_pairs(RECORDS, 2, seed=3)[1])
    loose, stats = make_pairs(RECORDS, pairs_per_problem=100, dedup=False)
    assert stats["pairs"] == 3 * 3 + 1
    with pytest.raises(ValueError, match="--pairs_per_problem"):
        make_pairs(RECORDS, pairs_per_problem=0)


def test_chosen_records_and_failure_reasons():
    texts = [r["text"] for r in chosen_records(RECORDS)]
    assert texts == ["Pa\ngood1", "Pa\ngood2", "Pb\nok", "Pb\nok2", "Pd\nd_ok"]
    assert failure_reasons(RECORDS) == {"failed: AssertionError": 3, "timeout": 2, "failed: SyntaxError": 1}


# ---- statistics --------------------------------------------------------------------------------------------------
def test_pass1_interval_and_paired_difference():
    before = {f"t{i}": (4, 1 if i < 10 else 0) for i in range(40)}  # 10 problems at 1/4, 30 at 0 -> 1/16
    m = pass1(before)
    assert m["pass@1"] == pytest.approx(10 * 0.25 / 40) and m["problems"] == 40 and m["samples"] == 160
    lo, hi = m["ci95"]
    assert 0 < lo < m["pass@1"] < hi < 0.15
    after = dict(before, t0=(4, 4), t1=(4, 3), t39=(4, 1))
    d = paired_difference(before, after)
    assert d["difference"] == pytest.approx((0.75 + 0.5 + 0.25) / 40) and (d["improved"], d["worsened"]) == (3, 0)
    assert 0 <= d["ci95"][0] < d["difference"] < d["ci95"][1]
    assert paired_difference(before, before)["ci95"] == [0.0, 0.0]
    recs = [{"task_id": "x", "passed": True}, {"task_id": "x", "passed": False}, {"task_id": "y", "passed": False}]
    assert per_problem(recs) == {"x": (2, 1), "y": (1, 0)}


# ---- the command ---------------------------------------------------------------------------------------------------
# `f` returns what the completion says: the tests pass when it is even. A random model cannot write code that sometimes
# passes, so the `numbered` fixture makes sample j's text `return j` (then the model's own words, in a comment): every
# problem gets passing and failing samples, and the program and the tests run apart in the sandbox as always.
PARITY = [{"task_id": f"parity/{i}", "prompt": "def f():", "tests": "assert f() % 2 == 0\n"} for i in range(4)]


@pytest.fixture(scope="module")
def hf_dir(tiny_hf):
    return tiny_hf[0]


def _problems_file(tmp_path):
    path = tmp_path / "parity.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PARITY))
    return str(path)


MODEL = ["--dtype", "float32", "--cache_dtype", "float32", "--max_new_tokens", "6", "--batch_size", "24",
         "--workers", "2", "--quiet"]


@pytest.fixture
def numbered(monkeypatch):
    """Sample j of every problem says `return j` (then the model's own words on one line, in a comment)."""
    from qcjax.eval import generate as G

    real = G.complete

    def complete(model, prompts, n, *args, **kw):
        texts = real(model, prompts, n, *args, **kw)
        return [[f"    return {j}  # " + t.replace("\n", " ").replace("\r", " ") for j, t in enumerate(row)]
                for row in texts]

    monkeypatch.setattr(G, "complete", complete)


def test_one_pass_writes_pairs_with_reference_logps_that_train_py_reads(tmp_path, hf_dir, numbered):
    out = tmp_path / "pairs.jsonl"
    assert cli.main(["--hf_dir", hf_dir, "--problems", _problems_file(tmp_path), "--k", "6", "--out", str(out),
                     "--pairs_per_problem", "3", "--ref_logps", "--config",
                     os.path.join(ROOT, "configs", "prefs.py") + ":tiny", *MODEL]) == 0
    samples = [json.loads(x) for x in (tmp_path / "pairs.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 6
    for s in samples:  # the sandbox's verdict is the parity rule, whatever the model wrote
        src = s["prompt"] + s["completion"] + "\n\n" + PARITY[int(s["task_id"].split("/")[1])]["tests"]
        ns: dict = {}
        try:
            exec(compile(src, "<t>", "exec"), ns)  # noqa: S102 - a function, a comment and one assert
            expect = True
        except AssertionError:
            expect = False
        assert s["passed"] == expect, s
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    summary = json.loads((tmp_path / "pairs.summary.json").read_text())
    assert summary["pairs"] == len(pairs) > 0 and summary["k"] == 6 and summary["temperature"] == 0.8
    by = {(s["task_id"], s["sample"]): s for s in samples}
    for p in pairs:
        assert by[p["task_id"], p["chosen_sample"]]["passed"] and not by[p["task_id"], p["rejected_sample"]]["passed"]
        assert p["prompt"] == PARITY[int(p["task_id"].split("/")[1])]["prompt"].strip() + "\n"
        # --ref_logps: the completion tokens' summed log-probs under the sampling model (+ <|endoftext|>)
        assert -1e4 < p["ref_chosen_logp"] < 0 and -1e4 < p["ref_rejected_logp"] < 0
    # the DPO pipeline reads the file as it is (raw style: prompt + completion + <|endoftext|>)
    from qcjax.data.config import DataConfig, SourceConfig
    from qcjax.data.pipeline import make_dpo_iterator
    from qcjax.tokenizer import load_tokenizer

    cfg = DataConfig(sources=(SourceConfig("jsonl", str(out), format="dpo"),), dpo_style="raw", num_epochs=1,
                     eval_fraction=0.0, dpo_ref_logps=True)
    batch = next(iter(make_dpo_iterator(cfg, load_tokenizer(hf_dir), seq_len=64, batch_size=2, seed=0)))
    assert batch["chosen_tokens"].shape == (2, 64) and batch["chosen_loss_mask"].sum() > 0
    assert set(batch["ref_chosen_logp"].tolist()) <= {p["ref_chosen_logp"] for p in pairs}


@pytest.mark.parametrize("argv, msg", [
    (["--k", "1", "--out", "p.jsonl"], "--k=1"),
    (["--temperature", "0", "--out", "p.jsonl"], "--temperature=0"),
    ([], "--out PAIRS.jsonl is required"),
    (["--rounds", "1", "--workdir", "w"], "--rounds needs --workdir and --config"),
    (["--rounds", "1", "--workdir", "w", "--config", "nope.py"], "--config nope.py: no such file"),
    (["--rounds", "1", "--workdir", "w", "--config", "CONFIGS/tiny.py:dpo", "--config.dpo.betta=1"],
     "--config.dpo.betta: no such config field"),
    (["--rounds", "1", "--workdir", "w", "--config", "CONFIGS/tiny.py:dpo", "--config.steps=x"],
     "--config.steps=x"),
    (["--out", "p.jsonl", "--eval_problems", "x.jsonl"], "--eval_problems is measured between rounds"),
    (["--out", "no/such/dir/p.jsonl"], "--out no/such/dir/p.jsonl: directory"),
])
def test_usage_errors_are_one_line(tmp_path, capsys, argv, msg):
    argv = [a.replace("CONFIGS", os.path.join(ROOT, "configs")) for a in argv]
    os.chdir(tmp_path)
    rc = cli.main(["--hf_dir", str(tmp_path), "--problems", _problems_file(tmp_path), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0], err


def test_missing_problems_file_is_one_line(tmp_path, capsys):
    rc = cli.main(["--hf_dir", str(tmp_path), "--problems", str(tmp_path / "none.jsonl"), "--out", "p.jsonl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--problems" in err[0] and "none.jsonl" in err[0]


@pytest.mark.slow
def test_a_round_trains_dpo_on_the_pairs_and_resumes(tmp_path, hf_dir, capsys, numbered):
    w = tmp_path / "loop"
    argv = ["--hf_dir", hf_dir, "--problems", _problems_file(tmp_path), "--k", "6", "--rounds", "1",
            "--workdir", str(w), "--config", os.path.join(ROOT, "configs", "prefs.py") + ":tiny",
            "--config.steps=2", "--config.batch_size=8", "--config.seq_len=32", "--config.log_every=1",
            "--config.checkpoint_every=2", "--eval_problems", _problems_file(tmp_path), *MODEL]
    assert cli.main(argv) == 0
    rd = w / "round_1"
    assert (rd / "DONE").exists() and (rd / "pairs.jsonl").read_text()
    metrics = [json.loads(x) for x in (rd / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    report = json.loads((w / "report.json").read_text())
    assert report["rounds"][0]["checkpoint"] == str(rd / "dpo" / "checkpoints")
    assert report["round_0"]["greedy"]["problems"] == 4
    assert "vs_round_0" in report["rounds"][0]["greedy"]
    # rerunning resumes: nothing is sampled or trained again
    stamp = {p: os.path.getmtime(p) for p in (rd / "pairs.jsonl", rd / "dpo" / "metrics.jsonl",
                                              w / "eval_round_1.json")}
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert {p: os.path.getmtime(p) for p in stamp} == stamp


@pytest.mark.slow
def test_the_documented_train_py_command_trains_on_the_pairs(tmp_path, hf_dir, numbered):
    import shlex
    import subprocess
    import sys

    out = tmp_path / "pairs.jsonl"
    assert cli.main(["--hf_dir", hf_dir, "--problems", _problems_file(tmp_path), "--k", "6", "--out", str(out),
                     *MODEL]) == 0
    assert out.read_text().strip()
    text = open(os.path.join(ROOT, "docs", "eval.md")).read()
    line = text[text.index("    python train.py --config=configs/prefs.py:1.5b"):]
    line = line[:line.index("\n\n")].replace("\\\n", " ")
    argv = shlex.split(line)[2:]  # after "python train.py"
    argv = [a.replace("configs/", os.path.join(ROOT, "configs") + "/").replace("=D", "=" + hf_dir)
            .replace("pairs.jsonl", str(out)).replace("runs/dpo", str(tmp_path / "dpo")) for a in argv]
    small = ["--config.steps=1", "--config.batch_size=2", "--config.seq_len=32", "--config.per_device_batch=0",
             "--config.model.remat=none"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv, *small], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1]


@pytest.mark.slow
def test_one_round_of_the_loop_raises_held_out_pass1(tmp_path):
    """bench/prefs_demo.py, one round at seed 0 with 4 samples per train problem (the demo's default is 8; half the
    programs to run): SFT the tiny config on the train split, sample -> test -> pairs -> DPO with the RPO term,
    held-out pass@1 before and after, on one CPU device as the command runs outside the tests. Deterministic at a
    fixed seed (2026-12-07: greedy 12.7% -> 20.7%, paired change
    +8.0 [+3.3, +13.3] over 150 problems, 14 better / 2 worse; sampled 13.0% -> 17.2%, +4.2 [+1.5, +7.0]); asserted:
    both paired intervals above zero."""
    import subprocess
    import sys

    # as a user runs it: one CPU device (not the 8 fake ones tests/conftest.py sets up for mesh tests)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "prefs_demo.py"), "--workdir", str(tmp_path),
                        "--rounds", "1", "--k", "4"], env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "demo_report.json").read_text())
    [round_1] = report["rounds"]
    for kind in ("greedy", "sampled"):
        change = round_1[kind]["vs_round_0"]
        assert change["problems"] == 150 and change["ci95"][0] > 0, (kind, change)
