"""Exporting a LoRA run's checkpoint (python -m qcjax.convert orbax-to-hf --merge_lora / --peft_dir): the merged HF
directory in transformers and the PEFT adapters on their transformers base both give the logits of qcjax's adapted
forward (base + unmerged adapters), QLoRA's merge starts from the dequantized base, and a wrong flag for the
checkpoint is a one-line error that writes nothing."""
import json
import os

import jax
import numpy as np
import pytest

import qcjax
from qcjax import adapters, checkpoint, convert, hf, loader
from qcjax.config import LORA_TARGETS, Adaptation, LoraSpec, ModelConfig
from qcjax.model import init_params

from conftest import hf_logits, hf_model

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12))


_init = jax.jit(init_params, static_argnums=0)  # one compile per config instead of one per op


def lora_checkpoint(path, lora: LoraSpec, *, quant: str = "none", init_from: str | None = None, seed: int = 0,
                    b_std: float = 0.05) -> Adaptation:
    """A LoRA run's checkpoint as the training loop saves it (the adapters alone, with "lora_base" naming the base),
    with the adapters as after some training: A at its random init, B random in the layers that train, zero in the
    others (whose updates the loop masks)."""
    ad = Adaptation(lora=lora, quant=quant)
    tree = adapters.split(jax.jit(adapters.init_params, static_argnums=(0, 1))(CFG, ad, jax.random.key(seed + 1)))[1]
    mask = adapters.layer_mask(CFG, lora)
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        if not adapters.is_adapter(path) or str(path[-1].key) != adapters.LORA_B:
            return x
        b = rng.normal(0.0, b_std, x.shape).astype(x.dtype)
        return b if mask is None else b * mask.reshape((-1,) + (1,) * (b.ndim - 1))

    tree = jax.tree_util.tree_map_with_path(perturb, tree)
    meta = {"lora_base": {"init_from": init_from, "seed": seed}, "adaptation": ad.to_dict()}
    checkpoint.save(str(path), 7, tree, CFG, extra_config=meta, async_=False).close()
    return ad


def adapted_logits(ckpt) -> tuple[np.ndarray, np.ndarray]:
    """(qcjax's adapted forward: adapters.build(cfg, adaptation).apply on base + unmerged adapters, the base's
    alone) on TOKENS."""
    cfg, full = loader.load(str(ckpt), merge_lora=False)
    ad = loader.load_adaptation(str(ckpt))
    assert ad.lora is not None
    base, _ = adapters.split(full)
    ref = np.asarray(qcjax.logits(cfg, full, TOKENS, adaptation=ad))
    return ref, np.asarray(qcjax.logits(cfg, base, TOKENS))


def assert_close(got: np.ndarray, ref: np.ndarray, base: np.ndarray) -> None:
    tol = 1e-4 * np.abs(ref).max()
    assert np.abs(ref - base).max() > 100 * tol  # the adapters change the model: a dropped adapter would show
    np.testing.assert_allclose(got, ref, atol=tol, rtol=0)


def transformers_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = convert.main(["orbax-to-hf", *argv, "--no_progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err


# The not-slow set: plain LoRA and one QLoRA format (nf4); int8 runs with the slow tests.
@pytest.mark.parametrize("quant", ["none", pytest.param("int8", marks=pytest.mark.slow), "nf4"])
def test_merged_hf_dir_matches_adapted_forward(tmp_path, capsys, quant):
    """--merge_lora: transformers on the merged directory == qcjax on base + adapters (QLoRA: the quantized base
    the adapters trained on, which the merge dequantizes)."""
    lora = LoraSpec(rank=4, alpha=8.0)
    base_hf = tmp_path / "base_hf"
    hf_model(CFG, seed=3).save_pretrained(base_hf)
    lora_checkpoint(tmp_path / "ckpt", lora, quant=quant, init_from=str(base_hf))
    rc, out, err = run_cli(capsys, "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged"),
                           "--merge_lora")
    assert rc == 0, err
    assert ("dequantized " + quant in out) == (quant != "none") and "merged into" in out

    ref, base = adapted_logits(tmp_path / "ckpt")
    model = transformers_model(tmp_path / "merged")
    assert_close(hf_logits(model, TOKENS), ref, base)
    written = ModelConfig.from_hf_json(str(tmp_path / "merged"))
    assert written == CFG and not hasattr(written, "lora")


@pytest.mark.parametrize("case", ["all-layers", "layers-0,2"])
def test_peft_adapters_match_adapted_forward(tmp_path, capsys, case):
    """--peft_dir: PeftModel.from_pretrained(transformers base, DIR) == qcjax on base + adapters, every projection
    (o_proj's input and q/k/v's outputs are heads x head_dim flattened) and a layers-restricted run's trained layers
    only; with --merge_lora too, both outputs from one command."""
    import peft
    from safetensors.numpy import load_file

    restricted = case != "all-layers"
    lora = LoraSpec(rank=4, alpha=16.0, targets=("q", "v", "o", "down") if restricted else LORA_TARGETS,
                    layers=(0, 2) if restricted else None)
    ckpt, peft_dir = tmp_path / "ckpt", tmp_path / "peft"
    if restricted:  # the run's seeded base; PEFT's base is that base written as an HF directory
        ad = lora_checkpoint(ckpt, lora, seed=5)
        base_hf = tmp_path / "base_hf"
        hf.save_hf(str(base_hf), CFG, adapters.split(loader.load(str(ckpt), merge_lora=False)[1])[0])
        rc, out, err = run_cli(capsys, "--ckpt", str(ckpt), "--peft_dir", str(peft_dir))
        assert not (tmp_path / "merged").exists()
    else:
        base_hf = tmp_path / "base_hf"
        hf_model(CFG, seed=4).save_pretrained(base_hf)
        ad = lora_checkpoint(ckpt, lora, init_from=str(base_hf))
        rc, out, err = run_cli(capsys, "--ckpt", str(ckpt), "--peft_dir", str(peft_dir), "--out",
                               str(tmp_path / "merged"), "--merge_lora")
    assert rc == 0, err
    assert f"wrote {peft_dir} (PEFT LoRA: rank-4 adapters" in out

    conf = json.loads((peft_dir / "adapter_config.json").read_text())
    hf_targets = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                  "down": "down_proj"}
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["bias"] == "none"
    assert (conf["r"], conf["lora_alpha"], conf["lora_dropout"]) == (4, lora.alpha, 0.0)
    assert conf["target_modules"] == [hf_targets[t] for t in lora.targets]
    assert conf["layers_to_transform"] == ([0, 2] if restricted else None)
    assert conf["base_model_name_or_path"] == (None if restricted else str(base_hf))
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    layers = [0, 2] if restricted else range(CFG.num_layers)
    assert len(tensors) == 2 * len(layers) * len(lora.targets)
    h, kvh, d = CFG.num_heads, CFG.num_kv_heads, CFG.dim_per_head
    o = "base_model.model.model.layers.2.self_attn.o_proj"
    assert tensors[f"{o}.lora_A.weight"].shape == (4, h * d) and tensors[f"{o}.lora_B.weight"].shape == (64, 4)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (kvh * d, 4)
    assert restricted != any(".layers.1." in k for k in tensors)

    ref, base = adapted_logits(ckpt)
    model = peft.PeftModel.from_pretrained(transformers_model(base_hf), str(peft_dir)).eval()
    lora_layers = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert lora_layers == {str(i) for i in layers}
    assert_close(hf_logits(model, TOKENS), ref, base)
    if not restricted:
        assert_close(hf_logits(transformers_model(tmp_path / "merged"), TOKENS), ref, base)
    assert ad.lora == lora == loader.load_adaptation(str(ckpt)).lora


def test_wrong_flags_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    lora_ckpt, plain_ckpt = tmp_path / "lora", tmp_path / "plain"
    lora_checkpoint(lora_ckpt, LoraSpec(rank=2, alpha=4.0))
    checkpoint.save(str(plain_ckpt), 0, _init(CFG, jax.random.key(0)), CFG, async_=False).close()
    out_dir, peft_dir = tmp_path / "out", tmp_path / "peft"

    def error(*argv) -> str:
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 1 and out == "" and len(err.strip().splitlines()) == 1, (rc, out, err)
        assert not out_dir.exists() and not peft_dir.exists()
        assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
        return err

    err = error("--ckpt", str(lora_ckpt), "--out", str(out_dir))
    assert "is a LoRA checkpoint" in err and "--merge_lora" in err and "--peft_dir" in err
    err = error("--ckpt", str(lora_ckpt), "--out", str(out_dir), "--peft_dir", str(peft_dir))  # checked before PEFT
    assert "--merge_lora" in err
    assert "--out" in error("--ckpt", str(lora_ckpt), "--merge_lora")
    assert "--out" in error("--ckpt", str(lora_ckpt), "--merge_lora", "--out", str(out_dir), "--peft_dir",
                            str(out_dir))
    err = error("--ckpt", str(plain_ckpt), "--out", str(out_dir), "--merge_lora")
    assert "is not a LoRA checkpoint" in err and "--merge_lora" in err
    err = error("--ckpt", str(plain_ckpt), "--out", str(out_dir), "--peft_dir", str(peft_dir))
    assert "is not a LoRA checkpoint" in err and "--peft_dir" in err
    out_dir.mkdir()
    (out_dir / "x").write_text("")  # an existing output is refused before the base is loaded
    rc, _, err = run_cli(capsys, "--ckpt", str(lora_ckpt), "--out", str(out_dir), "--merge_lora")
    assert rc == 1 and "exists and is not empty" in err and os.listdir(out_dir) == ["x"]
