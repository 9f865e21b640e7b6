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
case. The CPU decode loop (qcjax.cpu.layers), which runs the projections itself, adds `delta` the same way. Each
delta goes through the platform switch's "lora" operation: XLA's gathered rows, or on the CPU a kernel reading each
row's adapter in place for decode steps (qcjax.cpu.lora).

`applied` acts while a function is traced: use it inside the jitted function (as qcjax.inference.programs does,
with the bank and ids as arguments), not around a call of one jax has already compiled without it.
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

from qcjax import platform
from qcjax.config import LORA_PROJECTIONS, ModelConfig

_ROWS: contextvars.ContextVar = contextvars.ContextVar("qcjax_row_lora", default=None)  # (bank, ids, scale [B])
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


def delta(x: jax.Array, target: str, layer: jax.Array) -> jax.Array | None:
    """Inside `applied`: each row's adapter output for projection `target` of layer `layer`, x [B, T, in] ->
    float32 [B, T, out] (zero for rows with id -1), computed in the bank's dtype with float32 sums; None outside it
    or for a target the bank does not hold."""
    rows = _ROWS.get()
    if rows is None or target not in rows[0]:
        return None
    bank, ids, scale = rows
    a_stack, b_stack = (s.reshape((-1,) + s.shape[2:]) for s in (bank[target]["a"], bank[target]["b"]))
    index = jnp.where(ids >= 0, layer * bank[target]["a"].shape[1] + ids, -1)  # into the [layers * S, ...] view
    # the platform switch: on the CPU, decode steps read each row's adapter in place (qcjax.cpu.lora)
    return platform.dispatch("lora", _gathered, x, a_stack, b_stack, index, scale)


def _gathered(x: jax.Array, a_stack: jax.Array, b_stack: jax.Array, index: jax.Array, scale: jax.Array
              ) -> jax.Array:
    """The core's formulation: each row's A [B, in, R] and B [B, R, out] gathered from the stacks (index -1: any
    row, scaled by 0), then x A (float32 sums) scaled, rounded to the bank's dtype, times B (float32 sums)."""
    i = jnp.maximum(index, 0)  # in range by construction: no bounds select over the gathered rows
    a, b = (s.at[i].get(mode="promise_in_bounds") for s in (a_stack, b_stack))
    dt = a.dtype  # the bank's: the compute dtype, or float32 where the platform wants it (platform.adapter_dtype)
    h = jnp.einsum("bti,bir->btr", x.astype(dt), a, preferred_element_type=jnp.float32)
    h = (h * scale[:, None, None]).astype(dt)
    return jnp.einsum("btr,bro->bto", h, b, preferred_element_type=jnp.float32)


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
            d = delta(x.reshape(b, t, -1), target, _LAYER.get())
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
    scale = jnp.where(ids >= 0, bank["scale"].at[jnp.maximum(ids, 0)].get(mode="promise_in_bounds"), 0.0)  # [B]
    token = _ROWS.set((bank, ids, scale))  # each row's scale once, for every projection of every layer
    try:
        with nn.intercept_methods(_interceptor):
            yield
    finally:
        _ROWS.reset(token)


__all__ = ["applied", "bank_bytes", "bank_shapes", "delta", "empty_bank", "put", "target_dims"]
