"""DPO on pairs from `python -m qcjax.prefs` (base-model prompts, raw layout): --config=configs/prefs.py:SIZE.

SIZE: 0.5b 1.5b 3b 7b 14b 32b or tiny (the default).

The size's own :dpo stage (configs/SIZE.py), with the data that qcjax.prefs writes: one JSONL source in the dpo
format (`--config.data.sources[0].path=pairs.jsonl`) laid out raw, prompt + completion + <|endoftext|>, which is
exactly the text the model sampled from a base prompt (the size files' default, ChatML, would wrap it in chat
turns). For `--mode instruct` pairs use the size's own `:dpo` stage instead.

With the RPO term on (`dpo.rpo_alpha=1`: the chosen completion's per-token NLL): execution pairs are near misses
(the same code with another constant), and plain DPO then lowered the chosen completions' likelihood with the
rejected ones' (held-out pass@1 fell on the procedural family); with the term the loop raised it round after round
(bench/RESULTS.md, "Preference loop").

    python train.py --config=configs/prefs.py:1.5b --config.init_from=Qwen2.5-Coder-1.5B \\
        '--config.data.sources[0].path=pairs.jsonl' --workdir=runs/dpo
"""
import importlib.util
import os

from configs import base

SIZES = ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "tiny")


def get_config(size: str = "tiny"):
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: expected one of {', '.join(SIZES)}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{size}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{size.replace('.', '_')}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("dpo")
    c.data.sources = (base.source("jsonl", "pairs.jsonl", format="dpo"),)
    c.data.dpo_style, c.data.eval_fraction = "raw", 0.0
    c.eval_every = 0
    c.dpo.rpo_alpha = 1.0
    return c
