"""Alternated A/B of sampler variants in one process (used by bench/kernel_layout.py and bench/cpu_matmul.py): prefill
1 x prefill_len tokens, then decode at each batch size, every variant once per round so machine noise hits all
alike; tok/s medians, each variant's ratio to the first, and whether all gave the same tokens."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def add_args(p) -> None:
    p.add_argument("--model", default="0.5b", help="architecture preset (random weights)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefill_len", type=int, default=512)
    p.add_argument("--decode_prompt", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=17, help="decode steps timed: new_tokens - 1")


def run(a, cfg, variants: dict[str, tuple[Any, Callable[[], None]]], warm_every_round: bool) -> None:
    """variants: name -> (sampler params, setup run before each of its measurements). warm_every_round: time a
    second call after a first (for variants that recompile every round); else drop the first round."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qcjax import sampler as S

    if not warm_every_round and a.rounds < 2:
        raise SystemExit("--rounds must be >= 2: the first round is a warm-up and is dropped")
    cache_dt = jnp.dtype(a.dtype)
    rng = np.random.default_rng(0)

    def measure(name, prompts, n, timed):
        plan = S.plan(cfg, prompts, max_new_tokens=n, min_batch=S.default_min_batch(cfg))
        c = S.controls_for(plan)
        got, out = {k: [] for k in variants}, {}
        for r in range(a.rounds):
            for k, (params, setup) in variants.items():
                setup()
                if warm_every_round:
                    timed(plan, c, params)
                rate, out[k] = timed(plan, c, params)
                if warm_every_round or r:
                    got[k].append(rate)
        med = {k: statistics.median(v) for k, v in got.items()}
        first = next(iter(med.values()))
        same = all(np.array_equal(next(iter(out.values())), o) for o in out.values())
        print(f"{name:>16}: " + "  ".join(f"{k} {m:7.1f} ({m / first:.2f}x)" for k, m in med.items())
              + f"  same tokens: {same}", flush=True)

    def prefill(plan, c, params):
        t = time.perf_counter()
        st = jax.block_until_ready(S.start(cfg, params, plan, c, cache_dt))
        return a.prefill_len / (time.perf_counter() - t), np.asarray(st.out)

    measure(f"prefill 1x{a.prefill_len}", [rng.integers(0, 150000, a.prefill_len).tolist()], 1, prefill)
    n = a.new_tokens
    for b in [int(x) for x in a.batches.split(",")]:
        def decode(plan, c, params, b=b):
            st = jax.block_until_ready(S.start(cfg, params, plan, c, cache_dt))
            t = time.perf_counter()
            out = np.asarray(S.decode(cfg, plan.kinds, params, st, c, jnp.int32(n)).out)
            return b * (n - 1) / (time.perf_counter() - t), out[:b]

        measure(f"decode batch {b}", [rng.integers(0, 150000, a.decode_prompt).tolist() for _ in range(b)], n, decode)
