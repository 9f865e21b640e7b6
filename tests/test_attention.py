"""The attention switch and the training kernels: every Pallas kernel (interpret mode on CPU) computes what the XLA
reference computes, outputs and gradients, with packed segments, odd lengths and every GQA ratio of the family.

Also the shared inputs of the other attention test files (test_attention_decode.py, test_attention_compile.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcjax.attention import attend, gpu, resolve_impl, tpu
from qcjax.attention.xla import xla_attention
from qcjax.config import ATTENTION_IMPLS, get_config
from qcjax.sharding import make_mesh

# ---- shared inputs ---------------------------------------------------------------------------------------------
# (query heads, KV heads, head dim) of every Qwen2.5-Coder size; heads kept real, sequences short (interpret mode).
RATIOS = {
    "0.5b-14/2-hd64": (14, 2, 64),
    "1.5b-12/2": (12, 2, 128),
    "3b-16/2": (16, 2, 128),
    "7b-28/4": (28, 4, 128),
    "32b-40/8": (40, 8, 128),
}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # max |kernel - reference| <= TOL * max |reference|


def packed_segments(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """[batch, length] int32: each row packs 2-3 documents of random lengths (ids 1, 2, ...), then padding (0)."""
    seg = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length - 4), size=int(rng.integers(2, 4)), replace=False))
        ids = np.searchsorted(cuts, np.arange(length), side="right") + 1  # 1, 2, ... between cuts
        seg[b] = ids
        seg[b, length - int(rng.integers(1, 5)):] = 0  # trailing padding
    return seg


def qkv(rng, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype=jnp.float32):
    shapes = [(batch, q_len, heads, head_dim)] + [(batch, kv_len, kv_heads, head_dim)] * 2
    return tuple(jnp.asarray(rng.normal(size=s), dtype) for s in shapes)


def assert_close(ours, ref, dtype, what: str = "output") -> None:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(ours)), f"{what}: non-finite values"
    err, scale = np.max(np.abs(ours - ref)), np.max(np.abs(ref))
    assert err <= TOL[dtype] * scale, f"{what}: max |diff| {err:.3g} > {TOL[dtype]} x max |ref| {scale:.3g}"


@pytest.mark.parametrize("length, blocks", [pytest.param(37, 8, marks=pytest.mark.slow),
                                            pytest.param(64, 8, marks=pytest.mark.slow), (20, 3)])  # fast: one
def test_causal_query_blocks_compute_the_one_block_attention(length, blocks):
    """The prefill form (qcjax.attention.xla.PROMPT_QUERY_BLOCKS): uneven blocks, packed segments, padding, GQA."""
    rng = np.random.default_rng(length)
    q, k, v = qkv(rng, 2, length, length, 14, 2, 64)
    seg = jnp.asarray(packed_segments(rng, 2, length))
    off = jnp.zeros(2, jnp.int32)
    one = xla_attention(q, k, v, seg, seg, off, scale=0.125)
    assert_close(xla_attention(q, k, v, seg, seg, off, scale=0.125, query_blocks=blocks), one, jnp.float32)

# Small tiles so that even short test sequences span several blocks (causal skipping, multi-block online softmax).
SMALL_BLOCKS = {"pallas_tpu": tpu.BlockSizes(*[128] * 8), "pallas_gpu": gpu.BlockSizes(*[32] * 6)}
KERNELS = list(SMALL_BLOCKS)


def _run(impl, q, k, v, seg, do, **kw):
    """(output, dq, dk, dv) of attend under `impl` with cotangent `do`."""
    scale = q.shape[-1] ** -0.5
    f = lambda q, k, v: attend(q, k, v, seg, seg, scale=scale, impl=impl, **kw)
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(do))


@jax.jit
def _reference(q, k, v, seg, do):
    return _run("xla", q, k, v, seg, do)


def _kernel(impl, q, k, v, seg, do):
    return jax.jit(lambda *a: _run(impl, *a, block_sizes=SMALL_BLOCKS[impl]))(q, k, v, seg, do)


def assert_matches_reference(ours, q, k, v, seg, do, dtype, what: str) -> None:
    """(output, dq, dk, dv) of a kernel against the XLA reference's, each within TOL[dtype]."""
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, _reference(q, k, v, seg, do)):
        assert_close(a, b, dtype, f"{what} {name}")


# ---- the switch ------------------------------------------------------------------------------------------------
def test_every_config_name_resolves_to_an_implementation_the_switch_runs():
    for name in ATTENTION_IMPLS:
        assert get_config("tiny", attention_impl=name).attention_impl == name
        for platform in ("cpu", "tpu", "gpu"):
            assert resolve_impl(name, platform) in set(ATTENTION_IMPLS) - {"auto"}
    with pytest.raises(ValueError, match="attention impl 'flash' unknown"):
        resolve_impl("flash", "cpu")


@pytest.mark.parametrize("platform,expected", [("tpu", "pallas_tpu"), ("gpu", "pallas_gpu")])
def test_auto_picks_the_platform_kernel(platform, expected):
    assert resolve_impl("auto", platform) == expected
    assert resolve_impl("xla", "tpu") == "xla"  # config can force any impl


def test_auto_on_the_cpu_takes_the_cpu_kernels_unless_they_are_off(monkeypatch):
    from qcjax.cpu import build

    assert resolve_impl("auto", "cpu") == ("cpu" if build.available() else "xla")
    monkeypatch.setenv("QCJAX_CPU_KERNELS", "0")  # read when a program is built, not frozen for the process
    assert resolve_impl("auto", "cpu") == "xla"


def test_unknown_impl_names_the_choices():
    with pytest.raises(ValueError, match="flash.*pallas_gpu"):
        resolve_impl("flash")


def test_training_attention_on_the_cpu_is_the_reference():
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng, 2, 33, 33, 4, 2, 16)
    seg = jnp.asarray(packed_segments(rng, 2, 33))
    ours = attend(q, k, v, seg, seg, scale=0.25)
    np.testing.assert_array_equal(ours, xla_attention(q, k, v, seg, seg, jnp.zeros(2, jnp.int32), scale=0.25))


def test_pallas_off_platform_without_interpret_is_refused():
    q, k, v = qkv(np.random.default_rng(0), 1, 16, 16, 2, 1, 64)
    seg = jnp.ones((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="'pallas_tpu' needs a tpu device; the target is cpu"):
        attend(q, k, v, seg, seg, scale=0.125, impl="pallas_tpu", interpret=False)
    with pytest.raises(ValueError, match="'cudnn' needs a gpu/cuda device"):
        attend(q, k, v, seg, seg, scale=0.125, impl="cudnn", interpret=False)
    with pytest.raises(ValueError, match="cudnn.*no interpret mode"):
        attend(q, k, v, seg, seg, scale=0.125, impl="cudnn")


# ---- training kernels vs the reference -------------------------------------------------------------------------
# The not-slow set keeps one GQA ratio per test (hd64 in fp32, hd128 in bf16); the others run with the slow tests.
@pytest.mark.parametrize("ratio", [r if r == "0.5b-14/2-hd64" else pytest.param(r, marks=pytest.mark.slow)
                                   for r in RATIOS])
@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_matches_reference_fp32(impl, ratio):
    h, kvh, d = RATIOS[ratio]
    rng = np.random.default_rng(1)
    t = 157  # odd: padded inside the kernel wrapper
    q, k, v = qkv(rng, 2, t, t, h, kvh, d)
    seg = jnp.asarray(packed_segments(rng, 2, t))
    do = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    assert_matches_reference(_kernel(impl, q, k, v, seg, do), q, k, v, seg, do, jnp.float32, f"{impl} {ratio}")


@pytest.mark.parametrize("ratio", [pytest.param("0.5b-14/2-hd64", marks=pytest.mark.slow), "7b-28/4"])
@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_matches_reference_bf16(impl, ratio):
    h, kvh, d = RATIOS[ratio]
    rng = np.random.default_rng(2)
    t = 131
    q, k, v = qkv(rng, 2, t, t, h, kvh, d, jnp.bfloat16)
    seg = jnp.asarray(packed_segments(rng, 2, t))
    do = jnp.asarray(rng.normal(size=q.shape), jnp.bfloat16)
    ours = _kernel(impl, q, k, v, seg, do)
    assert all(x.dtype == jnp.bfloat16 for x in ours), "bf16 in, bf16 out (and bf16 gradients)"
    assert_matches_reference(ours, q, k, v, seg, do, jnp.bfloat16, f"{impl} {ratio}")


@pytest.mark.parametrize("impl", KERNELS)
def test_packed_documents_do_not_see_each_other(impl):
    """A document's outputs equal those of the document alone, and nothing flows back into the other document:
    a kernel that ignored segment ids (the bug another JAX codebase shipped on GPU) fails here."""
    h, kvh, d = RATIOS["0.5b-14/2-hd64"]
    rng = np.random.default_rng(3)
    a_len, b_len = 70, 60
    q, k, v = qkv(rng, 1, a_len + b_len, a_len + b_len, h, kvh, d)
    seg = jnp.asarray(np.r_[np.ones(a_len), np.full(b_len, 2)][None].astype(np.int32))
    scale = d**-0.5
    run = lambda q, k, v, seg: attend(q, k, v, seg, seg, scale=scale, impl=impl, block_sizes=SMALL_BLOCKS[impl])

    packed = jax.jit(run)(q, k, v, seg)
    alone = jax.jit(run)(q[:, a_len:], k[:, a_len:], v[:, a_len:], jnp.ones((1, b_len), jnp.int32))
    assert_close(packed[:, a_len:], alone, jnp.float32, "document B packed vs alone")

    # d(sum of B's outputs) / d(A's keys and values) must be exactly zero.
    dk, dv = jax.jit(jax.grad(lambda k, v: jnp.sum(run(q, k, v, seg)[:, a_len:]), argnums=(0, 1)))(k, v)
    assert np.all(np.asarray(dk[:, :a_len]) == 0) and np.all(np.asarray(dv[:, :a_len]) == 0)
    assert np.any(np.asarray(dk[:, a_len:]) != 0)


def test_gpu_kernel_honours_q_offset():
    """The GPU flash kernel takes q_offset like the reference (queries sit after q_offset earlier keys)."""
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 2, 64, 64, 4, 2, 64)
    seg = jnp.ones((2, 64), jnp.int32)
    off = jnp.asarray([0, 9], jnp.int32)
    ours = gpu.flash_attention(q, k, v, seg, seg, off, scale=0.125, block_sizes=SMALL_BLOCKS["pallas_gpu"],
                               interpret=True)
    assert_close(ours, xla_attention(q, k, v, seg, seg, off, scale=0.125), jnp.float32)


# ---- sharded over a mesh ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh_shape,heads", [
    ((2, 2, 2), (4, 2)),  # query and KV heads both split over tensor
    ((1, 2, 4), (4, 1)),  # query heads split, one KV head replicated: each shard slices its KV head
])
@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_under_a_mesh_matches_reference(impl, mesh_shape, heads):
    h, kvh = heads
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, 4, 100, 100, h, kvh, 64)
    seg = jnp.asarray(packed_segments(rng, 4, 100))
    do = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda *a: _run(impl, *a, block_sizes=SMALL_BLOCKS[impl]))
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, seg, do)), "the kernel must run under shard_map"
        ours = fn(q, k, v, seg, do)
    assert_matches_reference(ours, q, k, v, seg, do, jnp.float32, f"{impl} mesh {mesh_shape}")


# ---- per-chip GPU tiles ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L4"])
def test_gpu_default_tiles_fit_the_chips_shared_memory(kind):
    """The tuned tiles are for bf16; fp32 or a wider head shrinks them until each kernel's estimate fits (fp32 at
    head_dim 128 with the Hopper tiles failed to compile on an H200). bf16 at head_dim <= 128 keeps the table's."""
    from qcjax.attention import decode

    budget = next(v for key, v in gpu.SHARED_MEMORY_BUDGET if key in kind)
    table = next(b for key, b in gpu.DEFAULT_BLOCK_SIZES if key in kind)
    if kind != "NVIDIA L4":
        assert gpu.default_block_sizes(kind, 128, 2) == table
    for head_dim, itemsize in [(64, 2), (128, 2), (128, 4), (256, 2)]:
        bs = gpu.default_block_sizes(kind, head_dim, itemsize)
        bs.validate()
        assert max(gpu.shared_memory_estimate(bs, gpu.TILES, head_dim * itemsize).values()) <= budget
        cache = decode.default_block_sizes(kind, head_dim, itemsize)
        assert max(gpu.shared_memory_estimate(cache, decode.GPU_TILES, head_dim * itemsize).values()) <= budget
    assert gpu.default_block_sizes("cpu", 128, 4) == gpu.BlockSizes()  # interpret mode: nothing to fit


def test_gpu_fp32_tiles_are_the_ones_checked_on_an_h200():
    """These compiled and matched the reference on an H200 (tests/test_gpu.py, 2026-11-27); the unfitted ones
    asked Triton for 295424 bytes of shared memory where 232448 exist."""
    assert gpu.default_block_sizes("NVIDIA H200", 128, 4) == gpu.BlockSizes(64, 64, 64, 32, 32, 64, num_stages=2)


# ---- clear errors ----------------------------------------------------------------------------------------------
def test_unsupported_head_dim_is_named():
    q, k, v = qkv(np.random.default_rng(0), 1, 32, 32, 2, 1, 48)
    seg = jnp.ones((1, 32), jnp.int32)
    for impl in KERNELS:
        with pytest.raises(ValueError, match="head_dim=48"):
            attend(q, k, v, seg, seg, scale=0.1, impl=impl)


@pytest.mark.parametrize("impl,bs,message", [
    ("pallas_gpu", gpu.BlockSizes(block_q=48), "block_q=48: must be a power of two"),
    ("pallas_tpu", tpu.BlockSizes(block_kv_dq=200), "block_kv_dq=200: must be a positive multiple of 128"),
    ("pallas_tpu", tpu.BlockSizes(block_kv=512, block_kv_compute=384), "block_kv_compute=384 must divide block_kv=512"),
])
def test_bad_block_size_is_named(impl, bs, message):
    q, k, v = qkv(np.random.default_rng(0), 1, 32, 32, 2, 1, 64)
    seg = jnp.ones((1, 32), jnp.int32)
    with pytest.raises(ValueError, match=message):
        attend(q, k, v, seg, seg, scale=0.125, impl=impl, block_sizes=bs)


# ---- the model through the switch ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
def test_model_logits_and_grads_with_kernel(impl):
    """Qwen2 with cfg.attention_impl = a Pallas impl (interpret mode) gives the reference's logits and gradients
    on packed rows: the model's call reaches the kernels with its own segment ids."""
    from qcjax.model import Qwen2, init_params

    cfg = get_config("tiny", hidden_size=256, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=512)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(6)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 96)))
    seg = jnp.asarray(packed_segments(rng, 2, 96))

    def loss(params, impl):
        logits = Qwen2(cfg.replace(attention_impl=impl)).apply({"params": params}, tokens, segment_ids=seg)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) * (seg > 0)), logits

    (l_ref, logits_ref), g_ref = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, "xla")
    (l_k, logits_k), g_k = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, impl)
    assert_close(logits_k, logits_ref, jnp.float32, "logits")
    for path, a in jax.tree_util.tree_leaves_with_path(g_k):
        b = g_ref
        for key in path:
            b = b[key.key]
        assert_close(a, b, jnp.float32, f"grad {jax.tree_util.keystr(path)}")
