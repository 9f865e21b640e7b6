"""The decode engine, pure and jitted: `prefill` (one shot, or `prefill_chunked` for long prompts) fills a fresh KV
cache and draws each row's first token; `decode` runs a static number of steps (no data-dependent loop, so no step
waits on the host). Both run the model's own forward (`Qwen2.hidden_states`, layers scanned over the one stacked
copy of the weights, as in training) and carry a `DecodeState`. `idle_state` / `insert_rows` keep one state alive
across requests for a server (continuous batching).

The host side that drives it (validating requests, bucketing shapes, chunked decode with stop checks and streaming)
is qcjax.sampler.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qcjax.config import ModelConfig
from qcjax.model import abstract_params, build, constrain_cache, init_cache
from qcjax.sampling import Controls, FilterKinds, sample_tokens
from qcjax.sharding import param_shardings


class DecodeState(NamedTuple):
    """Everything the decode loop carries (donated from step to step)."""

    cache: dict  # the model's cache: {"k","v": [layers, B, cache_len, KV, D], "lengths": [B]}
    last: jax.Array  # [B] int32: the newest token, the next step's input
    out: jax.Array  # [B, N] int32 generated tokens (the stop token included), -1 beyond num
    num: jax.Array  # [B] int32 tokens generated so far
    done: jax.Array  # [B] bool
    steps: jax.Array  # [] int32 decode steps run so far (chunk bookkeeping)


# ---- the model, as the sampler runs it (pure) -----------------------------------------------------------------------
def place_params(cfg: ModelConfig, params: Any, mesh=None) -> Any:
    """The model's params (stacked layers, as trained and checkpointed) placed on `mesh` by the logical-axis rules;
    as they are without a mesh. The sampler runs on this one copy: nothing is unstacked or transposed."""
    if mesh is None:
        return params
    return jax.device_put(params, param_shardings(abstract_params(cfg), mesh))


def _hidden(cfg: ModelConfig, params: Any, tokens: jax.Array, segment_ids: jax.Array, cache: dict
            ) -> tuple[jax.Array, dict]:
    """The model's own forward with a cache (`Qwen2.hidden_states`: layers scanned over the stacked params, each
    row continuing at its cache length; padding, segment 0, is written past the length and never counted).
    tokens/segment_ids [B, T] -> final-norm hidden states [B, T, E] and the updated cache."""
    return build(cfg).apply({"params": params}, tokens, None, segment_ids, cache, method="hidden_states")


def _head(cfg: ModelConfig, params: dict, hidden: jax.Array) -> jax.Array:
    """The model's own head: hidden [B, T, E] -> float32 logits [B, T, V]."""
    return build(cfg).apply({"params": params}, hidden, method="head")


def _empty_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any) -> dict:
    cache = init_cache(cfg, batch, length, dtype)  # {"k","v": [layers, batch, length, kv_heads * head_dim]}
    return {k: constrain_cache(cfg, k, v) for k, v in cache.items()}


def _at(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """hidden [B, T, E] at one position per row index [B] -> [B, 1, E]."""
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)


# ---- prefill and decode (pure, jitted) -----------------------------------------------------------------------------
def _record(s: DecodeState, tok: jax.Array, c: Controls) -> DecodeState:
    """Append tok [B] to the rows still running; finish rows that drew a stop token or reached their length."""
    active = ~s.done
    b, n = s.out.shape
    out = s.out.at[jnp.arange(b), jnp.where(active, s.num, n)].set(tok, mode="drop")
    num = s.num + active.astype(jnp.int32)
    stopped = jnp.any(tok[:, None] == c.stop, axis=-1)
    done = s.done | (active & stopped) | (num >= c.max_new)
    return s._replace(last=jnp.where(active, tok, s.last), out=out, num=num, done=done)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return x if x.shape[0] == rows else jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


@functools.partial(jax.jit, static_argnames=("cfg", "kinds", "batch", "cache_len", "cache_dtype", "out_len"))
def prefill(cfg: ModelConfig, kinds: FilterKinds, params: Any, tokens: jax.Array, lengths: jax.Array,
            controls: Controls, *, batch: int, cache_len: int, cache_dtype: Any, out_len: int) -> DecodeState:
    """Run the right-padded prompts tokens [P, T] (row b's real tokens: its first lengths[b]) and draw every row's
    first token from its last prompt position. Returns the decode state for `batch` >= P rows (rows P.. are batch
    padding, done from the start) with a cache of `cache_len` slots.

    The prompts attend within a T-slot cache (self-attention: q_len == kv_len, the form the training kernels take),
    which is then widened to cache_len. Only the P prompt rows run through the model; the head runs on one
    position of each of the `batch` rows."""
    p, t = tokens.shape
    segs = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)
    hidden, cache = _hidden(cfg, params, tokens, segs, _empty_cache(cfg, p, t, cache_dtype))
    last = _at(hidden, jnp.maximum(lengths - 1, 0))  # [P, 1, E]
    logits = _head(cfg, params, _pad_rows(last, batch))[:, 0]  # [batch, V]

    def widen(name):  # [L, P, T, KV * D] -> [L, batch, cache_len, KV * D]
        return constrain_cache(cfg, name, jnp.pad(cache[name], ((0, 0), (0, batch - p), (0, cache_len - t), (0, 0))))

    cache = {"k": widen("k"), "v": widen("v"), "lengths": constrain_cache(cfg, "lengths", _pad_rows(cache["lengths"],
                                                                                                      batch))}
    return _first_token(kinds, cache, logits, controls, out_len)


def _first_token(kinds: FilterKinds, cache: dict, logits: jax.Array, controls: Controls, out_len: int
                 ) -> DecodeState:
    """The decode state after a prefill: the filled cache and each row's first token drawn from logits [batch, V]."""
    batch = logits.shape[0]
    state = DecodeState(
        cache=cache,
        last=jnp.zeros((batch,), jnp.int32),
        out=jnp.full((batch, out_len), -1, jnp.int32),
        num=jnp.zeros((batch,), jnp.int32),
        done=controls.max_new <= 0,
        steps=jnp.zeros((), jnp.int32),
    )
    return _record(state, sample_tokens(logits, controls, state.num, kinds), controls)


@functools.partial(jax.jit, static_argnames=("cfg", "kinds", "batch", "cache_len", "cache_dtype", "out_len", "chunk"))
def prefill_chunked(cfg: ModelConfig, kinds: FilterKinds, params: Any, tokens: jax.Array, lengths: jax.Array,
                    controls: Controls, *, batch: int, cache_len: int, cache_dtype: Any, out_len: int, chunk: int
                    ) -> DecodeState:
    """`prefill` for long prompts: the right-padded prompts tokens [P, T] run `chunk` positions at a time (T a
    multiple of chunk) into the full `cache_len` cache, each chunk attending to the cache written so far, so the
    activations are one chunk's whatever the prompt's length. The chunks run in a loop with a static trip count
    inside this one program. Same result as `prefill` (tests/test_sampler.py: cache and first logits, ragged rows).

    A row whose prompt ended in an earlier chunk feeds padding (segment 0: its length stays); the padding's keys
    land past its length, at most one chunk beyond the longest prompt, inside the T <= cache_len slots."""
    p, t = tokens.shape
    if t % chunk or cache_len < t:
        raise ValueError(f"prefill_chunked: prompt bucket {t} must be a multiple of chunk {chunk} and fit the cache "
                         f"({cache_len} slots)")
    tokens, lengths = _pad_rows(tokens, batch), _pad_rows(lengths, batch)  # batch-padding rows: length 0
    cache = _empty_cache(cfg, batch, cache_len, cache_dtype)
    last_index = jnp.maximum(lengths - 1, 0)  # [batch] each row's last prompt position

    def body(i, carry):
        cache, last = carry
        start = i * chunk
        toks = jax.lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1)  # [batch, chunk]
        segs = ((start + jnp.arange(chunk, dtype=jnp.int32))[None, :] < lengths[:, None]).astype(jnp.int32)
        hidden, cache = _hidden(cfg, params, toks, segs, cache)
        here = _at(hidden, jnp.clip(last_index - start, 0, chunk - 1))  # [batch, 1, E]
        mine = (last_index >= start) & (last_index < start + chunk)
        return cache, jnp.where(mine[:, None, None], here, last)

    last = jnp.zeros((batch, 1, cfg.hidden_size), cfg.dtype)
    cache, last = jax.lax.fori_loop(0, t // chunk, body, (cache, last))
    logits = _head(cfg, params, last)[:, 0]
    return _first_token(kinds, cache, logits, controls, out_len)


def decode_step(cfg: ModelConfig, kinds: FilterKinds, params: Any, s: DecodeState, c: Controls) -> DecodeState:
    """One token for every row: feed `last`, draw the next. Finished rows feed padding (their cache stays put)."""
    running = (~s.done).astype(jnp.int32)[:, None]  # [B, 1] segment ids: 0 = padding
    hidden, cache = _hidden(cfg, params, s.last[:, None], running, s.cache)
    s = s._replace(cache=cache, steps=s.steps + 1)
    return _record(s, sample_tokens(_head(cfg, params, hidden)[:, 0], c, s.num, kinds), c)


@functools.partial(jax.jit, static_argnames=("cfg", "kinds", "steps"), donate_argnames=("state",))
def decode(cfg: ModelConfig, kinds: FilterKinds, params: Any, state: DecodeState, controls: Controls, *,
           steps: int) -> DecodeState:
    """`steps` decode steps: a loop with a static trip count, so no step waits on the host (a data-dependent loop
    condition is copied to the host every iteration on GPU). Rows that finish ride along as padding; the host
    checks for the end between calls (`generate`)."""
    return jax.lax.fori_loop(0, steps, lambda _, s: decode_step(cfg, kinds, params, s, controls), state)


def serving_mesh_shape(cfg: ModelConfig, n_devices: int, batch: int = 1) -> dict[str, int]:
    """The mesh sampling takes by default on `n_devices`: tensor parallel over the largest divisor of the device
    count that divides the KV heads (each device holds whole KV heads of the cache and 1/t of every weight, so a
    decode step reads each weight once over the slice), then data parallel over the batch rows (the largest divisor
    of what is left that is <= batch), and fsdp over the rest (weights sharded further, gathered per layer)."""
    n = int(n_devices)
    t = max(d for d in range(1, n + 1) if n % d == 0 and cfg.num_kv_heads % d == 0)
    rest = n // t
    d = max(x for x in range(1, rest + 1) if rest % x == 0 and x <= max(1, int(batch)))
    return {"data": d, "fsdp": rest // d, "tensor": t}


# ---- continuous batching (used by qcjax.serve; added for the server, issue 26) ---------------------------------------
# A server keeps one decode state of fixed shape (slots x cache length) alive across requests: `idle_state` makes it
# with every slot free (done), `insert_rows` puts a fresh prefill's rows into free slots between decode chunks. Both
# are pure and compile once per shape, so any mix of requests runs on the programs compiled at warm-up.
@functools.partial(jax.jit, static_argnames=("cfg", "slots", "cache_len", "cache_dtype", "out_len"))
def idle_state(cfg: ModelConfig, *, slots: int, cache_len: int, cache_dtype: Any, out_len: int) -> DecodeState:
    """A decode state with `slots` rows, all free (done: `decode` runs them as padding), an empty cache of
    `cache_len` slots and an `out_len` output buffer."""
    return DecodeState(
        cache=_empty_cache(cfg, slots, cache_len, cache_dtype),
        last=jnp.zeros((slots,), jnp.int32),
        out=jnp.full((slots, out_len), -1, jnp.int32),
        num=jnp.zeros((slots,), jnp.int32),
        done=jnp.ones((slots,), bool),
        steps=jnp.zeros((), jnp.int32),
    )


@functools.partial(jax.jit, donate_argnames=("state",))
def insert_rows(state: DecodeState, new: DecodeState, slots: jax.Array) -> DecodeState:
    """Write the rows of `new` (a prefill's state: P rows, a cache of T <= the state's cache length, the same output
    length) into rows `slots` [P] of `state`; a slot index >= the state's rows drops that row (batch padding). The
    other rows are untouched: a request joins running decodes. The slot's cache beyond T keeps its previous
    occupant's keys, which the attention mask hides (only positions < the row's length are read)."""
    t = new.cache["k"].shape[2]
    # the updated arrays keep the state's shardings (XLA propagates them from the donated operands)
    cache = {name: state.cache[name].at[:, slots, :t].set(new.cache[name], mode="drop") for name in ("k", "v")}
    cache["lengths"] = state.cache["lengths"].at[slots].set(new.cache["lengths"], mode="drop")
    rows = lambda a, b: a.at[slots].set(b, mode="drop")  # noqa: E731
    return state._replace(cache=cache, last=rows(state.last, new.last), out=rows(state.out, new.out),
                          num=rows(state.num, new.num), done=rows(state.done, new.done))
