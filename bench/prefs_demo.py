"""The preference loop, proven on this CPU: SFT a tiny model briefly, then sample -> test -> DPO rounds, held-out pass@1.

    python bench/prefs_demo.py --workdir runs/prefs_demo                 # the figures in bench/RESULTS.md
    python bench/prefs_demo.py --workdir runs/prefs_demo --baseline      # + SFT on the chosen completions

1. tasks: the procedural family (qcjax.prefs.tasks), --n_train train and --n_held_out held-out problems that share
   no template instance (held-out constants never appear in training);
2. SFT: the tiny config from scratch on the train split's solutions (a SentencePiece tokenizer trained on the
   stdlib first), --sft_steps steps: some problems right, many wrong;
3. `python -m qcjax.prefs --rounds R` on the train split (K samples at --temperature, pairs, DPO through
   configs/tiny.py:dpo with the RPO term, --rpo_alpha; --rpo_alpha 0 --dpo_lr 1e-4 --dpo_steps 60 is the plain-DPO
   run of bench/RESULTS.md), held-out pass@1 (greedy, and sampled with --eval_n) before and after each round;
4. --baseline: the same number of steps of plain SFT on round 1's passing completions (rejection sampling / "SFT on
   chosen"), measured the same way.
The held-out figures carry 95% bootstrap intervals over problems, and the changes a paired interval (same problems,
resampled jointly). Everything is seeded (--seed); rerunning with the same --workdir reuses finished steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tiny_config(spm_dir: str, data: str, steps: int, lr: float, seed: int, batch: int, seq_len: int):
    """configs/tiny.py (pretraining) on a JSONL of {text} records, no FIM, no eval split."""
    from qcjax.prefs.cli import load_config

    c = load_config(os.path.join(ROOT, "configs", "tiny.py"), [])
    c.tokenizer = spm_dir
    c.seq_len, c.batch_size, c.steps, c.seed = seq_len, batch, steps, seed
    c.optimizer.lr, c.optimizer.warmup_steps = lr, max(1, steps // 10)
    c.log_every, c.eval_every, c.checkpoint_every, c.keep_checkpoints = 10, 0, steps, 1
    c.data = {**c.data.to_dict(), "sources": ({"kind": "jsonl", "path": data, "format": "text", "weight": 1.0},),
              "fim_rate": 0.0, "eval_fraction": 0.0}
    return c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train", type=int, default=600)
    p.add_argument("--n_held_out", type=int, default=150)
    p.add_argument("--vocab", type=int, default=512, help="SentencePiece vocabulary (default 512)")
    p.add_argument("--sft_steps", type=int, default=800)
    p.add_argument("--sft_lr", type=float, default=3e-3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--pairs_per_problem", type=int, default=4)
    p.add_argument("--dpo_steps", type=int, default=120)
    p.add_argument("--dpo_lr", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss_type", default="sigmoid", choices=["sigmoid", "ipo"])
    p.add_argument("--rpo_alpha", type=float, default=1.0,
                   help="weight of the chosen completions' per-token NLL added to the DPO loss (RPO); 0: plain DPO")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval_n", type=int, default=4, help="sampled pass@1 from this many samples per held-out problem")
    p.add_argument("--baseline", action="store_true", help="also SFT on round 1's chosen completions")
    p.add_argument("--baseline_steps", type=int, default=120, help="default: as many steps as one DPO round")
    p.add_argument("--baseline_lr", type=float, default=3e-4, help="default: the DPO rounds' learning rate")
    p.add_argument("--workers", type=int, default=min(16, 2 * (os.cpu_count() or 1)),
                   help="sandboxed programs in parallel (default: as python -m qcjax.eval, 2 x CPUs)")
    a = p.parse_args()

    from qcjax.prefs import cli
    from qcjax.prefs.tasks import make_splits, sft_records, write_jsonl
    from qcjax.data.spm import train_spm
    from qcjax.train.loop import train

    t_all = time.perf_counter()
    w = os.path.abspath(a.workdir)
    tasks = os.path.join(w, "tasks")
    os.makedirs(tasks, exist_ok=True)
    train_tasks, held = make_splits(a.n_train, a.n_held_out, a.seed)
    write_jsonl(os.path.join(tasks, "train.jsonl"), [t.to_json() for t in train_tasks])
    write_jsonl(os.path.join(tasks, "held_out.jsonl"), [t.to_json() for t in held])
    write_jsonl(os.path.join(tasks, "sft.jsonl"), sft_records(train_tasks))
    spm = os.path.join(w, "tokenizer")
    if not os.path.exists(os.path.join(spm, "spm.model")):
        train_spm(spm + ".tmp", vocab_size=a.vocab, max_chars=300_000, progress=False)
        os.replace(spm + ".tmp", spm)
    t = time.perf_counter()
    sft_dir = os.path.join(w, "sft")
    train(tiny_config(spm, os.path.join(tasks, "sft.jsonl"), a.sft_steps, a.sft_lr, a.seed, a.batch, 64), sft_dir)
    print(f"SFT: {a.sft_steps} steps in {time.perf_counter() - t:.0f} s", flush=True)

    common = ["--dtype", "float32", "--cache_dtype", "float32", "--max_new_tokens", "40", "--batch_size", "128",
              "--workers", str(a.workers), "--seed", str(a.seed), "--temperature", str(a.temperature),
              "--timeout", "5"]
    argv = ["--ckpt", os.path.join(sft_dir, "checkpoints"), "--tokenizer", spm, "--problems",
            os.path.join(tasks, "train.jsonl"), "--k", str(a.k), "--pairs_per_problem", str(a.pairs_per_problem),
            "--rounds", str(a.rounds), "--workdir", os.path.join(w, "prefs"),
            "--config", os.path.join(ROOT, "configs", "tiny.py") + ":dpo",
            f"--config.steps={a.dpo_steps}", f"--config.batch_size={a.batch}", "--config.seq_len=64",
            f"--config.optimizer.lr={a.dpo_lr}", f"--config.optimizer.warmup_steps={max(1, a.dpo_steps // 10)}",
            f"--config.dpo.beta={a.beta}", f"--config.dpo.loss_type={a.loss_type}",
            f"--config.dpo.rpo_alpha={a.rpo_alpha}", f"--config.seed={a.seed}", "--config.log_every=10",
            f"--config.checkpoint_every={a.dpo_steps}", "--config.keep_checkpoints=1",
            "--eval_problems", os.path.join(tasks, "held_out.jsonl"), "--eval_n", str(a.eval_n), *common]
    t = time.perf_counter()
    rc = cli.main(argv)
    if rc != 0:
        raise SystemExit(f"python -m qcjax.prefs failed ({rc})")
    print(f"prefs rounds: {time.perf_counter() - t:.0f} s", flush=True)
    report = json.load(open(os.path.join(w, "prefs", "report.json")))

    if a.baseline:
        from qcjax.eval.sandbox import Limits, detect_isolation
        from qcjax.eval.problems import load_problems
        from qcjax.prefs.stats import paired_difference

        base_dir = os.path.join(w, "sft_on_chosen")
        chosen = os.path.join(w, "prefs", "round_1", "pairs.chosen.jsonl")
        c = tiny_config(spm, chosen, a.baseline_steps, a.baseline_lr, a.seed, a.batch, 64)
        c.init_from = os.path.join(sft_dir, "checkpoints")
        train(c, base_dir)
        path = os.path.join(w, "sft_on_chosen_eval.json")
        if not os.path.exists(path):
            ns = cli.build_parser().parse_args(["--problems", os.path.join(tasks, "held_out.jsonl"), "--ckpt",
                                                os.path.join(base_dir, "checkpoints"), "--tokenizer", spm,
                                                "--eval_problems", os.path.join(tasks, "held_out.jsonl"),
                                                "--eval_n", str(a.eval_n), *common])
            ev = cli.evaluate(ns, (None, os.path.join(base_dir, "checkpoints")),
                              load_problems(os.path.join(tasks, "held_out.jsonl")), detect_isolation(),
                              Limits(timeout_s=5.0), sys.stderr, "SFT on chosen")
            cli._write_json(path, ev)
        ev = json.load(open(path))
        e0 = json.load(open(os.path.join(w, "prefs", "eval_round_0.json")))
        report["sft_on_chosen"] = {k: {**{x: v for x, v in ev[k].items() if x != "per_problem"},
                                       "vs_round_0": paired_difference(e0[k]["per_problem"], ev[k]["per_problem"])}
                                   for k in ("greedy", "sampled") if k in ev}
    report["settings"] = vars(a)
    report["seconds"] = round(time.perf_counter() - t_all)
    with open(os.path.join(w, "demo_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
