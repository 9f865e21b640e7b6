"""How many concurrent requests of --tokens tokens fit on a TPU slice: the paged engine (pages for what each request
holds) vs the dense engine of an earlier commit (a cache of the server's --max_len per slot), at the same HBM,
from ahead-of-time compiles (libtpu on this CPU host; no TPU needed). Prints a markdown table for
docs/tpu-sampling.md.

    python tools/paged_capacity.py                      # 7B on v5e-8 and 32B on v5p-8, 2K requests, a 32K server
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def paged_fits(cfg, topo: str, rows: int, a) -> bool:
    from qcjax import tpu_compile as T

    r = T.compile_sampler(cfg, topo, batch=rows, context=a.tokens, max_new_tokens=a.new, max_len=a.max_len,
                          prefill_rows=min(rows, 4))
    return r.fits


def dense_fits(tree: str, preset: str, topo: str, rows: int, a) -> bool:
    out = subprocess.run([sys.executable, os.path.join(tree, "infer.py"), "--config", preset, "--compile_only",
                          "--topology", topo, "--batch", str(rows), "--max_context", str(a.max_len),
                          "--max_new_tokens", str(a.new)], env=dict(os.environ, PYTHONPATH=tree), cwd=tree,
                         capture_output=True, text=True)
    if out.returncode not in (0, 1):
        raise RuntimeError(out.stderr[-2000:])
    return out.returncode == 0


def largest(fits, hi: int) -> int:
    """The largest n in [0, hi] with fits(n) (fits is monotone)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
        print(f"  {mid}: {'fits' if lo == mid else 'does not fit'}", file=sys.stderr, flush=True)
    return lo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="7b:v5e-8,32b:v5p-8")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per request (default 2048)")
    p.add_argument("--new", type=int, default=256, help="of which generated (default 256)")
    p.add_argument("--max_len", type=int, default=32768, help="the server's limit per request (default 32768)")
    p.add_argument("--dense_ref", default="f079795")
    a = p.parse_args()
    import qcjax

    tree = tempfile.mkdtemp(prefix="qcjax-dense-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", tree, a.dense_ref], check=True,
                   capture_output=True)
    rows = []
    try:
        for case in a.cases.split(","):
            preset, topo = case.split(":")
            cfg = qcjax.get_config(preset).replace(param_dtype="bfloat16", dtype="bfloat16")
            print(f"{preset} on {topo}: dense", file=sys.stderr)
            dense = largest(lambda n: dense_fits(tree, preset, topo, n, a), 64)
            print(f"{preset} on {topo}: paged", file=sys.stderr)
            paged = largest(lambda n: paged_fits(cfg, topo, n, a), 1024)
            rows.append((preset, topo, dense, paged))
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
    print(f"| model | slice | dense: slots of {a.max_len} tokens | paged: requests of {a.tokens} tokens | ratio |")
    print("|---|---|---|---|---|")
    for preset, topo, dense, paged in rows:
        print(f"| {preset.upper()} | {topo} | {dense} | {paged} | {paged / max(dense, 1):.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
