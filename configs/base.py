"""The run config: `get_config(stage)` is the schema's defaults (qcjax.train.config.TrainConfig: every field, its
type, default and meaning) as an ml_collections ConfigDict, with the stage's own defaults; the size files
(configs/0.5b.py ... 32b.py, tiny.py) override a few. docs/config.md is generated from the schema and these files
(docs/gen_config_reference.py).

A config file may take a stage argument: `--config=configs/7b.py:repo` (file | repo | sft | dpo | grpo).
Any field can be overridden on the command line: `--config.optimizer.lr=1e-5 --config.steps=100`.
"""

from ml_collections import ConfigDict

from qcjax.data.config import DataConfig, SourceConfig
from qcjax.train.config import STAGES, TrainConfig, source_dict, to_config_dict


def source(kind: str, path: str = "", **fields) -> dict:
    """One entry of data.sources: a SourceConfig as a dict. kind, path, format and weight are always present (with
    SourceConfig's defaults) so that `--config.data.sources[0].path=...` works on every config (the command line can
    change a key, not add one); other fields only when given."""
    return source_dict(SourceConfig(kind, path, **fields), keep=tuple(fields))  # an unknown field name fails here


def get_config(stage: str = "file") -> ConfigDict:
    """The schema's defaults at a stage: the task, row length and data the stage implies."""
    if stage not in STAGES:
        raise ValueError(f"unknown config stage {stage!r}: expected one of {', '.join(STAGES)}")
    return to_config_dict(TrainConfig(
        stage=stage,
        task={"sft": "sft", "dpo": "dpo", "grpo": "rl"}.get(stage, "pretrain"),
        seq_len={"repo": 32768}.get(stage, TrainConfig.seq_len),
        data=DataConfig(sources=STAGE_SOURCES.get(stage, STAGE_SOURCES["file"])),
    ))


# Each stage's data, of the formats its task reads (so that every stage's config is valid as it stands): the built-in
# stdlib corpus (docs/data.md) as files or whole repositories for pretraining; for sft and dpo, JSONL files where
# `--config.data.sources[0].path=...` points at the real ones. (grpo's rows come from rollouts, not the data block.)
STAGE_SOURCES = {
    "file": (SourceConfig("stdlib", format="text"),),
    "repo": (SourceConfig("stdlib", format="repo"),),
    "sft": (SourceConfig("jsonl", "data/sft/*.jsonl", format="chat", weight=9),
            SourceConfig("jsonl", "data/fim_sft/*.jsonl", format="fim_instruct", weight=1)),
    "dpo": (SourceConfig("jsonl", "data/dpo/*.jsonl", format="dpo"),),
}


# Stage defaults shared by the real sizes: (global rows per step, sequence length, peak lr, warmup steps).
# file/repo: continued pretraining of a released checkpoint (2M tokens per step); sft/dpo: fine-tuning.
STAGE_DEFAULTS = {
    "file": dict(batch_size=256, seq_len=8192, lr=1e-5, warmup_steps=100),
    "repo": dict(batch_size=64, seq_len=32768, lr=1e-5, warmup_steps=100),
    "sft": dict(batch_size=128, seq_len=8192, lr=2e-5, warmup_steps=50),
    "dpo": dict(batch_size=64, seq_len=4096, lr=5e-7, warmup_steps=20),
    # grpo: 8 problems x rl.group_size 8 completions per step; prompt + rl.max_new_tokens within seq_len
    "grpo": dict(batch_size=64, seq_len=2048, lr=1e-6, warmup_steps=10),
}


def size_config(preset: str, stage: str = "file", fit: dict | None = None, **overrides) -> ConfigDict:
    """A real size at a stage of the recipe: starts from the released HF checkpoint (`--config.init_from=DIR`,
    whose tokenizer.json is used), repo stage on repository samples, SFT on chat + FIM-instruct data, DPO pairs.
    fit: {stage: (model.remat, per_device_batch)}, the memory setting docs/tpu-memory.md found to fit the stage's
    smallest v5p and v6e slices (and so any larger slice of them); a stage it lacks gets the least memory: full
    remat, one row per device."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    c = get_config(stage)
    c.model.preset = preset
    c.model.remat, c.per_device_batch = (fit or {}).get(stage, ("full", 1))
    c.tokenizer = ""  # "": the tokenizer.json of the init_from HF directory
    d = {**STAGE_DEFAULTS[stage], **overrides}
    c.batch_size, c.seq_len = d["batch_size"], d["seq_len"]
    c.optimizer.lr, c.optimizer.warmup_steps = d["lr"], d["warmup_steps"]
    c.optimizer.weight_decay = 0.0 if stage in ("dpo", "grpo") else 0.1
    c.steps = {"file": 10000, "repo": 2000, "sft": 3000, "dpo": 1000, "grpo": 500}[stage]
    if stage == "dpo":  # (the sft and dpo data: get_config's STAGE_SOURCES)
        c.eval_every = 0
    elif stage == "grpo":  # the rl block's defaults: the procedural family unless --config.rl.problems=FILE
        c.rl.max_new_tokens = 1024
        c.eval_every = 0
    return c
