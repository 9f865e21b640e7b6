"""The data path: sources (records) -> formats (ids + loss masks) -> Grain pipeline (mix, pack, batch, state).

    from qcjax.data import DataConfig, SourceConfig, make_pretrain_iterator
    from qcjax.tokenizer import load_tokenizer
    it = make_pretrain_iterator(DataConfig(), load_tokenizer("qwen"), seq_len=1024, batch_size=4)

See docs/data.md for the formats, the config fields and the loss-mask convention.
"""
from qcjax.data.config import DataConfig, SourceConfig
from qcjax.data.pipeline import (ROW_KEYS, iterator_stats, make_dataset, make_dpo_iterator, make_iterator,
                                 make_pretrain_iterator, make_sft_iterator)

__all__ = ["DataConfig", "SourceConfig", "ROW_KEYS", "iterator_stats", "make_dataset", "make_iterator",
           "make_pretrain_iterator", "make_sft_iterator", "make_dpo_iterator"]
