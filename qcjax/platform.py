"""The one platform switch: which implementation runs each operation on each platform.

The model, the sampler and the train step name an operation; this module picks its implementation for the
platform the program is compiled for (the current mesh's devices, which is how ahead-of-time TPU compiles on a CPU
host see a TPU; else the default backend's). Nothing else in the core asks which platform it is on.

    operation     "xla" (the core's own, every platform)   picked by "auto"
    attention     plain jnp (qcjax.attention.xla)           TPU: "pallas_tpu" (splash + our Mosaic decode kernel)
                                                            GPU: "pallas_gpu" (our Triton kernels)
                                                            CPU: "cpu" (qcjax.cpu's C++ kernels), else "xla"
                  also by name: "cudnn" (GPU; cuDNN flash attention, our Triton decode kernel)
    cache_write   one scatter into the stacked cache        CPU: "cpu" (16-bit caches scattered as uint16 bits)
    matmul        XLA's dot (the tied head, [out, in])      CPU: "cpu" (qcjax.cpu's few-row C++ kernel)
    layers        the model's layer scan (Qwen2.hidden_states) CPU: "cpu" (decode steps: a loop reading each layer's
                                                            weights in place from the stacks, qcjax.cpu.layers)
    lora          per-row adapters: gathered rows, XLA's dots    CPU: "cpu" (decode steps: each row's adapter read in
                  (qcjax.row_lora)                          place from the bank, qcjax.cpu.lora)

Implementations other than the core's come from optional packages (`PLUGINS`: today `qcjax.cpu`), imported the
first time a program for their platform is built and registered here (`register`); the core never imports them.
A plugin implementation also says where it applies (one CPU device, the shapes and dtypes its kernel takes); where
it does not, the core's XLA implementation runs. `QCJAX_CPU_KERNELS=0` turns the CPU package off: read each time a
program is traced (a program jax already compiled in this process keeps what it was built with; `jax.clear_caches()`
drops them).

Process-wide choices made before JAX starts (XLA flags for the CPU, a quiet libtpu on hosts without TPUs), the
batch padding the CPU wants, the dtype it wants adapters in and the verify widths device-side speculation picks
from also live here: `configure_xla`, `quiet_libtpu`, `min_batch`, `adapter_dtype`, `round_widths`.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

OPS = ("attention", "cache_write", "matmul", "layers", "lora")
ATTENTION_IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu", "cudnn", "cpu")  # ModelConfig.attention_impl

# (platform, operation) -> the implementation "auto" picks; absent: "xla".
AUTO: dict[tuple[str, str], str] = {
    ("tpu", "attention"): "pallas_tpu",
    ("gpu", "attention"): "pallas_gpu", ("cuda", "attention"): "pallas_gpu", ("rocm", "attention"): "pallas_gpu",
    ("cpu", "attention"): "cpu",
    ("cpu", "cache_write"): "cpu",
    ("cpu", "matmul"): "cpu",
    ("cpu", "layers"): "cpu",
    ("cpu", "lora"): "cpu",
}
# The platforms an implementation compiles for (Pallas kernels also run anywhere in interpret mode, for tests).
NEEDS: dict[str, tuple[str, ...]] = {
    "pallas_tpu": ("tpu",), "pallas_gpu": ("gpu", "cuda", "rocm"), "cudnn": ("gpu", "cuda"), "cpu": ("cpu",),
}
# Optional packages providing implementations: the implementation name -> the module that registers it.
PLUGINS = {"cpu": "qcjax.cpu"}
_SWITCHES = {"cpu": "QCJAX_CPU_KERNELS"}  # environment variable that turns a plugin off ("0")


@dataclasses.dataclass(frozen=True)
class Impl:
    """A registered implementation: `fn` runs the operation; `applies(*args)` says whether it takes these arguments
    (else the core's XLA implementation runs); `available()` whether it can run in this process at all (built)."""

    fn: Callable[..., Any]
    applies: Callable[..., bool] = lambda *a, **k: True
    available: Callable[[], bool] = lambda: True


_REGISTRY: dict[tuple[str, str], Impl] = {}


def register(op: str, name: str, impl: Impl) -> None:
    """Register `impl` as operation `op`'s implementation `name` (called by the plugin packages on import)."""
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}; the operations are {OPS}")
    _REGISTRY[(op, name)] = impl


def target_device() -> tuple[str, str]:
    """(platform, device_kind) the program being built is compiled for: the current mesh's devices, else the
    default backend's."""
    dev = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if dev is not None:
        return dev.platform, dev.device_kind
    d = jax.devices()[0]
    return d.platform, d.device_kind


def enabled(name: str) -> bool:
    """Whether plugin implementation `name` is switched on (its environment variable is not "0"), read now."""
    switch = _SWITCHES.get(name)
    return switch is None or os.environ.get(switch, "1") != "0"


def plugin(op: str, name: str) -> Impl | None:
    """The registered implementation `name` of `op` if its package is switched on, imports and is available."""
    if name not in PLUGINS or not enabled(name):
        return None
    if (op, name) not in _REGISTRY:
        try:
            importlib.import_module(PLUGINS[name])
        except ImportError:
            return None
    impl = _REGISTRY.get((op, name))
    return impl if impl is not None and impl.available() else None


def choose(op: str, impl: str = "auto", platform: str | None = None) -> str:
    """The implementation name `impl` means for `op` on `platform` (default: the target platform's): "auto" takes the
    table's pick, falling back to "xla" where that pick's plugin is off or missing."""
    if impl != "auto":
        return impl
    name = AUTO.get((platform or target_device()[0], op), "xla")
    if name in PLUGINS and plugin(op, name) is None:
        return "xla"
    return name


def dispatch(op: str, xla: Callable[..., Any], *args: Any) -> Any:
    """Run `op` on `args` with the target platform's implementation where it applies, else with `xla` (the core's)."""
    impl = plugin(op, AUTO.get((target_device()[0], op), "xla"))  # None for the core's own and for plugins off
    if impl is not None and impl.applies(*args):
        return impl.fn(*args)
    return xla(*args)


def one_device() -> bool:
    """Whether the program being built runs on one device (no multi-device mesh): custom calls that are one
    device's kernels apply only then; XLA partitions everything else over the mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


# ---- process-wide and host-side choices -------------------------------------------------------------------------------
# XLA:CPU flags for decoding, chosen with bench/decode.py (the figures: docs/sampling.md, "The CPU path").
# Process-wide, so applied only by the CLIs (infer.py, the server, the evaluation, bench/decode.py), only when the
# process runs on the CPU, and only for the dtype they help.
CPU_XLA_FLAGS: dict[str, tuple[str, ...]] = {
    # XLA hoists loop-invariant work out of the decode while_loop, which slows each bf16 step; fp32 gains nothing
    # from turning it off, so it stays on there.
    "bfloat16": ("--xla_disable_hlo_passes=while-loop-invariant-code-motion",),
    "float32": (),
}


def configure_xla(dtype: str, flags: Sequence[str] | None = None) -> tuple[str, ...]:
    """Add the CPU flags for compute `dtype` (or `flags`) to XLA_FLAGS when this process will run on the CPU:
    JAX_PLATFORMS=cpu, or unset with no GPU/TPU device files. XLA reads the flags when JAX initializes its
    backends: called later (JAX already running, e.g. in tests) it changes nothing. Returns the flags applied."""
    from jax._src import xla_bridge

    flags = tuple(CPU_XLA_FLAGS.get(str(jnp.dtype(dtype)), ()) if flags is None else flags)
    platforms = os.environ.get("JAX_PLATFORMS", "")
    accel = _tpu_device_files() or os.path.exists("/dev/nvidia0")
    if not flags or not (platforms == "cpu" or (not platforms and not accel)) or xla_bridge.backends_are_initialized():
        return ()
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
    return flags


def _tpu_device_files() -> bool:
    """Whether this host has TPU device files (/dev/accel* on v2-v4, /dev/vfio/<group> on v5e and later)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_libtpu(cpu_only: bool = False) -> None:
    """On a host without TPUs, tell libtpu (installed for the TPU compiles) what it would otherwise look up and
    print five error-looking lines about at start-up ("could not determine TPU accelerator type / worker hostnames",
    a "Source Location Trace"): the CLIs call this first. cpu_only (the --compile_only CLIs, which run nothing): JAX
    does not even try to start a TPU backend. Changes nothing on a TPU host. Call before JAX starts its backends."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes on this host may hold libtpu too
    if _tpu_device_files():
        return
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if cpu_only and not os.environ.get("JAX_PLATFORMS"):
        from jax._src import xla_bridge

        if not xla_bridge.backends_are_initialized():
            jax.config.update("jax_platforms", "cpu")


def min_batch(dtype: Any) -> int:
    """Rows the sampler pads a batch to. On the CPU without its kernels, bf16 decode at batch 1 takes a path where
    XLA converts every weight to fp32 on each call; from 2 rows the bf16 x bf16 -> fp32 kernel reads bf16 weights
    directly, an order of magnitude faster (docs/sampling.md). The CPU kernels' decode layers read bf16 at one row."""
    if jax.default_backend() != "cpu" or jnp.dtype(dtype) != jnp.bfloat16:
        return 1
    return 1 if plugin("layers", "cpu") is not None else 2


def adapter_dtype(dtype: Any) -> Any:
    """The dtype a bank of LoRA adapters served per row (qcjax.row_lora) is held in, for compute dtype `dtype`: the
    compute dtype on TPUs and GPUs; float32 on the CPU, where XLA gathers each row's bf16 adapter and widens it for
    its float32 dots an order of magnitude slower than it gathers float32 ones (157 vs 12 ms per 24-layer decode
    step of the 0.5B, 8 rows over 16 rank-16 adapters, without the CPU kernels; with them decode steps read either
    dtype in place at the same speed, and prompts, which keep XLA's gathers, were 5% vs 18% slower than the merged
    model with float32 vs bfloat16 banks)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.dtype(dtype)


def round_widths(widths: Sequence[int]) -> tuple[int, ...]:
    """The forward widths (tokens a row) a round of device-side speculative decoding (qcjax.inference.programs.
    speculate) picks from, for the platform the program is built for. On the CPU a forward costs by the tokens it
    computes, so each round runs as wide as its drafts: every width. On TPUs and GPUs a forward costs its weight
    reads whatever its width (a verify step of 8 tokens reads 1.00-1.04x a decode step's bytes, AOT cost analysis),
    and a choice between widths inside the loop made XLA:TPU copy a page-pool array every round (AOT, the 0.5B's
    shapes on v5e-1: 20 MiB of temporaries against 1 MiB with one width): the widest only."""
    return tuple(widths) if target_device()[0] == "cpu" else (max(widths),)


def accelerator() -> bool:
    """Whether this process runs on TPUs or GPUs (the CLIs then default to a serving mesh over them)."""
    return jax.default_backend() != "cpu"
