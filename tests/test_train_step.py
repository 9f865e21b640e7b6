"""Losses and the pure train step: closed forms and equivalences, on the tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qcjax
from qcjax.train.config import TrainConfig
from qcjax.train.losses import cross_entropy, dpo_loss, next_token_targets, target_logprobs
from qcjax.train.step import OptimizerConfig, StepConfig, decay_mask, init_state, make_optimizer, make_train_step, \
    lr_schedule

CFG = qcjax.get_config("tiny", vocab_size=128, num_layers=2)


def batch(rng, b=4, t=16):
    tokens = rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
    segs = np.ones((b, t), np.int32)
    segs[:, t // 2:] = 2
    segs[:, -3:] = 0
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0).astype(np.int32)
    return {"tokens": tokens, "positions": pos, "segment_ids": segs, "loss_mask": (segs > 0).astype(np.int32)}


def test_next_token_targets_stay_inside_segments():
    tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
    segs = jnp.array([[1, 1, 2, 2, 2, 0]])
    mask = jnp.array([[0, 1, 0, 0, 1, 0]])
    targets, w = next_token_targets(tokens, segs, mask)
    np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 0, 0]])
    # pos0->6 counts; pos1->7 crosses into doc 2; pos2->8 masked; pos3->9 counts; pos4->pad; last: none
    np.testing.assert_array_equal(w, [[1, 0, 0, 1, 0, 0]])


def test_chunked_logprobs_equal_full_log_softmax():
    params = qcjax.init_params(CFG, jax.random.key(0))
    b = batch(np.random.default_rng(0))
    hidden, _ = qcjax.Qwen2(CFG).apply({"params": params}, b["tokens"], method=qcjax.Qwen2.hidden_states)
    targets = jnp.asarray(b["tokens"])
    full = jnp.take_along_axis(jax.nn.log_softmax(qcjax.logits(CFG, params, b["tokens"])), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(target_logprobs(CFG, params, hidden, targets, chunk=7), full, rtol=1e-5, atol=1e-5)


def test_chunked_loss_on_a_batch_sharded_mesh_keeps_logits_on_their_device():
    """Over fsdp=8 each device computes the logits of its own rows: the loss and its gradient equal the one-device
    values, and the only collectives are the head's gather and its gradient's reduction ([embed, vocab]), never a
    [tokens, vocab] logits tensor."""
    import re

    from jax.sharding import NamedSharding, PartitionSpec as P

    from qcjax.sharding import make_mesh

    rng = np.random.default_rng(1)
    b, t, e, v = 8, 32, CFG.hidden_size, CFG.vocab_size
    hidden = jnp.asarray(rng.normal(size=(b, t, e)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    params = {"embed": jnp.asarray(rng.normal(size=(v, e)) / np.sqrt(e), jnp.float32)}
    loss = lambda p, h: jnp.sum(target_logprobs(CFG, p, h, targets, chunk=8))  # 8 tokens per device: 8 chunks
    want = jax.grad(loss, argnums=(0, 1))(params, hidden)
    mesh = make_mesh({"fsdp": 8})
    with jax.set_mesh(mesh):
        h_s = jax.device_put(hidden, NamedSharding(mesh, P("fsdp")))
        p_s = jax.device_put(params, NamedSharding(mesh, P(None, "fsdp")))  # the embed axis is fsdp-sharded
        fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
        got = fn(p_s, h_s)
        hlo = fn.lower(p_s, h_s).compile().as_text()
    np.testing.assert_allclose(got[0]["embed"], want[0]["embed"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    moved = re.findall(r"= \(?([^=]*?)\)? (?:all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(", hlo)
    shapes = {s for m in moved for s in re.findall(r"[a-z]+\d+\[([\d,]*)\]", m)}
    assert shapes and shapes <= {"", f"{v},{e // 8}", f"{v},{e}", f"{e},{v}"}, shapes


def test_masked_positions_get_zero_gradient():
    """SFT prompt tokens (weight 0) contribute nothing: d loss / d hidden is zero exactly there."""
    params = qcjax.init_params(CFG, jax.random.key(0))
    hidden = jax.random.normal(jax.random.key(1), (2, 8, CFG.hidden_size))
    targets = jnp.ones((2, 8), jnp.int32)
    weights = jnp.array([[0, 0, 0, 1, 1, 1, 1, 0]] * 2, jnp.float32)
    g = jax.grad(lambda h: cross_entropy(CFG, params, h, targets, weights, chunk=5)[0])(hidden)
    norms = np.linalg.norm(np.asarray(g), axis=-1)
    assert np.all(norms[:, [0, 1, 2, 7]] == 0) and np.all(norms[:, 3:7] > 0)


def test_dpo_sigmoid_and_ipo_closed_forms():
    c, r, rc, rr = map(jnp.asarray, ([-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.0], [-3.5, -3.0]))
    beta, eps = 0.1, 0.2
    m = (np.array(c) - np.array(rc)) - (np.array(r) - np.array(rr))  # [1.0, -2.0]
    sig = lambda x: 1 / (1 + np.exp(-x))
    want = -(1 - eps) * np.log(sig(beta * m)) - eps * np.log(sig(-beta * m))
    losses, metrics = dpo_loss(c, r, rc, rr, beta, eps, "sigmoid")
    np.testing.assert_allclose(losses, want, rtol=1e-6)
    np.testing.assert_allclose(metrics["reward_margin"], np.mean(beta * m), rtol=1e-6)
    assert float(metrics["reward_accuracy"]) == 0.5
    np.testing.assert_allclose(dpo_loss(c, r, rc, rr, beta, 0.0, "ipo")[0], (m - 1 / (2 * beta)) ** 2, rtol=1e-6)


def test_rpo_adds_the_chosen_completions_per_token_nll():
    c, r, rc, rr = map(jnp.asarray, ([-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.0], [-3.5, -3.0]))
    n = jnp.asarray([3.0, 10.0])
    plain, _ = dpo_loss(c, r, rc, rr, 0.1)
    rpo, _ = dpo_loss(c, r, rc, rr, 0.1, rpo_alpha=0.5, chosen_tokens=n)
    np.testing.assert_allclose(rpo - plain, 0.5 * np.array([3.0 / 3, 5.0 / 10]), rtol=1e-6)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(c, r, rc, rr, 0.1, rpo_alpha=0.5)


def _run_step(accum, params, b, tx=None):
    oc = OptimizerConfig(lr=1e-2, warmup_steps=0)
    tx = tx or make_optimizer(oc, 10)
    step = jax.jit(make_train_step(CFG, StepConfig.of(TrainConfig(loss_chunk=16), accum), tx, lr_schedule(oc, 10)))
    return step(init_state(params, tx), b)


def test_grad_accumulation_equals_one_big_batch():
    params = qcjax.init_params(CFG, jax.random.key(0))
    b = batch(np.random.default_rng(1))
    # plain SGD, so the parameter change is the gradient itself (Adam's first step, g / (|g| + eps), would amplify
    # rounding differences of near-zero gradient entries)
    s1, m1 = _run_step(1, params, b, optax.sgd(1.0))
    s2, m2 = _run_step(2, params, b, optax.sgd(1.0))
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6), s1["params"], s2["params"])


def test_loss_matches_naive_full_logits_cross_entropy():
    params = qcjax.init_params(CFG, jax.random.key(0))
    b = batch(np.random.default_rng(2))
    _, m = _run_step(1, params, b)
    lp = jax.nn.log_softmax(qcjax.logits(CFG, params, b["tokens"], b["positions"], b["segment_ids"]))
    targets, w = next_token_targets(jnp.asarray(b["tokens"]), jnp.asarray(b["segment_ids"]), jnp.asarray(b["loss_mask"]))
    want = -np.sum(np.take_along_axis(np.asarray(lp), np.asarray(targets)[..., None], -1)[..., 0] * w) / np.sum(w)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)


def test_nonfinite_loss_skips_update_and_is_counted():
    params = qcjax.init_params(CFG, jax.random.key(0))
    params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.inf)
    s, m = _run_step(1, params, batch(np.random.default_rng(3)))
    assert not np.isfinite(float(m["loss"])) and int(m["nonfinite_in_row"]) == 1
    jax.tree.map(lambda a, c: np.testing.assert_array_equal(a, c), s["params"], params)


def test_no_weight_decay_on_norms_and_biases():
    mask = decay_mask(qcjax.init_params(CFG, jax.random.key(0)))
    assert mask["layers"]["attn"]["q_proj"]["kernel"] and mask["embed"]
    assert not mask["layers"]["attn"]["q_proj"]["bias"] and not mask["final_norm"]["scale"]
    assert not mask["layers"]["input_norm"]["scale"]
