"""The kernels are valid accelerator programs, proven on this CPU machine:

- TPU: with libtpu installed, JAX compiles ahead of time for TPU topologies and Mosaic really lowers the Pallas
  kernels (too-large blocks fail with a VMEM error). The model's attention, forward and backward, and the cache
  decode kernel compile for v5e 2x2 and v5p 2x2x1 slices with the default block sizes.
- GPU: our Triton kernels lower to Triton IR for CUDA (`jax.export` for platform "cuda"): tile shapes and every
  op inside the kernels are accepted by the Pallas Triton lowering. (Compiling that IR to PTX needs a GPU.)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding

from qcjax.attention import attend, decode, gpu, resolve_impl
from qcjax.sharding import logical_to_spec
from qcjax.tpu_compile import LIBTPU_HINT, has_libtpu, memory_report, parse_topology, topology_mesh

from test_attention import RATIOS

needs_libtpu = pytest.mark.skipif(not has_libtpu(), reason=f"libtpu not installed ({LIBTPU_HINT}): cannot compile "
                                  "for TPU")

TOPOLOGIES = ("v5e-4", "v5p-8")  # 4 chips each: v5e 2x2, v5p 2x2x1
Q_AXES = ("act_batch", "act_length", "act_heads", "act_head_dim")
KV_AXES = ("act_batch", "act_length", "act_kv_heads", "act_head_dim")


def tpu_mesh(name: str):
    """A (data 1, fsdp 2, tensor 2) mesh over a compile-only TPU slice."""
    return topology_mesh(name, {"data": 1, "fsdp": 2, "tensor": 2})


def _abstract(mesh, shape, names, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, logical_to_spec(names, shape, mesh)))


def _fits(compiled, topology: str) -> None:
    m = memory_report(compiled, parse_topology(topology).hbm_bytes)
    assert m.fits, m.format()


@needs_libtpu
@pytest.mark.parametrize("ratio", ["0.5b-14/2-hd64", pytest.param("32b-40/8", marks=pytest.mark.slow)])
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_training_attention_compiles_for_tpu(topology, ratio):
    """"auto" on a TPU mesh is splash: forward and both backward kernels lower through Mosaic, default blocks."""
    h, kvh, d = RATIOS[ratio]
    mesh = tpu_mesh(topology)
    b, t = 4, 2048  # 4 blocks of the default 512
    q = _abstract(mesh, (b, t, h, d), Q_AXES)
    kv = _abstract(mesh, (b, t, kvh, d), KV_AXES)
    seg = _abstract(mesh, (b, t), ("act_batch", "act_length"), jnp.int32)

    def loss(q, k, v, seg):
        return jnp.sum(attend(q, k, v, seg, seg, scale=d**-0.5).astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
        assert resolve_impl("auto") == "pallas_tpu"
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
    hlo = compiled.as_text()
    for kernel in ("splash_mqa_fwd", "splash_mqa_dq", "splash_mqa_dkv"):
        assert kernel in hlo, f"{kernel} missing from the TPU program"
    _fits(compiled, topology)


@needs_libtpu
@pytest.mark.parametrize("ratio", ["0.5b-14/2-hd64", "7b-28/4"])
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_cache_decode_compiles_for_tpu(topology, ratio):
    h, kvh, d = RATIOS[ratio]
    mesh = tpu_mesh(topology)
    b, t, max_len = 8, 2, 4096
    q = _abstract(mesh, (b, t, h, d), Q_AXES)
    cache = _abstract(mesh, (b, max_len, kvh, d), KV_AXES)
    q_seg = _abstract(mesh, (b, t), ("act_batch", "act_length"), jnp.int32)
    kv_seg = _abstract(mesh, (b, max_len), ("act_batch", "act_length"), jnp.int32)
    off = _abstract(mesh, (b,), ("act_batch",), jnp.int32)
    with jax.set_mesh(mesh):
        compiled = jax.jit(lambda *a: attend(*a, scale=d**-0.5)).lower(q, cache, cache, q_seg, kv_seg, off).compile()
    assert "qcjax_cache_attention_tpu" in compiled.as_text()
    _fits(compiled, topology)


# ---- GPU: Triton lowering ---------------------------------------------------------------------------------------
# The GPU the Triton kernels are lowered for (jax >= 0.11 asks for one: "No supported GPU devices found").
H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


def _export_cuda(fn, *args) -> str:
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    target = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=H100)
    with jax.sharding.use_abstract_mesh(target):
        return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args).mlir_module()


@pytest.mark.parametrize("ratio", ["0.5b-14/2-hd64", "32b-40/8"])
def test_gpu_flash_attention_lowers_to_triton(ratio):
    """Forward and both backward kernels, H100 default blocks, a length that needs padding."""
    h, kvh, d = RATIOS[ratio]
    b, t = 2, 1000
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, kvh, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
    off = jax.ShapeDtypeStruct((b,), jnp.int32)
    bs = gpu.default_block_sizes(H100.device_kind)

    def loss(q, k, v, seg, off):
        out = gpu.flash_attention(q, k, v, seg, seg, off, scale=d**-0.5, block_sizes=bs)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    mlir = _export_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, seg, off)
    for kernel in ("qcjax_flash_fwd", "qcjax_flash_bwd_dq", "qcjax_flash_bwd_dkv"):
        assert kernel in mlir


@pytest.mark.parametrize("ratio,new_tokens", [("0.5b-14/2-hd64", 1), ("32b-40/8", 4), ("7b-28/4", 300)])
def test_gpu_cache_attention_lowers_to_triton(ratio, new_tokens):
    h, kvh, d = RATIOS[ratio]
    b, max_len = 2, 4096
    q = jax.ShapeDtypeStruct((b, new_tokens, h, d), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((b, max_len, kvh, d), jnp.bfloat16)
    q_seg = jax.ShapeDtypeStruct((b, new_tokens), jnp.int32)
    kv_seg = jax.ShapeDtypeStruct((b, max_len), jnp.int32)
    off = jax.ShapeDtypeStruct((b,), jnp.int32)
    bs = decode.default_block_sizes(H100.device_kind)
    fn = functools.partial(decode.gpu_cache_attention, scale=d**-0.5, block_sizes=bs)
    assert "qcjax_cache_attention_gpu" in _export_cuda(fn, q, cache, cache, q_seg, kv_seg, off)
