"""One answer to "what is at this path?": a Hugging Face model directory or a qcjax (Orbax) checkpoint.

    cfg, params = qcjax.load("Qwen2.5-Coder-1.5B")              # config.json + *.safetensors
    cfg, params = qcjax.load("runs/tiny/checkpoints", step=300)   # a training run's (or a converted) checkpoint
    cfg = qcjax.loader.load_config(path)                          # the config alone, no weights

A LoRA run's checkpoint holds the adapters and names its base (the run's init_from, or its seeded init): `load`
rebuilds the base, and returns the adapters folded into it (a plain model) or, with merge_lora=False, the adapted
tree (quantized base under QLoRA) that `qcjax.adapters.build(cfg, load_adaptation(path))` applies.

Every CLI and the training loop load through here, so the two formats are told apart in one place; the paths a
user names a trained model by (its run directory, its checkpoints/, one step of it) are resolved here too
(`resolve_checkpoint`), as is where a checkpoint's tokenizer is (`checkpoint_tokenizer`).
"""
from __future__ import annotations

from typing import Any

from qcjax import paths
from qcjax.config import Adaptation, ModelConfig, adaptation_from_dict


# What the sampling CLIs offer for --quant (infer.py, qcjax.serve): nf4 is QLoRA's training-time format for the
# frozen base (docs/sampling.md); `load` takes it too.
SAMPLING_QUANT = ("none", "int8")


# train.py's --workdir keeps its checkpoints here, and each step's config item in this subdirectory of the step
RUN_CHECKPOINTS, STEP_CONFIG = "checkpoints", "config"


def is_hf_dir(path: str) -> bool:
    """An HF model directory holds config.json (a qcjax checkpoint holds step directories)."""
    return paths.exists(paths.join(str(path), "config.json"))


def _is_step_dir(path: str) -> bool:
    return paths.basename(path).isdigit() and paths.isdir(paths.join(path, STEP_CONFIG))


def resolve_checkpoint(path: str, step: int | None = None) -> tuple[str, int | None]:
    """(checkpoint directory, step) for any of the three unambiguous names of a trained model: the checkpoint
    directory (runs/tiny/checkpoints), the run directory train.py wrote it in (runs/tiny), or one of its steps
    (runs/tiny/checkpoints/300: step 300). Users pass whichever they see, so every loader and CLI takes all three;
    anything else (an HF directory, a missing path) comes back as given, for the loaders' own errors."""
    path = str(path)
    trimmed = path.rstrip("/") or path
    if is_hf_dir(trimmed):
        return path, step
    if _is_step_dir(trimmed):
        named = int(paths.basename(trimmed))
        if step is not None and step != named:
            raise ValueError(f"{path} is the directory of step {named}, but step {step} was asked for")
        return paths.dirname(trimmed), named
    inner = paths.join(trimmed, RUN_CHECKPOINTS)
    if paths.isdir(inner):
        return inner, step
    return path, step


def checkpoint_tokenizer(ckpt: str, step: int | None = None) -> str | None:
    """The tokenizer of a qcjax checkpoint, for sampling it with no --tokenizer: tokenizer files in the checkpoint
    directory itself (None: the directory is the answer), else the tokenizer train.py recorded in the checkpoint (its
    path as given at training time), else the run directory's tokenizer/ next to checkpoints/."""
    if any(paths.exists(paths.join(ckpt, f)) for f in ("tokenizer.json", "spm.model")):
        return None
    from qcjax.checkpoint import read_config

    try:
        recorded = read_config(ckpt, step)[1].get("tokenizer")
    except (OSError, ValueError, KeyError):
        recorded = None
    beside = paths.join(paths.dirname(paths.absolute(ckpt)), "tokenizer")
    for cand in (recorded, beside):
        if cand and (cand == "qwen" or paths.exists(cand)):
            return cand
    return None


def load(path: str, *, mesh=None, dtype: str | None = None, step: int | None = None, merge_lora: bool = True,
         quant: str = "none") -> tuple[ModelConfig, Any]:
    """(config, params) from an HF directory or a qcjax checkpoint (`step`: default the newest intact one), each
    param placed straight into its sharding on `mesh` (default one device), in `dtype` (default as stored). A LoRA
    checkpoint comes back merged into its base (merge_lora), or as base + adapters.

    quant ("int8"; "nf4" works but is QLoRA's training format): weight-only quantization of the float model's seven
    projections as it loads (`qcjax.adapters.quantize`, placed on `mesh`): the tree carries its format, and
    `qcjax.adapters.module_for(cfg, params)` applies it. Every CLI that samples quantized loads through here."""
    from qcjax.config import QUANT_TYPES

    if quant not in QUANT_TYPES:
        raise ValueError(f"quant={quant!r}: expected one of {QUANT_TYPES}")
    cfg, params = _load(path, mesh=mesh, dtype=dtype, step=step, merge_lora=merge_lora)
    if quant == "none":
        return cfg, params
    from qcjax import adapters

    held = adapters.carried(params).quant
    if adapters.has_adapters(params) or held != "none":
        raise ValueError(f"{path}: quant={quant!r} quantizes a plain float model, not one with "
                         + (f"quant={held!r}" if held != "none" else "LoRA adapters (load with merge_lora=True)"))
    return cfg, adapters.quantize(cfg, params, quant, mesh)


def _load(path: str, *, mesh, dtype: str | None, step: int | None, merge_lora: bool) -> tuple[ModelConfig, Any]:
    """`load` before any quantization: the float model (or a LoRA checkpoint's base + adapters)."""
    path, step = resolve_checkpoint(path, step)
    if not paths.isdir(str(path)):
        raise FileNotFoundError(f"{path}: no such directory (expected an HF model directory or a qcjax checkpoint)")
    if is_hf_dir(path):
        if step is not None:
            raise ValueError(f"{path} is an HF model directory: it has no steps (step={step})")
        from qcjax.hf import load_hf

        return load_hf(path, dtype=dtype, mesh=mesh)
    from qcjax.checkpoint import read_config, restore_params

    cfg, params = restore_params(path, step=step, mesh=mesh, dtype=dtype)
    meta = read_config(path, step)[1]
    adaptation = adaptation_from_dict(meta)
    if adaptation.lora is None:
        return cfg, params
    from qcjax import adapters

    params = with_lora_base(cfg, adaptation, params, meta, path, mesh=mesh, dtype=dtype)
    if not merge_lora:
        return cfg, params
    params = adapters.merge(adaptation.lora, params)
    # a QLoRA base merges dequantized, in float32
    return cfg, (params if dtype is None else adapters.cast_floats(params, dtype))


def load_adaptation(path: str, step: int | None = None) -> Adaptation:
    """How a checkpoint's params are adapted (a LoRA run's spec and base quantization), without reading weights;
    nothing for an HF directory or a plain checkpoint."""
    path, step = resolve_checkpoint(path, step)
    if is_hf_dir(path):
        return Adaptation()
    from qcjax.checkpoint import read_config

    return adaptation_from_dict(read_config(path, step)[1])


def with_lora_base(cfg: ModelConfig, adaptation: Adaptation, lora: Any, meta: dict, path: str, *, mesh=None,
                   dtype: str | None = None) -> Any:
    """base + adapters: the base a LoRA checkpoint names in its metadata ("lora_base": the run's init_from, or its
    seed for a from-scratch base), quantized as adaptation.quant says, with the adapters `lora` added."""
    import jax

    from qcjax import adapters
    from qcjax.model import init_params

    base_of = meta.get("lora_base")
    if not isinstance(base_of, dict):
        raise ValueError(f"{path}: a LoRA checkpoint without a 'lora_base' entry: its base is unknown")
    if base_of.get("init_from"):
        from qcjax.hf import check_same_model

        base_cfg, base = load(base_of["init_from"], mesh=mesh, dtype=dtype)
        check_same_model(base_cfg, cfg, f"the base {base_of['init_from']} of the LoRA checkpoint {path}")
    else:  # the run's seeded init (tests, demos), rebuilt exactly
        from qcjax.model import abstract_params
        from qcjax.sharding import param_shardings

        out = param_shardings(abstract_params(cfg), mesh) if mesh is not None else None
        base = jax.jit(lambda: init_params(cfg, jax.random.key(int(base_of.get("seed", 0)))), out_shardings=out)()
    base = adapters.freeze_base(cfg, base, adaptation.quant, mesh)  # exactly the base the run trained against
    if dtype:
        base = adapters.cast_floats(base, dtype)
    return adapters.combine(base, lora)


def load_config(path: str, step: int | None = None) -> ModelConfig:
    """The model config of an HF directory or a qcjax checkpoint, without reading any weights."""
    path, step = resolve_checkpoint(path, step)
    if is_hf_dir(path):
        return ModelConfig.from_hf_json(path)
    from qcjax.checkpoint import read_config

    return read_config(path, step)[0]
