"""The engine's device programs, pure and jitted: `prefill` runs a chunk of each row's prompt into its pages and
draws a token from its last position; `decode` runs a static number of steps for a batch of rows; `verify` checks
drafted tokens with one forward and `speculate` runs rounds of prompt lookup and verification (speculative
decoding). All run the model's own forward (`Qwen2.hidden_states`, layers scanned over the one stacked copy of the
weights) on the paged KV cache: a pool of pages per layer, {"k","v": [layers, pages, page_size, kv_heads *
head_dim]}, and a page table per row (qcjax.model.cache_targets / read_pages). Rows are whatever the host puts in
the batch: a row owns no device memory, so idle requests cost nothing and a batch is only as wide as its busy rows.

The host side (which pages a row holds, the prefix cache, scheduling) is qcjax.inference.pages / engine.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qcjax import adapters, platform, row_lora
from qcjax.config import ModelConfig
from qcjax.inference.speculative import MAX_BACKOFF, ngram_draft
from qcjax.sampling import Controls, FilterKinds, sample_tokens
from qcjax.sharding import batch_shards, constrain, param_shardings

Pool = dict  # {"k", "v": [layers, pages, page_size, kv_heads * head_dim]}
Lora = Any  # None, or (the adapter bank, slot per row [B] int32; -1: none): qcjax.row_lora


def place_params(cfg: ModelConfig, params: Any, mesh=None) -> Any:
    """The model's params (stacked layers, as trained and checkpointed) placed on `mesh` by the logical-axis rules;
    as they are without a mesh. The engine runs on this one copy: nothing is unstacked or transposed."""
    if mesh is None:
        return params
    return jax.device_put(params, param_shardings(adapters.abstract_params(cfg, adapters.carried(params)), mesh))


def _constrain_pool(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """A pool array split over the mesh in whole KV heads on its merged minor dim (else whole), pages replicated."""
    heads = "act_kv_heads" if batch_shards(cfg.num_kv_heads, "act_kv_heads") == batch_shards(
        x.shape[-1], "act_kv_heads") else None
    return constrain(x, ("layers", None, None, heads))


@functools.partial(jax.jit, static_argnames=("cfg", "num_pages", "page_size", "dtype"))
def init_pool(cfg: ModelConfig, *, num_pages: int, page_size: int, dtype: Any) -> Pool:
    """An empty page pool: `num_pages` pages of `page_size` tokens for every layer's keys and values."""
    shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads * cfg.dim_per_head)
    return {name: _constrain_pool(cfg, jnp.zeros(shape, dtype)) for name in ("k", "v")}


def _forward(cfg: ModelConfig, params: Any, pool: Pool, tokens: jax.Array, segs: jax.Array, lengths: jax.Array,
             pages: jax.Array, lora: Lora = None) -> tuple[jax.Array, Pool]:
    """tokens/segs [B, T] at each row's length [B] through the model, keys and values into the rows' pages
    [B, W] -> final-norm hidden states [B, T, E] and the updated pool. lora: (bank, slot per row [B]) to run each
    row through its own adapter (qcjax.row_lora), or None."""
    cache = {"k": pool["k"], "v": pool["v"], "lengths": constrain(lengths, ("cache_batch",)),
             "pages": constrain(pages, ("cache_batch", None))}
    with row_lora.applied(*(lora or (None, None))):
        hidden, cache = adapters.module_for(cfg, params).apply({"params": params}, tokens, None, segs, cache,
                                                               method="hidden_states")
    return hidden, {"k": _constrain_pool(cfg, cache["k"]), "v": _constrain_pool(cfg, cache["v"])}


def _head(cfg: ModelConfig, params: Any, hidden: jax.Array) -> jax.Array:
    """The model's own head: hidden [B, T, E] -> float32 logits [B, T, V]."""
    return adapters.module_for(cfg, params).apply({"params": params}, hidden, method="head")


@functools.partial(jax.jit, static_argnames=("cfg", "kinds"), donate_argnames=("pool",))
def prefill(cfg: ModelConfig, kinds: FilterKinds, params: Any, pool: Pool, tokens: jax.Array, lengths: jax.Array,
            counts: jax.Array, pages: jax.Array, num: jax.Array, controls: Controls, lora: Lora = None
            ) -> tuple[Pool, jax.Array]:
    """Run counts[b] new tokens of row b (tokens [P, T], right-padded) after the lengths[b] tokens its pages
    [P, W] already hold, and draw one token per row from its last new position (the row's num[b]-th generated
    token). A table exactly T tokens wide with lengths 0 is a fresh prompt: the model attends to the new keys
    directly (self-attention, the prompt kernels); otherwise the rows' pages are gathered (a prefix-cache hit or
    a later chunk of a long prompt). Returns the pool and the drawn tokens [P] (the host keeps only those of rows
    whose prompt ended in this chunk)."""
    t = tokens.shape[1]
    segs = (jnp.arange(t, dtype=jnp.int32)[None, :] < counts[:, None]).astype(jnp.int32)
    hidden, pool = _forward(cfg, params, pool, tokens, segs, lengths, pages, lora)
    last = jnp.take_along_axis(hidden, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)  # [P, 1, E]
    return pool, sample_tokens(_head(cfg, params, last)[:, 0], controls, num, kinds)


class Rows(NamedTuple):
    """A decode batch as the device sees it (built by the host for each chunk; row b's newest token, not yet in
    its cache, is `last[b]` at position lengths[b])."""

    pages: jax.Array  # [B, W] int32 page table
    lengths: jax.Array  # [B] int32 tokens in the cache
    last: jax.Array  # [B] int32 the next input
    num: jax.Array  # [B] int32 tokens generated so far (indexes each row's random draws)
    done: jax.Array  # [B] bool: padding rows and rows that finished


@functools.partial(jax.jit, static_argnames=("cfg", "kinds", "steps"), donate_argnames=("pool",))
def decode(cfg: ModelConfig, kinds: FilterKinds, params: Any, pool: Pool, rows: Rows, controls: Controls,
           lora: Lora = None, *, steps: int) -> tuple[Pool, jax.Array, Rows]:
    """`steps` tokens for every running row: a loop with a static trip count (no step waits on the host). A row
    finishes on a stop token or at controls.max_new; finished rows feed padding (nothing is written). Returns the
    pool, the drawn tokens [B, steps] (-1 where a row was done) and the rows after the chunk."""

    def step(i, carry):
        pool, r, out = carry
        running = ~r.done
        hidden, pool = _forward(cfg, params, pool, r.last[:, None], running.astype(jnp.int32)[:, None], r.lengths,
                                r.pages, lora)
        tok = sample_tokens(_head(cfg, params, hidden)[:, 0], controls, r.num, kinds)
        tok = jnp.where(running, tok, -1)
        num = r.num + running.astype(jnp.int32)
        stopped = jnp.any(tok[:, None] == controls.stop, axis=-1)
        done = r.done | (running & (stopped | (num >= controls.max_new)))
        r = Rows(r.pages, r.lengths + running.astype(jnp.int32), jnp.where(running, tok, r.last), num, done)
        return pool, r, out.at[:, i].set(tok)

    out = jnp.full((rows.last.shape[0], steps), -1, jnp.int32)
    pool, rows, out = jax.lax.fori_loop(0, steps, step, (pool, rows, out))
    return pool, out, rows


@functools.partial(jax.jit, static_argnames=("cfg", "kinds"), donate_argnames=("pool",))
def verify(cfg: ModelConfig, kinds: FilterKinds, params: Any, pool: Pool, tokens: jax.Array, lengths: jax.Array,
           counts: jax.Array, pages: jax.Array, num: jax.Array, controls: Controls, lora: Lora = None
           ) -> tuple[Pool, jax.Array]:
    """One target forward over each row's newest token and its drafted continuation (speculative decoding).

    tokens [B, T]: row b's newest token (not yet in its cache, at position lengths[b]) then counts[b] - 1 drafted
    tokens, right-padded. At every position the row draws the token plain decoding would draw there (the same
    filters, the same uniform: fold_in(key, i) for the row's i-th generated token); the row keeps the drafts while
    each equals that draw, then emits the first draw that differs (or the draw after a full run). Drafts are
    deterministic proposals (prompt lookup, a draft model's greedy tokens), so a draft d is accepted with
    probability p(d), the most any exact rule accepts a one-point proposal, and the emitted text is token for token
    the text plain decoding draws with the same seed: greedy or sampled, speculation changes only how many target
    forwards it takes. Keys and values of every position are written; the host keeps the row's length at what was
    accepted (later writes replace the rest). Returns the pool and the emitted tokens [B, T] (-1 after each row's
    last)."""
    pool, out, _ = _judge(cfg, kinds, params, pool, tokens, lengths, counts, pages, num, controls, lora)
    return pool, out


def _judge(cfg, kinds, params, pool, tokens, lengths, counts, pages, num, controls, lora):
    """`verify`'s forward and acceptance -> (pool, emitted tokens [B, T] (-1 after each row's last), drafts
    accepted [B])."""
    b, t = tokens.shape
    pos = jnp.arange(t, dtype=jnp.int32)
    segs = (pos[None, :] < counts[:, None]).astype(jnp.int32)
    hidden, pool = _forward(cfg, params, pool, tokens, segs, lengths, pages, lora)
    logits = _head(cfg, params, hidden)  # [B, T, V] float32
    # position j draws the row's (num + j)-th token, as decode's step would
    rep = jax.tree.map(lambda x: jnp.repeat(x, t, axis=0), controls)
    drawn = sample_tokens(logits.reshape(b * t, -1), rep, (num[:, None] + pos[None, :]).reshape(-1),
                          kinds).reshape(b, t)
    drafts = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)  # draft judged at position j
    accept = (drafts == drawn) & (pos[None, :] < (counts - 1)[:, None])
    n = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # [B] drafts accepted
    out = jnp.where(pos[None, :] <= n[:, None], drawn, -1)  # accepted drafts equal the draws; then the draw at n
    return pool, out.astype(jnp.int32), n


class SpecRows(NamedTuple):
    """A batch of rows for `speculate`: Rows' fields (without `last`: the newest token is hist[b, lengths[b]]), the
    rows' tokens and their drafting state (qcjax.inference.speculative.RowState's k, backoff, misses)."""

    pages: jax.Array  # [B, W] int32 page table
    lengths: jax.Array  # [B] int32 tokens in the cache
    hist: jax.Array  # [B, W * page_size] int32: the row's tokens at their positions, -1 past the newest
    num: jax.Array  # [B] int32 tokens generated so far
    done: jax.Array  # [B] bool
    k: jax.Array  # [B] int32 draft tokens the row may propose now (adaptive)
    backoff: jax.Array  # [B] int32 rounds left without drafting
    misses: jax.Array  # [B] int32 verified drafts in a row that accepted nothing


class SpecStats(NamedTuple):
    """Per row, over one `speculate` call."""

    drafted: jax.Array  # [B] draft tokens verified
    accepted: jax.Array  # [B] of those, accepted
    forwards: jax.Array  # [B] target forwards the row took part in
    verifies: jax.Array  # [B] of those, wider than one token (drafts verified)


@functools.partial(jax.jit, static_argnames=("cfg", "kinds", "rounds", "k", "ngram", "widths", "adaptive"),
                   donate_argnames=("pool",))
def speculate(cfg: ModelConfig, kinds: FilterKinds, params: Any, pool: Pool, rows: SpecRows, controls: Controls,
              lora: Lora = None, *, rounds: int, k: int, ngram: tuple[int, int], widths: tuple[int, ...],
              adaptive: bool = True) -> tuple[Pool, SpecRows, SpecStats]:
    """Speculative decoding with prompt lookup, `rounds` rounds in one call (no round waits on the host). Each round,
    every running row drafts by prompt lookup over its own tokens (speculative.ngram_draft, the host proposer's
    rule) and one target forward of a width from `widths` verifies the drafts as `verify` does (width 1: a plain
    decode step). Drafts are deterministic, so the text is plain decoding's, token for token.

    Each round runs the narrowest of `widths` (those the platform picks from: qcjax.platform.round_widths) that
    holds every row's draft; the rows' adaptive draft lengths and backoffs keep rounds narrow where drafts fail,
    and the host decides between this program and a plain decode chunk (Engine._speculation_pays). The chosen
    forward runs inside a while loop of at most one trip per width, not a lax.switch: XLA:CPU copied the whole page
    pool into and out of a switch's branches every round.

    A row's emitted tokens go into `hist` after its newest; the loop ends early when every row is done. `adaptive`,
    per row as speculative.update: k grows after a fully accepted draft and shrinks after a rejection, and a row
    whose drafts keep failing backs off."""
    min_n, max_n = ngram
    b, h = rows.hist.shape
    widths = platform.round_widths(widths)  # the CPU: all; TPUs and GPUs: the widest (a forward costs its reads)
    top = widths[-1]
    cols = jnp.arange(top, dtype=jnp.int32)[None, :]
    row_ids = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, top))
    widths_arr = jnp.asarray(widths, jnp.int32)

    def judge_at(j, w, sel, newest, draft, counts, r):
        """The forward of width w when the round's choice `sel` is j, else nothing: a while loop of 0 or 1 trips."""
        def run(c):
            pool, _, _, _ = c
            tokens = jnp.concatenate([newest, draft[:, : w - 1]], axis=1)
            pool, out, n = _judge(cfg, kinds, params, pool, tokens, r.lengths, counts, r.pages, r.num, controls,
                                  lora)
            return pool, jnp.pad(out, ((0, 0), (0, top - w)), constant_values=-1), n, jnp.bool_(True)

        return run, lambda c: (sel == j) & ~c[3]

    def cond(carry):
        i, _, r, _ = carry
        return (i < rounds) & jnp.any(~r.done)

    def body(carry):
        i, pool, r, st = carry
        running = ~r.done
        room = controls.max_new - r.num - 1  # a round adds its drafts + 1 tokens
        asked = running & (r.backoff == 0) & (room > 0)
        draft, dl = ngram_draft(r.hist, r.lengths, jnp.where(asked, jnp.minimum(r.k, room), 0), k=k, min_n=min_n,
                                max_n=max_n)
        draft = jnp.pad(draft, ((0, 0), (0, max(0, top - 1 - k))))  # [B, >= top - 1]: every width's slice
        need = 1 + jnp.max(jnp.where(running, dl, 0))
        sel = jnp.argmax(widths_arr >= need)
        w = widths_arr[sel]
        verified = jnp.where(running, jnp.minimum(dl, w - 1), 0)
        newest = jnp.take_along_axis(r.hist, r.lengths[:, None], axis=1)
        counts = jnp.where(running, 1 + verified, 0)
        c = (pool, jnp.full((b, top), -1, jnp.int32), jnp.zeros((b,), jnp.int32), jnp.bool_(False))
        for j, wj in enumerate(widths):
            run, when = judge_at(j, wj, sel, newest, draft, counts, r)
            c = jax.lax.while_loop(when, run, c)
        pool, out, n, _ = c
        n = jnp.where(running, n, 0)
        emitted = jnp.where(running, n + 1, 0)
        stop_at = jnp.any(out[:, :, None] == controls.stop[:, None, :], axis=-1) & (out >= 0)  # [B, top]
        first_stop = jnp.argmax(stop_at, axis=1)
        stopped = jnp.any(stop_at, axis=1) & (first_stop < emitted)
        emitted = jnp.where(stopped, first_stop + 1, emitted)
        at = jnp.where(cols < emitted[:, None], r.lengths[:, None] + 1 + cols, h)  # past the row: dropped
        hist = r.hist.at[row_ids, at].set(out, mode="drop")
        num = r.num + emitted
        done = r.done | (running & (stopped | (num >= controls.max_new)))
        judged = (verified > 0) & adaptive  # not adaptive: k, misses and backoff stay as they are
        kk = jnp.where(judged, jnp.where(n == verified, jnp.minimum(k, 2 * r.k), jnp.maximum(1, n + 1)), r.k)
        misses = jnp.where(judged, jnp.where(n == 0, r.misses + 1, 0), r.misses)
        backoff = jnp.where(judged & (n == 0), jnp.minimum(MAX_BACKOFF, 1 << jnp.maximum(misses - 1, 0)),
                            jnp.maximum(r.backoff - (running & ~asked).astype(jnp.int32), 0))
        r = SpecRows(r.pages, r.lengths + emitted, hist, num, done, kk, backoff, misses)
        st = SpecStats(st.drafted + verified, st.accepted + n, st.forwards + running.astype(jnp.int32),
                       st.verifies + (running & (w > 1)).astype(jnp.int32))
        return i + 1, pool, r, st

    zeros = jnp.zeros((b,), jnp.int32)
    _, pool, rows, stats = jax.lax.while_loop(cond, body, (0, pool, rows, SpecStats(zeros, zeros, zeros, zeros)))
    return pool, rows, stats
