"""`generate` for scripts: the engine stepped on the calling thread until every prompt is done.

    done = generate(cfg, params, [[151644, 872], [1, 2, 3]], max_new_tokens=64,
                    sampling=SamplingParams(temperature=0.7, top_p=0.95), stop_tokens=FIM_STOP_IDS)
    done[0].tokens, done[0].finish_reason

Every prompt is one engine request (its own length limit, filters, stop set and seed); at most `max_rows` run at
once and the rest wait, so a list of any length streams through continuous batching; prompts that share a prefix
(the n samples of one problem, one repository's files) share its pages.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from qcjax.config import ModelConfig
from qcjax.inference.engine import DEFAULT_PAGE_SIZE, DEFAULT_PREFILL_CHUNK, Engine
from qcjax.inference.rows import Request
from qcjax.inference.speculative import Speculation
from qcjax.sampling import GREEDY, SamplingParams, pow2


_COUNTERS = ("prompt_tokens", "cached_tokens", "computed_tokens", "preempted", "spec_drafted", "spec_accepted",
             "verify_steps", "decode_steps", "decode_tokens", "row_forwards")


@dataclasses.dataclass
class Completion:
    """One prompt's result. tokens excludes the stop token; finish_reason is "stop" (a stop token, or a stop the
    caller signalled, e.g. a stop string) or "length"."""

    tokens: list[int]
    finish_reason: str
    stop_token: int | None = None
    cached_tokens: int = 0  # prompt tokens that came from the prefix cache


def per_row(value, n: int, name: str) -> list:
    """One value for every row, or a list with one per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: got {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


def stop_rows(stop_tokens, n: int) -> list[tuple[int, ...]]:
    """A set of ids shared by all rows, or one set per row (a list of collections)."""
    stop_tokens = list(stop_tokens)
    if stop_tokens and not isinstance(stop_tokens[0], (int, np.integer)):
        return [tuple(int(t) for t in s) for s in per_row(stop_tokens, n, "stop_tokens")]
    return [tuple(int(t) for t in stop_tokens)] * n


def generate(
    cfg: ModelConfig,
    params: Any,
    prompts: Seq[Seq[int]],
    *,
    max_new_tokens: int | Seq[int] = 128,
    sampling: SamplingParams | Seq[SamplingParams] = GREEDY,
    stop_tokens: Any = (),
    seed: int | Seq[int] = 0,
    cache_dtype: Any = jnp.bfloat16,
    mesh=None,
    chunk: int = 16,
    on_chunk: Callable[[list[list[int]]], Seq[int] | None] | None = None,
    max_rows: int | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    prefix_cache: bool = True,
    min_batch: int | None = None,
    on_finish: Callable[[int, Completion], None] | None = None,
    speculative: Speculation | None = None,
    stats: dict | None = None,
    lora: Any = None,
    adapter: str | None | Seq[str | None] = None,
    max_len: int | None = None,
) -> list[Completion]:
    """Generate for a list of token prompts, each with its own length limit, filters, stop set and seed.

    params: the model's params (stacked layers; placed on `mesh` by the logical-axis rules). stop_tokens: ids shared
    by every row, or one collection per row. on_chunk(new_tokens) is called after every engine round with each
    prompt's tokens since the last call (never a stop token; [] for prompts with none); it may return prompt
    indices to finish now (e.g. a stop string appeared in the text). max_rows: prompts in flight at once (default:
    all of them, up to 64). The KV cache holds max_rows rows of the longest request (in pages of page_size).
    on_finish(i, completion) is called as each prompt finishes (progress). speculative: draft and verify
    (qcjax.inference.speculative; greedy text is unchanged, sampling keeps the model's distribution). stats: a dict
    the engine's counters are added to at the end (prefix-cache tokens, speculation's drafted / accepted tokens).
    lora: the adapters (qcjax.inference.lora.LoraSlots) prompts may run through; adapter: one name for every prompt,
    or one per prompt (None: the base model). max_len: the engine's limit on a request's prompt + new tokens (the
    page tables' width; default: the longest request rounded up to a power of two, within the model's context)."""
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts")
    max_new = [int(m) for m in per_row(max_new_tokens, n, "max_new_tokens")]
    samp = per_row(sampling, n, "sampling")
    stops = stop_rows(stop_tokens, n)
    seeds = [int(s) for s in per_row(seed, n, "seed")]
    names = per_row(adapter, n, "adapter")
    results: list[list[int]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n

    def sink(i):
        def on_event(toks, fin):
            results[i] += toks
            if fin is not None:
                reasons[i] = fin
                if on_finish is not None:
                    on_finish(i, completion(i))
        return on_event

    def completion(i: int) -> Completion:
        r = reqs[i]
        return Completion(results[i], reasons[i] if reasons[i] in ("stop", "length") else "stop", r.stop_token,
                          r.cached_tokens)

    reqs = [Request(list(map(int, p)), m, s, sd, st, on_event=sink(i), adapter=a)
            for i, (p, m, s, sd, st, a) in enumerate(zip(prompts, max_new, samp, seeds, stops, names))]
    need = max(len(r.tokens) + r.max_new for r in reqs)
    max_len = min(max_len or cfg.max_position_embeddings, max(need, pow2(need)))
    rows = int(max_rows) if max_rows else min(n, 64)
    engine = Engine(cfg, params, max_rows=rows, max_len=max_len, page_size=page_size, prefix_cache=prefix_cache,
                    cache_dtype=cache_dtype, mesh=mesh, chunk=max(1, int(chunk)), max_queue=n,
                    prefill_chunk=prefill_chunk, min_batch=min_batch, speculative=speculative, lora=lora)
    for i, r in enumerate(reqs):
        try:
            engine.validate(r)
        except (ValueError, TypeError) as e:
            raise type(e)(f"prompt {i}: {e}") from None
    seen = [0] * n
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        engine.submit(reqs)
        while engine.busy:
            engine.step()
            if on_chunk is not None:
                new = [results[i][seen[i]:] for i in range(n)]
                seen = [len(x) for x in results]
                for i in on_chunk(new) or ():
                    if 0 <= int(i) < n and not reqs[int(i)].finished:
                        engine.cancel(reqs[int(i)], "stop")
    engine.stop()
    if stats is not None:  # counters add up over calls (one dict for a whole run)
        for k, v in engine.stats().items():
            stats[k] = stats.get(k, 0) + v if isinstance(v, int) and k in _COUNTERS else v
    return [completion(i) for i in range(n)]

