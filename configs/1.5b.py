"""Qwen2.5-Coder-1.5B: continued pretraining (file | repo), SFT or DPO; e.g. --config=configs/1.5b.py:repo.

Start from the released weights with --config.init_from=/path/to/Qwen2.5-Coder-1.5B (an HF directory).
"""
from configs import base


def get_config(stage: str = "file"):
    return base.size_config("1.5b", stage)
