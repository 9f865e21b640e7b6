"""The Qwen2 decoder in Flax Linen, applied functionally: `Qwen2(cfg).apply({"params": params}, tokens, ...)`.

Layers are stacked with `nn.scan` (every layer param has a leading "layers" axis), so a 64-layer model compiles as
fast as a 2-layer one. Params and the main activations carry logical axis names; qcjax.sharding maps them to mesh
axes. Matmuls run in `cfg.dtype` with float32 accumulation; RMSNorm, RoPE, softmax and logits are float32.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from qcjax import platform, rope
from qcjax.attention import attend
from qcjax.config import ModelConfig
from qcjax.sharding import batch_shards, constrain

# Dense: {"k","v": [layers, batch, max_len, kv_heads * head_dim], "lengths": [batch] int32}. Paged (the inference
# engine's, qcjax.inference): {"k","v": [layers, pages, page_size, kv_heads * head_dim], "lengths": [batch],
# "pages": [batch, w] int32}, row b's position p at page pages[b, p // page_size]. The heads are merged into one
# minor dim (a multiple of 128 for every size of the family) so that TPUs tile the cache as [len, kv_heads *
# head_dim] without padding and keep one layout from the entry of the decode program through its loop: with
# [..., kv_heads, head_dim] minor dims (2-8 x 64-128) XLA:TPU's default layout put the length minor-most and copied
# the whole cache into the layout the per-layer write wants at every decode call (2x the cache in temporaries).
Cache = dict[str, jax.Array]


def _contract(a: jax.Array, b: jax.Array, a_dims, b_dims, out_dtype=None) -> jax.Array:
    """dot_general over the given dims (no batch dims), accumulated in float32, result in out_dtype (a's dtype)."""
    dn = ((tuple(a_dims), tuple(b_dims)), ((), ()))
    return jax.lax.dot_general(a, b, dn, preferred_element_type=jnp.float32).astype(out_dtype or a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _project(x: jax.Array, w: jax.Array, n_in: int, out_dtype=None) -> jax.Array:
    """x [..., in...] (compute dtype) contracted with w [in..., out...] (param dtype, cast to x's) over the `n_in`
    input dims, accumulated in float32 -> [..., out...] in x's dtype, or out_dtype.

    The backward is written out so each gradient is ONE dot_general in its natural output order: dw = x^T g over
    all leading dims, dx = g w^T. Autodiff of the same einsum emits a dot plus a transpose that XLA:CPU turns into a
    strided copy of the widest activation (the [tokens, mlp] gradient) per layer (bench/train_step.py measures the
    step); TPU and GPU are unaffected, XLA picks layouts there itself. dw leaves the float32 accumulator in w's
    dtype, without a round trip through bf16.
    """
    return _contract(x, w.astype(x.dtype), range(x.ndim - n_in, x.ndim), range(n_in), out_dtype)


def _project_fwd(x, w, n_in, out_dtype):
    return _project(x, w, n_in, out_dtype), (x, w)


def _project_bwd(n_in, out_dtype, res, g):
    x, w = res
    g = g.astype(x.dtype)  # as autodiff of a mixed-precision dot does: the cotangent in the compute dtype
    n_lead = x.ndim - n_in
    dx = _contract(g, w.astype(x.dtype), range(n_lead, g.ndim), range(n_in, w.ndim))  # [..., in...]
    dw = _contract(x, g, range(n_lead), range(n_lead), w.dtype)  # [in..., out...]
    return dx, dw


_project.defvjp(_project_fwd, _project_bwd)


def _contract_out_in(x: jax.Array, w: jax.Array, n_in: int, out_dtype=None) -> jax.Array:
    """x [..., in...] contracted with w [out..., in...] (same dtype) over the `n_in` input dims, accumulated in
    float32 -> [..., out...] in out_dtype (x's dtype): as [rows, in] . [out, in]^T, the platform switch's "matmul"
    (on one CPU device a decode step's few rows take qcjax.cpu's kernel; elsewhere XLA's dot_general)."""
    lead, out = x.shape[:x.ndim - n_in], w.shape[:w.ndim - n_in]
    if not platform.one_device():  # sharded: XLA partitions the dot over the named dims
        return _contract(x, w, range(x.ndim - n_in, x.ndim), range(w.ndim - n_in, w.ndim), out_dtype)
    x2, w2 = x.reshape(math.prod(lead), -1), w.reshape(math.prod(out), -1)
    y = platform.dispatch("matmul", lambda a, b: _contract(a, b, (1,), (1,), jnp.float32), x2, w2)
    return y.astype(out_dtype or x.dtype).reshape(lead + out)


def _dot(eq: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """Matmul in the compute dtype, accumulated in float32, result in the compute dtype."""
    return jnp.einsum(eq, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)


def _param(module: nn.Module, name: str, shape, names, init=None):
    cfg = module.cfg
    init = init or nn.initializers.normal(cfg.initializer_range)
    return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.dtype(cfg.param_dtype))


class Linear(nn.Module):
    """A projection `x . kernel [+ bias]` with named kernel axes (kernel layout [in..., out...]).

    `project` is the projection's one matmul, a method of its own so that code outside the model can run it another
    way through a Flax method interceptor (qcjax.adapters runs a plain dot_general there, which qwix rewrites for
    LoRA and quantized kernels); the model itself never asks how it is adapted."""

    cfg: ModelConfig
    n_in: int  # leading kernel dims contracted with x's trailing dims
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_axes: tuple[str, ...] | None = None

    @nn.compact
    def __call__(self, x):
        dt = self.cfg.dtype
        y = self.project(x.astype(dt), _param(self, "kernel", self.kernel_shape, self.kernel_axes))
        if self.bias_axes is not None:
            shape = self.kernel_shape[-len(self.bias_axes):]
            y = y + _param(self, "bias", shape, self.bias_axes, nn.initializers.zeros).astype(dt)
        return y

    def project(self, x: jax.Array, kernel: Any) -> jax.Array:
        """x [..., in...] (compute dtype) . kernel [in..., out...] -> [..., out...] in x's dtype."""
        return _project(x, kernel, self.n_in)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (self.cfg.hidden_size,), ("norm",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return (y * scale.astype(jnp.float32)).astype(self.cfg.dtype)


def scatter_cache(cache: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array, slot: jax.Array
                  ) -> jax.Array:
    """The stacked cache [layers, n, len, ...] with new [batch, t, ...] (the cache's dtype) written into `layer` at
    [index, slot] (both [batch, t]: a row and its position for the dense cache, a page and the slot in it for the
    paged one): one scatter of the new entries, in place on the cache the layer scan carries (the rest of the cache
    is never copied). Entries whose index or slot is out of range are dropped."""
    return cache.at[layer, index, slot].set(new, mode="drop")


def write_cache(cache: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array, slot: jax.Array) -> jax.Array:
    """`scatter_cache` through the platform switch's "cache_write" (on the CPU a 16-bit cache is scattered as
    uint16 bits: XLA:CPU runs a bf16 scatter by converting the whole cache to fp32 and back)."""
    return platform.dispatch("cache_write", scatter_cache, cache, new.astype(cache.dtype), layer, index, slot)


def cache_targets(at: jax.Array, t: int, pages: jax.Array | None, page_size: int, valid: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """Where t new tokens starting at each row's position at [batch] go: (index, slot) [batch, t] for
    `scatter_cache`. Dense cache (pages None): row b, position at[b] + i (past the end: dropped; padding is written
    past the length and overwritten later). Paged cache: page pages[b, p // page_size] at slot p % page_size;
    padding (valid False) and positions beyond the page table go to no page (dropped), so a row only ever writes
    into pages its table names at positions >= its length: pages shared by a prefix are never written."""
    b = at.shape[0]
    pos = at.astype(jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [batch, t]
    if pages is None:
        return jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t)), pos
    w = pages.shape[1]
    slot_page = pos // page_size
    page = jnp.take_along_axis(pages, jnp.clip(slot_page, 0, w - 1), axis=1)
    nowhere = jnp.iinfo(jnp.int32).max  # out of range for any pool: the write is dropped
    return jnp.where(valid & (slot_page < w), page, nowhere), pos % page_size


def read_pages(pool: jax.Array, layer: jax.Array, pages: jax.Array) -> jax.Array:
    """One layer's keys (or values) of each row, gathered from the page pool [layers, pages, page_size, kv * d] in
    page-table order: pages [batch, w] -> [batch, w * page_size, kv * d] (the row's positions 0..w*page_size-1)."""
    b, w = pages.shape
    layer_pool = jax.lax.dynamic_index_in_dim(pool, layer, 0, keepdims=False)  # [pages, page_size, kv * d]
    return jnp.take(layer_pool, pages, axis=0, mode="clip").reshape(b, w * pool.shape[2], pool.shape[3])


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, q_segment_ids, kv_segment_ids, q_offset, cache=None, layer=None):
        """x [batch, seq, embed] -> [batch, seq, embed]. With `cache` (the stacked (k, v), [layers, batch, len,
        kv_heads * head_dim] each) the new keys and values are written into `layer` at each row's q_offset and the
        queries attend to that layer's cache; returns the updated cache too."""
        cfg = self.cfg
        e, h, kvh, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head

        def proj(name, heads, head_axis, inputs):
            return Linear(cfg, 1, (e, heads, d), ("embed", head_axis, "head_dim"),
                          bias_axes=(head_axis, "head_dim"), name=name)(inputs)

        q = proj("q_proj", h, "heads", x)  # [batch, seq, heads, head_dim]
        k = proj("k_proj", kvh, "kv_heads", x)  # [batch, seq, kv_heads, head_dim]
        v = proj("v_proj", kvh, "kv_heads", x)
        q = constrain(rope.apply_rope(q, cos, sin), ("act_batch", "act_length", "act_heads", "act_head_dim"))
        k = constrain(rope.apply_rope(k, cos, sin), ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))

        prompt = False
        if cache is not None:  # write the new keys/values at each sequence's own offset, attend to the layer's cache
            b, t = k.shape[:2]
            *cache, pages = cache  # pages: the page table [batch, w] of a paged cache, None for a dense one
            page_size = cache[0].shape[2]
            index, slot = cache_targets(q_offset, t, pages, page_size, q_segment_ids != 0)
            cache = [write_cache(c, n.reshape(b, t, kvh * d), layer, index, slot) for c, n in zip(cache, (k, v))]
            # in the cache's dtype: `attend` widens them, or its CPU decode kernel reads them as they are
            if pages is None:
                k, v = (jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False) for c in cache)
            elif pages.shape[1] * page_size == t:  # a fresh prompt filling its whole table: its own keys, no gather
                k, v = (n.astype(cache[0].dtype) for n in (k, v))
            else:
                k, v = (read_pages(c, layer, pages) for c in cache)
            k, v = (constrain(c.reshape(b, -1, kvh, d), ("act_batch", "cache_length", "act_kv_heads", "act_head_dim"))
                    for c in (k, v))
            # q_len == kv_len: a prompt into an empty cache (the sampler's prefill: q_offset 0, as self-attention
            # requires); training never passes a cache.
            prompt = q.shape[1] == k.shape[1]
            cache = (*cache, pages)

        out = attend(q, k, v, q_segment_ids, kv_segment_ids, q_offset, scale=d**-0.5, impl=cfg.attention_impl,
                     prompt=prompt)
        out = checkpoint_name(out, "attn_out")
        o = Linear(cfg, 2, (h, d, e), ("heads", "head_dim", "embed"), name="o_proj")(out)
        return o, cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        e, i, dt = cfg.hidden_size, cfg.intermediate_size, cfg.dtype
        gate = Linear(cfg, 1, (e, i), ("embed", "mlp"), name="gate_proj")(x)
        up = Linear(cfg, 1, (e, i), ("embed", "mlp"), name="up_proj")(x)
        hidden = checkpoint_name(nn.silu(gate) * up, "mlp_hidden")
        hidden = constrain(hidden, ("act_batch", "act_length", "act_mlp"))
        return Linear(cfg, 1, (i, e), ("mlp", "embed"), name="down_proj")(hidden)


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, layer, cos, sin, q_segment_ids, kv_segment_ids, q_offset):
        """carry (x [batch, seq, embed], the stacked cache or None) -> the same after this layer (`layer`: its index
        in the stack, which the cache is written and read at). Scanned over the layers by `Qwen2`."""
        x, cache = carry
        attn_out, cache = Attention(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="input_norm")(x), cos, sin, q_segment_ids, kv_segment_ids, q_offset, cache, layer
        )
        x = x + attn_out
        x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attn_norm")(x))
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        return (x, cache), None


_REMAT_POLICIES = {
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "minimal": lambda: jax.checkpoint_policies.save_only_these_names("qkv", "attn_out", "mlp_hidden"),
}


class Qwen2(nn.Module):
    """tokens [batch, seq] -> float32 logits [batch, seq, vocab] (and the updated cache when one is passed)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        layer = DecoderLayer
        if cfg.remat != "none":
            layer = nn.remat(layer, prevent_cse=False, policy=_REMAT_POLICIES[cfg.remat]())
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},  # dropout: the LoRA adapters' (qcjax.adapters)
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        self.final_norm = RMSNorm(cfg, name="final_norm")
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

    def __call__(
        self,
        tokens: jax.Array,  # [batch, seq] int
        positions: jax.Array | None = None,  # [batch, seq] int; default 0..seq-1
        segment_ids: jax.Array | None = None,  # [batch, seq] int; packed rows; 0 = padding; default all 1
        cache: Cache | None = None,
        return_hidden: bool = False,
    ):
        hidden, cache = self.hidden_states(tokens, positions, segment_ids, cache)
        out = hidden if return_hidden else self.head(hidden)
        return out if cache is None else (out, cache)

    def hidden_states(self, tokens, positions=None, segment_ids=None, cache=None):
        """Final-norm hidden states [batch, seq, embed] (compute dtype) and the updated cache."""
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:  # each row continues where its cache ends (0 without a cache)
            start = jnp.zeros((b,), jnp.int32) if cache is None else cache["lengths"]
            positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        elif cache is not None:
            check_one_segment_per_row(segment_ids)
        x = jnp.take(self.embed, tokens, axis=0).astype(cfg.dtype)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        cos, sin = rope.cos_sin(cfg, positions)

        if cache is None:
            q_seg, kv_seg, q_offset, layer_caches = segment_ids, segment_ids, jnp.zeros((b,), jnp.int32), None
        else:
            # One sequence per row: the new tokens go at each row's current length; padding (segment 0) is only at
            # the end of the new tokens, so it never counts towards the length and later tokens overwrite it.
            q_offset = cache["lengths"]
            new_lengths = q_offset + jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
            q_seg = (segment_ids != 0).astype(jnp.int32)
            pages = cache.get("pages")  # paged: [batch, w] page ids; the row's positions span w * page_size
            kv_len = cache["k"].shape[2] * (1 if pages is None else pages.shape[1])
            kv_seg = (jnp.arange(kv_len)[None, :] < new_lengths[:, None]).astype(jnp.int32)
            layer_caches = (cache["k"], cache["v"], pages)
        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        scan = lambda _cfg, _params, carry, *rest: self.layers(carry, layers, *rest)[0]  # noqa: E731
        # the platform switch's "layers": the scan above, or a platform's own loop over the same stacked params
        stacked = None if self.is_initializing() else self.variables.get("params", {}).get("layers")
        x, layer_caches = platform.dispatch("layers", scan, cfg, stacked, (x, layer_caches), cos, sin, q_seg, kv_seg,
                                            q_offset)
        if cache is not None:
            cache = {**cache, "k": layer_caches[0], "v": layer_caches[1], "lengths": new_lengths}
        return self.final_norm(x), cache

    def head(self, hidden: jax.Array) -> jax.Array:
        """hidden [batch, seq, embed] -> float32 logits [batch, seq, vocab]."""
        if not self.cfg.tie_word_embeddings:
            return head_logits(self.cfg, hidden, self.lm_head)
        dt = self.cfg.dtype  # tied: contract with the [vocab, embed] table as stored (no per-call transpose)
        logits = _contract_out_in(hidden.astype(dt), self.embed.astype(dt), 1, jnp.float32)
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))


def check_one_segment_per_row(segment_ids) -> None:
    """With a cache each row holds one sequence: its new tokens are one segment (any non-zero id) followed by padding
    (0). Packed rows would attend across documents in the cache, so they are refused here when the ids are concrete
    (an eager call); inside jit the values are unknown and the caller (the sampler) builds them this way."""
    if isinstance(segment_ids, jax.core.Tracer):
        return
    seg = np.asarray(segment_ids)
    for row, ids in enumerate(seg):
        nonzero = ids[ids != 0]
        if nonzero.size and (np.any(nonzero != nonzero[0]) or np.any(np.diff((ids != 0).astype(np.int8)) > 0)):
            raise ValueError(
                f"segment_ids row {row} is {ids.tolist()}: with a KV cache a row holds one sequence (one non-zero "
                "segment id, then padding 0); packed documents would see each other in the cache. Run packed rows "
                "without a cache, or one document per row.")


def head_kernel(cfg: ModelConfig, params) -> jax.Array:
    """The output projection as an [embed, vocab] kernel: lm_head, or the transposed embedding when tied.

    Training takes this once per step and runs every logits chunk through `head_logits`: the tied table's gradient
    then accumulates in [embed, vocab] order and is transposed back once, instead of XLA:CPU transposing each
    chunk's [tokens, vocab] logits gradient."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def head_logits(cfg: ModelConfig, hidden: jax.Array, kernel: jax.Array) -> jax.Array:
    """hidden [..., embed] x kernel [embed, vocab] -> float32 logits [..., vocab] (matmul in the compute dtype)."""
    dt = cfg.dtype
    logits = _project(hidden.astype(dt), kernel, 1, jnp.float32)
    return constrain(logits, ("act_batch", "act_length", "act_vocab")) if logits.ndim == 3 else logits


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> Cache:
    """An empty KV cache: explicit arrays the sampler passes in and gets back."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads * cfg.dim_per_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "lengths": jnp.zeros((batch,), jnp.int32)}


CACHE_LOGICAL_AXES = {
    "k": ("layers", "cache_batch", "cache_length", "act_kv_heads"),  # the merged kv_heads * head_dim dim
    "v": ("layers", "cache_batch", "cache_length", "act_kv_heads"),
    "lengths": ("cache_batch",),
}


def constrain_cache(cfg: ModelConfig, name: str, x: jax.Array) -> jax.Array:
    """A cache array ("k", "v" or "lengths") constrained by CACHE_LOGICAL_AXES under the current mesh. The merged
    kv_heads * head_dim dim is split over the mesh only in whole heads (else it stays whole, as a kv_heads dim the
    mesh does not divide would)."""
    names = CACHE_LOGICAL_AXES[name]
    if name != "lengths" and batch_shards(cfg.num_kv_heads, names[-1]) != batch_shards(x.shape[-1], names[-1]):
        names = names[:-1] + (None,)
    return constrain(x, names)


def build(cfg: ModelConfig) -> nn.Module:
    """The model module for `cfg`. Apply methods by name (`method="hidden_states"`). With LoRA adapters or
    quantized projections, qcjax.adapters.build wraps it."""
    return Qwen2(cfg)


def init_params(cfg: ModelConfig, rng: jax.Array, boxed: bool = False) -> Any:
    """Random params (boxed: keep the nn.Partitioned logical-axis annotations)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = build(cfg).init(rng, tokens)["params"]
    return params if boxed else nn.meta.unbox(params)


def abstract_params(cfg: ModelConfig) -> Any:
    """Boxed ShapeDtypeStructs of the params: shapes, dtypes and logical axes, no memory."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), boxed=True))


def count_params(cfg: ModelConfig) -> int:
    return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract_params(cfg))))
