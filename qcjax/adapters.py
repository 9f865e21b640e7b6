"""LoRA adapters and weight-only quantized projections, through qwix: the one place that knows how.

An `Adaptation` (qcjax.config: a LoRA spec and/or a quant type) says what to add; `build(cfg, adaptation)` wraps the
plain Qwen2 with the qwix provider made here, and the model never learns of it. Two interceptions do it, both from
outside: a Flax method interceptor runs each `Linear.project` (the projection's one matmul) as a plain
jax.lax.dot_general, and qwix's own wrapping of the model (`qwix.quantize_model`) rewrites those dot_generals:
- LoRA (qwix.LoraProvider): next to each targeted `kernel` the params hold `kernel_lora_a` [layers, in, rank] and
  `kernel_lora_b` [layers, rank, out] (in/out: the kernel's input/output dims flattened, e.g. q_proj's out is
  heads * head_dim, in HF's order); the output gains (x A) B * alpha / rank.
- Quantized projections (qwix.PtqProvider, or the LoRA provider's rules with a weight qtype: QLoRA): each of the
  seven kernels becomes a qwix `WithAux` holding a QArray (int8 values + per-output-channel scales; nf4 with one
  scale per 64 input rows) and is dequantized inside the matmul. Such a tree says its own format (`carried`), so
  whatever applies it (`module_for`) needs no flag.

Pure pytree helpers: split the adapters from the base (training holds and updates only the adapters), put them back
together, fold them into the kernels (sampling, HF export), quantize a float base, and read a quantized one back.
qwix's private modules are reached only through `_qwix_private`, which tests/test_lora.py checks.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from qcjax.config import LORA_PROJECTIONS, LORA_TARGETS, NO_ADAPTATION, Adaptation, LoraSpec, ModelConfig
from qcjax.model import Linear, Qwen2

PROJECTIONS = LORA_PROJECTIONS  # short target name -> the projection's module path inside a decoder layer
LORA_A, LORA_B = "kernel_lora_a", "kernel_lora_b"
NF4_BLOCK = 64  # input rows per nf4 scale (QLoRA's block size; smaller where a tiny test config's dims need it)


def _qwix_private() -> tuple[Any, Any]:
    """(qwix's dot_general function, qwix's WithAux class): the two private names this code needs, in one place.
    tests/test_lora.py calls this, so a qwix upgrade that moves them fails there, loudly, before anything runs."""
    from qwix._src.core import dot_general
    from qwix._src.providers import ptq

    return dot_general.dot_general, ptq.WithAux


def _module_regex(targets) -> str:
    """The scanned layers' module paths ("layers/attn/q_proj", ...) as one fullmatch regex for qwix's rules."""
    return "layers/(" + "|".join("/".join(PROJECTIONS[t]) for t in targets) + ")"


def _qtype_rule_fields(cfg: ModelConfig, quant: str) -> dict:
    if quant == "none":
        return {}
    block = math.gcd(NF4_BLOCK, cfg.dim_per_head, cfg.hidden_size, cfg.intermediate_size)  # 64 for every real size
    return {"weight_qtype": quant, "tile_size": block if quant == "nf4" else None}


def provider(cfg: ModelConfig, adaptation: Adaptation):
    """The qwix provider for an adaptation (rules matched in order: adapted projections first)."""
    import qwix

    quant = _qtype_rule_fields(cfg, adaptation.quant)
    lo = adaptation.lora
    if lo is None:
        # The provider calls its dot without the float32 accumulation the model asks for (preferred_element_type
        # is dropped); given back here, the dequantized bf16 kernel feeds a bf16 x bf16 -> fp32 dot as the plain
        # model's does. Without it XLA:CPU widened every dequantized kernel to an fp32 copy at each decode step.
        dot = functools.partial(_qwix_private()[0], preferred_element_type=jnp.float32)
        return qwix.PtqProvider([qwix.QuantizationRule(module_path=_module_regex(LORA_TARGETS),
                                                       op_names=("dot_general",), **quant)], _dot_general_fn=dot)
    rules = [qwix.LoraRule(module_path=_module_regex(lo.targets), op_names=("dot_general",), rank=lo.rank,
                           alpha=lo.alpha, dropout=lo.dropout, **quant)]
    rest = [t for t in LORA_TARGETS if t not in lo.targets]
    if quant and rest:  # QLoRA: the projections without adapters are quantized too
        rules.append(qwix.QuantizationRule(module_path=_module_regex(rest), op_names=("dot_general",), **quant))
    return qwix.LoraProvider(rules)


def _plain_projection(next_fun, args, kwargs, context):
    """Flax method interceptor: `Linear.project` as one plain dot_general on the param (a quantized kernel, a qwix
    WithAux, as it is), accumulated in float32, which qwix's wrapping then rewrites; every other method as it is."""
    if context.method_name != "project" or not isinstance(context.module, Linear):
        return next_fun(*args, **kwargs)
    x, w = args
    n = context.module.n_in
    dn = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
    w = w.astype(x.dtype) if isinstance(w, jax.Array) else w
    return jax.lax.dot_general(x, w, dn, preferred_element_type=jnp.float32).astype(x.dtype)


class Adapted:
    """The qwix-wrapped Qwen2, with `init` and `apply` as a Flax module has them (method= by name included), run
    under the interceptor that gives qwix plain projections."""

    def __init__(self, module: nn.Module):
        self.module = module

    def init(self, *args, **kwargs):
        with nn.intercept_methods(_plain_projection):
            return self.module.init(*args, **kwargs)

    def apply(self, *args, **kwargs):
        with nn.intercept_methods(_plain_projection):
            return self.module.apply(*args, **kwargs)


def build(cfg: ModelConfig, adaptation: Adaptation = NO_ADAPTATION, deterministic: bool = True):
    """The model for `cfg` adapted as `adaptation` says: the plain Qwen2 when nothing is, else the wrapped one.
    deterministic: no adapter dropout (training passes False and a "dropout" rng)."""
    if not adaptation.active:
        return Qwen2(cfg)
    import qwix

    lo = adaptation.check(cfg).lora
    if deterministic and lo is not None and lo.dropout:
        adaptation = adaptation.replace(lora=dataclasses.replace(lo, dropout=0.0))
    return Adapted(qwix.quantize_model(Qwen2(cfg), provider(cfg, adaptation), methods=("__call__", "hidden_states")))


def init_params(cfg: ModelConfig, adaptation: Adaptation, rng: jax.Array, boxed: bool = False) -> Any:
    """Random params of the adapted model (boxed: keep the logical-axis annotations). qwix makes adapters in the
    kernel's dtype (a quantized one's: the compute dtype); trained, they are master weights in param_dtype."""
    params = build(cfg, adaptation).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    if adaptation.lora is not None:
        params = adapters_in(params, cfg.param_dtype)
    return params if boxed else nn.meta.unbox(params)


def abstract_params(cfg: ModelConfig, adaptation: Adaptation) -> Any:
    """Boxed ShapeDtypeStructs of the adapted model's params: shapes, dtypes and logical axes, no memory."""
    return jax.eval_shape(lambda: init_params(cfg, adaptation, jax.random.key(0), boxed=True))


def carried(params: Any) -> Adaptation:
    """The quantization a param tree carries (qwix's WithAux leaves record theirs), as an Adaptation; a tree with
    LoRA adapters needs its LoraSpec given (the tree does not hold alpha)."""
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf):
            return Adaptation(quant=jnp.dtype(leaf.how.qtype).name if not isinstance(leaf.how.qtype, str)
                              else leaf.how.qtype)
    return NO_ADAPTATION


def module_for(cfg: ModelConfig, params: Any):
    """The module that applies `params` (plain or quantized; LoRA adapters are merged first or run per row through
    qcjax.row_lora): what inference runs, with no flag to agree with the tree."""
    if has_adapters(params):
        raise ValueError("a param tree with LoRA adapters: merge them (qcjax.adapters.merge) or give their LoraSpec "
                         "to qcjax.adapters.build")
    return build(cfg, carried(params))


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


def has_adapters(params: Any) -> bool:
    """Whether a param tree holds LoRA adapter leaves."""
    return any(is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0])


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


def layer_mask(cfg: ModelConfig, lora: LoraSpec | None) -> np.ndarray | None:
    """[layers] float32: 1 for the layers whose adapters train (lora.layers), or None for all of them."""
    if lora is None or lora.layers is None:
        return None
    mask = np.zeros((cfg.num_layers,), np.float32)
    mask[list(lora.layers)] = 1.0
    return mask


def mask_layers(cfg: ModelConfig, lora: LoraSpec | None, adapters: Any) -> Any:
    """The adapter tree (gradients or updates; every leaf's leading dim is the layer) with the layers outside
    lora.layers zeroed: those adapters stay at their zero-output start."""
    mask = layer_mask(cfg, lora)
    if mask is None:
        return adapters
    return jax.tree.map(lambda x: x * jnp.asarray(mask, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)), adapters)


def lora_delta(scale: float, kernel_shape: tuple[int, ...], a: jax.Array, b: jax.Array) -> jax.Array:
    """The adapters' change of one stacked kernel [layers, in..., out...]: scale * A @ B reshaped to it (float32)."""
    d = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
    return d.reshape(kernel_shape)


def is_quantized(x: Any) -> bool:
    """Whether a param leaf is a quantized kernel (a qwix WithAux holding a QArray)."""
    return isinstance(x, _qwix_private()[1])


def dequantize(params: Any) -> Any:
    """A param tree with every quantized kernel (qwix WithAux) replaced by its float32 value."""
    import qwix

    def leaf(x):
        return qwix.dequantize(x.array).astype(jnp.float32) if is_quantized(x) else x

    return jax.tree.map(leaf, params, is_leaf=is_quantized)


def merge(lora: LoraSpec | None, params: Any, dtype: Any = None) -> Any:
    """The params with the adapters folded into the kernels, W + scale * A B, computed in float32 from the base as
    the adapted model sees it (dequantized under QLoRA) and stored in `dtype` (default: the base kernel's float
    dtype, float32 for a quantized one). The result runs on the plain Qwen2, with no overhead."""
    params = dequantize(params)
    if lora is None:
        return params
    base, adapters = split(params)
    merged = jax.tree.map(lambda x: x, base)
    for t in lora.targets:
        group, name = PROJECTIONS[t]
        node = merged["layers"][group][name]
        ad = adapters["layers"][group][name]
        k = node["kernel"]
        dt = dtype or (k.dtype if jnp.issubdtype(k.dtype, jnp.floating) else jnp.float32)
        node["kernel"] = (k.astype(jnp.float32) + lora_delta(lora.scale, k.shape, ad[LORA_A], ad[LORA_B])).astype(dt)
    return merged


def quantize(cfg: ModelConfig, params: Any, quant: str, mesh=None) -> Any:
    """Float params (of the plain model, with or without adapters) -> the tree `build(cfg, Adaptation(quant=quant))`
    applies (and `module_for` recognises): the quantized projections' kernels as qwix WithAux QArrays, everything
    else as it was. With `mesh` each quantized kernel's values and scales are placed there by the logical-axis
    rules (qcjax.sharding), as `inference.programs.place_params` places them.

    Quantized per layer (one scale set per layer of the stacked kernel) with the `how` qwix records at init inside
    the layer scan: qwix.quantize_params would read that per-layer `how` against the stacked kernel and put the
    scales on the wrong axes. The layers go one at a time (lax.map), so the temporaries are one layer's. Each layer
    is calibrated and rounded in float32 (in bfloat16, x / scale near 127 has steps of 0.5 before the rounding),
    and its scales are kept in the kernel's dtype: the dequantized kernel takes the scales' dtype, and the matmul
    then runs in the dtype the float model's does."""
    import qwix

    from qcjax.sharding import param_shardings

    if quant == "none":
        return params
    with_aux = _qwix_private()[1]
    boxed = abstract_params(cfg, Adaptation(quant=quant))
    abstract = nn.meta.unbox(boxed)
    shardings = param_shardings(boxed, mesh) if mesh is not None else None

    def one(how, w, sharding):  # w [layers, ...] -> WithAux(QArray [layers, ...]), one scale set per layer
        def layer(x):
            return qwix.quantize(x.astype(jnp.float32), how.qtype, channelwise_axes=how.channelwise_axes,
                                 tiled_axes=how.tiled_axes, calibration_method=how.calibration_method,
                                 scale_dtype=x.dtype)

        out = None if sharding is None else sharding.array
        return with_aux(jax.jit(lambda w: jax.lax.map(layer, w), out_shardings=out)(w), how)

    def go(a, p, s):
        if isinstance(a, with_aux):
            return p if isinstance(p, with_aux) else one(a.how, p, s)
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
    quant = carried(params).quant
    block = _qtype_rule_fields(cfg, quant).get("tile_size")
    what = {"int8": "int8 with one scale per output channel", "nf4": f"nf4 with one scale per {block} inputs"}
    head = "" if cfg.tie_word_embeddings else ", LM head"
    rest = jnp.dtype(params["embed"].dtype).name
    return (f"weights: the 7 projections of each layer {what.get(quant, rest)}; embeddings{head}, norms, "
            f"biases {rest}: {held:,} bytes ({held / 2**20:.1f} MiB) vs {bf16:,} bytes "
            f"({bf16 / 2**20:.1f} MiB) all in bfloat16, {held / bf16:.2f}x")


def freeze_base(cfg: ModelConfig, base: Any, quant: str, mesh=None) -> Any:
    """A LoRA run's frozen base as training holds it: every float leaf in the compute dtype (cfg.dtype: the base is
    never updated, so fp32 master copies would buy nothing; every use casts to the compute dtype, and the norms'
    fp32 math reads the rounded scale), then quantized as `quant` says (QLoRA quantizes these compute-dtype
    weights, so the trainer and the loader quantize the same numbers). A 32B bf16 base is 64 GB, not fp32's 128."""
    base = cast_floats(base, cfg.dtype)
    return quantize(cfg, base, quant, mesh)


def cast_floats(params: Any, dtype: Any) -> Any:
    """The float leaves in `dtype`; integer leaves and quantized kernels as they are."""
    keep = lambda x: is_quantized(x) or not jnp.issubdtype(x.dtype, jnp.floating)
    return jax.tree.map(lambda x: x if keep(x) else x.astype(dtype), params, is_leaf=is_quantized)
