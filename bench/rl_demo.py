"""Online RL (GRPO) vs the RPO preference loop on the procedural task family, from the same SFT start, at equal
numbers of sampled completions; and fill-in-the-middle with execution, which the SFT start does not solve.

    python bench/rl_demo.py --workdir W --rounds 2 --lr 1e-3                       # the figures in bench/RESULTS.md
    python bench/rl_demo.py --workdir W --rounds 2 --lr 3e-4 --temperature 1.0     # (W: a prefs_demo.py run reused)

1. bench/prefs_demo.py --workdir W --rounds R (reused when already run in W): the tasks (600 train / 150 held-out
   instances), the SFT start (the tiny config from scratch), R rounds of sample (8 per train problem) -> pairs -> RPO,
   held-out pass@1 after each;
2. GRPO (`train.py --config=configs/tiny.py:grpo`, task rl) from the same SFT checkpoint on the same train split:
   --problems_per_step problems x rl.group_size 8 completions per step, for R x 600 x 8 completions in all (the RPO
   loop's samples), a checkpoint after each 600 x 8; --fim_fraction of the train problems posed as FIM with
   execution (a function's body removed from a file of three);
3. held-out pass@1 of each GRPO checkpoint measured exactly as the RPO rounds are (qcjax.prefs.cli.evaluate: greedy,
   and --eval_n samples at 0.8), paired against the SFT start and against the RPO round with as many samples; FIM
   held-out pass@1 (the held-out instances' FIM files) for the SFT start and each GRPO checkpoint.
Intervals: 95% bootstrap over problems; changes paired (the same problems resampled jointly). Seeded throughout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _strip(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if k != "per_problem"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="RPO rounds = GRPO checkpoints compared (default 2)")
    p.add_argument("--n_train", type=int, default=600)
    p.add_argument("--n_held_out", type=int, default=150)
    p.add_argument("--k", type=int, default=8, help="samples per train problem per RPO round (default 8)")
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--problems_per_step", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--temperature", type=float, default=0.8, help="rollouts (the RPO loop samples at 0.8 too)")
    p.add_argument("--loss_type", default="grpo")
    p.add_argument("--advantage_scale", default="group", help="rl.advantage_scale: group | none | batch")
    p.add_argument("--fim_fraction", type=float, default=0.25)
    p.add_argument("--format_reward", type=float, default=0.1)
    p.add_argument("--eval_n", type=int, default=4)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    t_all = time.perf_counter()
    w = os.path.abspath(a.workdir)

    # 1. the SFT start and the RPO rounds: bench/prefs_demo.py (reuses whatever W already holds); the SFT start first,
    # the rounds after GRPO (a prefs_demo already running in W may finish them meanwhile)
    def prefs_demo(rounds: int) -> None:
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "prefs_demo.py"), "--workdir", w, "--rounds",
                        str(rounds), "--seed", str(a.seed), "--n_train", str(a.n_train), "--n_held_out",
                        str(a.n_held_out), "--k", str(a.k), "--eval_n", str(a.eval_n), "--workers", str(a.workers)],
                       check=True)

    if not os.path.isdir(os.path.join(w, "sft", "checkpoints", "800")):
        prefs_demo(1)

    import qcjax
    from qcjax.eval.problems import load_problems
    from qcjax.eval.sandbox import Limits, detect_isolation
    from qcjax.prefs import cli
    from qcjax.prefs.stats import paired_difference, pass1
    from qcjax.prefs.tasks import make_splits
    from qcjax.rl.rollouts import evaluate as rl_evaluate
    from qcjax.rl.tasks import fim_tasks
    from qcjax.tokenizer import load_tokenizer
    from qcjax.train.loop import train

    spm, sft = os.path.join(w, "tokenizer"), os.path.join(w, "sft", "checkpoints")
    held_path = os.path.join(w, "tasks", "held_out.jsonl")

    # 2. GRPO from the same start, R x n_train x k completions
    batch = a.problems_per_step * a.group_size
    per_round = a.n_train * a.k // batch
    c = cli.load_config(os.path.join(ROOT, "configs", "tiny.py") + ":grpo", [])
    c.tokenizer, c.init_from, c.seed = spm, sft, a.seed
    c.batch_size, c.steps = batch, per_round * a.rounds
    c.checkpoint_every, c.keep_checkpoints, c.log_every = per_round, a.rounds, 5
    c.optimizer.lr, c.optimizer.warmup_steps = a.lr, max(1, per_round // 10)
    c.rl.n_problems, c.rl.n_held_out, c.rl.group_size = a.n_train, a.n_held_out, a.group_size
    c.rl.temperature, c.rl.loss_type, c.rl.fim_fraction = a.temperature, a.loss_type, a.fim_fraction
    c.rl.format_reward, c.rl.workers, c.rl.advantage_scale = a.format_reward, a.workers, a.advantage_scale
    grpo = os.path.join(w, "grpo")
    t = time.perf_counter()
    train(c, grpo)
    print(f"GRPO: {c.steps} steps of {batch} completions in {time.perf_counter() - t:.0f} s", flush=True)

    # 3. held-out pass@1, measured as the RPO rounds are
    if not os.path.exists(os.path.join(w, "prefs", f"eval_round_{a.rounds}.json")):
        prefs_demo(a.rounds)
    ns = cli.build_parser().parse_args([
        "--problems", held_path, "--ckpt", sft, "--tokenizer", spm, "--eval_problems", held_path, "--eval_n",
        str(a.eval_n), "--dtype", "float32", "--cache_dtype", "float32", "--max_new_tokens", "40", "--batch_size",
        "128", "--workers", str(a.workers), "--seed", str(a.seed), "--temperature", "0.8", "--timeout", "5"])
    held = load_problems(held_path)
    iso, limits = detect_isolation(), Limits(timeout_s=5.0)
    _, held_tasks = make_splits(a.n_train, a.n_held_out, a.seed)
    fim_held = fim_tasks(held_tasks, "file", a.seed)
    tok = load_tokenizer(spm)
    e0 = json.load(open(os.path.join(w, "prefs", "eval_round_0.json")))

    def fim_eval(ckpt: str, name: str) -> dict:
        path = os.path.join(w, f"fim_eval_{name}.json")
        if not os.path.exists(path):
            cfg, params = qcjax.load(ckpt, dtype="float32")
            out = {}
            for key, n, temp in (("greedy", 1, 0.0), ("sampled", a.eval_n, 0.8)):
                per = rl_evaluate(cfg, params, tok, fim_held, n=n, temperature=temp, max_new_tokens=40, seed=a.seed,
                                  workers=a.workers)
                out[key] = {**pass1(per), "per_problem": per}
            cli._write_json(path, out)
        return json.load(open(path))

    report = {"settings": vars(a), "sft": {k: _strip(e0[k]) for k in ("greedy", "sampled")},
              "sft_fim": {k: _strip(v) for k, v in fim_eval(sft, "sft").items()}, "rounds": []}
    f0 = fim_eval(sft, "sft")
    for r in range(1, a.rounds + 1):
        step = per_round * r
        ck = os.path.join(grpo, "checkpoints", str(step))
        path = os.path.join(w, f"grpo_eval_{step}.json")
        if not os.path.exists(path):
            cli._write_json(path, cli.evaluate(ns, (None, ck), held, iso, limits, sys.stderr, f"GRPO step {step}"))
        ev = json.load(open(path))
        rpo = json.load(open(os.path.join(w, "prefs", f"eval_round_{r}.json")))
        fe = fim_eval(ck, f"grpo_{step}")
        row = {"samples": step * batch, "grpo_step": step}
        for k in ("greedy", "sampled"):
            row[k] = {"rpo": _strip(rpo[k]), "grpo": _strip(ev[k]),
                      "grpo_vs_sft": paired_difference(e0[k]["per_problem"], ev[k]["per_problem"]),
                      "rpo_vs_sft": paired_difference(e0[k]["per_problem"], rpo[k]["per_problem"]),
                      "grpo_vs_rpo": paired_difference(rpo[k]["per_problem"], ev[k]["per_problem"]),
                      "fim": _strip(fe[k]), "fim_vs_sft": paired_difference(f0[k]["per_problem"],
                                                                           fe[k]["per_problem"])}
        report["rounds"].append(row)
    metrics = [json.loads(x) for x in open(os.path.join(grpo, "metrics.jsonl"))]
    report["grpo_metrics"] = [{k: m.get(k) for k in ("step", "reward_mean", "pass_rate", "tests_passed", "kl",
                                                     "completion_len", "entropy", "flat_groups")} for m in metrics]
    report["seconds"] = round(time.perf_counter() - t_all)
    with open(os.path.join(w, "rl_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    pct = lambda m: f"{100 * m['pass@1']:.1f} [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]"  # noqa: E731
    dif = lambda d: (f"{100 * d['difference']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] "  # noqa: E731
                     f"({d['improved']} / {d['worsened']})")
    print(f"SFT start: greedy {pct(report['sft']['greedy'])}, sampled {pct(report['sft']['sampled'])}; FIM greedy "
          f"{pct(report['sft_fim']['greedy'])}, sampled {pct(report['sft_fim']['sampled'])}")
    for row in report["rounds"]:
        for k in ("greedy", "sampled"):
            x = row[k]
            print(f"{row['samples']} samples, {k}: RPO {pct(x['rpo'])} | GRPO {pct(x['grpo'])} | GRPO - RPO "
                  f"{dif(x['grpo_vs_rpo'])} | GRPO - SFT {dif(x['grpo_vs_sft'])} | FIM {pct(x['fim'])}, vs SFT "
                  f"{dif(x['fim_vs_sft'])}")


if __name__ == "__main__":
    main()
