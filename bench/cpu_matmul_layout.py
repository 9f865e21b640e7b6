"""XLA:CPU's cost for one decode-step matmul by dtype and weight layout (why bf16 decoding here is not 2x fp32).

A decode step is a few [batch, in] x [in, out] matmuls whose cost should be reading the weight once, so bf16 should
take half the time of fp32. This times one such matmul (the 0.5B MLP's up projection, 896 x 4864, stacked 8 times so
the weight outgrows the caches) for fp32 and for bf16 in the layouts and forms XLA could be given, alternating
them round by round, and prints medians, the weight's read rate and the ratio to fp32.

    python bench/cpu_matmul_layout.py [--rounds 30] [--batches 1,8]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

K, N = 896, 4864 * 8
DOT = (((1,), (0,)), ((), ()))  # x [b, in] . w [in, out]
DOT_T = (((1,), (1,)), ((), ()))  # x [b, in] . w [out, in]


def candidates(b: int):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(K, N)).astype(np.float32)
    x = rng.normal(size=(b, K)).astype(np.float32)
    bf = jnp.bfloat16
    pad = max(0, 8 - b)
    return {
        "fp32 [in,out]": (lambda x, w: jax.lax.dot_general(x, w, DOT), x, w),
        "fp32 [out,in]": (lambda x, w: jax.lax.dot_general(x, w, DOT_T), x, np.ascontiguousarray(w.T)),
        "bf16 [in,out]": (lambda x, w: jax.lax.dot_general(x, w, DOT, preferred_element_type=jnp.float32),
                          x.astype(bf), w.astype(bf)),
        "bf16 [out,in]": (lambda x, w: jax.lax.dot_general(x, w, DOT_T, preferred_element_type=jnp.float32),
                          x.astype(bf), np.ascontiguousarray(w.T).astype(bf)),
        "bf16 [in,out], rows padded to 8": (
            lambda x, w: jax.lax.dot_general(jnp.pad(x, ((0, pad), (0, 0))), w, DOT,
                                             preferred_element_type=jnp.float32)[: x.shape[0]],
            x.astype(bf), w.astype(bf)),
        "bf16 [out,in], rows padded to 8": (
            lambda x, w: jax.lax.dot_general(jnp.pad(x, ((0, pad), (0, 0))), w, DOT_T,
                                             preferred_element_type=jnp.float32)[: x.shape[0]],
            x.astype(bf), np.ascontiguousarray(w.T).astype(bf)),
        "bf16 weight upcast, fp32 dot": (lambda x, w: jax.lax.dot_general(x, w.astype(jnp.float32), DOT),
                                         x, w.astype(bf)),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batches", default="1,8")
    a = ap.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} cores; weight {K}x{N}")
    for b in map(int, a.batches.split(",")):
        cands = {k: (jax.jit(f), jnp.asarray(x), jnp.asarray(w)) for k, (f, x, w) in candidates(b).items()}
        times = {k: [] for k in cands}
        for f, x, w in cands.values():
            f(x, w).block_until_ready()
        for _ in range(a.rounds):  # alternate: every candidate sees the same machine load
            for k, (f, x, w) in cands.items():
                t = time.perf_counter()
                f(x, w).block_until_ready()
                times[k].append(time.perf_counter() - t)
        base = np.median(times["fp32 [in,out]"])
        print(f"\nbatch {b}: {'form':34s} {'median ms':>10s} {'weight GB/s':>12s} {'time / fp32':>12s}")
        for k, (f, x, w) in cands.items():
            m = float(np.median(times[k]))
            print(f"batch {b}: {k:34s} {m * 1e3:10.2f} {w.nbytes / m / 1e9:12.1f} {m / base:12.2f}")


if __name__ == "__main__":
    main()
