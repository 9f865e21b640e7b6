"""One answer to "what is at this path?": a Hugging Face model directory or a qcjax (Orbax) checkpoint.

    cfg, params = qcjax.load("Qwen2.5-Coder-1.5B")              # config.json + *.safetensors
    cfg, params = qcjax.load("runs/tiny/checkpoints", step=300)   # a training run's (or a converted) checkpoint
    cfg = qcjax.loader.load_config(path)                          # the config alone, no weights

Every CLI and the training loop load through here, so the two formats are told apart in one place.
"""
from __future__ import annotations

from typing import Any

from qcjax import paths
from qcjax.config import ModelConfig


def is_hf_dir(path: str) -> bool:
    """An HF model directory holds config.json (a qcjax checkpoint holds step directories)."""
    return paths.exists(paths.join(str(path), "config.json"))


def load(path: str, *, mesh=None, dtype: str | None = None, step: int | None = None) -> tuple[ModelConfig, Any]:
    """(config, params) from an HF directory or a qcjax checkpoint (`step`: default the newest intact one), each
    param placed straight into its sharding on `mesh` (default one device), in `dtype` (default as stored)."""
    if not paths.isdir(str(path)):
        raise FileNotFoundError(f"{path}: no such directory (expected an HF model directory or a qcjax checkpoint)")
    if is_hf_dir(path):
        if step is not None:
            raise ValueError(f"{path} is an HF model directory: it has no steps (step={step})")
        from qcjax.hf import load_hf

        return load_hf(path, dtype=dtype, mesh=mesh)
    from qcjax.checkpoint import restore_params

    return restore_params(path, step=step, mesh=mesh, dtype=dtype)


def load_config(path: str, step: int | None = None) -> ModelConfig:
    """The model config of an HF directory or a qcjax checkpoint, without reading any weights."""
    if is_hf_dir(path):
        return ModelConfig.from_hf_json(path)
    from qcjax.checkpoint import read_config

    return read_config(path, step)[0]
