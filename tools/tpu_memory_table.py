"""docs/tpu-memory.md: for every size and stage, the smallest v5p and v6e slice the train step fits on, found by
compiling the real step (qcjax.tpu_compile.compile_train: the program train.py runs) for TPU topologies on this host.

    python tools/tpu_memory_table.py                       # all sizes/stages/generations (hours on 2 cores)
    python tools/tpu_memory_table.py --sizes 0.5b,1.5b --gens v5p --out /tmp/t.md

Every compile runs in its own process (compiling a 32B step takes 1-3 min and ~2 GB of host memory) and is cached
in tools/tpu_memory_points.jsonl, so an interrupted run resumes and a rerun only redoes the document. The cache is
keyed by the point, not by the code: delete it after a change to the train step's program.

Search, per (size, stage, generation): slices from the smallest up; on a slice, remat policies from the least
recompute ("none", "minimal", "full"), and per-device rows 1, 2, 4 (more rows per micro-batch: fewer micro-batches,
so fewer FSDP weight gathers per step). A point fits when the compiler's per-chip total (arguments + outputs -
aliased + temporaries + code) is at most HEADROOM x HBM (room for the runtime's own buffers). A calibrated linear
model (per-param bytes / chips + bytes per token per device, fitted to this size's earlier compiles) skips points it
predicts far over budget; every point in the table is a real compile at the model's full depth.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = ("0.5b", "1.5b", "3b", "7b", "14b", "32b")
STAGES = ("file", "repo", "sft", "dpo")
SLICES = {
    "v5p": ("v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128", "v5p-256", "v5p-512"),
    "v6e": ("v6e-1", "v6e-4", "v6e-8", "v6e-16", "v6e-32", "v6e-64", "v6e-128", "v6e-256"),
}
POLICIES = ("none", "minimal", "full")  # least recompute first
ROWS = (1, 2, 4)
HEADROOM = 0.95
SKIP_OVER = 1.25  # skip a point the model predicts above SKIP_OVER x budget
# Per-param bytes per chip outside the activations (FSDP over every chip): fp32 params + Adam mu, nu (arguments,
# 12 B) and the step's fp32 gradient buffers (temporaries, ~20 B: measured on 32B, 2 vs 64 layers on v5p-128).
STATE_BYTES = 32
REF_BYTES = 4  # DPO's frozen fp32 reference copy
CACHE = os.path.join(ROOT, "tools", "tpu_memory_points.jsonl")
OUT = os.path.join(ROOT, "docs", "tpu-memory.md")


def load_config(size: str, stage: str):
    spec = importlib.util.spec_from_file_location(f"cfg_{size}", os.path.join(ROOT, "configs", f"{size}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(stage)


def point_config(p: dict):
    """The stage's config with the point's remat and rows per device (grad_accum follows)."""
    c = load_config(p["size"], p["stage"])
    c.model.remat = p["remat"]
    c.per_device_batch = p["rows"]
    c.grad_accum = 1
    c.model.num_layers = p.get("layers", 0)
    return c


def compile_point(p: dict) -> dict:
    """In this process: compile one point; the memory report as a dict."""
    from qcjax import platform, tpu_compile as T
    from qcjax.train.loop import ConfigError

    platform.quiet_libtpu(cpu_only=True)
    try:
        r = T.compile_train(point_config(p), p["topology"])
    except ConfigError as e:
        return {"error": f"config: {e}"}
    prog = r.programs[0]
    out = {"lower_s": round(prog.lower_s, 1), "compile_s": round(prog.compile_s, 1), "mesh": r.mesh,
           "flops": r.flops_per_step, "peak_flops": r.peak_flops, "hbm": r.topology.hbm_bytes,
           "chips": r.topology.chips, "setup": r.setup}
    if prog.memory is None:
        out.update(total=prog.needed, error=prog.error)
    else:
        m = prog.memory
        out.update(arguments=m.arguments, outputs=m.outputs, aliased=m.aliased, temporaries=m.temporaries,
                   code=m.code, total=m.total)
    return out


def key(p: dict) -> str:
    """What decides the program's memory: SFT rows have the file stage's shapes and the same loss path."""
    kind = "dpo" if p["stage"] == "dpo" else "repo" if p["stage"] == "repo" else "lm8k"
    return f"{p['size']}|{kind}|{p['topology']}|{p['remat']}|{p['rows']}|{p.get('layers', 0)}"


class Points:
    """The cache of compiled points (JSONL), compiling missing ones in a subprocess."""

    def __init__(self, path: str, log=sys.stderr):
        self.path, self.log = path, log
        self.done: dict[str, dict] = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        r = json.loads(line)
                        self.done[r["key"]] = r

    def get(self, p: dict) -> dict:
        k = key(p)
        if k in self.done:
            return self.done[k]
        t = time.time()
        print(f"  compiling {k} ...", file=self.log, flush=True)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--point", json.dumps(p)],
                              capture_output=True, text=True, timeout=1800, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            raise RuntimeError(f"compile of {k} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = {"key": k, "point": p, **json.loads(lines[-1]), "wall_s": round(time.time() - t, 1)}
        with open(self.path, "a") as f:
            f.write(json.dumps(r) + "\n")
        self.done[k] = r
        total = r.get("total")
        print(f"    {'%.2f GiB' % (total / 2**30) if total else r.get('error', '')[:120]} in {r['wall_s']} s",
              file=self.log, flush=True)
        return r


def fits(r: dict) -> bool:
    return "arguments" in r and r["total"] <= HEADROOM * r["hbm"]


# ---- the search --------------------------------------------------------------------------------------------------
def model_facts(size: str, stage: str) -> dict:
    from qcjax.config import get_config
    from qcjax.model import count_params

    c = load_config(size, stage)
    cfg = get_config(size)
    return {"params": count_params(cfg), "layers": cfg.num_layers, "hidden": cfg.hidden_size,
            "batch": c.batch_size, "seq": c.seq_len, "dpo": stage == "dpo" and c.dpo.reference == "frozen",
            "streams": 2 if stage == "dpo" else 1}


def stage_flops(size: str, stage: str) -> float:
    """Model FLOPs of one step of the stage (the MFU formula train.py logs)."""
    from qcjax.config import get_config
    from qcjax.train.metrics import train_flops_per_step

    c = load_config(size, stage)
    return train_flops_per_step(get_config(size), c.task, c.batch_size, c.seq_len)


def state_bytes(f: dict, chips: int) -> float:
    return (STATE_BYTES + (REF_BYTES if f["dpo"] else 0)) * f["params"] / chips


def tokens_per_device(f: dict, rows: int) -> int:
    return rows * f["seq"] * f["streams"]


class Calibration:
    """Activation bytes per token per chip for a remat policy, fitted to compiles: this size's own when it has
    any, else scaled from the other sizes by layers x hidden (the saved activations are per layer and per
    hidden unit). The largest seen: conservative."""

    def __init__(self):
        self.per_token: dict[tuple[str, str], float] = {}
        self.per_unit: dict[str, float] = {}  # policy -> bytes per (token x layer x hidden)

    def observe(self, size: str, policy: str, f: dict, chips: int, rows: int, total: float) -> None:
        v = (total - state_bytes(f, chips)) / tokens_per_device(f, rows)
        k = (size, policy)
        self.per_token[k] = max(self.per_token.get(k, 0.0), v)
        self.per_unit[policy] = max(self.per_unit.get(policy, 0.0), v / (f["layers"] * f["hidden"]))

    def predict(self, size: str, policy: str, f: dict, chips: int, rows: int) -> float | None:
        v = self.per_token.get((size, policy))
        if v is None and policy in self.per_unit:
            v = self.per_unit[policy] * f["layers"] * f["hidden"]
        return None if v is None else state_bytes(f, chips) + v * tokens_per_device(f, rows)


def search(points: Points, cal: Calibration, size: str, stage: str, gen: str) -> dict | None:
    """The chosen point for one cell: the smallest slice, then the least recompute, then the most rows."""
    from qcjax.tpu_compile import parse_topology

    f = model_facts(size, stage)

    def run(topo, t, policy, rows):
        p = {"size": size, "stage": stage, "topology": topo, "remat": policy, "rows": rows}
        r = points.get(p)
        if r.get("total") and "error" not in r:
            cal.observe(size, policy, f, t.chips, rows, r["total"])
        return {**r, "point": p} if fits(r) else None

    for topo in SLICES[gen]:
        t = parse_topology(topo)
        budget = HEADROOM * t.hbm_bytes
        if state_bytes(f, t.chips) > budget or f["batch"] % t.chips:
            continue
        for policy in POLICIES:
            rows_ok = [r for r in ROWS if f["batch"] % (r * t.chips) == 0]
            if cal.predict(size, policy, f, t.chips, 1) is None:  # uncalibrated: rows=1 first, it calibrates
                if run(topo, t, policy, 1) is None:
                    continue
            for rows in sorted(rows_ok, reverse=True):  # most rows first
                pred = cal.predict(size, policy, f, t.chips, rows)
                if pred > (SKIP_OVER if rows == 1 else 1.0) * budget:
                    continue  # more rows only when predicted to fit; one row unless predicted far over
                hit = run(topo, t, policy, rows)
                if hit is not None:
                    return hit
    return None


# ---- the document ------------------------------------------------------------------------------------------------
HEAVIER = {p: i for i, p in enumerate(POLICIES)}


def config_default(chosen: dict[str, dict | None]) -> tuple[str, int] | None:
    """One setting for both generations' smallest slices: the heavier remat and the fewer rows of the two."""
    picks = [r["point"] for r in chosen.values() if r is not None]
    if not picks:
        return None
    return max((p["remat"] for p in picks), key=HEAVIER.get), min(p["rows"] for p in picks)


def gib(b: float) -> str:
    return f"{b / 2**30:.1f}"


CONTEXT_POINTS = os.path.join(ROOT, "tools", "tpu_memory_context.jsonl")


def read_rows(path: str) -> list[dict]:
    """The compiles recorded by hand in a JSONL file (one object per compile: the command it ran and the compiler's
    per-chip total); none if the file is absent."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def context_section() -> list[str]:
    """Rows compiled with a context (sequence-parallel) mesh axis, from tools/tpu_memory_context.jsonl."""
    rows = read_rows(CONTEXT_POINTS)
    if not rows:
        return []
    out = ["", "## Context parallelism: the repo stage (32K tokens) on more slices", "",
           "With `mesh.context` > 1 each row's 32K tokens are split over `context` chips (activations sharded along "
           "the sequence, keys and values gathered for attention) and those chips also shard the weights as fsdp "
           "does. Compiled the same way as the table above (bf16 compute, fp32 params and Adam state, remat full, "
           "the stage's global batch):", "",
           "| size | stage | slice | mesh | total per chip (GiB) | HBM (GiB) | fits | command |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['size']} | {r['stage']} | {r['slice']} | {r['mesh']} | {r['total_gib']:.2f} | "
                   f"{r['hbm_gib']:.2f} | {'yes' if r['fits'] else 'no'} ({100 * r['total_gib'] / r['hbm_gib']:.0f}%) "
                   f"| `{r['command']}` |")
    return out


LORA_POINTS = os.path.join(ROOT, "tools", "tpu_memory_lora.jsonl")


def lora_section(results: dict) -> list[str]:
    """LoRA / QLoRA rows from tools/tpu_memory_lora.jsonl (one JSON object per compile, as for the context rows),
    next to the smallest slices the full fine-tune of the same size and stage needs (this page's table)."""
    rows = read_rows(LORA_POINTS)
    if not rows:
        return []
    out = ["", "## LoRA and QLoRA: fine-tuning the big sizes on small slices", "",
           "`lora.rank` > 0 trains low-rank adapters only (qwix LoRA on q/k/v/o/gate/up/down): the adapters and their "
           "Adam state are fp32, the frozen base is held in the compute dtype (bf16) or, with `lora.base_quant=int8`, "
           "as int8 values with per-channel bf16 scales (QLoRA). No base gradients, no base optimizer state. Compiled "
           "the same way as the table above (the stage's global batch and sequence length, the size config's remat "
           "and rows per chip), on the mesh each row names: FSDP over every chip, or with a context axis that splits "
           "each row's tokens (previous section) where one row's activations do not fit a chip. The last column is "
           "the full fine-tune's smallest slices from the table. For 32B SFT at 8K: full fine-tuning needs 16 v5p or "
           "64 v6e chips; LoRA fits 8 v6e chips (or 16 v5e), QLoRA 8 v6e with a third of the HBM to spare, or 8 v5e "
           "with `--config.mesh.context=2`.", "",
           "| size | stage | slice | mesh | adapters | base | total per chip (GiB) | HBM (GiB) | fits | full FT needs "
           "| command |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hits = [h for (size, stage, _), h in results.items() if (size, stage) == (r["size"], r["stage"]) and h]
        needs = ", ".join(f"{h['point']['topology']} ({gib(h['total'])} GiB)" for h in hits) or "-"
        out.append(f"| {r['size']} | {r['stage']} | {r['slice']} | {r['mesh']} | {r['adapters']} | {r['base']} | "
                   f"{r['total_gib']:.2f} | {r['hbm_gib']:.2f} | "
                   f"{'yes' if r['total_gib'] <= HEADROOM * r['hbm_gib'] else 'no'} "
                   f"({100 * r['total_gib'] / r['hbm_gib']:.0f}%) | {needs} | `{r['command']}` |")
    return out + ["", f"A row fits when its total is at most {HEADROOM:.0%} of the HBM, as in the table above."]


RL_POINTS = os.path.join(ROOT, "tools", "tpu_memory_rl.jsonl")


def rl_section() -> list[str]:
    """Online RL rows from tools/tpu_memory_rl.jsonl (one JSON object per compile, as for the context rows): the
    train step and the rollout programs of the :grpo stage (`compile_train` compiles both for task rl)."""
    rows = read_rows(RL_POINTS)
    if not rows:
        return []
    out = ["", "## Online RL (GRPO): the train step and the rollouts", "",
           "The `:grpo` stage (task rl, [eval.md](eval.md#online-rl-from-execution-rewards-grpo)) runs two kinds of "
           "program on one mesh and one copy of the params: the train step (policy-gradient loss over rollout rows "
           "of `seq_len` tokens) and the inference engine's prefill and decode programs (the rollouts: up to 64 rows "
           "at once of `seq_len` tokens, `rl.max_new_tokens` of them new, KV pages in the compute dtype). `train.py "
           "--compile_only` compiles all of them for task rl; a rollout program's total here adds the optimizer "
           "state's per-chip bytes, which stay resident while the engine runs (its params are the train state's own, "
           "fp32). Compiled the same way as the table above (the size config's remat and rows per chip, FSDP over "
           "every chip):", "",
           "| size | stage | slice | mesh | batch x seq (new) | program | total per chip (GiB) | HBM (GiB) | fits | "
           "compile (s) | command |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p in r["programs"]:
            out.append(f"| {r['size']} | {r['stage']} | {r['slice']} | {r['mesh']} | {r['shape']} | {p['name']} | "
                       f"{p['total_gib']:.2f} | {r['hbm_gib']:.2f} | "
                       f"{'yes' if p['total_gib'] <= HEADROOM * r['hbm_gib'] else 'no'} "
                       f"({100 * p['total_gib'] / r['hbm_gib']:.0f}%) | {p['compile_s']:.0f} | `{r['command']}` |")
    return out + ["", f"A row fits when its total is at most {HEADROOM:.0%} of the HBM, as in the table above. The "
                  "rollouts' KV pool (64 rows x 2048 tokens) is not split over the fsdp axis (the engine shards pages "
                  "over data and tensor only), so every chip holds all of it: 7.0 GiB for 7B, 32.0 GiB for 32B (the "
                  "rollout programs' outputs above); fewer rows at once, or a tensor axis, would shrink it."]


def render(results: dict, defaults: dict, points: Points, args) -> str:
    import jax

    from qcjax import tpu_compile as T

    try:
        from importlib.metadata import version

        libtpu = version("libtpu")
    except Exception:  # noqa: BLE001
        libtpu = "?"
    lines = [
        "# TPU memory: the smallest slice for each size and stage",
        "",
        "<!-- generated by tools/tpu_memory_table.py; do not edit by hand -->",
        "",
        "Training. For sampling (prefill and decode per chip, 32B and 7B at 128K): [tpu-sampling.md](tpu-sampling.md).",
        "",
        "Every row is the train step `train.py` runs (`qcjax.train.loop.build_train_program`), compiled ahead of time "
        "by the real XLA TPU compiler for that slice (`python train.py --config=configs/SIZE.py:STAGE --compile_only "
        "--topology=SLICE`), at the model's full depth. The mesh is FSDP over every chip (the configs' default "
        "`data=1, fsdp=-1, tensor=1`); params and Adam state are fp32, compute bf16, and the batch is the stage's "
        "global batch (configs/base.py STAGE_DEFAULTS), split into micro-batches of `rows` per chip.",
        "",
        f"Search: slices from the smallest up; on a slice, remat `{'` > `'.join(POLICIES)}` (least recompute first), "
        f"then the most rows per chip of {', '.join(map(str, ROWS))}. To save compiles, a point that a linear memory "
        "model (fitted to the size's earlier compiles) predicts over budget is not compiled (for more than one row) "
        f"or over {SKIP_OVER:.0%} of it (for one row), so a row count that would just fit can be missed: the table's "
        "rows per chip are what is proven to fit, not always the most that would. A point fits when the compiler's "
        "per-chip total "
        f"(arguments + outputs - aliased + temporaries + generated code) is at most {HEADROOM:.0%} of the HBM the "
        "compiler plans with (v5p 95.74 GiB, v6e 31.25 GiB): the rest is left to the runtime. SFT rows have the "
        "file stage's shapes and loss, so they share its compiles. HBM is per chip, GiB; FLOPs per step are the model "
        "formula that the MFU uses (qcjax.train.metrics: 6 x matmul params + causal attention per token, remat "
        "recomputation not counted); `ideal` is that divided by the slice's bf16 peak (100% MFU).",
        "",
        "| size | stage | slice | chips | mesh | remat | rows/chip | grad_accum | HBM/chip (GiB) | of | FLOPs/step "
        "| ideal step (s) | compile (s) |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nofit = []
    order = lambda kv: (SIZES.index(kv[0][0]), STAGES.index(kv[0][1]), *kv[0][2:])
    results, defaults = dict(sorted(results.items(), key=order)), dict(sorted(defaults.items(), key=order))
    for (size, stage, gen), r in results.items():
        if r is None:
            nofit.append(f"{size} {stage} on {gen}")
            lines.append(f"| {size} | {stage} | no {gen} slice up to {SLICES[gen][-1]} | | | | | | | | | | |")
            continue
        p = r["point"]
        t = T.parse_topology(p["topology"])
        f = model_facts(size, stage)
        accum = f["batch"] // (p["rows"] * t.chips)
        mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 chip"
        flops = stage_flops(size, stage)  # not the cached compile's: SFT reuses file-stage compiles (other batch)
        ideal = flops / (r["peak_flops"] * t.chips)
        lines.append(f"| {size} | {stage} | {p['topology']} | {t.chips} | {mesh} | {p['remat']} | {p['rows']} | "
                     f"{accum} | {gib(r['total'])} | {gib(r['hbm'])} | {flops:.2e} | {ideal:.2f} | "
                     f"{r['compile_s']:.0f} |")
    lines += [
        "",
        "## The configs' defaults",
        "",
        "configs/SIZE.py sets, per stage, `model.remat` and `per_device_batch` (rows per chip; grad_accum = "
        "batch_size / (chips x rows)) to a setting that fits both generations' smallest slices above: the heavier "
        "remat and the fewer rows of the two. Where that differs from a slice's own row, it needs no more memory "
        "than that row (`<=`): the policies are nested (`full` saves a subset of what `minimal` saves, which saves "
        "a subset of `none`) and fewer rows mean fewer activations. A larger slice of the same generation needs "
        "no change (less state per chip, the same rows per chip); a slice's own setting is one flag away, e.g. "
        "`--config.model.remat=minimal --config.per_device_batch=2`.",
        "",
        "| size | stage | remat | per_device_batch | verified on |",
        "|---|---|---|---:|---|",
    ]
    for (size, stage), d in defaults.items():
        if d is None:
            lines.append(f"| {size} | {stage} | (no slice fits) | | |")
            continue
        remat, rows, checks = d
        on = ", ".join(f"{topo} ({'' if same else '<= '}{gib(total)} GiB)" for topo, total, same in checks)
        lines.append(f"| {size} | {stage} | {remat} | {rows} | {on} |")
    if nofit:
        lines += ["", "## What does not fit", "",
                  "With FSDP alone, activations are not sharded below one row per chip: the saved residual stream of "
                  "a 32K-token row stays on one chip whatever the slice size. These cells fit on no slice of the "
                  "generation up to the largest tried: " + "; ".join(nofit) + "."
                  + (" (With a context axis they do: see below.)" if os.path.exists(CONTEXT_POINTS) else "")]
    lines += context_section()
    lines += lora_section(results)
    lines += rl_section()
    n = len(points.done)
    secs = sum(r.get("wall_s", 0) for r in points.done.values())
    lines += [
        "",
        "## How this was generated",
        "",
        f"`python tools/tpu_memory_table.py {' '.join(args.argv)}`".replace(" `", "`"),
        "",
        f"- {datetime.date.today().isoformat()}, jax {jax.__version__}, libtpu {libtpu}, on {platform.machine()} "
        f"with {os.cpu_count()} cores and no TPU: {n} compiles ({secs / 3600:.1f} h of compile processes), each "
        "in its own process; results cached in tools/tpu_memory_points.jsonl (rerunning only redoes this page).",
        "- Which points were compiled: a linear model (per-param state bytes / chips + activation bytes per token "
        "per chip, fitted to each size's earlier compiles) skips points with more than one row it predicts over the "
        f"budget, and one-row points it predicts beyond {SKIP_OVER:.2f} x the budget; every number above is a "
        "compile, none is a prediction.",
        "- Memory is the compiler's buffer assignment (`compiled.memory_analysis()`), which the compile-only TPU "
        "devices report exactly as a TPU host would; no TPU ran these programs, so step times are FLOP bounds, not "
        "measurements.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--gens", default=",".join(SLICES))
    ap.add_argument("--cache", default=CACHE)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--point", help=argparse.SUPPRESS)  # internal: compile one point, print JSON
    a = ap.parse_args(argv)
    if a.point:
        print(json.dumps(compile_point(json.loads(a.point))))
        return 0
    a.argv = [x for x in (argv if argv is not None else sys.argv[1:])]
    from qcjax.platform import quiet_libtpu

    quiet_libtpu(cpu_only=True)
    points, cal = Points(a.cache), Calibration()
    sizes, stages, gens = a.sizes.split(","), a.stages.split(","), a.gens.split(",")
    results: dict = {}
    defaults: dict = {}
    for size in sizes:
        for stage in stages:
            for gen in gens:
                print(f"{size} {stage} {gen}", file=sys.stderr, flush=True)
                results[(size, stage, gen)] = search(points, cal, size, stage, gen)
            chosen = {g: results[(size, stage, g)] for g in gens}
            d = config_default(chosen)
            if d is None:
                defaults[(size, stage)] = None
            else:  # the default saves no more and runs no more rows than either chosen point: it fits them both
                checks = [(r["point"]["topology"], r["total"], (r["point"]["remat"], r["point"]["rows"]) == d)
                          for r in chosen.values() if r is not None]
                defaults[(size, stage)] = (*d, checks)
            with open(a.out, "w") as fh:  # after every cell: a partial run leaves a partial page
                fh.write(render(results, defaults, points, a))
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
