"""A draft model for speculative decoding: a smaller model of the same family (one tokenizer: Qwen2.5-Coder 0.5B or
1.5B drafting for 7B, 14B or 32B) proposes k greedy tokens per row, the target verifies them in one forward.

The draft keeps its own page pool with the target's page ids and page size, so a row's page table serves both
models: prefill writes both pools (prefix-cache hits and preemption need no second bookkeeping), a proposal first
catches the draft up on the row's tokens it has not seen (the newest token, and the last accepted draft after a
fully accepted run), then runs k - 1 decode steps. The draft's keys can lag the target's by a few tokens when a page
enters the prefix cache; a later request reusing that page gets slightly worse drafts, never different text (the
target checks every token).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qcjax.inference import programs
from qcjax.inference.rows import GREEDY_KINDS, STOP_WIDTH
from qcjax.inference.speculative import RowState, Speculation
from qcjax.sampling import Controls, Filters, pow2


def check_draft(target_cfg, draft_cfg) -> None:
    """ValueError naming what differs, for a draft model that cannot propose for this target."""
    if draft_cfg.vocab_size > target_cfg.vocab_size:
        raise ValueError(f"draft model vocab_size={draft_cfg.vocab_size} is larger than the target's "
                         f"{target_cfg.vocab_size}: a draft must share the target's tokenizer (same family)")


class DraftModelProposer:
    """Proposes with a draft model; one per engine (see the module docstring)."""

    def __init__(self, engine, spec: Speculation):
        cfg, params = spec.draft
        check_draft(engine.cfg, cfg)
        if engine.max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len={engine.max_len}: more than the draft model's context of "
                             f"{cfg.max_position_embeddings}")
        self.engine, self.spec, self.cfg = engine, spec, cfg
        self.params = programs.place_params(cfg, params, engine.mesh)
        self.pool: programs.Pool | None = None

    # ---- engine hooks ------------------------------------------------------------------------------------------------
    def state(self, tokens, prompt_len: int) -> RowState:
        return RowState(k=self.spec.k, gain=self.spec.k / 2)

    def admitted(self, s) -> None:
        """A row entered decoding: its prompt (every token but the newest) is in both pools."""
        s.spec.draft_len = len(s.tokens) - 1

    def _ensure_pool(self) -> None:
        if self.pool is None:
            e = self.engine
            self.pool = programs.init_pool(self.cfg, num_pages=e.num_pages, page_size=e.page_size,
                                           dtype=e.cache_dtype)

    def prefill(self, tokens: jax.Array, lengths: jax.Array, counts: jax.Array, pages: jax.Array,
                controls: Controls) -> None:
        """The target's prefill call, run through the draft into its pool (the drawn token is not used)."""
        self._ensure_pool()
        num = jnp.zeros_like(lengths)
        self.pool, _ = programs.prefill(self.cfg, GREEDY_KINDS, self.params, self.pool, tokens, lengths, counts, pages,
                                        num, controls)

    def drafts(self, rows, room) -> list[list[int]]:
        """k greedy draft tokens for each row that drafts this round (not backing off, room left), cut to its k
        and room; [] for the others."""
        active = []
        for s, r in zip(rows, room):
            st = s.spec
            if st.backoff > 0:
                st.backoff -= 1
            elif r > 0:
                active.append(s)
        out = {id(s): [] for s in rows}
        if active:
            for s, d in zip(active, self._propose(active)):
                out[id(s)] = d[: min(s.spec.k, room[rows.index(s)])]
        return [out[id(s)] for s in rows]

    def after(self, rows, drafted, accepted) -> None:
        """Where each row's draft keys stand after the round: positions up to the last accepted draft token that the
        draft itself wrote (its decode wrote d_1 .. d_{k-1})."""
        for s, d, a in zip(rows, drafted, accepted):
            if d:
                st = s.spec
                st.draft_len = min(st.draft_from + min(a, self.spec.k - 1), len(s.tokens) - 1)

    def warmup(self) -> None:
        e = self.engine
        for b in e.batch_buckets:
            for w in e.widths:
                self._device_propose([None] * b, b, w, [16])

    # ---- device --------------------------------------------------------------------------------------------------------
    def _propose(self, rows) -> list[list[int]]:
        e = self.engine
        b = next(x for x in e.batch_buckets if x >= len(rows))
        w = next(x for x in e.widths if x >= max(len(s.pages) for s in rows))
        pend = [len(s.tokens) - s.spec.draft_len for s in rows]
        # a draft far behind (rows that decoded without drafting) catches up first, in prefill-sized pieces
        top = e.t_buckets[-1]
        while max(pend) > top:
            self._catch_up([s if p > top else None for s, p in zip(rows, pend)], b, w, top)
            pend = [len(s.tokens) - s.spec.draft_len for s in rows]
        t = next(x for x in e.t_buckets if x >= max(pend))
        for s in rows:
            s.spec.draft_from = len(s.tokens)  # d_1 will sit at this position
        return self._device_propose(rows, b, w, [t])

    def _arrays(self, rows, b: int, w: int, t: int):
        e = self.engine
        tokens = np.zeros((b, t), np.int32)
        lengths, counts = np.zeros(b, np.int32), np.zeros(b, np.int32)
        pages = np.full((b, w), e.num_pages, np.int32)
        for i, s in enumerate(rows):
            if s is None:
                continue
            pend = s.tokens[s.spec.draft_len:][:t]
            tokens[i, : len(pend)] = pend
            lengths[i], counts[i] = s.spec.draft_len, len(pend)
            pages[i, : len(s.pages)] = s.pages[:w]
        return tokens, lengths, counts, pages

    def _controls(self, b: int, max_new: int) -> Controls:
        e = self.engine
        z = np.zeros(b, np.float32)
        return Controls(Filters(e._place(z, ("cache_batch",)), e._place(z.astype(np.int32), ("cache_batch",)),
                                e._place(z + 1, ("cache_batch",)), e._place(z, ("cache_batch",))),
                        keys=_keys(b), max_new=e._place(np.full(b, max_new, np.int32), ("cache_batch",)),
                        stop=e._place(np.full((b, STOP_WIDTH), -1, np.int32), ("cache_batch", None)))

    def _catch_up(self, rows, b: int, w: int, t: int) -> None:
        e = self.engine
        self._ensure_pool()
        tokens, lengths, counts, pages = self._arrays(rows, b, w, t)
        P = lambda x, names: e._place(x, names)  # noqa: E731
        self.pool, _ = programs.prefill(self.cfg, GREEDY_KINDS, self.params, self.pool, P(tokens, ("cache_batch", None)),
                                        P(lengths, ("cache_batch",)), P(counts, ("cache_batch",)),
                                        P(pages, ("cache_batch", None)), P(np.zeros(b, np.int32), ("cache_batch",)),
                                        self._controls(b, 1))
        for s, c in zip(rows, counts):
            if s is not None:
                s.spec.draft_len += int(c)

    def _device_propose(self, rows, b: int, w: int, ts: list[int]) -> list[list[int]]:
        """Catch up on each row's pending tokens (the last of them is its newest token: its logits give d_1), then
        k - 1 greedy decode steps. Returns each row's k drafts."""
        e = self.engine
        self._ensure_pool()
        k = self.spec.k
        tokens, lengths, counts, pages = self._arrays(rows, b, w, ts[0])
        P = lambda x, names: e._place(x, names)  # noqa: E731
        ctl = self._controls(b, k)
        pages_d = P(pages, ("cache_batch", None))
        self.pool, d1 = programs.prefill(self.cfg, GREEDY_KINDS, self.params, self.pool,
                                         P(tokens, ("cache_batch", None)), P(lengths, ("cache_batch",)),
                                         P(counts, ("cache_batch",)), pages_d, P(np.zeros(b, np.int32),
                                                                                 ("cache_batch",)), ctl)
        out = np.asarray(jax.device_get(d1))[:, None]
        if k > 1:
            done = np.array([s is None for s in rows] + [True] * (b - len(rows)), bool)
            r = programs.Rows(pages_d, P(lengths + counts, ("cache_batch",)), d1,
                              P(np.ones(b, np.int32), ("cache_batch",)), P(done, ("cache_batch",)))
            self.pool, rest, _ = programs.decode(self.cfg, GREEDY_KINDS, self.params, self.pool, r, ctl, steps=k - 1)
            out = np.concatenate([out, np.asarray(jax.device_get(rest))], axis=1)
        return [[int(x) for x in out[i] if x >= 0] for i, s in enumerate(rows) if s is not None]


_KEYS: dict[int, Any] = {}


def _keys(b: int):
    if b not in _KEYS:
        _KEYS[b] = jax.vmap(jax.random.key)(jnp.zeros(b, jnp.uint32))
    return _KEYS[b]


__all__ = ["DraftModelProposer", "check_draft"]
