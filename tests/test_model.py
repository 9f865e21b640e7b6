"""The model computes what transformers' Qwen2ForCausalLM computes (random weights, small configs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qcjax
from qcjax.config import ModelConfig
from qcjax.model import Qwen2, init_cache, write_cache

from conftest import hf_logits, hf_model, params_from_hf


def small(heads, kv, head_dim, tied, layers=2, vocab=320, **kw) -> ModelConfig:
    """The family's GQA ratio and head dim at a shrunken width."""
    return ModelConfig(
        vocab_size=vocab, hidden_size=kw.pop("hidden", heads * head_dim), intermediate_size=kw.pop("inter", 96),
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=kw.pop("head_dim_override", None),
        tie_word_embeddings=tied, rope_theta=1e6, **kw,
    )


CASES = {
    "0.5b-14/2-hd64-tied": small(14, 2, 64, True),
    "1.5b-12/2-hd128-tied": small(12, 2, 128, True, hidden=192, head_dim_override=128),
    "3b-16/2-tied": small(16, 2, 16, True),
    "7b-28/4-untied": small(28, 4, 16, False),
    "32b-40/8-untied": small(40, 8, 16, False, layers=3),
}


def assert_close_logits(ours, ref):
    err = np.max(np.abs(np.asarray(ours) - ref))
    assert err <= 1e-4 * np.max(np.abs(ref)), f"max |diff| {err:.3g} vs max |logit| {np.max(np.abs(ref)):.3g}"


# The not-slow set: a tied and an untied head; every other GQA ratio runs with the slow tests.
@pytest.mark.parametrize("name", [n if n in ("0.5b-14/2-hd64-tied", "7b-28/4-untied")
                                  else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_logits_match_transformers_fp32(name):
    cfg = CASES[name]
    model = hf_model(cfg)
    params = params_from_hf(cfg, model)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 33))
    ref = hf_logits(model, tokens)
    assert np.std(ref) > 0.5, "reference logits too flat to be a meaningful comparison"
    assert_close_logits(qcjax.logits(cfg, params, tokens), ref)


def test_yarn_beyond_original_window_matches_transformers():
    cfg = small(8, 2, 16, False).with_yarn(factor=4.0, original_max_position_embeddings=32)
    model = hf_model(cfg)
    rotary = model.model.rotary_emb
    from qcjax.rope import inv_frequencies

    inv, scale = inv_frequencies(cfg)
    np.testing.assert_array_equal(inv, rotary.inv_freq.numpy())
    assert scale == pytest.approx(rotary.attention_scaling) and scale > 1.0
    params = params_from_hf(cfg, model)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 120))  # positions up to 119 > 32
    assert_close_logits(qcjax.logits(cfg, params, tokens), hf_logits(model, tokens))


def test_padded_batch_matches_each_sequence_alone():
    cfg = CASES["7b-28/4-untied"]
    model = hf_model(cfg)
    params = params_from_hf(cfg, model)
    rng = np.random.default_rng(2)
    lengths = [17, 9]
    tokens = np.zeros((2, 20), np.int64)
    segs = np.zeros((2, 20), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(0, cfg.vocab_size, n)
        segs[b, :n] = 1
    ours = np.asarray(qcjax.logits(cfg, params, tokens, segment_ids=segs))
    for b, n in enumerate(lengths):
        assert_close_logits(ours[b, :n], hf_logits(model, tokens[b : b + 1, :n])[0])


def test_packed_row_segments_match_each_document_alone():
    cfg = CASES["3b-16/2-tied"]
    model = hf_model(cfg)
    params = params_from_hf(cfg, model)
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, cfg.vocab_size, n) for n in (11, 5, 14)]
    tokens = np.concatenate(docs + [np.zeros(2, np.int64)])[None]  # 2 padding tokens at the end
    segs = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(2, int)])[None]
    pos = np.concatenate([np.arange(len(d)) for d in docs] + [np.arange(2)])[None]
    ours = np.asarray(qcjax.logits(cfg, params, tokens, positions=pos, segment_ids=segs))[0]
    start = 0
    for d in docs:
        assert_close_logits(ours[start : start + len(d)], hf_logits(model, d[None])[0])
        start += len(d)


def _kl(ref_logits, logits):
    ref, ours = jax.nn.log_softmax(ref_logits, -1), jax.nn.log_softmax(logits, -1)
    return float(np.mean(np.sum(np.exp(ref) * (ref - ours), -1)))


def test_bf16_compute_kl_to_fp32_reference():
    cfg = CASES["0.5b-14/2-hd64-tied"]
    model = hf_model(cfg, std=0.05)  # logit std ~1.5
    params = params_from_hf(cfg, model)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 33))
    kl = _kl(hf_logits(model, tokens), qcjax.logits(cfg.replace(dtype="bfloat16"), params, tokens))
    assert kl <= 1e-3, kl


def test_bf16_compute_is_closer_to_fp32_than_transformers_bf16():
    """With sharper random models the bf16 error grows for everyone (measured: KL 2.3e-3 for us, 3.5e-3 for
    transformers in bf16 at logit std 2.5); ours must stay at least as close to the fp32 reference."""
    import torch

    cfg = CASES["0.5b-14/2-hd64-tied"]
    model = hf_model(cfg, std=0.08)
    params = params_from_hf(cfg, model)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 33))
    ref = hf_logits(model, tokens)
    ours = _kl(ref, qcjax.logits(cfg.replace(dtype="bfloat16"), params, tokens))
    theirs = _kl(ref, hf_logits(model.to(torch.bfloat16), tokens))
    assert ours <= theirs, (ours, theirs)


def test_kv_cache_prefill_then_decode_equals_full_forward():
    cfg = CASES["7b-28/4-untied"]
    params = params_from_hf(cfg, hf_model(cfg))
    rng = np.random.default_rng(5)
    full = rng.integers(0, cfg.vocab_size, (2, 12))
    lengths = np.array([7, 4])
    model = Qwen2(cfg)
    ref = np.asarray(qcjax.logits(cfg, params, full))
    # prefill a right-padded bucket of 8 with each row's own prompt length, then feed one token at a time.
    prompt = np.where(np.arange(8)[None] < lengths[:, None], full[:, :8], 0)
    segs = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
    cache = init_cache(cfg, 2, 16, jnp.float32)
    logits, cache = model.apply({"params": params}, prompt, np.broadcast_to(np.arange(8), (2, 8)), segs, cache)
    for b in range(2):
        np.testing.assert_allclose(logits[b, : lengths[b]], ref[b, : lengths[b]], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache["lengths"], lengths)
    for step in range(4):
        pos = lengths + step
        tok = full[np.arange(2), pos][:, None]
        logits, cache = model.apply({"params": params}, tok, pos[:, None], np.ones((2, 1), np.int32), cache)
        for b in range(2):
            np.testing.assert_allclose(logits[b, 0], ref[b, pos[b]], rtol=1e-5, atol=1e-5)


def test_cache_positions_default_to_each_rows_cache_length():
    """Without positions, a call with a cache continues each row where its cache ends (a decode step at position 0
    would silently be a different model)."""
    cfg = CASES["7b-28/4-untied"]
    hf = hf_model(cfg)
    params = params_from_hf(cfg, hf)
    full = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 10))
    # the reference is transformers in float64: an fp32 forward of the whole prompt is itself up to 1.4e-5 off it here
    # (the cached steps, through the CPU layer loop, 5e-6), so two fp32 paths need not agree within the bound below
    ref = hf_logits(hf.double(), full)
    model, lengths = Qwen2(cfg), np.array([6, 3])
    segs = (np.arange(6)[None] < lengths[:, None]).astype(np.int32)
    _, cache = model.apply({"params": params}, np.where(segs, full[:, :6], 0), None, segs,
                           init_cache(cfg, 2, 16, jnp.float32))
    for step in range(3):
        pos = lengths + step
        logits, cache = model.apply({"params": params}, full[np.arange(2), pos][:, None], cache=cache)
        np.testing.assert_allclose(logits[:, 0], ref[np.arange(2), pos], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("segs", [[[1, 1, 2, 2]], [[0, 1, 1, 0]]], ids=["two-documents", "padding-first"])
def test_cache_refuses_rows_that_are_not_one_sequence(segs):
    cfg = CASES["3b-16/2-tied"]
    params = params_from_hf(cfg, hf_model(cfg))
    with pytest.raises(ValueError, match="segment_ids row 0 .* one sequence"):
        Qwen2(cfg).apply({"params": params}, np.ones((1, 4), np.int32), None, np.array(segs, np.int32),
                         init_cache(cfg, 1, 8, jnp.float32))


def test_bf16_cache_write_is_exact_in_place_and_never_widened_to_fp32():
    """Each row's new keys land in the given layer at the row's own offset, bit for bit (past the end: dropped), in
    the buffer passed in, and the CPU program moves 16-bit values only (a bf16 scatter on XLA:CPU otherwise converts
    the whole cache to fp32 and back on every decode step)."""
    rng = np.random.default_rng(0)
    cache = jnp.asarray(rng.normal(size=(2, 3, 16, 2, 8)), jnp.bfloat16)  # [layers, batch, len, kv_heads, head_dim]
    new = jnp.asarray(rng.normal(size=(3, 2, 2, 8)), jnp.bfloat16)
    at = np.array([0, 5, 15])
    want = np.array(cache)
    for b in range(3):
        n = min(2, 16 - at[b])
        want[1, b, at[b]: at[b] + n] = np.array(new)[b, :n]
    rows = np.repeat(np.arange(3)[:, None], 2, axis=1)
    slots = at[:, None] + np.arange(2)[None, :]
    write = jax.jit(write_cache, donate_argnums=0)
    hlo = write.lower(cache, new, 1, rows, slots).compile().as_text()
    assert "f32[2,3,16,2,8]" not in hlo, "the compiled write widens the cache to fp32"
    assert "copy(" not in hlo.split("ENTRY")[1], "the compiled write copies the cache"
    np.testing.assert_array_equal(np.array(write(cache, new, 1, rows, slots)).view(np.uint16), want.view(np.uint16))


def _next_token_loss(p, c, tokens):
    lg = Qwen2(c).apply({"params": p}, tokens)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg[:, :-1]), tokens[:, 1:, None], -1))


# Module-level, so the no-remat reference and the params compile once for every policy below.
_loss_and_grads = jax.jit(jax.value_and_grad(_next_token_loss), static_argnums=1)
_init_params = jax.jit(qcjax.init_params, static_argnums=0)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "minimal"])
def test_remat_policy_keeps_loss_and_grads(remat):
    cfg = CASES["3b-16/2-tied"]
    params = _init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 16)))
    l0, g0 = _loss_and_grads(params, cfg, tokens)
    l1, g1 = _loss_and_grads(params, cfg.replace(remat=remat), tokens)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g0, g1)


@pytest.mark.parametrize("tied,chunk,dtype", [(True, 7, "float32"), (False, 64, "float32"), (True, 64, "bfloat16")])
def test_training_gradients_match_transformers(tied, chunk, dtype):
    """d(next-token loss)/d(every param) equals torch autograd through transformers: our hand-written backward of
    the projections and the [embed, vocab] head (qcjax.model._project) against an independent implementation, with
    several logit chunks (chunk=7) and one (chunk=64). bf16: autocast keeps torch's residual stream in fp32 while
    ours is bf16 (half the activation memory, as in other JAX trainers), so ours is measured 1.1-1.65x torch's
    relative L2 error to the fp32 gradient (0.7-2.1e-2 here); a wrong gradient is off by O(1)."""
    import torch

    from qcjax.train.step import lm_loss_terms

    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      tie_word_embeddings=tied)
    model = hf_model(cfg)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 12))
    x = torch.as_tensor(tokens, dtype=torch.long)
    def torch_grads(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.item(), params_from_hf(cfg, {n: p.grad for n, p in model.named_parameters()})

    ref_loss, ref = torch_grads(autocast=False)
    torch_bf16 = torch_grads(autocast=True)[1] if dtype == "bfloat16" else None

    micro = {"tokens": jnp.asarray(tokens, jnp.int32), "positions": jnp.broadcast_to(jnp.arange(12), (2, 12)),
             "segment_ids": jnp.ones((2, 12), jnp.int32), "loss_mask": jnp.ones((2, 12), jnp.int32)}

    def loss(p):
        total, count = lm_loss_terms(cfg.replace(dtype=dtype), p, micro, chunk)
        return total / count

    value, grads = jax.jit(jax.value_and_grad(loss))(params_from_hf(cfg, model))
    np.testing.assert_allclose(value, ref_loss, rtol=1e-5 if dtype == "float32" else 1e-2)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        want, g, name = _get(ref, path), np.asarray(g), jax.tree_util.keystr(path)
        if dtype == "float32":  # max |difference| relative to the tensor's largest gradient, as for the logits
            err = np.max(np.abs(g - want)) / np.max(np.abs(want))
            assert err <= 1e-4, f"{name}: relative error {err:.2e}"
        else:  # bf16: relative L2 error to the fp32 gradient, within 2x of transformers' own bf16 autocast
            rel = lambda a: np.linalg.norm(a - want) / np.linalg.norm(want)
            err, torch_err = rel(g), rel(_get(torch_bf16, path))
            assert err <= 2 * torch_err, f"{name}: bf16 error {err:.2e}, transformers bf16 {torch_err:.2e}"


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_remat_policies_save_what_they_name():
    """The residuals the layer scan stacks for the backward pass: "full" keeps only each layer's input; "minimal"
    also the named q/k/v, attention output and MLP hidden activations (checked by shape: a policy that saved nothing
    more, or everything, would fail)."""
    from jax._src.ad_checkpoint import saved_residuals

    cfg = qcjax.get_config("tiny", vocab_size=256, dtype="float32", param_dtype="float32")
    params = qcjax.init_params(cfg, jax.random.key(0))
    tokens = jnp.zeros((2, 16), jnp.int32)
    L, B, T, E = cfg.num_layers, 2, 16, cfg.hidden_size
    H, KV, D, I = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.intermediate_size

    def stacked(remat):
        c = cfg.replace(remat=remat)
        res = saved_residuals(lambda p: jnp.sum(Qwen2(c).apply({"params": p}, tokens)), params)
        return sorted(tuple(a.shape) for a, why in res if "output of scan" in why and a.ndim >= 4)

    assert stacked("full") == [(L, B, T, E)]
    assert stacked("minimal") == sorted([(L, B, T, E), (L, B, T, H, D), (L, B, T, KV, D), (L, B, T, KV, D),
                                         (L, B, T, H, D), (L, B, T, I)])
