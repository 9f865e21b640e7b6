"""Ahead-of-time compiles for TPU slices on this CPU host (qcjax.tpu_compile, `--compile_only` of train.py and
infer.py): the loop's own train step and the inference engine's prefill/decode compile for real TPU topologies, per-chip
memory is checked against HBM (and against a prediction from parameter counts), and a step that does not fit, or a
host without libtpu, is a clear error."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from qcjax import tpu_compile as T
from qcjax.config import get_config
from qcjax.model import count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(not T.has_libtpu(), reason=f"libtpu not installed ({T.LIBTPU_HINT})")


def load_config(name: str, stage: str = "file"):
    sys.path.insert(0, ROOT)
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(stage)


def cli(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")} | (env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


# ---- slice names (no libtpu needed) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, grid, chips, wrap, slices", [
    ("v5p-8", (2, 2, 1), 4, False, 1),
    ("v5p-128", (4, 4, 4), 64, True, 1),
    ("v5p-256", (4, 4, 8), 128, True, 1),
    ("v4-32", (2, 2, 4), 16, False, 1),
    ("v5e-4", (2, 2), 4, False, 1),
    ("v5e-8", (2, 4), 8, False, 1),
    ("v6e-256", (16, 16), 256, True, 1),
    ("v6e-1", (1, 1), 1, False, 1),
    ("2xv5p-128", (4, 4, 4), 128, True, 2),
    ("v5p:4x4x12", (4, 4, 12), 192, True, 1),
])
def test_slice_names_are_cloud_tpu_topologies(name, grid, chips, wrap, slices):
    t = T.parse_topology(name)
    assert (t.grid, t.chips, t.wrap[0], t.slices) == (grid, chips, wrap, slices)


@pytest.mark.parametrize("name, message", [
    ("v5p-12", "counts TensorCores"),
    ("v5e-3", "not a power-of-two"),
    ("v7-8", r"expected \[SLICESx\]GEN-N"),
    ("v5e:4x4x4", "needs a 2D chip grid"),
])
def test_bad_slice_names_are_clear_errors(name, message):
    with pytest.raises(T.TopologyError, match=message):
        T.parse_topology(name)


def test_per_device_batch_sets_grad_accumulation_for_any_slice():
    from qcjax.sharding import make_mesh
    from qcjax.train.config import from_config
    from qcjax.train.loop import ConfigError, grad_accum_for

    c = load_config("tiny")
    c.batch_size, c.per_device_batch = 64, 2
    assert grad_accum_for(from_config(c), make_mesh({"fsdp": 8})) == 4
    assert grad_accum_for(from_config(c), make_mesh({"fsdp": 4}, devices=jax.devices()[:4])) == 8
    c.batch_size = 24
    with pytest.raises(ConfigError, match=r"batch_size=24 is not divisible by per_device_batch=2 x .* = 8"):
        grad_accum_for(from_config(c), make_mesh({"fsdp": 8}))
    c.batch_size, c.grad_accum = 64, 4
    with pytest.raises(ConfigError, match="both set"):  # the config's own check: at parse time
        from_config(c)


def test_abstract_batch_is_what_the_pipeline_yields(tmp_path):
    """The compiled step takes exactly the arrays the data pipeline makes (keys, shapes, dtypes)."""
    from qcjax.data import DataConfig, SourceConfig, make_iterator
    from qcjax.data.pipeline import batch_shapes
    from test_data_common import code_docs, qwen_tok, write_jsonl

    tok = qwen_tok()
    lm = DataConfig(sources=(SourceConfig("jsonl", write_jsonl(tmp_path / "c.jsonl", code_docs(8))),),
                    read_threads=0, eval_fraction=0.0)
    pairs = [{"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}", "ref_chosen_logp": -1.0,
              "ref_rejected_logp": -2.0} for i in range(4)]
    dpo = DataConfig(sources=(SourceConfig("jsonl", write_jsonl(tmp_path / "d.jsonl", pairs), format="dpo"),),
                     read_threads=0, eval_fraction=0.0, dpo_ref_logps=True)
    for task, cfg in (("pretrain", lm), ("dpo", dpo)):  # SFT rows are pretrain rows with another loss mask
        batch = next(make_iterator(task, cfg, tok, 64, 2))
        got = {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()}
        assert got == batch_shapes(task, 2, 64, ref_logps=cfg.dpo_ref_logps)


def test_size_configs_use_the_settings_docs_tpu_memory_found():
    """configs/SIZE.py's per-stage remat and rows per device are the ones the generated table verified."""
    import re

    text = open(os.path.join(ROOT, "docs", "tpu-memory.md"), encoding="utf-8").read()
    section = text.split("## The configs' defaults", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([\d.]+b) \| (\w+) \| (\w+) \| (\d+) \|", section, re.M)
    assert len(rows) == 24, rows  # 6 sizes x 4 stages
    for size, stage, remat, per_device in rows:
        c = load_config(size, stage)
        assert (c.model.remat, c.per_device_batch) == (remat, int(per_device)), (size, stage)


# ---- compiles -------------------------------------------------------------------------------------------------------
@needs_libtpu
def test_tiny_train_step_compiles_for_a_4_chip_slice():
    out = cli("train.py", "--config=configs/tiny.py", "--compile_only", "--topology=v5e-4")
    assert out.returncode == 0, out.stderr
    assert "v5e-4: 4 chips (TPU v5 lite" in out.stdout and "mesh data=1 fsdp=4 context=1 tensor=1" in out.stdout
    assert "train step: lowered in" in out.stdout and out.stdout.rstrip().endswith("fits")
    assert "could not determine TPU" not in out.stderr  # libtpu's start-up noise is silenced


@needs_libtpu
def test_tiny_train_step_compiles_for_two_slices_with_data_parallelism_over_dcn():
    out = cli("train.py", "--config=configs/tiny.py", "--compile_only", "--topology=2xv5e-4", "--config.mesh.data=2")
    assert out.returncode == 0, out.stderr
    assert "2 slices" in out.stdout and "mesh data=2 fsdp=4 context=1 tensor=1" in out.stdout, out.stdout
    assert out.stdout.rstrip().endswith("fits")


@needs_libtpu
def test_tiny_qlora_train_step_compiles_with_the_frozen_base_as_an_argument():
    out = cli("train.py", "--config=configs/tiny.py", "--compile_only", "--topology=v5e-4", "--config.lora.rank=4",
              "--config.lora.base_quant=int8")
    assert out.returncode == 0, out.stderr
    assert "LoRA rank 4 on q,k,v,o,gate,up,down over a frozen int8 base" in out.stdout, out.stdout
    assert out.stdout.rstrip().endswith("fits")


@needs_libtpu
@pytest.mark.slow
def test_a_size_config_fits_the_slice_docs_tpu_memory_names_with_its_memory():
    """configs/0.5b.py as shipped (full depth) compiled for v6e-1: fits, with the per-chip total the table records."""
    import re

    text = open(os.path.join(ROOT, "docs", "tpu-memory.md"), encoding="utf-8").read()
    [documented] = re.findall(r"^\| 0\.5b \| file \| v6e-1 \|(?:[^|]*\|){5} ([\d.]+) \|", text, re.M)
    out = cli("train.py", "--config=configs/0.5b.py", "--compile_only", "--topology=v6e-1")
    assert out.returncode == 0, out.stderr
    [total] = re.findall(r"total ([\d.]+) GiB of 31.25 GiB HBM per chip", out.stdout)
    assert abs(float(total) - float(documented)) <= 0.05, (total, documented)


@needs_libtpu
def test_tiny_sampler_prefill_and_decode_compile_for_a_4_chip_slice():
    out = cli("infer.py", "--config", "tiny", "--compile_only", "--topology", "v5p-8", "--batch", "4", "--context",
              "512", "--max_new_tokens", "64", "--temperature", "0.7", "--top_p", "0.9")
    assert out.returncode == 0, out.stderr
    assert "prefill (512 tokens a row, 32-page tables): lowered" in out.stdout
    assert "decode (16 steps a call): lowered" in out.stdout
    assert "batch 4, context 512 (64 new tokens), KV pool 128 pages of 16 tokens" in out.stdout
    assert out.stdout.rstrip().endswith("fits")


@needs_libtpu
@pytest.mark.parametrize("batch", [1, pytest.param(4, marks=pytest.mark.slow)])  # not slow: one batch size
def test_decode_on_tpu_keeps_the_cache_in_one_layout(batch):
    # The 0.5B's attention shapes (2 KV heads x 64). With the cache's heads as two minor dims XLA:TPU laid the
    # program's cache argument out with the length minor-most and copied the whole cache into the per-layer write's
    # layout at every decode call: temporaries 2-4x the cache (181.6 MiB at batch 1 over a 48 MiB cache). The merged
    # [.., kv_heads * head_dim] cache keeps one layout: temporaries under 1 MiB.
    cfg = get_config("0.5b").replace(num_layers=4, vocab_size=4096, param_dtype="bfloat16", dtype="bfloat16")
    report = T.compile_sampler(cfg, "v5e-1", batch=batch, context=16384, max_new_tokens=256, decode_steps=1,
                               verify_tokens=8)
    _, decode, verify, speculate = report.programs
    cache = 2 * cfg.num_layers * batch * 16384 * cfg.num_kv_heads * cfg.dim_per_head * 2  # k and v, bf16
    assert decode.name.startswith("decode") and decode.memory.temporaries < 0.05 * cache, decode.memory
    # device-side prompt lookup (a round: lookup + one verify forward) copies no cache either and reads about a
    # decode step's bytes (on TPUs one width, the widest: a choice of widths inside the loop copied a pool array)
    assert speculate.name.startswith("speculate") and speculate.memory.temporaries < 0.05 * cache, speculate.memory
    assert speculate.bytes_accessed < 1.15 * decode.bytes_accessed
    # speculative decoding's verify step (8 tokens a row) reads about what one decode step reads: on a memory-bound
    # TPU its cost is one forward, whatever the draft length (7B on v5e-8, 0.5B on v5e-1: 1.00-1.04x; RESULTS.md)
    assert verify.name.startswith("verify") and verify.bytes_accessed < 1.15 * decode.bytes_accessed


@needs_libtpu
def test_a_prompt_longer_than_the_prefill_chunk_compiles_a_chunk_of_it():
    out = cli("infer.py", "--config", "tiny", "--compile_only", "--topology", "v5e-4", "--batch", "1", "--context",
              "2048", "--max_new_tokens", "64", "--prefill_chunk", "512")
    assert out.returncode == 0, out.stderr
    assert "prefill (512 tokens a row, 128-page tables): lowered" in out.stdout
    assert "decode (16 steps a call): lowered" in out.stdout


@needs_libtpu
def test_a_lora_bank_compiles_into_the_serving_programs_on_tpu():
    """infer.py --compile_only --lora_slots 4: the programs take a bank of 4 rank-8 adapters on every projection, each
    row through its own (multi-adapter serving); its bytes show in the arguments, and it fits."""
    out = cli("infer.py", "--config", "tiny", "--compile_only", "--topology", "v5e-4", "--batch", "2", "--context",
              "512", "--max_new_tokens", "64", "--lora_slots", "4", "--lora_rank", "8")
    assert out.returncode == 0, out.stderr
    assert "LoRA bank: 4 adapters of rank 8 on all 7 projections" in out.stdout
    assert out.stdout.rstrip().endswith("fits")


@needs_libtpu
def test_oversized_per_chip_batch_is_reported_as_not_fitting():
    out = cli("train.py", "--config=configs/tiny.py", "--compile_only", "--topology=v5e-4",
              "--config.batch_size=16384", "--config.per_device_batch=4096")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "DOES NOT FIT" in out.stdout and "15.75 GiB HBM per chip" in out.stdout
    assert "does not fit in the HBM of v5e-4" in out.stderr and "per_device_batch" in out.stderr


@needs_libtpu
@pytest.mark.slow
def test_32b_train_step_compiles_for_v5p_128_and_memory_matches_parameter_counts():
    """Few layers (compile time does not depend on depth: the layers are scanned). The arguments are the sharded
    fp32 params + Adam moments to within 1%; the total is the parameter-count prediction to within 20%."""
    from qcjax.train.metrics import train_flops_per_step

    c = load_config("32b")
    c.model.num_layers, c.per_device_batch = 4, 1
    report = T.compile_train(c, "v5p-128")
    [prog] = report.programs
    m = prog.memory
    assert report.fits and m is not None, report.format()
    assert "attention pallas_tpu" in report.format() and "grad_accum 4" in report.format()
    cfg = get_config("32b", num_layers=4, remat="full", dtype="bfloat16")
    n, chips = count_params(cfg), 64
    batch_bytes = 4 * 4 * c.batch_size * c.seq_len // chips  # tokens, positions, segment ids, loss mask
    assert m.arguments == pytest.approx(12 * n / chips + batch_bytes, rel=0.01)
    assert m.aliased == pytest.approx(12 * n / chips, rel=0.01)  # the donated state is updated in place
    pred = T.predict_train_bytes(cfg, chips, rows_per_chip=1, seq_len=c.seq_len, loss_chunk=c.loss_chunk)
    assert m.total == pytest.approx(pred["total"], rel=0.20), (m.format(), pred)
    assert report.flops_per_step == train_flops_per_step(cfg, "pretrain", c.batch_size, c.seq_len)


def test_without_libtpu_compile_only_says_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(T, "has_libtpu", lambda: False)
    with pytest.raises(T.CompileUnavailable, match=r'needs libtpu, which is not installed: pip install "jax\[tpu\]'):
        T.compile_train(load_config("tiny"), "v5e-4")
    spec = importlib.util.spec_from_file_location("infer_cli", os.path.join(ROOT, "infer.py"))
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    assert infer.main(["--config", "tiny", "--compile_only", "--topology", "v5e-4"]) == 2
    assert "libtpu" in capsys.readouterr().err


def test_train_cli_without_libtpu_exits_2_with_the_install_hint():
    hide = ("import importlib.util as u, runpy, sys; f = u.find_spec; "
            "u.find_spec = lambda n, *a, **k: None if n == 'libtpu' else f(n, *a, **k); "
            "sys.argv = ['train.py', '--config=configs/tiny.py', '--compile_only', '--topology=v5p-8']; "
            "runpy.run_path('train.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "needs libtpu, which is not installed: pip install" in out.stderr, out.stderr


@needs_libtpu
def test_yarn_preset_compiles_a_chunked_128k_prefill_for_batch_1():
    out = cli("infer.py", "--config", "tiny", "--yarn", "--compile_only", "--topology", "v5e-4", "--batch", "1",
              "--max_context", "16384", "--max_new_tokens", "64", "--prefill_chunk", "4096")
    assert out.returncode == 0, out.stderr
    assert "context 16384 (64 new tokens)" in out.stdout and "prefill (4096 tokens a row, 1024-page tables)" in out.stdout
    assert "XLA cost analysis:" in out.stdout and out.stdout.rstrip().endswith("fits")
