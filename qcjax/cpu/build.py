"""Build and load qcjax's C++ CPU kernels (matmul.cc, attention.cc, stacked.cc, lora.cc); register them with XLA:CPU (jax.ffi).

The library is compiled on first use with the system's C++ compiler (`-O3 -march=native`, against jaxlib's FFI
headers) into a cache directory (QCJAX_CACHE, default ~/.cache/qcjax), keyed by the sources, jaxlib's version and
this CPU's flags. Without a compiler, or when the build fails, `available()` is False (one warning says why) and
the platform switch keeps XLA's implementations (qcjax.platform). QCJAX_CPU_KERNELS=0 turns the package off.
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

from qcjax import platform

MATMUL_TARGET = "qcjax_rows_matmul"  # matmul.cc (qcjax/cpu/matmul.py)
ATTENTION_TARGET = "qcjax_causal_attention"  # attention.cc's prompt kernel (qcjax/cpu/attention.py)
CACHE_ATTENTION_TARGET = "qcjax_cache_attention"  # attention.cc's decode-step kernel (qcjax/cpu/attention.py)
STACKED_TARGET = "qcjax_stacked_matmul"  # stacked.cc: one layer of a weight stack, in place (qcjax/cpu/layers.py)
LORA_TARGET = "qcjax_row_lora"  # lora.cc: each row's LoRA adapter from the bank, in place (qcjax/cpu/lora.py)
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = tuple(os.path.join(_HERE, f) for f in ("matmul.cc", "attention.cc", "stacked.cc", "lora.cc"))
_HEADERS = tuple(os.path.join(_HERE, f) for f in ("parallel.h", "simd.h"))  # included: part of the build key
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")


def _cpu_flags() -> str:
    """This CPU's feature list (x86 "flags", Arm "Features"): a -march=native build is only good for its own kind."""
    import platform as host

    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "") + host.machine()
    except OSError:
        return host.processor() + host.machine()


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
    lib = os.path.join(cache, f"cpu-kernels-{march}-{key}.so")
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
    for target, symbol in ((MATMUL_TARGET, lib.QcjaxRowsMatmul), (ATTENTION_TARGET, lib.QcjaxCausalAttention),
                           (CACHE_ATTENTION_TARGET, lib.QcjaxCacheAttention), (STACKED_TARGET, lib.QcjaxStackedMatmul),
                           (LORA_TARGET, lib.QcjaxRowLora)):
        jax.ffi.register_ffi_target(target + suffix, jax.ffi.pycapsule(symbol), platform="cpu")
    return lib, MATMUL_TARGET + suffix


@functools.cache
def _library():
    """The built kernel library registered with XLA:CPU, or None (with one warning saying why)."""
    try:
        lib, _ = _load()
    except Exception as e:  # noqa: BLE001 - any failure means: keep XLA's dot
        warnings.warn(f"qcjax.cpu: the CPU kernels are unavailable, using XLA ({e})")
        return None
    return lib


def available() -> bool:
    """Whether the kernels are switched on (QCJAX_CPU_KERNELS, read now) and built and registered with XLA:CPU
    (built on the first call)."""
    return platform.enabled("cpu") and _library() is not None


def amx_bf16() -> bool:
    """Whether bf16 runs on AMX tiles here (built with them, and Linux granted this process the tile state)."""
    lib = _library()
    return lib is not None and bool(lib.QcjaxAmxBf16())
