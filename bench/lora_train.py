"""Adapter training vs full fine-tuning: tokens/s and train-state bytes of the step train.py runs, in one run.

    python bench/lora_train.py [--steps 6] [--batch 4] [--seq 512] [--rank 16] [--dtype float32|bfloat16]

Three steps on the same model config, batch and compute dtype, timed alternately (so all see the same machine
load): full fine-tuning (every param trained, fp32 master weights + AdamW), LoRA (rank R on q/k/v/o/gate/up/down,
the base frozen in the compute dtype, adapters + AdamW in fp32) and QLoRA (the same adapters over an int8 base).
Each is qcjax.train.step.make_train_step, jitted with the state donated, as the loop builds it. Prints median step
time, tokens/s, the ratio to full fine-tuning, and the bytes the step holds: trained params + optimizer state, and
the frozen base.

What LoRA saves per step: the weight gradients of the projections (a third of a dense step's matmul FLOPs) and the
optimizer's pass over every param; it adds two thin matmuls per projection. On a TPU slice the larger gain is memory
(docs/tpu-memory.md); this CPU figure guards the step against regressions.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from train_step import BENCH_CFG, step_and_batch, timed  # noqa: E402

from qcjax import adapters  # noqa: E402
from qcjax.config import NO_ADAPTATION, Adaptation, LoraSpec, ModelConfig  # noqa: E402
from qcjax.model import count_params  # noqa: E402
from qcjax.train.step import init_state  # noqa: E402


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def runner(cfg: ModelConfig, ad: Adaptation, tokens: np.ndarray):
    """(one step to completion, trained-state bytes, frozen-base bytes) for cfg adapted as `ad` says."""
    step, tx, batch = step_and_batch(cfg, tokens, ad)
    params = adapters.init_params(cfg, ad.replace(quant="none"), jax.random.key(0))
    base = None
    if ad.lora is not None:  # as the loop holds a LoRA run: adapters trained, the base frozen (loop.lora_base_params)
        base, params = adapters.split(params)
        base = adapters.freeze_base(cfg, base, ad.quant)
    state = [init_state(params, tx)]

    def one():
        state[0], m = step(state[0], batch, None, base)
        jax.block_until_ready(m["loss"])

    trained = nbytes(state[0]["params"]) + nbytes(state[0]["opt_state"])
    return one, trained, nbytes(base) if base is not None else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (after one warm-up), alternated")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    args = ap.parse_args()
    full = BENCH_CFG.replace(dtype=args.dtype)
    lora = Adaptation(lora=LoraSpec(rank=args.rank, alpha=2.0 * args.rank))
    variants = {"full FT": NO_ADAPTATION, f"LoRA r{args.rank}": lora,
                f"QLoRA r{args.rank} int8": lora.replace(quant="int8")}
    tokens = np.random.default_rng(0).integers(0, full.vocab_size, (args.batch, args.seq)).astype(np.int32)
    n_tok = args.batch * args.seq
    print(f"config: {count_params(full) / 1e6:.0f}M params, batch {args.batch}x{args.seq}, compute {args.dtype}, "
          f"params fp32; jax {jax.__version__}, {jax.devices()[0].platform} x{jax.device_count()}")
    runs = {name: runner(full, ad, tokens) for name, ad in variants.items()}
    for one, _, _ in runs.values():
        one()  # compile, warm up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.steps):
        for name, (one, _, _) in runs.items():
            times[name] += timed(one, 1)
    ref = statistics.median(times["full FT"])
    print(f"{'variant':18s} {'median s/step':>13s} {'tok/s':>8s} {'vs full':>8s} {'trained+opt MB':>15s} "
          f"{'frozen base MB':>15s}")
    for name, (_, trained, frozen) in runs.items():
        med = statistics.median(times[name])
        print(f"{name:18s} {med:13.3f} {n_tok / med:8.0f} {ref / med:7.2f}x {trained / 1e6:15.1f} {frozen / 1e6:15.1f}"
              f"   (min {min(times[name]):.3f}, max {max(times[name]):.3f})")


if __name__ == "__main__":
    main()
