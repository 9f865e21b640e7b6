"""HF <-> Orbax conversion (qcjax.convert, qcjax.hf export): bit-identical round trips, transformers loads the export
and agrees with us, HF directories load straight onto a mesh, and every bad input gives its error with no output."""
import json
import os

import jax
import numpy as np
import pytest

import qcjax
from qcjax import checkpoint, convert, hf
from qcjax.config import ModelConfig
from qcjax.sharding import make_mesh, param_shardings

from conftest import hf_logits, hf_model

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  tie_word_embeddings=True)
TINY_SHARD = 40_000  # bytes: forces several shards for the test models


def saved_hf(path, cfg, dtype="float32", seed=0):
    import torch

    model = hf_model(cfg, seed=seed).to(getattr(torch, dtype))
    model.save_pretrained(path)
    return model


def st_tensors(path):
    """Every tensor of an HF directory through the safetensors library itself (an independent reader)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(os.path.join(path, f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def nothing_left(parent, name):
    """The output is absent and no temporary sibling remains."""
    return not os.path.exists(os.path.join(parent, name)) and not [f for f in os.listdir(parent) if f".{name}." in f]


@pytest.mark.parametrize(
    "tied,src,ckpt,out",
    [(True, "float32", None, None), (False, "float32", None, None),
     (True, "bfloat16", "bfloat16", None), (False, "bfloat16", "bfloat16", None),
     (False, "bfloat16", None, "bfloat16")],  # bf16 hub weights -> fp32 checkpoint -> bf16 export: still exact
    ids=["fp32-tied", "fp32-untied", "bf16-tied", "bf16-untied", "bf16-via-fp32"],
)
def test_hf_orbax_hf_is_bit_identical(tmp_path, tied, src, ckpt, out):
    import torch

    cfg = CFG.replace(tie_word_embeddings=tied)
    saved_hf(tmp_path / "hf", cfg, src)
    got_cfg = convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt", dtype=ckpt)
    assert got_cfg.param_dtype == (ckpt or "float32")
    convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "out", dtype=out, max_shard_size=TINY_SHARD)

    files = os.listdir(tmp_path / "out")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    a, b = st_tensors(tmp_path / "hf"), st_tensors(tmp_path / "out")
    assert sorted(a) == sorted(b) and ("lm_head.weight" in b) == (not tied)
    for k in a:
        assert a[k].dtype == b[k].dtype == getattr(torch, src), k
        assert torch.equal(a[k], b[k]), k
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())


@pytest.mark.parametrize("vocab,tied", [(151936, True), (152064, False)], ids=["151936-tied", "152064-untied"])
def test_real_vocab_rows_round_trip(tmp_path, vocab, tied):
    import torch

    cfg = ModelConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, tie_word_embeddings=tied)
    saved_hf(tmp_path / "hf", cfg, "bfloat16")
    convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt", dtype="bfloat16")
    convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "out")
    a, b = st_tensors(tmp_path / "hf"), st_tensors(tmp_path / "out")
    assert b["model.embed_tokens.weight"].shape == (vocab, 16)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == gen["eos_token_id"] == 151643


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_loads_export_and_logits_equal_ours(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    cfg = CFG.replace(tie_word_embeddings=tied)
    saved_hf(tmp_path / "hf", cfg, seed=3)
    convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt")
    convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_size=TINY_SHARD)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert model.config.tie_word_embeddings == tied

    ours_cfg, params = checkpoint.restore_params(tmp_path / "ckpt")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    ref = hf_logits(model, tokens)
    np.testing.assert_allclose(np.asarray(qcjax.logits(ours_cfg, params, tokens)), ref, atol=1e-4 * np.abs(ref).max())


def test_export_config_keeps_yarn_and_tying(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = CFG.with_yarn(factor=4.0, original_max_position_embeddings=1024)
    saved_hf(tmp_path / "hf", cfg)
    convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt")
    convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "out", dtype="bfloat16")
    assert ModelConfig.from_hf_json(str(tmp_path / "out"), param_dtype="bfloat16") == cfg.replace(param_dtype="bfloat16")
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert hf_cfg.rope_parameters["rope_type"] == "yarn" and hf_cfg.rope_parameters["factor"] == 4.0
    assert hf_cfg.tie_word_embeddings and hf_cfg.architectures == ["Qwen2ForCausalLM"]


def test_hf_directory_loads_straight_onto_8_device_mesh(tmp_path):
    cfg = CFG.replace(tie_word_embeddings=False)
    model = saved_hf(tmp_path / "hf", cfg, seed=1)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    loaded_cfg, params = qcjax.load_hf(str(tmp_path / "hf"), mesh=mesh)
    from qcjax.model import abstract_params

    want = param_shardings(abstract_params(loaded_cfg), mesh)
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert x.sharding == s
    assert params["lm_head"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 10))
    with jax.set_mesh(mesh):
        ours = np.asarray(qcjax.logits(loaded_cfg, params, tokens))
    ref = hf_logits(model, tokens)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())


def test_torch_bin_and_tokenizer_files(tmp_path):
    import torch

    saved_hf(tmp_path / "hf", CFG)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": "fake"}')
    (tok / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt")
    convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "out", torch_bin=True, tokenizer_dir=tok,
                        max_shard_size=TINY_SHARD)
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == '{"model": "fake"}'
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": [151645, 151643]}
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())["weight_map"]
    st = st_tensors(out)
    assert sorted(index) == sorted(st)
    for f in set(index.values()):
        for k, v in torch.load(out / f, weights_only=True).items():
            assert index[k] == f and torch.equal(v, st[k])

    convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "one", torch_bin=True)  # one shard: pytorch_model.bin
    sd = torch.load(tmp_path / "one" / "pytorch_model.bin", weights_only=True)
    assert sorted(sd) == sorted(st) and all(torch.equal(sd[k], st[k]) for k in sd)


# ---- bad input: a clear error and nothing written -----------------------------------------------------------------
def rewrite_safetensors(path, edit):
    from safetensors.torch import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit,error",
    [
        (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj"),
        (lambda sd: sd.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", sd["model.norm.weight"][:8].clone()),
         r"unexpected tensor.*rotary_emb\.inv_freq"),
        (lambda sd: sd.__setitem__("model.layers.1.self_attn.k_proj.bias", sd["model.layers.1.self_attn.k_proj.bias"][:16].clone()),
         r"'model\.layers\.1\.self_attn\.k_proj\.bias' has shape \(16,\), expected \(32,\)"),
    ],
    ids=["missing", "extra", "misshapen"],
)
def test_bad_tensors_name_the_tensor_and_write_nothing(tmp_path, edit, error):
    saved_hf(tmp_path / "hf", CFG)
    rewrite_safetensors(tmp_path / "hf", edit)
    with pytest.raises(ValueError, match=error):
        convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt")
    assert nothing_left(tmp_path, "ckpt")


def test_bad_config_json(tmp_path):
    saved_hf(tmp_path / "hf", CFG)
    with pytest.raises(ValueError, match=r"num_layers: 2 in .*config\.json, 3 requested"):
        convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt", expect=CFG.replace(num_layers=3))
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**conf, "model_type": "llama",
                                                             "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="model_type='llama'.*Qwen2ForCausalLM"):
        convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt")
    assert nothing_left(tmp_path, "ckpt")


def test_non_empty_output_is_refused_unless_overwrite(tmp_path):
    saved_hf(tmp_path / "hf", CFG)
    for name in ("ckpt", "out"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="ckpt exists and is not empty.*--overwrite"):
        convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt")
    assert os.listdir(tmp_path / "ckpt") == ["keep.txt"]
    convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt", overwrite=True)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["0"]
    with pytest.raises(FileExistsError, match="out exists and is not empty"):
        convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "out")
    convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "out", overwrite=True)
    assert "keep.txt" not in os.listdir(tmp_path / "out") and "config.json" in os.listdir(tmp_path / "out")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_interrupted_conversions_leave_no_output(tmp_path, monkeypatch):
    saved_hf(tmp_path / "hf", CFG)
    convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt")

    def interrupt_after(n, fn):
        calls = []

        def wrapped(*a, **k):
            calls.append(1)
            if len(calls) > n:
                raise KeyboardInterrupt
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(hf.SafetensorsReader, "get", interrupt_after(6, hf.SafetensorsReader.get))
    with pytest.raises(KeyboardInterrupt):
        convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt2")
    assert nothing_left(tmp_path, "ckpt2")

    monkeypatch.setattr(checkpoint.ParamsReader, "__call__", interrupt_after(5, checkpoint.ParamsReader.__call__))
    with pytest.raises(KeyboardInterrupt):
        convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_size=TINY_SHARD)
    assert nothing_left(tmp_path, "out")


def test_cli(tmp_path, capsys):
    saved_hf(tmp_path / "hf", CFG)
    with pytest.raises(SystemExit) as e:
        convert.main(["--help"])
    assert e.value.code == 0 and "hf-to-orbax" in capsys.readouterr().out
    assert convert.main(["hf-to-orbax", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
                         "--dtype", "bfloat16", "--mesh", "fsdp=8", "--no_progress"]) == 0
    assert convert.main(["hf-to-orbax", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
                         "--model", "0.5b", "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "not the requested model" in err and "hidden_size: 64" in err
    assert convert.main(["orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
                         "--max_shard_size", "40KB", "--no_progress"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert convert.parse_size("5GB") == 5 * 10**9 and convert.parse_size("2GiB") == 2 * 2**30


def test_sharded_hf_input_and_export_out_of_a_training_checkpoint(tmp_path):
    import torch

    model = hf_model(CFG, seed=2)
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # transformers' own sharded layout + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    cfg, params = qcjax.load_hf(str(tmp_path / "hf"))
    with checkpoint.Checkpointer(tmp_path / "train", async_=False) as ck:  # what the training loop writes
        for step in (5, 10):
            scaled = jax.tree.map(lambda x: x * step, params)
            ck.save(step, scaled, cfg, opt_state={"mu": scaled, "count": jax.numpy.int32(step)},
                    extra_config={"train": {"step": step}})
    convert.orbax_to_hf(tmp_path / "train", tmp_path / "out")  # latest step
    got = st_tensors(tmp_path / "out")
    for name, want in model.state_dict().items():
        if name in got:
            np.testing.assert_array_equal(got[name].numpy(), want.numpy() * np.float32(10), err_msg=name)
    assert sorted(got) == sorted(k for k in model.state_dict() if k != "lm_head.weight")  # tied


@pytest.mark.slow  # a full garbage collection per param, ~0.6 s each once torch is loaded
def test_conversions_hold_one_param_at_a_time(tmp_path, monkeypatch):
    """The streaming property the memory benchmark measures: every earlier param is freed (by the converter's own
    per-param release, no help from the test) before the next is built (import) or read (export), so peak memory is
    bounded by the largest param, not the model."""
    import weakref

    saved_hf(tmp_path / "hf", CFG.replace(tie_word_embeddings=False))

    def tracking(fn):
        live = []

        def wrapped(*a, **k):
            assert [r for r in live if r() is not None] == [], "an earlier param is still alive"
            x = fn(*a, **k)
            live.append(weakref.ref(x))
            return x

        return wrapped

    monkeypatch.setattr(hf, "FULL_GC_BYTES", 0)  # the test's params are tiny; real ones are large
    monkeypatch.setattr(hf, "param_from_hf", tracking(hf.param_from_hf))
    convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt")

    monkeypatch.setattr(checkpoint.ParamsReader, "_read", tracking(checkpoint.ParamsReader._read))
    convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_size=TINY_SHARD)


def test_export_of_a_sentencepiece_run_carries_its_tokenizer(tmp_path, spm_dir):
    """orbax-to-hf of a training run (named by its run directory) copies the run's own tokenizer (here the
    SentencePiece spm.model train.py records), so the export samples with no --tokenizer."""
    import shutil

    from qcjax.tokenizer import load_tokenizer

    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    shutil.copy(os.path.join(spm_dir, "spm.model"), run / "tokenizer" / "spm.model")
    params = jax.jit(lambda: qcjax.init_params(CFG, jax.random.key(0)))()
    checkpoint.save(str(run / "checkpoints"), 3, params, CFG, async_=False,
                    extra_config={"tokenizer": str(run / "tokenizer" / "spm.model")}).close()
    assert convert.main(["orbax-to-hf", "--ckpt", str(run), "--out", str(tmp_path / "out"), "--no_progress"]) == 0
    assert (tmp_path / "out" / "spm.model").read_bytes() == (run / "tokenizer" / "spm.model").read_bytes()
    assert load_tokenizer(str(tmp_path / "out")).vocab_size == load_tokenizer(spm_dir).vocab_size
    assert qcjax.loader.load_config(str(tmp_path / "out")) == CFG.replace(param_dtype="float32")
