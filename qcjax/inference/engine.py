"""The inference engine: continuous batching over a paged KV cache with a prefix cache.

    engine = Engine(cfg, params, max_rows=16, max_len=8192)
    engine.warmup(); engine.start()                 # a server: one engine thread owns every device call
    engine.submit([Request(tokens, max_new=64, sampling=..., seed=1, stop_ids=..., on_event=callback)])

or, in a script, `qcjax.inference.generate` (the same engine stepped on the calling thread).

Each round of the engine (`step`):
1. cancelled requests leave and their pages are released at once;
2. prefill: rows still prefilling, then waiting requests (FIFO) while rows and pages allow, run in batches of up to
   `prefill_batch` rows and `prefill_chunk` tokens per row, until the round's `prefill_tokens` budget is spent: a long
   prompt goes in over several rounds, with decode chunks between them, so it never stalls running decodes for its
   whole length. A new request first walks the prefix cache (qcjax.inference.pages): the full pages of its prompt
   that are cached are taken as they are and only the rest is computed. The n samples of one prompt share its pages
   (the first is prefilled, the others find its pages in the cache and compute only the last partial page). A
   fresh prompt (nothing cached) and a partly cached one never share a prefill call, so each row's numbers depend
   on its own prefix-cache hit only, not on what it was batched with (a seed gives the same samples whatever the
   batching, as long as the cache holds the same pages);
3. decode: `chunk` steps for the running rows only, compacted into the smallest batch bucket that holds them; each
   row first gets the pages its next `chunk` tokens need. When pages run out, idle cached pages are evicted (least
   recently used first); if that is not enough the newest running request is preempted: its pages are released (its
   full pages stay cached) and it waits at the head of the queue to be recomputed, its tokens so far kept as its
   prompt, so its text continues exactly.

Shapes are bucketed so a session compiles a bounded set of programs: decode on (rows: powers of two up to
`max_rows`, page-table width: `widths`) x (greedy, sampling); prefill on (rows, prompt-chunk bucket, fresh or
gathered table). `warmup` runs them all, so no request mix compiles afterwards (`stats()["compiles_after_warmup"]`).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any, Callable, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from qcjax import platform
from qcjax.config import ModelConfig
from qcjax.inference import programs
from qcjax.inference.lora import LoraSlots
from qcjax.inference.metrics import EngineMetrics
from qcjax.inference.pages import PagePool
from qcjax.inference import speculative as spec_mod
from qcjax.inference.rows import (GREEDY_KINDS, SAMPLE_KINDS, Request, Sequence, check_request, controls,
                                  kinds_for)
from qcjax.sampling import GREEDY, SamplingParams, pow2
from qcjax.sharding import logical_to_spec

log = logging.getLogger("qcjax.inference")

MIN_PREFILL_BUCKET = 16
DEFAULT_PAGE_SIZE = 16
GATE_PROBE = 4  # speculative decoding: after this many gated decode chunks, a verify round runs anyway
DEFAULT_PREFILL_CHUNK = 512


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller should retry later (HTTP 429)."""


def prefill_buckets(prefill_chunk: int) -> list[int]:
    """The prompt-chunk lengths prefill compiles for: 16, 64, 256, ... (powers of four) and prefill_chunk itself."""
    out, t = [], MIN_PREFILL_BUCKET
    while t < prefill_chunk:
        out.append(t)
        t *= 4
    return out + [prefill_chunk]


def table_widths(max_pages: int, page_size: int) -> list[int]:
    """The page-table widths (pages per row) programs compile for: 256, 1K, 4K, ... tokens (powers of four) and the
    whole context. A batch runs at the smallest width that holds its longest row, so a step reads and attends over
    about what its rows hold, not the context limit."""
    out, tokens = [], 256
    while -(-tokens // page_size) < max_pages:
        out.append(-(-tokens // page_size))
        tokens *= 4
    return out + [max_pages]


def _bucket(n: int, buckets: Seq[int]) -> int:
    return next(b for b in buckets if b >= n)


class Engine:
    """Continuous batching over a paged KV cache; see the module docstring.

    max_rows: requests in flight at most (the largest decode batch); max_len: a request's prompt + completion
    tokens at most; page_size: tokens per page; num_pages: the pool's size (default: max_rows x max_len tokens, the
    memory a dense cache would take; requests that use less leave room for more); prefix_cache: reuse cached pages
    across requests; chunk: decode steps per device call; max_queue: waiting requests beyond the free rows before
    `submit` raises QueueFull; prefill_batch / prefill_chunk / prefill_tokens: rows and tokens per row of one prefill
    call, and prefill tokens per round (the most a round delays running decodes by); speculative: draft tokens
    proposed by prompt lookup or a draft model and checked by one target forward (qcjax.inference.speculative);
    lora: the adapters requests may name (`Request.adapter`), each row run through its own in one batch
    (qcjax.inference.lora)."""

    def __init__(self, cfg: ModelConfig, params: Any, *, max_rows: int = 16, max_len: int = 8192,
                 page_size: int = DEFAULT_PAGE_SIZE, num_pages: int | None = None, prefix_cache: bool = True,
                 cache_dtype: Any = jnp.bfloat16, mesh=None, chunk: int = 8, max_queue: int = 64,
                 prefill_batch: int = 4, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prefill_tokens: int = 2048,
                 min_batch: int | None = None, speculative: spec_mod.Speculation | None = None,
                 lora: LoraSlots | None = None):
        for name, v, lo in (("max_rows", max_rows, 1), ("max_len", max_len, 2), ("page_size", page_size, 1),
                            ("chunk", chunk, 1), ("max_queue", max_queue, 0), ("prefill_batch", prefill_batch, 1),
                            ("prefill_tokens", prefill_tokens, 1), ("num_pages", num_pages or 1, 1)):
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name}={v!r}: must be an integer >= {lo}")
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len={max_len}: more than the model's context of {cfg.max_position_embeddings}")
        if not (isinstance(prefill_chunk, (int, np.integer)) and prefill_chunk >= MIN_PREFILL_BUCKET
                and prefill_chunk & (prefill_chunk - 1) == 0):
            raise ValueError(f"prefill_chunk={prefill_chunk!r}: must be a power of two >= {MIN_PREFILL_BUCKET}")
        self.cfg, self.mesh = cfg, mesh
        self.params = programs.place_params(cfg, params, mesh)
        self.max_rows, self.max_len, self.page_size = int(max_rows), int(max_len), int(page_size)
        self.max_pages = -(-self.max_len // self.page_size)  # one row's pages at most
        self.num_pages = int(num_pages) if num_pages else self.max_rows * self.max_pages
        self.chunk, self.max_queue = int(chunk), int(max_queue)
        # no chunk longer than a request can be: fewer programs for a short context
        self.prefill_batch, self.prefill_chunk = int(prefill_batch), min(int(prefill_chunk), max(
            MIN_PREFILL_BUCKET, pow2(self.max_len)))
        self.prefill_tokens = int(prefill_tokens)
        self.cache_dtype = jnp.dtype(cache_dtype)
        self.widths = table_widths(self.max_pages, self.page_size)
        self.t_buckets = prefill_buckets(self.prefill_chunk)
        lo = pow2(platform.min_batch(cfg.dtype) if min_batch is None else min_batch)
        self.batch_buckets = sorted({min(max(lo, 1 << k), pow2(self.max_rows))
                                     for k in range(pow2(self.max_rows).bit_length())})
        self.pages = PagePool(self.num_pages, self.page_size, prefix_cache)
        self.metrics = EngineMetrics()
        self.spec = speculative
        self.lora = lora
        self._call_times: dict[tuple, tuple[int, float]] = {}  # (program, rows, table width, tokens) -> (calls, s)
        self._since_verify = 0
        self._rates: dict[tuple, float] = {}  # ("speculate" | "chunk", rows, table width) -> tokens/s
        self.proposer = None
        if speculative is not None:
            if speculative.method == "draft":
                from qcjax.inference.draft import DraftModelProposer  # a second model: only when asked for
                self.proposer = DraftModelProposer(self, speculative)
            else:
                self.proposer = spec_mod.NgramProposer(speculative)

        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cancel: dict[Request, str] = {}
        self._closing = False
        self._thread: threading.Thread | None = None
        self._prefilling: list[Sequence] = []
        self._running: list[Sequence] = []
        self._order = 0
        self._pool: programs.Pool | None = None
        self._compiles = 0
        self._compiles_at_warmup: int | None = None
        self._engine_thread_id: int | None = None
        self.counts = collections.Counter()  # submitted, completed, cancelled, errors, preempted, prompt tokens ...
        jax.monitoring.register_event_duration_secs_listener(self._on_jax_event)

    # ---- public, any thread ------------------------------------------------------------------------------------------
    def validate(self, r: Request) -> None:
        """ValueError naming the limit, for a request this engine can never run (too long for the context or the
        pool, bad ids or settings)."""
        check_request(r, self.cfg, self.max_len, self.num_pages, self.page_size)
        if r.adapter is not None and (self.lora is None or r.adapter not in self.lora):
            raise ValueError(f"adapter {r.adapter!r}: not one this engine serves "
                             f"({', '.join(self.lora.names()) if self.lora else 'it serves none'})")

    def submit(self, reqs: Seq[Request]) -> None:
        """Queue requests (all or none). ValueError: a request the engine cannot run; QueueFull: no room now."""
        seqs = [self._sequence(r) for r in reqs]
        with self._cv:
            if self._closing:
                raise QueueFull("the server is shutting down")
            free = self.max_rows - len(self._running) - len(self._prefilling)
            if len(self._waiting) + len(reqs) > self.max_queue + max(0, free):
                raise QueueFull(f"{len(self._waiting)} requests are waiting for one of {self.max_rows} rows (the queue "
                                f"holds {self.max_queue}); retry later")
            now = time.perf_counter()
            for s in seqs:
                s.req.submitted = now
                self._waiting.append(s)
                self.metrics.submitted(len(s.tokens))
            self.counts["submitted"] += len(reqs)
            self._cv.notify_all()

    def _sequence(self, r: Request) -> Sequence:
        """A checked request as the engine holds it (ValueError: one it can never run). A request's adapter is
        pinned to its registration now, and keys its prefix-cache pages: never shared with another adapter's rows."""
        self.validate(r)
        s = Sequence(r, list(map(int, r.tokens)), len(r.tokens), namespace=r.namespace)
        if r.adapter is not None:
            try:
                s.adapter = self.lora.registration(r.adapter)
            except KeyError:  # unloaded since `validate`
                raise ValueError(f"adapter {r.adapter!r}: not one this engine serves") from None
            s.namespace = (r.namespace, "lora", s.adapter)
        return s

    def cancel(self, r: Request, reason: str = "cancelled") -> None:
        """Finish a request now (a client went away: "cancelled"; its text reached a stop string: "stop"). Its pages
        are released before the next device call."""
        with self._cv:
            if r.finished:
                return
            r.cancelled = reason == "cancelled"
            self._cancel[r] = reason
            self._cv.notify_all()

    def stats(self) -> dict:
        with self._cv:
            return {"max_rows": self.max_rows, "busy": len(self._running) + len(self._prefilling),
                    "running": len(self._running), "prefilling": len(self._prefilling),
                    "waiting": len(self._waiting), "max_queue": self.max_queue, "max_len": self.max_len,
                    "page_size": self.page_size, "pages": self.num_pages, "pages_used": self.pages.used,
                    "pages_cached": self.pages.cached, "compiles": self._compiles,
                    "compiles_after_warmup": (None if self._compiles_at_warmup is None
                                              else self._compiles - self._compiles_at_warmup),
                    **{k: self.counts[k] for k in ("submitted", "completed", "cancelled", "errors", "preempted",
                                                   "prompt_tokens", "cached_tokens", "computed_tokens",
                                                   "spec_drafted", "spec_accepted", "verify_steps", "decode_steps",
                                                   "decode_tokens", "row_forwards")}}

    @property
    def busy(self) -> bool:
        with self._cv:
            return bool(self._waiting or self._prefilling or self._running or self._cancel)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qcjax-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish: waiting and running requests end with "cancelled"; the engine thread exits."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._drain()
        with contextlib.suppress(ValueError):
            jax.monitoring.unregister_event_duration_listener(self._on_jax_event)

    def warmup(self) -> float:
        """Compile (by running once) every program a request mix can need. Call before `start` (it runs on the
        calling thread); returns the seconds taken. The pool's contents afterwards are junk in free pages only."""
        t0 = time.perf_counter()
        self._engine_thread_id = threading.get_ident()
        with self._mesh_ctx():
            self._ensure_pool()
            if self.lora is not None:
                self.lora.warmup()
            for p, t, w in self.prefill_shapes():
                self._prefill_call([None] * p, [0] * p, t, w, GREEDY_KINDS)
                self._prefill_call([None] * p, [0] * p, t, w, SAMPLE_KINDS)
            for b in self.batch_buckets:
                for w in self.widths:
                    for kinds in (GREEDY_KINDS, SAMPLE_KINDS):
                        self._decode_call([None] * b, b, w, kinds)
                        if self.spec is not None and not self.spec.on_device:
                            self._decode_call([None] * b, b, w, kinds, steps=1)
                            for t in self.spec.verify_widths():
                                self._verify_call([None] * b, [[]] * b, b, w, t, kinds)
                    if self.spec is not None and self.spec.gate and not self.spec.on_device:
                        self._time_calls(b, w)  # the gate starts from measured call times
                    if self.spec is not None and self.spec.on_device:
                        for kinds in (GREEDY_KINDS, SAMPLE_KINDS):
                            self._speculate_call([None] * b, b, w, kinds)
            if self.proposer is not None and hasattr(self.proposer, "warmup"):
                self.proposer.warmup()
        self._compiles_at_warmup = self._compiles
        self._engine_thread_id = None
        return time.perf_counter() - t0

    def prefill_shapes(self) -> list[tuple[int, int, int]]:
        """Every (rows, chunk bucket, table width) a prefill may run with: rows a power of two up to prefill_batch
        with rows x bucket <= prefill_tokens (one row always), a fresh table (width bucket / page_size, when the
        page size divides the bucket) or any of `widths`."""
        shapes = []
        rows = [1 << k for k in range(16) if 1 << k <= self.prefill_batch]
        for t in self.t_buckets:
            ws = list(self.widths)
            if t % self.page_size == 0 and t // self.page_size <= self.max_pages:
                ws = sorted(set(ws) | {t // self.page_size})
            shapes += [(p, t, w) for p in rows if p == 1 or p * t <= self.prefill_tokens for w in ws]
        return shapes

    # ---- one round (the engine thread, or `generate`'s caller) ---------------------------------------------------------
    def step(self) -> None:
        """One round: cancellations, prefill within the round's budget, one decode chunk, gauges."""
        if self._engine_thread_id is None:
            self._engine_thread_id = threading.get_ident()  # compiles count on the thread that steps
        self._ensure_pool()
        self._take_cancels()
        self._prefill_round()
        if self._running:
            self._spec_round() if self.spec is not None else self._decode_round()
        self.metrics.gauges(self)

    # ---- internals ----------------------------------------------------------------------------------------------------
    def _on_jax_event(self, event: str, duration: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration" and threading.get_ident() == self._engine_thread_id:
            self._compiles += 1

    def _mesh_ctx(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _ensure_pool(self) -> None:
        if self._pool is None:
            with self._mesh_ctx():
                self._pool = programs.init_pool(self.cfg, num_pages=self.num_pages, page_size=self.page_size,
                                                dtype=self.cache_dtype)

    def _place(self, x: np.ndarray, names: tuple) -> jax.Array:
        """A host array as the programs take it: uncommitted on one device, by the logical-axis rules on a mesh (the
        same argument kinds every call, so nothing recompiles)."""
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, NamedSharding(self.mesh, logical_to_spec(names, np.shape(x), self.mesh)))

    def _run(self) -> None:
        self._engine_thread_id = threading.get_ident()
        with self._mesh_ctx():
            while True:
                with self._cv:
                    while not (self._closing or self._waiting or self._cancel or self._prefilling or self._running):
                        self._cv.wait()
                    if self._closing:
                        break
                try:
                    self.step()
                except Exception:  # a device failure: fail the requests in flight, keep serving
                    log.exception("engine step failed")
                    self._fail_all()
            self._drain()

    def _fail_all(self) -> None:
        for s in self._prefilling + self._running:
            self.counts["errors"] += 1
            self._release_slot(s)
            s.req._emit([], "error")
        self._prefilling, self._running = [], []
        self.pages = PagePool(self.num_pages, self.page_size, self.pages.prefix_cache)  # device state unknown: anew
        self._pool = None

    def _drain(self) -> None:
        """End everything still in the engine with "cancelled" (shutdown)."""
        for s in self._prefilling + self._running:
            self._finish(s, "cancelled")
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for s in waiting:
            s.req._emit([], "cancelled")

    def _take_cancels(self) -> None:
        with self._cv:
            cancels, self._cancel = self._cancel, {}
            for s in [s for s in self._waiting if s.req in cancels]:
                self._waiting.remove(s)
                self.counts["cancelled" if cancels[s.req] == "cancelled" else "completed"] += 1
                s.req._emit([], cancels[s.req])
        for s in [s for s in self._prefilling + self._running if s.req in cancels]:
            (self._prefilling if s in self._prefilling else self._running).remove(s)
            self._finish(s, cancels[s.req])

    def _finish(self, s: Sequence, reason: str, tokens: list[int] | None = None) -> None:
        """Release a sequence's pages (its full pages stay in the prefix cache) and tell its caller."""
        self.pages.register(s.tokens, s.pages, s.cached, s.namespace)
        self.pages.release(s.pages)
        s.pages = []
        self._release_slot(s)
        self.counts["cancelled" if reason == "cancelled" else "completed"] += 1
        self.metrics.finished(reason)
        if s.spec is not None and s.spec.verifies:
            log.debug("request done: %d verify steps, %d of %d draft tokens accepted (%.2f tokens per target forward)",
                      s.spec.verifies, s.spec.accepted, s.spec.drafted, (s.spec.verifies + s.spec.accepted)
                      / s.spec.verifies)
        s.req._emit(tokens or [], reason)

    def _emit(self, s: Sequence, new: list[int], reason: str | None) -> None:
        """Hand new tokens out (a stop token is not text), finishing the sequence if reason says so."""
        now = time.perf_counter()
        if new and s.req.first_token_at is None:
            s.req.first_token_at = now
            self.metrics.first_token(now - s.req.submitted)
            self.metrics.tokens(len(new) - 1, None)
        elif new:
            self.metrics.tokens(len(new), (now - s.last_emit) / len(new))
        s.last_emit = now
        if reason == "stop" and new and new[-1] in s.req.stop_ids:
            s.req.stop_token = new[-1]
            new = new[:-1]
        if reason is not None:
            self._finish(s, reason, new)
        elif new:
            s.req._emit(new)

    # -- prefill --
    def _admit(self, batch_sigs: set) -> Sequence | None:
        """The head of the queue as a prefilling sequence (prefix-cache pages taken, the rest of its prompt's pages
        allocated), or None: no row or page for it now, or its first uncached page is being computed in this batch
        (it waits one sub-round and then finds that page cached)."""
        with self._cv:
            if not self._waiting or len(self._running) + len(self._prefilling) >= self.max_rows:
                return None
            s = self._waiting[0]
        ns, ps = s.namespace, self.page_size
        hit = self.pages.lookup(s.tokens, len(s.tokens) - 1, ns)
        cached = len(hit) * ps
        sig = tuple(s.tokens[: cached + ps]) if cached + ps <= len(s.tokens) - 1 else None
        need = -(-len(s.tokens) // ps) - len(hit)
        if (sig is not None and sig in batch_sigs) or need > self.pages.available():
            self.pages.release(hit)
            return None
        if s.adapter is not None:
            try:
                s.slot = self.lora.acquire(*s.adapter)
            except KeyError:  # unloaded while it waited
                self.pages.release(hit)
                with self._cv:
                    self._waiting.popleft()
                self.counts["errors"] += 1
                s.req._emit([], "error")
                return None
            if s.slot is None:  # every slot is held by running rows: wait for one
                s.slot = -1
                self.pages.release(hit)
                return None
        with self._cv:
            self._waiting.popleft()
        s.pages = hit + self.pages.allocate(need)
        s.cached = cached
        if s.num == 0:  # first admission (a preempted request keeps the figure it had)
            s.req.cached_tokens = cached
            self.counts["prompt_tokens"] += len(s.tokens)
            self.counts["cached_tokens"] += cached
            self.metrics.prefix_hit(cached)
        self._order += 1
        s.admitted_at = self._order
        self._prefilling.append(s)
        return s

    def _prefill_round(self) -> None:
        budget = self.prefill_tokens
        while budget > 0:
            rows: list[Sequence] = []
            counts: list[int] = []
            sigs: set = set()
            cands = iter(list(self._prefilling))
            while len(rows) < self.prefill_batch:
                s = next(cands, None) or self._admit(sigs)
                if s is None:
                    break
                count = min(len(s.tokens) - s.cached, self.prefill_chunk)
                t = _bucket(max(counts + [count]), self.t_buckets)
                if rows and (pow2(len(rows) + 1) * t > budget or (s.cached == 0) != (rows[0].cached == 0)):
                    break  # over the budget, or a fresh prompt beside a cached one: each row takes its own path

                rows.append(s)
                counts.append(count)
                if s.cached + self.page_size <= len(s.tokens):
                    sigs.add(tuple(s.tokens[: s.cached + self.page_size]))
            if not rows:
                return
            t = _bucket(max(counts), self.t_buckets)
            fresh = (all(s.cached == 0 for s in rows) and t % self.page_size == 0
                     and t // self.page_size <= self.max_pages)  # a bucket past the context: a table of widths
            w = t // self.page_size if fresh else _bucket(
                -(-max(s.cached + c for s, c in zip(rows, counts)) // self.page_size), self.widths)
            kinds = kinds_for([s.req.sampling for s in rows], self.cfg.vocab_size)
            toks = self._prefill_call(rows, counts, t, w, kinds)
            budget -= pow2(len(rows)) * t
            self.counts["computed_tokens"] += sum(counts)
            for s, c, tok in zip(rows, counts, toks):
                s.cached += c
                self.pages.register(s.tokens, s.pages, s.cached, s.namespace)
                if s.cached == len(s.tokens):  # the prompt is in: its first token (or, after a preemption, the next)
                    self._prefilling.remove(s)
                    reason = s.record(tok)
                    s.cached = len(s.tokens) - 1
                    if reason is None:
                        self._running.append(s)
                        if self.spec is not None:
                            if s.spec is None:
                                s.spec = self.proposer.state(s.tokens, s.prompt_len)
                            self.proposer.admitted(s)
                    self._emit(s, [int(tok)], reason)

    def _prefill_call(self, rows: list[Sequence | None], counts: list[int], t: int, w: int, kinds) -> np.ndarray:
        p = pow2(len(rows))
        tokens = np.zeros((p, t), np.int32)
        lengths = np.zeros(p, np.int32)
        cnt = np.zeros(p, np.int32)
        pages = np.full((p, w), self.num_pages, np.int32)  # past a row's own pages: no page (a write is dropped)
        num = np.zeros(p, np.int32)
        for i, (s, c) in enumerate(zip(rows, counts)):
            if s is None:
                continue
            tokens[i, :c] = s.tokens[s.cached: s.cached + c]
            lengths[i], cnt[i], num[i] = s.cached, c, s.num
            table = s.pages[:w]
            pages[i, : len(table)] = table
        ctl = controls(rows, p, self._place)
        args = (self._place(tokens, ("cache_batch", None)), self._place(lengths, ("cache_batch",)),
                self._place(cnt, ("cache_batch",)), self._place(pages, ("cache_batch", None)))
        if self.proposer is not None:
            self.proposer.prefill(*args, controls(rows, p, self._place))  # a draft model's pool takes it too
        self._pool, toks = programs.prefill(self.cfg, kinds, self.params, self._pool, *args,
                                            self._place(num, ("cache_batch",)), ctl, self._lora_rows(rows, p))
        return np.asarray(jax.device_get(toks))

    # -- decode --
    def _pages_for_chunk(self, ahead: int | None = None) -> None:
        """Give every running row the pages its next `ahead` tokens (default: a decode chunk) write into; preempt the
        newest rows while pages lack."""
        ps = self.page_size
        for s in sorted(self._running, key=lambda s: s.admitted_at):
            if s not in self._running:
                continue  # preempted below
            last_pos = min(len(s.tokens) - 1 + (ahead or self.chunk), s.limit() - 1)  # positions written: < last_pos
            extra = -(-last_pos // ps) - len(s.pages)
            while extra > self.pages.available():
                victim = max(self._running, key=lambda v: v.admitted_at)
                self._preempt(victim)
                if victim is s:
                    break
            if s in self._running and extra > 0:
                s.pages += self.pages.allocate(extra)

    def _preempt(self, s: Sequence) -> None:
        """Release a running row's pages (its full pages stay cached) and put it back at the head of the queue with
        its tokens so far as its prompt: re-admitted, it is prefilled (mostly from the cache) and continues."""
        self._running.remove(s)
        self.pages.register(s.tokens, s.pages, s.cached, s.namespace)
        self.pages.release(s.pages)
        self._release_slot(s)
        s.pages, s.cached = [], 0
        self.counts["preempted"] += 1
        self.metrics.preempted()
        with self._cv:
            self._waiting.appendleft(s)

    def _batch(self, ahead: int | None = None):
        """The running rows, each given the pages its next `ahead` tokens need (`_pages_for_chunk`), in admission
        order, with their batch bucket, table-width bucket and sampling program; None if none is left running."""
        self._pages_for_chunk(ahead)
        seqs = sorted(self._running, key=lambda s: s.admitted_at)
        if not seqs:
            return None
        return (seqs, _bucket(len(seqs), self.batch_buckets), _bucket(max(len(s.pages) for s in seqs), self.widths),
                kinds_for([s.req.sampling for s in seqs], self.cfg.vocab_size))

    def _decode_round(self) -> None:
        batch = self._batch()
        if batch is None:
            return
        seqs, b, w, kinds = batch
        out = self._decode_call(seqs, b, w, kinds)
        self.counts["decode_steps"] += self.chunk
        self.counts["row_forwards"] += sum(self._take(seqs, out))

    def _take(self, seqs: list[Sequence], out: np.ndarray) -> list[int]:
        """Record each row's new tokens [B, T] (-1: none) up to its finish, hand them out; the count taken per row."""
        taken = []
        for i, s in enumerate(seqs):
            new: list[int] = []
            reason = None
            for tok in out[i]:
                if tok < 0:
                    break
                new.append(int(tok))
                reason = s.record(tok)
                if reason is not None:
                    break
            s.cached = len(s.tokens) - 1
            if reason is not None:
                self._running.remove(s)
            taken.append(len(new))
            self._emit(s, new, reason)
        self.counts["decode_tokens"] += sum(taken)
        return taken

    # -- speculative decoding --
    def _spec_round(self) -> None:
        """Draft for every running row, then one verify step (a target forward over each row's newest token and its
        draft); when no row has a draft, one plain decode step (or a chunk, while every row backs off). With
        `Speculation.gate`, a round first weighs the two on this machine's measured call times: the tokens a verify
        step is expected to give (each row's recent gain) per second against a plain decode chunk's; where the chunk
        wins it runs instead (every few such rounds a verify step still runs, so gains and times stay current).
        The text is the same either way (programs.verify); only the forwards it takes change."""
        if self.spec.on_device:
            self._device_spec_round()
            return
        k = self.spec.k
        batch = self._batch(max(k + 1, self.chunk))
        if batch is None:
            return
        seqs, b, w, kinds = batch
        room = [s.req.max_new - s.num - 1 for s in seqs]  # a verify step adds drafts + 1 tokens
        tried = [s.spec.backoff == 0 and r > 0 for s, r in zip(seqs, room)]  # rows asked for a draft this round
        if any(tried) and not self._verify_pays(seqs, room, b, w):
            self._spec_decode(seqs, b, w, kinds, self.chunk)
            return
        t0, c0 = time.perf_counter(), self._compiles
        drafts = self.proposer.drafts(seqs, room)
        if not any(drafts):
            for s, asked in zip(seqs, tried):
                if asked:
                    spec_mod.note_gain(s.spec, 0)
            every_row_waits = min(s.spec.backoff for s in seqs) >= self.chunk
            self._spec_decode(seqs, b, w, kinds, self.chunk if every_row_waits or self._chunk_pays(b, w) else 1,
                              drafted=True)
            return
        t = _bucket(1 + max(len(d) for d in drafts), self.spec.verify_widths())
        out = self._verify_call(seqs, drafts, b, w, t, kinds)
        self._timed(("verify", b, w, t), time.perf_counter() - t0, c0)
        self._since_verify = 0
        accepted = [int(np.sum(out[i] >= 0)) - 1 for i in range(len(seqs))]
        for s, d, a, asked in zip(seqs, drafts, accepted, tried):
            spec_mod.update(s.spec, len(d), a, k, self.spec.adaptive)
            if asked:
                spec_mod.note_gain(s.spec, a)
        nd, na = sum(map(len, drafts)), sum(accepted)
        self.counts["spec_drafted"] += nd
        self.counts["spec_accepted"] += na
        self.counts["verify_steps"] += 1
        self.counts["row_forwards"] += len(seqs)
        self.metrics.speculated(nd, na)
        self._take(seqs, out)
        self.proposer.after(seqs, [len(d) for d in drafts], accepted)

    def _device_spec_round(self) -> None:
        """`chunk` rounds of prompt lookup and verification inside one device call (programs.speculate): no host
        round trip between a round's accepted tokens and the next round's draft, and each round picks its own width
        on the device. Where a plain decode chunk is expected to give more (`_speculation_pays`), it runs instead."""
        batch = self._batch(self.chunk * (self.spec.k + 1))
        if batch is None:
            return
        seqs, b, w, kinds = batch
        t0, c0 = time.perf_counter(), self._compiles
        if not self._speculation_pays(seqs, b, w):
            n0 = self.counts["decode_tokens"]
            self._spec_decode(seqs, b, w, kinds, self.chunk)
            self._note_rate("chunk", b, w, self.counts["decode_tokens"] - n0, time.perf_counter() - t0, c0)
            return
        self._since_verify = 0
        before = [len(s.tokens) for s in seqs]
        rows, st = self._speculate_call(seqs, b, w, kinds)
        hist, lengths = np.asarray(rows.hist), np.asarray(rows.lengths)
        out = np.full((b, max(1, int(np.max(lengths[: len(seqs)] + 1 - np.asarray(before))))), -1, np.int32)
        for i, (s, n0) in enumerate(zip(seqs, before)):
            new = hist[i, n0: lengths[i] + 1]
            out[i, : len(new)] = new
            sp = s.spec
            sp.k, sp.backoff, sp.misses = int(rows.k[i]), int(rows.backoff[i]), int(rows.misses[i])
            sp.drafted += int(st.drafted[i])
            sp.accepted += int(st.accepted[i])
            sp.verifies += int(st.forwards[i])
        nd, na = int(np.sum(st.drafted)), int(np.sum(st.accepted))
        self.counts["spec_drafted"] += nd
        self.counts["spec_accepted"] += na
        self.counts["verify_steps"] += int(np.max(st.verifies))
        self.counts["decode_steps"] += int(np.max(st.forwards) - np.max(st.verifies))
        self.counts["row_forwards"] += int(np.sum(st.forwards))
        self.metrics.speculated(nd, na)
        self._note_rate("speculate", b, w, sum(self._take(seqs, out)), time.perf_counter() - t0, c0)

    def _speculation_pays(self, seqs: list[Sequence], b: int, w: int) -> bool:
        """Whether the next call should speculate rather than run a plain decode chunk: when some row may draft
        within the call's rounds (its backoff ends before they do; a plain chunk for a row that backs off one round
        would skip drafting for a whole chunk) and, gated, when speculating calls have lately given at least the
        tokens per second plain chunks gave at this batch and table width (`_rates`: each mode's running rate over
        its recent calls, host work included).
        Each mode is tried before the rates decide, and a plain chunk learns nothing of the drafts, so after
        GATE_PROBE plain chunks in a row a speculating call runs anyway."""
        if not any(s.spec.backoff < self.chunk and s.req.max_new - s.num > 1 for s in seqs):
            return False  # no row may draft in the call's rounds
        if not self.spec.gate or self._since_verify >= GATE_PROBE:
            return True
        spec, chunk = self._rates.get(("speculate", b, w)), self._rates.get(("chunk", b, w))
        return spec is None or (chunk is not None and spec >= chunk)

    def _note_rate(self, mode: str, b: int, w: int, tokens: int, seconds: float, compiles_before: int) -> None:
        """A call's tokens per second into its mode's running rate (a call that compiled is not counted)."""
        if self._compiles != compiles_before or seconds <= 0:
            return
        old = self._rates.get((mode, b, w))
        self._rates[(mode, b, w)] = tokens / seconds if old is None else 0.5 * old + 0.5 * tokens / seconds

    def _speculate_call(self, rows: list[Sequence | None], b: int, w: int, kinds):
        """programs.speculate on a batch (None: padding) -> the rows and the call's stats, on the host."""
        ps, spec = self.page_size, self.spec
        pages = np.full((b, w), self.num_pages, np.int32)
        hist = np.full((b, w * ps), -1, np.int32)
        lengths, num, k, backoff, misses = (np.zeros(b, np.int32) for _ in range(5))
        done = np.ones(b, bool)
        for i, s in enumerate(rows):
            if s is None:
                continue
            pages[i, : len(s.pages)] = s.pages
            hist[i, : len(s.tokens)] = s.tokens
            lengths[i], num[i], done[i] = len(s.tokens) - 1, s.num, False
            k[i], backoff[i], misses[i] = s.spec.k, s.spec.backoff, s.spec.misses
        row, batch = ("cache_batch",), ("cache_batch", None)
        r = programs.SpecRows(self._place(pages, batch), self._place(lengths, row), self._place(hist, batch),
                              self._place(num, row), self._place(done, row), self._place(k, row),
                              self._place(backoff, row), self._place(misses, row))
        self._pool, r, st = programs.speculate(
            self.cfg, kinds, self.params, self._pool, r, controls(rows, b, self._place), self._lora_rows(rows, b),
            rounds=self.chunk, k=spec.k, ngram=(spec.min_ngram, spec.max_ngram), widths=spec.round_widths(),
            adaptive=spec.adaptive)
        return jax.device_get((r, st))

    def _spec_decode(self, seqs: list[Sequence], b: int, w: int, kinds, steps: int, drafted: bool = False) -> None:
        """A plain decode call inside speculative decoding (no row drafted, or the gate chose it): backoffs count
        its steps (the proposer already counted one round when it was asked for drafts)."""
        t0, c0 = time.perf_counter(), self._compiles
        out = self._decode_call(seqs, b, w, kinds, steps=steps)
        self._timed(("decode", b, w, steps), time.perf_counter() - t0, c0)
        self._since_verify += 1
        for s in seqs:
            s.spec.backoff = max(0, s.spec.backoff - (steps - 1 if drafted else steps))
        self.counts["decode_steps"] += steps
        self.counts["row_forwards"] += sum(self._take(seqs, out))
        self.proposer.after(seqs, [0] * len(seqs), [0] * len(seqs))

    def _timed(self, key: tuple, seconds: float, compiles_before: int) -> None:
        """A call's wall time into its running estimate; a call that compiled is not counted."""
        if self._compiles != compiles_before:
            return
        n, est = self._call_times.get(key, (0, 0.0))
        self._call_times[key] = (n + 1, seconds if n == 0 else 0.8 * est + 0.2 * seconds)

    def _time_calls(self, b: int, w: int) -> None:
        """Time the (compiled) greedy decode and verify programs at b rows, table width w, into the gate's table."""
        rows = [None] * b
        for steps in (self.chunk, 1):
            t0, c0 = time.perf_counter(), self._compiles
            self._decode_call(rows, b, w, GREEDY_KINDS, steps=steps)
            self._timed(("decode", b, w, steps), time.perf_counter() - t0, c0)
        for t in self.spec.verify_widths():
            t0, c0 = time.perf_counter(), self._compiles
            self._verify_call(rows, [[]] * b, b, w, t, GREEDY_KINDS)
            self._timed(("verify", b, w, t), time.perf_counter() - t0, c0)

    def _chunk_pays(self, b: int, w: int) -> bool:
        """Gated, with no draft this round: whether a chunk beats one decode step per token by more than a quarter
        (on a CPU a call's fixed cost is several steps' worth; elsewhere one step keeps the next round's drafts)."""
        n1, t1 = self._call_times.get(("decode", b, w, 1), (0, 0.0))
        nc, tc = self._call_times.get(("decode", b, w, self.chunk), (0, 0.0))
        return self.spec.gate and n1 > 0 and nc > 0 and t1 > 1.25 * tc / self.chunk

    def _verify_pays(self, seqs: list[Sequence], room: list[int], b: int, w: int) -> bool:
        """Whether a verify round is expected to give more tokens per second than a decode chunk of `self.chunk`
        steps (see `_spec_round`). Unmeasured shapes are tried first: verify, then the chunk."""
        if not self.spec.gate or self._since_verify >= GATE_PROBE:
            return True
        t = _bucket(1 + max(min(s.spec.k, r) for s, r in zip(seqs, room)), self.spec.verify_widths())
        nv, tv = self._call_times.get(("verify", b, w, t), (0, 0.0))
        nd, td = self._call_times.get(("decode", b, w, self.chunk), (0, 0.0))
        if nv == 0:
            return True
        if nd == 0:
            return False
        gain_verify = sum(1 + (s.spec.gain if s.spec.backoff == 0 and r > 0 else 0.0) for s, r in zip(seqs, room))
        gain_chunk = sum(min(self.chunk, s.req.max_new - s.num) for s in seqs)
        return gain_verify / tv >= gain_chunk / td

    def _verify_call(self, rows: list[Sequence | None], drafts: list[list[int]], b: int, w: int, t: int,
                     kinds) -> np.ndarray:
        pages = np.full((b, w), self.num_pages, np.int32)
        tokens = np.zeros((b, t), np.int32)
        lengths, counts, num = (np.zeros(b, np.int32) for _ in range(3))
        for i, (s, d) in enumerate(zip(rows, drafts)):
            if s is None:
                continue
            pages[i, : len(s.pages)] = s.pages[:w]
            tokens[i, 0] = s.tokens[-1]
            tokens[i, 1: 1 + len(d)] = d
            lengths[i], counts[i], num[i] = len(s.tokens) - 1, 1 + len(d), s.num
        self._pool, out = programs.verify(
            self.cfg, kinds, self.params, self._pool, self._place(tokens, ("cache_batch", None)),
            self._place(lengths, ("cache_batch",)), self._place(counts, ("cache_batch",)),
            self._place(pages, ("cache_batch", None)), self._place(num, ("cache_batch",)),
            controls(rows, b, self._place), self._lora_rows(rows, b))
        return np.asarray(jax.device_get(out))

    def _lora_rows(self, rows: list[Sequence | None], b: int):
        """The programs' `lora` argument: the bank and each row's slot (-1: the base; padding rows too), or None
        when the engine serves no adapters."""
        if self.lora is None:
            return None
        ids = np.full(b, -1, np.int32)
        for i, s in enumerate(rows):
            if s is not None:
                ids[i] = s.slot
        return self.lora.bank(), self._place(ids, ("cache_batch",))

    def _release_slot(self, s: Sequence) -> None:
        if s.slot >= 0:
            self.lora.release(s.slot)
            s.slot = -1

    def _decode_call(self, rows: list[Sequence | None], b: int, w: int, kinds, steps: int | None = None) -> np.ndarray:
        pages = np.full((b, w), self.num_pages, np.int32)
        lengths, last, num = (np.zeros(b, np.int32) for _ in range(3))
        done = np.ones(b, bool)
        for i, s in enumerate(rows):
            if s is None:
                continue
            pages[i, : len(s.pages)] = s.pages
            lengths[i], last[i], num[i], done[i] = len(s.tokens) - 1, s.tokens[-1], s.num, False
        r = programs.Rows(self._place(pages, ("cache_batch", None)), self._place(lengths, ("cache_batch",)),
                          self._place(last, ("cache_batch",)), self._place(num, ("cache_batch",)),
                          self._place(done, ("cache_batch",)))
        self._pool, out, _ = programs.decode(self.cfg, kinds, self.params, self._pool, r, controls(rows, b, self._place),
                                             self._lora_rows(rows, b), steps=steps or self.chunk)
        return np.asarray(jax.device_get(out))


__all__ = ["DEFAULT_PAGE_SIZE", "DEFAULT_PREFILL_CHUNK", "Engine", "QueueFull", "Request", "SamplingParams",
           "prefill_buckets", "table_widths"]
