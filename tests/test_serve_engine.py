"""qcjax.serve.engine without HTTP: the prefill shapes warm-up compiles, and on a tensor-parallel mesh the engine
gives the tokens of qcjax.sampler.generate on one device, with nothing compiled after warm-up."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcjax import sampler as S
from qcjax.config import ModelConfig
from qcjax.serve.engine import Engine, QueueFull, Request, prefill_shapes

from conftest import hf_model, params_from_hf

CFG = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  tie_word_embeddings=False, rope_theta=1e6, max_position_embeddings=64, dtype="float32",
                  param_dtype="float32")


def test_prefill_shapes_are_powers_of_two_within_the_token_budget():
    assert prefill_shapes(16, 8192, 4, 4096) == (
        [(1, 1 << k) for k in range(4, 14)] + [(2, 1 << k) for k in range(4, 12)] + [(4, 1 << k) for k in range(4, 11)])
    assert prefill_shapes(1, 64, 4, 4096) == [(1, 16), (1, 32), (1, 64)]  # rows never exceed the slots
    assert prefill_shapes(4, 18, 2, 16) == [(1, 16), (1, 32)]  # a 17-token prompt: bucket 32; 2 x 16 > 16


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
    sampling = [S.GREEDY, S.SamplingParams(temperature=0.9, top_p=0.8)] * 2 + [S.GREEDY]
    max_new = [12, 9, 20, 6, 15]
    want = S.generate(CFG, params, prompts, max_new_tokens=max_new, sampling=sampling, seed=list(range(5)),
                      stop_tokens=[7], cache_dtype=jnp.float32)

    mesh = make_mesh({"tensor": 2}, devices=jax.devices()[:2])
    engine = Engine(CFG, params, slots=2, max_len=32, cache_dtype=jnp.float32, mesh=mesh, chunk=4, max_queue=3,
                    prefill_batch=2, prefill_tokens=32)
    engine.warmup()
    engine.start()
    try:
        reqs = [Request(p, m, s, seed, (7,)) for seed, (p, m, s) in enumerate(zip(prompts, max_new, sampling))]
        with pytest.raises(QueueFull):  # 2 free slots + a queue of 3: five wait, six do not
            engine.submit(reqs + [Request([1], 1)])
        got = run_all(engine, reqs)  # 5 requests on 2 slots: later ones join running decodes
        assert [g[0] for g in got] == [w.tokens for w in want]
        assert [g[1] for g in got] == [w.finish_reason for w in want]
        stats = engine.stats()
        assert stats["compiles_after_warmup"] == 0 and stats["completed"] == 5 and stats["busy"] == 0
    finally:
        engine.stop()
