"""LoRA adapters and weight-only quantized projections, through qwix: the one place that knows how.

`ModelConfig.lora` / `ModelConfig.quant` ask for them; `build(cfg)` here (registered as what `qcjax.model.build`
returns for such a cfg: the model never imports this module) wraps Qwen2 with the qwix provider made here, and qwix
intercepts each projection's dot_general (`Linear` runs a plain one when `cfg.adapted`):
- LoRA (qwix.LoraProvider): next to each targeted `kernel` the params hold `kernel_lora_a` [layers, in, rank] and
  `kernel_lora_b` [layers, rank, out] (in/out: the kernel's input/output dims flattened, e.g. q_proj's out is
  heads * head_dim, in HF's order); the output gains (x A) B * alpha / rank.
- Quantized projections (qwix.PtqProvider, or the LoRA provider's rules with a weight qtype: QLoRA): each of the
  seven kernels becomes a qwix `WithAux` holding a QArray (int8 values + per-output-channel scales; nf4 with one
  scale per 64 input rows) and is dequantized inside the matmul.

Pure pytree helpers: split the adapters from the base (training holds and updates only the adapters), put them back
together, fold them into the kernels (sampling, HF export), quantize a float base, and read a quantized one back.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qcjax.config import LORA_PROJECTIONS, LORA_TARGETS, ModelConfig
from qcjax.model import Qwen2, abstract_params, register_adapted

PROJECTIONS = LORA_PROJECTIONS  # short target name -> the projection's module path inside a decoder layer
LORA_A, LORA_B = "kernel_lora_a", "kernel_lora_b"
NF4_BLOCK = 64  # input rows per nf4 scale (QLoRA's block size; smaller where a tiny test config's dims need it)


def _module_regex(targets) -> str:
    """The scanned layers' module paths ("layers/attn/q_proj", ...) as one fullmatch regex for qwix's rules."""
    return "layers/(" + "|".join("/".join(PROJECTIONS[t]) for t in targets) + ")"


def _qtype_rule_fields(cfg: ModelConfig) -> dict:
    if cfg.quant == "none":
        return {}
    block = math.gcd(NF4_BLOCK, cfg.dim_per_head, cfg.hidden_size, cfg.intermediate_size)  # 64 for every real size
    return {"weight_qtype": cfg.quant, "tile_size": block if cfg.quant == "nf4" else None}


def provider(cfg: ModelConfig):
    """The qwix provider for cfg.lora / cfg.quant (rules matched in order: adapted projections first)."""
    import qwix

    quant = _qtype_rule_fields(cfg)
    if cfg.lora is None:
        # The provider calls its dot without the float32 accumulation `Linear` asks for (preferred_element_type is
        # dropped); given back here, the dequantized bf16 kernel feeds a bf16 x bf16 -> fp32 dot as the plain
        # model's does. Without it XLA:CPU widened every dequantized kernel to an fp32 copy at each decode step.
        from qwix._src.core import dot_general

        dot = functools.partial(dot_general.dot_general, preferred_element_type=jnp.float32)
        return qwix.PtqProvider([qwix.QuantizationRule(module_path=_module_regex(LORA_TARGETS),
                                                       op_names=("dot_general",), **quant)], _dot_general_fn=dot)
    lo = cfg.lora
    rules = [qwix.LoraRule(module_path=_module_regex(lo.targets), op_names=("dot_general",), rank=lo.rank,
                           alpha=lo.alpha, dropout=lo.dropout, **quant)]
    rest = [t for t in LORA_TARGETS if t not in lo.targets]
    if quant and rest:  # QLoRA: the projections without adapters are quantized too
        rules.append(qwix.QuantizationRule(module_path=_module_regex(rest), op_names=("dot_general",), **quant))
    return qwix.LoraProvider(rules)


def wrap(module, cfg: ModelConfig):
    """`module` (a Qwen2) with qwix intercepting the projections of its apply methods."""
    import qwix

    return qwix.quantize_model(module, provider(cfg), methods=("__call__", "hidden_states"))


def build(cfg: ModelConfig, deterministic: bool = True):
    """The adapted model for cfg.lora / cfg.quant (what `qcjax.model.build` returns for such a cfg).
    deterministic: no adapter dropout."""
    if deterministic and cfg.lora is not None and cfg.lora.dropout:
        cfg = cfg.replace(lora=dataclasses.replace(cfg.lora, dropout=0.0))
    return wrap(Qwen2(cfg), cfg)


def _init(cfg: ModelConfig, params: Any) -> Any:
    """Fresh adapted params: qwix makes adapters in the kernel's dtype (a quantized one's: the compute dtype);
    trained, they are master weights in param_dtype."""
    return adapters_in(params, cfg.param_dtype) if cfg.lora is not None else params


register_adapted(build, _init)


# ---- param trees ----------------------------------------------------------------------------------------------------
def is_adapter(path) -> bool:
    """Whether a param path (tree_util keys or strings) names a LoRA adapter leaf."""
    last = path[-1]
    return str(getattr(last, "key", last)) in (LORA_A, LORA_B)


def _filter(tree: Any, keep) -> Any:
    """The nested dict `tree` with only the leaves `keep(path)` accepts (empty dicts dropped)."""
    def go(node, path):
        if not isinstance(node, dict):
            return node if keep(path) else None
        out = {}
        for k, v in node.items():
            sub = go(v, path + (k,))
            if sub is not None and not (isinstance(sub, dict) and not sub):
                out[k] = sub
        return out

    return go(tree, ())


def split(params: Any) -> tuple[Any, Any]:
    """(base, adapters): the frozen weights and the LoRA leaves, as two nested dicts of the same layout."""
    return _filter(params, lambda p: not is_adapter(p)), _filter(params, is_adapter)


def combine(base: Any, adapters: Any) -> Any:
    """The whole param tree from `split`'s two halves (no copies: the leaves are shared)."""
    if not isinstance(adapters, dict):
        return adapters
    out = dict(base)
    for k, v in adapters.items():
        out[k] = combine(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def adapters_in(params: Any, dtype: Any) -> Any:
    """`params` with the adapter leaves (plain arrays or logical-axis boxes) in `dtype`, the rest as it was."""
    if not isinstance(params, dict):
        return params
    return {k: jax.tree.map(lambda x: x.astype(dtype), v) if k in (LORA_A, LORA_B) else adapters_in(v, dtype)
            for k, v in params.items()}


def layer_mask(cfg: ModelConfig) -> np.ndarray | None:
    """[layers] float32: 1 for the layers whose adapters train (cfg.lora.layers), or None for all of them."""
    if cfg.lora is None or cfg.lora.layers is None:
        return None
    mask = np.zeros((cfg.num_layers,), np.float32)
    mask[list(cfg.lora.layers)] = 1.0
    return mask


def mask_layers(cfg: ModelConfig, adapters: Any) -> Any:
    """The adapter tree (gradients or updates; every leaf's leading dim is the layer) with the layers outside
    cfg.lora.layers zeroed: those adapters stay at their zero-output start."""
    mask = layer_mask(cfg)
    if mask is None:
        return adapters
    return jax.tree.map(lambda x: x * jnp.asarray(mask, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)), adapters)


def lora_delta(cfg: ModelConfig, kernel_shape: tuple[int, ...], a: jax.Array, b: jax.Array) -> jax.Array:
    """The adapters' change of one stacked kernel [layers, in..., out...]: scale * A @ B reshaped to it (float32)."""
    d = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32)) * cfg.lora.scale
    return d.reshape(kernel_shape)


def is_quantized(x: Any) -> bool:
    """Whether a param leaf is a quantized kernel (a qwix WithAux holding a QArray)."""
    from qwix._src.providers import ptq

    return isinstance(x, ptq.WithAux)


def dequantize(params: Any) -> Any:
    """A param tree with every quantized kernel (qwix WithAux) replaced by its float32 value."""
    import qwix

    def leaf(x):
        return qwix.dequantize(x.array).astype(jnp.float32) if is_quantized(x) else x

    return jax.tree.map(leaf, params, is_leaf=is_quantized)


def merge(cfg: ModelConfig, params: Any, dtype: Any = None) -> tuple[ModelConfig, Any]:
    """(plain config, params) with the adapters folded into the kernels, W + scale * A B, computed in float32 from
    the base as the adapted model sees it (dequantized under QLoRA) and stored in `dtype` (default: the base
    kernel's float dtype, float32 for a quantized one). The result runs on the plain Qwen2, with no overhead."""
    params = dequantize(params)
    out_cfg = cfg.replace(lora=None, quant="none")
    if cfg.lora is None:
        return out_cfg, params
    base, adapters = split(params)
    merged = jax.tree.map(lambda x: x, base)
    for t in cfg.lora.targets:
        group, name = PROJECTIONS[t]
        node = merged["layers"][group][name]
        ad = adapters["layers"][group][name]
        k = node["kernel"]
        dt = dtype or (k.dtype if jnp.issubdtype(k.dtype, jnp.floating) else jnp.float32)
        node["kernel"] = (k.astype(jnp.float32) + lora_delta(cfg, k.shape, ad[LORA_A], ad[LORA_B])).astype(dt)
    return out_cfg, merged


def quantize(cfg: ModelConfig, params: Any, mesh=None) -> Any:
    """Float params (of the plain model, with or without adapters) -> the tree `build(cfg)` applies with cfg.quant
    set: the quantized projections' kernels as qwix WithAux QArrays, everything else as it was. With `mesh` each
    quantized kernel's values and scales are placed there by the logical-axis rules (qcjax.sharding), as
    `inference.programs.place_params` places them.

    Quantized per layer (one scale set per layer of the stacked kernel) with the `how` qwix records at init inside
    the layer scan: qwix.quantize_params would read that per-layer `how` against the stacked kernel and put the
    scales on the wrong axes. The layers go one at a time (lax.map), so the temporaries are one layer's. Each layer
    is calibrated and rounded in float32 (in bfloat16, x / scale near 127 has steps of 0.5 before the rounding),
    and its scales are kept in the kernel's dtype: the dequantized kernel takes the scales' dtype, and the matmul
    then runs in the dtype the float model's does."""
    import qwix
    from flax import linen as nn
    from qwix._src.providers import ptq

    from qcjax.sharding import param_shardings

    if cfg.quant == "none":
        return params
    boxed = abstract_params(cfg.replace(lora=None))
    abstract = nn.meta.unbox(boxed)
    shardings = param_shardings(boxed, mesh) if mesh is not None else None

    def one(how, w, sharding):  # w [layers, ...] -> WithAux(QArray [layers, ...]), one scale set per layer
        def layer(x):
            return qwix.quantize(x.astype(jnp.float32), how.qtype, channelwise_axes=how.channelwise_axes,
                                 tiled_axes=how.tiled_axes, calibration_method=how.calibration_method,
                                 scale_dtype=x.dtype)

        out = None if sharding is None else sharding.array
        return ptq.WithAux(jax.jit(lambda w: jax.lax.map(layer, w), out_shardings=out)(w), how)

    def go(a, p, s):
        if isinstance(a, ptq.WithAux):
            return p if isinstance(p, ptq.WithAux) else one(a.how, p, s)
        if isinstance(p, dict):
            sub = lambda t, k: t.get(k) if isinstance(t, dict) else None  # noqa: E731
            return {k: go(sub(a, k), v, sub(s, k)) for k, v in p.items()}
        return p

    return go(abstract, params, shardings)


def weight_bytes(params: Any) -> tuple[int, int]:
    """(bytes the param tree holds, bytes the same weights take in bfloat16): a quantized kernel counts its values
    (1 byte each for int8, half for nf4) and its scales; the bfloat16 figure counts each weight at 2 bytes."""
    def bits(x) -> int:
        d = jnp.dtype(x.dtype)
        return jnp.iinfo(d).bits if jnp.issubdtype(d, jnp.integer) else jnp.finfo(d).bits

    held = weights = 0
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf):
            q = leaf.array
            held += (q.qvalue.size * bits(q.qvalue) + q.scale.size * bits(q.scale)) // 8
            weights += q.qvalue.size
        else:
            held += leaf.size * bits(leaf) // 8
            weights += leaf.size
    return held, 2 * weights


def describe(cfg: ModelConfig, params: Any) -> str:
    """One line for the CLIs: what is quantized, how, and the weights' bytes against the same model in bfloat16."""
    held, bf16 = weight_bytes(params)
    block = _qtype_rule_fields(cfg).get("tile_size")
    what = {"int8": "int8 with one scale per output channel", "nf4": f"nf4 with one scale per {block} inputs"}
    head = "" if cfg.tie_word_embeddings else ", LM head"
    rest = jnp.dtype(params["embed"].dtype).name
    return (f"weights: the 7 projections of each layer {what.get(cfg.quant, rest)}; embeddings{head}, norms, "
            f"biases {rest}: {held:,} bytes ({held / 2**20:.1f} MiB) vs {bf16:,} bytes "
            f"({bf16 / 2**20:.1f} MiB) all in bfloat16, {held / bf16:.2f}x")


def freeze_base(cfg: ModelConfig, base: Any, mesh=None) -> Any:
    """A LoRA run's frozen base as training holds it: every float leaf in the compute dtype (cfg.dtype: the base is
    never updated, so fp32 master copies would buy nothing; every use casts to the compute dtype, and the norms'
    fp32 math reads the rounded scale), then quantized as cfg.quant says (QLoRA quantizes these compute-dtype
    weights, so the trainer and the loader quantize the same numbers). A 32B bf16 base is 64 GB, not fp32's 128."""
    base = cast_floats(base, cfg.dtype)
    return quantize(cfg.replace(lora=None), base, mesh)


def cast_floats(params: Any, dtype: Any) -> Any:
    """The float leaves in `dtype`; integer leaves and quantized kernels as they are."""
    keep = lambda x: is_quantized(x) or not jnp.issubdtype(x.dtype, jnp.floating)
    return jax.tree.map(lambda x: x if keep(x) else x.astype(dtype), params, is_leaf=is_quantized)
