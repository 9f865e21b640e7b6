"""The engine's device programs, pure and jitted: `prefill` runs a chunk of each row's prompt into its pages and
draws a token from its last position; `decode` runs a static number of steps for a batch of rows. Both run the
model's own forward (`Qwen2.hidden_states`, layers scanned over the one stacked copy of the weights) on the paged
KV cache: a pool of pages per layer, {"k","v": [layers, pages, page_size, kv_heads * head_dim]}, and a page table
per row (qcjax.model.cache_targets / read_pages). Rows are whatever the host puts in the batch: a row owns no
device memory, so idle requests cost nothing and a batch is only as wide as its busy rows.

The host side (which pages a row holds, the prefix cache, scheduling) is qcjax.inference.pages / engine.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qcjax.config import ModelConfig
from qcjax.model import abstract_params, build
from qcjax.sampling import Controls, FilterKinds, Filters, categorical, filter_logits, sample_tokens
from qcjax.sharding import batch_shards, constrain, param_shardings

Pool = dict  # {"k", "v": [layers, pages, page_size, kv_heads * head_dim]}


def place_params(cfg: ModelConfig, params: Any, mesh=None) -> Any:
    """The model's params (stacked layers, as trained and checkpointed) placed on `mesh` by the logical-axis rules;
    as they are without a mesh. The engine runs on this one copy: nothing is unstacked or transposed."""
    if mesh is None:
        return params
    return jax.device_put(params, param_shardings(abstract_params(cfg), mesh))


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
             pages: jax.Array) -> tuple[jax.Array, Pool]:
    """tokens/segs [B, T] at each row's length [B] through the model, keys and values into the rows' pages
    [B, W] -> final-norm hidden states [B, T, E] and the updated pool."""
    cache = {"k": pool["k"], "v": pool["v"], "lengths": constrain(lengths, ("cache_batch",)),
             "pages": constrain(pages, ("cache_batch", None))}
    hidden, cache = build(cfg).apply({"params": params}, tokens, None, segs, cache, method="hidden_states")
    return hidden, {"k": _constrain_pool(cfg, cache["k"]), "v": _constrain_pool(cfg, cache["v"])}


def _head(cfg: ModelConfig, params: Any, hidden: jax.Array) -> jax.Array:
    """The model's own head: hidden [B, T, E] -> float32 logits [B, T, V]."""
    return build(cfg).apply({"params": params}, hidden, method="head")


@functools.partial(jax.jit, static_argnames=("cfg", "kinds"), donate_argnames=("pool",))
def prefill(cfg: ModelConfig, kinds: FilterKinds, params: Any, pool: Pool, tokens: jax.Array, lengths: jax.Array,
            counts: jax.Array, pages: jax.Array, num: jax.Array, controls: Controls) -> tuple[Pool, jax.Array]:
    """Run counts[b] new tokens of row b (tokens [P, T], right-padded) after the lengths[b] tokens its pages
    [P, W] already hold, and draw one token per row from its last new position (the row's num[b]-th generated
    token). A table exactly T tokens wide with lengths 0 is a fresh prompt: the model attends to the new keys
    directly (self-attention, the prompt kernels); otherwise the rows' pages are gathered (a prefix-cache hit or
    a later chunk of a long prompt). Returns the pool and the drawn tokens [P] (the host keeps only those of rows
    whose prompt ended in this chunk)."""
    t = tokens.shape[1]
    segs = (jnp.arange(t, dtype=jnp.int32)[None, :] < counts[:, None]).astype(jnp.int32)
    hidden, pool = _forward(cfg, params, pool, tokens, segs, lengths, pages)
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
def decode(cfg: ModelConfig, kinds: FilterKinds, params: Any, pool: Pool, rows: Rows, controls: Controls, *,
           steps: int) -> tuple[Pool, jax.Array, Rows]:
    """`steps` tokens for every running row: a loop with a static trip count (no step waits on the host). A row
    finishes on a stop token or at controls.max_new; finished rows feed padding (nothing is written). Returns the
    pool, the drawn tokens [B, steps] (-1 where a row was done) and the rows after the chunk."""

    def step(i, carry):
        pool, r, out = carry
        running = ~r.done
        hidden, pool = _forward(cfg, params, pool, r.last[:, None], running.astype(jnp.int32)[:, None], r.lengths,
                                r.pages)
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
           counts: jax.Array, pages: jax.Array, num: jax.Array, controls: Controls) -> tuple[Pool, jax.Array]:
    """One target forward over each row's newest token and its drafted continuation (speculative decoding).

    tokens [B, T]: row b's newest token (not yet in its cache, at position lengths[b]) then counts[b] - 1 drafted
    tokens, right-padded. The row keeps the longest run of drafts the model accepts, then one more token of its own
    (the correction at the first rejection, or a bonus token after a full run), so a call emits 1 to counts[b]
    tokens per row. Drafts are deterministic proposals (prompt lookup, or a draft model's greedy tokens), so the rule
    that keeps the model's distribution exact is: greedy rows accept a draft equal to the argmax; sampling rows
    accept draft d with probability p(d) under the row's filtered distribution and, at a rejection, draw from p with
    d removed (renormalised), the residual of rejection sampling for a one-point proposal. Randomness: the draws for
    the row's i-th generated token use fold_in(key, i) (the token) and fold_in(fold_in(key, i), 1) (the accept
    test), whatever the batch or draft length. Keys and values of every position are written; the host keeps the
    row's length at what was accepted (later writes replace the rest). Returns the pool and the emitted tokens
    [B, T] (-1 after each row's last)."""
    b, t = tokens.shape
    pos = jnp.arange(t, dtype=jnp.int32)
    segs = (pos[None, :] < counts[:, None]).astype(jnp.int32)
    hidden, pool = _forward(cfg, params, pool, tokens, segs, lengths, pages)
    logits = _head(cfg, params, hidden)  # [B, T, V] float32
    v = logits.shape[-1]
    drafts = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)  # draft judged at position j
    ndraft = counts - 1  # [B]
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, T] greedy choices
    accept = drafts == target
    if kinds.sample:
        f = controls.filters
        rep = Filters(*(jnp.repeat(x, t) for x in f))
        x = filter_logits(logits.reshape(b * t, v), rep, kinds).reshape(b, t, v)
        logp = jax.nn.log_softmax(x, axis=-1)
        p_draft = jnp.exp(jnp.take_along_axis(logp, drafts[..., None], axis=-1)[..., 0])  # [B, T]
        idx = num[:, None] + pos[None, :]  # the generated-token index each position draws
        keys = jax.vmap(lambda k, i: jax.vmap(lambda j: jax.random.fold_in(k, j))(i))(controls.keys, idx)  # [B, T]
        u_accept = jax.vmap(jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1))))(keys)
        sampled = f.temperature[:, None] > 0
        accept = jnp.where(sampled, u_accept < p_draft, accept)
    accept = accept & (pos[None, :] < ndraft[:, None])
    n = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # [B] drafts accepted
    last = jnp.take_along_axis(target, n[:, None], axis=1)[:, 0]  # greedy: the model's token at position n
    if kinds.sample:
        xn = jnp.take_along_axis(x, n[:, None, None], axis=1)[:, 0]  # [B, V]
        rejected = n < ndraft
        dn = jnp.take_along_axis(drafts, n[:, None], axis=1)[:, 0]
        residual = jnp.where(rejected[:, None] & (jnp.arange(v)[None, :] == dn[:, None]), -jnp.inf, xn)
        # p(d) = 1 in exact arithmetic never rejects; if rounding did, the residual is empty: keep p as it is
        xn = jnp.where(jnp.any(residual > -jnp.inf, axis=-1, keepdims=True), residual, xn)
        kn = jnp.take_along_axis(keys, n[:, None], axis=1)[:, 0]
        u = jax.vmap(jax.random.uniform)(kn)
        last = jnp.where(f.temperature > 0, categorical(xn, u), last)
    out = jnp.where(pos[None, :] < n[:, None], drafts, jnp.where(pos[None, :] == n[:, None], last[:, None], -1))
    return pool, out.astype(jnp.int32)
