"""Speculative decoding: who proposes the draft tokens a verify step judges (qcjax.inference.programs.verify).

Two proposers, both deterministic (a draft is a guess, never a sample: the verify step keeps a draft token while it
equals the token plain decoding draws there, so greedy or sampled, the text is the one plain decoding gives):

- `NgramProposer` (prompt lookup, no model): the last n tokens of a row (n from `max_ngram` down to `min_ngram`)
  are looked up in the row's own tokens, and the tokens that followed their most recent earlier occurrence are the
  draft. For code that is where the next tokens usually are: a line above the cursor, the FIM suffix (the text
  below the cursor is in the prompt), another file of the repository context, the text generated so far. `sources`
  restricts where a match may lie (by the prompt's FIM / repository markers), which is how docs/serving.md
  measures what each source adds. `ngram_draft` is the same rule on the device: over every source the engine
  drafts inside its device loop (programs.speculate: a chunk of draft + verify rounds per call); the host-side
  proposer serves restricted sources and `Speculation(device=False)`.
- `DraftModelProposer`: a smaller model of the same family (one tokenizer) proposes `k` greedy tokens. It keeps its
  own page pool with the target's page ids and page size (a row's page table serves both models, so prefix-cache
  hits and preemption need no second bookkeeping); its keys lag the target's by at most one token, which it
  catches up on at its next proposal.

Adaptive: each row drafts `k` tokens at most, grows its draft after a fully accepted one and shrinks it after a
rejection; a row whose drafts keep failing backs off (no drafting for 1, 2, 4 ... 16 rounds), so a batch whose
text does not repeat decodes as if speculation were off. Gated (`gate`, on by default): the engine runs a plain
decode chunk instead of speculating wherever the chunk is expected to give more tokens per second: on the device
path from the measured rates of its recent speculating calls and plain chunks, on the host path from its verify
and decode call times and each row's running gain (where a verify step costs what a decode step does, as on TPUs
and GPUs reading the weights, verifying nearly always wins; on a CPU, where a forward costs by the tokens it
computes, only rows whose drafts are mostly right verify).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

SOURCES = ("prompt", "suffix", "repo", "output")
MAX_BACKOFF = 16
GAIN_DECAY = 0.7  # weight of the past in a row's running gain (the drafts a verify round accepts)


@dataclasses.dataclass
class Speculation:
    """What a user picks: method "ngram" (prompt lookup) or "draft" (a draft model, given as `draft` = (cfg, params));
    k: draft tokens per verify step at most (`--num_speculative_tokens`); min_ngram / max_ngram: the lookup's n-gram
    lengths; sources: where prompt lookup may find a match (see SOURCES); markers: the ids of <|fim_suffix|>,
    <|fim_middle|>, <|file_sep|> for the tokenizer in use (needed only when sources leave some out); adaptive: grow
    and shrink each row's draft by its acceptance; gate: let the engine run a plain decode chunk instead of a verify
    round where, on this machine's measured call times and the rows' recent gains, the chunk gives more tokens per
    second (the text is the same either way)."""

    method: str = "ngram"
    k: int = 7
    min_ngram: int = 2
    max_ngram: int = 4
    sources: tuple[str, ...] = SOURCES
    markers: dict | None = None
    adaptive: bool = True
    gate: bool = True
    draft: Any = None  # (ModelConfig, params) of the draft model
    device: bool = True  # ngram over every source: draft on the device, several verify rounds per call

    @property
    def on_device(self) -> bool:
        """Whether the engine drafts inside its device program (programs.speculate): prompt lookup over every
        source (a restricted source set needs the host's region map), unless `device` is off."""
        return self.device and self.method == "ngram" and set(self.sources) == set(SOURCES)

    def __post_init__(self):
        if self.method not in ("ngram", "draft"):
            raise ValueError(f"speculative={self.method!r}: must be 'ngram' or 'draft'")
        if not (isinstance(self.k, (int, np.integer)) and 1 <= self.k <= 31):
            raise ValueError(f"num_speculative_tokens={self.k!r}: must be an integer in [1, 31]")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"ngram lengths {self.min_ngram}..{self.max_ngram}: need 1 <= min <= max")
        bad = [s for s in self.sources if s not in SOURCES]
        if bad or not self.sources:
            raise ValueError(f"speculative sources {list(self.sources)}: choose from {list(SOURCES)}")
        if self.method == "draft" and self.draft is None:
            raise ValueError("speculative='draft' needs a draft model (--draft_hf_dir or --draft_ckpt)")

    def verify_widths(self) -> list[int]:
        """Token widths the verify program compiles for (1 + drafts, in powers of two)."""
        top = 1 << self.k.bit_length()  # pow2(k + 1)
        return [w for w in (2, 4, 8, 16, 32) if w <= top]

    def round_widths(self) -> tuple[int, ...]:
        """Token widths one round of the device program chooses from: 1 (a plain decode step) and verify_widths."""
        return (1, *self.verify_widths())


@dataclasses.dataclass
class RowState:
    """A row's speculation state (lives on its engine Sequence)."""

    k: int
    backoff: int = 0  # rounds left without drafting
    misses: int = 0  # verify steps in a row that accepted nothing
    indexed: int = 0  # ngram: tokens[:indexed] are in `index`
    index: dict = dataclasses.field(default_factory=dict)  # (n-gram) -> end positions, ascending
    regions: Any = None  # ngram: a function position -> source name
    drafted: int = 0
    accepted: int = 0
    verifies: int = 0
    gain: float = 0.0  # running estimate of the drafts a verify round accepts for this row (set from k at first)
    draft_len: int = 0  # draft model: tokens whose keys are in the draft's pages
    draft_from: int = 0  # draft model: the position of the newest proposal's first token


def note_gain(state: RowState, accepted: int) -> None:
    """A round in which the row was asked for a draft: what it gained (0 where it had none) into its running gain."""
    state.gain = GAIN_DECAY * state.gain + (1 - GAIN_DECAY) * accepted


def update(state: RowState, drafted: int, accepted: int, k_max: int, adaptive: bool) -> None:
    """After a verify step: the row's acceptance counters and its next draft length / backoff."""
    state.drafted += drafted
    state.accepted += accepted
    state.verifies += 1
    if not adaptive or drafted == 0:
        return
    if accepted == drafted:
        state.k = min(k_max, 2 * state.k)
    else:
        state.k = max(1, accepted + 1)
    if accepted == 0:
        state.misses += 1
        state.backoff = min(MAX_BACKOFF, 1 << (state.misses - 1))
    else:
        state.misses = 0


def _regions(prompt: Seq[int], prompt_len: int, markers: dict | None):
    """position -> source: "repo" before the last <|file_sep|>, "suffix" between <|fim_suffix|> and <|fim_middle|>,
    "output" after the prompt, else "prompt"."""
    m = markers or {}
    toks = list(prompt[:prompt_len])

    def last(name):
        i = m.get(name)
        return max((p for p, t in enumerate(toks) if t == i), default=-1) if i is not None else -1

    file_sep, suf, mid = last("file_sep"), last("fim_suffix"), last("fim_middle")

    def region(p: int) -> str:
        if p >= prompt_len:
            return "output"
        if suf >= 0 and suf < p <= mid:
            return "suffix"
        if p < file_sep:
            return "repo"
        return "prompt"

    return region


class NgramProposer:
    """Prompt lookup over a row's own tokens (see the module docstring)."""

    def __init__(self, spec: Speculation):
        self.spec = spec

    def state(self, tokens: Seq[int], prompt_len: int) -> RowState:
        st = RowState(k=self.spec.k, gain=self.spec.k / 2)
        if set(self.spec.sources) != set(SOURCES):
            st.regions = _regions(tokens, prompt_len, self.spec.markers)
        return st

    def _index(self, st: RowState, tokens: Seq[int]) -> None:
        lo, hi = self.spec.min_ngram, self.spec.max_ngram
        for end in range(max(st.indexed, lo), len(tokens)):  # n-grams ending before `end`, continued by tokens[end]
            for n in range(lo, min(hi, end) + 1):
                st.index.setdefault(tuple(tokens[end - n: end]), []).append(end)
        st.indexed = max(st.indexed, len(tokens))

    def propose(self, st: RowState, tokens: Seq[int], k: int) -> list[int]:
        """Up to k draft tokens continuing `tokens`, or [] (no earlier occurrence of its last n-gram)."""
        if k <= 0:
            return []
        self._index(st, tokens)  # every n-gram with a continuation; the newest (the query) has none yet
        allowed = set(self.spec.sources)
        for n in range(min(self.spec.max_ngram, len(tokens) - 1), self.spec.min_ngram - 1, -1):
            ends = st.index.get(tuple(tokens[len(tokens) - n:]))
            if not ends:
                continue
            best: list[int] = []
            for e in reversed(ends):
                if st.regions is not None and st.regions(e) not in allowed:
                    continue
                d = list(tokens[e: e + k])
                if len(d) > len(best):
                    best = d
                if len(best) == k:
                    break
            if best:
                return best
        return []


    def drafts(self, rows: Iterable[Any], room: Seq[int]) -> list[list[int]]:
        """The drafts of a batch of engine sequences (s.spec: RowState), each at most its row's k and `room` tokens
        (what its length limit leaves after the verify step's own token); rows backing off draft nothing."""
        out = []
        for s, r in zip(rows, room):
            st = s.spec
            if st.backoff > 0:
                st.backoff -= 1
                out.append([])
                continue
            out.append(self.propose(st, s.tokens, min(st.k, r)) if r > 0 else [])
        return out

    def after(self, rows, drafted, accepted) -> None:
        """After a round (nothing to do: prompt lookup keeps no device state)."""

    def admitted(self, s) -> None:
        """A row entered decoding (nothing to do)."""

    def prefill(self, *args) -> None:
        """The target's prefill call (nothing to do)."""


def ngram_draft(hist: jax.Array, length: jax.Array, k_row: jax.Array, *, k: int, min_n: int, max_n: int
                ) -> tuple[jax.Array, jax.Array]:
    """`NgramProposer.propose` on the device, for a batch of rows: hist [B, H] the rows' tokens (positions
    0..length[b]; the newest, not yet in the cache, at length[b]), k_row [B] the most each may draft (<= k) ->
    (drafts [B, k] int32, their lengths [B]). The same rule: the longest n-gram (max_n down to min_n, n <= length)
    ending the row that occurred earlier; of its earlier occurrences, the most recent followed by k_row tokens, else
    the one followed by the most. Written as a few whole-row passes (one max-reduction picks n and the occurrence
    together): XLA:CPU runs many small ops per round slowly."""
    b, h = hist.shape
    e = jnp.arange(h, dtype=jnp.int32)[None, :]  # an occurrence's end: the position its continuation starts at
    shifted = jnp.pad(hist, ((0, 0), (max_n, 0)), constant_values=-1)  # shifted[:, max_n + i] = hist[:, i]
    tail = jnp.take_along_axis(hist, jnp.maximum(length[:, None] - jnp.arange(max_n)[None, :], 0), axis=1)
    ok = (e <= length[:, None])  # the continuation is a token of the row (the query itself ends past length)
    full = e + k_row[:, None] <= length[:, None] + 1
    # among one n's occurrences: a full draft (the most recent) beats a partial one (the earliest: the longest)
    rank = jnp.where(full, 2 * h + e, h - e)  # in [1, 3h)
    best = jnp.zeros((b, h), jnp.int32)
    for j in range(max_n):  # n = j + 1: the occurrence's token j from its end equals the row's
        ok &= (shifted[:, max_n - 1 - j: max_n - 1 - j + h] == tail[:, j: j + 1]) & (e >= j + 1)
        if j + 1 >= min_n:
            best = jnp.maximum(best, jnp.where(ok & (length[:, None] >= j + 1), (j + 1) * 4 * h + rank, 0))
    top = jnp.max(best, axis=1)  # [B]: n * 4h + rank of the chosen occurrence, 0 if none
    r = top % (4 * h)
    end = jnp.where(r >= 2 * h, r - 2 * h, h - r)
    count = jnp.where(top > 0, jnp.clip(length + 1 - end, 0, k_row), 0).astype(jnp.int32)
    draft = jnp.take_along_axis(hist, jnp.clip(end[:, None] + jnp.arange(k)[None, :], 0, h - 1), axis=1)
    return jnp.where(jnp.arange(k)[None, :] < count[:, None], draft, 0).astype(jnp.int32), count


__all__ = ["NgramProposer", "RowState", "SOURCES", "Speculation", "ngram_draft", "note_gain", "update"]
