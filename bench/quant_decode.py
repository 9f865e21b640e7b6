"""Decode throughput of int8 weight-only projections (`--quant int8`) vs bf16, on this CPU, in one process.

    python bench/quant_decode.py                          # 0.5B architecture, random weights, batch 1 and 8
    python bench/quant_decode.py --batches 1 --repeats 3 --record

Both models are the same random bf16 weights (qcjax's init); the int8 one is them quantized by qcjax.adapters
(as `qcjax.load(quant="int8")` does). Per batch B, medians over --repeats rounds (after a warm-up round), the two
models and a bandwidth probe back to back in each round, the first model alternating:
  decode tok/s        B x (new_tokens - 1) / the time of one decode call of new_tokens - 1 steps after a
                      --prompt-token prompt (prefill excluded), as bench/decode.py times it
  bytes per step      the weights as held (int8 projections: values + scales; the tied embedding, which the head
                      reads whole) + the valid KV cache (bf16), averaged over the timed steps
  % of bandwidth      decode tok/s / (B x read bandwidth / bytes per step); read bandwidth = median of 3 XLA sums
                      over a 1 GiB fp32 array, right after the round's decodes (bench/decode.py's probe, XLA side)
The ratio and % columns are medians of per-round values. Also printed: which implementation each operation takes.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="0.5b", help="architecture preset (random weights; default 0.5b)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row (default 32)")
    p.add_argument("--new_tokens", type=int, default=33, help="decode steps timed: new_tokens - 1 (default 33)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after a warm-up; default 5)")
    p.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    return p.parse_args(argv)


def med(xs):
    return statistics.median(xs)


def main(argv=None):
    a = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from qcjax import platform as switch

    flags = switch.configure_xla("bfloat16")  # as infer.py runs bf16 on the CPU
    import jax
    import jax.numpy as jnp
    import numpy as np

    import qcjax
    from qcjax import adapters
    from qcjax.model import init_params

    from _direct import Batch

    log = lambda *x: print(*x, file=sys.stderr, flush=True)  # noqa: E731
    cfg = qcjax.get_config(a.model).replace(param_dtype="bfloat16", dtype="bfloat16")
    t = time.perf_counter()
    params = jax.jit(lambda: init_params(cfg, jax.random.key(0)))()
    qparams = adapters.quantize(cfg, params, "int8")
    jax.block_until_ready((params, qparams))
    models = {"bf16": (cfg, params), "int8": (cfg, qparams)}
    held = {"bf16": adapters.weight_bytes(params)[0], "int8": adapters.weight_bytes(qparams)[0]}
    log(f"built and quantized in {time.perf_counter() - t:.0f} s; weights bf16 {held['bf16']:,} B, int8 "
        f"{held['int8']:,} B ({held['int8'] / held['bf16']:.2f}x)")
    paths = implementations(switch, cfg)
    log("paths: " + paths)

    big = jnp.ones((256 * 1024 * 1024,), jnp.float32)  # 1 GiB
    jsum = jax.jit(jnp.sum)
    jsum(big).block_until_ready()

    def bandwidth() -> float:
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            jsum(big).block_until_ready()
            ts.append(time.perf_counter() - t)
        return big.nbytes / med(ts) / 1e9

    rng = np.random.default_rng(0)
    n = a.new_tokens
    rows, bws = [], []
    for b in [int(x) for x in a.batches.split(",")]:
        prompts = [rng.integers(0, 150000, a.prompt).tolist() for _ in range(b)]
        batches = {k: Batch(m[0], prompts + prompts[:1] * (switch.min_batch(cfg.dtype) - b), n, jnp.bfloat16)
                   for k, m in models.items()}
        tps = {k: [] for k in models}
        bw_here = []

        def decode(name):
            mp = models[name][1]
            pool, first = jax.block_until_ready(batches[name].prefill(mp))
            t = time.perf_counter()
            jax.block_until_ready(batches[name].decode(mp, pool, first, n - 1)[1])
            tps[name].append(b * (n - 1) / (time.perf_counter() - t))

        for r in range(a.repeats + 1):
            for name in (("bf16", "int8") if r % 2 == 0 else ("int8", "bf16")):
                decode(name)
            bw_here.append(bandwidth())
        bws += bw_here[1:]
        ctx = a.prompt + n / 2  # mean valid context over the timed steps
        kv = 2 * cfg.num_layers * batches["bf16"].b * ctx * cfg.num_kv_heads * cfg.dim_per_head * 2  # k and v, bf16 rows
        for name in models:
            step_bytes = held[name] + kv
            limits = [b * bw * 1e9 / step_bytes for bw in bw_here[1:]]
            fracs = [x / lim for x, lim in zip(tps[name][1:], limits)]
            rows.append(dict(model=name, batch=b, tps=med(tps[name][1:]), step_bytes=step_bytes, limit=med(limits),
                             frac=med(fracs), rounds=tps[name][1:]))
        ratios = [x / y for x, y in zip(tps["int8"][1:], tps["bf16"][1:])]
        rows[-1]["ratio"] = med(ratios)
        rows[-1]["ratios"] = ratios
        log(f"batch {b}: bf16 {rows[-2]['tps']:.1f} tok/s, int8 {rows[-1]['tps']:.1f} tok/s, int8/bf16 per round "
            f"{', '.join(f'{x:.2f}' for x in ratios)}; bandwidth {med(bw_here[1:]):.1f} GB/s")
    report(a, rows, bws, flags, paths, held)


def implementations(switch, cfg) -> str:
    """Which implementation each operation of a decode step takes on this machine (qcjax.platform's switch)."""
    head = "the qcjax.cpu few-row kernel" if switch.plugin("matmul", "cpu") is not None else "XLA's dot (kernel off)"
    attn = "qcjax.cpu's decode kernel" if switch.choose("attention") == "cpu" else "XLA"
    if switch.plugin("layers", "cpu") is not None:
        proj = ("both models' projections: qcjax.cpu's layer loop, each layer's kernel read in place from the stack "
                "(bf16, or int8 values with the per-channel scales applied to each sum)")
    else:
        proj = ("bf16 projections: XLA:CPU dots on the stacked [in, out] bf16 kernels; int8 projections: qwix "
                "dequantizes each layer's int8 kernel (x its per-channel scales, to bf16) and XLA:CPU dots the result")
    return f"{proj}; both: the tied head ({cfg.tie_word_embeddings}) through {head}, attention through {attn}"


def report(a, rows, bws, flags, paths, held):
    import jax

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    lines = [
        f"### int8 weight-only decode vs bf16 ({datetime.datetime.now():%Y-%m-%d %H:%M}, bench/quant_decode.py)",
        "",
        f"Machine: {name}, {os.cpu_count()} cores; read bandwidth {min(bws):.1f}-{max(bws):.1f} GB/s (median "
        f"{med(bws):.1f}, XLA sum over 1 GiB). jax {jax.__version__}; {a.model} architecture, random weights (qcjax "
        f"init, bf16); XLA flags: {' '.join(flags) or 'none'}. Weights as held: bf16 {held['bf16']:,} B, int8 "
        f"{held['int8']:,} B ({held['int8'] / held['bf16']:.2f}x). Medians of {a.repeats} rounds (after a warm-up), "
        f"bf16 and int8 back to back in each round (the first alternating), then the bandwidth probe; decode over "
        f"{a.new_tokens - 1} steps after a {a.prompt}-token prompt. Paths: {paths}.",
        "",
        "| batch | weights | decode tok/s | int8 / bf16 | bytes per step (weights + KV) | % of bandwidth limit |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        lines.append(f"| {r['batch']} | {r['model']} | {r['tps']:.1f} | {ratio} | {r['step_bytes'] / 1e9:.3f} GB | "
                     f"{100 * r['frac']:.0f}% of {r['limit']:.1f} tok/s |")
    lines.append("")
    for r in rows:
        lines.append(f"- batch {r['batch']} {r['model']}: tok/s per round {', '.join(f'{x:.1f}' for x in r['rounds'])}"
                     + (f"; int8/bf16 per round {', '.join(f'{x:.2f}' for x in r['ratios'])}" if "ratios" in r
                        else ""))
    text = "\n".join(lines) + "\n"
    print(text)
    if a.record:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(path, "a") as f:
            f.write("\n" + text)
        print(f"appended to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
