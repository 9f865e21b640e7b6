"""The platform switch (qcjax.platform): one table of (platform, operation) -> implementation, plugins registered on
first use and read at trace time, and the process-wide choices made before JAX starts."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from qcjax import platform


def test_auto_takes_the_table_and_explicit_names_pass_through():
    assert platform.choose("attention", "auto", "tpu") == "pallas_tpu"
    assert platform.choose("attention", "auto", "gpu") == "pallas_gpu"
    assert platform.choose("cache_write", "auto", "tpu") == "xla"  # not in the table: the core's XLA form
    assert platform.choose("attention", "cudnn", "cpu") == "cudnn"


def test_a_plugin_switched_off_falls_back_to_xla_when_the_program_is_built(monkeypatch):
    monkeypatch.setenv("QCJAX_CPU_KERNELS", "0")
    for op in platform.OPS:
        assert platform.choose(op, "auto", "cpu") == "xla"
    assert platform.plugin("matmul", "cpu") is None
    monkeypatch.setenv("QCJAX_CPU_KERNELS", "1")  # not frozen: the next build sees the change
    assert platform.plugin("cache_write", "cpu") is not None


def test_dispatch_runs_the_registered_implementation_only_where_it_applies(monkeypatch):
    calls = []
    impl = platform.Impl(lambda x: calls.append("plugin") or x + 1, applies=lambda x: x.shape[0] < 4)
    monkeypatch.setitem(platform._REGISTRY, ("matmul", "cpu"), impl)
    monkeypatch.setenv("QCJAX_CPU_KERNELS", "1")
    xla = lambda x: x - 1  # noqa: E731
    assert platform.dispatch("matmul", xla, jnp.zeros(2)).tolist() == [1, 1]
    assert platform.dispatch("matmul", xla, jnp.zeros(5)).tolist() == [-1] * 5
    monkeypatch.setattr(platform, "target_device", lambda: ("tpu", "TPU v5 lite"))  # e.g. an AOT compile for TPU
    assert platform.dispatch("matmul", xla, jnp.zeros(2)).tolist() == [-1, -1]  # no CPU plugin there
    assert calls == ["plugin"]


def test_register_refuses_an_unknown_operation():
    with pytest.raises(ValueError, match="unknown operation 'conv'.*attention"):
        platform.register("conv", "cpu", platform.Impl(lambda: None))


def test_configure_xla_sets_the_dtypes_cpu_flags_before_jax_starts_and_never_after():
    code = ("from qcjax import platform; import os; print(platform.configure_xla('bfloat16')); "
            "print(os.environ['XLA_FLAGS'])")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [str(platform.CPU_XLA_FLAGS["bfloat16"]),
                                "--xla_force_host_platform_device_count=2 " + platform.CPU_XLA_FLAGS["bfloat16"][0]]
    jax.devices()  # this process's backends are up: a call now changes nothing
    assert platform.configure_xla("bfloat16") == ()


def test_quiet_libtpu_fills_in_libtpus_lookups_only_without_tpu_device_files(monkeypatch):
    for var in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(platform, "_tpu_device_files", lambda: True)
    platform.quiet_libtpu()
    assert "TPU_ACCELERATOR_TYPE" not in os.environ  # a TPU host: libtpu looks things up itself
    monkeypatch.setattr(platform, "_tpu_device_files", lambda: False)
    platform.quiet_libtpu()
    assert os.environ["TPU_WORKER_HOSTNAMES"] == "localhost"


def test_jax_starts_quietly_after_quiet_libtpu():
    # what every CLI does first: with libtpu installed and no TPU here, JAX's start-up printed five error-looking
    # lines ("E0000 ... unexpected worker hostname", a "Source Location Trace") on every CPU command
    code = "from qcjax import platform; platform.quiet_libtpu(); import jax; print(jax.devices()[0].platform)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "JAX_PLATFORMS"))}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "cpu"
    assert "E0000" not in r.stderr and "Source Location" not in r.stderr, r.stderr
