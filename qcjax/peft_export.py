"""LoRA adapters in PEFT's layout: the directory `peft.PeftModel.from_pretrained(hf_base_model, DIR)` loads.

    adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules
                                (q_proj ... down_proj), layers_to_transform (LoraSpec.layers), base_model_name_or_path
    adapter_model.safetensors   base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight [r, in] and
                                ....lora_B.weight [out, r] (mlp.gate_proj ... for the MLP), trained layers only

The module names come from the one HF mapping (the kernel rows of qcjax.hf.LAYER_MAPPING), and so do the layouts:
our A [in, r] is applied to the kernel's input dims flattened in the order of HF's weight [out, in] columns
(o_proj: heads x head_dim, as `hf.to_hf` flattens the kernel), and B [r, out] yields the outputs in HF's row order
(q/k/v: heads x head_dim), so lora_A = A.T and lora_B = B.T. PEFT scales by lora_alpha / r, as we do by alpha / rank.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from qcjax import adapters, hf, paths
from qcjax.config import LoraSpec, ModelConfig

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def template(target: str) -> str:
    """The HF module name template of a LoRA target ("q" -> "model.layers.{i}.self_attn.q_proj")."""
    rows = {row[1]: row[0] for row in hf.LAYER_MAPPING}
    return rows[("layers",) + adapters.PROJECTIONS[target] + ("kernel",)].removesuffix(".weight")


def modules(spec: LoraSpec) -> list[tuple[str, tuple[str, ...]]]:
    """(HF module name template "model.layers.{i}.self_attn.q_proj", our projection path) per adapter target."""
    return [(template(t), ("layers",) + adapters.PROJECTIONS[t]) for t in spec.targets]


def trained_layers(cfg: ModelConfig, spec: LoraSpec) -> list[int]:
    """The layers whose adapters trained (the others are exactly zero, so PEFT gets no module there)."""
    return sorted(spec.layers) if spec.layers is not None else list(range(cfg.num_layers))


def adapter_config(cfg: ModelConfig, spec: LoraSpec, base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json's content for the adapters `spec` (PEFT fills the fields left out with its defaults)."""
    lo = spec
    templates = [name for name, _ in modules(spec)]
    restricted = lo.layers is not None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lo.rank,
        "lora_alpha": lo.alpha,
        "lora_dropout": lo.dropout,
        "target_modules": [t.rsplit(".", 1)[-1] for t in templates],
        "layers_to_transform": trained_layers(cfg, spec) if restricted else None,
        # the component before the layer index ("layers" of model.layers.{i}), which layers_to_transform counts in
        "layers_pattern": templates[0].split(".{i}")[0].rsplit(".", 1)[-1] if restricted else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def adapter_tensors(cfg: ModelConfig, spec: LoraSpec, lora: Any) -> list[tuple[str, np.ndarray]]:
    """(PEFT name, HF-layout host array) of every trained adapter; `lora`: the adapter tree (adapters.split's second
    half, as a LoRA checkpoint holds it: [layers, in, r] and [layers, r, out] per targeted projection)."""
    out = []
    for template, path in modules(spec):
        node = hf._get_path(lora, path)
        a, b = np.asarray(node[adapters.LORA_A]), np.asarray(node[adapters.LORA_B])
        for i in trained_layers(cfg, spec):
            name = PEFT_PREFIX + template.format(i=i)
            out += [(f"{name}.lora_A.weight", a[i].T), (f"{name}.lora_B.weight", b[i].T)]
    return out


def write_peft_dir(out_dir: str, cfg: ModelConfig, spec: LoraSpec, lora: Any, *, base_model: str | None = None,
                   dtype: str | None = None, overwrite: bool = False) -> str:
    """Write the adapters `lora` (shaped as `spec` says) of the model `cfg` as a PEFT adapter directory (whole or
    not at all), in `dtype` (default cfg.param_dtype). base_model: recorded as base_model_name_or_path (PEFT loads
    the adapters onto the model it is given; this only names it). Returns the directory."""
    if spec is None:
        raise ValueError("write_peft_dir needs the adapters' LoraSpec (got None)")
    tensors = adapter_tensors(cfg, spec, lora)
    specs = [(name, tuple(x.shape)) for name, x in tensors]
    with hf.atomic_dir(out_dir, overwrite) as tmp:
        with paths.open_file(paths.join(tmp, ADAPTER_FILES[0]), "w") as f:
            json.dump(adapter_config(cfg, spec, base_model), f, indent=2)
        hf.write_safetensors_shards(tmp, specs, iter(tensors), np.dtype(dtype or cfg.param_dtype), 2**62,
                                    stem=ADAPTER_FILES[1].removesuffix(".safetensors"))
    return paths.absolute(out_dir)
