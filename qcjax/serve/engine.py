"""The serving engine: continuous batching over one KV cache, on the sampler's pure pieces.

    engine = Engine(cfg, params, slots=16, max_len=8192)
    engine.warmup(); engine.start()
    engine.submit([Request(tokens, max_new=64, sampling=..., seed=1, stop_ids=..., on_event=callback)])

A fixed set of `slots` rows shares one decode state (`qcjax.sampler.DecodeState`: the model's stacked KV cache with a
length per row). One engine thread owns every device call. Between decode chunks (`sampler.decode`, `chunk` steps at
a time) it frees the slots of cancelled requests, prefills waiting requests in batches (`sampler.plan` buckets the
prompt length, `sampler.start` runs `prefill` / `prefill_chunked`) and writes them into free slots
(`sampler.insert_rows`), so new requests join running ones without waiting for them. Requests beyond the free slots
wait in a bounded queue; beyond that `submit` raises `QueueFull` (the API's 429).

Every program has a fixed shape set: decode on [slots, max_len] with one of two filter kinds (all-greedy rows: a
bare argmax; otherwise sampling with temperature and top-p), prefill on (rows, prompt bucket) pairs with rows a
power of two <= prefill_batch and rows x bucket <= prefill_tokens (a lone prompt of any bucket is allowed).
`warmup` runs each once, so no request mix compiles anything afterwards (`stats()["compiles_after_warmup"]`).

Tokens go back through each request's `on_event(tokens, finish_reason)`, called on the engine thread: new token ids
(a stop token is never included), then once a finish reason: "stop" (a stop token), "length", "cancelled" (by
`cancel`) or "error".
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from qcjax import sampler as S
from qcjax.config import ModelConfig
from qcjax.sharding import logical_to_spec

log = logging.getLogger("qcjax.serve")

GREEDY_KINDS = S.FilterKinds()
# The one sampling program: temperature and top-p per row (top-p 1 and temperature 0 switch them off per row).
SAMPLE_KINDS = S.FilterKinds(sample=True, top_p=True)
STOP_WIDTH = 16  # stop-token ids per row (the stop array's fixed width: a wider one would be a new program)


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller should retry later (HTTP 429)."""


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to generate. on_event(tokens, finish_reason) is called on the engine thread: with new token ids
    (finish_reason None), then once with [] or the last ids and the finish reason."""

    tokens: list[int]
    max_new: int
    sampling: S.SamplingParams = S.GREEDY
    seed: int = 0
    stop_ids: Sequence[int] = ()
    on_event: Callable[[list[int], str | None], None] | None = None
    cancelled: bool = False
    finished: bool = False
    submitted: float = 0.0  # time.perf_counter() at submit

    def _emit(self, tokens: list[int], finish: str | None = None) -> None:
        if self.finished:
            return
        self.finished = finish is not None
        if self.on_event is not None:
            try:
                self.on_event(tokens, finish)
            except Exception:  # a consumer's bug must not stop the engine
                log.exception("on_event failed")


def prefill_shapes(slots: int, max_len: int, prefill_batch: int, prefill_tokens: int) -> list[tuple[int, int]]:
    """Every (rows, prompt bucket) a prefill may run with: rows a power of two <= min(prefill_batch, slots), the
    bucket a power of two from MIN_PREFILL_BUCKET up to the one holding a prompt of max_len - 1 tokens, and
    rows x bucket <= prefill_tokens unless rows == 1 (a lone prompt of any length always runs)."""
    buckets, b = [], S.MIN_PREFILL_BUCKET
    while b <= S.prefill_bucket(max_len - 1):
        buckets.append(b)
        b *= 2
    rows = [1 << k for k in range(16) if 1 << k <= min(prefill_batch, slots)]
    return [(r, t) for r in rows for t in buckets if r == 1 or r * t <= prefill_tokens]


class Engine:
    """Continuous batching on one decode state; see the module docstring."""

    def __init__(self, cfg: ModelConfig, params: Any, *, slots: int = 16, max_len: int = 8192,
                 cache_dtype: Any = jnp.bfloat16, mesh=None, chunk: int = 8, max_queue: int = 64,
                 prefill_batch: int = 4, prefill_tokens: int = 4096, prefill_chunk: int = S.DEFAULT_PREFILL_CHUNK):
        for name, v, lo in (("slots", slots, 1), ("max_len", max_len, 2), ("chunk", chunk, 1), ("max_queue", max_queue, 0),
                            ("prefill_batch", prefill_batch, 1), ("prefill_tokens", prefill_tokens, 1)):
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name}={v!r}: must be an integer >= {lo}")
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len={max_len}: more than the model's context of {cfg.max_position_embeddings}")
        self.prefill_chunk = S.check_prefill_chunk(prefill_chunk)
        self.cfg = cfg.replace(max_position_embeddings=max_len)  # plan() checks prompt + max_new against it
        self.mesh = mesh
        self.params = S.place_params(self.cfg, params, mesh)
        self.slots, self.max_len, self.chunk, self.max_queue = int(slots), int(max_len), int(chunk), int(max_queue)
        self.prefill_batch, self.prefill_tokens = int(prefill_batch), int(prefill_tokens)
        self.cache_dtype = jnp.dtype(cache_dtype)
        self.out_len = self.max_len  # a row never generates more than max_len - 1 tokens

        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancel: set[Request] = set()
        self._closing = False
        self._thread: threading.Thread | None = None
        # slot tables (engine thread only)
        self._req: list[Request | None] = [None] * self.slots
        self._seen = np.zeros(self.slots, np.int64)
        self._sampling = [S.GREEDY] * self.slots
        self._seeds = np.zeros(self.slots, np.uint32)
        self._max_new = np.zeros(self.slots, np.int32)
        self._stop = np.full((self.slots, STOP_WIDTH), -1, np.int32)
        self._state: S.DecodeState | None = None
        self._controls: S.Controls | None = None
        # counters
        self._compiles = 0
        self._compiles_at_warmup: int | None = None
        self._counts = collections.Counter()
        self._engine_thread_id: int | None = None
        jax.monitoring.register_event_duration_secs_listener(self._on_jax_event)

    # ---- public, any thread ------------------------------------------------------------------------------------------
    def validate(self, r: Request) -> None:
        """Raise ValueError (a clear message) for a request the engine cannot run."""
        if len(r.stop_ids) > STOP_WIDTH:
            raise ValueError(f"{len(r.stop_ids)} stop tokens: at most {STOP_WIDTH}")
        S.plan(self.cfg, [r.tokens], r.max_new, r.sampling, [tuple(r.stop_ids)], r.seed)

    def submit(self, reqs: Sequence[Request]) -> None:
        """Queue requests (all or none). ValueError: a request the engine cannot run; QueueFull: no room now."""
        for r in reqs:
            self.validate(r)
        with self._cv:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(reqs) > self.max_queue + self._free_estimate():
                raise QueueFull(f"{len(self._waiting)} requests are waiting for one of {self.slots} slots (the queue "
                                f"holds {self.max_queue}); retry later")
            now = time.perf_counter()
            for r in reqs:
                r.submitted = now
                self._waiting.append(r)
            self._counts["submitted"] += len(reqs)
            self._cv.notify_all()

    def cancel(self, r: Request) -> None:
        """Stop a request now (a client went away, or its text hit a stop string): its slot frees before the next
        decode chunk; its on_event gets finish_reason "cancelled" unless it already finished."""
        with self._cv:
            if r.finished:
                return
            r.cancelled = True
            self._cancel.add(r)
            self._cv.notify_all()

    def stats(self) -> dict:
        with self._cv:
            busy = sum(r is not None for r in self._req)
            return {"slots": self.slots, "busy": busy, "waiting": len(self._waiting), "max_queue": self.max_queue,
                    "max_len": self.max_len, "compiles": self._compiles,
                    "compiles_after_warmup": (None if self._compiles_at_warmup is None
                                              else self._compiles - self._compiles_at_warmup),
                    **{k: self._counts[k] for k in ("submitted", "completed", "cancelled", "errors")}}

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
        with contextlib.suppress(ValueError):
            jax.monitoring.unregister_event_duration_listener(self._on_jax_event)

    def warmup(self) -> float:
        """Compile (by running once) every program a request mix can need: each prefill shape, both decode kinds,
        the host-set `done` array. Call before `start` (it runs on the calling thread); returns the seconds taken."""
        t0 = time.perf_counter()
        self._engine_thread_id = threading.get_ident()
        with self._mesh_ctx():
            self._reset()
            self._controls = self._slot_controls()
            for rows, bucket in prefill_shapes(self.slots, self.max_len, self.prefill_batch, self.prefill_tokens):
                n = bucket // 2 + 1 if bucket > S.MIN_PREFILL_BUCKET else 1  # a prompt length in this bucket
                self._prefill_into([Request([1] * n, max_new=1) for _ in range(rows)], list(range(rows)))
                self._collect()  # one token each: all done at prefill
            for sampling in (S.SamplingParams(temperature=1.0, top_p=0.9), S.GREEDY):
                self._prefill_into([Request([1], max_new=self.chunk + 2, sampling=sampling)], [0])
                self._collect()
                self._decode()
                self._collect()
                self._finish(0, "cancelled")
                self._set_done_from_host()
                self._decode()  # every slot free: the all-padding decode after a host-set `done`
                self._collect()
        self._compiles_at_warmup = self._compiles
        self._counts.clear()
        self._engine_thread_id = None
        return time.perf_counter() - t0

    # ---- the engine thread ----------------------------------------------------------------------------------------
    def _on_jax_event(self, event: str, duration: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration" and threading.get_ident() == self._engine_thread_id:
            self._compiles += 1

    def _mesh_ctx(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _free_estimate(self) -> int:
        return sum(r is None for r in self._req)

    def _reset(self) -> None:
        self._state = S.idle_state(self.cfg, slots=self.slots, cache_len=self.max_len, cache_dtype=self.cache_dtype,
                                   out_len=self.out_len)
        self._req = [None] * self.slots

    def _run(self) -> None:
        self._engine_thread_id = threading.get_ident()
        with self._mesh_ctx():
            if self._state is None:
                self._reset()
                self._controls = self._slot_controls()
            while True:
                with self._cv:
                    while not (self._closing or self._waiting or self._cancel or any(self._req)):
                        self._cv.wait()
                    if self._closing:
                        break
                try:
                    self._step()
                except Exception as e:  # a device failure: fail the running requests, keep serving
                    log.exception("engine step failed")
                    for i, r in enumerate(self._req):
                        if r is not None:
                            self._finish(i, "error")
                            self._counts["errors"] += 1
                    self._reset()
                    self._controls = self._slot_controls()
                    del e
            for i, r in enumerate(self._req):
                if r is not None:
                    self._finish(i, "cancelled")
            with self._cv:
                waiting, self._waiting = list(self._waiting), collections.deque()
            for r in waiting:
                r._emit([], "cancelled")

    def _step(self) -> None:
        """One round: free cancelled slots, admit waiting requests, one decode chunk, hand out tokens."""
        with self._cv:
            cancels, self._cancel = self._cancel, set()
            for r in [r for r in self._waiting if r in cancels]:
                self._waiting.remove(r)
                r._emit([], "cancelled")
                self._counts["cancelled"] += 1
        freed = [i for i, r in enumerate(self._req) if r is not None and r in cancels]
        for i in freed:
            self._finish(i, "cancelled")
        if freed:
            self._set_done_from_host()
        self._admit()
        if any(self._req):
            self._decode()
            self._collect()

    def _admit(self) -> int:
        """Prefill waiting requests into free slots (FIFO) before the next decode chunk: batches of up to
        prefill_batch prompts and prefill_tokens padded tokens each, until the slots, the queue or this round's
        prefill_tokens budget run out (at least one batch per round, so a long prompt always gets in). New requests
        get their first token now; running ones wait at most one round's prefill budget."""
        admitted, spent = 0, 0
        while spent < self.prefill_tokens:
            free = [i for i, r in enumerate(self._req) if r is None]
            with self._cv:
                take: list[Request] = []
                longest = 0
                for r in self._waiting:
                    n = len(take) + 1
                    lng = max(longest, len(r.tokens))
                    rows, bucket = 1 << (n - 1).bit_length(), S.prefill_bucket(lng)
                    if n > len(free) or rows > self.prefill_batch or (n > 1 and rows * bucket > self.prefill_tokens):
                        break
                    take.append(r)
                    longest = lng
                if admitted and take and spent + (1 << (len(take) - 1).bit_length()) * S.prefill_bucket(longest) \
                        > self.prefill_tokens:
                    take = []  # over this round's budget: after the next decode chunk
                for r in take:
                    self._waiting.popleft()
            if not take:
                break
            self._prefill_into(take, free[: len(take)])
            self._collect()  # their first tokens go out now
            admitted += len(take)
            spent += (1 << (len(take) - 1).bit_length()) * S.prefill_bucket(longest)
        return admitted

    def _prefill_into(self, reqs: list[Request], slots: list[int]) -> None:
        p = S.plan(self.cfg, [r.tokens for r in reqs], [r.max_new for r in reqs], [r.sampling for r in reqs],
                   [tuple(r.stop_ids) for r in reqs], [r.seed for r in reqs])
        rows = p.tokens.shape[0]
        stop = np.full((rows, STOP_WIDTH), -1, np.int32)
        stop[: p.stop.shape[0], : p.stop.shape[1]] = p.stop[:rows]
        p = dataclasses.replace(p, batch=rows, cache_len=p.tokens.shape[1], out_len=self.out_len, kinds=SAMPLE_KINDS,
                                sampling=p.sampling[:rows], max_new=p.max_new[:rows], stop=stop, seeds=p.seeds[:rows])
        new = S.start(self.cfg, self.params, p, S.controls_for(p, self.mesh), self.cache_dtype, self.mesh,
                      self.prefill_chunk)
        where = np.full(rows, self.slots, np.int32)  # batch padding rows: dropped
        where[: len(slots)] = slots
        self._state = S.insert_rows(self._state, new, self._on_device(where, (None,)))
        for r, i in zip(reqs, slots):
            self._req[i] = r
            self._seen[i] = 0
            self._sampling[i], self._seeds[i], self._max_new[i] = r.sampling, r.seed, r.max_new
            self._stop[i] = -1
            self._stop[i, : len(r.stop_ids)] = list(r.stop_ids)
        self._controls = self._slot_controls()

    def _slot_controls(self) -> S.Controls:
        """The slot table's per-row constants on the device (controls_for over a plan of the slots)."""
        table = S.Plan(n=self.slots, batch=self.slots, tokens=np.zeros((1, 1), np.int32),
                       lengths=np.zeros(1, np.int32), cache_len=self.max_len, out_len=self.out_len,
                       kinds=SAMPLE_KINDS, sampling=list(self._sampling), max_new=self._max_new.copy(),
                       stop=self._stop.copy(), seeds=self._seeds.copy())
        return S.controls_for(table, self.mesh)

    def _decode(self) -> None:
        busy = [r for r in self._req if r is not None]
        kinds = SAMPLE_KINDS if any(not r.sampling.greedy for r in busy) else GREEDY_KINDS
        self._state = S.decode(self.cfg, kinds, self.params, self._state, self._controls, steps=self.chunk)

    def _set_done_from_host(self) -> None:
        """Mark free slots done on the device (cancelled rows stop; `done` is otherwise only set by the device)."""
        done = np.asarray(jax.device_get(self._state.done)).copy()
        done[[i for i, r in enumerate(self._req) if r is None]] = True
        self._state = self._state._replace(done=self._on_device(done, ("cache_batch",)))

    def _on_device(self, x: np.ndarray, names: tuple) -> jax.Array:
        """A host array placed as the sampler places its inputs (uncommitted on one device, by the logical-axis
        rules on a mesh), so the programs see the same argument kinds as at warm-up (no recompilation)."""
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, NamedSharding(self.mesh, logical_to_spec(names, np.shape(x), self.mesh)))

    def _collect(self) -> None:
        """Hand each busy slot its new tokens; finish the slots whose rows are done."""
        out, num, done = jax.device_get((self._state.out, self._state.num, self._state.done))
        for i, r in enumerate(self._req):
            if r is None:
                continue
            new = out[i, self._seen[i]: num[i]].tolist()
            self._seen[i] = num[i]
            if done[i]:
                stopped = bool(new) and new[-1] in set(self._stop[i].tolist()) - {-1}
                self._finish(i, "stop" if stopped else "length", new[:-1] if stopped else new)
            elif new:
                r._emit(new)

    def _finish(self, i: int, reason: str, tokens: list[int] | None = None, count: bool = True) -> None:
        r = self._req[i]
        self._req[i] = None
        self._sampling[i] = S.GREEDY
        self._max_new[i] = 0
        if count:
            self._counts["cancelled" if reason == "cancelled" else "completed"] += 1
        r._emit(tokens or [], reason)
