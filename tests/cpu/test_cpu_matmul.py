"""The CPU decode matmul (qcjax.cpu.matmul): the C++ kernel against float64 numpy, and where the model uses it."""
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from qcjax import platform
from qcjax.cpu import build, matmul
from qcjax.inference import programs, rows
from qcjax.config import ModelConfig
from qcjax.model import init_params

pytestmark = pytest.mark.skipif(not build.available(), reason="no C++ compiler to build the CPU kernel")


def _exact(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _assert_is_the_matmul(got, x, w, msg=""):
    # bf16 products are exact in float32: only the float32 sums differ from float64
    np.testing.assert_allclose(np.asarray(got), _exact(x) @ _exact(w).T, rtol=1e-5, atol=1e-5 * np.sqrt(x.shape[1]),
                               err_msg=msg)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m, k, n", [(1, 896, 1000), (3, 64, 37), (8, 72, 515), (5, 40, 16), (20, 64, 48),
                                     (40, 96, 33), (64, 32, 20)])
def test_rows_matmul_matches_float64(dtype, m, k, n):
    # k = 40 / 72 leave tails past the 16- and 32-wide vector loops and AMX's 32-wide k steps; n = 1000 / 515 split
    # over several threads' chunks and leave rows past AMX's 16-row tiles; m = 20 / 40 / 64 take 2 / 3 / 4 blocks of
    # 16 x rows on AMX's tiles (bf16), 3 / 5 / 8 blocks of 8 in the vector loop
    rng = np.random.default_rng(m * k + n)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    w = jnp.asarray(rng.normal(size=(n, k)), dtype)
    got = jax.jit(matmul.rows_matmul)(x, w)
    assert got.dtype == jnp.float32 and got.shape == (m, n)
    _assert_is_the_matmul(got, x, w)


def test_rows_matmul_gradient_is_the_matmuls():
    rng = np.random.default_rng(0)
    x, w = jnp.asarray(rng.normal(size=(2, 48)), jnp.float32), jnp.asarray(rng.normal(size=(24, 48)), jnp.float32)
    loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w))))  # noqa: E731
    got = jax.grad(loss(matmul.rows_matmul), argnums=(0, 1))(x, w)
    want = jax.grad(loss(lambda x, w: x @ w.T), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def _rows(m, dtype=jnp.float32):
    return jnp.zeros((m, 16), dtype), jnp.zeros((4, 16), dtype)


def test_a_multi_device_mesh_keeps_xla():
    for dt, most in matmul.MAX_ROWS.items():  # decode and verify steps; more rows are a prompt's GEMM
        assert matmul.applies(*_rows(most, dt)) and not matmul.applies(*_rows(most + 1, dt))
    mesh = jax.make_mesh((len(jax.devices()),), ("tensor",))
    with jax.set_mesh(mesh):
        assert matmul.applies(*_rows(1, jnp.bfloat16)) == (mesh.size == 1)


def test_bad_shapes_name_both():
    with pytest.raises(ValueError, match=r"x \(2, 8\) float32 and w \(4, 9\) float32"):
        matmul.rows_matmul(jnp.zeros((2, 8)), jnp.zeros((4, 9)))


CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position_embeddings=256, tie_word_embeddings=True)


def _compiled(fn, *args, **kw) -> str:
    return fn.lower(*args, **kw).compile().as_text()


def test_a_decode_step_takes_the_kernels_and_copies_no_layer_weights():
    # the tied head: the [vocab, embed] table read in its stored order (rows_matmul); the layers' seven projections:
    # the stacked kernel reading each layer of the weight stacks in place (qcjax.cpu.layers)
    params = init_params(CFG, jax.random.key(0))
    pool = programs.init_pool(CFG, num_pages=8, page_size=16, dtype=jnp.float32)
    r = programs.Rows(jnp.arange(8, dtype=jnp.int32).reshape(2, 4), jnp.array([20, 2]), jnp.array([4, 6]),
                      jnp.zeros(2, jnp.int32), jnp.zeros(2, bool))
    c = rows.controls([None, None], 2, lambda x, names: jnp.asarray(x))
    decode = _compiled(programs.decode, CFG, rows.GREEDY_KINDS, params, pool, r, c, steps=4)
    assert decode.count(f'custom_call_target="{build.MATMUL_TARGET}"') == 1
    assert decode.count(f'custom_call_target="{build.STACKED_TARGET}"') == 7
    # no dynamic-slice takes a whole layer of a weight stack (XLA's copy of the layer inside the model's scan)
    kernels = {tuple(v.shape[1:]) for v in jax.tree.leaves(params["layers"]) if v.ndim >= 3}
    slices = re.findall(r"\[1,([\d,]+)\][^\n]*dynamic-slice\(", decode)
    sliced = {tuple(int(d) for d in s.split(",")[1:]) for s in slices}
    assert kernels and not kernels & sliced, kernels & sliced


def test_a_build_failure_warns_and_keeps_xla(monkeypatch):
    def fail(march="native"):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(build, "_build", fail)
    build._library.cache_clear()
    build._load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU kernels are unavailable.*no C\\+\\+ compiler"):
            assert not build.available()
        assert not matmul.applies(*_rows(1))
        assert platform.choose("attention", platform="cpu") == "xla"  # "auto" falls back to XLA
    finally:
        monkeypatch.undo()
        build._library.cache_clear()
    assert build.available()


def _x86_flags() -> set[str]:
    line = build._cpu_flags()  # the line the build cache is keyed on
    return set(line.split()) if line.startswith("flags") else set()


# What this CPU's own (-march=native) build compiles out, built for an older x86 level the CPU also runs: the AVX2
# path (8-float vectors, several accumulators per row, x widened once for bf16) on an AVX-512 host, AVX-512 without
# its bf16 dot products on an AMX host.
ISA_LEVELS = {"x86-64-v3": {"avx2", "fma", "f16c"}, "x86-64-v4": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}


def test_the_native_build_uses_this_cpus_vectors():
    # -march=native must have switched on what /proc/cpuinfo lists: 16-float vectors with AVX-512, AMX tiles for bf16
    # with AMX (Linux grants the tile state to any process that asks)
    flags = _x86_flags()
    if not flags:
        pytest.skip("not an x86 CPU")
    lib, _ = build._load()
    assert lib.QcjaxLanes() == (16 if "avx512f" in flags else 8)
    assert build.amx_bf16() == ("amx_bf16" in flags)


@pytest.mark.parametrize("march", sorted(ISA_LEVELS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_older_instruction_sets_match_float64(march, dtype):
    if not ISA_LEVELS[march] <= _x86_flags():
        pytest.skip(f"this CPU cannot run {march} code")
    _, target = build._load(march)
    for m, k, n in [(1, 72, 300), (2, 40, 37), (3, 896, 64), (8, 72, 515), (11, 64, 33)]:
        rng = np.random.default_rng(m * k + n)
        x = jnp.asarray(rng.normal(size=(m, k)), dtype)
        w = jnp.asarray(rng.normal(size=(n, k)), dtype)
        got = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32))(x, w)
        _assert_is_the_matmul(got, x, w, f"{march} {dtype} m={m} k={k} n={n}")
