"""The paged engine with its prefix cache vs the same engine with the prefix cache off vs the dense engine of an
earlier commit, on two workloads, run back to back (each engine in its own process; medians and ratios).

    python bench/engine.py                                   # both workloads, 0.5B architecture, bf16
    python bench/engine.py --workload editor --editors 1,4 --ctx 4096 --dtype float32
    python bench/engine.py --workload passk --problems 8 --n 16

Workloads (random weights: completions run to max_tokens; texts are not compared, tokens computed are counted):
  editor  a repo-level context of --ctx tokens (Python standard library files in Qwen's <|repo_name|> /
          <|file_sep|> layout) and, per editor, --requests FIM requests in its own file at a cursor moving
          --step tokens further each time (each sent when the previous one is answered), max_tokens 16, greedy.
          Measured: prompt tokens computed (the engines' own count; the dense engine computes every prompt whole),
          TTFT p50 / p90 (submit -> first token).
  passk   --problems HumanEval prompts x --n samples at temperature 0.8 / top_p 0.95, --max_new tokens each, all
          submitted at once to --rows rows. Measured: output tokens per second, prompt tokens computed.
The dense engine is qcjax.serve.engine of --dense_ref (default: the last commit before qcjax.inference), checked out
into a temporary git worktree; every engine runs the same trace once untimed first (compilation), then timed on a
fresh engine (an empty prefix cache; passk's untimed pass generates 8 tokens a sample).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENSE_REF = "f079795"  # main before qcjax.inference landed
STDLIB_FILES = ["json/decoder.py", "json/encoder.py", "json/scanner.py", "json/__init__.py", "textwrap.py",
                "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "copy.py", "pprint.py",
                "dataclasses.py", "argparse.py"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="editor,passk", help="editor, passk or both (default both)")
    p.add_argument("--engines", default="paged,nocache,dense", help="which engines (default all three)")
    p.add_argument("--model", default="0.5b", help="architecture preset, random weights (default 0.5b)")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (a quicker run)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--ctx", type=int, default=4096, help="editor: repo context tokens (default 4096)")
    p.add_argument("--editors", default="1,4", help="editor: concurrent editors, comma-separated runs (default 1,4)")
    p.add_argument("--requests", type=int, default=4, help="editor: requests per editor (default 4)")
    p.add_argument("--step", type=int, default=200, help="editor: cursor move per request, tokens (default 200)")
    p.add_argument("--problems", type=int, default=8, help="passk: HumanEval problems (default 8)")
    p.add_argument("--n", type=int, default=16, help="passk: samples per problem (default 16)")
    p.add_argument("--max_new", type=int, default=64, help="passk: tokens per sample (default 64)")
    p.add_argument("--rows", type=int, default=16, help="rows (slots) of every engine (default 16)")
    p.add_argument("--dense_ref", default=DENSE_REF, help=f"commit of the dense engine (default {DENSE_REF})")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "ENGINE:WORKLOAD:EDITORS" (internal)
    return p.parse_args(argv)


# ---- the worker (one engine, one workload, in its own process) ---------------------------------------------------
def _model(a):
    import jax

    import qcjax

    cfg = qcjax.get_config(a.model).replace(dtype=a.dtype, param_dtype=a.dtype)
    if a.layers:
        cfg = cfg.replace(num_layers=a.layers)
    return cfg, qcjax.init_params(cfg, jax.random.key(0))


def _tokenizer():
    from qcjax.tokenizer import load_tokenizer, qwen_tokenizer_json

    return load_tokenizer(qwen_tokenizer_json())


def editor_trace(tok, a, editors: int) -> list[list[list[int]]]:
    """Per editor, its requests' token prompts: the shared repo context, then its own file in FIM form at a
    cursor moving --step tokens (about 4 characters a token) further each request."""
    import sysconfig

    from qcjax import prompts as P

    lib = sysconfig.get_paths()["stdlib"]
    files, total = [], 0
    for rel in STDLIB_FILES:
        text = open(os.path.join(lib, rel), encoding="utf-8").read()
        n = len(tok.encode(text))
        if total + n > a.ctx:
            text = text[: max(0, (a.ctx - total) * 4)]
            n = len(tok.encode(text))
        files.append((f"lib/{rel}", text))
        total += n
        if total >= a.ctx * 0.95:
            break
    own = [open(os.path.join(lib, f), encoding="utf-8").read() for f in ("csv.py", "queue.py", "sched.py",
                                                                        "calendar.py", "zipapp.py", "tabnanny.py",
                                                                        "quopri.py", "netrc.py")]
    out = []
    for e in range(editors):
        text = own[e % len(own)]
        cur = len(text) // 3
        reqs = []
        for _ in range(a.requests):
            reqs.append(P.encode(tok, P.repo_prompt("stdlib", files, f"tools/editor{e}.py", text[:cur],
                                                    text[cur: cur + 2000])))
            cur += a.step * 4
        out.append(reqs)
    return out


def passk_prompts(tok, a) -> list[list[int]]:
    from qcjax.eval.problems import load_problems

    return [tok.encode(p.prompt) for p in load_problems("humaneval")[: a.problems]]


def _make_engine(kind: str, cfg, params, a, max_len: int):
    import jax.numpy as jnp

    if kind == "dense":
        from qcjax.serve.engine import Engine

        return Engine(cfg, params, slots=a.rows, max_len=max_len, cache_dtype=jnp.dtype(a.dtype), chunk=8,
                      max_queue=4096, prefill_batch=1, prefill_tokens=4096, prefill_chunk=4096)
    from qcjax.inference import Engine

    return Engine(cfg, params, max_rows=a.rows, max_len=max_len, cache_dtype=jnp.dtype(a.dtype), chunk=8,
                  max_queue=4096, prefill_batch=1, prefix_cache=kind == "paged")


def _run(engine, batches: list[list[dict]], concurrent: bool) -> list[dict]:
    """Submit each list of requests in turn on its own thread (a list: one editor's sequential requests), or
    everything at once (concurrent=False: one list). Returns per request {ttft, tokens, prompt}."""
    try:
        from qcjax.inference import Request
    except ImportError:
        from qcjax.serve.engine import Request
    results = []
    lock = threading.Lock()

    def one(spec, wait: bool):
        ev = threading.Event()
        rec = {"prompt": len(spec["ids"]), "tokens": 0, "ttft": None, "t0": time.perf_counter()}

        def on(toks, fin):
            if toks and rec["ttft"] is None:
                rec["ttft"] = time.perf_counter() - rec["t0"]
            rec["tokens"] += len(toks)
            if fin is not None:
                rec["end"] = time.perf_counter()
                ev.set()

        r = Request(spec["ids"], spec["max_new"], spec["sampling"], spec["seed"], (), on_event=on)
        engine.submit([r])
        with lock:
            results.append(rec)
        return ev

    def editor(specs):
        for spec in specs:
            one(spec, True).wait(3600)

    if concurrent:
        threads = [threading.Thread(target=editor, args=(b,)) for b in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        events = [one(spec, False) for spec in batches[0]]
        for ev in events:
            ev.wait(3600)
    return results


def worker(a) -> dict:
    """One engine on one workload: the trace once untimed (compiles), then timed on a fresh engine."""
    from qcjax.sampling import GREEDY, SamplingParams

    kind, workload, editors = a.worker.split(":")
    cfg, params = _model(a)
    tok = _tokenizer()
    if workload == "editor":
        trace = editor_trace(tok, a, int(editors))
        batches = [[{"ids": ids, "max_new": 16, "sampling": GREEDY, "seed": 0} for ids in ed] for ed in trace]
        concurrent = True
    else:
        samp = SamplingParams(temperature=0.8, top_p=0.95)
        batches = [[{"ids": ids, "max_new": a.max_new, "sampling": samp, "seed": 1000 * i + j}
                    for i, ids in enumerate(passk_prompts(tok, a)) for j in range(a.n)]]
        concurrent = False
    longest = max(len(s["ids"]) + s["max_new"] for b in batches for s in b)
    max_len = min(cfg.max_position_embeddings, 1 << (longest - 1).bit_length())
    for timed in (False, True):
        engine = _make_engine(kind, cfg, params, a, max_len)
        engine.start()
        t0 = time.perf_counter()
        if timed or workload == "editor":
            res = _run(engine, batches, concurrent)
        else:  # compiling needs the shapes only: a few tokens per sample
            _run(engine, [[dict(s, max_new=min(8, s["max_new"])) for s in batches[0]]], concurrent)
        wall = time.perf_counter() - t0
        stats = engine.stats()
        engine.stop()
    prompt = sum(r["prompt"] for r in res)
    computed = stats.get("computed_tokens", prompt)  # the dense engine computes every prompt whole
    ttft = sorted(r["ttft"] for r in res)
    import qcjax

    return {"engine": kind, "qcjax": os.path.dirname(qcjax.__file__), "workload": workload, "editors": int(editors), "requests": len(res), "wall_s": wall,
            "prompt_tokens": prompt, "computed_tokens": computed, "output_tokens": sum(r["tokens"] for r in res),
            "ttft_p50": statistics.median(ttft), "ttft_p90": ttft[int(0.9 * (len(ttft) - 1))],
            "cached_tokens": stats.get("cached_tokens", 0), "preempted": stats.get("preempted", 0)}


# ---- the driver ----------------------------------------------------------------------------------------------------
def _dense_tree(ref: str) -> str:
    d = tempfile.mkdtemp(prefix="qcjax-dense-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", d, ref], check=True, capture_output=True)
    return d


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    engines = a.engines.split(",")
    dense = _dense_tree(a.dense_ref) if "dense" in engines else None
    passthrough = [x for x in (argv if argv is not None else sys.argv[1:])]
    runs = []
    for workload in a.workload.split(","):
        for editors in (a.editors.split(",") if workload == "editor" else ["0"]):
            row = {}
            for kind in engines:
                env = dict(os.environ, PYTHONPATH=dense if kind == "dense" else ROOT)
                cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--worker",
                       f"{kind}:{workload}:{editors}"]
                out = subprocess.run(cmd, env=env, cwd=dense if kind == "dense" else ROOT, capture_output=True,
                                     text=True)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                row[kind] = r = json.loads(out.stdout.strip().splitlines()[-1])
                assert r["qcjax"].startswith(dense if kind == "dense" else ROOT), r["qcjax"]
                print(f"{workload:6s} editors={editors:2s} {kind:8s} computed {r['computed_tokens']:7d} of "
                      f"{r['prompt_tokens']:7d} prompt tokens, TTFT p50 {r['ttft_p50']:.2f} s p90 {r['ttft_p90']:.2f} s, "
                      f"{r['output_tokens'] / r['wall_s']:.1f} output tok/s, wall {r['wall_s']:.1f} s", flush=True)
            runs.append(row)
    if dense:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", dense], capture_output=True)
    print(f"\n{datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{a.model}{f' ({a.layers} layers)' if a.layers else ''} {a.dtype}")
    print("| workload | engine | prompt tokens computed | vs dense | TTFT p50 / p90 (s) | TTFT p50: dense / this "
          "| output tok/s | vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for row in runs:
        ref = row.get("dense")
        for kind, r in row.items():
            name = r["workload"] + (f", {r['editors']} editor(s)" if r["workload"] == "editor" else "")
            tps = r["output_tokens"] / r["wall_s"]
            ref_tps = ref["output_tokens"] / ref["wall_s"] if ref else None
            ratio = lambda x, y: f"{x / y:.2f}x" if ref else "-"  # noqa: E731
            print(f"| {name} | {kind} | {r['computed_tokens']} | {ratio(r['computed_tokens'], ref and ref['computed_tokens'])} "
                  f"| {r['ttft_p50']:.2f} / {r['ttft_p90']:.2f} | {ratio(ref and ref['ttft_p50'], r['ttft_p50'])} "
                  f"| {tps:.1f} | {ratio(tps, ref_tps)} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.environ.get("PYTHONPATH", ROOT).split(os.pathsep)[0])
    sys.exit(main())
