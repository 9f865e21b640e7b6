"""LoRA adapters chosen per row: one forward where each row of the batch runs through its own adapter (or none),
over one copy of the base weights. What a server with many adapters on one base runs (qcjax.inference.lora holds
the host side: which adapter is in which slot).

The adapters of up to S resident adapters live in a bank, one pair of stacks per targeted projection:

    bank = {"q": {"a": [layers, S, in, R], "b": [layers, S, R, out]}, ..., "scale": [S] float32}

(in/out: the kernel's input/output dims flattened in HF's order, the layout qcjax.adapters and PEFT use; R: the
bank's rank, an adapter of a smaller rank zero-padded, which adds exact zeros; scale: alpha / rank of the adapter in
each slot, 0 for an empty slot). `ids` [B] names each row's slot, -1 for the base alone.

The model knows nothing of this: `applied(bank, ids)` wraps a forward (the model's apply, traced inside jit) in a
Flax method interceptor that adds `scale * (x A) B` to the output of each targeted projection (`Linear`) of each
layer (the layer index comes from the enclosing `DecoderLayer` call), the way qwix wraps a module for the one-adapter
case. The CPU decode loop (qcjax.cpu.layers), which runs the projections itself, adds `delta` the same way.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from qcjax.config import LORA_PROJECTIONS, ModelConfig

_ROWS: contextvars.ContextVar = contextvars.ContextVar("qcjax_row_lora", default=None)  # (bank, ids) while applied
_LAYER: contextvars.ContextVar = contextvars.ContextVar("qcjax_row_lora_layer", default=None)
_TARGET_OF = {path: t for t, path in LORA_PROJECTIONS.items()}  # ("attn", "q_proj") -> "q"


def target_dims(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) of a projection's kernel with its input and output dims flattened."""
    e, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.dim_per_head, \
        cfg.num_kv_heads * cfg.dim_per_head
    return {"q": (e, q), "k": (e, kv), "v": (e, kv), "o": (q, e), "gate": (e, i), "up": (e, i), "down": (i, e)}[target]


def bank_shapes(cfg: ModelConfig, slots: int, rank: int, targets) -> dict:
    """The bank's array shapes (see the module docstring)."""
    out: dict[str, Any] = {}
    for t in targets:
        n_in, n_out = target_dims(cfg, t)
        out[t] = {"a": (cfg.num_layers, slots, n_in, rank), "b": (cfg.num_layers, slots, rank, n_out)}
    out["scale"] = (slots,)
    return out


def bank_bytes(cfg: ModelConfig, slots: int, rank: int, targets, dtype: Any) -> int:
    """Device bytes a bank takes (its A and B stacks in `dtype`, the scales in float32)."""
    shapes = bank_shapes(cfg, slots, rank, targets)
    n = sum(int(np.prod(s)) for t in targets for s in shapes[t].values())
    return n * jnp.dtype(dtype).itemsize + 4 * slots


def empty_bank(cfg: ModelConfig, slots: int, rank: int, targets, dtype: Any) -> dict:
    """A bank of `slots` empty slots (zeros; scale 0)."""
    shapes = bank_shapes(cfg, slots, rank, targets)
    bank = {t: {k: jnp.zeros(s, dtype) for k, s in shapes[t].items()} for t in targets}
    bank["scale"] = jnp.zeros(shapes["scale"], jnp.float32)
    return bank


@functools.partial(jax.jit, donate_argnums=(0,))
def put(bank: dict, slot: jax.Array, adapter: dict, scale: jax.Array) -> dict:
    """The bank with `adapter` ({target: {"a": [layers, in, R], "b": [layers, R, out]}}, every target of the bank,
    already padded to the bank's rank) in `slot`. The old bank's buffers are donated: the copy is the adapter's."""
    out = {t: {k: bank[t][k].at[:, slot].set(adapter[t][k].astype(bank[t][k].dtype)) for k in ("a", "b")}
           for t in bank if t != "scale"}
    out["scale"] = bank["scale"].at[slot].set(scale)
    return out


def delta(x: jax.Array, target: str, layer: jax.Array, dtype: Any) -> jax.Array | None:
    """Inside `applied`: each row's adapter output for projection `target` of layer `layer`, x [B, T, in] ->
    float32 [B, T, out] (zero for rows with id -1); None outside it or for a target the bank does not hold."""
    rows = _ROWS.get()
    if rows is None or target not in rows[0]:
        return None
    bank, ids = rows
    a_l, b_l = (jax.lax.dynamic_index_in_dim(bank[target][k], layer, 0, keepdims=False) for k in ("a", "b"))
    slot = jnp.maximum(ids, 0)
    a, b = jnp.take(a_l, slot, axis=0), jnp.take(b_l, slot, axis=0)  # [B, in, R], [B, R, out]: each row's own
    scale = jnp.where(ids >= 0, jnp.take(bank["scale"], slot), 0.0)  # [B]
    h = jnp.einsum("bti,bir->btr", x.astype(dtype), a.astype(dtype), preferred_element_type=jnp.float32)
    h = (h * scale[:, None, None]).astype(dtype)
    return jnp.einsum("btr,bro->bto", h, b.astype(dtype), preferred_element_type=jnp.float32)


def _interceptor(next_fun, args, kwargs, context):
    from qcjax.model import DecoderLayer, Linear

    module = context.module
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if isinstance(module, DecoderLayer):  # (carry, layer, ...): the layer index the projections inside read at
        token = _LAYER.set(args[1])
        try:
            return next_fun(*args, **kwargs)
        finally:
            _LAYER.reset(token)
    y = next_fun(*args, **kwargs)
    if isinstance(module, Linear) and module.parent is not None and _LAYER.get() is not None:
        target = _TARGET_OF.get((module.parent.name, module.name))
        x = args[0]
        if target is not None:
            b, t = x.shape[:2]
            d = delta(x.reshape(b, t, -1), target, _LAYER.get(), module.cfg.dtype)
            if d is not None:
                y = (y + d.reshape(y.shape).astype(y.dtype)).astype(y.dtype)
    return y


@contextlib.contextmanager
def applied(bank: dict | None, ids: jax.Array | None) -> Iterator[None]:
    """Within the block, forwards of the model (traced here) add each row's adapter: ids [B] slot per row, -1 none.
    With bank None the block runs the base model as it is."""
    if bank is None:
        yield
        return
    token = _ROWS.set((bank, ids))
    try:
        with nn.intercept_methods(_interceptor):
            yield
    finally:
        _ROWS.reset(token)


__all__ = ["applied", "bank_bytes", "bank_shapes", "delta", "empty_bank", "put", "target_dims"]
