"""Rotary tables equal transformers' for every size, plain and YaRN, and logits agree at far positions."""
import mpmath
import numpy as np
import pytest

import qcjax
from qcjax.config import PRESETS
from qcjax.rope import base_powers, inv_frequencies

from conftest import hf_logits, hf_model, params_from_hf
from test_model import assert_close_logits, small

SIZES = ["0.5b", "1.5b", "3b", "7b", "14b", "32b"]


def _hf_rotary(cfg):
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    return Qwen2RotaryEmbedding(transformers.Qwen2Config(**cfg.to_hf_dict()))


def _hf_powers(cfg) -> np.ndarray:
    """transformers' own float32 base ** (2i / dim), the step before its reciprocals."""
    import torch

    dim = cfg.dim_per_head
    return (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)).numpy()


def _correctly_rounded_powers(base: float, dim: int) -> np.ndarray:
    mpmath.mp.prec = 200
    return np.array([np.float32(float(mpmath.power(mpmath.mpf(base), mpmath.mpf(i) / dim)))
                     for i in range(0, dim, 2)], np.float32)


@pytest.mark.parametrize("dim", [64, 128])
def test_base_powers_are_correctly_rounded(dim):
    np.testing.assert_array_equal(base_powers(1e6, dim), _correctly_rounded_powers(1e6, dim))


@pytest.mark.parametrize("yarn", [False, True], ids=["plain", "yarn"])
@pytest.mark.parametrize("size", SIZES)
def test_frequency_tables_equal_transformers(size, yarn):
    """Bit for bit, wherever transformers' float32 power is itself correctly rounded. torch's vectorised powf is
    accurate to ~1 step: on some hosts one of its 64 powers at head_dim 128 lands on the far side of the rounding
    (1e6 ** (74/128): 0.514 steps from the exact value where the rounded one is 0.486). There ours is the
    correctly rounded neighbour, one step away, and every later float32 operation is still transformers'."""
    cfg = PRESETS[size]
    cfg = cfg.with_yarn() if yarn else cfg
    rotary = _hf_rotary(cfg)
    inv, scale = inv_frequencies(cfg)
    ref = rotary.inv_freq.numpy()
    assert inv.dtype == np.float32 and inv.shape == ref.shape == (cfg.dim_per_head // 2,)
    assert scale == rotary.attention_scaling
    exact_power = _hf_powers(cfg) == _correctly_rounded_powers(cfg.rope_theta, cfg.dim_per_head)
    assert exact_power.sum() >= len(exact_power) - 1, "transformers' powers are not what this test assumes"
    np.testing.assert_array_equal(inv[exact_power], ref[exact_power])
    off = np.abs(inv[~exact_power].view(np.int32) - ref[~exact_power].view(np.int32))
    assert np.all(off <= 1), f"frequencies more than one float32 step from transformers': {off}"


def _far_logits(cfg, start: int, n: int = 24, seed: int = 0):
    model = hf_model(cfg)
    params = params_from_hf(cfg, model)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, n))
    positions = np.arange(start, start + n)[None]
    return np.asarray(qcjax.logits(cfg, params, tokens, positions=positions)), hf_logits(model, tokens, positions)


@pytest.mark.parametrize("start", [16_384, 30_000])
def test_logits_at_far_positions_match_transformers(start):
    cfg = small(4, 2, 128, False).replace(max_position_embeddings=32768)
    ours, ref = _far_logits(cfg, start)
    assert_close_logits(ours, ref)


@pytest.mark.parametrize("start", [40_000, 100_000])
def test_yarn_logits_at_far_positions_match_transformers(start):
    cfg = small(4, 2, 128, False).replace(max_position_embeddings=32768).with_yarn()
    ours, ref = _far_logits(cfg, start)
    assert_close_logits(ours, ref)


@pytest.mark.parametrize("yarn, start", [(False, 30_000), (True, 100_000)])
def test_greedy_decoding_of_a_prompt_placed_far_out_equals_transformers(yarn, start):
    """A prompt at positions start.. through the KV cache, then token by token, each step at the next position:
    the tokens transformers picks when it reruns the whole sequence at the same positions."""
    import jax
    import jax.numpy as jnp

    cfg = small(4, 2, 128, False).replace(max_position_embeddings=32768)
    cfg = cfg.with_yarn() if yarn else cfg
    model = hf_model(cfg)
    params = params_from_hf(cfg, model)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 12))
    new = 10
    run = jax.jit(lambda t, p, c: qcjax.model.Qwen2(cfg).apply({"params": params}, t, p, None, c))
    logits, cache = run(jnp.asarray(tokens), jnp.arange(start, start + 12)[None], qcjax.model.init_cache(cfg, 1, 32,
                                                                                                 jnp.float32))
    ours = [int(jnp.argmax(logits[0, -1]))]
    for i in range(new - 1):
        logits, cache = run(jnp.asarray([[ours[-1]]]), jnp.asarray([[start + 12 + i]]), cache)
        ours.append(int(jnp.argmax(logits[0, -1])))
    seq = tokens
    for _ in range(new):
        ref = hf_logits(model, seq, np.arange(start, start + seq.shape[1])[None])
        seq = np.concatenate([seq, [[int(np.argmax(ref[0, -1]))]]], axis=1)
    assert len(set(ours)) > 2 and ours == seq[0, 12:].tolist()
