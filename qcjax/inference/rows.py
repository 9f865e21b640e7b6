"""The row table, host side: what each request asks for (`Request`: tokens, length limit, sampling settings, seed,
stop ids, a callback), how it stands in the engine (`Sequence`: its tokens so far, pages, how much of it is cached),
how it finished, and the device arrays one batch of rows needs (`controls`). The one place these rules live: the
engine, `generate` and the server all read them from here.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Hashable, Sequence as Seq

import jax
import numpy as np

from qcjax.config import ModelConfig
from qcjax.sampling import GREEDY, Controls, FilterKinds, Filters, SamplingParams

log = logging.getLogger("qcjax.inference")

STOP_WIDTH = 16  # stop-token ids per row (the stop array's fixed width: a wider one would be another program)
GREEDY_KINDS = FilterKinds()
# The sampling program every temperature / top-p mix runs on (top-p 1 and temperature 0 switch them off per row).
SAMPLE_KINDS = FilterKinds(sample=True, top_p=True)


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to generate. on_event(tokens, finish_reason) is called on the engine's thread: with new token
    ids (finish_reason None; a stop token is never included), then once with the last ids and the finish reason:
    "stop" (a stop token, or the caller's own stop via `Engine.finish`), "length", "cancelled" or "error".
    namespace: the prefix-cache namespace (pages are shared only between requests of one namespace).
    adapter: the name of a LoRA adapter the engine serves (qcjax.inference.lora), None for the base model."""

    tokens: list[int]
    max_new: int
    sampling: SamplingParams = GREEDY
    seed: int = 0
    stop_ids: Seq[int] = ()
    on_event: Callable[[list[int], str | None], None] | None = None
    namespace: Hashable = None
    adapter: str | None = None
    # set by the engine
    cancelled: bool = False
    finished: bool = False
    finish_reason: str | None = None
    submitted: float = 0.0  # time.perf_counter() at submit
    first_token_at: float | None = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache when first admitted
    stop_token: int | None = None

    def _emit(self, tokens: list[int], finish: str | None = None) -> None:
        if self.finished:
            return
        if finish is not None:
            self.finished, self.finish_reason = True, finish
        if self.on_event is not None:
            try:
                self.on_event(tokens, finish)
            except Exception:  # a consumer's bug must not stop the engine
                log.exception("on_event failed")


def check_request(r: Request, cfg: ModelConfig, max_len: int, max_pages: int, page_size: int) -> None:
    """ValueError with a one-line message naming the value and the limit, for a request the engine can never run."""
    if not r.tokens:
        raise ValueError("the prompt is empty: generation needs at least one prompt token")
    bad = [t for t in r.tokens if not (isinstance(t, (int, np.integer)) and 0 <= t < cfg.vocab_size)]
    if bad:
        raise ValueError(f"the prompt has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
    if not isinstance(r.max_new, (int, np.integer)) or r.max_new < 1:
        raise ValueError(f"max_new_tokens={r.max_new!r}: must be an integer >= 1")
    need = len(r.tokens) + r.max_new
    if need > max_len:
        raise ValueError(f"the prompt has {len(r.tokens)} tokens; with max_new_tokens={r.max_new} it needs {need} "
                         f"positions, more than the context of {max_len}")
    pages = -(-(need - 1) // page_size)
    if pages > max_pages:
        raise ValueError(f"the request needs {pages} pages of {page_size} tokens; the KV cache holds {max_pages}")
    if not isinstance(r.sampling, SamplingParams):
        raise TypeError(f"sampling: expected SamplingParams, got {type(r.sampling).__name__}")
    if not (isinstance(r.seed, (int, np.integer)) and 0 <= r.seed < 2**32):
        raise ValueError(f"seed={r.seed!r}: must be an integer in [0, 2**32)")
    if len(r.stop_ids) > STOP_WIDTH:
        raise ValueError(f"{len(r.stop_ids)} stop tokens: at most {STOP_WIDTH}")


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request inside the engine. tokens: the prompt and every token generated so far; cached: how many of them
    have their keys and values in `pages` (the rest are prefilled, or, for a decoding row, the newest token is the
    next decode input); num: tokens generated so far."""

    req: Request
    tokens: list[int]
    prompt_len: int
    pages: list[int] = dataclasses.field(default_factory=list)
    cached: int = 0
    num: int = 0
    admitted_at: int = 0  # admission order (preemption takes the newest first)
    last_emit: float = 0.0  # when tokens last went out (inter-token latency)
    spec: Any = None  # speculative decoding state (qcjax.inference.speculative.RowState)
    adapter: tuple[str, int] | None = None  # the registration of the request's adapter (qcjax.inference.lora)
    slot: int = -1  # the adapter bank slot this row runs with while admitted (-1: the base model)
    namespace: Hashable = None  # the prefix-cache namespace: the request's, and its adapter's registration

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.tokens)

    def limit(self) -> int:
        """The sequence's final length at most: prompt + max_new."""
        return self.prompt_len + self.req.max_new

    def record(self, tok: int) -> str | None:
        """Append a drawn token; the finish reason it causes (a stop token, the length limit), else None."""
        self.tokens.append(int(tok))
        self.num += 1
        if int(tok) in self.req.stop_ids:
            return "stop"
        return "length" if self.num >= self.req.max_new else None


def kinds_for(sampling: Seq[SamplingParams], vocab_size: int) -> FilterKinds:
    """The sampling program a batch runs: a bare argmax when every row is greedy, the one temperature/top-p program
    when every row fits it, else the filters the rows ask for (top-k, min-p)."""
    kinds = FilterKinds.of(sampling, vocab_size)
    if not kinds.sample:
        return GREEDY_KINDS
    return SAMPLE_KINDS if not kinds.top_k and not kinds.min_p else kinds


def controls(seqs: Seq[Sequence | None], batch: int, place: Callable[[np.ndarray, tuple], jax.Array]) -> Controls:
    """The per-row constants of a batch of `batch` rows (None or missing: padding, greedy with max_new 0) as device
    arrays; place(array, logical names) puts each on the device (batch-sharded on a mesh)."""
    seqs = list(seqs) + [None] * (batch - len(seqs))
    samp = [s.req.sampling if s is not None else GREEDY for s in seqs]
    stop = np.full((batch, STOP_WIDTH), -1, np.int32)
    for i, s in enumerate(seqs):
        if s is not None and s.req.stop_ids:
            stop[i, : len(s.req.stop_ids)] = list(s.req.stop_ids)
    rows = ("cache_batch",)
    seeds = np.array([s.req.seed if s is not None else 0 for s in seqs], np.uint32)
    return Controls(
        filters=Filters(
            temperature=place(np.array([x.temperature for x in samp], np.float32), rows),
            top_k=place(np.array([x.top_k for x in samp], np.int32), rows),
            top_p=place(np.array([x.top_p for x in samp], np.float32), rows),
            min_p=place(np.array([x.min_p for x in samp], np.float32), rows),
        ),
        keys=_keys(place(seeds, rows)),
        max_new=place(np.array([s.req.max_new if s is not None else 0 for s in seqs], np.int32), rows),
        stop=place(stop, ("cache_batch", None)),
    )


@jax.jit
def _keys(seeds: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.key)(seeds)


__all__ = ["GREEDY_KINDS", "SAMPLE_KINDS", "STOP_WIDTH", "Request", "Sequence", "check_request", "controls",
           "kinds_for"]
