"""qcjax's CPU kernels: an optional package the core never imports. The platform switch (qcjax.platform) imports it
the first time a program for the CPU is built and this module registers its implementations there:

- "attention" -> "cpu": the C++ prompt and decode-step attention kernels (qcjax.cpu.attention)
- "matmul" -> "cpu": the few-row decode matmul the tied head takes (qcjax.cpu.matmul)
- "layers" -> "cpu": decode steps' layer loop, each projection reading its layer of the stacked weights in place
  (qcjax.cpu.layers, stacked.cc)
- "lora" -> "cpu": each row's LoRA adapter read in place from the bank, for decode steps (qcjax.cpu.lora, lora.cc)
- "cache_write" -> "cpu": the KV cache scattered as uint16 bits for 16-bit caches (qcjax.cpu.cache; plain XLA)

The C++ sources (matmul.cc, attention.cc, stacked.cc, lora.cc, parallel.h, simd.h) are built on first use with the system's compiler
(qcjax.cpu.build). Without a compiler, on a CPU the build fails for, or with QCJAX_CPU_KERNELS=0, the kernels are
unavailable and every operation runs as the core's XLA implementation. Tests: tests/cpu/.
"""
from __future__ import annotations

from qcjax import platform
from qcjax.cpu import attention, build, cache, layers, lora, matmul

platform.register("attention", "cpu", platform.Impl(attention.attend, available=build.available))
platform.register("matmul", "cpu", platform.Impl(matmul.rows_matmul, applies=matmul.applies,
                                                 available=build.available))
platform.register("layers", "cpu", platform.Impl(layers.decoder_layers, applies=layers.applies,
                                                 available=build.available))
platform.register("lora", "cpu", platform.Impl(lora.row_lora, applies=lora.applies, available=build.available))
platform.register("cache_write", "cpu", platform.Impl(cache.write_cache_bits, applies=cache.applies,
                                                      available=lambda: platform.enabled("cpu")))

__all__ = ["attention", "build", "cache", "layers", "lora", "matmul"]
