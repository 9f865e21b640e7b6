"""Precompute DPO reference log-probs in one pass and store them with the data (for models too large to hold twice).

    python -m qcjax.train.dpo_reference --config=configs/32b.py:dpo --config.init_from=/ckpt/hf \
        --input=data/dpo/pairs.jsonl --output=data/dpo/pairs_ref.jsonl

Each output line is the input record plus "ref_chosen_logp" and "ref_rejected_logp": the summed log-probs of the
completion tokens under the starting weights, computed with the same formatting, truncation and loss function as
the trainer. Train on the output with --config.data.dpo_ref_logps=True --config.dpo.reference=precomputed.
"""
from __future__ import annotations

import json
import sys
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from qcjax import paths
from qcjax.model import abstract_params
from qcjax.sharding import param_shardings
from qcjax.train.config import TrainConfig, from_config
from qcjax.train.step import sequence_logprobs


def _pairs(c: TrainConfig, tok, path: str) -> Iterator[tuple[dict, object, object] | tuple[dict, None, str]]:
    """(record, chosen Doc, rejected Doc) per JSONL line, formatted exactly as the DPO pipeline formats it."""
    import dataclasses

    from qcjax.data.config import SourceConfig
    from qcjax.data.formats import truncate_doc
    from qcjax.data.pipeline import FormatRecord

    data_cfg = dataclasses.replace(c.data, dpo_ref_logps=False)
    fmt = FormatRecord(tok, data_cfg, SourceConfig("jsonl", path, format="dpo"), c.seq_len)
    with paths.open_file(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield {}, None, f"{path}:{i}: not JSON ({e})"
                continue
            out = fmt.random_map(rec, np.random.default_rng(0))
            if out["bad"]:
                yield rec, None, out["bad"]
                continue
            chosen, rejected = out["docs"][0]
            yield rec, truncate_doc(chosen, c.seq_len), truncate_doc(rejected, c.seq_len)


def _rows(docs, seq_len: int, pad_id: int):
    n = len(docs)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    segs = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    for r, d in enumerate(docs):
        tokens[r, : len(d.tokens)] = d.tokens
        segs[r, : len(d.tokens)] = 1
        mask[r, : len(d.tokens)] = d.loss_mask
    return tokens, segs, mask


def precompute(c: TrainConfig, input_path: str, output_path: str, batch_size: int = 8) -> dict:
    """Write `output_path` (atomically); returns counts {"pairs", "skipped"}. `c`: the DPO run's config (a
    ConfigDict is parsed and checked here, once)."""
    from tqdm import tqdm

    from qcjax.train.loop import initial_params, model_config, setup_tokenizer, validate

    c = from_config(c)

    tok, _ = setup_tokenizer(c, paths.dirname(paths.absolute(output_path)))
    cfg = model_config(c, vocab_hint=tok.vocab_size)
    mesh = validate(c, cfg)
    with jax.set_mesh(mesh):
        params = initial_params(c, cfg, mesh, param_shardings(abstract_params(cfg), mesh))
        score = jax.jit(lambda p, t, s, m: sequence_logprobs(cfg, p, t, s, m, c.loss_chunk))
        tmp = output_path + ".tmp"
        counts = {"pairs": 0, "skipped": 0}
        with paths.open_file(tmp, "w") as out:
            batch: list = []

            def flush():
                docs = [d for _, ch, rj in batch for d in (ch, rj)]
                t, s, m = _rows(docs, c.seq_len, tok.pad_id)
                lp = np.asarray(score(params, jnp.asarray(t), jnp.asarray(s), jnp.asarray(m)))
                for k, (rec, _, _) in enumerate(batch):
                    rec = dict(rec, ref_chosen_logp=float(lp[2 * k]), ref_rejected_logp=float(lp[2 * k + 1]))
                    out.write(json.dumps(rec) + "\n")
                counts["pairs"] += len(batch)
                batch.clear()

            for rec, chosen, rejected in tqdm(_pairs(c, tok, input_path), desc="reference log-probs", unit="pair",
                                              file=sys.stderr):
                if chosen is None:
                    counts["skipped"] += 1
                    print(f"skipped: {rejected}", file=sys.stderr)
                    continue
                batch.append((rec, chosen, rejected))
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
        paths.replace(tmp, output_path)  # gs://: copied, then deleted
    return counts


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "The DPO training config (its model, init_from, "
                                              "tokenizer, data formatting and seq_len are used).")
    _IN = flags.DEFINE_string("input", None, "DPO pairs, JSONL (prompt / chosen / rejected).", required=True)
    _OUT = flags.DEFINE_string("output", None, "Output JSONL: the records plus reference log-probs.", required=True)
    _BATCH = flags.DEFINE_integer("batch_size", 8, "Pairs per forward pass.")

    def main(argv):
        del argv
        counts = precompute(from_config(_CONFIG.value), _IN.value, _OUT.value, _BATCH.value)
        print(f"wrote {counts['pairs']} pairs to {_OUT.value} ({counts['skipped']} skipped)", file=sys.stderr)

    app.run(main)
