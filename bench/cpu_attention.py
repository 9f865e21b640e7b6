"""The CPU prompt-attention kernel (qcjax.cpu.attention) against XLA's prompt attention, in one process, alternated.

    python bench/cpu_attention.py [--lengths 512,2048] [--dtype float32] [--rounds 5]          # the sampler's prefill
    python bench/cpu_attention.py --alone [--lengths 512,2048] [--dtype float32] [--rounds 5]  # attention alone

Default: the sampler's prefill of one random prompt of each length (0.5B architecture, random weights), with the
kernel and without it (XLA's attention in PROMPT_QUERY_BLOCKS causal blocks, what runs where the kernel does not
apply). Both programs are compiled once, before timing: attention_impl="cpu" (what "auto" picks on the CPU) and
attention_impl="xla" (XLA only). Prints tok/s medians, the ratio, and whether the first tokens agree.

--alone times the attention alone: 24 layers' worth of random q/k/v of the 0.5B shapes (14 query heads, 2 KV heads,
head_dim 64) in one jitted program per variant, with causal GFLOP/s (2 x 2 x T^2/2 x head_dim x heads per layer,
the work a causal kernel must do) and the largest difference between the two.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="512,2048", help="prompt lengths (tokens)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, each variant once per round")
    p.add_argument("--alone", action="store_true", help="time the attention alone, not the sampler's prefill")
    a = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from qcjax import platform as switch
    from qcjax.cpu import build

    switch.configure_xla(a.dtype)
    import jax

    if not build.available():
        raise SystemExit("the CPU kernels are unavailable here (see the warning above)")
    print(f"jax {jax.__version__}, {a.dtype}, {jax.devices()[0].device_kind}; medians of {a.rounds} alternated rounds")
    for t in [int(v) for v in a.lengths.split(",")]:
        (attention_alone if a.alone else prefill)(a, t)


def timed(variants: dict, rounds: int) -> dict:
    """name -> median seconds of fn(), the variants alternated round by round (each called once before)."""
    for fn in variants.values():
        jax_block(fn())
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            jax_block(fn())
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def jax_block(x):
    import jax

    return jax.block_until_ready(x)


def prefill(a, t: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import qcjax
    from qcjax import platform as switch, sampler as S
    from qcjax.model import init_params

    cfg = qcjax.get_config("0.5b").replace(param_dtype=a.dtype, dtype=a.dtype)
    params = init_params(cfg, jax.random.key(0))
    prompt = np.random.default_rng(t).integers(0, 150000, t).tolist()
    plan = S.plan(cfg, [prompt], max_new_tokens=1, min_batch=switch.min_batch(cfg.dtype))
    controls = S.controls_for(plan)
    first = {}
    configs = {"kernel": cfg.replace(attention_impl="cpu"), "xla": cfg.replace(attention_impl="xla")}
    for name, c in configs.items():  # trace and compile each
        first[name] = np.asarray(S.start(c, params, plan, controls, jnp.dtype(a.dtype)).out)
    med = timed({name: (lambda c=c: S.start(c, params, plan, controls, jnp.dtype(a.dtype)))
                 for name, c in configs.items()}, a.rounds)
    rate = {k: t / v for k, v in med.items()}
    print(f"prefill 1x{t}: kernel {rate['kernel']:.1f} tok/s, xla {rate['xla']:.1f} tok/s "
          f"({rate['kernel'] / rate['xla']:.3f}x); same first token: "
          f"{np.array_equal(first['kernel'], first['xla'])}", flush=True)


def attention_alone(a, t: int) -> None:
    import jax
    import jax.numpy as jnp

    from qcjax.attention.xla import PROMPT_QUERY_BLOCKS, xla_attention
    from qcjax.cpu import attention as cpu

    layers, h, kvh, d = 24, 14, 2, 64
    keys = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(keys[0], (layers, 1, t, h, d), a.dtype)
    k, v = (jax.random.normal(key, (layers, 1, t, kvh, d), a.dtype) for key in keys[1:])
    seg = jnp.ones((1, t), jnp.int32)
    off = jnp.zeros((1,), jnp.int32)
    xla = jax.jit(lambda q, k, v: [xla_attention(q[i], k[i], v[i], seg, seg, off, scale=d**-0.5,
                                                 query_blocks=PROMPT_QUERY_BLOCKS) for i in range(layers)])
    ours = jax.jit(lambda q, k, v: [cpu.causal_attention(q[i], k[i], v[i], seg, seg, d**-0.5)
                                    for i in range(layers)])
    diff = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
               for x, y in zip(xla(q, k, v), ours(q, k, v)))
    med = timed({"kernel": lambda: ours(q, k, v), "xla": lambda: xla(q, k, v)}, a.rounds)
    flops = layers * 2 * 2 * t * t / 2 * d * h
    print(f"attention, {layers} layers x 1x{t}: " + "  ".join(
        f"{name} {s * 1e3:7.1f} ms ({flops / s / 1e9:5.1f} GFLOP/s)" for name, s in med.items())
        + f"  kernel {med['xla'] / med['kernel']:.2f}x faster; max |diff| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
