"""The CPU demo: a tiny model trained from scratch on the Python standard library (runs in a few minutes).

A SentencePiece tokenizer (4096 ids, Qwen's special tokens included) is trained on the stdlib into the run
directory first; the model's vocabulary follows it.
"""
from configs import base


def get_config(stage: str = "file"):
    c = base.get_config(stage)
    c.model.preset = "tiny"
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.tokenizer = "spm:stdlib:4096"
    c.steps = 300
    c.batch_size = 8
    c.seq_len = 256
    c.loss_chunk = 2048  # one chunk: the whole [2048, 4096] logits are small here
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.01
    c.mesh.fsdp = -1
    c.log_every = 10
    c.eval_every = 100
    c.eval_steps = 4
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    if stage == "grpo":  # online RL on the procedural family: 4 problems x 8 completions of <= 40 tokens per step
        c.steps, c.batch_size, c.seq_len = 60, 32, 256
        c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.weight_decay = 1e-4, 5, 0.0
        c.rl.max_new_tokens, c.rl.n_problems, c.rl.format_reward = 40, 240, 0.1
        c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 20
    return c
