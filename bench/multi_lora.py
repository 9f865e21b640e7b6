"""Many LoRA adapters over one base vs one adapter merged into the base: throughput and time to first token of the
same request trace, back to back in one process (medians of --repeats timed passes; ratios against merged).

    python bench/multi_lora.py                               # 0.5B architecture, bf16, rank 16, 1/4/16 adapters
    python bench/multi_lora.py --layers 6 --adapters 1,16 --repeats 2

Engines (random weights; completions run to --max_new tokens, texts are not compared; tests/test_multi_lora.py
checks the text):
  merged   the plain engine on the base with one rank --rank adapter (every projection) folded into its kernels:
           what a server per adapter runs, and the reference every ratio is against.
  lora-N   one engine on the unmerged base with N such adapters registered (--max_loras N, all resident), the
           requests assigned to them round-robin: each batch mixes N adapters.
Trace: --requests prompts of --prompt tokens (random ids), all submitted at once to --rows rows, --max_new greedy
tokens each. Each engine is warmed up (every program compiled), runs the trace once untimed, then --repeats times.
Measured: output tokens per second (all tokens / wall), TTFT p50 (submit -> first token).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="0.5b", help="architecture preset, random weights (default 0.5b)")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (a quicker run)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--rank", type=int, default=16, help="adapter rank (default 16)")
    p.add_argument("--adapters", default="1,4,16", help="adapter counts, comma-separated (default 1,4,16)")
    p.add_argument("--requests", type=int, default=16, help="requests in the trace (default 16)")
    p.add_argument("--rows", type=int, default=8, help="engine rows (default 8)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per request (default 128)")
    p.add_argument("--max_new", type=int, default=32, help="new tokens per request (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per engine (default 3)")
    return p.parse_args(argv)


def _adapter(cfg, rank: int, seed: int):
    import numpy as np

    from qcjax import row_lora
    from qcjax.config import LORA_TARGETS
    from qcjax.inference.lora import Adapter

    rng = np.random.default_rng(seed)
    arrays = {}
    for t in LORA_TARGETS:
        n_in, n_out = row_lora.target_dims(cfg, t)
        arrays[t] = {"a": rng.normal(0, 0.02, (cfg.num_layers, n_in, rank)).astype(np.float32),
                     "b": rng.normal(0, 0.02, (cfg.num_layers, rank, n_out)).astype(np.float32)}
    return Adapter(arrays, rank, 2.0, f"random-{seed}")


def _pass(engine, prompts, names, max_new: int) -> dict:
    from qcjax.inference import Request

    reqs = [Request(p, max_new, adapter=n) for p, n in zip(prompts, names)]
    t0 = time.perf_counter()
    engine.submit(reqs)
    while engine.busy:
        engine.step()
    wall = time.perf_counter() - t0
    assert all(r.finish_reason == "length" for r in reqs), [r.finish_reason for r in reqs]
    ttft = sorted(r.first_token_at - r.submitted for r in reqs)
    return {"tok_s": len(reqs) * max_new / wall, "ttft": ttft[len(ttft) // 2], "wall": wall}


def run(kind: str, n: int, cfg, params, ads, prompts, a) -> dict:
    import jax.numpy as jnp

    from qcjax.inference import Engine
    from qcjax.inference.lora import LoraSlots

    max_len = a.prompt + a.max_new
    kw = dict(max_rows=a.rows, max_len=max_len, cache_dtype=jnp.dtype(a.dtype), chunk=8, max_queue=4096,
              prefix_cache=False)
    if kind == "merged":
        from qcjax import adapters

        mp = adapters.cast_floats(ads[0].merged_into(params, cfg.dtype), cfg.dtype)
        engine, names = Engine(cfg, mp, **kw), [None] * len(prompts)
    else:
        slots = LoraSlots(cfg, max_loras=n, max_rank=a.rank, dtype=cfg.dtype)
        for i in range(n):
            slots.add(f"a{i}", ads[i])
        engine, names = Engine(cfg, params, lora=slots, **kw), [f"a{i % n}" for i in range(len(prompts))]
    t = time.perf_counter()
    engine.warmup()
    warm = time.perf_counter() - t
    _pass(engine, prompts, names, a.max_new)  # untimed: adapters copied in, caches warm
    runs = [_pass(engine, prompts, names, a.max_new) for _ in range(a.repeats)]
    assert engine.stats()["compiles_after_warmup"] == 0, engine.stats()["compiles_after_warmup"]
    engine.stop()
    return {"tok_s": statistics.median(r["tok_s"] for r in runs), "ttft": statistics.median(r["ttft"] for r in runs),
            "warmup": warm}


def main(argv=None) -> int:
    a = parse_args(argv)
    import jax
    import numpy as np

    import qcjax

    cfg = qcjax.get_config(a.model).replace(dtype=a.dtype, param_dtype=a.dtype)
    if a.layers:
        cfg = cfg.replace(num_layers=a.layers)
    params = jax.jit(lambda: qcjax.init_params(cfg, jax.random.key(0)))()
    counts = [int(x) for x in a.adapters.split(",")]
    ads = [_adapter(cfg, a.rank, i) for i in range(max(counts))]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 150000, a.prompt).tolist() for _ in range(a.requests)]
    rows = {"merged": run("merged", 1, cfg, params, ads, prompts, a)}
    print(f"merged   {rows['merged']['tok_s']:.1f} tok/s, TTFT p50 {rows['merged']['ttft'] * 1e3:.0f} ms", flush=True)
    for n in counts:
        r = rows[f"lora-{n}"] = run("lora", n, cfg, params, ads, prompts, a)
        print(f"lora-{n:<3d} {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft'] * 1e3:.0f} ms", flush=True)
    ref = rows["merged"]
    print(f"\n{datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{a.model}{f' ({a.layers} layers)' if a.layers else ''} {a.dtype}, rank {a.rank} on all 7 projections, "
          f"{a.requests} requests x ({a.prompt} prompt + {a.max_new} new) tokens on {a.rows} rows")
    print("| engine | output tok/s | vs merged | TTFT p50 (ms) | vs merged |")
    print("|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['tok_s']:.1f} | {r['tok_s'] / ref['tok_s']:.2f}x | {r['ttft'] * 1e3:.0f} | "
              f"{r['ttft'] / ref['ttft']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
