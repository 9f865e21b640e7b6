"""Sample formats as pure functions: strings in, parts (a layout) out; parts + tokenizer -> ids and a loss mask.

A layout is a list of `Text` / `Special` parts, each flagged `train` (its tokens are targets that count).
`render(parts)` is the exact string; `encode_parts(tok, parts)` gives the ids the real tokenizer gives for that string
with special tokens parsed (text between control tokens is encoded as one piece, exactly as the tokenizer splits),
and a mask over those ids. Layouts (Qwen2.5-Coder; ../docs/data.md):

    file FIM, PSM   <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>{middle}<|endoftext|>
    file FIM, SPM   <|fim_prefix|><|fim_suffix|>{suffix}<|fim_middle|>{prefix}{middle}<|endoftext|>
    plain file      {text}<|endoftext|>
    repo            <|repo_name|>{repo}\\n<|file_sep|>{path}\\n{content}\\n ... <|endoftext|>
                    (last file in FIM form: <|file_sep|>{path}\\n<|fim_prefix|>{pre}<|fim_suffix|>{suf}<|fim_middle|>{mid})
    chat            <|im_start|>{role}\\n{content}<|im_end|>\\n ...  (assistant content + its <|im_end|> trained)

Loss-mask convention (label-aligned): mask[t] = 1 means token t is a training target (predicted from the tokens
before it in the same document). A token that straddles a trained/untrained boundary counts as trained.
"""
from __future__ import annotations

import dataclasses
import heapq
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from qcjax.tokenizer import (ENDOFTEXT, FILE_SEP, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, IM_END, IM_START, REPO_NAME,
                             Tokenizer)


@dataclasses.dataclass(frozen=True, slots=True)
class Text:
    text: str
    train: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class Special:
    name: str  # a name from qcjax.tokenizer's table
    train: bool = True


Part = Text | Special


class Doc(NamedTuple):
    """One tokenized sample."""

    tokens: np.ndarray  # [L] int32
    loss_mask: np.ndarray  # [L] float32, label-aligned (see module doc)


def render(parts: Sequence[Part]) -> str:
    """The exact string a layout stands for (control tokens written out)."""
    return "".join(p.text if isinstance(p, Text) else p.name for p in parts)


def encode_parts(tok: Tokenizer, parts: Sequence[Part]) -> Doc:
    """Ids + loss mask of a layout. Adjacent Text parts are encoded together (they are one piece for the tokenizer);
    where their train flags differ, token spans decide (a token overlapping any trained character is trained)."""
    ids: list[np.ndarray] = []
    mask: list[np.ndarray] = []
    run: list[Text] = []
    specials: list[int] = []  # consecutive control tokens, flushed as one array
    special_mask: list[float] = []

    def flush_specials() -> None:
        if specials:
            ids.append(np.asarray(specials, np.int32))
            mask.append(np.asarray(special_mask, np.float32))
            specials.clear()
            special_mask.clear()

    def flush_text() -> None:
        if not run:
            return
        text = "".join(t.text for t in run)
        flags = {t.train for t in run if t.text}
        if len(flags) <= 1:
            got = np.asarray(tok.encode(text), np.int32)
            m = np.full(len(got), float(flags.pop() if flags else False), np.float32)
        else:
            got_list, offsets = tok.encode_offsets(text)
            got = np.asarray(got_list, np.int32)
            trained = np.zeros(len(text) + 1, np.int64)  # prefix sums of trained characters
            pos = 0
            for t in run:
                if t.train:
                    trained[pos + 1: pos + 1 + len(t.text)] = 1
                pos += len(t.text)
            trained = np.cumsum(trained)
            span = np.asarray(offsets, np.int64).reshape(-1, 2)
            start = np.minimum(span[:, 0], len(text))
            end = np.minimum(np.maximum(span[:, 1], span[:, 0] + 1), len(text))
            m = (trained[end] - trained[start] > 0).astype(np.float32)
        ids.append(got)
        mask.append(m)
        run.clear()

    for p in parts:
        if isinstance(p, Text):
            flush_specials()
            run.append(p)
        else:
            flush_text()
            specials.append(tok.special_id(p.name))
            special_mask.append(float(p.train))
    flush_text()
    flush_specials()
    if not ids:
        return Doc(np.zeros(0, np.int32), np.zeros(0, np.float32))
    return Doc(np.concatenate(ids), np.concatenate(mask))


# ---------------------------------------------------------------------------------------------------------------
# File-level: plain documents and fill-in-the-middle.

def plain_parts(text: str) -> list[Part]:
    """A document for next-token prediction: every document ends with <|endoftext|>."""
    return [Text(text), Special(ENDOFTEXT)]


def fim_split_points(text: str, rng: np.random.Generator, unit: str = "char") -> tuple[int, int]:
    """Two sorted split points (character indices 0..len) for prefix|middle|suffix, uniform over characters or
    over line starts (unit="line": the middle is whole lines)."""
    if unit == "char":
        i, j = rng.integers(0, len(text) + 1, size=2)
    elif unit == "line":
        bounds = [0]
        k = text.find("\n")
        while k != -1:
            bounds.append(k + 1)
            k = text.find("\n", k + 1)
        if bounds[-1] != len(text):
            bounds.append(len(text))
        i, j = (bounds[x] for x in rng.integers(0, len(bounds), size=2))
    else:
        raise ValueError(f"FIM unit must be 'char' or 'line', got {unit!r}")
    return (int(i), int(j)) if i <= j else (int(j), int(i))


def fim_parts(prefix: str, middle: str, suffix: str, spm: bool = False, instruct: bool = False) -> list[Part]:
    """A FIM sample. PSM: <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>{middle}<|endoftext|>.
    SPM (Bavarian et al. 2022, the variant that keeps prefix+middle contiguous):
    <|fim_prefix|><|fim_suffix|>{suffix}<|fim_middle|>{prefix}{middle}<|endoftext|>.
    instruct=True trains only the middle and <|endoftext|> (SFT infilling samples); else everything is trained."""
    ctx = not instruct
    if spm:
        return [Special(FIM_PREFIX, ctx), Special(FIM_SUFFIX, ctx), Text(suffix, ctx), Special(FIM_MIDDLE, ctx),
                Text(prefix, ctx), Text(middle), Special(ENDOFTEXT)]
    return [Special(FIM_PREFIX, ctx), Text(prefix, ctx), Special(FIM_SUFFIX, ctx), Text(suffix, ctx),
            Special(FIM_MIDDLE, ctx), Text(middle), Special(ENDOFTEXT)]


def document_parts(text: str, rng: np.random.Generator, fim_rate: float = 0.5, spm_rate: float = 0.0,
                   unit: str = "char") -> list[Part]:
    """File-level pretraining sample: with probability fim_rate a FIM sample (SPM with probability spm_rate),
    else plain. All tokens are trained (next-token prediction over the transformed document)."""
    if fim_rate > 0 and rng.random() < fim_rate:
        i, j = fim_split_points(text, rng, unit)
        spm = spm_rate > 0 and rng.random() < spm_rate
        return fim_parts(text[:i], text[i:j], text[j:], spm=spm)
    return plain_parts(text)


# ---------------------------------------------------------------------------------------------------------------
# Repository-level.

_IMPORT_RE = re.compile(r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+([\w., \t()*]+)|import[ \t]+([\w., \t]+))",
                        re.MULTILINE)


def _module_name(path: str) -> str | None:
    if not path.endswith(".py"):
        return None
    mod = path[:-3].replace("\\", "/").strip("/").replace("/", ".")
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else ("" if mod == "__init__" else mod)


def _imports(path: str, content: str) -> set[str]:
    """Absolute module names a Python file imports (relative imports resolved against its package)."""
    mod = _module_name(path) or ""
    pkg = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    out: set[str] = set()
    for m in _IMPORT_RE.finditer(content):
        if m.group(3):
            out.update(x.split(" as ")[0].strip() for x in m.group(3).split(","))
            continue
        base, names = m.group(1), m.group(2)
        dots = len(base) - len(base.lstrip("."))
        if dots:
            parts = pkg.split(".") if pkg else []
            parts = parts[: len(parts) - (dots - 1)] if dots > 1 else parts
            base = ".".join(parts + ([base.lstrip(".")] if base.lstrip(".") else []))
        out.add(base)
        out.update(f"{base}.{n.split(' as ')[0].strip('() ')}" for n in names.split(","))
    return out


def order_files(files: Sequence[tuple[str, str]], order: str, rng: np.random.Generator | None = None
                ) -> list[tuple[str, str]]:
    """Order (path, content) pairs: "path" (sorted), "given", "random", or "deps" (Python: a module before the
    modules that import it; ties and cycles broken by path)."""
    if order == "given":
        return list(files)
    if order == "path":
        return sorted(files, key=lambda f: f[0])
    if order == "random":
        if rng is None:
            raise ValueError("order 'random' needs an rng")
        return [files[i] for i in rng.permutation(len(files))]
    if order != "deps":
        raise ValueError(f"repo file order must be path/given/random/deps, got {order!r}")
    files = sorted(files, key=lambda f: f[0])
    by_mod = {}
    for k, (p, _) in enumerate(files):
        m = _module_name(p)
        if m:
            by_mod[m] = k
    deps: list[set[int]] = []
    for k, (p, c) in enumerate(files):
        d = {by_mod[m] for m in _imports(p, c) if m in by_mod} if p.endswith(".py") else set()
        d.discard(k)
        deps.append(d)
    users: list[list[int]] = [[] for _ in files]
    for k, d in enumerate(deps):
        for j in d:
            users[j].append(k)
    indeg = [len(d) for d in deps]
    ready = [k for k in range(len(files)) if indeg[k] == 0]
    heapq.heapify(ready)
    done = [False] * len(files)
    out = []
    while len(out) < len(files):
        if not ready:  # a cycle: take the first remaining file by path
            k = next(i for i in range(len(files)) if not done[i])
            indeg[k] = 0
            heapq.heappush(ready, k)
        k = heapq.heappop(ready)
        if done[k]:
            continue
        done[k] = True
        out.append(files[k])
        for u in users[k]:
            indeg[u] -= 1
            if indeg[u] == 0 and not done[u]:
                heapq.heappush(ready, u)
    return out


def repo_file_text(path: str, content: str) -> str:
    """The text after <|file_sep|> for one file: path, newline, content, newline. Qwen's repo-level layout
    (QwenLM/Qwen2.5-Coder, examples/Qwen2.5-Coder.md: `<|file_sep|>{path}\n{content}\n<|file_sep|>...`) always adds
    the newline, so a file that ends in one is followed by a blank line (its worked examples show exactly that)."""
    return f"{path}\n{content}\n"


def repo_parts(repo: str, files: Sequence[tuple[str, str]], fim_last: tuple[int, int] | None = None,
               spm: bool = False) -> list[Part]:
    """The layout of one repo-level sample (files already ordered and cut). fim_last=(i, j) puts the last file in
    FIM form with split points i <= j in its content."""
    parts: list[Part] = [Special(REPO_NAME), Text(repo + "\n")]
    for k, (path, content) in enumerate(files):
        parts.append(Special(FILE_SEP))
        if fim_last is not None and k == len(files) - 1:
            i, j = fim_last
            parts.append(Text(path + "\n"))
            parts += fim_parts(content[:i], content[i:j], content[j:], spm=spm)[:-1]
        else:
            parts.append(Text(repo_file_text(path, content)))
    parts.append(Special(ENDOFTEXT))
    return parts


def repo_docs(tok: Tokenizer, repo: str, files: Sequence[tuple[str, str]], budget: int | None,
              rng: np.random.Generator, *, order: str = "path", fim_rate: float = 0.5, spm_rate: float = 0.0,
              unit: str = "char", overflow: str = "split") -> tuple[list[Doc], int]:
    """Repo-level samples of one repository: files in `order`, each sample at most `budget` tokens (a single file
    longer than the budget still forms its own sample; the packer splits or truncates it, counted). overflow
    "split": files that do not fit start the next sample (again after <|repo_name|>); "cut": they are left out.
    The last file of each sample is in FIM form with probability fim_rate. Returns (docs, files left out).

    Each file's tokens are computed once: text between control tokens is encoded independently by the tokenizer,
    so per-file pieces concatenate to exactly the encoding of the rendered sample."""
    eot, sep = tok.special_id(ENDOFTEXT), tok.special_id(FILE_SEP)
    files = order_files(files, order, rng)
    head = [tok.special_id(REPO_NAME)] + tok.encode(repo + "\n")
    encoded = [[sep] + tok.encode(repo_file_text(p, c)) for p, c in files]
    groups: list[list[int]] = []  # file indices per sample
    size = len(head) + 1
    for k, ids in enumerate(encoded):
        if groups and (budget is None or size + len(ids) <= budget):
            groups[-1].append(k)
            size += len(ids)
            continue
        if groups and overflow == "cut":
            return _finish_repo(tok, head, files, encoded, groups, budget, rng, fim_rate, spm_rate, unit, eot, sep), \
                len(files) - k
        groups.append([k])
        size = len(head) + 1 + len(ids)
    return _finish_repo(tok, head, files, encoded, groups, budget, rng, fim_rate, spm_rate, unit, eot, sep), 0


def _finish_repo(tok, head, files, encoded, groups, budget, rng, fim_rate, spm_rate, unit, eot, sep) -> list[Doc]:
    docs = []
    for g in groups:
        body = [t for k in g for t in encoded[k]]
        if fim_rate > 0 and rng.random() < fim_rate:
            path, content = files[g[-1]]
            i, j = fim_split_points(content, rng, unit)
            spm = spm_rate > 0 and rng.random() < spm_rate
            last = [sep] + encode_parts(tok, [Text(path + "\n")] + fim_parts(
                content[:i], content[i:j], content[j:], spm=spm)[:-1]).tokens.tolist()
            fim_body = [t for k in g[:-1] for t in encoded[k]] + last
            # FIM form changes the length by a few tokens: keep the plain form if it would break the budget.
            if budget is None or len(g) == 1 or len(head) + len(fim_body) + 1 <= budget:
                body = fim_body
        ids = np.asarray(head + body + [eot], np.int32)
        docs.append(Doc(ids, np.ones(len(ids), np.float32)))
    return docs


# ---------------------------------------------------------------------------------------------------------------
# Chat (SFT) and preference pairs (DPO).

def chat_parts(messages: Sequence[Mapping[str, str]], system: str | None = None, train: str = "assistant"
               ) -> list[Part]:
    """ChatML: <|im_start|>{role}\\n{content}<|im_end|>\\n per message. Trained: the content and <|im_end|> of every
    assistant turn (train="assistant") or only of the last message (train="last": DPO completions). The role
    header and the newline after <|im_end|> are never trained. `system` is inserted first if no system turn."""
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    parts: list[Part] = []
    for k, m in enumerate(messages):
        on = m["role"] == "assistant" if train == "assistant" else k == len(messages) - 1
        parts += [Special(IM_START, False), Text(m["role"] + "\n", False), Text(m["content"], on),
                  Special(IM_END, on), Text("\n", False)]
    return parts


def generation_prompt_parts() -> list[Part]:
    """What a chat prompt ends with for the model to answer: <|im_start|>assistant\\n."""
    return [Special(IM_START, False), Text("assistant\n", False)]


def dpo_parts(prompt: str | Sequence[Mapping[str, str]], completion: str, style: str = "chatml",
              system: str | None = None) -> list[Part]:
    """One side of a preference pair; only the completion is trained (with <|im_end|> or <|endoftext|>).
    chatml: the prompt (a string = one user turn, or a message list) then the completion as the assistant turn.
    raw: {prompt}{completion}<|endoftext|>."""
    if style == "raw":
        if not isinstance(prompt, str):
            raise ValueError("dpo style 'raw' needs a string prompt")
        return [Text(prompt, False), Text(completion), Special(ENDOFTEXT)]
    if style != "chatml":
        raise ValueError(f"dpo style must be 'chatml' or 'raw', got {style!r}")
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return chat_parts([*msgs, {"role": "assistant", "content": completion}], system, train="last")


def truncate_doc(doc: Doc, length: int) -> Doc:
    return Doc(doc.tokens[:length], doc.loss_mask[:length])


def split_doc(doc: Doc, length: int) -> list[Doc]:
    """Row-sized pieces of a long document (each becomes its own segment; see pipeline)."""
    starts = range(0, len(doc.tokens), length)
    return [Doc(doc.tokens[s:s + length], doc.loss_mask[s:s + length]) for s in starts]


__all__ = ["Text", "Special", "Part", "Doc", "render", "encode_parts", "plain_parts", "fim_split_points",
           "fim_parts", "document_parts", "order_files", "repo_file_text", "repo_parts", "repo_docs", "chat_parts",
           "generation_prompt_parts", "dpo_parts", "truncate_doc", "split_doc"]
