"""Every training field with its default; the size files (configs/0.5b.py ... 32b.py, tiny.py) override a few.

A config file may take a stage argument: `--config=configs/7b.py:repo` (file | repo | sft | dpo).
Any field can be overridden on the command line: `--config.optimizer.lr=1e-5 --config.steps=100`.
"""
from ml_collections import ConfigDict

STAGES = ("file", "repo", "sft", "dpo")


def get_config(stage: str = "file") -> ConfigDict:
    c = ConfigDict()
    c.stage = stage  # informational: which stage of the recipe this config describes

    # Model: a preset plus the run-time fields; 0 / "" keeps the preset's (or the init checkpoint's) value.
    c.model = ConfigDict(dict(
        preset="tiny",
        dtype="bfloat16",  # compute dtype; params stay in param_dtype (fp32 master weights)
        param_dtype="float32",
        remat="full",  # none | full | dots | dots_no_batch | minimal
        attention_impl="auto",
        num_layers=0,
        vocab_size=0,  # 0: the preset's, or the tokenizer's (rounded up to a multiple of 128) for a from-scratch model
        yarn_factor=0.0,  # > 0: static YaRN (Qwen's 128K recipe uses 4.0)
    ))
    c.init_from = ""  # HF checkpoint directory or Orbax checkpoint directory; "" = random init
    c.tokenizer = "qwen"  # tokenizer.json / SentencePiece .model / a directory / "qwen" / "spm:stdlib:VOCAB"

    c.task = {"sft": "sft", "dpo": "dpo"}.get(stage, "pretrain")  # pretrain | sft | dpo
    c.steps = 1000
    c.batch_size = 8  # global rows per step (all processes)
    c.seq_len = {"repo": 32768}.get(stage, 8192)
    c.grad_accum = 1  # micro-batches per step (the batch is split inside the jitted step)
    c.loss_chunk = 2048  # tokens per chunk of vocabulary-wide logits in the loss
    c.seed = 0

    c.optimizer = ConfigDict(dict(
        lr=3e-4, schedule="cosine", warmup_steps=100, end_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.1, clip_norm=1.0,
    ))
    c.dpo = ConfigDict(dict(
        beta=0.1, label_smoothing=0.0, loss_type="sigmoid",  # sigmoid | ipo
        reference="frozen",  # frozen: a copy of the starting weights in memory; precomputed: log-probs in the data
    ))
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1: the rest of the devices

    # Data: see docs/data.md (qcjax.data.config.DataConfig); sources default to the built-in stdlib corpus.
    c.data = ConfigDict(dict(
        sources=[dict(kind="stdlib", format="repo" if stage == "repo" else "text")],
        fim_rate=0.5,
        eval_fraction=0.01,  # a fixed held-out fraction of every source: the eval split
    ))

    c.log_every = 10
    c.eval_every = 200  # 0 disables evaluation
    c.eval_steps = 4
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.max_nonfinite_in_row = 5  # stop the run after this many skipped (non-finite) steps in a row
    c.peak_flops_per_device = 0.0  # for MFU; 0 = look the device up (unknown on CPU: MFU not reported)
    return c


# Stage defaults shared by the real sizes: (global rows per step, sequence length, peak lr, warmup steps).
# file/repo: continued pretraining of a released checkpoint (2M tokens per step); sft/dpo: fine-tuning.
STAGE_DEFAULTS = {
    "file": dict(batch_size=256, seq_len=8192, lr=1e-5, warmup_steps=100),
    "repo": dict(batch_size=64, seq_len=32768, lr=1e-5, warmup_steps=100),
    "sft": dict(batch_size=128, seq_len=8192, lr=2e-5, warmup_steps=50),
    "dpo": dict(batch_size=64, seq_len=4096, lr=5e-7, warmup_steps=20),
}


def size_config(preset: str, stage: str = "file", **overrides) -> ConfigDict:
    """A real size at a stage of the recipe: starts from the released HF checkpoint (`--config.init_from=DIR`,
    whose tokenizer.json is used), repo stage on repository samples, SFT on chat + FIM-instruct data, DPO pairs."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    c = get_config(stage)
    c.model.preset = preset
    c.tokenizer = ""  # "": the tokenizer.json of the init_from HF directory
    d = {**STAGE_DEFAULTS[stage], **overrides}
    c.batch_size, c.seq_len = d["batch_size"], d["seq_len"]
    c.optimizer.lr, c.optimizer.warmup_steps = d["lr"], d["warmup_steps"]
    c.optimizer.weight_decay = 0.0 if stage == "dpo" else 0.1
    c.steps = {"file": 10000, "repo": 2000, "sft": 3000, "dpo": 1000}[stage]
    if stage == "sft":
        c.data = ConfigDict(dict(sources=[dict(kind="jsonl", path="data/sft/*.jsonl", format="chat", weight=9),
                                          dict(kind="jsonl", path="data/fim_sft/*.jsonl", format="fim_instruct",
                                               weight=1)]))
    elif stage == "dpo":
        c.data = ConfigDict(dict(sources=[dict(kind="jsonl", path="data/dpo/*.jsonl", format="dpo")]))
        c.eval_every = 0
    return c
