"""A small SentencePiece tokenizer trained from scratch on a corpus (default: a sample of the running Python's
standard library): the vocabulary of the CPU configs, the tests and models pretrained from scratch.

    python -m qcjax.data.spm --out DIR --vocab_size 4096 [--max_chars 3000000] [--corpus FILE_OR_DIR]

It lives in the data path, not in qcjax.tokenizer, because its default corpus is a data source: the tokenizer (the
special-token table and the backends) sits below qcjax.data and imports nothing of it (docs/architecture.md).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence

from qcjax.data.sources import stdlib_sample
from qcjax.tokenizer import SPECIAL_TOKENS


def train_spm(out_dir: str, vocab_size: int = 4096, texts: Iterable[str] | None = None, *,
              max_chars: int = 3_000_000, seed: int = 0, model_type: str = "bpe", progress: bool = True) -> str:
    """Train a SentencePiece model on `texts` (default: a sample of the stdlib) and write `out_dir/spm.model`.

    Settings keep code intact: identity normalization, whitespace preserved (indentation pieces allowed), byte
    fallback (every string encodes; newlines become the byte piece <0x0A> because SentencePiece trains on lines),
    digits split. The table's special tokens are user-defined symbols with ids 1..9 (0 is <unk>; no BOS/EOS: the
    formats append <|endoftext|>). Returns the model path.
    """
    import sentencepiece as spm

    n_fixed = 1 + len(SPECIAL_TOKENS) + 256
    if vocab_size < n_fixed + 16:
        raise ValueError(f"vocab_size {vocab_size} too small: {n_fixed} ids are fixed (unk, {len(SPECIAL_TOKENS)} "
                         f"special tokens, 256 byte pieces); use at least {n_fixed + 16}")
    if texts is None:
        texts = stdlib_sample(max_chars, seed, progress)
    lines = [ln for t in texts for ln in t.split("\n") if ln.strip()]
    if not lines:
        raise ValueError("train_spm: the corpus is empty")
    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    t0 = time.perf_counter()
    if progress:
        print(f"training {model_type} SentencePiece, vocab {vocab_size}, on {len(lines)} lines ...", file=sys.stderr)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            user_defined_symbols=list(SPECIAL_TOKENS), byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            split_digits=True, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, character_coverage=1.0,
            max_sentence_length=1 << 16, input_sentence_size=0, num_threads=os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:
        raise RuntimeError(f"SentencePiece training failed (vocab_size {vocab_size} may be too large for a corpus of "
                           f"{sum(map(len, lines))} chars: lower it or give more text): {e}") from e
    path = os.path.join(out_dir, "spm.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    if progress:
        print(f"wrote {path} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return path


def _read_corpus(path: str) -> list[str]:
    """Texts for train-spm --corpus: a JSONL file (field "text"), a text file, or a directory of source files."""
    if os.path.isdir(path):
        out = []
        for root, _, files in os.walk(path):
            for name in sorted(files):
                try:
                    with open(os.path.join(root, name), encoding="utf-8") as f:
                        out.append(f.read())
                except (OSError, UnicodeDecodeError):
                    continue
        return out
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line)["text"] for line in f if line.strip()]
        return [f.read()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qcjax.data.spm", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (writes spm.model)")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--max_chars", type=int, default=3_000_000, help="stdlib sample size in characters")
    p.add_argument("--corpus", default=None, help="JSONL (text field), text file or directory; default: stdlib")
    p.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    texts = _read_corpus(a.corpus) if a.corpus else None
    print(train_spm(a.out, a.vocab_size, texts, max_chars=a.max_chars, seed=a.seed, model_type=a.model_type))
    return 0


if __name__ == "__main__":
    sys.exit(main())
