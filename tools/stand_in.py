"""A tiny random stand-in for a Qwen2.5-Coder hub directory, to try the CLIs in seconds without downloading weights.

    python tools/stand_in.py Qwen2.5-Coder-0.5B      # then: python -m qcjax.serve --hf_dir Qwen2.5-Coder-0.5B ...

The directory looks like a hub checkpoint (config.json, model.safetensors, tokenizer.json) but holds the "tiny" preset
(2 layers, hidden 64) with random weights and a 1024-id byte-level BPE trained on the standard library (Qwen's special
tokens included): the text it writes is noise, the shapes and formats are real. The docs' tested examples
(tests/test_docs.py) run against exactly this.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys


def make_stand_in(path: str) -> None:
    """Write the stand-in to `path` (which must not exist yet)."""
    import jax
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import qcjax
    from qcjax import hf
    from qcjax.data.sources import stdlib_sample
    from qcjax.tokenizer import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_sample(300_000, progress=False), trainer)
    tok_dir = path.rstrip("/") + ".tokenizer"
    os.makedirs(tok_dir)
    try:
        tok.save(os.path.join(tok_dir, "tokenizer.json"))
        cfg = qcjax.get_config("tiny", vocab_size=1024)
        params = jax.jit(lambda key: qcjax.init_params(cfg, key))(jax.random.key(0))  # jitted: 2x faster than eager
        hf.save_hf(path, cfg, params, tokenizer_dir=tok_dir)
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/stand_in.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the directory to create, e.g. Qwen2.5-Coder-0.5B")
    a = p.parse_args(argv)
    if os.path.exists(a.out):
        print(f"{p.prog}: error: {a.out} exists already (the stand-in is written to a new directory)", file=sys.stderr)
        return 2
    make_stand_in(a.out)
    print(f"wrote {a.out}: a random 'tiny' Qwen2 (2 layers, hidden 64) with a 1024-id BPE tokenizer", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
