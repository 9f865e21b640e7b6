"""Decode steps after a long prompt: the CPU cache kernels against XLA's ops, in one process, alternated.

    python bench/long_decode.py [--prompts 32,4096] [--dtypes bfloat16,float32] [--batch 1] [--steps 16] [--rounds 5]

Repo-level infilling prompts run to thousands of tokens, so a decode step reads a long cache. On one CPU device the
sampler attends to it with `qcjax.attention.cpu.cache_attention` (the cache read in its own dtype, only up to each
row's last visible slot) and writes a 16-bit cache in place with `cache_write`. The "xla" variant turns both off at
trace time (XLA's attention over every slot, with the cache widened to the queries' dtype; the uint16 scatter),
under a config that differs only in naming attention_impl="xla", which "auto" means on the CPU: two programs,
both compiled before timing; the prompt is prefilled once. Prints ms per decode step (medians), the per-round
ratios, and whether the greedy tokens agree. 0.5B architecture, random weights; prefill is not timed.
Transformers at long prompts: `bench/decode.py --decode_prompt N`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default="32,4096", help="prompt lengths (tokens)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="compute, weight and cache dtypes")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, each variant once per round")
    p.add_argument("--model", default="0.5b", help="architecture preset (random weights)")
    a = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from qcjax import cpu_matmul

    if not cpu_matmul.available():
        raise SystemExit("the CPU kernels are unavailable here (see the warning above)")
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {a.model}, batch {a.batch}, {a.steps} steps; "
          f"medians of {a.rounds} alternated rounds")
    for dtype in a.dtypes.split(","):
        for n in [int(v) for v in a.prompts.split(",")]:
            run(a, dtype, n)


def run(a, dtype: str, prompt_len: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import qcjax
    from qcjax import sampler as S
    from qcjax.attention import cpu
    from qcjax.model import init_params

    cfg = qcjax.get_config(a.model).replace(param_dtype=dtype, dtype=dtype)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(prompt_len)
    prompts = [rng.integers(0, 150000, prompt_len).tolist() for _ in range(a.batch)]
    plan = S.plan(cfg, prompts, max_new_tokens=a.steps + 1, min_batch=S.default_min_batch(cfg))
    controls = S.controls_for(plan)
    configs = {"kernels": cfg, "xla": cfg.replace(attention_impl="xla")}
    switches = ("cache_applies", "cache_write_applies")
    kept = {name: getattr(cpu, name) for name in switches}

    prefilled = jax.block_until_ready(S.start(cfg, params, plan, controls, jnp.dtype(dtype)))  # the same for both

    def decode(name):  # -> (seconds per step, tokens); traced with the kernels on or off
        for s in switches:
            setattr(cpu, s, kept[s] if name == "kernels" else (lambda *_: False))
        try:
            state = jax.block_until_ready(jax.tree.map(jnp.copy, prefilled))  # decode donates its state
            t0 = time.perf_counter()
            state = S.decode(configs[name], plan.kinds, params, state, controls, steps=a.steps)
            out = np.asarray(state.out)
            return (time.perf_counter() - t0) / a.steps, out
        finally:
            for s in switches:
                setattr(cpu, s, kept[s])

    tokens = {name: decode(name)[1] for name in configs}  # compiles both
    times = {name: [] for name in configs}
    for r in range(a.rounds):
        for name in (list(configs) if r % 2 else list(configs)[::-1]):
            times[name].append(decode(name)[0])
    ratios = [x / k for k, x in zip(times["kernels"], times["xla"])]
    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    print(f"{dtype} prompt {prompt_len} (cache {plan.cache_len} slots): kernels {ms['kernels']:.1f} ms/step, "
          f"xla {ms['xla']:.1f} ({statistics.median(ratios):.2f}x; rounds {', '.join(f'{x:.2f}' for x in ratios)}); "
          f"same tokens: {np.array_equal(tokens['kernels'], tokens['xla'])}", flush=True)


if __name__ == "__main__":
    main()
