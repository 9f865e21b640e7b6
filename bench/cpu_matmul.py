"""The CPU decode kernel (qcjax.cpu_matmul) end to end: the sampler with XLA's dots vs with the kernel, in one process
on the same random weights, alternated round by round, greedy tokens compared.

    python bench/cpu_matmul.py --dtype bfloat16 [--batches 1,8] [--rounds 3] [--prefill_len 512]
    python bench/cpu_matmul.py --matmul --dtype float32 [--batches 1,2,8]   # one matmul alone, kernel vs XLA

Variants: "xla" (the kernel off; kernels in the layout the sampler picks without it: for fp32 that is another layout,
so the fp32 A/B measures kernel and layout together) and "kernel" (what the sampler does: decode steps through the
kernel; prompts keep XLA's GEMMs). The kernel is chosen when a program is traced, so
every round clears JAX's caches and compiles again (compile time is not timed). Prints tok/s medians and the
kernel's ratio to "xla".

--matmul times one decode-shaped matmul alone instead: [rows, 896] x a [311296, 896] weight stored [out, in] (the
0.5B MLP's 4864 rows stacked 64 times: 0.56 GB bf16, 1.1 GB fp32, past this machine's 300 MB L3), the kernel vs
XLA's dot_general on the same arrays, alternated, medians of --rounds x 5 calls, with the weight's read rate.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sampler_ab  # noqa: E402  (bench/sampler_ab.py, beside this file)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sampler_ab.add_args(p)
    p.set_defaults(rounds=3)
    p.add_argument("--matmul", action="store_true", help="time one matmul alone (kernel vs XLA), not the sampler")
    a = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from qcjax import sampler as S

    S.configure_cpu_xla(a.dtype)
    import jax

    import qcjax
    from qcjax import cpu_matmul
    from qcjax.model import init_params

    if not cpu_matmul.available():
        sys.exit("the CPU kernel is unavailable here (see the warning above)")
    if a.matmul:
        return matmul_alone(a)
    cfg = qcjax.get_config(a.model).replace(param_dtype=a.dtype, dtype=a.dtype)
    on, applies = cpu_matmul.available, cpu_matmul.applies
    cpu_matmul.available = lambda: False  # the layout the sampler picks without the kernel
    layouts = {"xla": S.default_kernel_layout(cfg)}
    cpu_matmul.available = on
    layouts["kernel"] = S.default_kernel_layout(cfg)
    stacked = init_params(cfg, jax.random.key(0))
    params = {v: S.unstack_params(cfg, stacked, kernel_layout=v) for v in set(layouts.values())}
    del stacked

    def use(kernel: bool):  # the kernel is chosen at trace time: drop compiled programs, retrace
        jax.clear_caches()
        cpu_matmul.applies = applies if kernel else (lambda rows, dtype: False)

    variants = {"xla": (params[layouts["xla"]], lambda: use(False)),
                "kernel": (params[layouts["kernel"]], lambda: use(True))}
    print(f"{a.model} {a.dtype}, jax {jax.__version__}, layouts {layouts}, AMX bf16: {cpu_matmul.amx_bf16()}; "
          f"{a.rounds} rounds, tok/s medians", flush=True)
    sampler_ab.run(a, cfg, variants, warm_every_round=True)


def matmul_alone(a):
    import jax
    import jax.numpy as jnp

    from qcjax import cpu_matmul

    k, n = 896, 4864 * 64
    w = jax.random.normal(jax.random.key(0), (n, k), jnp.float32).astype(a.dtype)
    xla = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
    ours = jax.jit(cpu_matmul.rows_matmul)
    print(f"{a.dtype} weight [{n}, {k}] ({w.nbytes / 1e9:.2f} GB), AMX bf16: {cpu_matmul.amx_bf16()}; medians")
    for b in [int(v) for v in a.batches.split(",")]:
        x = jax.random.normal(jax.random.key(b), (b, k), jnp.float32).astype(a.dtype)
        err = float(jnp.max(jnp.abs(ours(x, w) - xla(x, w))) / jnp.max(jnp.abs(xla(x, w))))
        times = {"xla": [], "kernel": []}
        for _ in range(a.rounds):
            for name, f in (("xla", xla), ("kernel", ours)):
                for _ in range(5):
                    t = time.perf_counter()
                    f(x, w).block_until_ready()
                    times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(v) for name, v in times.items()}
        print(f"rows {b}: " + "  ".join(f"{name} {m * 1e3:7.2f} ms {w.nbytes / m / 1e9:5.1f} GB/s" for name, m in
                                        med.items()) + f"  kernel {med['xla'] / med['kernel']:.2f}x faster; max rel "
              f"diff {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
