"""python -m qcjax.prefs: preference pairs from execution feedback, and the sample -> test -> DPO loop.

    python -m qcjax.prefs --hf_dir D | --ckpt C --problems problems.jsonl --k 8 --temperature 0.8 --out pairs.jsonl
    python -m qcjax.prefs --ckpt C --problems train.jsonl --rounds 2 --workdir runs/prefs \\
        --config configs/prefs.py:tiny --config.steps=60 [--eval_problems held_out.jsonl]

One pass: K samples per problem from the jitted sampler, each program run against the problem's tests in the
evaluation sandbox, then pairs (chosen passes, rejected fails, same prompt) in the DPO format train.py reads. Writes
pairs.jsonl plus, beside it, <stem>.samples.jsonl (every sample: completion, passed, reason), <stem>.chosen.jsonl
(passing completions as SFT text records) and <stem>.summary.json. Train on the pairs with
--config=configs/prefs.py:SIZE (the size's DPO stage, raw layout: base prompts are plain text); --mode instruct
pairs are ChatML, the size files' own :dpo style.

--rounds N: each round samples from the latest model, makes pairs and trains DPO on them (the given --config, its
init_from set to that model), in <workdir>/round_<r>/; a finished round is never redone, so rerunning the same
command resumes. --eval_problems measures pass@1 on held-out problems before the first round and after each.
Bad input is one line on stderr naming the flag or file (exit 2); --debug shows the traceback. See docs/eval.md.
"""
from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import os
import sys
import time

from qcjax import cli
from qcjax.cli import UsageError
from qcjax.eval.cli import _isolation, _limits, _model_flags, _Progress, _sandbox_flags
from qcjax.eval.sandbox import SandboxError, machine


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m qcjax.prefs", description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", required=True,
                    help="problems JSONL: human-eval format (prompt, test, entry_point), EvalPlus, plain {prompt, "
                         "tests} or MBPP-style {text, test_list}; or 'humaneval'")
    ap.add_argument("--mode", default="base", choices=("base", "instruct"),
                    help="base: complete prompt.strip() + newline (pairs for dpo_style raw); instruct: ChatML")
    ap.add_argument("--out", default=None, help="pairs JSONL to write (one pass; not with --rounds)")
    g = ap.add_argument_group("pairs")
    g.add_argument("--pairs_per_problem", type=int, default=4, help="at most this many pairs per problem (default 4)")
    g.add_argument("--no_dedup", action="store_true",
                   help="keep identical completions apart (default: identical texts count once)")
    g.add_argument("--ref_logps", action="store_true",
                   help="one pass: also write reference log-probs (ref_chosen_logp, ref_rejected_logp) under the "
                        "sampling model, formatted as --config's DPO data (needs --config)")
    r = ap.add_argument_group("rounds (sample -> pairs -> DPO)")
    r.add_argument("--rounds", type=int, default=0, help="rounds of sample -> pairs -> DPO (needs --workdir, --config)")
    r.add_argument("--workdir", default=None, help="--rounds: one subdirectory per round; rerun to resume")
    r.add_argument("--config", default=None,
                   help="DPO training config, e.g. configs/prefs.py:tiny; any field as --config.FIELD=VALUE")
    r.add_argument("--eval_problems", default=None, help="held-out problems: pass@1 before and after each round")
    r.add_argument("--eval_n", type=int, default=0,
                   help="also sampled pass@1 from this many samples per held-out problem at --temperature "
                        "(default 0: greedy only)")
    _model_flags(ap, n_default=8, n_flag="--k", temperature=0.8)
    ap.set_defaults(max_new_tokens=256)
    _sandbox_flags(ap, None, k=False)
    return ap


# ---- the DPO config --------------------------------------------------------------------------------------------------
def _parse_value(text: str, old):
    if isinstance(old, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, str) or old is None:
        return text
    return ast.literal_eval(text)


def load_config(spec: str, overrides: list[str]):
    """configs/FILE.py[:stage] (as train.py's --config) with --config.FIELD=VALUE overrides (typed like the field)."""
    path, _, stage = spec.partition(":")
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)  # configs/*.py import `configs.base`
    mod_spec = importlib.util.spec_from_file_location(f"_qcjax_prefs_cfg_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(mod)
        c = mod.get_config(stage) if stage else mod.get_config()
    except (ValueError, TypeError, ImportError, SyntaxError) as e:
        raise UsageError(f"--config {spec}: {e}") from e
    for item in overrides:
        key, eq, text = item[len("--config."):].partition("=")
        if not eq:
            raise UsageError(f"{item}: expected --config.FIELD=VALUE")
        node, *_ = (c,)
        parts = key.split(".")
        try:
            for p in parts[:-1]:
                node = node[p]
            old = node[parts[-1]]
        except (KeyError, TypeError):
            raise UsageError(f"--config.{key}: no such config field") from None
        if old is None and hasattr(node, "get_type"):  # a None default of a typed field (the schema's placeholders)
            old = {int: 0, float: 0.0, bool: False}.get(node.get_type(parts[-1]), old)
        try:
            node[parts[-1]] = _parse_value(text, old)
        except (ValueError, SyntaxError, TypeError) as e:
            raise UsageError(f"--config.{key}={text}: {e}") from None
    return c


def dpo_config(base, init_from: str, pairs_path: str, tokenizer: str, mode: str, tokenizer_given: bool):
    """The round's training config: `base` starting from `init_from`, on `pairs_path` (raw style for base-mode
    prompts), with the sampling model's tokenizer unless --config.tokenizer was given."""
    c = copy.deepcopy(base)
    c.task = "dpo"
    c.init_from = init_from
    if not tokenizer_given:
        c.tokenizer = tokenizer
    c.data.sources = ({"kind": "jsonl", "path": pairs_path, "format": "dpo", "weight": 1.0},)
    c.data.dpo_style, c.data.eval_fraction = "raw" if mode == "base" else "chatml", 0.0
    if c.dpo.reference == "precomputed":
        c.data.dpo_ref_logps = True
    c.eval_every = 0
    return c


# ---- one pass ------------------------------------------------------------------------------------------------------
def _model_args(a, hf_dir: str | None, ckpt: str | None) -> argparse.Namespace:
    b = copy.copy(a)
    b.hf_dir, b.ckpt = hf_dir, ckpt
    if ckpt is not None and hf_dir is None and a.ckpt != ckpt:
        b.step = None  # a round's own checkpoint: its latest step
    return b


def sample_and_score(a, model, problems, n: int, temperature: float, iso, limits, log, desc: str) -> list[dict]:
    """n samples per problem (a's sampling flags, temperature given), each run in the sandbox: sandbox records."""
    from qcjax.eval import generate as G
    from qcjax.eval.score import score

    s = copy.copy(a)
    s.temperature = temperature
    prompts = [G.make_prompt(model, p, a.mode) for p in problems]
    bar = _Progress(a, f"{desc}: generate", "sample")
    try:
        texts = G.complete(model, [pr.ids for pr in prompts], n=n, a=s,
                           stop_strings=G.stop_strings("humaneval", a.mode),
                           task_ids=[p.task_id for p in problems], progress=bar)
    except ValueError as e:
        raise UsageError(str(e)) from e
    finally:
        bar.close()
    samples = [{"task_id": p.task_id, "prompt": pr.text, "completion": t}
               for p, pr, outs in zip(problems, prompts, texts) for t in outs]
    bar = _Progress(a, f"{desc}: sandbox", "prog")
    try:
        return score(problems, samples, limits, iso, workers=a.workers, mode=a.mode, on_result=bar.step,
                     total=bar.total)
    finally:
        bar.close()


def _write_jsonl(path: str, rows) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _write_json(path: str, d: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(d, f, indent=1)
    os.replace(tmp, path)


def _paths(out: str) -> dict[str, str]:
    stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
    return {"pairs": out, "samples": stem + ".samples.jsonl", "chosen": stem + ".chosen.jsonl",
            "summary": stem + ".summary.json"}


def make_pairs_file(a, src: tuple[str | None, str | None], problems, iso, limits, out: str, log,
                    desc: str = "prefs") -> dict:
    """Sample, score and write the pairs (and samples, chosen, summary) for the model at src = (hf_dir, ckpt)."""
    from qcjax.eval import generate as G
    from qcjax.prefs.pairs import chosen_records, failure_reasons, make_pairs
    from qcjax.prefs.stats import pass1, per_problem

    t0 = time.perf_counter()
    model = G.load(_model_args(a, *src), UsageError, log)
    records = sample_and_score(a, model, problems, a.n, a.temperature, iso, limits, log, desc)
    del model
    pairs, stats = make_pairs(records, a.pairs_per_problem, dedup=not a.no_dedup, seed=a.seed)
    p = _paths(out)
    _write_jsonl(p["samples"], records)
    _write_jsonl(p["chosen"], chosen_records(records, dedup=not a.no_dedup))
    _write_jsonl(p["pairs"], pairs)
    summary = {"model": src[0] or src[1], "problems_source": a.problems, "k": a.n, "temperature": a.temperature,
               "top_p": a.top_p, "max_new_tokens": a.max_new_tokens, "mode": a.mode, "seed": a.seed,
               "pairs_per_problem": a.pairs_per_problem, "dedup": not a.no_dedup, **stats,
               "sample_pass@1": pass1(per_problem(records)), "failed": failure_reasons(records),
               "isolation": iso.describe(), "machine": machine(), "seconds": round(time.perf_counter() - t0, 1)}
    _write_json(p["summary"], summary)
    if not a.quiet:
        sp = summary["sample_pass@1"]
        print(f"{desc}: {stats['problems']} problems x {a.n} samples: pass rate {100 * sp['pass@1']:.1f}%; "
              f"{stats['mixed']} mixed, {stats['all_passed']} all passed, {stats['none_passed']} none passed -> "
              f"{stats['pairs']} pairs in {out}", file=log)
    return summary


def evaluate(a, src, problems, iso, limits, log, desc: str) -> dict:
    """Held-out pass@1: greedy (one sample per problem) and, with --eval_n, sampled at --temperature."""
    from qcjax.eval import generate as G
    from qcjax.prefs.stats import pass1, per_problem

    model = G.load(_model_args(a, *src), UsageError, log)
    out = {"model": src[0] or src[1], "problems_source": a.eval_problems}
    recs = sample_and_score(a, model, problems, 1, 0.0, iso, limits, log, f"{desc} greedy")
    out["greedy"] = {**pass1(per_problem(recs)), "per_problem": per_problem(recs)}
    if a.eval_n > 0:
        recs = sample_and_score(a, model, problems, a.eval_n, a.temperature, iso, limits, log, f"{desc} sampled")
        out["sampled"] = {**pass1(per_problem(recs)), "temperature": a.temperature, "n": a.eval_n,
                          "per_problem": per_problem(recs)}
    if not a.quiet:
        for k in ("greedy", "sampled"):
            if k in out:
                m = out[k]
                print(f"{desc}: held-out {k} pass@1 {100 * m['pass@1']:.1f}% (95% CI {100 * m['ci95'][0]:.1f}-"
                      f"{100 * m['ci95'][1]:.1f}; {m['problems']} problems, {m['samples']} samples)", file=log)
    return out


# ---- rounds --------------------------------------------------------------------------------------------------------
def _latest_ckpt(workdir: str) -> str | None:
    d = os.path.join(workdir, "checkpoints")
    return d if os.path.isdir(d) and any(x.isdigit() for x in os.listdir(d)) else None


def run_rounds(a, overrides, problems, eval_problems, iso, limits, log) -> dict:
    """--rounds: sample -> pairs -> DPO, each round from the previous round's checkpoint; finished work is kept."""
    from qcjax.eval import generate as G
    from qcjax.train.loop import ConfigError, RunError, train

    base = load_config(a.config, overrides)
    tokenizer_given = any(o.startswith("--config.tokenizer=") for o in overrides)
    tokenizer = G._tokenizer_source(a)
    os.makedirs(a.workdir, exist_ok=True)
    src: tuple[str | None, str | None] = (a.hf_dir, a.ckpt)
    report = {"rounds": []}
    if eval_problems:
        path = os.path.join(a.workdir, "eval_round_0.json")
        if not os.path.exists(path):
            _write_json(path, evaluate(a, src, eval_problems, iso, limits, log, "round 0"))
        report["eval_round_0"] = json.load(open(path))
    for r in range(1, a.rounds + 1):
        rd = os.path.join(a.workdir, f"round_{r}")
        os.makedirs(rd, exist_ok=True)
        pairs = os.path.join(rd, "pairs.jsonl")
        summary_path = _paths(pairs)["summary"]
        if not os.path.exists(summary_path):  # written last: its presence means the pairs are complete
            make_pairs_file(a, src, problems, iso, limits, pairs, log, desc=f"round {r}")
        summary = json.load(open(summary_path))
        if summary["pairs"] == 0:
            raise UsageError(f"round {r}: no pairs (every problem's samples all passed or all failed); raise --k or "
                             "--temperature")
        c = dpo_config(base, src[0] or src[1], pairs, tokenizer, a.mode, tokenizer_given)
        train_dir = os.path.join(rd, "dpo")
        done = os.path.join(rd, "DONE")
        if not os.path.exists(done):
            if c.dpo.reference == "precomputed":
                from qcjax.train.dpo_reference import precompute

                ref = os.path.join(rd, "pairs_ref.jsonl")
                if not os.path.exists(ref):
                    precompute(dpo_config(base, src[0] or src[1], pairs, tokenizer, a.mode, tokenizer_given), pairs,
                               ref)
                c.data.sources = ({"kind": "jsonl", "path": ref, "format": "dpo", "weight": 1.0},)
            try:
                train(c, train_dir)
            except (ConfigError, RunError) as e:
                raise UsageError(f"round {r} DPO training ({train_dir}): {e}") from e
            open(done, "w").write("ok\n")
        ck = _latest_ckpt(train_dir)
        if ck is None:
            raise UsageError(f"round {r}: {train_dir} has no checkpoint")
        src = (None, ck)
        a = _with_tokenizer(a, c.tokenizer)  # the DPO run kept the sampling model's tokenizer
        entry = {"round": r, "pairs": summary["pairs"], "sample_pass@1": summary["sample_pass@1"]["pass@1"],
                 "checkpoint": ck}
        if eval_problems:
            path = os.path.join(a.workdir, f"eval_round_{r}.json")
            if not os.path.exists(path):
                _write_json(path, evaluate(a, src, eval_problems, iso, limits, log, f"round {r}"))
            entry["eval"] = json.load(open(path))
        report["rounds"].append(entry)
    _write_json(os.path.join(a.workdir, "report.json"), _report(report))
    return report


def _with_tokenizer(a, tokenizer: str):
    b = copy.copy(a)
    b.tokenizer = tokenizer
    return b


def _report(report: dict) -> dict:
    """Per round: the held-out pass@1 figures and the paired difference against round 0 (per-problem tables
    dropped)."""
    from qcjax.prefs.stats import paired_difference

    out = {"rounds": []}
    e0 = report.get("eval_round_0")
    if e0:
        out["round_0"] = {k: {x: v for x, v in e0[k].items() if x != "per_problem"}
                          for k in ("greedy", "sampled") if k in e0}
    for entry in report["rounds"]:
        row = {k: v for k, v in entry.items() if k != "eval"}
        ev = entry.get("eval")
        if ev and e0:
            for k in ("greedy", "sampled"):
                if k in ev:
                    row[k] = {x: v for x, v in ev[k].items() if x != "per_problem"}
                    row[k]["vs_round_0"] = paired_difference(e0[k]["per_problem"], ev[k]["per_problem"])
        out["rounds"].append(row)
    return out


# ---- main ----------------------------------------------------------------------------------------------------------
def _check(a) -> None:
    if a.n < 2:
        raise UsageError(f"--k={a.n}: pairs need at least 2 samples per problem")
    if a.temperature <= 0:
        raise UsageError(f"--temperature={a.temperature}: greedy samples are all the same; use > 0")
    if not 0 < a.top_p <= 1:
        raise UsageError(f"--top_p={a.top_p}: must be in (0, 1]")
    if a.max_new_tokens < 1 or a.batch_size < 1:
        raise UsageError("--max_new_tokens and --batch_size must be >= 1")
    if a.pairs_per_problem < 1:
        raise UsageError(f"--pairs_per_problem={a.pairs_per_problem}: must be >= 1")
    if a.eval_n < 0:
        raise UsageError(f"--eval_n={a.eval_n}: must be >= 0")
    if a.rounds < 0:
        raise UsageError(f"--rounds={a.rounds}: must be >= 0")
    if a.rounds:
        if a.out:
            raise UsageError("--out is for one pass; with --rounds every round writes into --workdir")
        if not a.workdir or not a.config:
            raise UsageError("--rounds needs --workdir and --config (the DPO training config)")
    else:
        if not a.out:
            raise UsageError("--out PAIRS.jsonl is required (or --rounds N --workdir W --config C)")
        if a.eval_problems:
            raise UsageError("--eval_problems is measured between rounds: use it with --rounds")
        if a.ref_logps and not a.config:
            raise UsageError("--ref_logps needs --config (the DPO config whose formatting the log-probs follow)")
        d = os.path.dirname(os.path.abspath(a.out))
        if not os.path.isdir(d):
            raise UsageError(f"--out {a.out}: directory {d} does not exist")


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [x for x in argv if x.startswith("--config.")]
    a = parser.parse_args([x for x in argv if not x.startswith("--config.")])
    log = sys.stderr
    cli.start(a.dtype)  # before JAX starts
    return cli.guarded(parser.prog, lambda: _run(a, overrides, log), debug=a.debug,
                       failures={SandboxError: "sandbox error"},
                       interrupted="interrupted (rerun the same command to resume)")


def _run(a: argparse.Namespace, overrides: list[str], log) -> int:
    from qcjax.eval.cli import _problems

    _check(a)
    if overrides and not a.config:
        raise UsageError(f"{overrides[0]}: --config.FIELD needs --config")
    limits = _limits(a)
    problems = _problems(a.problems, a, "--problems")
    eval_problems = None
    if a.eval_problems:
        from qcjax.eval.problems import load_problems

        try:
            eval_problems = load_problems(a.eval_problems)
        except (OSError, ValueError) as e:
            raise UsageError(f"--eval_problems {e}") from e
    if a.config:
        load_config(a.config, overrides)  # config errors before any work
    iso = _isolation(a, log)
    if a.rounds:
        run_rounds(a, overrides, problems, eval_problems, iso, limits, log)
        if not a.quiet:
            print(json.dumps(json.load(open(os.path.join(a.workdir, "report.json"))), indent=1))
        return 0
    make_pairs_file(a, (a.hf_dir, a.ckpt), problems, iso, limits, a.out, log)
    if a.ref_logps:
        from qcjax.eval import generate as G
        from qcjax.train.dpo_reference import precompute

        c = dpo_config(load_config(a.config, overrides), a.hf_dir or a.ckpt, a.out, G._tokenizer_source(a),
                       a.mode, any(o.startswith("--config.tokenizer=") for o in overrides))
        tmp = a.out + ".ref.tmp"
        precompute(c, a.out, tmp)
        os.replace(tmp, a.out)
    return 0

