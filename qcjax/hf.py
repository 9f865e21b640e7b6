"""The Hugging Face <-> qcjax name and layout mapping (kept as data), and reading HF safetensors checkpoints.

HF stores each Linear as weight [out, in]; qcjax stores kernels [in..., out...] with heads split out, and stacks the
layers on a leading axis for `nn.scan`. Each mapping row says: HF tensor name, our param path, and the layout kind:
  "copy"      same shape both sides (norms, embedding)
  "flat"      HF keeps it 1-D (q/k/v bias [H*D] <-> ours [H, D])
  "linear:N"  HF [out, in] <-> ours [in..., out...] whose first N dims are the input dims
Export (`params_to_hf`) reads the same rows backwards: there is no second mapping.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np

from qcjax.config import ModelConfig

Row = tuple[str, tuple[str, ...], str]

# "{i}" is the layer index; layer rows map onto the stacked "layers" subtree (leading layer axis).
LAYER_MAPPING: tuple[Row, ...] = (
    ("model.layers.{i}.input_layernorm.weight", ("layers", "input_norm", "scale"), "copy"),
    ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "q_proj", "kernel"), "linear:1"),  # [E,H,D]
    ("model.layers.{i}.self_attn.q_proj.bias", ("layers", "attn", "q_proj", "bias"), "flat"),  # [H,D]
    ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "k_proj", "kernel"), "linear:1"),
    ("model.layers.{i}.self_attn.k_proj.bias", ("layers", "attn", "k_proj", "bias"), "flat"),
    ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "v_proj", "kernel"), "linear:1"),
    ("model.layers.{i}.self_attn.v_proj.bias", ("layers", "attn", "v_proj", "bias"), "flat"),
    ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "attn", "o_proj", "kernel"), "linear:2"),  # [H,D,E]
    ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"), "copy"),
    ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), "linear:1"),  # [E,I]
    ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), "linear:1"),
    ("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), "linear:1"),  # [I,E]
)
GLOBAL_MAPPING: tuple[Row, ...] = (
    ("model.embed_tokens.weight", ("embed",), "copy"),  # [V,E]
    ("model.norm.weight", ("final_norm", "scale"), "copy"),
    ("lm_head.weight", ("lm_head",), "linear:1"),  # [E,V]; untied checkpoints only
)


def mapping(cfg: ModelConfig) -> list[Row]:
    """The rows that apply to this config (a tied model has no lm_head: it reuses the embedding)."""
    rows = [r for r in GLOBAL_MAPPING if not (cfg.tie_word_embeddings and r[1] == ("lm_head",))]
    return rows + list(LAYER_MAPPING)


def hf_names(cfg: ModelConfig, row: Row) -> list[str]:
    name = row[0]
    return [name.format(i=i) for i in range(cfg.num_layers)] if "{i}" in name else [name]


def hf_shape(our_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The HF shape of one (un-stacked) param of our shape."""
    if kind == "copy":
        return tuple(our_shape)
    if kind == "flat":
        return (math.prod(our_shape),)
    n_in = int(kind.split(":")[1])
    return (math.prod(our_shape[n_in:]), math.prod(our_shape[:n_in]))


def to_ours(x: np.ndarray, our_shape: tuple[int, ...], kind: str, name: str) -> np.ndarray:
    """One HF tensor -> our layout; a misshapen tensor is an error naming it and both shapes."""
    want = hf_shape(our_shape, kind)
    if tuple(x.shape) != want:
        raise ValueError(f"tensor {name!r} has shape {tuple(x.shape)}, expected {want} (our param shape {our_shape})")
    if kind.startswith("linear"):
        x = x.T
    return x.reshape(our_shape)


def to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    """One of our (un-stacked) params -> the HF layout."""
    if kind == "copy":
        return x
    if kind == "flat":
        return x.reshape(-1)
    n_in = int(kind.split(":")[1])
    return x.reshape(math.prod(x.shape[:n_in]), -1).T


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set_path(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def hf_to_params(
    cfg: ModelConfig,
    get_tensor: Callable[[str], np.ndarray],
    names: set[str],
    abstract: Any,
    place: Callable[[tuple[str, ...], np.ndarray], Any] = lambda path, x: x,
) -> dict:
    """Build our params tree from HF tensors, one param (one stacked layer tensor) at a time.

    abstract: our params as ShapeDtypeStructs (unboxed), giving shapes and dtypes. `place` turns each host array into
    its final form (e.g. a device_put into its sharding) so no second full copy is held.
    """
    rows = mapping(cfg)
    expected = {n for r in rows for n in hf_names(cfg, r)}
    missing = sorted(expected - names)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    extra = sorted(n for n in names - expected if not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if extra:
        raise ValueError(f"checkpoint has {len(extra)} unexpected tensor(s): {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    params: dict = {}
    for row in rows:
        spec = _get_path(abstract, row[1])
        dtype = np.dtype(spec.dtype)
        if row[0].startswith("model.layers."):
            layer_shape = tuple(spec.shape[1:])
            out = np.empty(spec.shape, dtype)
            for i, name in enumerate(hf_names(cfg, row)):
                out[i] = to_ours(get_tensor(name), layer_shape, row[2], name).astype(dtype)
        else:
            out = to_ours(get_tensor(row[0]), tuple(spec.shape), row[2], row[0]).astype(dtype)
        _set_path(params, row[1], place(row[1], out))
    return params


def params_to_hf(cfg: ModelConfig, params: Any) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, HF-layout host array) one tensor at a time, un-stacking the layers."""
    for row in mapping(cfg):
        x = _get_path(params, row[1])
        if row[0].startswith("model.layers."):
            for i, name in enumerate(hf_names(cfg, row)):
                yield name, to_hf(np.asarray(x[i]), row[2])
        else:
            yield row[0], to_hf(np.asarray(x), row[2])


# ---- safetensors, read lazily -------------------------------------------------------------------------------------
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsReader:
    """Memory-mapped tensors of one HF checkpoint directory (single file or sharded with an index).

    safetensors' numpy backend cannot return bfloat16, and its flax backend puts every tensor on a device; this
    reader maps the file and views each tensor in place (bfloat16 through ml_dtypes), so reading costs no copy.
    """

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self._where: dict[str, tuple[np.memmap, dict]] = {}
        for fname in files:
            path = os.path.join(hf_dir, fname)
            try:
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n))
                data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
            for name, meta in header.items():
                if name != "__metadata__":
                    self._where[name] = (data, meta)

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        data, meta = self._where[name]
        if meta["dtype"] not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r}: unsupported safetensors dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        return data[start:end].view(_ST_DTYPES[meta["dtype"]]).reshape(meta["shape"])


def load_hf(hf_dir: str, dtype: str | None = None, **config_overrides) -> tuple[ModelConfig, dict]:
    """(config, params) from an HF checkpoint directory. dtype: param dtype (default float32)."""
    import jax

    from qcjax.model import abstract_params
    from flax import linen as nn

    overrides = dict(config_overrides)
    if dtype is not None:
        overrides["param_dtype"] = dtype
    cfg = ModelConfig.from_hf_json(hf_dir, **overrides)
    reader = SafetensorsReader(hf_dir)
    abstract = nn.meta.unbox(abstract_params(cfg))
    params = hf_to_params(cfg, reader.get, reader.names(), abstract, place=lambda path, x: jax.numpy.asarray(x))
    return cfg, params
