"""Train-step throughput: our jitted step vs a PyTorch reference step, same config, batch, dtype, in one run.

    python bench/train_step.py [--dtype float32|bfloat16] [--steps 6] [--batch 4] [--seq 512]

Reference: transformers Qwen2ForCausalLM + torch.optim.AdamW (loss from `labels=`), 2 threads. Ours: the step
train.py runs (qcjax.train.step.make_train_step: chunked fp32 loss, AdamW, clipping, non-finite guard), jitted with
the state donated. Prints the median step time of each, tokens/s, the ratio, and MFU against this CPU's measured
matmul peak (a 2048^3 matmul in the same dtype, timed in the same run).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qcjax.config import NO_ADAPTATION, Adaptation, ModelConfig  # noqa: E402
from qcjax.model import count_params, init_params  # noqa: E402
from qcjax.train.config import TrainConfig  # noqa: E402
from qcjax.train.metrics import train_flops_per_token  # noqa: E402
from qcjax.train.step import OptimizerConfig, StepConfig, init_state, lr_schedule, make_optimizer, \
    make_train_step  # noqa: E402

# ~126M parameters: hidden 768, 12 layers, 12/2 heads (head dim 64), MLP 3072, vocab 32000, tied.
BENCH_CFG = ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                        num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=4096)


def timed(fn, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def matmul_peak(dtype: str, n: int = 2048, reps: int = 5) -> float:
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    t = min(timed(lambda: f(a, a).block_until_ready(), reps))
    return 2 * n**3 / t


def step_and_batch(cfg: ModelConfig, tokens: np.ndarray, ad: Adaptation = NO_ADAPTATION):
    """(jitted step as train.py runs it, state donated; its optimizer; the batch of `tokens`, every token trained).
    ad: LoRA adapters / a quantized base, as a LoRA run's step holds them."""
    oc = OptimizerConfig(lr=1e-4, warmup_steps=0)
    tx = make_optimizer(oc, 1000)
    step = jax.jit(make_train_step(cfg, StepConfig.of(TrainConfig(loss_chunk=tokens.size)), tx,
                                   lr_schedule(oc, 1000), ad),
                   donate_argnums=0)
    b, t = tokens.shape
    batch = {"tokens": jnp.asarray(tokens), "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
             "segment_ids": jnp.ones((b, t), jnp.int32), "loss_mask": jnp.ones((b, t), jnp.float32)}
    return step, tx, batch


def ours(cfg: ModelConfig, tokens: np.ndarray):
    """A zero-argument callable that runs one of our train steps to completion (compiled on the first call)."""
    step, tx, batch = step_and_batch(cfg, tokens)
    state = [init_state(init_params(cfg, jax.random.key(0)), tx)]

    def one():
        state[0], m = step(state[0], batch)
        jax.block_until_ready(m["loss"])

    return one


def torch_ref(cfg: ModelConfig, tokens: np.ndarray, dtype: str):
    """The same for transformers + torch AdamW (same betas, weight decay, clipping)."""
    import torch
    import transformers

    torch.set_num_threads(2)
    hf_cfg = transformers.Qwen2Config(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.Qwen2ForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.as_tensor(tokens, dtype=torch.long)
    autocast = dtype == "bfloat16"

    def one():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return one


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--steps", type=int, default=6,
                    help="timed steps per implementation (after one warm-up), alternating between the two")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    cfg = BENCH_CFG.replace(dtype=args.dtype)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    n_tok = args.batch * args.seq
    peak = matmul_peak(args.dtype)
    print(f"config: {count_params(cfg) / 1e6:.0f}M params, batch {args.batch}x{args.seq}, {args.dtype}; "
          f"CPU {args.dtype} matmul peak {peak / 1e9:.0f} GFLOP/s; jax {jax.__version__}")
    run_ours, run_ref = ours(cfg, tokens), torch_ref(cfg, tokens, args.dtype)
    run_ours(), run_ref()  # compile / warm up
    t_ours, t_ref = [], []
    for _ in range(args.steps):  # alternate, so both see the same machine load over time
        t_ours += timed(run_ours, 1)
        t_ref += timed(run_ref, 1)
    flops = train_flops_per_token(cfg, args.seq) * n_tok
    rows = []
    for name, ts in (("qcjax", t_ours), ("torch", t_ref)):
        med = statistics.median(ts)
        rows.append((name, med, n_tok / med, flops / med / peak))
        print(f"{name:6s} median step {med:.3f} s  (min {min(ts):.3f}, max {max(ts):.3f})  {n_tok / med:7.0f} tok/s  "
              f"MFU vs measured peak {flops / med / peak:.1%}")
    print(f"ratio qcjax/torch (tokens/s): {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
