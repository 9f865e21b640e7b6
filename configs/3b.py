"""Qwen2.5-Coder-3B: continued pretraining (file | repo), SFT or DPO; e.g. --config=configs/3b.py:repo.

Start from the released weights with --config.init_from=/path/to/Qwen2.5-Coder-3B (an HF directory).
"""
from configs import base

# Per stage: (model.remat, per_device_batch), the setting docs/tpu-memory.md verified on the smallest v5p and
# v6e slices that fit (tools/tpu_memory_table.py).
FIT = {"file": ("full", 1), "repo": ("full", 1), "sft": ("full", 1), "dpo": ("full", 1)}


def get_config(stage: str = "file"):
    return base.size_config("3b", stage, fit=FIT)
