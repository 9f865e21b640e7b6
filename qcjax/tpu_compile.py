"""Ahead-of-time compilation for TPU slices on any host (a CPU machine included), with a per-chip memory report.

With libtpu installed, JAX describes a TPU topology without any TPU attached ("compile-only" devices); the real XLA
TPU compiler and Mosaic (the Pallas kernels) then compile for it, and `memory_analysis()` gives per-chip HBM. This
module compiles THE train step the loop runs (`qcjax.train.loop.build_train_program`) and the sampler's prefill and
decode (`qcjax.inference.programs`), so `train.py --compile_only` / `infer.py --compile_only` answer "does it fit on this slice?"
before a pod is booked. Nothing executes and no weights are read.

    report = compile_train(config, "v5p-128"); print(report.format()); report.fits

Slice names: `v4-N` and `v5p-N` count TensorCores (2 per chip), `v5e-N` and `v6e-N` count chips, as Cloud TPU
names them; `2xv5p-128` is two slices joined over the data-center network; `v5p:4x4x8` gives the chip grid itself.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from qcjax import platform
from qcjax.config import ModelConfig

GiB = 2**30
LIBTPU_HINT = ('pip install "jax[tpu]==0.10.2" (or `pip install -r requirements-dev.txt`, which pins the matching '
               "libtpu)")


class CompileUnavailable(RuntimeError):
    """No TPU compiler on this host (libtpu is not installed)."""


class TopologyError(ValueError):
    """A slice name that is not a TPU topology."""


# ---- topologies -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU chip generation as libtpu names it and as the XLA compiler sizes it."""

    prefix: str  # libtpu topology prefix ("v5" is v5p)
    cores_per_chip: int  # TensorCores per chip: slice names of megacore chips count cores
    dims: int  # 3: 3D torus (v4, v5p); 2: 2D (v5e, v6e)
    chip_config: str
    hbm_bytes: int  # HBM per chip that the compiler plans with (measured: the limit in its out-of-memory errors)


GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", 2, 3, "megacore", int(30.75 * GiB)),
    "v5p": Generation("v5", 2, 3, "megacore", int(95.74 * GiB)),
    "v5e": Generation("v5e", 1, 2, "default", int(15.75 * GiB)),
    "v6e": Generation("v6e", 1, 2, "default", int(31.25 * GiB)),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice (or several identical slices over DCN): what `get_topology_desc` needs, plus HBM per chip."""

    name: str  # as given, e.g. "v5p-128" or "2xv6e-256"
    generation: str  # key of GENERATIONS
    grid: tuple[int, ...]  # chips per slice along each torus axis
    slices: int = 1

    @property
    def gen(self) -> Generation:
        return GENERATIONS[self.generation]

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.grid)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def hbm_bytes(self) -> int:
        return self.gen.hbm_bytes

    @property
    def topology_name(self) -> str:
        return f"{self.gen.prefix}:{'x'.join(map(str, self.grid))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Wraparound (torus) links: 3D slices made of whole 4x4x4 cubes; the full 16x16 2D pod."""
        if self.gen.dims == 3:
            return (all(d % 4 == 0 for d in self.grid),) * 3
        full = tuple(self.grid) == (16, 16)
        return (full, full, False)

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host: 2x2 (4-chip hosts), fewer for 1- and 2-chip slices."""
        x, y = self.grid[0], self.grid[1] if len(self.grid) > 1 else 1
        return (min(2, x), min(2, y), 1)


def _default_grid(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's standard shape for a power-of-two chip count: 3D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8...;
    2D 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16."""
    if dims == 2:
        a = 1 << (chips.bit_length() - 1) // 2
        return (a, chips // a)
    if chips < 4:
        return (chips, 1, 1)
    grid = [2, 2, 1]
    while math.prod(grid) < chips:
        grid[max(j for j in range(3) if grid[j] == min(grid))] *= 2  # the last of the smallest axes
    return tuple(grid)


_NAME = re.compile(r"^(?:(\d+)x)?(v4|v5p|v5e|v6e)([-:])([\dx]+)$")


def parse_topology(name: str) -> Topology:
    """'v5p-128', 'v5e-4', 'v6e-256', 'v4-8', '2xv5p-128' (two slices), 'v5p:4x4x8' (an explicit chip grid)."""
    m = _NAME.match(name.strip().lower())
    if not m:
        raise TopologyError(f"topology {name!r}: expected [SLICESx]GEN-N or GEN:AxBxC with GEN one of "
                            f"{sorted(GENERATIONS)}, e.g. v5p-128, v6e-256, 2xv5p-128, v5p:4x4x8")
    slices, gen_name, sep, size = int(m.group(1) or 1), m.group(2), m.group(3), m.group(4)
    gen = GENERATIONS[gen_name]
    if slices < 1:
        raise TopologyError(f"topology {name!r}: the number of slices must be >= 1")
    if sep == ":":
        try:
            grid = tuple(int(d) for d in size.split("x"))
        except ValueError:
            raise TopologyError(f"topology {name!r}: {size!r} is not a chip grid like 4x4x8") from None
        if len(grid) != gen.dims or min(grid) < 1:
            raise TopologyError(f"topology {name!r}: {gen_name} needs a {gen.dims}D chip grid, got {size!r}")
    else:
        if not size.isdigit() or int(size) < 1:
            raise TopologyError(f"topology {name!r}: {size!r} is not a number of "
                                f"{'TensorCores' if gen.cores_per_chip > 1 else 'chips'}")
        n = int(size)
        unit = "TensorCores (2 per chip)" if gen.cores_per_chip > 1 else "chips"
        if n % gen.cores_per_chip or (n // gen.cores_per_chip) & (n // gen.cores_per_chip - 1):
            raise TopologyError(f"topology {name!r}: {gen_name}-N counts {unit}; N={n} is not a power-of-two "
                                f"slice (give the chip grid instead, e.g. {gen_name}:{'4x4x12' if gen.dims == 3 else '4x12'})")
        grid = _default_grid(n // gen.cores_per_chip, gen.dims)
    return Topology(name=name, generation=gen_name, grid=grid, slices=slices)


def has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def compile_devices(topo: Topology) -> tuple:
    """The slice's compile-only TPU devices (ordered slice by slice, so a leading "data" mesh axis spans slices)."""
    if not has_libtpu():
        raise CompileUnavailable(f"compiling for TPU topology {topo.name} needs libtpu, which is not installed: "
                                 + LIBTPU_HINT)
    return _compile_devices(topo)


@functools.lru_cache(maxsize=None)
def _compile_devices(topo: Topology) -> tuple:
    from jax.experimental.topologies import get_topology_desc

    platform.quiet_libtpu()
    desc = get_topology_desc(platform="tpu", topology_name=topo.topology_name, chip_config_name=topo.gen.chip_config,
                             chips_per_host_bounds=topo.host_bounds, num_slices=topo.slices, wrap=topo.wrap)
    return tuple(sorted(desc.devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.id)))


def topology_mesh(topology: str | Topology, shape: dict[str, int] | None = None):
    """A (data, fsdp, tensor) mesh (qcjax.sharding.make_mesh) over a slice's compile-only devices."""
    from qcjax.sharding import make_mesh

    topo = parse_topology(topology) if isinstance(topology, str) else topology
    return make_mesh(shape, devices=compile_devices(topo))


# ---- memory ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-chip HBM of one compiled program (XLA's buffer assignment), against the chip's capacity."""

    arguments: int
    outputs: int
    aliased: int  # outputs that reuse a donated argument's buffer
    temporaries: int
    code: int
    hbm: int

    @property
    def total(self) -> int:
        """Peak per chip: arguments + outputs - aliased + temporaries + code. XLA's TPU compiler does not always
        fail when this exceeds HBM, so the check is ours."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm

    def format(self) -> str:
        g = format_bytes
        return (f"arguments {g(self.arguments)}, outputs {g(self.outputs)} (aliased {g(self.aliased)}), "
                f"temporaries {g(self.temporaries)}, code {g(self.code)}\n"
                f"total {g(self.total)} of {g(self.hbm)} HBM per chip ({100 * self.total / self.hbm:.0f}%): "
                + ("fits" if self.fits else f"DOES NOT FIT (over by {g(self.total - self.hbm)})"))


def format_bytes(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if abs(b) >= GiB else f"{b / 2**20:.1f} MiB"


def memory_report(compiled, hbm: int) -> MemoryReport:
    m = compiled.memory_analysis()
    return MemoryReport(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                        aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
                        code=m.generated_code_size_in_bytes, hbm=hbm)


# "... HLO temporaries (33.81G) exceeds available HBM (15.75G)" / "Used 120.5G of 95.74G hbm"
_OOM = (re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM", re.I),
        re.compile(r"used ([\d.]+)([KMGT]?)i?B? of [\d.]+[KMGT]?i?B? hbm", re.I))


def _oom_bytes(message: str) -> int | None:
    """Bytes the compiler said it needed in its out-of-memory error, when it says."""
    for pattern in _OOM:
        m = pattern.search(message)
        if m:
            return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": GiB, "T": 2**40}[m.group(2).upper()])
    return None


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program: its memory (None when the compiler itself ran out of HBM) and compile times."""

    name: str
    memory: MemoryReport | None
    lower_s: float
    compile_s: float
    error: str = ""  # the compiler's out-of-memory message
    needed: int | None = None  # bytes the compiler said it needed, when it failed
    bytes_accessed: float | None = None  # XLA's cost analysis: HBM bytes one call reads and writes, per chip

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.fits


def compile_program(name: str, jitted, args: Sequence[Any], kwargs: dict | None, hbm: int):
    """Lower and compile `jitted(*args, **kwargs)` (abstract, sharded args; call under jax.set_mesh). Returns
    (report, compiled); a compiler out-of-memory error gives a report that does not fit and compiled None."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **(kwargs or {}))
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError's class moves between jax versions
        msg = str(e)
        if not ("RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()) or "hbm" not in msg.lower():
            raise  # not an HBM shortage (a kernel's VMEM error is a bug to see, not a slice too small)
        report = ProgramReport(name, None, t1 - t0, time.perf_counter() - t1,
                               error=msg.strip().splitlines()[0][:500], needed=_oom_bytes(msg))
        return report, None
    return ProgramReport(name, memory_report(compiled, hbm), t1 - t0, time.perf_counter() - t1,
                         bytes_accessed=_bytes_accessed(compiled)), compiled


def _bytes_accessed(compiled) -> float | None:
    """XLA's estimate of the bytes a call of the compiled program accesses (per chip), when it gives one."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    value = cost.get("bytes accessed") if isinstance(cost, dict) else None
    return float(value) if value is not None else None


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What `train.py/infer.py --compile_only` print: the setup, each program's memory and compile time."""

    topology: Topology
    mesh: dict[str, int]
    setup: list[str]  # human-readable lines: model, batch, remat, ...
    programs: list[ProgramReport]
    flops_per_step: float | None = None  # train: the model-formula FLOPs of one step
    peak_flops: float | None = None  # per chip

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)

    def format(self) -> str:
        t = self.topology
        dev = compile_devices(t)[0].device_kind
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"{t.name}: {t.chips} chips ({dev}, {t.topology_name}"
                 + (f", {t.slices} slices" if t.slices > 1 else "") + f"), mesh {mesh}", *self.setup]
        for p in self.programs:
            lines.append(f"{p.name}: lowered in {p.lower_s:.1f} s, compiled in {p.compile_s:.1f} s")
            if p.memory is not None:
                lines += ["  " + s for s in p.memory.format().splitlines()]
                if p.bytes_accessed:
                    lines.append(f"  XLA cost analysis: {format_bytes(p.bytes_accessed)} accessed per call per chip")
            else:
                need = f" (needs {format_bytes(p.needed)})" if p.needed else ""
                lines.append(f"  DOES NOT FIT: the compiler ran out of the {format_bytes(t.hbm_bytes)} HBM per chip"
                             f"{need}: {p.error}")
        if self.flops_per_step:
            line = (f"FLOPs per step (model formula: 6 x matmul params + causal attention per token; remat "
                    f"recomputation not counted): {self.flops_per_step:.3e}")
            if self.peak_flops:
                ideal = self.flops_per_step / (self.peak_flops * t.chips)
                line += (f"; {ideal:.3g} s per step at 100% MFU ({self.peak_flops / 1e12:.0f} TFLOP/s per chip x "
                         f"{t.chips})")
            lines.append(line)
        lines.append("fits" if self.fits else "DOES NOT FIT")
        return "\n".join(lines)


# ---- the train step ----------------------------------------------------------------------------------------------
def vocab_hint(c) -> int | None:
    """The tokenizer's vocabulary size, which sizes a from-scratch tiny/small model (as `loop.train` does), without
    training or loading anything when the spec says it ("spm:stdlib:VOCAB")."""
    m = c.model
    if c.init_from or m.vocab_size or m.preset not in ("tiny", "small"):
        return None  # the vocabulary comes from the preset or the checkpoint
    spec = c.tokenizer
    if spec.startswith("spm:stdlib"):
        return int(spec.split(":")[2]) if spec.count(":") >= 2 else 4096
    from qcjax.tokenizer import load_tokenizer

    return load_tokenizer(spec).vocab_size


def compile_train(c, topology: str | Topology) -> CompileReport:
    """Compile the loop's train step for `c` (the run's TrainConfig; a ConfigDict is parsed and checked here, once)
    on a TPU slice. Raises loop.ConfigError for a config the loop would reject, CompileUnavailable without
    libtpu."""
    from qcjax.train import metrics as mt
    from qcjax.train.config import from_config
    from qcjax.train.loop import build_train_program, model_config, validate

    c = from_config(c)

    topo = parse_topology(topology) if isinstance(topology, str) else topology
    devices = compile_devices(topo)
    cfg = model_config(c, vocab_hint=vocab_hint(c))
    hosts = len({d.process_index for d in devices})
    mesh = validate(c, cfg, n_processes=hosts, devices=list(devices))
    with jax.set_mesh(mesh):
        prog = build_train_program(c, cfg, mesh)
        args = (prog.abstract_state(), prog.abstract_batch(c), prog.abstract_ref_params(c),
                prog.abstract_base_params())  # LoRA: the frozen base (None without adapters)
        report, _ = compile_program("train step", prog.step_fn, args, None, topo.hbm_bytes)
    programs = [report]
    if c.task == "rl" and report.fits:  # the rollouts: the engine's programs on the train mesh and its params
        programs += rollout_programs(c, cfg, topo, dict(mesh.shape), prog)
    from qcjax.attention import resolve_impl

    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = c.batch_size // prog.grad_accum
    ref = f", DPO reference {c.dpo.reference}" if c.task == "dpo" else ""
    ad = prog.adaptation
    if ad.lora is not None:
        ref += (f", LoRA rank {ad.lora.rank} on {','.join(ad.lora.targets)} over a frozen "
                f"{ad.quant if ad.quant != 'none' else cfg.dtype} base")
    setup = [
        f"model {c.model.preset if not c.init_from else c.init_from}: {cfg.num_layers} layers, hidden "
        f"{cfg.hidden_size}, vocab {cfg.vocab_size}, params {cfg.param_dtype}, compute {cfg.dtype}, remat "
        f"{cfg.remat}, attention {resolve_impl(cfg.attention_impl, 'tpu', cfg.dim_per_head)}",
        f"task {c.task}{ref}: batch {c.batch_size} x {c.seq_len} tokens, grad_accum {prog.grad_accum} "
        f"({micro // dp if micro % dp == 0 else micro / dp} rows per device per micro-batch)",
    ]
    if hosts > 1:
        setup[-1] += f", {hosts} hosts"
    if c.task == "rl":
        setup.append(f"rollouts: {min(c.batch_size, 64)} rows at once of {c.seq_len} tokens ({c.rl.max_new_tokens} "
                     "new), on the train mesh and the train params; each rollout program's total includes the "
                     "optimizer state, resident meanwhile")
    return CompileReport(topology=topo, mesh=dict(mesh.shape), setup=setup, programs=programs,
                         flops_per_step=mt.train_flops_per_step(cfg, c.task, c.batch_size, c.seq_len),
                         peak_flops=mt.peak_flops(devices[0]))


def rollout_programs(c, cfg: ModelConfig, topo: Topology, mesh_shape: dict, prog) -> list:
    """An RL run's rollout programs (qcjax.rl.rollouts: `generate` with min(batch_size, 64) rows at the full row
    width) compiled on the train step's mesh with the train params' dtype (the same arrays: no second copy), each
    report's total raised by the optimizer state's per-chip bytes (it stays on the chips while the engine runs)."""
    import dataclasses as dc

    opt = sum(a.size * a.dtype.itemsize / _shards(a.sharding, a.shape)
              for a in jax.tree.leaves(prog.abstract_state()["opt_state"]))
    rep = compile_sampler(cfg, topo, batch=min(c.batch_size, 64), context=c.seq_len,
                          max_new_tokens=c.rl.max_new_tokens, mesh_shape=mesh_shape, cache_dtype=cfg.dtype)
    out = []
    for r in rep.programs:
        m = r.memory
        if m is not None:
            m = dc.replace(m, arguments=m.arguments + int(opt))
        out.append(dc.replace(r, name="rollout " + r.name, memory=m))
    return out


def _shards(sharding, shape) -> int:
    """How many pieces an array of `shape` is split into by `sharding` (1: replicated)."""
    return max(1, math.prod(shape) // max(1, math.prod(sharding.shard_shape(shape)))) if shape else 1


def predict_train_bytes(cfg: ModelConfig, n_chips: int, rows_per_chip: int, seq_len: int, loss_chunk: int
                        ) -> dict[str, int]:
    """Per-chip HBM of the train step predicted from parameter counts and shapes, for the configs' layout (FSDP
    over every chip, full remat, fp32 params and Adam state, bf16 compute): the figures to check a compile
    against (tests/test_tpu_compile.py) and to reason about a slice by hand.

    state: params + Adam's two moments, 12 bytes/param, sharded (the step's arguments). grads: the step's fp32
    gradient buffers (micro-batch gradient, accumulation carry, update): measured on the 32B step, ~20 bytes per
    scanned-layer param and ~8 per embedding/head param. saved: the residual stream each remat'ed layer keeps for
    the backward pass. Then the larger of two working sets that are live at different times: one layer's backward
    (its weights gathered in the compute dtype plus their fp32 gradient; its activations and their gradients) and
    the loss (the LM head gathered in the compute dtype plus its fp32 gradient, and one chunk's fp32 logits and their
    gradient for about loss_chunk of the chip's own tokens)."""
    from flax import linen as nn

    from qcjax.model import abstract_params

    shapes = nn.meta.unbox(abstract_params(cfg))
    layer_n = sum(x.size for x in jax.tree.leaves(shapes["layers"]))
    other_n = sum(x.size for k, v in shapes.items() if k != "layers" for x in jax.tree.leaves(v))
    pb, cb = jnp.dtype(cfg.param_dtype).itemsize, jnp.dtype(cfg.dtype).itemsize
    e, i, h, kvh, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    tokens = rows_per_chip * seq_len
    out = {
        "state": 3 * pb * (layer_n + other_n) // n_chips,
        "grads": (20 * layer_n + 8 * other_n) // n_chips,
        "saved": cfg.num_layers * tokens * e * cb,
        "layer": layer_n // cfg.num_layers * (cb + 4) + 2 * tokens * (2 * i + h * d + 2 * kvh * d + e) * cb,
        "loss": cfg.vocab_size * e * (cb + 4) + 2 * 4 * cfg.vocab_size * min(loss_chunk, tokens),
    }
    out["total"] = out["state"] + out["grads"] + out["saved"] + max(out["layer"], out["loss"])
    return out


# ---- the sampler ----------------------------------------------------------------------------------------------------
def compile_sampler(cfg: ModelConfig, topology: str | Topology, *, batch: int, context: int, max_new_tokens: int,
                    mesh_shape: dict[str, int] | None = None, cache_dtype: Any = jnp.bfloat16, sampling=None,
                    prefill_chunk: int | None = None, decode_steps: int = 16, page_size: int | None = None,
                    num_pages: int | None = None, max_len: int | None = None, prefill_rows: int | None = None,
                    verify_tokens: int = 0, lora_slots: int = 0, lora_rank: int = 16, quant: str = "none"
                    ) -> CompileReport:
    """Compile the inference engine's programs (qcjax.inference.programs) for `batch` rows of `context` tokens (a
    prompt of context - max_new_tokens) on a TPU slice: one prefill call of `prefill_chunk` tokens per row into a
    page table as wide as the context, and a decode call of `decode_steps` steps over the batch. cfg's dtypes are
    the run's. The page pool holds num_pages pages (default: batch x context tokens, what the rows can fill).
    max_len: the engine's limit per request (default: context); the page tables are as wide as the engine's bucket
    for a context-long row (`engine.table_widths`). prefill_rows: rows of the prefill call (default: batch).
    verify_tokens > 0: also the speculative verify step (each row's newest token and verify_tokens - 1 drafts) and
    the device-side prompt-lookup program (`decode_steps` rounds, drafts of up to verify_tokens - 1 tokens).
    lora_slots > 0: the programs also read a bank of that many LoRA adapters of rank lora_rank on all seven
    projections, each row through its own (qcjax.row_lora: multi-adapter serving), the bank split as the kernels.
    quant ("int8", "nf4"): the seven projections' kernels held quantized (`qcjax.load(quant=)`'s tree).
    mesh_shape None: the serving mesh (`sharding.serving_mesh_shape`: tensor parallel up to the KV heads first)."""
    from flax import linen as nn

    from qcjax import adapters, row_lora
    from qcjax.config import LORA_TARGETS, Adaptation
    from qcjax.inference import engine as E, programs as PR, rows as R
    from qcjax.inference.speculative import Speculation
    from qcjax.sampling import GREEDY
    from qcjax.sharding import logical_to_spec, param_shardings, serving_mesh_shape

    topo = parse_topology(topology) if isinstance(topology, str) else topology
    if batch < 1:
        raise ValueError(f"batch={batch}: must be >= 1")
    if not 1 <= max_new_tokens < context:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be in [1, context={context}): the prompt gets the "
                         "rest of the context")
    ps = page_size or E.DEFAULT_PAGE_SIZE
    chunk = min(prefill_chunk or E.DEFAULT_PREFILL_CHUNK, 1 << (context - max_new_tokens - 1).bit_length())
    need = -(-context // ps)
    width = next(w for w in E.table_widths(-(-(max_len or context) // ps), ps) if w >= need)
    pages = num_pages or batch * need
    prows = prefill_rows or batch
    mesh = topology_mesh(topo, mesh_shape or serving_mesh_shape(cfg, len(compile_devices(topo)), batch))
    kinds = R.kinds_for([sampling or GREEDY], cfg.vocab_size)

    def place(shape, dtype, names=None):
        names = names or ("cache_batch",) + (None,) * (len(shape) - 1)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, logical_to_spec(names, shape, mesh)))

    with jax.set_mesh(mesh):
        boxed = adapters.abstract_params(cfg, Adaptation(quant=quant))
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nn.meta.unbox(boxed), param_shardings(boxed, mesh))
        pool = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), jax.eval_shape(
            lambda: PR.init_pool(cfg, num_pages=pages, page_size=ps, dtype=jnp.dtype(cache_dtype))))
        ctl = jax.tree.map(lambda a: place(a.shape, a.dtype), jax.eval_shape(
            lambda: R.controls([None] * batch, batch, lambda x, names: jnp.asarray(x))))
        row = lambda dtype=jnp.int32, n=batch: place((n,), dtype)  # noqa: E731
        pctl = jax.tree.map(lambda a: place((prows,) + a.shape[1:], a.dtype), ctl)
        lora_p = lora_d = None
        if lora_slots:
            from qcjax.inference.lora import bank_shardings

            shapes = row_lora.bank_shapes(cfg, lora_slots, lora_rank, LORA_TARGETS)
            bank = {t: {k: jax.ShapeDtypeStruct(v, jnp.dtype(cfg.dtype)) for k, v in shapes[t].items()}
                    for t in LORA_TARGETS}
            bank["scale"] = jax.ShapeDtypeStruct(shapes["scale"], jnp.float32)
            bank = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), bank,
                                bank_shardings(cfg, bank, mesh))
            lora_p, lora_d = (bank, row(n=prows)), (bank, row())
        pre, compiled = compile_program(
            f"prefill ({chunk} tokens a row, {width}-page tables)", PR.prefill,
            (cfg, kinds, params, pool, place((prows, chunk), jnp.int32), row(n=prows), row(n=prows),
             place((prows, width), jnp.int32), row(n=prows), pctl, lora_p), None, topo.hbm_bytes)
        programs = [pre]
        if compiled is not None:
            rows = PR.Rows(place((batch, width), jnp.int32), row(), row(), row(), row(jnp.bool_))
            programs.append(compile_program(f"decode ({decode_steps} steps a call)", PR.decode,
                                            (cfg, kinds, params, pool, rows, ctl, lora_d), {"steps": decode_steps},
                                            topo.hbm_bytes)[0])
            if verify_tokens > 0:
                programs.append(compile_program(
                    f"verify ({verify_tokens} tokens a row)", PR.verify,
                    (cfg, kinds, params, pool, place((batch, verify_tokens), jnp.int32), row(), row(),
                     place((batch, width), jnp.int32), row(), ctl, lora_d), None, topo.hbm_bytes)[0])
                spec_rows = PR.SpecRows(place((batch, width), jnp.int32), row(), place((batch, width * ps), jnp.int32),
                                        row(), row(jnp.bool_), row(), row(), row())
                widths = Speculation(k=verify_tokens - 1).round_widths()
                programs.append(compile_program(
                    f"speculate ({decode_steps} rounds of prompt lookup + verify, up to {widths[-1]} tokens a row)",
                    PR.speculate, (cfg, kinds, params, pool, spec_rows, ctl, lora_d),
                    {"rounds": decode_steps, "k": verify_tokens - 1, "ngram": (2, 4), "widths": widths},
                    topo.hbm_bytes)[0])
    held = "" if quant == "none" else f" ({quant} projections)"
    setup = [f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, params "
             f"{cfg.param_dtype}{held}, compute {cfg.dtype}, KV cache {jnp.dtype(cache_dtype).name}",
             f"batch {batch}, context {context} ({max_new_tokens} new tokens), KV pool {pages} pages of {ps} tokens "
             f"({pages * ps} tokens)" + (f", prefill {prows} rows" if prows != batch else "")]
    if lora_slots:
        size = row_lora.bank_bytes(cfg, lora_slots, lora_rank, LORA_TARGETS, cfg.dtype)
        setup.append(f"LoRA bank: {lora_slots} adapters of rank {lora_rank} on all 7 projections "
                     f"({format_bytes(size)} in all, split as the kernels), each row through its own")
    return CompileReport(topology=topo, mesh=dict(mesh.shape), setup=setup, programs=programs)
