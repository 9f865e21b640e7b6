"""Peak RSS of HF <-> Orbax conversion for a random-weight model with the real 0.5B dimensions (~2 GB in fp32).

Builds the HF directory (config.json + model.safetensors, written tensor by tensor), then runs each conversion in a
subprocess (`python -m qcjax.convert ...`) while polling the RSS of that process and all its children every 10 ms.
Prints each peak as a ratio of the checkpoint size, next to references measured in the same run: a process that only
imports the stack (the fixed overhead), `qcjax.load_hf` (the whole model in memory, what a non-streaming conversion
would hold) and `transformers.AutoModelForCausalLM.from_pretrained` (which leaves fp32 weights memory-mapped and
untouched, so its RSS stays low until the weights are used). Medians over --repeats runs.

    python bench/convert_memory.py [--preset 0.5b] [--repeats 3] [--workdir /tmp/qcjax-convert-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import psutil

IMPORT_ONLY = "import jax, orbax.checkpoint, qcjax.convert, qcjax.checkpoint, qcjax.model; jax.devices()"
TRANSFORMERS_LOAD = ("import sys, torch, transformers; "
                     "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)")
LOAD_HF = "import sys, jax, qcjax; jax.block_until_ready(qcjax.load_hf(sys.argv[1])[1])"


def make_hf_dir(path: str, preset: str, seed: int = 0) -> int:
    """A random-weight HF checkpoint with the preset's real shapes; returns its size in bytes."""
    from flax import linen as nn

    from qcjax import hf
    from qcjax.config import get_config
    from qcjax.model import abstract_params

    cfg = get_config(preset)
    specs = hf.hf_tensor_specs(cfg, nn.meta.unbox(abstract_params(cfg)))
    rng = np.random.default_rng(seed)

    def tensors():
        for name, shape in specs:
            yield name, (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f)
    hf.write_safetensors_shards(path, specs, tensors(), "float32", max_shard_bytes=10**12)
    return os.path.getsize(os.path.join(path, "model.safetensors"))


def peak_rss(cmd: list[str], interval: float = 0.01) -> tuple[int, float]:
    """(peak RSS in bytes summed over the process tree, wall seconds) of running cmd."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root] + root.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        peak = max(peak, total)
        time.sleep(interval)
    err = proc.stderr.read().decode()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return peak, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.5b", help="model preset whose real dimensions to use (default 0.5b)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each measurement; medians are printed")
    ap.add_argument("--workdir", default="/tmp/qcjax-convert-bench", help="scratch directory (deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    hf_dir, ckpt, out = (os.path.join(args.workdir, d) for d in ("hf", "ckpt", "out"))
    t = time.perf_counter()
    size = make_hf_dir(hf_dir, args.preset)
    print(f"{args.preset}: HF checkpoint {size / 1e9:.3f} GB (fp32), written in {time.perf_counter() - t:.1f} s")

    py = sys.executable
    env_note = f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    runs: dict[str, list[tuple[int, float]]] = {k: [] for k in (
        "import-only", "load_hf", "transformers", "hf-to-orbax", "orbax-to-hf")}
    for _ in range(args.repeats):
        runs["import-only"].append(peak_rss([py, "-c", IMPORT_ONLY]))
        runs["load_hf"].append(peak_rss([py, "-c", LOAD_HF, hf_dir]))
        runs["transformers"].append(peak_rss([py, "-c", TRANSFORMERS_LOAD, hf_dir]))
        shutil.rmtree(ckpt, ignore_errors=True)
        runs["hf-to-orbax"].append(peak_rss([py, "-m", "qcjax.convert", "hf-to-orbax", "--hf_dir", hf_dir,
                                             "--out", ckpt, "--no_progress"]))
        shutil.rmtree(out, ignore_errors=True)
        runs["orbax-to-hf"].append(peak_rss([py, "-m", "qcjax.convert", "orbax-to-hf", "--ckpt", ckpt,
                                             "--out", out, "--no_progress"]))
    # The export must reproduce the input exactly (fp32 -> fp32).
    from qcjax.hf import SafetensorsReader

    a, b = SafetensorsReader(hf_dir), SafetensorsReader(out)
    assert a.names() == b.names() and all(np.array_equal(a.get(n), b.get(n)) for n in a.names()), "round trip differs"

    base = statistics.median(r for r, _ in runs["import-only"])
    print(f"\n{env_note}; medians of {args.repeats} run(s); checkpoint {size / 1e9:.3f} GB")
    print(f"{'process':<14}{'peak RSS GB':>12}{'x ckpt':>9}{'above import-only GB':>22}{'x ckpt':>9}{'wall s':>9}")
    for k, rs in runs.items():
        peak = statistics.median(r for r, _ in rs)
        wall = statistics.median(w for _, w in rs)
        print(f"{k:<14}{peak / 1e9:>12.3f}{peak / size:>9.2f}{(peak - base) / 1e9:>22.3f}{(peak - base) / size:>9.2f}"
              f"{wall:>9.1f}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
