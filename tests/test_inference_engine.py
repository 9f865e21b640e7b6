"""qcjax.inference.Engine without HTTP: the shapes warm-up compiles, the page pool's invariants under random mixes of
submit / cancel / finish / evict, one-line refusals of requests that can never fit, and on a tensor-parallel mesh the
engine's threaded serving gives the tokens of generate on one device with nothing compiled after warm-up."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcjax.config import ModelConfig
from qcjax.inference import GREEDY, Engine, QueueFull, Request, SamplingParams, generate
from qcjax.inference.engine import prefill_buckets, table_widths
from qcjax.inference.pages import OutOfPages, PagePool

from conftest import hf_model, params_from_hf

CFG = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  tie_word_embeddings=False, rope_theta=1e6, max_position_embeddings=64, dtype="float32",
                  param_dtype="float32")


def test_bucket_sets_are_powers_of_four_up_to_the_limit():
    assert prefill_buckets(512) == [16, 64, 256, 512]
    assert prefill_buckets(16) == [16]
    assert table_widths(8192 // 16, 16) == [16, 64, 256, 512]  # 256, 1K, 4K tokens, then the context
    assert table_widths(4, 16) == [4]


def test_prefill_shapes_stay_within_the_token_budget():
    params = jax.eval_shape(lambda: __import__("qcjax").init_params(CFG, jax.random.key(0)))
    e = Engine(CFG, params, max_rows=4, max_len=64, page_size=16, prefill_batch=4, prefill_chunk=64,
               prefill_tokens=64)
    shapes = e.prefill_shapes()
    assert all(p == 1 or p * t <= 64 for p, t, _ in shapes)
    assert {(p, t) for p, t, _ in shapes} == {(1, 16), (2, 16), (4, 16), (1, 64)}
    assert {w for _, t, w in shapes if t == 64} == {4}  # a fresh 64-token prompt fills a 4-page table: the context
    e.stop()


# ---- the page pool's invariants ---------------------------------------------------------------------------------
def test_page_pool_reference_counts_return_to_zero_under_random_mixes():
    """Random rows submit (with shared prefixes), grow, finish or are cancelled, and the pool evicts idle cached pages
    under pressure: after every operation each page is free, held or cached-idle (exactly one), no two rows write one
    page, and when every row is gone nothing is held."""
    rng = np.random.default_rng(0)
    pool = PagePool(num_pages=40, page_size=4)
    bases = [rng.integers(0, 50, 30).tolist() for _ in range(3)]
    rows = []  # [tokens, pages, written]
    for _ in range(3000):
        op = rng.integers(0, 4)
        if op == 0 and len(rows) < 8:  # submit: a shared base and a tail
            toks = bases[rng.integers(0, 3)][: rng.integers(1, 30)] + rng.integers(0, 50, rng.integers(0, 6)).tolist()
            hit = pool.lookup(toks, len(toks) - 1)
            need = -(-len(toks) // 4) - len(hit)
            if need > pool.available():
                pool.release(hit)
                continue
            pages = hit + pool.allocate(need)
            rows.append([toks, pages, len(toks)])
            pool.register(toks, pages, len(toks))
        elif op == 1 and rows:  # grow a row by a few tokens
            r = rows[rng.integers(0, len(rows))]
            r[0] += rng.integers(0, 50, rng.integers(1, 6)).tolist()
            extra = -(-len(r[0]) // 4) - len(r[1])
            try:
                r[1] += pool.allocate(max(0, extra))
            except OutOfPages:
                continue
            r[2] = len(r[0])
            pool.register(*r)
        elif op in (2, 3) and rows:  # finish or cancel
            r = rows.pop(rng.integers(0, len(rows)))
            pool.register(*r)
            pool.release(r[1])
        pool.check()
        writable = [p for toks, pages, n in rows for i, p in enumerate(pages) if (i + 1) * 4 > n]
        assert len(writable) == len(set(writable)), "two rows write one page"
        shared = {p for toks, pages, n in rows for p in pages if pool.ref[p] > 1}
        assert not shared & set(writable), "a shared page is still being written"
    for r in rows:
        pool.release(r[1])
    pool.check()
    assert pool.used == 0 and all(c == 0 for c in pool.ref)


def test_requests_that_can_never_fit_are_refused_naming_the_limit():
    params = jax.eval_shape(lambda: __import__("qcjax").init_params(CFG, jax.random.key(0)))
    e = Engine(CFG, params, max_rows=2, max_len=64, page_size=8, num_pages=4)
    with pytest.raises(ValueError, match="needs 70 positions, more than the context of 64"):
        e.validate(Request([1] * 60, 10))
    with pytest.raises(ValueError, match="needs 5 pages of 8 tokens; the KV cache holds 4"):
        e.validate(Request([1] * 30, 10))
    with pytest.raises(ValueError, match="at most 16"):
        e.validate(Request([1], 1, stop_ids=tuple(range(17))))
    e.stop()


def test_a_prompt_whose_bucket_outgrows_the_context_compiles_nothing_after_warmup():
    """max_len 40 (3 pages of 16): a 30-token prompt pads to the 64-token bucket, wider than any row's table; it runs
    on a warmed-up table width, not a fresh 4-page table nobody compiled."""
    params = jax.jit(lambda: __import__("qcjax").init_params(CFG, jax.random.key(0)))()
    e = Engine(CFG, params, max_rows=1, max_len=40, page_size=16, prefill_batch=1, cache_dtype=jnp.float32)
    e.warmup()
    e.submit([Request(list(range(1, 31)), 4)])
    while e.busy:
        e.step()
    assert e.stats()["completed"] == 1 and e.stats()["compiles_after_warmup"] == 0
    e.stop()


def run_all(engine: Engine, reqs: list[Request], timeout: float = 120.0) -> list[tuple[list[int], str]]:
    """Submit and wait: (tokens, finish_reason) per request."""
    got = [([], None) for _ in reqs]
    done = threading.Semaphore(0)

    def on(k):
        def f(toks, fin):
            got[k][0].extend(toks)
            if fin is not None:
                got[k] = (got[k][0], fin)
                done.release()
        return f

    for k, r in enumerate(reqs):
        r.on_event = on(k)
    engine.submit(reqs)
    for _ in reqs:
        assert done.acquire(timeout=timeout)
    return got


@pytest.mark.slow
def test_engine_on_a_tensor_parallel_mesh_equals_generate_on_one_device():
    from qcjax.sharding import make_mesh

    params = params_from_hf(CFG, hf_model(CFG))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG.vocab_size, int(n)).tolist() for n in (3, 20, 9, 14, 1)]
    prompts.append(prompts[1] + [5, 6])  # a prefix-cache hit
    sampling = [GREEDY, SamplingParams(temperature=0.9, top_p=0.8)] * 3
    max_new = [12, 9, 20, 6, 15, 8]
    want = [generate(CFG, params, [p], max_new_tokens=m, sampling=s, seed=i, stop_tokens=[7], cache_dtype=jnp.float32)[0]
            for i, (p, m, s) in enumerate(zip(prompts, max_new, sampling))]

    mesh = make_mesh({"tensor": 2}, devices=jax.devices()[:2])
    engine = Engine(CFG, params, max_rows=2, max_len=32, page_size=8, num_pages=32, cache_dtype=jnp.float32, mesh=mesh,
                    chunk=4, max_queue=4, prefill_batch=2, prefill_chunk=16, prefill_tokens=32)
    engine.warmup()
    engine.start()
    try:
        reqs = [Request(p, m, s, seed, (7,)) for seed, (p, m, s) in enumerate(zip(prompts, max_new, sampling))]
        with pytest.raises(QueueFull):  # 2 free rows + a queue of 4: six wait, seven do not
            engine.submit(reqs + [Request([1], 1)])
        got = run_all(engine, reqs)  # 6 requests on 2 rows: later ones join running decodes
        assert [g[0] for g in got] == [w.tokens for w in want]
        assert [g[1] for g in got] == [w.finish_reason for w in want]
        assert reqs[-1].cached_tokens == 16  # prompt 1's two full pages, still cached (the pool has room)
        stats = engine.stats()
        assert stats["compiles_after_warmup"] == 0 and stats["completed"] == 6 and stats["busy"] == 0
        assert stats["pages_used"] == 0
    finally:
        engine.stop()
