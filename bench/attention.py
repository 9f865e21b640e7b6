"""Attention kernels: median time and achieved TFLOP/s, forward and forward+backward, per available impl and shape.

Impls are the switch's (qcjax.attention.attend): "xla", "pallas_tpu", "pallas_gpu", "cudnn" (ours: segment mask
dense), plus "cudnn_raw": jax.nn.dot_product_attention(implementation="cudnn", is_causal=True) with no segment ids,
cuDNN's best case, and "jax_nn_xla": jax.nn.dot_product_attention(implementation="xla") with the segment mask. The reference for the ratio column is measured in the same run: cudnn_raw on GPU, xla elsewhere.
Every impl's output and gradients are checked against the reference (and, at sizes where its T^2 scores fit
comfortably, against the XLA reference) before it is timed.

FLOPs are counted honestly for causal attention: only the (query, key) pairs a query sees, T (T + 1) / 2 per head
and sequence (segment ids are all 1 here), 4 * head_dim FLOPs per pair forward (QK^T and PV) and 8 * head_dim
backward (dV, dP, dQ, dK); the backward's recomputation of the scores earns nothing.

    python bench/attention.py                       # the platform's default shapes and impls
    python bench/attention.py --shapes 2x4096x28x4x128 --impls pallas_gpu cudnn_raw --iters 20
    python bench/attention.py --interpret           # CPU: also run the Pallas kernels in interpret mode (slow)
"""
from __future__ import annotations

import argparse
import datetime
import platform as host_platform
import statistics
import subprocess
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qcjax.attention import attend

# batch x seq x heads x kv_heads x head_dim
DEFAULT_SHAPES = {
    "gpu": ["4x4096x28x4x128", "2x8192x28x4x128", "4x4096x14x2x64"],
    "tpu": ["4x4096x28x4x128", "2x8192x28x4x128", "4x4096x14x2x64"],
    "cpu": ["1x512x14x2x64", "1x1024x14x2x64", "1x2048x12x2x128"],
}
DEFAULT_IMPLS = {
    "gpu": ["cudnn_raw", "pallas_gpu", "xla", "cudnn"],
    "tpu": ["xla", "pallas_tpu", "jax_nn_xla"],
    "cpu": ["xla", "jax_nn_xla"],
}
REFERENCE = {"gpu": "cudnn_raw", "tpu": "xla", "cpu": "xla"}
XLA_CHECK_MAX_SCORES = 2**31  # batch * heads * T^2 above which the XLA reference is not run at full size
TOL = {"bfloat16": 2e-2, "float32": 1e-4}  # relative to max |reference|


def causal_pairs(t: int) -> int:
    return t * (t + 1) // 2


def attention_fn(impl: str, interpret: bool) -> Callable:
    """(q, k, v, seg) -> out for one impl."""
    if impl == "cudnn_raw":
        return lambda q, k, v, seg: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl == "jax_nn_xla":  # jax's own XLA attention with the same segment mask: a second opinion on CPU/TPU
        return lambda q, k, v, seg: jax.nn.dot_product_attention(
            q, k, v, mask=(seg[:, :, None] == seg[:, None, :])[:, None], is_causal=True, implementation="xla")
    kw = {"interpret": True} if interpret else {}
    return lambda q, k, v, seg: attend(q, k, v, seg, seg, scale=q.shape[-1] ** -0.5, impl=impl, **kw)


def timed(fn, args, iters: int) -> float:
    """Median seconds per call (after one warm-up call, which also compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def bench_shape(shape: str, impls: list[str], reference: str, dtype, iters: int, interpret: bool) -> list[dict]:
    b, t, h, kvh, d = (int(x) for x in shape.split("x"))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, t, kvh, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, t, kvh, d)), dtype)
    do = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
    seg = jnp.ones((b, t), jnp.int32)
    fwd_flops = 4 * b * h * d * causal_pairs(t)
    bwd_flops = 2 * fwd_flops

    results, outputs = [], {}
    check_xla = b * h * t * t <= XLA_CHECK_MAX_SCORES
    order = [reference] + [i for i in impls if i != reference]
    if check_xla and "xla" not in order:
        order.append("xla")
    for impl in order:
        attn = attention_fn(impl, interpret)
        fwd = jax.jit(attn)
        fwd_bwd = jax.jit(lambda q, k, v, seg, do, attn=attn: jax.vjp(lambda q, k, v: attn(q, k, v, seg), q, k, v)[1](do))
        try:
            outputs[impl] = (fwd(q, k, v, seg), *fwd_bwd(q, k, v, seg, do))
        except Exception as e:  # an impl this machine cannot run (e.g. cuDNN without a GPU)
            print(f"  {shape} {impl}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        if impl not in impls and impl != reference:
            continue  # the XLA reference only for the correctness check
        t_fwd = timed(fwd, (q, k, v, seg), iters)
        t_all = timed(fwd_bwd, (q, k, v, seg, do), iters)
        results.append(dict(shape=shape, impl=impl, fwd_ms=1e3 * t_fwd, fwd_bwd_ms=1e3 * t_all,
                            fwd_tflops=fwd_flops / t_fwd / 1e12, fwd_bwd_tflops=(fwd_flops + bwd_flops) / t_all / 1e12,
                            bwd_tflops=bwd_flops / max(t_all - t_fwd, 1e-9) / 1e12))
    for r in results:
        errs = []
        for against in dict.fromkeys((reference, "xla")):  # each reference once
            if against in outputs and against != r["impl"]:
                e = max(rel_err(a, b) for a, b in zip(outputs[r["impl"]], outputs[against]))
                errs.append(f"{e:.1e} vs {against}")
                if e > TOL[jnp.dtype(dtype).name]:
                    errs[-1] += " MISMATCH"
        r["check"] = "; ".join(errs) or "-"
        ref = next((x for x in results if x["impl"] == reference), None)
        r["fwd_ratio"] = ref["fwd_ms"] / r["fwd_ms"] if ref else float("nan")
        r["fwd_bwd_ratio"] = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"] if ref else float("nan")
    return results


def machine() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        try:
            lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
            model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
        except (OSError, StopIteration):
            model = host_platform.processor()
        import os

        return f"CPU: {model}, {os.cpu_count()} cores"
    return f"{dev.platform.upper()}: {dev.device_kind} x{jax.device_count()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plat = jax.devices()[0].platform
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES.get(plat, DEFAULT_SHAPES["cpu"]),
                    help="batch x seq x heads x kv_heads x head_dim")
    ap.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS.get(plat, ["xla"]))
    ap.add_argument("--reference", default=REFERENCE.get(plat, "xla"))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--interpret", action="store_true", help="CPU: add the Pallas kernels in interpret mode")
    args = ap.parse_args()
    impls = list(args.impls) + (["pallas_tpu", "pallas_gpu"] if args.interpret else [])

    print(f"# attention bench {datetime.date.today()} | {machine()} | jax {jax.__version__} | {args.dtype} | "
          f"causal, median of {args.iters} | ratio = reference time / impl time (reference: {args.reference})")
    print(f"{'shape (BxTxHxKVxD)':<20} {'impl':<11} {'fwd ms':>9} {'TFLOP/s':>8} {'ratio':>6} "
          f"{'fwd+bwd ms':>11} {'TFLOP/s':>8} {'bwd TF/s':>8} {'ratio':>6}  check (max rel err)")
    for shape in args.shapes:
        for r in bench_shape(shape, impls, args.reference, jnp.dtype(args.dtype), args.iters, args.interpret):
            print(f"{r['shape']:<20} {r['impl']:<11} {r['fwd_ms']:>9.3f} {r['fwd_tflops']:>8.3f} "
                  f"{r['fwd_ratio']:>6.2f} {r['fwd_bwd_ms']:>11.3f} {r['fwd_bwd_tflops']:>8.3f} "
                  f"{r['bwd_tflops']:>8.3f} {r['fwd_bwd_ratio']:>6.2f}  {r['check']}", flush=True)


if __name__ == "__main__":
    main()
