"""On a CUDA GPU only (skipped elsewhere): our Triton kernels compiled for real, not interpreted, compute what the
XLA reference computes, and the sampler on the GPU gives transformers' greedy tokens.

    JAX_PLATFORMS=cuda python -m pytest tests/test_gpu.py     # conftest pins the CPU unless JAX_PLATFORMS is set

fp32 comparisons run at jax's "highest" matmul precision (Triton dots in IEEE fp32, XLA's without TF32) and with
torch's TF32 off: jax's GPU default, TF32, is a different computation, not a looser test.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcjax.attention import attend
from qcjax.attention.xla import xla_attention

from test_attention import RATIOS, SMALL_BLOCKS, _run, assert_close, assert_matches_reference, packed_segments, qkv
from test_attention_decode import SMALL_BLOCKS as DECODE_SMALL
from test_attention_decode import ragged_cache

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU (JAX_PLATFORMS=cuda)")

BLOCKS = {"default": None, "small": SMALL_BLOCKS["pallas_gpu"]}  # None: the chip's tiles fitted to its shared memory
# GPU time is scarce (each case compiles its kernels): head_dim 64 and 128 and three group sizes here; every ratio
# runs in interpret mode on the CPU (test_attention.py, test_attention_decode.py).
FLASH_RATIOS = ["0.5b-14/2-hd64", "1.5b-12/2", "32b-40/8"]
CACHE_CASES = [(r, "default") for r in RATIOS] + [("7b-28/4", "small")]


@pytest.fixture(autouse=True)
def _fp32_is_fp32():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("ratio", FLASH_RATIOS)
def test_flash_kernel_matches_reference_fp32(ratio, blocks):
    h, kvh, d = RATIOS[ratio]
    rng = np.random.default_rng(1)
    t = 397  # odd, several default tiles
    q, k, v = qkv(rng, 2, t, t, h, kvh, d)
    seg = jnp.asarray(packed_segments(rng, 2, t))
    do = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    ours = jax.jit(lambda *a: _run("pallas_gpu", *a, block_sizes=BLOCKS[blocks], interpret=False))(q, k, v, seg, do)
    assert_matches_reference(ours, q, k, v, seg, do, jnp.float32, f"{ratio} {blocks}")


@pytest.mark.parametrize("ratio", ["0.5b-14/2-hd64", "7b-28/4"])
def test_flash_kernel_matches_reference_bf16(ratio):
    h, kvh, d = RATIOS[ratio]
    rng = np.random.default_rng(2)
    t = 1000
    q, k, v = qkv(rng, 2, t, t, h, kvh, d, jnp.bfloat16)
    seg = jnp.asarray(packed_segments(rng, 2, t))
    do = jnp.asarray(rng.normal(size=q.shape), jnp.bfloat16)
    ours = jax.jit(lambda *a: _run("pallas_gpu", *a, interpret=False))(q, k, v, seg, do)
    assert all(x.dtype == jnp.bfloat16 for x in ours)
    assert_matches_reference(ours, q, k, v, seg, do, jnp.bfloat16, ratio)


@pytest.mark.parametrize("ratio, blocks", CACHE_CASES)
def test_cache_kernel_matches_reference(ratio, blocks):
    """Ragged lengths from empty to nearly full; one and several new tokens; fp32 and bf16."""
    h, kvh, d = RATIOS[ratio]
    bs = None if blocks == "default" else DECODE_SMALL["pallas_gpu"]
    rng = np.random.default_rng(3)
    for dtype, new in ((jnp.float32, [1, 1, 1, 1]), (jnp.bfloat16, [3, 1, 2, 1])):
        q, k, v = qkv(rng, 4, max(new), 1024, h, kvh, d, dtype)
        q_seg, kv_seg, off = ragged_cache([0, 31, 600, 1020], new, max(new), 1024)
        ours = jax.jit(lambda *a: attend(*a, scale=d**-0.5, impl="pallas_gpu", decode_block_sizes=bs,
                                         interpret=False))(q, k, v, q_seg, kv_seg, off)
        assert ours.dtype == dtype
        assert_close(ours, xla_attention(q, k, v, q_seg, kv_seg, off, scale=d**-0.5), dtype, f"{ratio} {dtype}")


@pytest.fixture
def torch_cuda_fp32():
    """torch on the GPU with fp32 matmuls in fp32 (no TF32), restored afterwards."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("tied", [True, False], ids=["tied-14/2-hd64", "untied-4/2"])
def test_sampler_greedy_on_gpu_equals_transformers(tied, torch_cuda_fp32):
    """The whole sampler on the GPU (prefill through the flash kernel, decode through the cache kernel): a batch of
    different-length prompts, each row equal to transformers' generate on that prompt alone, on the same GPU."""
    from qcjax.inference import generate

    from conftest import hf_model, params_from_hf
    from test_inference import CFG_TIED, CFG_UNTIED, NEW, hf_greedy, prompts_of

    cfg = (CFG_TIED if tied else CFG_UNTIED).replace(attention_impl="auto")
    model = hf_model(cfg)
    params = params_from_hf(cfg, model)
    model = model.cuda()
    prompts = prompts_of(cfg, [11, 5, 16, 1], seed=1)
    got = generate(cfg, params, prompts, max_new_tokens=NEW, cache_dtype=jnp.float32)
    want = [hf_greedy(model, p, NEW, device="cuda") for p in prompts]
    assert max(len(set(w)) for w in want) > 3, "reference output too repetitive to be a meaningful comparison"
    assert [g.tokens for g in got] == want
