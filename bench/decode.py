"""Prefill and decode throughput of qcjax's inference programs vs transformers `generate`, on this CPU or a CUDA GPU, in one run.

    python bench/decode.py                       # 0.5B architecture, random weights, fp32 and bf16, batch 1 and 8
    python bench/decode.py --dtypes float32 --batches 1 --repeats 5 --record
    python bench/decode.py --device gpu --model 1.5b --dtypes bfloat16 --batches 1,8,64 --new_tokens 129

Both sides run the same random weights (transformers' init, copied into ours through the HF mapping) in the same
dtype (CPU: with --threads threads; GPU: fp32 at jax's "highest" matmul precision, as torch's default without TF32,
and bf16 as is). Reported per dtype (medians over --repeats, ours and transformers interleaved so machine
noise hits both alike):
  prefill tok/s         batch 1 x --prefill_len tokens (ours: prefill + first token; transformers: a forward
                        pass with logits_to_keep=1, as generate's prefill)
  decode tok/s          batch B, --new_tokens after a --decode_prompt-token prompt, prefill excluded (ours: one
                        decode call of new_tokens - 1 steps; transformers: generate(N) - generate(1))
  % of bandwidth limit  decode tok/s / (B x read bandwidth / bytes per step); bytes per step = every weight
                        (the tied embedding is read by the head) + the valid KV cache; read bandwidth = the
                        faster median of a reduction over a 1 GiB (GPU: 4 GiB) fp32 array (torch and XLA),
                        measured right after our decode in the same round
The ratio and the % columns are medians of per-round values: each round times ours and transformers (or ours and
the bandwidth) back to back, so a slow moment of the machine, which lasts longer than a round, cancels out of them;
the side that goes first alternates from round to round.
and, at batch 1 of the first dtype, what streaming costs: the loop in chunks of 1 and 8 steps vs one call, and a per-token host
callback (io_callback) inside the loop. Greedy tokens of both sides are compared (fp32: they should match).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="cpu (default), or gpu: both sides on the first CUDA device")
    p.add_argument("--model", default="0.5b", help="architecture preset (random weights; default 0.5b)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--matmul_precision", default="highest", choices=("default", "high", "highest"),
                   help="GPU, fp32 only: our side's jax_default_matmul_precision (default: highest, i.e. fp32 without "
                        "TF32, as torch computes; 'default' lets XLA use TF32)")
    p.add_argument("--attention_impl", default="auto",
                   help="our side's attention (qcjax.attention): auto = xla on CPU, our Triton kernels on GPU")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prefill_len", type=int, default=512)
    p.add_argument("--decode_prompt", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=33, help="decode steps timed: new_tokens - 1")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of each decode measure (after a warm-up)")
    p.add_argument("--prefill_repeats", type=int, default=11, help="timed rounds of the prefill measure (cheaper)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--xla_flags", default=None,
                   help="XLA:CPU flags for our side (default: qcjax.platform.CPU_XLA_FLAGS for the dtype, as infer.py "
                        "applies them); 'none' for none. Each dtype runs in its own process (flags are per process)")
    p.add_argument("--rows_json", default=None, help=argparse.SUPPRESS)  # child process: write rows here
    p.add_argument("--no_stream", action="store_true", help="skip the streaming-cost measurement")
    p.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    return p.parse_args(argv)


def med(xs):
    return statistics.median(xs)


def in_order(r: int, ours, theirs) -> tuple:
    """Round r's order: ours first in even rounds, transformers first in odd ones, so whatever the first (or
    second) run of a round gains or loses from the one before it falls on both sides alike."""
    return (ours, theirs) if r % 2 == 0 else (theirs, ours)


def main(argv=None):
    a = parse_args(argv)
    on_gpu = a.device == "gpu"
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if on_gpu else "cpu")
    if on_gpu:  # torch and XLA share the card: XLA allocates as it goes instead of taking 75% up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    dtypes = a.dtypes.split(",")
    if a.rows_json is None:  # parent: one child process per dtype, then one report
        import json
        import tempfile

        rows, bws, flags = [], [], {}
        for d in dtypes:
            with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
                argv_child = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--record"]
                subprocess.run([sys.executable, os.path.abspath(__file__), *argv_child, "--dtypes", d,
                                "--rows_json", f.name], check=True)
                got = json.load(open(f.name))
            rows += got["rows"]
            bws += got["bws"]
            flags[d] = got["flags"]
        report(a, rows, bws, flags, got["machine"])
        return
    from qcjax import platform as switch
    from _direct import Batch

    flags = None if a.xla_flags is None else (() if a.xla_flags == "none" else tuple(a.xla_flags.split()))
    flags = switch.configure_xla(dtypes[0], flags)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import linen as nn

    import qcjax
    from qcjax.hf import hf_to_params
    from qcjax.model import abstract_params

    torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if on_gpu else "cpu")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    if on_gpu and dtypes == ["float32"]:  # fp32 means fp32 on both sides (jax's GPU default is TF32; torch's not)
        jax.config.update("jax_default_matmul_precision", a.matmul_precision)
    log = lambda *x: print(*x, file=sys.stderr, flush=True)  # noqa: E731
    base = qcjax.get_config(a.model)
    batches = [int(b) for b in a.batches.split(",")]
    rows = []

    big = (1024 if on_gpu else 256) * 1024 * 1024
    big_t = torch.ones(big, device=dev)
    big_j = jnp.ones((big,), jnp.float32)
    jsum = jax.jit(jnp.sum)
    jsum(big_j).block_until_ready()

    def bandwidth() -> float:
        """GB/s: the faster of a torch and an XLA sum over 1 GiB (CPU, 2 threads) or 4 GiB (GPU), median of 3 each."""
        tt, tj = [], []
        for _ in range(3):
            t = time.perf_counter(); big_t.sum().item(); tt.append(time.perf_counter() - t)  # noqa: E702
            t = time.perf_counter(); jsum(big_j).block_until_ready(); tj.append(time.perf_counter() - t)  # noqa: E702
        return big_t.nbytes / min(med(tt), med(tj)) / 1e9

    bws = []
    for dname in a.dtypes.split(","):
        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dname]
        cfg = base.replace(param_dtype=dname, dtype=dname, attention_impl=a.attention_impl)
        hf_cfg = transformers.Qwen2Config(**cfg.to_hf_dict())
        hf_cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        t = time.perf_counter()
        with dev:  # transformers' random init, on the device that runs it
            hf = transformers.Qwen2ForCausalLM(hf_cfg).eval().to(tdt)
        sd = {k: v for k, v in hf.state_dict().items()}
        params = hf_to_params(cfg, lambda n: sd[n].float().cpu().numpy(), set(sd), nn.meta.unbox(abstract_params(cfg)),
                              place=lambda path, x: jnp.asarray(x))
        del sd
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        log(f"[{dname}] built both models in {time.perf_counter() - t:.0f} s; weights {weight_bytes / 1e9:.2f} GB")
        cache_dt = jnp.dtype(dname)  # same dtype as transformers' cache
        rng = np.random.default_rng(0)

        # -- prefill, batch 1 x prefill_len
        prompt = rng.integers(0, 150000, a.prefill_len).tolist()
        batch = Batch(cfg, [prompt] * switch.min_batch(cfg.dtype), 1, cache_dt)
        ids = torch.tensor([prompt], device=dev)
        ours, theirs = [], []
        def prefill_ours():
            t = time.perf_counter()
            jax.block_until_ready(batch.prefill(params))
            ours.append(a.prefill_len / (time.perf_counter() - t))

        def prefill_theirs():
            with torch.inference_mode():
                t = time.perf_counter()
                hf(ids, logits_to_keep=1, use_cache=True)
                sync()
                theirs.append(a.prefill_len / (time.perf_counter() - t))

        for r in range(a.prefill_repeats + 1):
            for run in in_order(r, prefill_ours, prefill_theirs):
                run()
            bws.append(bandwidth())
        ratios = [x / y for x, y in zip(ours[1:], theirs[1:])]
        rows.append(dict(dtype=dname, what=f"prefill 1x{a.prefill_len}", ours=med(ours[1:]), theirs=med(theirs[1:]),
                         ratio=med(ratios), rounds=ratios))
        log(f"[{dname}] prefill ours {rows[-1]['ours']:.1f} tok/s, transformers {rows[-1]['theirs']:.1f} tok/s, "
            f"per-round ratios {', '.join(f'{x:.2f}' for x in ratios)}")

        # -- decode, batch B
        n = a.new_tokens
        for b in batches:
            prompts = [rng.integers(0, 150000, a.decode_prompt).tolist() for _ in range(b)]
            batch = Batch(cfg, prompts + prompts[:1] * (switch.min_batch(cfg.dtype) - b), n, cache_dt)
            ids = torch.tensor(prompts, device=dev)
            ours, theirs, bw_here = [], [], []
            got = {}

            def decode_ours():  # then the bandwidth, right after
                pool, first = jax.block_until_ready(batch.prefill(params))
                t = time.perf_counter()
                pool, out, _ = batch.decode(params, pool, first, n - 1)
                got["out"] = np.concatenate([np.asarray(first)[:, None], np.asarray(out)], axis=1)
                ours.append(b * (n - 1) / (time.perf_counter() - t))
                bw_here.append(bandwidth())

            def gen(k):
                with torch.inference_mode():
                    t = time.perf_counter()
                    o = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=k, min_new_tokens=k, pad_token_id=0)
                    sync()
                    return time.perf_counter() - t, o

            def decode_theirs():
                t1, _ = gen(1)
                tn, got["theirs"] = gen(n)
                theirs.append(b * (n - 1) / (tn - t1))

            for r in range(a.repeats + 1):
                for run in in_order(r, decode_ours, decode_theirs):
                    run()
            out, o = got["out"], got["theirs"]
            bws += bw_here
            same = int(np.sum(np.all(out[:b, :n] == o[:, a.decode_prompt:].cpu().numpy(), axis=1)))
            ctx = a.decode_prompt + n / 2  # mean valid context over the timed steps
            kv_bytes = 2 * cfg.num_layers * b * ctx * cfg.num_kv_heads * cfg.dim_per_head * cache_dt.itemsize
            step_bytes = weight_bytes + kv_bytes
            limits = [b * bw * 1e9 / step_bytes for bw in bw_here[1:]]  # timed rounds only, as ours and theirs
            fracs = [x / lim for x, lim in zip(ours[1:], limits)]
            ratios = [x / y for x, y in zip(ours[1:], theirs[1:])]
            rows.append(dict(dtype=dname, what=f"decode batch {b}", ours=med(ours[1:]), theirs=med(theirs[1:]),
                             ratio=med(ratios), limit=med(limits), frac=med(fracs), same=f"{same}/{b}",
                             rounds=ratios, frac_rounds=fracs))
            log(f"[{dname}] decode b={b}: ours {rows[-1]['ours']:.1f} tok/s, transformers {rows[-1]['theirs']:.1f}, "
                f"bandwidth limit {rows[-1]['limit']:.1f} ({med(bw_here[1:]):.1f} GB/s, {step_bytes / 1e9:.2f} "
                f"GB/step), per-round % of it {', '.join(f'{100 * x:.0f}' for x in fracs)}; greedy rows equal: "
                f"{same}/{b}")

        if dname == dtypes[0] and not a.no_stream:
            rows.append(stream_costs(cfg, params, a, cache_dt, dname, log))
        del hf, params

    import json

    with open(a.rows_json, "w") as f:
        json.dump({"rows": rows, "bws": bws, "flags": list(flags), "machine": machine(a, torch)}, f)


def stream_costs(cfg, params, a, cache_dt, dname, log) -> dict:
    """ms per decode step at batch 1: one call; chunks of 8 and 1 (the host reads new tokens between calls)."""
    import jax
    import numpy as np

    from _direct import Batch

    n = a.new_tokens
    batch = Batch(cfg, [list(range(100, 100 + a.decode_prompt))], n, cache_dt)
    modes = {"one call": None, "chunks of 8": 8, "chunks of 1": 1}
    res = {m: [] for m in modes}
    for r in range(a.repeats + 1):
        for m, chunk in modes.items():
            pool, first = jax.block_until_ready(batch.prefill(params))
            t = time.perf_counter()
            if chunk is None:
                pool, out, _ = batch.decode(params, pool, first, n - 1)
            else:
                state, done = None, 0
                while done < n - 1:
                    pool, out, state = batch.decode(params, pool, first, chunk, state)
                    np.asarray(out)
                    done += chunk
            np.asarray(out)
            res[m].append((time.perf_counter() - t) / (n - 1) * 1e3)
    out = {m: med(v[1:]) for m, v in res.items()}
    log(f"[{dname}] streaming, ms per step at batch 1: " + ", ".join(f"{m} {v:.1f}" for m, v in out.items()))
    return dict(dtype=dname, what="stream", **out)


def machine(a, torch) -> str:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    if a.device == "gpu":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), host {model_name}"
    return f"{model_name}, {os.cpu_count()} cores ({a.threads} threads both sides)"


def report(a, rows, bws, flags, machine_name):
    import jax
    import torch
    import transformers

    lines = [
        f"### Sampler decode/prefill vs transformers ({datetime.date.today()}, bench/decode.py)",
        "",
        f"Machine: {machine_name}; read bandwidth "
        f"{min(bws):.1f}-{max(bws):.1f} GB/s (median {med(bws):.1f}). jax {jax.__version__}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}. {a.model} architecture, random weights; our "
        f"attention: {a.attention_impl}. "
        + (f"Our fp32 matmul precision: {a.matmul_precision} (torch: fp32 without TF32). " if a.device == "gpu" else
         "XLA flags (ours): " + "; ".join(f"{d}: {' '.join(f) or 'none'}" for d, f in flags.items()) + ". ")
        + f"Medians of {a.prefill_repeats} prefill and {a.repeats} decode rounds (after a warm-up), ours and "
        f"transformers back to back in each round (the first side alternating); ratio and % are medians of "
        f"per-round values (listed below the table); decode over "
        f"{a.new_tokens - 1} steps after a {a.decode_prompt}-token prompt.",
        "",
        "| dtype | measure | qcjax tok/s | transformers tok/s | ratio | % of bandwidth limit (qcjax) | greedy equal |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["what"] == "stream":
            continue
        lim = f"{100 * r['frac']:.0f}% of {r['limit']:.1f}" if "limit" in r else ""
        lines.append(f"| {r['dtype']} | {r['what']} | {r['ours']:.1f} | {r['theirs']:.1f} | "
                     f"{r['ratio']:.2f}x | {lim} | {r.get('same', '')} |")
    lines.append("")
    for r in rows:
        if "rounds" in r:
            fr = ", ".join(f"{100 * x:.0f}" for x in r.get("frac_rounds", []))
            lines.append(f"- {r['dtype']} {r['what']}, per-round ratios {', '.join(f'{x:.2f}' for x in r['rounds'])}"
                         + (f"; % of the limit {fr}" if fr else ""))
    for r in rows:
        if r["what"] == "stream":
            lines += ["", f"Streaming cost ({r['dtype']}, batch 1, ms per decode step): " +
                      ", ".join(f"{k} {v:.1f}" for k, v in r.items() if k not in ("dtype", "what"))]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.record:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        new = not os.path.exists(path)
        with open(path, "a") as f:
            if new:
                f.write("# Benchmark results\n\nFigures recorded by the scripts in bench/ (each appends its own "
                        "section).\n\n")
            f.write("\n" + text)
        print(f"appended to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
