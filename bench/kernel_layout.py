"""The sampler's projection-kernel layouts end to end: "in_out" (the model's [in..., out...]) vs "out_in"
([out..., in...], what `qcjax.sampler.default_kernel_layout` picks for bf16 on the CPU), alternated round by round in
one process on the same random weights, with the same greedy tokens checked.

    python bench/kernel_layout.py --dtype bfloat16 [--batches 1,8] [--rounds 5] [--prefill_len 512]

Prints tok/s medians (the first round is a warm-up) and out_in / in_out per measure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="0.5b", help="architecture preset (random weights)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefill_len", type=int, default=512)
    p.add_argument("--decode_prompt", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=33, help="decode steps timed: new_tokens - 1")
    a = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from qcjax import sampler as S

    S.configure_cpu_xla(a.dtype)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import qcjax
    from qcjax.model import init_params

    cfg = qcjax.get_config(a.model).replace(param_dtype=a.dtype, dtype=a.dtype)
    stacked = init_params(cfg, jax.random.key(0))
    layouts = {k: S.unstack_params(cfg, stacked, kernel_layout=k) for k in S.KERNEL_LAYOUTS}
    del stacked
    cache_dt = jnp.dtype(a.dtype)
    rng = np.random.default_rng(0)
    print(f"{a.model} {a.dtype}, jax {jax.__version__}, {a.rounds} rounds (first dropped), tok/s medians", flush=True)

    def measure(name, prompts, n, timed):
        plan = S.plan(cfg, prompts, max_new_tokens=n, min_batch=S.default_min_batch(cfg))
        c = S.controls_for(plan)
        got = {k: [] for k in layouts}
        out = {}
        for r in range(a.rounds):
            for k, params in layouts.items():
                rate, out[k] = timed(plan, c, params)
                if r:
                    got[k].append(rate)
        med = {k: statistics.median(v) for k, v in got.items()}
        same = np.array_equal(out["in_out"], out["out_in"])
        print(f"{name:>16}: in_out {med['in_out']:7.1f}  out_in {med['out_in']:7.1f}  "
              f"ratio {med['out_in'] / med['in_out']:.2f}  same tokens: {same}", flush=True)

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


if __name__ == "__main__":
    main()
