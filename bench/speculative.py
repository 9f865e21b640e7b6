"""Speculative decoding on trained models: prompt lookup (ngram) and a draft model vs plain decoding, back to back.

    python bench/speculative.py                        # trains (cached in --workdir), then measures
    python bench/speculative.py --batches 1 --requests 8

Random weights cannot show acceptance, so the bench first trains (once; cached under --workdir, one directory per
setting) a SentencePiece tokenizer, a target (the "small" preset: 4 layers, hidden 256; by default 800 steps of
4 x 1024 tokens at lr 1e-3, about 20 minutes here) and a draft (the "tiny" preset: 2 layers, hidden 64; 600 steps
of configs/tiny.py's 8 x 256) on the Python standard library with FIM (configs/tiny.py, 50% PSM), leaving every
file whose path hashes to 0 mod 10 out. On those held-out files it then runs two traces:
  edit    FIM holes: a cursor at the start of a line inside a function, the hole its next 1-3 lines, prefix and
          suffix around it (the code below the cursor is in the prompt); up to --max_new tokens, greedy.
  plain   completion: a file's first lines up to a cursor, --max_new tokens, greedy.
Each trace runs at batch 1 (one request at a time) and batch 8 (all requests submitted, 8 rows) with speculation
off, ngram and draft, on one engine configuration (fp32, page 16), each engine warmed up as the server's is (every
program compiled, the gate's call times measured) and the trace run once untimed first.
Arms: off; ngram and draft as served (gated: ngram drafts on the device and each of its rounds picks the width the
measured costs favour; draft runs a verify call where the measured call times say it pays); ngram-always /
draft-always (gate off: every round with a draft verifies, so tokens per forward show the drafts' quality); and
ngram-host (the host-side prompt lookup with one verify per call, the path before the device loop, gated). Measured: tokens per target forward (generated tokens after the first / the target forwards each row took
part in), decode tokens per second (tokens after the first / the time from each request's first token to its end),
all-in tokens per second (all tokens / the trace's wall time, prefill included) and TTFT p50, each against plain
decoding in the same run (--reps timed runs per arm, the arms interleaved; medians of the figures and of the
per-run ratios); and, for ngram on the edit trace, what each drafting source adds (prompt / FIM suffix /
output only vs all).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def split_files() -> tuple[list[str], list[str]]:
    """(train, held-out) stdlib .py files: held out where crc32(relative path) % 10 == 0."""
    from qcjax.data.sources import stdlib_root, stdlib_files

    root = stdlib_root()
    train, held = [], []
    for f in stdlib_files():
        (held if zlib.crc32(os.path.relpath(f, root).encode()) % 10 == 0 else train).append(f)
    return train, held


def write_train_jsonl(path: str, files: list[str], max_chars: int) -> None:
    if os.path.exists(path):
        return
    n = 0
    with open(path + ".tmp", "w") as out:
        for f in files:
            try:
                text = open(f, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            out.write(json.dumps({"text": text}) + "\n")
            n += len(text)
            if n >= max_chars:
                break
    os.replace(path + ".tmp", path)


def run_config(spm: str, data: str, preset: str, steps: int, seed: int, lr: float | None = None,
               seq_len: int | None = None, batch_size: int | None = None):
    from qcjax.prefs.cli import load_config

    c = load_config(os.path.join(ROOT, "configs", "tiny.py"), [])
    c.model.preset = preset
    c.tokenizer = spm
    c.steps, c.seed = steps, seed
    c.optimizer.lr = lr or c.optimizer.lr
    c.seq_len = seq_len or c.seq_len
    c.batch_size = batch_size or c.batch_size
    c.optimizer.warmup_steps = max(1, steps // 10)
    c.log_every, c.eval_every, c.checkpoint_every, c.keep_checkpoints = 50, 0, steps, 1
    c.data = {**c.data.to_dict(), "sources": ({"kind": "jsonl", "path": data, "format": "text", "weight": 1.0},),
              "eval_fraction": 0.0}
    return c


def train_models(w: str, a) -> tuple[str, str, str]:
    from qcjax.data.spm import train_spm
    from qcjax.train.loop import train

    os.makedirs(w, exist_ok=True)
    train_files, _ = split_files()
    data = os.path.join(w, "train.jsonl")
    write_train_jsonl(data, train_files, a.train_chars)
    spm = os.path.join(w, "tokenizer")
    if not os.path.exists(os.path.join(spm, "spm.model")):
        texts = [json.loads(line)["text"] for line in open(data)]
        train_spm(spm + ".tmp", vocab_size=a.vocab, texts=texts, max_chars=1_000_000, progress=False)
        os.replace(spm + ".tmp", spm)
    out = []
    runs = (("target", "small", a.target_steps, a.target_lr, a.target_seq_len, a.target_batch),
            ("draft", "tiny", a.draft_steps, None, None, None))
    for name, preset, steps, lr, seq_len, batch in runs:
        # the directory names what was trained, so a cached model is reused only for the same settings
        d = os.path.join(w, "-".join(str(x) for x in (name, preset, steps, lr, seq_len, batch) if x is not None))
        if not os.path.exists(os.path.join(d, "checkpoints")) or not os.listdir(os.path.join(d, "checkpoints")):
            t = time.perf_counter()
            train(run_config(spm, data, preset, steps, a.seed, lr, seq_len, batch), d)
            print(f"trained the {name} ({preset}, {steps} steps) in {time.perf_counter() - t:.0f} s", flush=True)
        out.append(os.path.join(d, "checkpoints"))
    return spm, out[0], out[1]


def traces(tok, files: list[str], n: int, seed: int) -> dict[str, list[list[int]]]:
    """The edit trace (FIM holes at line starts inside functions) and the plain trace (a file's head)."""
    import random

    from qcjax import prompts as P

    rng = random.Random(seed)
    files = sorted(files)
    rng.shuffle(files)
    edit, plain = [], []
    for f in files:
        try:
            lines = open(f, encoding="utf-8").read().splitlines(keepends=True)
        except (UnicodeDecodeError, OSError):
            continue
        body = [i for i in range(40, len(lines) - 20) if lines[i].startswith("        ") and lines[i].strip()]
        if len(edit) < n and body:
            i = rng.choice(body)
            hole = rng.randint(1, 3)
            prefix = "".join(lines[max(0, i - 40): i])
            suffix = "".join(lines[i + hole: i + hole + 20])
            edit.append(P.encode(tok, P.fim_prompt(prefix, suffix)))
        if len(plain) < n and len(lines) > 60:
            plain.append(tok.encode("".join(lines[:rng.randint(30, 60)])))
        if len(edit) >= n and len(plain) >= n:
            break
    return {"edit": edit, "plain": plain}


def run_trace(engine, prompts, batch: int, max_new: int, stop_ids) -> dict:
    """All prompts through `engine` (on this thread): one at a time (batch 1) or all submitted at once."""
    from qcjax.inference import Request

    ended = {}

    def on_end(i):
        return lambda new, reason: ended.setdefault(i, time.perf_counter()) if reason is not None else None

    reqs = [Request(list(p), max_new, stop_ids=tuple(stop_ids), on_event=on_end(i)) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    for group in ([[r] for r in reqs] if batch == 1 else [reqs]):
        engine.submit(group)
        while engine.busy:
            engine.step()
    wall = time.perf_counter() - t0
    gen = 0
    for r in reqs:
        assert r.finished and r.finish_reason in ("stop", "length"), r.finish_reason
    st = engine.stats()
    gen = st["decode_tokens"] + len(reqs)
    decode_s = sum(ended[i] - r.first_token_at for i, r in enumerate(reqs))
    return {"wall_s": wall, "tokens": gen, "tok_s": gen / wall, "decode_tok_s": st["decode_tokens"] / decode_s,
            "ttft_p50_ms": 1e3 * statistics.median(r.first_token_at - r.submitted for r in reqs),
            "per_forward": st["decode_tokens"] / max(1, st["row_forwards"]),
            "drafted": st["spec_drafted"], "accepted": st["spec_accepted"]}


def measure(a, w: str, spm: str, target: str, draft: str) -> None:
    import jax.numpy as jnp

    import qcjax
    from qcjax.inference import Engine, Speculation
    from qcjax.inference.flags import markers
    from qcjax.tokenizer import load_tokenizer

    tok = load_tokenizer(spm)
    cfg, params = qcjax.load(target, dtype="float32")
    dcfg, dparams = qcjax.load(draft, dtype="float32")
    _, held = split_files()
    tr = traces(tok, held, a.requests, a.seed)
    stops = sorted(tok.fim_stop_ids)
    need = max(len(p) for t in tr.values() for p in t) + a.max_new
    max_len = 1 << (need - 1).bit_length()
    arms = {"off": None, "ngram": Speculation(k=a.k, markers=markers(tok)),
            "ngram-always": Speculation(k=a.k, markers=markers(tok), gate=False),
            "ngram-host": Speculation(k=a.k, markers=markers(tok), device=False),
            "draft": Speculation(method="draft", k=a.k, draft=(dcfg, dparams)),
            "draft-always": Speculation(method="draft", k=a.k, draft=(dcfg, dparams), gate=False)}
    arms = {k: v for k, v in arms.items() if k == "off" or k in a.arms.split(",")}
    tr = {k: v for k, v in tr.items() if k in a.traces.split(",")}
    rows = []

    def once(prompts, batch, spec):
        e = Engine(cfg, params, max_rows=batch, max_len=max_len, cache_dtype=jnp.float32, speculative=spec,
                   max_queue=len(prompts))
        e.warmup()  # as the server does: every shape compiled (the first engine) and timed for the gate
        return run_trace(e, prompts, batch, a.max_new, stops)

    for name, prompts in tr.items():
        for batch in [int(b) for b in a.batches.split(",")]:
            for spec in arms.values():
                once(prompts, batch, spec)  # compilation
            runs = {arm: [] for arm in arms}
            for _ in range(a.reps):  # arms interleaved, so a slow spell of the machine hits every arm alike
                for arm, spec in arms.items():
                    runs[arm].append(once(prompts, batch, spec))
            for arm in arms:
                med = lambda key, arm=arm: statistics.median(x[key] for x in runs[arm])  # noqa: E731
                ratio = lambda key, arm=arm: statistics.median(  # noqa: E731
                    x[key] / o[key] for x, o in zip(runs[arm], runs["off"]))
                r = {key: med(key) for key in runs[arm][0]}
                r["speedup"], r["decode_speedup"] = ratio("tok_s"), ratio("decode_tok_s")
                print(f"{name:5s} batch {batch}  {arm:12s}  {r['per_forward']:.2f} tokens/forward  decode "
                      f"{r['decode_tok_s']:7.1f} tok/s ({r['decode_speedup']:.2f}x)  all {r['tok_s']:7.1f} tok/s "
                      f"({r['speedup']:.2f}x)  TTFT p50 {r['ttft_p50_ms']:.0f} ms  accepted "
                      f"{r['accepted']:.0f}/{r['drafted']:.0f}", flush=True)
                rows.append({"trace": name, "batch": batch, "arm": arm, "reps": a.reps, **r})
    # what each drafting source adds (edit trace, batch 1, prompt lookup)
    source_sets = (("prompt",), ("suffix",), ("output",), ("prompt", "suffix", "output"))
    for sources in [] if a.no_sources or "edit" not in tr else source_sets:
        spec = Speculation(k=a.k, sources=sources, markers=markers(tok), gate=False)
        r = once(tr["edit"], 1, spec)
        print(f"edit  batch 1  ngram from {'+'.join(sources):20s} {r['per_forward']:.2f} tokens/forward  "
              f"accepted {r['accepted']}/{r['drafted']}", flush=True)
        rows.append({"trace": "edit", "batch": 1, "arm": "ngram:" + "+".join(sources), **r})
    out = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "settings": vars(a), "rows": rows}
    with open(os.path.join(w, "results.json"), "w") as f:
        json.dump(out, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench_speculative")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--train_chars", type=int, default=6_000_000)
    p.add_argument("--target_steps", type=int, default=800)
    p.add_argument("--target_lr", type=float, default=1e-3, help="the target's peak lr (default 1e-3)")
    p.add_argument("--target_seq_len", type=int, default=1024,
                   help="the target's training sequences (default 1024: the traces' prompts run to hundreds of tokens)")
    p.add_argument("--target_batch", type=int, default=4, help="the target's training batch (default 4)")
    p.add_argument("--draft_steps", type=int, default=600, help="the draft's steps (configs/tiny.py otherwise)")
    p.add_argument("--train_only", action="store_true")
    p.add_argument("--requests", type=int, default=16, help="requests per trace (default 16)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--max_new", type=int, default=48)
    p.add_argument("--k", type=int, default=7, help="--num_speculative_tokens (default 7)")
    p.add_argument("--arms", default="ngram,ngram-always,ngram-host,draft,draft-always",
                   help="arms besides off (default: all)")
    p.add_argument("--traces", default="edit,plain")
    p.add_argument("--reps", type=int, default=3,
                   help="timed runs of each arm, interleaved; medians of the figures and of the ratios to off")
    p.add_argument("--no_sources", action="store_true", help="skip the per-source prompt lookup rows")
    a = p.parse_args()
    w = os.path.abspath(a.workdir)
    spm, target, draft = train_models(w, a)
    if a.train_only:
        return
    measure(a, w, spm, target, draft)


if __name__ == "__main__":
    main()
