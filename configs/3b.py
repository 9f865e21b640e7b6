"""Qwen2.5-Coder-3B: continued pretraining (file | repo), SFT or DPO; e.g. --config=configs/3b.py:repo.

Start from the released weights with --config.init_from=/path/to/Qwen2.5-Coder-3B (an HF directory).
"""
from configs import base


def get_config(stage: str = "file"):
    return base.size_config("3b", stage)
