"""Generation prompts from what users give (text, a cursor in a file, a repository, a chat message).

Every layout comes from qcjax.data.formats (the training formats: one place), cut where the model takes over:
a FIM prompt is the training sample up to and including <|fim_middle|> (the model writes the middle), a chat
prompt ends with the generation header <|im_start|>assistant\\n. This module only picks the pieces.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from qcjax.data import formats as F
from qcjax.data.config import QWEN_DEFAULT_SYSTEM
from qcjax.data.sources import list_files, read_text
from qcjax.tokenizer import ENDOFTEXT, FILE_SEP, FIM_MIDDLE, Tokenizer

# What Qwen2.5(-Coder)-Instruct's chat template inserts when the conversation has no system turn.
DEFAULT_SYSTEM = QWEN_DEFAULT_SYSTEM  # Qwen's chat template's default system turn (one definition: data/config.py)


def _until_middle(parts: list[F.Part]) -> list[F.Part]:
    """A FIM layout built with an empty middle, cut right after <|fim_middle|> (where the model writes)."""
    ends = [k for k, p in enumerate(parts) if isinstance(p, F.Special) and p.name == FIM_MIDDLE]
    assert ends, "layout has no <|fim_middle|>"
    rest = parts[ends[-1] + 1:]
    assert all((isinstance(p, F.Text) and p.text == "") or (isinstance(p, F.Special) and p.name == ENDOFTEXT)
               for p in rest), f"unexpected layout after <|fim_middle|>: {rest}"
    return parts[: ends[-1] + 1]


def fim_prompt(prefix: str, suffix: str) -> list[F.Part]:
    """<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|> (PSM, the file-level training format)."""
    return _until_middle(F.fim_parts(prefix, "", suffix))


def repo_prompt(repo: str, files: Sequence[tuple[str, str]], path: str, prefix: str, suffix: str) -> list[F.Part]:
    """<|repo_name|>{repo}\\n<|file_sep|>{path}\\n{content}... then the current file in FIM form at the cursor."""
    cur = (path, prefix + suffix)
    return _until_middle(F.repo_parts(repo, [*files, cur], fim_last=(len(prefix), len(prefix))))


CHAT_ROLES = ("system", "user", "assistant", "tool")  # the roles Qwen2.5's chat template renders


def chat_prompt(message: str | Sequence[dict], system: str | None = DEFAULT_SYSTEM) -> list[F.Part]:
    """ChatML turns (a string is one user turn) followed by the generation header <|im_start|>assistant\\n."""
    msgs = [{"role": "user", "content": message}] if isinstance(message, str) else list(message)
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"chat message {k} must be {{'role': str, 'content': str}}, got {m!r}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"chat message {k} has role {m['role']!r}; ChatML roles: {', '.join(CHAT_ROLES)}")
    return F.chat_parts(msgs, system) + F.generation_prompt_parts()


def encode(tok: Tokenizer, parts: Sequence[F.Part]) -> list[int]:
    return F.encode_parts(tok, parts).tokens.tolist()


def split_at_cursor(text: str, cursor: str, where: str = "file") -> tuple[str, str]:
    """"LINE:COL" (1-based, as editors show; COL may be one past the line's end) -> (prefix, suffix)."""
    try:
        line, col = (int(x) for x in cursor.split(":"))
    except ValueError:
        raise ValueError(f"--cursor {cursor!r}: expected LINE:COL with 1-based integers, e.g. 12:5") from None
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise ValueError(f"--cursor {cursor}: line {line} is outside {where} (lines 1..{len(lines)})")
    if not 1 <= col <= len(lines[line - 1]) + 1:
        raise ValueError(f"--cursor {cursor}: column {col} is outside line {line} of {where} "
                         f"(columns 1..{len(lines[line - 1]) + 1})")
    offset = sum(len(s) + 1 for s in lines[: line - 1]) + col - 1
    return text[:offset], text[offset:]


def read_repo(repo_dir: str, current: str | None = None, max_file_bytes: int = 1_000_000
              ) -> tuple[str, list[tuple[str, str]]]:
    """(repo name, [(path, content)]) of a repository's text files (the data pipeline's listing rules: hidden and
    cache directories skipped, binary or non-UTF-8 files left out), without the current file, in dependency order
    (a module before the modules importing it), as the repo-level training samples order them."""
    if not os.path.isdir(repo_dir):
        raise ValueError(f"--repo {repo_dir}: not a directory")
    cur = os.path.realpath(current) if current else None
    files = []
    for rel in list_files(repo_dir, ()):
        full = os.path.join(repo_dir, rel)
        if cur is not None and os.path.realpath(full) == cur:
            continue
        text = read_text(full, max_file_bytes)
        if text is not None:
            files.append((rel.replace(os.sep, "/"), text))
    name = os.path.basename(os.path.realpath(repo_dir))
    return name, F.order_files(files, "deps")


def fit_repo_files(tok: Tokenizer, files: Sequence[tuple[str, str]], budget: int, log=sys.stderr
                   ) -> list[tuple[str, str]]:
    """The files (in order) whose tokens fit in `budget`; the rest are left out and named on `log`."""
    sep = 1 if FILE_SEP in tok.special_ids else 0
    kept, used, dropped = [], 0, []
    for path, content in files:
        n = sep + len(tok.encode(F.repo_file_text(path, content)))
        if used + n <= budget:
            kept.append((path, content))
            used += n
        else:
            dropped.append(path)
    if dropped and log is not None:
        print(f"repo context: {len(dropped)} file(s) left out to fit the context: {', '.join(dropped[:10])}"
              f"{' ...' if len(dropped) > 10 else ''}", file=log)
    return kept
