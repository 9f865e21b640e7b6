"""Sampling from Qwen2, the host side: validate a batch of requests, bucket its shapes, run the decode engine in
fixed-length chunks of steps, check stops and stream between chunks.

    done = generate(cfg, params, [[151644, 872], [1, 2, 3]], max_new_tokens=64,
                    sampling=SamplingParams(temperature=0.7, top_p=0.95), stop_tokens=FIM_STOP_IDS)
    done[0].tokens, done[0].finish_reason

Along its seams: the sampling filters are qcjax.sampling (pure), the decode engine qcjax.decoding (pure, jitted:
`prefill`, `decode`, the `DecodeState`), text streaming qcjax.text_stream; this module plans requests (`plan`,
`controls_for`, `start`, `completions`) and drives the engine (`generate`). Their public names are re-exported here,
so `from qcjax import sampler as S` reaches all of it.

Shapes are bucketed so a session compiles a handful of programs: the prompt length (prefill) and the batch to powers
of two, the cache length and output buffer to powers of two. Each row of a batch has its own prompt length, sampling
filters, stop set, seed and length limit. Rows that finish early keep riding along (their new tokens are marked as
padding, so their cache stops growing) until every row is done or the chunk ends; the host checks between chunks and
hands new tokens to a callback (streaming) which may finish rows early (stop strings are host-side: they need text).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from qcjax import platform
from qcjax.config import ModelConfig
from qcjax.decoding import (DecodeState, decode, decode_step, idle_state, insert_rows, place_params, prefill,
                            prefill_chunked, serving_mesh_shape)
from qcjax.sampling import (GREEDY, Controls, FilterKinds, Filters, SamplingParams, _pow2, categorical,
                            filter_logits, sample_tokens)
from qcjax.sharding import logical_to_spec
from qcjax.text_stream import TextStream

MIN_PREFILL_BUCKET = 16
# Prompts longer than this prefill in chunks of it (`prefill_chunked`): a 32K-128K prompt needs one chunk's
# activations, not the whole prompt's.
DEFAULT_PREFILL_CHUNK = 4096


@dataclasses.dataclass
class Completion:
    """One prompt's result. tokens excludes the stop token; finish_reason is "stop" (a stop token, or a stop the
    caller signalled, e.g. a stop string) or "length"."""

    tokens: list[int]
    finish_reason: str
    stop_token: int | None = None


# ---- host side: bucketing, arrays, streaming -----------------------------------------------------------------------
def prefill_bucket(n: int) -> int:
    """The padded prompt length prefill compiles for (one program per power of two)."""
    return max(MIN_PREFILL_BUCKET, _pow2(n))


def _per_row(value, n: int, name: str) -> list:
    """One value for every row, or a list with one per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: got {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


def _stop_rows(stop_tokens, n: int) -> list[tuple[int, ...]]:
    """A set of ids shared by all rows, or one set per row (a list of collections)."""
    stop_tokens = list(stop_tokens)
    if stop_tokens and not isinstance(stop_tokens[0], (int, np.integer)):
        return [tuple(int(t) for t in s) for s in _per_row(stop_tokens, n, "stop_tokens")]
    return [tuple(int(t) for t in stop_tokens)] * n


@dataclasses.dataclass
class Plan:
    """One batch on the host: the validated requests, bucketed shapes and the arrays prefill needs."""

    n: int  # real prompts (rows n.. are batch padding)
    batch: int  # decode rows B (a power of two >= n and >= min_batch)
    tokens: np.ndarray  # [P, T] int32, right-padded prompts; P = the power of two >= n (P <= B)
    lengths: np.ndarray  # [P] int32
    cache_len: int
    out_len: int
    kinds: FilterKinds
    sampling: list[SamplingParams]  # [B]
    max_new: np.ndarray  # [B] int32; 0 for padding rows
    stop: np.ndarray  # [B, S] int32, -1 = unused
    seeds: np.ndarray  # [B] uint32


def plan(
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int] = 128,
    sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
    stop_tokens: Any = (),
    seed: int | Sequence[int] = 0,
    min_batch: int = 1,
) -> Plan:
    """Validate the requests (clear errors naming the prompt and the values) and bucket the shapes: batch and
    prompt length to powers of two (prefill compiles once per bucket), cache length and output buffer to powers
    of two (decode compiles once per pair)."""
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts")
    max_new = [int(m) for m in _per_row(max_new_tokens, n, "max_new_tokens")]
    samp = _per_row(sampling, n, "sampling")
    stops = _stop_rows(stop_tokens, n)
    seeds = [int(s) for s in _per_row(seed, n, "seed")]
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
        if max_new[i] < 1:
            raise ValueError(f"max_new_tokens={max_new[i]} for prompt {i}: must be >= 1")
        if len(p) + max_new[i] > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new[i]} it needs {len(p) + max_new[i]} "
                f"positions, more than the model's context of {cfg.max_position_embeddings}"
            )
        if not isinstance(samp[i], SamplingParams):
            raise TypeError(f"sampling for prompt {i}: expected SamplingParams, got {type(samp[i]).__name__}")
        if not 0 <= seeds[i] < 2**32:
            raise ValueError(f"seed={seeds[i]} for prompt {i}: must be in [0, 2**32)")

    b = _pow2(max(n, min_batch))
    pad = b - n
    t = prefill_bucket(max(len(p) for p in prompts))
    tokens = np.zeros((_pow2(n), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    width = max(1, max(len(s) for s in stops))
    stop = np.full((b, width), -1, np.int32)
    for i, s in enumerate(stops):
        stop[i, : len(s)] = s
    samp = samp + [GREEDY] * pad
    return Plan(
        n=n,
        batch=b,
        tokens=tokens,
        lengths=np.array([len(p) for p in prompts] + [1] * (_pow2(n) - n), np.int32),
        cache_len=_pow2(max(t, max(len(p) + m for p, m in zip(prompts, max_new)))),
        out_len=_pow2(max(max_new)),
        kinds=FilterKinds.of(samp, cfg.vocab_size),
        sampling=samp,
        max_new=np.array(max_new + [0] * pad, np.int32),
        stop=stop,
        seeds=np.array(seeds + [0] * pad, np.uint32),
    )


def _place(x, names, mesh):
    if mesh is None:
        return jnp.asarray(x)
    return jax.device_put(x, NamedSharding(mesh, logical_to_spec(names, np.shape(x), mesh)))


def controls_for(p: Plan, mesh=None) -> Controls:
    """The plan's per-row constants as device arrays (batch-sharded on a mesh)."""
    rows = ("cache_batch",)
    return Controls(
        filters=Filters(
            temperature=_place(np.array([s.temperature for s in p.sampling], np.float32), rows, mesh),
            top_k=_place(np.array([s.top_k for s in p.sampling], np.int32), rows, mesh),
            top_p=_place(np.array([s.top_p for s in p.sampling], np.float32), rows, mesh),
            min_p=_place(np.array([s.min_p for s in p.sampling], np.float32), rows, mesh),
        ),
        keys=jax.vmap(jax.random.key)(_place(p.seeds, rows, mesh)),
        max_new=_place(p.max_new, rows, mesh),
        stop=_place(p.stop, ("cache_batch", None), mesh),
    )


def check_prefill_chunk(chunk: int) -> int:
    if not (isinstance(chunk, (int, np.integer)) and chunk >= MIN_PREFILL_BUCKET and chunk & (chunk - 1) == 0):
        raise ValueError(f"prefill_chunk={chunk!r}: must be a power of two >= {MIN_PREFILL_BUCKET} (prompt buckets are "
                         "powers of two, so a chunk divides every bucket it is smaller than)")
    return int(chunk)


def start(cfg: ModelConfig, params: dict, p: Plan, controls: Controls, cache_dtype: Any = jnp.bfloat16, mesh=None,
          prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> DecodeState:
    """Prefill the plan's prompts into a fresh cache and draw each row's first token (params: `place_params`).
    Prompt buckets longer than `prefill_chunk` tokens prefill in chunks of that length (`prefill_chunked`)."""
    chunk = check_prefill_chunk(prefill_chunk)
    if p.tokens.shape[1] > chunk:
        return prefill_chunked(cfg, p.kinds, params, _place(p.tokens, ("cache_batch", None), mesh),
                               _place(p.lengths, ("cache_batch",), mesh), controls, batch=p.batch,
                               cache_len=p.cache_len, cache_dtype=jnp.dtype(cache_dtype), out_len=p.out_len,
                               chunk=chunk)
    return prefill(cfg, p.kinds, params, _place(p.tokens, ("cache_batch", None), mesh),
                   _place(p.lengths, ("cache_batch",), mesh), controls, batch=p.batch, cache_len=p.cache_len,
                   cache_dtype=jnp.dtype(cache_dtype), out_len=p.out_len)


def completions(p: Plan, out: np.ndarray, num: np.ndarray, forced: set[int] = frozenset()) -> list[Completion]:
    """Host results from the final out [B, N] / num [B]; rows in `forced` were finished by the caller."""
    results = []
    for i in range(p.n):
        toks = out[i, : num[i]].tolist()
        if i in forced:
            results.append(Completion(toks, "stop"))
        elif toks and toks[-1] in set(p.stop[i].tolist()) - {-1}:
            results.append(Completion(toks[:-1], "stop", toks[-1]))
        else:
            results.append(Completion(toks, "length"))
    return results


def generate(
    cfg: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int] = 128,
    sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
    stop_tokens: Any = (),
    seed: int | Sequence[int] = 0,
    cache_dtype: Any = jnp.bfloat16,
    mesh=None,
    chunk: int = 16,
    on_chunk: Callable[[list[list[int]]], Sequence[int] | None] | None = None,
    min_batch: int | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> list[Completion]:
    """Generate for a batch of token prompts, each with its own length, limit, filters, stop set and seed.

    params: the model's params (stacked layers, on `mesh` already or placed there by `place_params`).
    stop_tokens: ids shared by every row, or one collection per row. on_chunk(new_tokens) is called after
    prefill and then every `chunk` decode steps with each row's tokens since the last call (stop tokens
    included); it may return row indices to finish now (e.g. a stop string appeared in the text). The host checks
    for the end once per chunk either way (a finished batch wastes at most chunk - 1 steps). mesh: run on a (data, fsdp, tensor) mesh: params by the
    logical-axis rules, the cache by CACHE_LOGICAL_AXES (kv heads over tensor, batch over data/fsdp).
    min_batch: pad the batch to at least this many rows (default: `qcjax.platform.min_batch`).
    prefill_chunk: prompt buckets longer than this prefill in chunks of this many tokens (a power of two).
    """
    if min_batch is None:
        min_batch = platform.min_batch(cfg.dtype)
    p = plan(cfg, prompts, max_new_tokens, sampling, stop_tokens, seed, min_batch)
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        params = place_params(cfg, params, mesh)
        controls = controls_for(p, mesh)
        state = start(cfg, params, p, controls, cache_dtype, mesh, prefill_chunk)
        forced: set[int] = set()
        steps = max(1, int(chunk))
        seen = np.zeros(p.n, np.int64)
        while True:  # one host check per chunk of `steps` decode steps
            if on_chunk is None:
                done = np.asarray(jax.device_get(state.done))
            else:
                out, num, done = jax.device_get((state.out, state.num, state.done))
                new = [out[i, seen[i]: num[i]].tolist() for i in range(p.n)]
                seen = num[: p.n].astype(np.int64)
                finish = {int(i) for i in (on_chunk(new) or ()) if 0 <= int(i) < p.n and not done[int(i)]}
                if finish:
                    forced |= finish
                    mask = np.zeros(p.batch, bool)
                    mask[sorted(finish)] = True
                    done = done | mask
                    state = state._replace(done=_place(done, ("cache_batch",), mesh))
            if done.all():
                break
            state = decode(cfg, p.kinds, params, state, controls, steps=steps)
        out, num = jax.device_get((state.out, state.num))
    return completions(p, out, num, forced)


__all__ = [
    "GREEDY", "Completion", "Controls", "DecodeState", "FilterKinds", "Filters", "Plan", "SamplingParams", "TextStream",
    "categorical", "check_prefill_chunk", "completions", "controls_for", "decode", "decode_step", "filter_logits",
    "generate", "idle_state", "insert_rows", "place_params", "plan", "prefill", "prefill_bucket",
    "prefill_chunked", "sample_tokens", "serving_mesh_shape", "start",
]
