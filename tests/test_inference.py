"""The inference engine through `generate`: greedy tokens equal transformers' generate (fresh prompts, prefix-cache
hits, chunked prefill, preemption), filters keep to their closed-form sets, seeds reproduce, stops and streaming
behave, and a tensor-parallel mesh gives the same tokens as one device; the decode program's shape."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcjax import sampling as S
from qcjax.config import ModelConfig
from qcjax.inference import GREEDY, SamplingParams, generate, programs, rows
from qcjax.sharding import serving_mesh_shape
from qcjax.text_stream import TextStream

from conftest import hf_model, params_from_hf

# The 0.5B family shape at a shrunken width (14/2 heads, head dim 64, tied) and an untied 7B-like GQA ratio.
CFG_TIED = ModelConfig(vocab_size=384, hidden_size=14 * 64 // 4, intermediate_size=96, num_layers=2, num_heads=14,
                       num_kv_heads=2, head_dim=64, tie_word_embeddings=True, rope_theta=1e6)
CFG_UNTIED = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                         num_kv_heads=2, tie_word_embeddings=False, rope_theta=1e6)
NEW = 40


_MODELS = {}


def hf_and_params(cfg, std=0.08):
    """(cfg, HF model, our params), built once per module (tests share compiled shapes too: batch 4, prompts <= 16,
    outputs <= 32 tokens)."""
    if (cfg, std) not in _MODELS:
        model = hf_model(cfg, std=std)
        _MODELS[cfg, std] = (cfg, model, params_from_hf(cfg, model))
    return _MODELS[cfg, std]


def hf_greedy(model, prompt, n, device="cpu"):
    import torch

    ids = torch.tensor([prompt], device=device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts_of(cfg, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]


@pytest.mark.parametrize("cfg", [CFG_TIED, CFG_UNTIED], ids=["tied-14/2-hd64", "untied-4/2"])
def test_greedy_single_prompt_equals_transformers_generate(cfg):
    cfg, model, params = hf_and_params(cfg)
    prompt = prompts_of(cfg, [11])[0]
    [got] = generate(cfg, params, [prompt], max_new_tokens=NEW, cache_dtype=jnp.float32)
    want = hf_greedy(model, prompt, NEW)
    assert len(set(want)) > 3, "reference output too repetitive to be a meaningful comparison"
    assert got.tokens == want and got.finish_reason == "length"


def test_greedy_batch_of_different_lengths_equals_transformers_per_prompt():
    cfg, model, params = hf_and_params(CFG_TIED)
    prompts = prompts_of(cfg, [5, 16, 1, 12], seed=1)
    limits = [NEW, 33, NEW, 36]
    got = generate(cfg, params, prompts, max_new_tokens=limits, cache_dtype=jnp.float32)
    for p, n, g in zip(prompts, limits, got):
        assert g.tokens == hf_greedy(model, p, n)


def test_greedy_with_the_cpu_kernels_off_equals_transformers(monkeypatch):
    """Without a C++ compiler, on ARM or with QCJAX_CPU_KERNELS=0 every operation runs as XLA: that path equals
    transformers too (prefill and decode), and its programs call none of qcjax's kernels."""
    cfg, model, params = hf_and_params(CFG_TIED)
    monkeypatch.setenv("QCJAX_CPU_KERNELS", "0")
    jax.clear_caches()  # programs this process built with the kernels on would be reused
    try:
        assert "qcjax_" not in _decode_hlo(cfg, params, lowered_only=True)
        assert "qcjax_" not in _prefill_hlo(cfg, params)
        prompts = prompts_of(cfg, [5, 16, 1, 12], seed=1)
        got = generate(cfg, params, prompts, max_new_tokens=NEW, cache_dtype=jnp.float32)
        for p, g in zip(prompts, got):
            assert g.tokens == hf_greedy(model, p, NEW)
    finally:
        jax.clear_caches()


BATCH, WIDTH, PAGE = 4, 4, 16  # the decode program lowered below: 4 rows of up to 64 tokens


def _pool(cfg, pages=BATCH * WIDTH):
    return jax.eval_shape(lambda: programs.init_pool(cfg, num_pages=pages, page_size=PAGE, dtype=jnp.float32))


def _decode_hlo(cfg, params, lowered_only=False):
    ctl = rows.controls([None] * BATCH, BATCH, lambda x, names: jnp.asarray(x))
    i32 = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
    r = programs.Rows(jax.ShapeDtypeStruct((BATCH, WIDTH), jnp.int32), i32, i32, i32,
                      jax.ShapeDtypeStruct((BATCH,), jnp.bool_))
    lowered = programs.decode.lower(cfg, rows.GREEDY_KINDS, params, _pool(cfg), r, ctl, steps=4)
    return lowered.as_text() if lowered_only else lowered.compile()


def _prefill_hlo(cfg, params):
    ctl = rows.controls([None] * 2, 2, lambda x, names: jnp.asarray(x))
    i32 = jax.ShapeDtypeStruct((2,), jnp.int32)
    return programs.prefill.lower(cfg, rows.GREEDY_KINDS, params, _pool(cfg), jax.ShapeDtypeStruct((2, 16), jnp.int32),
                                  i32, i32, jax.ShapeDtypeStruct((2, 1), jnp.int32), i32, ctl).as_text()


def test_decode_runs_a_static_number_of_steps_with_no_data_dependent_loop():
    cfg, _, params = hf_and_params(CFG_TIED)
    hlo = _decode_hlo(cfg, params).as_text()
    whiles = [line for line in hlo.splitlines() if " while(" in line]
    assert whiles  # the step loop and the layer scan inside it
    assert all('"known_trip_count"' in line for line in whiles), [w for w in whiles if "known_trip_count" not in w]


def _abstract_params(cfg):
    from qcjax.model import init_params

    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def test_decode_program_does_not_grow_with_depth():
    """The layers are scanned over the stacked params, as in training: 32 layers lower to the program of 2."""
    size = {n: len(_decode_hlo(CFG_TIED.replace(num_layers=n), _abstract_params(CFG_TIED.replace(num_layers=n)),
                               lowered_only=True)) for n in (2, 32)}
    assert size[32] <= 1.02 * size[2], size


def test_decode_holds_the_weights_once():
    """The decode program takes the stacked weights as they are and copies none of them whole: its temporaries stay
    below one layer's weights plus the cache (the step's activations and the rows' gathered pages are small here)."""
    cfg = CFG_TIED.replace(num_layers=8, intermediate_size=1024)
    params = _abstract_params(cfg)
    mem = _decode_hlo(cfg, params).memory_analysis()
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
    one_layer = nbytes(params["layers"]) // cfg.num_layers
    cache = 2 * cfg.num_layers * BATCH * WIDTH * PAGE * cfg.num_kv_heads * cfg.dim_per_head * 4
    assert mem.argument_size_in_bytes >= nbytes(params) + cache
    assert mem.temp_size_in_bytes < one_layer + cache, (mem.temp_size_in_bytes, one_layer, cache)


def test_prefix_cache_hits_and_shared_samples_change_speed_never_tokens():
    """Prompts that share a long prefix (and one prompt four times): later ones find the first one's full pages in
    the prefix cache and compute only the rest; the tokens are transformers' all the same."""
    cfg, model, params = hf_and_params(CFG_UNTIED)
    base = prompts_of(cfg, [40], seed=8)[0]
    prompts = [base + [3, 4, 5], base[:35] + [9], base + [3, 4, 5], base + [3, 4, 5], base + [3, 4, 5]]
    got = generate(cfg, params, prompts, max_new_tokens=10, cache_dtype=jnp.float32, page_size=8, max_rows=2)
    for p, g in zip(prompts, got):
        assert g.tokens == hf_greedy(model, p, 10)
    assert got[0].cached_tokens == 0 and got[1].cached_tokens == 32  # 4 full pages of the shared 35 tokens
    assert [g.cached_tokens for g in got[2:]] == [40, 40, 40]  # 42 of 43 tokens may come from the cache: 5 pages
    off = generate(cfg, params, prompts, max_new_tokens=10, cache_dtype=jnp.float32, page_size=8, max_rows=2,
                   prefix_cache=False)
    assert [g.tokens for g in off] == [g.tokens for g in got] and all(g.cached_tokens == 0 for g in off)


def test_preempted_requests_continue_exactly():
    """A pool too small for every row's growth: the newest rows are preempted, recomputed from their tokens so far
    (mostly from the prefix cache) and continue with the tokens they would have had."""
    from qcjax.inference import Engine, Request

    cfg, model, params = hf_and_params(CFG_UNTIED)
    prompts = prompts_of(cfg, [9, 14, 5, 11], seed=9)
    got = [[] for _ in prompts]
    reqs = [Request(p, 30, on_event=lambda t, f, i=i: got[i].extend(t)) for i, p in enumerate(prompts)]
    engine = Engine(cfg, params, max_rows=4, max_len=48, page_size=4, num_pages=24, cache_dtype=jnp.float32, chunk=4)
    engine.submit(reqs)
    while engine.busy:
        engine.step()
        engine.pages.check()
    assert engine.counts["preempted"] > 0
    for p, g in zip(prompts, got):
        assert g == hf_greedy(model, p, 30)
    assert engine.pages.used == 0


def test_generate_with_chunked_prefill_equals_transformers():
    cfg, model, params = hf_and_params(CFG_TIED)
    prompts = prompts_of(cfg, [50, 21], seed=6)
    got = generate(cfg, params, prompts, max_new_tokens=12, cache_dtype=jnp.float32, prefill_chunk=16)
    for p, g in zip(prompts, got):
        assert g.tokens == hf_greedy(model, p, 12)
    with pytest.raises(ValueError, match="prefill_chunk=24: must be a power of two"):
        generate(cfg, params, prompts, max_new_tokens=2, prefill_chunk=24)


def test_streamed_chunks_concatenate_to_the_one_shot_result():
    cfg, _, params = hf_and_params(CFG_UNTIED)
    prompts = prompts_of(cfg, [7, 3])
    whole = generate(cfg, params, prompts, max_new_tokens=[20, 13], cache_dtype=jnp.float32, min_batch=4)
    streamed = [[], []]
    calls = []

    def on_chunk(new):
        calls.append([len(t) for t in new])
        for s, t in zip(streamed, new):
            s.extend(t)

    chunked = generate(cfg, params, prompts, max_new_tokens=[20, 13], cache_dtype=jnp.float32, chunk=3,
                       on_chunk=on_chunk, min_batch=4)
    assert [c.tokens for c in chunked] == [c.tokens for c in whole] == streamed
    # a round is a prefill (the first token) and a decode chunk of 3 steps; then chunks of 3 until the longest ends
    assert calls[0] == [4, 4] and max(max(c) for c in calls[1:]) <= 3 and len(calls) == 1 + -(-16 // 3)


def test_each_row_stops_on_its_own_stop_tokens():
    cfg, _, params = hf_and_params(CFG_UNTIED)
    prompts = prompts_of(cfg, [6, 9], seed=2)
    free = generate(cfg, params, prompts, max_new_tokens=24, cache_dtype=jnp.float32, min_batch=4)
    stop0 = free[0].tokens[10]
    first = free[0].tokens.index(stop0)
    got = generate(cfg, params, prompts, max_new_tokens=24, cache_dtype=jnp.float32, min_batch=4,
                   stop_tokens=[[stop0], [cfg.vocab_size - 1 if cfg.vocab_size - 1 not in free[1].tokens else 0]])
    assert got[0].tokens == free[0].tokens[:first]
    assert (got[0].finish_reason, got[0].stop_token) == ("stop", stop0)
    assert got[1].tokens == free[1].tokens and got[1].finish_reason == "length"


def test_on_chunk_can_finish_a_row_early():
    cfg, _, params = hf_and_params(CFG_UNTIED)
    prompts = prompts_of(cfg, [4, 4], seed=3)
    got = generate(cfg, params, prompts, max_new_tokens=30, cache_dtype=jnp.float32, chunk=4, min_batch=4,
                   on_chunk=lambda new: [0])
    assert got[0].finish_reason == "stop" and len(got[0].tokens) == 5  # after the first round: prefill + 4 steps
    assert got[1].finish_reason == "length" and len(got[1].tokens) == 30


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    cfg, _, params = hf_and_params(CFG_UNTIED, std=0.02)  # flat-ish logits: sampling has real choices
    prompts = prompts_of(cfg, [5, 8, 3], seed=4)
    sp = SamplingParams(temperature=1.0, top_p=0.9)
    kw = dict(max_new_tokens=16, sampling=sp, cache_dtype=jnp.float32, min_batch=4)
    a = generate(cfg, params, prompts, seed=[1, 2, 3], **kw)
    b = generate(cfg, params, prompts, seed=[1, 2, 3], chunk=5, on_chunk=lambda new: None, **kw)
    alone = generate(cfg, params, prompts[1:2], seed=2, **kw)
    other = generate(cfg, params, prompts, seed=[9, 9, 9], **kw)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert a[1].tokens == alone[0].tokens
    assert [c.tokens for c in a] != [c.tokens for c in other]


def test_greedy_and_sampled_rows_share_a_batch():
    cfg, _, params = hf_and_params(CFG_UNTIED)
    prompts = prompts_of(cfg, [6, 6], seed=5)
    greedy = generate(cfg, params, prompts[:1], max_new_tokens=16, cache_dtype=jnp.float32, min_batch=4)
    mixed = generate(cfg, params, prompts, max_new_tokens=16, cache_dtype=jnp.float32, min_batch=4,
                     sampling=[GREEDY, SamplingParams(temperature=1.0, top_p=0.9)])
    assert mixed[0].tokens == greedy[0].tokens


# ---- the filters against their closed forms, by many draws ----------------------------------------------------------
def _draw(logits: np.ndarray, sp: SamplingParams, draws: int) -> np.ndarray:
    """`draws` samples from one row of logits [V] (one row per draw, each with its own key)."""
    kinds = S.FilterKinds.of([sp], logits.shape[-1])
    c = S.Controls(
        filters=S.Filters(*(jnp.full((draws,), v, dt) for v, dt in (
            (sp.temperature, jnp.float32), (sp.top_k, jnp.int32), (sp.top_p, jnp.float32), (sp.min_p, jnp.float32)))),
        keys=jax.vmap(jax.random.key)(jnp.arange(draws, dtype=jnp.uint32)),
        max_new=jnp.ones((draws,), jnp.int32),
        stop=jnp.full((draws, 1), -1, jnp.int32),
    )
    x = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (draws, logits.shape[-1]))
    f = jax.jit(S.sample_tokens, static_argnames="kinds")
    return np.asarray(f(x, c, jnp.zeros((draws,), jnp.int32), kinds=kinds))


def _allowed(logits: np.ndarray, sp: SamplingParams) -> np.ndarray:
    """The closed-form kept distribution (transformers' order: temperature, top-k, top-p, min-p); [V] probs."""
    x = logits.astype(np.float64) / sp.temperature
    keep = np.ones_like(x, bool)
    order = np.argsort(-x)
    if sp.top_k:
        keep[order[sp.top_k:]] = False
    if sp.top_p < 1:
        p = np.where(keep, np.exp(x - x.max()), 0)
        p /= p.sum()
        n = int(np.searchsorted(np.cumsum(p[order]), sp.top_p)) + 1  # smallest head reaching top_p
        keep[order[n:]] = False
    if sp.min_p:
        p = np.where(keep, np.exp(x - x.max()), 0)
        keep &= p >= sp.min_p * p.max()
    p = np.where(keep, np.exp(x - x.max()), 0)
    return p / p.sum()


LOGITS = np.random.default_rng(7).permutation(np.linspace(-4.0, 4.0, 97))  # distinct values: no ties


@pytest.mark.parametrize("sp", [
    SamplingParams(temperature=1.0, top_k=7),
    SamplingParams(temperature=0.7, top_p=0.6),
    SamplingParams(temperature=1.3, min_p=0.2),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.8, min_p=0.1),
], ids=["top_k", "top_p", "min_p", "all"])
def test_filters_never_leave_the_allowed_set_and_match_its_distribution(sp):
    draws = 20000
    want = _allowed(LOGITS, sp)
    got = _draw(LOGITS, sp, draws)
    outside = set(got.tolist()) - set(np.flatnonzero(want).tolist())
    assert not outside, f"sampled tokens outside the allowed set: {sorted(outside)}"
    freq = np.bincount(got, minlength=len(LOGITS)) / draws
    se = np.sqrt(want * (1 - want) / draws)
    assert np.all(np.abs(freq - want) <= 5 * se + 1e-9), np.max(np.abs(freq - want) / (se + 1e-12))


def test_top_p_wider_than_the_probe_uses_the_exact_bisection():
    v = 2000
    logits = np.random.default_rng(8).normal(0, 0.05, v)  # nearly flat: top_p 0.5 keeps ~1000 > 256 tokens
    sp = SamplingParams(temperature=1.0, top_p=0.5)
    want = _allowed(logits, sp)
    assert np.count_nonzero(want) > S._TOP_P_PROBE
    x = S.filter_logits(jnp.asarray(logits, jnp.float32)[None], S.Filters(
        jnp.ones(1), jnp.zeros(1, jnp.int32), jnp.full(1, 0.5), jnp.zeros(1)), S.FilterKinds.of([sp], v))
    np.testing.assert_array_equal(np.isfinite(np.asarray(x[0])), want > 0)


def test_categorical_never_draws_a_zero_probability_token():
    x = np.full((4096, 1000), -np.inf, np.float32)
    x[:, [0, 333, 998, 999]] = [0.0, 1.0, 2.0, -1.0]  # mass at both block edges and in the last, padded block
    u = np.linspace(0.0, 1.0, 4096, endpoint=False, dtype=np.float32)
    u[-1] = np.nextafter(np.float32(1), np.float32(0))
    got = np.asarray(jax.jit(S.categorical)(jnp.asarray(x), jnp.asarray(u)))
    assert set(got.tolist()) <= {0, 333, 998, 999}


def test_greedy_ties_pick_the_first_maximum_like_torch():
    x = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    assert S.sample_tokens(x, None, None, S.FilterKinds()).tolist() == [1, 0]  # an all-greedy batch


# ---- the mesh -------------------------------------------------------------------------------------------------------
CFG_TP = CFG_UNTIED.replace(num_heads=16, num_kv_heads=8, hidden_size=128)  # heads and kv heads split 8 ways


def test_tensor_parallel_mesh_of_8_devices_gives_the_same_tokens_as_one_device():
    from qcjax.sharding import make_mesh

    cfg, _, params = hf_and_params(CFG_TP)
    prompts = prompts_of(cfg, [9, 4, 14, 2], seed=6)
    one = generate(cfg, params, prompts, max_new_tokens=32, cache_dtype=jnp.float32)
    mesh = make_mesh({"tensor": 8})
    with jax.set_mesh(mesh):
        placed = programs.place_params(cfg, params, mesh)
    many = generate(cfg, placed, prompts, max_new_tokens=32, cache_dtype=jnp.float32, mesh=mesh)
    attn = placed["layers"]["attn"]  # stacked [layers, ...]: heads over tensor
    spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))  # noqa: E731
    assert spec(attn["q_proj"]["kernel"]) == (None, None, "tensor", None)
    assert spec(attn["o_proj"]["kernel"]) == (None, "tensor", None, None)
    assert len(set(one[0].tokens)) > 3
    assert [c.tokens for c in many] == [c.tokens for c in one]


def test_page_pool_is_sharded_kv_heads_over_tensor():
    from qcjax.sharding import make_mesh

    cfg, _, _ = hf_and_params(CFG_TP)
    mesh = make_mesh({"data": 2, "tensor": 4})
    with jax.set_mesh(mesh):
        pool = programs.init_pool(cfg, num_pages=8, page_size=16, dtype=jnp.bfloat16)
    k = pool["k"]  # [layers, pages, page_size, kv_heads * head_dim]
    assert k.dtype == jnp.bfloat16
    assert tuple(k.sharding.spec) + (None,) * (4 - len(k.sharding.spec)) == (None, None, None, "tensor")


# ---- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.1), "temperature=-0.1"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(min_p=2.0), "min_p=2.0"),
])
def test_bad_sampling_params_name_the_field_and_value(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_bad_prompts_are_clear_errors():
    cfg, _, params = hf_and_params(CFG_UNTIED)
    cfg = cfg.replace(max_position_embeddings=64)
    with pytest.raises(ValueError, match="prompt 1: the prompt is empty"):
        generate(cfg, params, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 0: the prompt has 60 tokens; with max_new_tokens=8 it needs 68 .* "
                                         "context of 64"):
        generate(cfg, params, [[1] * 60], max_new_tokens=8)
    with pytest.raises(ValueError, match=r"outside \[0, 320\)"):
        generate(cfg, params, [[1, 999]], max_new_tokens=4)


@pytest.mark.parametrize("preset, devices, batch, want", [
    ("32b", 8, 8, {"data": 1, "fsdp": 1, "tensor": 8}),  # 8 KV heads: one per chip
    ("7b", 8, 8, {"data": 2, "fsdp": 1, "tensor": 4}),  # 4 KV heads, then the batch
    ("0.5b", 8, 1, {"data": 1, "fsdp": 4, "tensor": 2}),  # 2 KV heads; one row: the rest shards the weights
    ("0.5b", 8, 16, {"data": 4, "fsdp": 1, "tensor": 2}),
])
def test_the_serving_mesh_is_tensor_parallel_up_to_the_kv_heads_then_data(preset, devices, batch, want):
    from qcjax.config import get_config

    assert serving_mesh_shape(get_config(preset), devices, batch) == want


def test_text_stream_holds_back_a_split_stop_string_and_a_partial_utf8_character():
    """Byte-level ids: 0xC3 0xA9 is 'é' only once both bytes are in, and the stop string "\\n\\n" arrives split
    over two chunks; nothing shown is ever taken back and the text ends right before the stop string."""
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    ts = TextStream(decode, stop_ids=[0], stop_strings=["\n\n"])
    shown = [ts.feed(list(b"ab\n"))]  # the newline may start the stop string: held
    shown.append(ts.feed([0xC3]))  # half a character: held, and still the newline
    shown.append(ts.feed([0xA9]))  # the character is whole: newline and 'é' go out
    shown.append(ts.feed(list(b"\n")))  # may start the stop string again
    shown.append(ts.feed(list(b"\nzz")))  # it does: cut before it
    assert shown == ["ab", "", "\né", "", ""] and ts.stopped and ts.text == "ab\né"
    assert ts.flush() == "" and "".join(shown) == ts.text
    ts = TextStream(decode, stop_ids=[0], stop_strings=["\n\n"])
    assert ts.feed(list(b"x\n")) == "x" and ts.feed([0, 65]) == "\n" and ts.stopped  # a stop id ends it too
