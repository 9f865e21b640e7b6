"""The CPU decode kernel (qcjax.cpu_matmul) end to end: the sampler with XLA's dots vs with the kernel, in one process
on the same random weights, alternated round by round, greedy tokens compared.

    python bench/cpu_matmul.py --dtype bfloat16 [--batches 1,8] [--rounds 3] [--prefill_len 512]

Variants: "xla" (the kernel off; kernels in the layout the sampler picks without it) and "kernel" (what the sampler
does: decode steps through the kernel; prompts keep XLA's GEMMs). The kernel is chosen when a program is traced, so
every round clears JAX's caches and compiles again (compile time is not timed). Prints tok/s medians and the
kernel's ratio to "xla".
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
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefill_len", type=int, default=512)
    p.add_argument("--decode_prompt", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=17, help="decode steps timed: new_tokens - 1")
    a = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from qcjax import sampler as S

    S.configure_cpu_xla(a.dtype)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import qcjax
    from qcjax import cpu_matmul
    from qcjax.model import init_params

    if not cpu_matmul.available():
        sys.exit("the CPU kernel is unavailable here (see the warning above)")
    cfg = qcjax.get_config(a.model).replace(param_dtype=a.dtype, dtype=a.dtype)
    stacked = init_params(cfg, jax.random.key(0))
    on, applies = cpu_matmul.available, cpu_matmul.applies
    cpu_matmul.available = lambda: False  # the layout the sampler picks without the kernel
    xla_layout = S.default_kernel_layout(cfg)
    cpu_matmul.available = on
    layouts = {"xla": xla_layout, "kernel": S.default_kernel_layout(cfg)}
    params = {k: S.unstack_params(cfg, stacked, kernel_layout=v) for k, v in set((v, v) for v in layouts.values())}
    del stacked
    variants = {"xla": (params[layouts["xla"]], False), "kernel": (params[layouts["kernel"]], True)}
    cache_dt = jnp.dtype(a.dtype)
    rng = np.random.default_rng(0)
    print(f"{a.model} {a.dtype}, jax {jax.__version__}, layouts {layouts}, AMX bf16: {cpu_matmul.amx_bf16()}; "
          f"{a.rounds} rounds, tok/s medians", flush=True)

    def use(kernel: bool):
        jax.clear_caches()
        cpu_matmul.applies = applies if kernel else (lambda rows, dtype: False)

    def measure(name, prompts, n, timed):
        plan = S.plan(cfg, prompts, max_new_tokens=n, min_batch=S.default_min_batch(cfg))
        c = S.controls_for(plan)
        got, out = {k: [] for k in variants}, {}
        for _ in range(a.rounds):
            for k, (prm, kernel) in variants.items():
                use(kernel)
                timed(plan, c, prm)  # compile + warm-up
                rate, out[k] = timed(plan, c, prm)
                got[k].append(rate)
        med = {k: statistics.median(v) for k, v in got.items()}
        same = all(np.array_equal(out["xla"], o) for o in out.values())
        print(f"{name:>16}: " + "  ".join(f"{k} {m:7.1f} ({m / med['xla']:.2f}x)" for k, m in med.items())
              + f"  same tokens: {same}", flush=True)

    def prefill(plan, c, prm):
        t = time.perf_counter()
        st = jax.block_until_ready(S.start(cfg, prm, plan, c, cache_dt))
        return a.prefill_len / (time.perf_counter() - t), np.asarray(st.out)

    measure(f"prefill 1x{a.prefill_len}", [rng.integers(0, 150000, a.prefill_len).tolist()], 1, prefill)
    n = a.new_tokens
    for b in [int(x) for x in a.batches.split(",")]:
        def decode(plan, c, prm, b=b):
            st = jax.block_until_ready(S.start(cfg, prm, plan, c, cache_dt))
            t = time.perf_counter()
            out = np.asarray(S.decode(cfg, plan.kinds, prm, st, c, jnp.int32(n)).out)
            return b * (n - 1) / (time.perf_counter() - t), out[:b]

        measure(f"decode batch {b}", [rng.integers(0, 150000, a.decode_prompt).tolist() for _ in range(b)], n, decode)


if __name__ == "__main__":
    main()
