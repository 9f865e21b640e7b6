"""Qwen2.5-Coder-0.5B: continued pretraining (file | repo), SFT or DPO; e.g. --config=configs/0.5b.py:repo.

Start from the released weights with --config.init_from=/path/to/Qwen2.5-Coder-0.5B (an HF directory).
"""
from configs import base

# Per stage: (model.remat, per_device_batch), the setting docs/tpu-memory.md verified on the smallest v5p and
# v6e slices that fit (tools/tpu_memory_table.py).
FIT = {"file": ("minimal", 2), "repo": ("minimal", 1), "sft": ("minimal", 2), "dpo": ("minimal", 2)}


def get_config(stage: str = "file"):
    return base.size_config("0.5b", stage, fit=FIT)
