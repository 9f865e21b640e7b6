"""The CPU layer loop for decode steps (qcjax.cpu.layers): the stacked-weight kernel (stacked.cc) against float64,
the loop against the model's own layer scan, and that the decode program runs it (and nothing copies the weights)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from qcjax import adapters, platform, row_lora
from flax import linen as nn

from qcjax.config import Adaptation, LoraSpec, ModelConfig
from qcjax.cpu import build, layers
from qcjax.model import init_params

pytestmark = pytest.mark.skipif(not build.available(), reason="no C++ compiler to build the CPU kernels")


def _quantized(rng, l, k, n, scale_dtype):
    """qwix's int8 kernel form, built directly: values [L, K, N], one scale per output column [L, 1, N]."""
    from qwix._src.core.qarray import QArray
    from qwix._src.providers.ptq import WithAux

    q = jnp.asarray(rng.integers(-127, 128, size=(l, k, n)), jnp.int8)
    s = jnp.asarray(rng.uniform(0.001, 0.01, size=(l, 1, n)), scale_dtype)
    return WithAux(QArray(qvalue=q, scale=s, zero_point=None, qtype="int8"), None), (q, s)


def _as64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


# m: 1 and 8 rows (decode batches), 3 and 11 (a tail, two blocks of 8); k: tails past the 4-row groups; k >= 128:
# chunks of whole rows whose sums are added in order; n = 1100 at 8 rows: column blocks; n = 37: past the vectors;
# 2 and 4 rows: several 32-column strips at once (bf16 rows)
SHAPES = [(1, 64, 48), (3, 130, 37), (8, 64, 1100), (11, 256, 40), (1, 645, 300), (5, 645, 70), (2, 134, 300),
          (4, 96, 600)]


@pytest.mark.parametrize("dtype, x_dtype", [("float32", "float32"), ("bfloat16", "float32"), ("int8", "float32"),
                                            ("int8_f32_scale", "float32"), ("bfloat16", "bfloat16"),
                                            ("int8", "bfloat16"), ("float32", "bfloat16")])
def test_stacked_matmul_reads_one_layer_and_matches_float64(dtype, x_dtype):
    # bf16 rows against bf16 / int8 weights take the bf16 dot products (where the CPU has them); against float32
    # weights (a bf16 model with float32 params) they are widened
    for m, k, n in SHAPES:
        rng = np.random.default_rng(m * k + n)
        x = jnp.asarray(rng.normal(size=(m, k)), x_dtype)
        if dtype.startswith("int8"):
            kernel, (q, s) = _quantized(rng, 3, k, n, jnp.float32 if dtype == "int8_f32_scale" else jnp.bfloat16)
            w = _as64(q[2]) * _as64(s[2])
        else:
            kernel = jnp.asarray(rng.normal(size=(3, k, n)), dtype)
            w = _as64(kernel[2])
        got = jax.jit(layers.stacked_matmul)(x, kernel, jnp.int32(2))
        assert got.dtype == jnp.float32 and got.shape == (m, n)
        # products are exact in float32 (bf16 / int8 weights widen exactly); only the float32 sums (and the int8
        # scale applied to the sum) differ from float64
        np.testing.assert_allclose(np.asarray(got), _as64(x) @ w, rtol=1e-5, atol=1e-5 * np.sqrt(k) * np.abs(w).max(),
                                   err_msg=f"{dtype} m={m} k={k} n={n}")


def test_stacked_matmul_contracts_several_input_dims():
    # o_proj's kernel is [L, heads, head_dim, embed]
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(2, 4, 8, 24)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 32)), jnp.float32)
    got = layers.stacked_matmul(x, w, jnp.int32(1), n_in=2)
    np.testing.assert_allclose(np.asarray(got), _as64(x) @ _as64(w[1]).reshape(32, 24), rtol=1e-5, atol=1e-5)


CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position_embeddings=256, tie_word_embeddings=True)


def _decode_step(cfg, params, monkeypatch, kernels: str, lora=None, t: int = 1):
    """Hidden states and pool of one decode step (t tokens a row: a verify step when t > 1) for 3 rows at ragged
    lengths, on a paged cache holding noise; and the program's text. lora: (bank, slot per row) of per-row adapters
    (qcjax.row_lora)."""
    monkeypatch.setenv("QCJAX_CPU_KERNELS", kernels)  # read when the program is traced: a fresh function below
    dt = jnp.dtype(cfg.dtype)
    shape = (cfg.num_layers, 12, 16, cfg.num_kv_heads * cfg.dim_per_head)
    cache = {"k": jax.random.normal(jax.random.key(1), shape).astype(dt),
             "v": jax.random.normal(jax.random.key(2), shape).astype(dt),
             "lengths": jnp.array([5, 17, 40], jnp.int32), "pages": jnp.arange(12, dtype=jnp.int32).reshape(3, 4)}
    tokens = (jnp.array([[3], [77], [200]], jnp.int32) + jnp.arange(t, dtype=jnp.int32)) % cfg.vocab_size
    def step(p, t, c, lora):
        with row_lora.applied(*(lora or (None, None))):
            return adapters.module_for(cfg, p).apply({"params": p}, t, None, None, c, method="hidden_states")

    lowered = jax.jit(step).lower(params, tokens, cache, lora)
    hidden, cache = lowered.compile()(params, tokens, cache, lora)
    return hidden.astype(jnp.float32), cache, lowered.as_text()


# t = 12: 36 tokens, a verify step past one block of 8 rows (the kernels take up to MAX_TOKENS)
@pytest.mark.parametrize("dtype, quant, tol, t", [("float32", "none", 2e-6, 1), ("bfloat16", "int8", None, 1),
                                                  ("float32", "none", 2e-6, 12), ("bfloat16", "none", None, 12)])
def test_the_layer_loop_is_the_models_scan(dtype, quant, tol, t, monkeypatch):
    cfg = CFG.replace(param_dtype=dtype, dtype=dtype)
    params = jax.jit(lambda: init_params(cfg, jax.random.key(0)))()
    if quant != "none":
        params = adapters.quantize(cfg, params, quant)
    got, got_cache, text = _decode_step(cfg, params, monkeypatch, "1", t=t)
    want, want_cache, off = _decode_step(cfg, params, monkeypatch, "0", t=t)
    assert text.count(build.STACKED_TARGET) == 7 and build.STACKED_TARGET not in off
    scale = float(jnp.abs(want).max())
    # float32: the same math but the kernel's order of sums (2e-6 of the largest value); bf16: values are rounded to
    # bf16 between ops on both sides, so a different sum order moves a value by up to a few bf16 steps (2^-8
    # relative: 4 steps of the largest value); int8: the same, the scale applied after the sum instead of before
    bound = scale * (tol or 4 * 2.0**-8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=bound, rtol=0)
    for name in ("k", "v"):
        np.testing.assert_allclose(np.asarray(got_cache[name], np.float32), np.asarray(want_cache[name], np.float32),
                                   atol=float(jnp.abs(want_cache[name].astype(jnp.float32)).max()) * (tol or 2**-6))


def test_the_layer_loop_adds_each_rows_adapter_as_the_model_does(monkeypatch):
    """Per-row LoRA adapters (two slots over every projection; rows on slot 1, none, slot 0): the loop's decode step
    equals the model's scan with the same adapters, which differs from the base's."""
    params = jax.jit(lambda: init_params(CFG, jax.random.key(0)))()
    rng = np.random.default_rng(0)
    bank = row_lora.empty_bank(CFG, 2, 4, adapters.PROJECTIONS, jnp.float32)
    for slot in (0, 1):
        ad = {t: {"a": rng.normal(0, 0.3, bank[t]["a"].shape[:1] + bank[t]["a"].shape[2:]),
                  "b": rng.normal(0, 0.3, bank[t]["b"].shape[:1] + bank[t]["b"].shape[2:])}
              for t in adapters.PROJECTIONS}
        bank = row_lora.put(bank, jnp.int32(slot), ad, jnp.float32(0.5 + slot))
    lora = (bank, jnp.array([1, -1, 0], jnp.int32))
    got, _, text = _decode_step(CFG, params, monkeypatch, "1", lora)
    want, _, off = _decode_step(CFG, params, monkeypatch, "0", lora)
    base, _, _ = _decode_step(CFG, params, monkeypatch, "0")
    assert text.count(build.STACKED_TARGET) == 7 and build.STACKED_TARGET not in off
    assert text.count(build.LORA_TARGET) == 7 and build.LORA_TARGET not in off  # each row's adapter, in place
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6 * scale, rtol=0)
    assert np.abs(np.asarray(want - base)[[0, 2]]).max() > 0.01 * scale  # the adapters change rows 0 and 2 ...
    np.testing.assert_allclose(np.asarray(want[1]), np.asarray(base[1]), atol=2e-6 * scale, rtol=0)  # ... not 1


def test_prompts_and_switched_off_kernels_keep_the_models_scan(monkeypatch):
    params = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))  # applies() reads shapes and dtypes
    cfg = CFG
    x = jnp.zeros((1, layers.MAX_TOKENS + 1, 64), jnp.float32)  # a prompt chunk: XLA's GEMMs
    cache = (jnp.zeros((2, 4, 16, 32)), jnp.zeros((2, 4, 16, 32)), jnp.zeros((1, 4), jnp.int32))
    args = (cfg, params["layers"], (x, cache), None, None, None, None, None)
    assert not layers.applies(*args)
    step = (cfg, params["layers"], (x[:, :1], cache), None, None, None, None, None)
    assert layers.applies(*step)
    assert not layers.applies(cfg, None, (x[:, :1], cache), None, None, None, None, None)  # init: no params yet
    for other in (Adaptation(quant="nf4"), Adaptation(lora=LoraSpec(rank=2))):  # trees the kernels cannot read
        tree = nn.meta.unbox(adapters.abstract_params(cfg, other))
        assert not layers.applies(cfg, tree["layers"], *step[2:]), other
    monkeypatch.setenv("QCJAX_CPU_KERNELS", "0")
    assert platform.plugin("layers", "cpu") is None


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64-v4"])
def test_older_instruction_sets_match_float64(march):
    # what this CPU's own build compiles out: AVX2 (8-float vectors), AVX-512 without bf16 dot products (bf16 rows
    # then widen to float32); the builds test_cpu_matmul.py makes, so the cache has them
    needs = {"x86-64-v3": {"avx2", "fma", "f16c"}, "x86-64-v4": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}
    line = build._cpu_flags()
    if not line.startswith("flags") or not needs[march] <= set(line.split()):
        pytest.skip(f"this CPU cannot run {march} code")
    build._load(march)
    target = f"{build.STACKED_TARGET}_{march}"
    rng = np.random.default_rng(1)
    m, k, n = 3, 130, 37
    kernel, (q, s) = _quantized(rng, 2, k, n, jnp.bfloat16)
    for x_dtype, w, want_w in [("bfloat16", q, _as64(q[1]) * _as64(s[1])),
                               ("float32", jnp.asarray(rng.normal(size=(2, k, n)), jnp.float32), None)]:
        x = jnp.asarray(rng.normal(size=(m, k)), x_dtype)
        want_w = _as64(w[1]) if want_w is None else want_w
        scale = s.reshape(2, n) if w.dtype == jnp.int8 else jnp.zeros((0,), jnp.float32)
        got = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32))(x, w, jnp.int32(1), scale)
        np.testing.assert_allclose(np.asarray(got), _as64(x) @ want_w, rtol=1e-5,
                                   atol=1e-5 * np.sqrt(k) * np.abs(want_w).max(), err_msg=f"{march} {x_dtype}")
