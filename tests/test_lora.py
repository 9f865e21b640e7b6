"""LoRA and QLoRA: the adapted forward/backward against a hand-written reference, and LoRA runs of the trainer
(learning on a frozen base, adapter-only checkpoints that name their base, exact resume, masked layers, DPO against
the base, int8 / nf4 bases)."""
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny  # noqa: E402
from test_train import _dpo_rows, _sft_rows, _write_jsonl, metrics, train_losses  # noqa: E402

from qcjax import adapters  # noqa: E402
from qcjax.config import Adaptation, LoraSpec, get_config  # noqa: E402
from qcjax.model import build, init_params  # noqa: E402

pytestmark = pytest.mark.usefixtures("compilation_cache")  # many train() calls compile the same step
CFG = get_config("tiny", vocab_size=512)
SPEC = LoraSpec(rank=4, alpha=8.0)
LORA = Adaptation(lora=SPEC)


def _init(cfg, key, ad=None):
    """init_params (of the model adapted as `ad` says), jitted: one compile instead of one per op."""
    if ad is None:
        return jax.jit(init_params, static_argnums=0)(cfg, key)
    return jax.jit(adapters.init_params, static_argnums=(0, 1))(cfg, ad, key)


def _random_adapters(cfg, ad=LORA, seed=1):
    """Adapters with non-zero B (a fresh init has B = 0, which would hide a wrong adapter path)."""
    ad = adapters.split(_init(cfg, jax.random.key(0), ad))[1]
    leaves, tree = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _reference_logits(cfg, base, ad, tokens):
    """The hand-written LoRA: every adapted kernel W replaced by W + alpha/r * A B (reshaped to W), run on the plain
    model (no qwix). Linear in A B, so forward and gradients must equal the intercepted adapters'."""
    params = jax.tree.map(lambda x: x, base)
    for t in SPEC.targets:
        group, name = adapters.PROJECTIONS[t]
        node, a = params["layers"][group][name], ad["layers"][group][name]
        d = jnp.einsum("lir,lro->lio", a["kernel_lora_a"], a["kernel_lora_b"]) * SPEC.alpha / SPEC.rank
        node["kernel"] = node["kernel"] + d.reshape(node["kernel"].shape)
    return build(cfg).apply({"params": params}, tokens)


def test_qwix_private_names_are_where_adapters_expects_them():
    """qcjax.adapters reaches into qwix's private modules in one function; a qwix upgrade that moves or changes
    those names fails here, saying which, before any model is built."""
    import inspect

    dot, with_aux = adapters._qwix_private()
    assert "preferred_element_type" in inspect.signature(dot).parameters, "qwix's dot_general lost the kwarg"
    q = adapters.quantize(CFG, _init(CFG, jax.random.key(0)), "int8")["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(q, with_aux) and adapters.is_quantized(q), type(q)
    assert adapters.carried({"k": q}) == Adaptation(quant="int8")


def test_checkpoints_from_before_the_split_still_say_their_adaptation():
    """A LoRA checkpoint written when ModelConfig held `lora` and `quant` (its config item's "model" entry) reads as
    the same model and the same Adaptation as one written now (an "adaptation" entry beside "model")."""
    import json

    from qcjax.config import ModelConfig, adaptation_from_dict

    old = json.loads(json.dumps({"model": {**CFG.to_dict(), "lora": SPEC.__dict__, "quant": "int8"}}))
    new = json.loads(json.dumps({"model": CFG.to_dict(), "adaptation": Adaptation(SPEC, "int8").to_dict()}))
    for meta in (old, new):
        assert ModelConfig.from_dict(meta["model"]) == CFG
        assert adaptation_from_dict(meta) == Adaptation(lora=SPEC, quant="int8")
    assert adaptation_from_dict({"model": {**CFG.to_dict(), "lora": None, "quant": "none"}}) == Adaptation()
    assert adaptation_from_dict({"model": CFG.to_dict()}) == Adaptation()


def test_adapted_forward_and_gradients_match_the_hand_written_reference():
    base = _init(CFG, jax.random.key(0))
    ad = _random_adapters(CFG)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, CFG.vocab_size)
    mine = lambda a: adapters.build(CFG, LORA).apply({"params": adapters.combine(base, a)}, tokens)
    ref = lambda a: _reference_logits(CFG, base, a, tokens)
    np.testing.assert_allclose(jax.jit(mine)(ad), jax.jit(ref)(ad), rtol=1e-5, atol=1e-5)
    plain = jax.jit(lambda p: build(CFG).apply({"params": p}, tokens))(base)
    assert float(jnp.max(jnp.abs(jax.jit(ref)(ad) - plain))) > 0.1  # adapters matter

    loss = lambda f: lambda a: jnp.mean(jax.nn.log_softmax(f(a))[..., 7])
    g_mine, g_ref = jax.jit(jax.grad(loss(mine)))(ad), jax.jit(jax.grad(loss(ref)))(ad)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g_mine), jax.tree.leaves(g_ref)):
        scale = float(jnp.max(jnp.abs(y)))
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))


def test_fresh_adapters_leave_the_base_unchanged_and_merge_folds_them_in():
    full = _init(CFG, jax.random.key(0), LORA)
    base, ad = adapters.split(full)
    assert all(adapters.is_adapter(p) for p, _ in jax.tree_util.tree_leaves_with_path(ad))
    tokens = jnp.arange(10, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(adapters.build(CFG, LORA).apply({"params": full}, tokens),
                                  build(CFG).apply({"params": base}, tokens))
    ad = _random_adapters(CFG)
    merged = adapters.merge(SPEC, adapters.combine(base, ad))
    assert set(jax.tree.leaves(jax.tree.map(lambda x: x.shape, merged))) and not adapters.split(merged)[1]
    np.testing.assert_allclose(build(CFG).apply({"params": merged}, tokens),
                               adapters.build(CFG, LORA).apply({"params": adapters.combine(base, ad)}, tokens),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", [pytest.param("int8", marks=pytest.mark.slow), "nf4"])  # not slow: one format
def test_qlora_runs_on_a_quantized_base_and_merges_into_its_dequantized_weights(quant):
    qlora = Adaptation(lora=SPEC, quant=quant)
    base = adapters.quantize(CFG, _init(CFG, jax.random.key(0)), quant)
    kernel = base["layers"]["mlp"]["up_proj"]["kernel"]
    assert type(kernel).__name__ == "WithAux"  # held quantized: int8 / 4-bit values plus scales
    assert adapters.carried(base) == Adaptation(quant=quant)  # the tree says its own format
    ad = _random_adapters(CFG, qlora)
    tokens = jnp.arange(10, dtype=jnp.int32)[None]
    model = adapters.build(CFG, qlora)
    out = jax.jit(lambda a: model.apply({"params": adapters.combine(base, a)}, tokens))(ad)
    merged = adapters.merge(SPEC, adapters.combine(base, ad))
    np.testing.assert_allclose(jax.jit(lambda p: build(CFG).apply({"params": p}, tokens))(merged), out, rtol=1e-5,
                               atol=1e-5)
    g = jax.jit(jax.grad(lambda a: jnp.sum(model.apply({"params": adapters.combine(base, a)},
                                                       tokens)[0, -1, :3])))(ad)
    assert all(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(g))


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_bf16_lora_step_trains_fp32_adapters_over_a_bf16_base(quant):
    """The real configs' precision: bf16 compute, the frozen base held in bf16 (int8 under QLoRA), the adapters and
    their Adam moments in fp32 (qwix would make a quantized kernel's adapters in its bf16 scale dtype)."""
    from qcjax.train.config import TrainConfig
    from qcjax.train.step import OptimizerConfig, StepConfig, init_state, lr_schedule, make_optimizer, \
        make_train_step

    cfg, qlora = CFG.replace(dtype="bfloat16"), Adaptation(lora=SPEC, quant=quant)
    base, ad = adapters.split(_init(cfg, jax.random.key(0), LORA))
    base = adapters.freeze_base(cfg, base, quant)
    assert {x.dtype for x in jax.tree.leaves(ad)} == {jnp.dtype("float32")}
    assert jnp.dtype("float32") not in {x.dtype for x in jax.tree.leaves(base) if x.ndim == 3}  # bf16 or int8
    oc = OptimizerConfig(lr=1e-2, warmup_steps=0)
    tx = make_optimizer(oc, 10)
    step = jax.jit(make_train_step(cfg, StepConfig.of(TrainConfig(loss_chunk=64)), tx, lr_schedule(oc, 10), qlora))
    t = jnp.arange(32, dtype=jnp.int32)[None] % 500 + 1
    batch = {"tokens": t, "positions": jnp.arange(32, dtype=jnp.int32)[None], "segment_ids": jnp.ones_like(t),
             "loss_mask": jnp.ones(t.shape, jnp.float32)}
    state, m = step(init_state(ad, tx), batch, None, base)
    assert np.isfinite(float(m["loss"]))
    assert jax.tree.map(lambda x: x.dtype, state["params"]) == jax.tree.map(lambda x: x.dtype, ad)
    moved = [float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ad))]
    assert max(moved) > 0


# ---- the trainer ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_ckpt(tiny_run):
    """A briefly pretrained tiny base, conftest's tiny_run (a random init has near-uniform logits that adapters
    cannot sharpen: its tied embeddings are tiny and frozen)."""
    return str(tiny_run[0] / "checkpoints")


def _sft(spm_dir, tmp_path, base_ckpt, **kw):
    data = _write_jsonl(tmp_path / "sft.jsonl", _sft_rows())
    c = tiny(spm_dir, **{"task": "sft", "steps": 24, "eval_every": 0, "seq_len": 128, "init_from": base_ckpt,
                         "optimizer.lr": 1e-2, "lora.rank": 8, **kw})
    c.data = {"sources": [{"kind": "jsonl", "path": data, "format": "chat"}], "eval_fraction": 0.0,
              "system_prompt": None}
    return c


def test_lora_sft_learns_on_a_frozen_base_and_checkpoints_only_the_adapters(tmp_path, spm_dir, base_ckpt):
    import qcjax
    from qcjax.checkpoint import read_config, restore_params
    from qcjax.loader import load_adaptation
    from qcjax.train.loop import train

    train(_sft(spm_dir, tmp_path, base_ckpt), str(tmp_path / "run"))
    losses = train_losses(tmp_path / "run")
    assert np.mean([losses[s] for s in range(20, 25)]) < 0.85 * losses[1]  # the base is frozen: the adapters learnt

    ckpt = str(tmp_path / "run" / "checkpoints")
    cfg, ad = restore_params(ckpt)
    spec = load_adaptation(ckpt).lora
    assert spec.rank == 8 and spec.layers is None
    assert all(adapters.is_adapter(p) for p, _ in jax.tree_util.tree_leaves_with_path(ad))
    assert read_config(ckpt)[1]["lora_base"] == {"init_from": base_ckpt, "seed": 0}
    # what is saved: rank x (in + out) per projection and layer, nothing of the base
    h, kv, f, r = cfg.hidden_size, cfg.num_kv_heads * cfg.dim_per_head, cfg.intermediate_size, spec.rank
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + f) * 2 + (f + h))  # q, o; k, v; gate, up; down
    assert sum(x.size for x in jax.tree.leaves(ad)) == cfg.num_layers * per_layer

    # qcjax.load rebuilds the base and folds the adapters in: the same function as the adapted model
    plain, merged = qcjax.load(ckpt)
    adapted_cfg, full = qcjax.load(ckpt, merge_lora=False)
    assert plain == adapted_cfg == cfg and not adapters.has_adapters(merged) and adapters.has_adapters(full)
    tokens = jnp.arange(1, 20, dtype=jnp.int32)[None]
    np.testing.assert_allclose(build(plain).apply({"params": merged}, tokens),
                               adapters.build(cfg, load_adaptation(ckpt)).apply({"params": full}, tokens),
                               rtol=1e-5, atol=1e-5)


def test_lora_run_resumes_bitwise_and_trains_only_its_layers(tmp_path, spm_dir, base_ckpt):
    from qcjax.checkpoint import restore_params
    from qcjax.train.loop import train

    c = _sft(spm_dir, tmp_path, base_ckpt, steps=8, checkpoint_every=4, **{"lora.dropout": 0.1, "lora.layers": "1"})
    train(c, str(tmp_path / "whole"))
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "8")  # as if killed after step 4's checkpoint
    result = train(c, str(tmp_path / "cut"))
    assert result.resumed_from == 4
    a, b = restore_params(str(tmp_path / "whole" / "checkpoints"))[1], restore_params(str(tmp_path / "cut" / "checkpoints"))[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # lora.layers="1": layer 1's adapters trained, layer 0's never moved (B stays exactly zero)
    for x in jax.tree.leaves(a):
        assert float(jnp.max(jnp.abs(x[1]))) > 0
    for p, x in jax.tree_util.tree_leaves_with_path(a):
        if "lora_b" in jax.tree_util.keystr(p):
            assert float(jnp.max(jnp.abs(x[0]))) == 0.0


def test_lora_dpo_uses_the_base_as_its_reference(tmp_path, spm_dir, base_ckpt):
    from qcjax.train.config import from_config
    from qcjax.train.loop import build_train_program, model_config, train, validate

    data = _write_jsonl(tmp_path / "dpo.jsonl", _dpo_rows())
    c = tiny(spm_dir, **{"task": "dpo", "steps": 16, "eval_every": 0, "seq_len": 128, "optimizer.lr": 1e-2,
                         "dpo.beta": 0.5, "init_from": base_ckpt, "lora.rank": 8})
    c.data = {"sources": [{"kind": "jsonl", "path": data, "format": "dpo"}], "eval_fraction": 0.0,
              "system_prompt": None}
    tc = from_config(c)
    cfg = model_config(tc)
    mesh = validate(tc, cfg)
    with jax.set_mesh(mesh):
        assert build_train_program(tc, cfg, mesh).abstract_ref_params(tc) is None  # no second copy of the weights
    train(tc, str(tmp_path / "run"))
    rows = {r["step"]: r for r in metrics(tmp_path / "run") if "loss" in r}
    assert abs(rows[1]["reward_margin"]) < 1e-5 and np.isclose(rows[1]["loss"], np.log(2), rtol=1e-5)
    late = [rows[s] for s in range(13, 17)]
    assert np.mean([r["reward_accuracy"] for r in late]) > 0.75 and np.mean([r["reward_margin"] for r in late]) > 0.1


def test_lora_continued_pretraining_with_fim_evaluates_and_checkpoints_the_adapters(tmp_path, spm_dir, base_ckpt):
    """The file stage (next-token + FIM on the standard library) with adapters: eval runs on base + adapters."""
    from qcjax.checkpoint import restore_params
    from qcjax.train.loop import train

    train(tiny(spm_dir, steps=6, eval_every=6, checkpoint_every=6, init_from=base_ckpt, **{"lora.rank": 4}),
          str(tmp_path / "run"))
    rows = metrics(tmp_path / "run")
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any(np.isfinite(v) for r in rows for k, v in r.items() if k.startswith("eval"))
    ad = restore_params(str(tmp_path / "run" / "checkpoints"))[1]
    assert all(adapters.is_adapter(p) for p, _ in jax.tree_util.tree_leaves_with_path(ad))


@pytest.mark.parametrize("quant", [pytest.param("int8", marks=pytest.mark.slow), "nf4"])  # not slow: one format
def test_qlora_sft_learns(tmp_path, spm_dir, base_ckpt, quant):
    import qcjax
    from qcjax.train.loop import train

    train(_sft(spm_dir, tmp_path, base_ckpt, steps=12, **{"lora.base_quant": quant}), str(tmp_path / "run"))
    losses = train_losses(tmp_path / "run")
    assert np.mean([losses[s] for s in range(9, 13)]) < 0.9 * losses[1]
    from qcjax.loader import load_adaptation

    ckpt = str(tmp_path / "run" / "checkpoints")
    cfg, full = qcjax.load(ckpt, merge_lora=False)
    assert load_adaptation(ckpt).quant == quant and adapters.carried(full).quant == quant
    assert type(full["layers"]["attn"]["q_proj"]["kernel"]).__name__ == "WithAux"


@pytest.mark.parametrize("override, message", [
    ({"lora.base_quant": "int8"}, "lora.base_quant='int8' needs adapters: set lora.rank"),
    ({"lora.rank": 4, "lora.layers": "0-5"}, "lora.layers='0-5': layers [2, 3, 4, 5] outside 0..1"),
    ({"lora.rank": 4, "lora.targets": "q,mlp"}, "lora.targets=['q', 'mlp']: each must be one of"),
    ({"lora.rank": 4, "lora.base_quant": "int4"}, "lora.base_quant='int4': expected none, int8 or nf4"),
])
def test_bad_lora_configs_fail_naming_the_field(spm_dir, tmp_path, override, message):
    from qcjax.train.config import ConfigError, from_config
    from qcjax.train.loop import model_config, run_adaptation

    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        tc = from_config(tiny(spm_dir, **override))
        run_adaptation(tc, model_config(tc))
