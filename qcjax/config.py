"""The model config schema: one frozen dataclass, the six real presets, small CPU presets, HF config.json I/O.

Every other module reads model hyper-parameters from `ModelConfig`; nothing else parses config.json.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax.numpy as jnp

from qcjax.platform import ATTENTION_IMPLS  # the attention switch's names (qcjax.platform, qcjax/attention)

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "minimal")
# Weight-only quantization of the seven projections (qcjax.adapters, through qwix): int8 with one scale per output
# channel; nf4 (NormalFloat4, QLoRA's format) with one scale per 64 input rows of each output channel.
QUANT_TYPES = ("none", "int8", "nf4")
# LoRA targets: the short names of the seven projections of a decoder layer.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# each target's module path inside a decoder layer (the model's module names)
LORA_PROJECTIONS = {
    "q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"), "o": ("attn", "o_proj"),
    "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"), "down": ("mlp", "down_proj"),
}


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """Static YaRN RoPE scaling, as transformers implements `rope_type: "yarn"`.

    Fields:
    factor: context extension factor (Qwen's 128K recipe: 4.0 over the 32K window).
    original_max_position_embeddings: the context the model was trained with before scaling.
    beta_fast: YaRN's high-frequency boundary (in rotations over the original context).
    beta_slow: YaRN's low-frequency boundary.
    attention_factor: scale of the rotary cos/sin; None: derived from factor (0.1 ln(factor) + 1).
    mscale: with mscale_all_dim (both set, attention_factor None), attention_factor = m(mscale) / m(mscale_all_dim)
      where m(x) = 0.1 x ln(factor) + 1, as transformers computes it; None: unused.
    mscale_all_dim: see mscale.
    truncate: round the correction range to whole dimensions (transformers' default).
    """

    factor: float = 4.0
    original_max_position_embeddings: int = 32768
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Low-rank adapters on the decoder's projections (qcjax.adapters builds them with qwix's LoraProvider):
    y = x W + (x A) B * alpha / rank, A [in, rank] he-uniform, B [rank, out] zeros (so training starts at the base).

    Fields:
    rank: adapter rank r (> 0).
    alpha: scale numerator: the adapter output is multiplied by alpha / rank.
    dropout: dropout on the adapter's input during training (0: none).
    targets: which projections get adapters: q, k, v, o, gate, up, down.
    layers: the decoder layers whose adapters train (None: all). Layers are scanned, so every layer holds an
      adapter; the others stay exactly zero (their gradients and updates are masked) and are not exported.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.rank <= 0:
            raise ValueError(f"LoraSpec.rank={self.rank}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout={self.dropout}: must be in [0, 1)")
        bad = sorted(set(self.targets) - set(LORA_TARGETS))
        if bad or not self.targets:
            raise ValueError(f"LoraSpec.targets={list(self.targets)}: each must be one of {list(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """How a base model is changed from outside it (qcjax.adapters applies it; the model knows nothing of it): LoRA
    adapters beside the projections and/or the projections' kernels held quantized. Not part of what a checkpoint's
    model is: a LoRA checkpoint stores it next to its model config, and a quantized param tree carries its own format
    (`qcjax.adapters.carried`).

    Fields:
    lora: low-rank adapters on the projections (`LoraSpec`), or None. The params then hold `kernel_lora_a` and
      `kernel_lora_b` next to each adapted kernel (qcjax.adapters); a LoRA checkpoint stores only those.
    quant: none | int8 | nf4: the seven projections' kernels held quantized, weight-only (int8 sampling, QLoRA's
      frozen base); embeddings, norms, biases and the LM head stay as they are.
    """

    lora: LoraSpec | None = None
    quant: str = "none"

    def __post_init__(self):
        if isinstance(self.lora, Mapping):  # from JSON (checkpoint metadata)
            object.__setattr__(self, "lora", LoraSpec(**self.lora))
        if self.quant not in QUANT_TYPES:
            raise ValueError(f"Adaptation.quant={self.quant!r}: expected one of {QUANT_TYPES}")

    @property
    def active(self) -> bool:
        """Whether anything is adapted (qwix then rewrites the projections)."""
        return self.lora is not None or self.quant != "none"

    def replace(self, **kw) -> "Adaptation":
        return dataclasses.replace(self, **kw)

    def check(self, cfg: "ModelConfig") -> "Adaptation":
        """This adaptation, after checking it fits the model `cfg` (the adapted layers exist)."""
        if self.lora is not None and self.lora.layers is not None:
            out = [i for i in self.lora.layers if not 0 <= i < cfg.num_layers]
            if out:
                raise ValueError(f"LoraSpec.layers: layers {out} outside 0..{cfg.num_layers - 1}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


NO_ADAPTATION = Adaptation()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The Qwen2 decoder: what a checkpoint is (the fields of HF's config.json), plus the numerics it is traced
    with (dtypes, remat, attention impl). How it is adapted (LoRA, quantized projections) is not here: that is
    `Adaptation`, applied from outside the model by qcjax.adapters.

    Fields:
    vocab_size: embedding (and LM head) rows: 151936 for 0.5B-3B, 152064 for 7B-32B; may exceed the tokenizer's ids.
    hidden_size: width of the residual stream.
    intermediate_size: width of the SwiGLU MLP's hidden layer.
    num_layers: decoder layers (scanned: compile time does not grow with depth).
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); num_heads must be a multiple of it.
    head_dim: per-head width; None: hidden_size // num_heads.
    rms_norm_eps: epsilon of every RMSNorm.
    rope_theta: rotary base frequency (Qwen2.5: 1e6).
    rope_scaling: static YaRN scaling (`YarnScaling`), or None for plain RoPE; `with_yarn()` sets it.
    max_position_embeddings: longest context the model is run at (32768; 131072 with YaRN factor 4).
    tie_word_embeddings: the LM head reuses the embedding matrix (0.5B, 1.5B, 3B).
    initializer_range: standard deviation of the random init (from-scratch models).
    param_dtype: dtype params are stored and updated in (training keeps float32 master weights); a run field,
      not part of the checkpoint's identity, like the three below.
    dtype: compute dtype of matmuls and activations; RMSNorm, RoPE, softmax and logits stay float32.
    remat: what the backward pass recomputes instead of storing: none | full | dots | dots_no_batch | minimal
      (minimal keeps the q/k/v projections, the attention output and the MLP hidden activation).
    attention_impl: auto | xla | pallas_tpu | pallas_gpu | cudnn | cpu (auto: Pallas on TPU/GPU, the qcjax.cpu
      kernels on the CPU where built, else XLA; see qcjax/platform.py and qcjax/attention/__init__.py).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # How to run it (not part of the checkpoint's identity).
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {why}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, f) <= 0:
                bad(f, "must be positive")
        if self.num_heads % self.num_kv_heads:
            bad("num_heads", f"must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            bad("hidden_size", f"not divisible by num_heads={self.num_heads}; set head_dim")
        if self.remat not in REMAT_POLICIES:
            bad("remat", f"expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            bad("attention_impl", f"expected one of {ATTENTION_IMPLS}")
        for f in ("param_dtype", "dtype"):
            try:
                jnp.dtype(getattr(self, f))
            except TypeError:
                bad(f, "not a dtype name")
        if isinstance(self.rope_scaling, Mapping):  # allow dicts from config files
            object.__setattr__(self, "rope_scaling", YarnScaling(**self.rope_scaling))

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (the GQA ratio)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def with_yarn(self, factor: float = 4.0, original_max_position_embeddings: int = 32768) -> "ModelConfig":
        """The 128K-context variant Qwen documents for 7B/14B/32B (static YaRN, opt in)."""
        return self.replace(
            rope_scaling=YarnScaling(factor=factor, original_max_position_embeddings=original_max_position_embeddings),
            max_position_embeddings=int(factor * original_max_position_embeddings),
        )

    # ---- every field as plain JSON (checkpoint metadata) ------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields, run fields (dtypes, remat, attention impl) included, as JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides) -> "ModelConfig":
        """Inverse of `to_dict`; an unknown field is an error naming it (a checkpoint from a newer qcjax). The
        adaptation fields that checkpoints before the split kept here ("lora", "quant") are left to
        `adaptation_from_dict`."""
        d = {k: v for k, v in d.items() if k not in LEGACY_ADAPTATION_FIELDS}
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"model config has unknown field(s) {unknown}")
        return cls(**{**d, **overrides})

    # ---- Hugging Face config.json -------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides) -> "ModelConfig":
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if model_type != "qwen2" or (archs and "Qwen2ForCausalLM" not in archs):
            raise ValueError(
                f"config.json describes model_type={model_type!r} architectures={archs!r}; "
                "qcjax implements Qwen2ForCausalLM (model_type 'qwen2') only"
            )
        if d.get("use_sliding_window"):
            raise ValueError("config.json has use_sliding_window=true; Qwen2.5-Coder never uses it and qcjax does not")
        # transformers 5.x keeps rope_theta inside rope_parameters; older files have it at top level and call the
        # scaling dict rope_scaling.
        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rtype = rope.get("rope_type", rope.get("type")) or legacy.get("rope_type", legacy.get("type")) or "default"
        scaling = None
        if rtype == "yarn":
            src = {**legacy, **rope}
            scaling = YarnScaling(
                factor=float(src["factor"]),
                original_max_position_embeddings=int(
                    src.get("original_max_position_embeddings") or d["max_position_embeddings"]
                ),
                beta_fast=float(src.get("beta_fast") or 32.0),
                beta_slow=float(src.get("beta_slow") or 1.0),
                attention_factor=src.get("attention_factor"),
                mscale=src.get("mscale"),
                mscale_all_dim=src.get("mscale_all_dim"),
                truncate=bool(src.get("truncate", True)),
            )
        elif rtype != "default":
            raise ValueError(f"config.json rope type {rtype!r} is not supported (only default and yarn)")
        kw = dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
            head_dim=d.get("head_dim"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=d.get("initializer_range", 0.02),
        )
        if kw["head_dim"] == kw["hidden_size"] // kw["num_heads"]:
            kw["head_dim"] = None
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_hf_json(cls, path: str, **overrides) -> "ModelConfig":
        from qcjax import paths

        if paths.isdir(path):
            path = paths.join(path, "config.json")
        try:
            with paths.open_file(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read HF config {path}: {e}") from e
        return cls.from_hf_dict(d, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """A Qwen2ForCausalLM config.json, readable by transformers 4.x and 5.x (rope fields in both places)."""
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.dim_per_head,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_dropout": 0.0,
            "torch_dtype": self.param_dtype,
        }
        from qcjax.tokenizer import ENDOFTEXT, SPECIAL_TOKENS

        eot = SPECIAL_TOKENS[ENDOFTEXT]
        if self.vocab_size > eot:  # <|endoftext|> (tiny test vocabularies don't have it)
            d["bos_token_id"] = d["eos_token_id"] = eot
        if self.rope_scaling is not None:
            y = self.rope_scaling
            scaling = {
                "rope_type": "yarn",
                "type": "yarn",
                "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow,
                "truncate": y.truncate,
            }
            for k in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(y, k) is not None:
                    scaling[k] = getattr(y, k)
            d["rope_scaling"] = scaling
            rope_parameters.update(scaling)
        d["rope_parameters"] = rope_parameters
        return d


# Model-config keys that checkpoints written before `Adaptation` was split out of ModelConfig hold.
LEGACY_ADAPTATION_FIELDS = ("lora", "quant")


def adaptation_from_dict(meta: Mapping[str, Any]) -> Adaptation:
    """A checkpoint's adaptation from its config JSON ({"model": ..., "adaptation": ...}): the "adaptation" entry,
    or for a checkpoint written before the split, the "lora"/"quant" fields inside "model"."""
    if "adaptation" in meta:
        return Adaptation(**meta["adaptation"])
    model = meta.get("model") or {}
    return Adaptation(**{k: model[k] for k in LEGACY_ADAPTATION_FIELDS if model.get(k) is not None})


def _preset(vocab, hidden, inter, layers, heads, kv, tied, **kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, tie_word_embeddings=tied, **kw,
    )


# The real sizes, as in the Qwen2.5-Coder-*B config.json files (32K context; `.with_yarn()` for 128K).
PRESETS: dict[str, ModelConfig] = {
    "0.5b": _preset(151936, 896, 4864, 24, 14, 2, True),
    "1.5b": _preset(151936, 1536, 8960, 28, 12, 2, True),
    "3b": _preset(151936, 2048, 11008, 36, 16, 2, True),
    "7b": _preset(152064, 3584, 18944, 28, 28, 4, False),
    "14b": _preset(152064, 5120, 13824, 48, 40, 8, False),
    "32b": _preset(152064, 5120, 27648, 64, 40, 8, False),
    # Small CPU configs for tests and demos; vocab covers the Qwen special-token ids so real token ids work.
    "tiny": _preset(151936, 64, 176, 2, 4, 2, True, max_position_embeddings=4096),
    "small": _preset(151936, 256, 704, 4, 8, 2, True, max_position_embeddings=4096),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset by name ("0.5b" ... "32b", "tiny", "small"), with field overrides."""
    key = name.lower().removeprefix("qwen2.5-coder-")
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[key].replace(**overrides)
