"""The sampler's projection-kernel layouts end to end with XLA's dots: "in_out" (the model's [in..., out...]) vs
"out_in" ([out..., in...], what `qcjax.sampler.default_kernel_layout` picks for bf16 on the CPU), alternated round by
round in one process on the same random weights, with the same greedy tokens checked. The CPU decode kernel
(qcjax.cpu_matmul, which changes what the layouts cost) is off here; bench/cpu_matmul.py measures it.

    python bench/kernel_layout.py --dtype bfloat16 [--batches 1,8] [--rounds 5] [--prefill_len 512]

Prints tok/s medians (the first round is a warm-up) and out_in / in_out per measure.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("QCJAX_CPU_MATMUL", "0")

import sampler_ab  # noqa: E402  (bench/sampler_ab.py, beside this file)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sampler_ab.add_args(p)
    p.set_defaults(new_tokens=33)  # as the runs in bench/RESULTS.md
    a = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from qcjax import sampler as S

    S.configure_cpu_xla(a.dtype)
    import jax

    import qcjax
    from qcjax.model import init_params

    cfg = qcjax.get_config(a.model).replace(param_dtype=a.dtype, dtype=a.dtype)
    stacked = init_params(cfg, jax.random.key(0))
    variants = {k: (S.unstack_params(cfg, stacked, kernel_layout=k), lambda: None) for k in S.KERNEL_LAYOUTS}
    del stacked
    print(f"{a.model} {a.dtype}, jax {jax.__version__}, {a.rounds} rounds (first dropped), tok/s medians", flush=True)
    sampler_ab.run(a, cfg, variants, warm_every_round=False)


if __name__ == "__main__":
    main()
