"""The Grain pipeline: sources -> shard per process -> shuffle -> format + tokenize -> token-weighted mixture ->
first-fit packing into rows -> batches [B, T]. Deterministic for a seed, checkpointable (get_state / set_state,
JSON-serializable, restores exactly), sharded per process.

    it = make_pretrain_iterator(DataConfig(), tok, seq_len=512, batch_size=8, seed=0,
                                process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)      # {"tokens","positions","segment_ids": int32 [B, T], "loss_mask": float32 [B, T]}
    state = it.get_state(); ...; it.set_state(state)    # or grain.checkpoint.CheckpointSave(it) in Orbax

Row layout and the loss-mask convention (the trainer relies on it):
    tokens[b, t]       token ids; padding = <|endoftext|> id
    segment_ids[b, t]  1, 2, ... per document piece in the row; 0 = padding (attend only within equal ids > 0)
    positions[b, t]    0, 1, ... restarting at each segment (0 on padding)
    loss_mask[b, t]    float32, LABEL-ALIGNED: 1.0 means "tokens[b, t] is a target": the loss term
                       -log p(tokens[b, t] | tokens of the same segment before t) counts. It is 0 on padding, on
                       the first token of every segment (nothing before it predicts it), and on untrained tokens
                       (SFT prompts, DPO prompts). Trainer: logits[:, :-1] predict tokens[:, 1:] weighted by
                       loss_mask[:, 1:]; segment starts have mask 0, so nothing crosses documents.
DPO rows carry the same four arrays prefixed "chosen_" and "rejected_"; a pair shares its row index and segment id.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from qcjax.data.config import DataConfig, SourceConfig
from qcjax.data.formats import (Doc, chat_parts, document_parts, dpo_parts, encode_parts, fim_parts,
                                fim_split_points, repo_docs, split_doc, truncate_doc)
from qcjax.data.sources import BAD, WHERE, make_source
from qcjax.tokenizer import CHAT_TOKENS, ENDOFTEXT, FIM_TOKENS, REPO_TOKENS, Tokenizer

log = logging.getLogger("qcjax.data")

LOSS_MASK_DTYPE = np.float32
ROW_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")
_TASK_OVERLONG = {"pretrain": "split", "sft": "truncate", "dpo": "truncate"}
DPO_REF_KEYS = ("ref_chosen_logp", "ref_rejected_logp")  # precomputed reference log-probs (dpo_ref_logps)
_MAX_EMPTY_RUN = 10_000  # consecutive records giving no tokens before the pipeline gives up (all-bad source)


def batch_shapes(task: str, batch_size: int, seq_len: int, ref_logps: bool = False
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of one batch as the iterators yield it for `task` (the layout in the module doc):
    what compiling a train step ahead of time needs, without reading data."""
    dtypes = {"tokens": np.int32, "positions": np.int32, "segment_ids": np.int32, "loss_mask": LOSS_MASK_DTYPE}
    streams = ("chosen_", "rejected_") if task == "dpo" else ("",)
    out = {s + k: ((batch_size, seq_len), np.dtype(dtypes[k])) for s in streams for k in ROW_KEYS}
    if task == "dpo" and ref_logps:
        out.update({k: ((batch_size,), np.dtype(np.float32)) for k in DPO_REF_KEYS})
    if task == "rl":  # rollout rows (qcjax.rl.rollouts): prompt + completion, loss_mask on the completion
        out["advantages"] = ((batch_size,), np.dtype(np.float32))
    return out


class RecordError(ValueError):
    """A record the format stage cannot use (missing / mistyped field, undecodable line); names file and field."""


# ---------------------------------------------------------------------------------------------------------------
# Records -> documents (runs in Grain's reading threads / workers: module level, picklable).

def _chars(x: Any) -> int:
    """Characters in the strings of a JSON-like value (the location field excluded)."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, dict):
        return sum(_chars(v) for k, v in x.items() if k != WHERE)
    if isinstance(x, (list, tuple)):
        return sum(_chars(v) for v in x)
    return 0


def _where(rec: dict) -> str:
    return str(rec.get(WHERE, "record"))


def _field(rec: dict, name: str, kinds: type | tuple = str) -> Any:
    if name not in rec or rec[name] is None:
        have = sorted(k for k in rec if not k.startswith("__"))
        raise RecordError(f"{_where(rec)}: missing field {name!r} (record has {have})")
    v = rec[name]
    if isinstance(v, bytes):
        v = v.decode("utf-8")
    if not isinstance(v, kinds):
        raise RecordError(f"{_where(rec)}: field {name!r} must be {getattr(kinds, '__name__', kinds)}, "
                          f"got {type(v).__name__}")
    return v


_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "tool": "tool"}


def _messages(rec: dict, name: str | None = None, value: Any = None) -> list[dict]:
    """Chat turns from "messages" ({"role","content"}) or ShareGPT "conversations" ({"from","value"})."""
    if value is None:
        key = name or ("messages" if "messages" in rec or "conversations" not in rec else "conversations")
        value = _field(rec, key, (list, tuple))
    else:
        key = name
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError(f"{_where(rec)}: {key}[{k}] must be an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in _ROLES or not isinstance(content, str):
            raise RecordError(f"{_where(rec)}: {key}[{k}] needs a role in {sorted(_ROLES)} and a string content, "
                              f"got role={role!r}, content type {type(content).__name__}")
        out.append({"role": _ROLES[role], "content": content})
    if not out:
        raise RecordError(f"{_where(rec)}: field {key!r} has no messages")
    return out


def _completion(rec: dict, name: str) -> str:
    v = rec.get(name)
    if isinstance(v, (list, tuple)):  # a conversation ending with the assistant turn
        msgs = _messages(rec, name, v)
        if msgs[-1]["role"] != "assistant":
            raise RecordError(f"{_where(rec)}: field {name!r} must end with an assistant message")
        return msgs[-1]["content"]
    return _field(rec, name)


class FormatRecord(grain.transforms.RandomMap):
    """Record -> {"docs": [tuple of Doc per stream], "bad": message | None, "dropped_files", "skipped_files"}."""

    def __init__(self, tok: Tokenizer, cfg: DataConfig, src: SourceConfig, budget: int):
        self.tok, self.cfg, self.src, self.budget = tok, cfg, src, budget
        self.fim_rate = cfg.source_fim_rate(src)
        self.repo_fim_rate = self.fim_rate if cfg.repo_fim_rate is None else cfg.repo_fim_rate

    def random_map(self, rec: dict, rng: np.random.Generator) -> dict:
        skipped = int(rec.get("skipped_files", 0))
        try:
            if BAD in rec:
                raise RecordError(rec[BAD])
            rec, over = self._capped(rec)
            skipped += over
            docs, dropped, *meta = self._docs(rec, rng)
        except RecordError as e:
            if self.cfg.on_bad_record == "fail":
                raise RecordError(f"data source {self.src.label}: {e}") from None
            return {"docs": [], "bad": f"{self.src.label}: {e}", "dropped_files": 0, "skipped_files": 0}
        return {"docs": docs, "meta": meta[0] if meta else None, "bad": None, "dropped_files": dropped,
                "skipped_files": skipped}

    def _capped(self, rec: dict) -> tuple[dict, int]:
        """(the record, files left out) under data.max_record_chars: a repo record loses its longer files, any
        other record over the cap is a RecordError (before tokenizing: one huge line must not take the memory)."""
        cap = self.cfg.max_record_chars
        if not cap:
            return rec, 0
        if self.src.format == "repo" and isinstance(rec.get("files"), (list, tuple)):
            def size(f):
                content = f.get("content") if isinstance(f, dict) else f[1] if isinstance(f, (list, tuple)) \
                    and len(f) == 2 else None
                return len(content) if isinstance(content, str) else 0

            keep = [f for f in rec["files"] if size(f) <= cap]
            if len(keep) < len(rec["files"]):
                return {**rec, "files": keep}, len(rec["files"]) - len(keep)
            return rec, 0
        n = _chars(rec)
        if n > cap:
            raise RecordError(f"{_where(rec)}: record holds {n:,} characters, over data.max_record_chars={cap:,}")
        return rec, 0

    def _docs(self, rec: dict, rng: np.random.Generator) -> tuple:
        """(docs, files left out[, per-doc meta])."""
        cfg, fmt, tok = self.cfg, self.src.format, self.tok
        if fmt == "text":
            text = _field(rec, self.src.text_field)
            parts = document_parts(text, rng, self.fim_rate, cfg.fim_spm_rate, cfg.fim_unit)
            return [(encode_parts(tok, parts),)], 0
        if fmt == "repo":
            name = rec.get("repo", rec.get("repo_name"))
            if not isinstance(name, str):
                raise RecordError(f"{_where(rec)}: missing string field 'repo' (or 'repo_name')")
            files = []
            for k, f in enumerate(_field(rec, "files", (list, tuple))):
                if isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("content"), str):
                    files.append((f["path"], f["content"]))
                elif isinstance(f, (list, tuple)) and len(f) == 2 and all(isinstance(x, str) for x in f):
                    files.append((f[0], f[1]))
                else:
                    raise RecordError(f"{_where(rec)}: files[{k}] must be {{'path': str, 'content': str}}")
            if not files:
                raise RecordError(f"{_where(rec)}: repository {name!r} has no readable files")
            docs, dropped = repo_docs(tok, name, files, cfg.repo_budget or self.budget, rng,
                                      order=cfg.repo_file_order, fim_rate=self.repo_fim_rate,
                                      spm_rate=cfg.fim_spm_rate, unit=cfg.fim_unit, overflow=cfg.repo_overflow)
            return [(d,) for d in docs], dropped
        if fmt == "chat":
            return [(encode_parts(tok, chat_parts(_messages(rec), cfg.system_prompt)),)], 0
        if fmt == "fim_instruct":
            if "middle" in rec:
                pre, mid, suf = (_field(rec, k) for k in ("prefix", "middle", "suffix"))
            else:
                text = _field(rec, self.src.text_field)
                i, j = fim_split_points(text, rng, cfg.fim_unit)
                pre, mid, suf = text[:i], text[i:j], text[j:]
            spm = cfg.fim_spm_rate > 0 and rng.random() < cfg.fim_spm_rate
            return [(encode_parts(tok, fim_parts(pre, mid, suf, spm=spm, instruct=True)),)], 0
        if fmt == "dpo":
            prompt = rec.get("prompt")
            if prompt is None and isinstance(rec.get("chosen"), (list, tuple)):
                prompt = list(rec["chosen"])[:-1]  # full conversations: the prompt is all but the last turn
            if isinstance(prompt, (list, tuple)):
                prompt = _messages(rec, "prompt", prompt)
            elif not isinstance(prompt, str):
                prompt = _field(rec, "prompt")
            if cfg.dpo_style == "raw" and not isinstance(prompt, str):
                raise RecordError(f"{_where(rec)}: dpo_style 'raw' needs a string 'prompt'")
            system = cfg.system_prompt if cfg.dpo_style == "chatml" else None
            pair = tuple(encode_parts(tok, dpo_parts(prompt, _completion(rec, k), cfg.dpo_style, system))
                         for k in ("chosen", "rejected"))
            if cfg.dpo_ref_logps:
                meta = {k: float(_field(rec, k, (int, float))) for k in DPO_REF_KEYS}
                return [pair], 0, [meta]
            return [pair], 0
        raise ValueError(f"unknown format {fmt!r}")


# ---------------------------------------------------------------------------------------------------------------
# Mixture: deterministic, weighted by tokens (or records). Always draws from the source furthest below its share.

def _n_tokens(elem: dict) -> int:
    return sum(len(d.tokens) for docs in elem["docs"] for d in docs)


class _MixIterator(grain.DatasetIterator):
    def __init__(self, parents, weights, by_tokens: bool, labels):
        super().__init__(parents)
        self._w, self._by_tokens, self._labels = list(weights), by_tokens, list(labels)
        n = len(self._parents)
        self._count, self._records, self._tokens, self._done = [0] * n, [0] * n, [0] * n, [False] * n

    def __next__(self):
        while True:
            live = [i for i, d in enumerate(self._done) if not d]
            if not live:
                raise StopIteration
            i = min(live, key=lambda k: (self._count[k] / self._w[k], k))
            try:
                elem = next(self._parents[i])
            except StopIteration:
                self._done[i] = True
                continue
            n = _n_tokens(elem)
            self._count[i] += max(n, 1) if self._by_tokens else 1
            self._records[i] += 1
            self._tokens[i] += n
            return elem

    def get_state(self) -> dict:
        return {"parents": [p.get_state() for p in self._parents], "count": list(self._count),
                "done": list(self._done),
                "mix_stats": {"labels": self._labels, "records": list(self._records), "tokens": list(self._tokens)}}

    def set_state(self, state: dict) -> None:
        for p, s in zip(self._parents, state["parents"], strict=True):
            p.set_state(s)
        self._count, self._done = list(state["count"]), list(state["done"])
        self._records = list(state["mix_stats"]["records"])
        self._tokens = list(state["mix_stats"]["tokens"])


class MixIterDataset(grain.IterDataset):
    """Weighted mixture of formatted sources. Deterministic: the next element comes from the source whose count
    (tokens or records) divided by its weight is lowest, so proportions track the weights exactly."""

    def __init__(self, parents: Sequence[grain.IterDataset], weights: Sequence[float], by_tokens: bool = True,
                 labels: Sequence[str] = ()):
        super().__init__(list(parents))
        self._weights, self._by_tokens = [float(w) for w in weights], by_tokens
        self._labels = list(labels) or [str(i) for i in range(len(self._weights))]

    def __iter__(self):
        return _MixIterator([p.__iter__() for p in self._parents], self._weights, self._by_tokens, self._labels)

    def __str__(self) -> str:
        return f"MixIterDataset(weights={self._weights}, by_tokens={self._by_tokens})"


# ---------------------------------------------------------------------------------------------------------------
# Packing: first fit into `num_bins` rows; when a piece fits nowhere and all bins are open, the rows are emitted
# and the piece starts the next group. State = where the current group started (+ rows already emitted): a restore
# rebuilds the group deterministically. Counters restore exactly too.

class Piece(NamedTuple):
    """What the packer places: one Doc per stream (1, or 2 for DPO pairs) and per-row scalars (DPO reference
    log-probs) that ride along when rows hold one piece."""

    docs: tuple[Doc, ...]
    meta: dict | None = None


ELEM_STATS = ("records", "bad_records", "docs", "tokens_in", "docs_split", "docs_truncated", "tokens_truncated",
              "docs_skipped", "tokens_skipped", "dropped_files", "skipped_files")
ROW_STATS = ("rows", "tokens_out", "pad_tokens", "segments")


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent, seq_len: int, num_bins: int, overlong: str, streams: Sequence[str], pad_id: int,
                 max_segments: int, meta_keys: Sequence[str]):
        super().__init__(parent)
        self._T, self._num_bins, self._overlong = seq_len, num_bins, overlong
        self._streams, self._pad = tuple(streams), pad_id
        self._max_segments, self._meta_keys = max_segments, tuple(meta_keys)
        self._elem = dict.fromkeys(ELEM_STATS, 0)
        self._rowstat = dict.fromkeys(ROW_STATS, 0)
        self._reset()
        self._start = self._position()

    def _reset(self) -> None:
        self._pieces: list[Piece] = []  # pieces of the element being consumed
        self._pi = 0  # next piece to place
        self._elem_state = None  # parent state before that element
        self._elem_before = dict(self._elem)  # element counters before that element was counted
        self._rows: list[dict] = []
        self._ri = 0
        self._exhausted = False
        self._bad_seen = 0

    # -- element -> pieces (counted once per element read) --------------------------------------------------
    def _pieces_of(self, elem: dict) -> list[Piece]:
        st, T = self._elem, self._T
        st["records"] += 1
        st["dropped_files"] += elem.get("dropped_files", 0)
        st["skipped_files"] += elem.get("skipped_files", 0)
        if elem.get("bad"):
            st["bad_records"] += 1
            if st["bad_records"] <= 10 or st["bad_records"] % 1000 == 0:
                log.warning("skipped bad record #%d: %s", st["bad_records"], elem["bad"])
        out = []
        metas = elem.get("meta") or [None] * len(elem["docs"])
        for docs, meta in zip(elem["docs"], metas):
            lens = [len(d.tokens) for d in docs]
            st["docs"] += 1
            st["tokens_in"] += sum(lens)
            if max(lens) <= T:
                out.append(Piece(docs, meta))
            elif self._overlong == "split":
                st["docs_split"] += 1
                out += [Piece((piece,), meta) for piece in split_doc(docs[0], T)]
            elif self._overlong == "truncate":
                st["docs_truncated"] += 1
                st["tokens_truncated"] += sum(max(n - T, 0) for n in lens)
                out.append(Piece(tuple(truncate_doc(d, T) for d in docs), meta))
            else:
                st["docs_skipped"] += 1
                st["tokens_skipped"] += sum(lens)
        return out

    def _peek(self) -> Piece | None:
        empty = 0
        while self._pi >= len(self._pieces):
            if self._exhausted:
                return None
            state = self._parent.get_state()
            try:
                elem = next(self._parent)
            except StopIteration:
                self._exhausted = True
                return None
            self._elem_state, self._elem_before = state, dict(self._elem)
            self._pieces, self._pi = self._pieces_of(elem), 0
            empty = 0 if self._pieces else empty + 1
            if empty > _MAX_EMPTY_RUN:
                raise DataError(f"{_MAX_EMPTY_RUN} records in a row gave no tokens (last: {elem.get('bad')}); "
                                 f"check the sources' fields and formats")
        return self._pieces[self._pi]

    def _position(self) -> tuple[Any, int, dict]:
        if self._pi < len(self._pieces):
            return self._elem_state, self._pi, dict(self._elem_before)
        return self._parent.get_state(), 0, dict(self._elem)

    # -- packing --------------------------------------------------------------------------------------------
    def _fill(self) -> None:
        self._start = self._position()
        ns, T = len(self._streams), self._T
        bins: list[list[Piece]] = []
        free: list[list[int]] = []
        while (piece := self._peek()) is not None:
            lens = [len(d.tokens) for d in piece.docs]
            for b, f in enumerate(free):
                if len(bins[b]) < self._max_segments and all(x >= n for x, n in zip(f, lens)):
                    break
            else:
                if len(bins) == self._num_bins:
                    break  # the group is full: emit it; this piece starts the next one
                bins.append([])
                free.append([T] * ns)
                b = len(bins) - 1
            bins[b].append(piece)
            free[b] = [x - n for x, n in zip(free[b], lens)]
            self._pi += 1
        if not bins:
            raise StopIteration
        self._rows = [self._row(b) for b in bins]
        self._ri = 0

    def _row(self, pieces: list[Piece]) -> dict[str, np.ndarray]:
        T, out = self._T, {}
        for k in self._meta_keys:  # per-row scalars (rows of one piece)
            out[k] = np.asarray(pieces[0].meta[k], np.float32)
        for s, prefix in enumerate(self._streams):
            tokens = np.full(T, self._pad, np.int32)  # [T]
            positions = np.zeros(T, np.int32)  # [T]
            segments = np.zeros(T, np.int32)  # [T]
            mask = np.zeros(T, LOSS_MASK_DTYPE)  # [T]
            at = 0
            for k, piece in enumerate(pieces, 1):
                d = piece.docs[s]
                n = len(d.tokens)
                tokens[at:at + n] = d.tokens
                positions[at:at + n] = np.arange(n, dtype=np.int32)
                segments[at:at + n] = k
                mask[at:at + n] = d.loss_mask
                mask[at] = 0.0  # a segment's first token has nothing before it to predict it from
                at += n
            out.update({prefix + "tokens": tokens, prefix + "positions": positions,
                        prefix + "segment_ids": segments, prefix + "loss_mask": mask})
        return out

    def __next__(self) -> dict[str, np.ndarray]:
        if self._ri >= len(self._rows):
            self._fill()
        row = self._rows[self._ri]
        self._ri += 1
        n = int(np.count_nonzero(row[self._streams[0] + "segment_ids"]))
        self._rowstat["rows"] += 1
        self._rowstat["tokens_out"] += n
        self._rowstat["pad_tokens"] += self._T - n
        self._rowstat["segments"] += int(row[self._streams[0] + "segment_ids"].max())
        return row

    # -- state ----------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {**self._elem, **self._rowstat}

    def get_state(self) -> dict:
        parent, piece, elem_stats = self._start
        return {"parent": parent, "piece": piece, "row": self._ri, "elem_stats": elem_stats,
                "row_stats": dict(self._rowstat), "pack_stats": self.stats(),
                "parent_now": self._parent.get_state()}  # for iterator_stats only (ignored by set_state)

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._elem = dict(state["elem_stats"])
        self._rowstat = dict(state["row_stats"])
        self._reset()
        if state["piece"]:
            self._peek()  # re-reads (and re-counts) the element the group started in
            self._pi = state["piece"]
        if state["row"]:
            self._fill()
            self._ri = state["row"]
        else:
            self._start = self._position()


class PackIterDataset(grain.IterDataset):
    """First-fit packing of formatted elements into rows of `seq_len` (see module doc for the row layout).
    streams=("",) gives tokens/positions/segment_ids/loss_mask; ("chosen_", "rejected_") packs DPO pairs."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, num_bins: int, overlong: str,
                 streams: Sequence[str] = ("",), pad_id: int = 0, max_segments: int | None = None,
                 meta_keys: Sequence[str] = ()):
        super().__init__(parent)
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if overlong == "split" and len(streams) > 1:
            raise ValueError("overlong='split' cannot keep pairs together: use 'truncate' or 'skip'")
        if meta_keys and max_segments != 1:
            raise ValueError("per-row values (meta_keys) need rows of one piece (max_segments=1)")
        self._args = (seq_len, max(1, num_bins), overlong, tuple(streams), pad_id, max_segments or seq_len,
                      tuple(meta_keys))

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), *self._args)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._args[0]}, num_bins={self._args[1]}, overlong={self._args[2]})"


class _PadBatch(grain.transforms.Map):
    """The last batch of a finite epoch has fewer rows: fill with padding rows (segment 0, mask 0), never drop."""

    def __init__(self, batch_size: int, pad_id: int):
        self.batch_size, self.pad_id = batch_size, pad_id

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = self.batch_size - next(iter(batch.values())).shape[0]
        if missing <= 0:
            return batch
        out = {}
        for k, v in batch.items():
            fill = self.pad_id if k.endswith("tokens") else 0
            out[k] = np.concatenate([v, np.full((missing,) + v.shape[1:], fill, v.dtype)])
        return out


# ---------------------------------------------------------------------------------------------------------------
# Factories (what the training loop calls).

def _seed(seed: int, *salt: int) -> int:
    return int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0])


def _require_tokens(cfg: DataConfig, tok: Tokenizer, task: str) -> None:
    tok.require([ENDOFTEXT], "every sample format (documents end with <|endoftext|>)")
    for s in cfg.sources:
        rate = cfg.source_fim_rate(s)
        if s.format == "text" and rate > 0:
            tok.require(FIM_TOKENS[:3], f"FIM (fim_rate={rate} for source {s.label}; set it to 0 to turn FIM off)")
        if s.format == "repo":
            tok.require(REPO_TOKENS, f"repo-level samples (source {s.label})")
            repo_rate = rate if cfg.repo_fim_rate is None else cfg.repo_fim_rate
            if repo_rate > 0:
                tok.require(FIM_TOKENS[:3], f"FIM in repo samples (source {s.label}; set repo_fim_rate=0 to "
                                            f"turn it off)")
        if s.format == "fim_instruct":
            tok.require(FIM_TOKENS[:3], f"FIM instruction samples (source {s.label})")
        if s.format == "chat" or (s.format == "dpo" and cfg.dpo_style == "chatml"):
            tok.require(CHAT_TOKENS, f"ChatML samples (source {s.label})")


def _holdout(ds: grain.MapDataset, fraction: float, split: str, label: str) -> grain.MapDataset:
    """A fixed (seed-independent) random `fraction` of a source's records is the eval split; the rest is train."""
    n = len(ds)
    m = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    if split == "train":
        return ds if m == 0 else ds.shuffle(seed=_HOLDOUT_SEED)[m:]
    if m == 0:
        raise ValueError(f"data source {label}: no eval split: {n} record(s) with eval_fraction={fraction} "
                         f"(set data.eval_fraction > 0; a source needs at least 2 records)")
    return ds.shuffle(seed=_HOLDOUT_SEED)[:m]


_HOLDOUT_SEED = 20240912


def make_dataset(task: str, cfg: DataConfig, tok: Tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, split: str = "train") -> grain.IterDataset:
    """The batched Grain dataset for task "pretrain", "sft" or "dpo" (see the make_*_iterator functions).
    split "train" or "eval" (a held-out eval_fraction of every source, fixed across seeds)."""
    if task not in _TASK_OVERLONG:
        raise ValueError(f"task must be pretrain, sft or dpo, got {task!r}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    cfg.validate(task)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    _require_tokens(cfg, tok, task)
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=max(cfg.prefetch, 1))
    parts = []
    for i, s in enumerate(cfg.sources):
        src = make_source(s)
        ds = _holdout(grain.MapDataset.source(src), cfg.eval_fraction, split, s.label)
        n = len(ds)
        ds = ds[process_index::process_count]
        if len(ds) == 0:
            raise ValueError(f"data source {s.label}: its {n} {split} records cannot be shared by {process_count} "
                             f"processes (process {process_index} gets none)")
        if cfg.shuffle:
            ds = ds.shuffle(seed=_seed(seed, i, 1) % 2**32)
        ds = ds.repeat(cfg.num_epochs)
        ds = ds.random_map(FormatRecord(tok, cfg, s, seq_len), seed=_seed(seed, i, 2, process_index) % 2**32)
        parts.append(ds.to_iter_dataset(read))
    ds = MixIterDataset(parts, [s.weight for s in cfg.sources], cfg.mix_by == "tokens",
                        [s.label for s in cfg.sources])
    # DPO: one pair per row (the trainer sums each row's completion log-probs into one pair's score).
    dpo = task == "dpo"
    ds = PackIterDataset(ds, seq_len, cfg.pack_bins or max(8, batch_size), cfg.overlong or _TASK_OVERLONG[task],
                         ("chosen_", "rejected_") if dpo else ("",), tok.pad_id, max_segments=1 if dpo else None,
                         meta_keys=DPO_REF_KEYS if dpo and cfg.dpo_ref_logps else ())
    ds = ds.batch(batch_size, drop_remainder=False).map(_PadBatch(batch_size, tok.pad_id))
    if cfg.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; a library caller may not have parsed any
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return ds


def make_iterator(task: str, cfg: DataConfig, tok: Tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                  process_index: int = 0, process_count: int = 1, split: str = "train") -> grain.DatasetIterator:
    """This process's batches for `task` ("pretrain" | "sft" | "dpo"); see the task functions below."""
    return iter(make_dataset(task, cfg, tok, seq_len, batch_size, seed, process_index, process_count, split))


def make_pretrain_iterator(cfg: DataConfig, tok: Tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                           process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Batches {"tokens","positions","segment_ids": int32 [B, T], "loss_mask": float32 [B, T]} of packed
    pretraining documents (file-level with FIM and/or repo-level). get_state()/set_state() resume exactly."""
    return iter(make_dataset("pretrain", cfg, tok, seq_len, batch_size, seed, process_index, process_count))


def make_sft_iterator(cfg: DataConfig, tok: Tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                      process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Like make_pretrain_iterator for ChatML and FIM-instruction samples; loss_mask is 1 only on assistant
    tokens (their <|im_end|> included) and on FIM middles (+ <|endoftext|>)."""
    return iter(make_dataset("sft", cfg, tok, seq_len, batch_size, seed, process_index, process_count))


def make_dpo_iterator(cfg: DataConfig, tok: Tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                      process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Batches of preference pairs: chosen_{tokens,positions,segment_ids,loss_mask} and rejected_{...}, each
    [B, T], one pair per row (segment id 1; padding rows of a final partial batch are all 0); loss_mask covers
    only the completion tokens. With data.dpo_ref_logps, also ref_chosen_logp / ref_rejected_logp [B] float32."""
    return iter(make_dataset("dpo", cfg, tok, seq_len, batch_size, seed, process_index, process_count))


def iterator_stats(it_or_state: Any) -> dict[str, Any]:
    """Counters of an iterator (or of its saved state): records, bad_records, docs, tokens_in, docs_split,
    docs_truncated, tokens_truncated, docs_skipped, tokens_skipped, dropped_files, skipped_files, rows,
    tokens_out, pad_tokens, segments, and per source {"records", "tokens"}. Nothing is dropped uncounted:
    once the rows are emitted, tokens_in == tokens_out + tokens_truncated + tokens_skipped."""
    state = it_or_state.get_state() if hasattr(it_or_state, "get_state") else it_or_state
    out: dict[str, Any] = dict.fromkeys(ELEM_STATS + ROW_STATS, 0)
    sources: dict[str, dict[str, int]] = {}

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if "pack_stats" in x:
                for k, v in x["pack_stats"].items():
                    out[k] = out.get(k, 0) + v
                walk(x["parent_now"])  # current counters upstream ("parent" is where the row group started)
                return
            if "mix_stats" in x:
                m = x["mix_stats"]
                for lab, r, t in zip(m["labels"], m["records"], m["tokens"]):
                    s = sources.setdefault(lab, {"records": 0, "tokens": 0})
                    s["records"] += r
                    s["tokens"] += t
            for k, v in x.items():
                if k not in ("pack_stats", "mix_stats", "elem_stats", "row_stats"):
                    walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(state)
    out["sources"] = sources
    return out
