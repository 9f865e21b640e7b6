"""qcjax: Qwen2.5-Coder in JAX/Flax.

    cfg, params = qcjax.load("path/to/Qwen2.5-Coder-0.5B")   # an HF directory or a qcjax checkpoint
    logits = qcjax.logits(cfg, params, tokens)          # [batch, seq, vocab] float32
    done = qcjax.generate(cfg, params, [token_ids], max_new_tokens=64)   # list of Completion (qcjax.inference)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qcjax import adapters
from qcjax.config import Adaptation, ModelConfig, get_config
from qcjax.hf import load_hf
from qcjax.loader import load
from qcjax.model import Qwen2, build, init_params
from qcjax.inference import SamplingParams, generate


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logits(cfg: ModelConfig, adaptation: Adaptation | None, params, tokens, positions, segment_ids):
    module = adapters.module_for(cfg, params) if adaptation is None else adapters.build(cfg, adaptation)
    return module.apply({"params": params}, tokens, positions, segment_ids)


def logits(cfg: ModelConfig, params, tokens, positions=None, segment_ids=None, *,
           adaptation: Adaptation | None = None) -> jax.Array:
    """float32 logits [batch, seq, vocab] for int tokens [batch, seq] (optional positions / packed segment ids).
    A quantized tree runs as its leaves say; a tree with LoRA adapters needs their `adaptation`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    return _logits(cfg, adaptation, params, tokens, positions, segment_ids)


__all__ = ["ModelConfig", "get_config", "load", "load_hf", "logits", "Qwen2", "init_params", "generate", "SamplingParams"]
