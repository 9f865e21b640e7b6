"""The CPU decode matmul: a few rows against a weight stored [out, in], as a C++ kernel called through jax.ffi.

Decoding reads every weight once per step for a handful of rows; the cost should be that read. XLA:CPU's GEMMs at
1-8 rows fall short of it (fp32 at 8 rows ~12-13 GB/s, bf16 at 1 row ~1.3 GB/s, on a machine that reads ~25 GB/s;
bench/RESULTS.md), so on the CPU the sampler's projections and head go through `cpu_matmul.cc` instead: each weight
row is read once, multiplied into every input row while in cache, and the rows are shared over XLA's threads.

The kernel is compiled on first use with the system's C++ compiler (`-O3 -march=native`, against jaxlib's FFI
headers) into a cache directory (QCJAX_CACHE, default ~/.cache/qcjax), keyed by the source, jaxlib's version and
this CPU's flags. Without a compiler, or when the build fails, `available()` is False (one warning says why) and
every caller keeps XLA's dot. QCJAX_CPU_MATMUL=0 turns the kernel off. The same library holds the CPU prompt-
attention kernel (`cpu_attention.cc`, qcjax.attention.cpu), which follows `available()` too.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp

TARGET = "qcjax_rows_matmul"
# Above this the rows are a prompt's GEMM, which XLA's kernels run well; the kernel is for decode steps. (bf16
# prompts through the AMX tiles measured slower end to end: 0.5B prefill 1x512 433 vs 686 tok/s, bench/RESULTS.md.)
MAX_ROWS = 8
ATTENTION_TARGET = "qcjax_causal_attention"  # qcjax/attention/cpu.py's kernel, built into the same library
CACHE_ATTENTION_TARGET = "qcjax_cache_attention"  # qcjax/attention/cpu.py's decode-step kernel, same library
CACHE_WRITE_TARGET = "qcjax_cache_write"  # the sampler's in-place cache write (qcjax.model.write_cache), same library
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = (os.path.join(_HERE, "cpu_matmul.cc"), os.path.join(_HERE, "cpu_attention.cc"))
_HEADERS = (os.path.join(_HERE, "cpu_parallel.h"),)  # included by the sources: part of the build key
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")


def _cpu_flags() -> str:
    """This CPU's feature list (x86 "flags", Arm "Features"): a -march=native build is only good for its own kind."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "") + platform.machine()
    except OSError:
        return platform.processor() + platform.machine()


def _build(march: str = "native") -> str:
    """Path of the compiled library, building it when this source/jaxlib/CPU/-march has none yet (temp file, then
    rename). Other `march` values than native build the code paths this CPU's own build leaves out (tests)."""
    import jaxlib

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++, c++ or clang++; or set CXX)")
    sources = []
    for path in (*_SOURCES, *_HEADERS):
        with open(path, "rb") as f:
            sources.append(f.read())
    key = hashlib.sha256(b"\0".join([*sources, jaxlib.__version__.encode(), _cpu_flags().encode(), cxx.encode(),
                                     " ".join(_FLAGS).encode(), march.encode()])).hexdigest()[:16]
    cache = os.path.expanduser(os.environ.get("QCJAX_CACHE", "~/.cache/qcjax"))
    lib = os.path.join(cache, f"cpu_matmul-{march}-{key}.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, f"-march={march}", "-I", jax.ffi.include_dir(), *_SOURCES, "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp makes it 0600: a cache shared between users could not load it
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


@functools.cache
def _load(march: str = "native") -> tuple[ctypes.CDLL, str]:
    """The library built for `march`, registered with XLA:CPU; and its matmul's FFI target name (TARGET for native;
    other builds' targets carry the march, e.g. qcjax_rows_matmul_x86-64-v3, qcjax_causal_attention_x86-64-v3)."""
    lib = ctypes.cdll.LoadLibrary(_build(march))
    suffix = "" if march == "native" else f"_{march}"
    for target, symbol in ((TARGET, lib.QcjaxRowsMatmul), (ATTENTION_TARGET, lib.QcjaxCausalAttention),
                           (CACHE_ATTENTION_TARGET, lib.QcjaxCacheAttention),
                           (CACHE_WRITE_TARGET, lib.QcjaxCacheWrite)):
        jax.ffi.register_ffi_target(target + suffix, jax.ffi.pycapsule(symbol), platform="cpu")
    return lib, TARGET + suffix


@functools.cache
def _library():
    """The built kernel library registered with XLA:CPU, or None (with one warning saying why)."""
    if os.environ.get("QCJAX_CPU_MATMUL", "1") == "0":
        return None
    try:
        lib, _ = _load()
    except Exception as e:  # noqa: BLE001 - any failure means: keep XLA's dot
        warnings.warn(f"qcjax.cpu_matmul: the CPU decode kernel is unavailable, using XLA's dot ({e})")
        return None
    return lib


def available() -> bool:
    """Whether the kernel is built and registered with XLA:CPU (built on the first call)."""
    return _library() is not None


def amx_bf16() -> bool:
    """Whether bf16 runs on AMX tiles here (built with them, and Linux granted this process the tile state)."""
    lib = _library()
    return lib is not None and bool(lib.QcjaxAmxBf16())


def one_cpu() -> bool:
    """Whether the program being traced runs on one CPU device: compiled for the CPU (the current mesh's devices,
    else the default backend's) and under no multi-device mesh."""
    from qcjax.attention import target_device

    mesh = jax.sharding.get_abstract_mesh()
    return target_device()[0] == "cpu" and (mesh.empty or mesh.size == 1)


def applies(rows: int, dtype) -> bool:
    """Whether a matmul of `rows` input rows in `dtype` goes through the kernel: on one CPU device (the kernel is
    one device's custom call; sharded matmuls stay with XLA, which partitions them), at most MAX_ROWS rows, float32
    or bfloat16."""
    return (0 < rows <= MAX_ROWS and jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
            and one_cpu() and available())


@jax.custom_vjp
def rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] . w [N, K]^T -> float32 [M, N]: both float32 or both bfloat16, float32 accumulation. Differentiable
    (the backward is XLA's dots), so a model applied on the CPU to a few tokens can still be differentiated."""
    if (x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or x.dtype != w.dtype
            or jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))):
        raise ValueError(f"rows_matmul: x {x.shape} {x.dtype} and w {w.shape} {w.dtype}: expected [M, K] and "
                         f"[N, K] of one dtype, float32 or bfloat16")
    if _library() is None:
        raise RuntimeError("rows_matmul: the CPU kernel is unavailable (see the warning); check available() first")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, w)


def _rows_matmul_fwd(x, w):
    return rows_matmul(x, w), (x, w)


def _rows_matmul_bwd(res, g):  # g [M, N] float32, kept so: autodiff of XLA's mixed-precision dot does the same
    x, w = res
    dx = jax.lax.dot_general(g, w.astype(jnp.float32), (((1,), (0,)), ((), ())))
    dw = jax.lax.dot_general(g, x.astype(jnp.float32), (((0,), (0,)), ((), ())))
    return dx.astype(x.dtype), dw.astype(w.dtype)


rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)
