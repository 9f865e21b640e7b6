"""Config presets and HF config.json reading/writing."""
import dataclasses
import json

import pytest

from qcjax.config import PRESETS, ModelConfig, get_config
from qcjax.model import count_params

REAL_SIZES = ["0.5b", "1.5b", "3b", "7b", "14b", "32b"]


@pytest.mark.parametrize("size", REAL_SIZES)
def test_param_count_equals_transformers_meta_model(size):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = get_config(size)
    with torch.device("meta"):
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg.to_hf_dict()))
    assert count_params(cfg) == sum(p.numel() for p in hf.parameters())


def test_presets_have_the_real_dimensions():
    c = PRESETS["0.5b"]
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.dim_per_head, c.tie_word_embeddings) == (896, 14, 2, 64, True)
    c = PRESETS["32b"]
    assert (c.num_layers, c.intermediate_size, c.vocab_size, c.dim_per_head, c.tie_word_embeddings) == (
        64, 27648, 152064, 128, False)
    assert get_config("Qwen2.5-Coder-7B") == PRESETS["7b"]


def test_reads_rope_theta_from_rope_parameters_and_from_top_level():
    base = PRESETS["tiny"].to_hf_dict()
    new_style = {k: v for k, v in base.items() if k != "rope_theta"}
    new_style["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    old_style = {k: v for k, v in base.items() if k != "rope_parameters"}
    old_style["rope_theta"] = 54321.0
    assert ModelConfig.from_hf_dict(new_style).rope_theta == 12345.0
    assert ModelConfig.from_hf_dict(old_style).rope_theta == 54321.0


def test_reads_legacy_yarn_rope_scaling():
    d = PRESETS["7b"].to_hf_dict()
    del d["rope_parameters"]
    d["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    y = ModelConfig.from_hf_dict(d).rope_scaling
    assert (y.factor, y.original_max_position_embeddings) == (4.0, 32768)


def test_hf_dict_round_trips(tmp_path):
    cfg = PRESETS["14b"].with_yarn()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert ModelConfig.from_hf_json(str(tmp_path)) == cfg


def test_transformers_reads_our_yarn_config_the_same_way():
    transformers = pytest.importorskip("transformers")
    cfg = PRESETS["7b"].with_yarn()
    hf = transformers.Qwen2Config(**cfg.to_hf_dict())
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0
    assert hf.rope_parameters["rope_theta"] == 1e6


def test_rejects_other_architectures_clearly():
    d = PRESETS["tiny"].to_hf_dict() | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(ValueError, match="llama.*Qwen2ForCausalLM"):
        ModelConfig.from_hf_dict(d)


def test_bad_field_names_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        PRESETS["tiny"].replace(num_heads=5)
    with pytest.raises(ValueError, match="remat"):
        PRESETS["tiny"].replace(remat="sometimes")
    with pytest.raises(ValueError, match=r"attention_impl='bogus': expected one of \('auto', 'xla'"):
        PRESETS["tiny"].replace(attention_impl="bogus")


# ---- the run config's schema (qcjax.train.config) ----------------------------------------------------------------
def _config_file(name, arg=None):
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"cfg_{name.replace('.', '_')}", os.path.join(root, "configs",
                                                                                                   f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config() if arg is None else mod.get_config(arg)


@pytest.mark.parametrize("name, args", [("tiny", ("file", "repo", "sft", "dpo")), ("0.5b", ("file", "sft", "dpo")),
                                        ("32b", ("repo",)), ("prefs", ("tiny", "7b"))])
def test_every_shipped_config_is_in_the_schema(name, args):
    from qcjax.train.config import TrainConfig, from_config, to_config_dict

    for arg in args:
        tc = from_config(_config_file(name, arg))
        assert isinstance(tc, TrainConfig)
        assert from_config(to_config_dict(tc)) == tc  # the ConfigDict round trip loses nothing


def test_the_run_config_defaults_are_the_schemas():
    from qcjax.train.config import DpoConfig, OptimizerConfig, RlConfig, TrainConfig, from_config
    from qcjax.train.step import StepConfig

    base = from_config(_config_file("0.5b"))
    assert from_config({}) == TrainConfig()
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(StepConfig))  # no second set of defaults
    assert StepConfig.of(TrainConfig()) == StepConfig(task=TrainConfig.task, grad_accum=TrainConfig.grad_accum,
                                                      loss_chunk=TrainConfig.loss_chunk, dpo=DpoConfig(),
                                                      rl=RlConfig(), seed=TrainConfig.seed)
    assert base.optimizer.b2 == OptimizerConfig.b2 and base.dpo == DpoConfig() and base.mesh.fsdp == -1


@pytest.mark.parametrize("tree, message", [
    ({"optimizer": {"learning_rate": 1e-3}}, r"unknown config field 'optimizer.learning_rate'"),
    ({"stepz": 5}, r"unknown config field 'stepz' \(did you mean 'steps'\?\)"),
    ({"task": "pretrian"}, r"task='pretrian': expected pretrain, sft, dpo or rl"),
    ({"dpo": {"reference": "live"}}, r"dpo.reference='live': expected frozen or precomputed"),
    ({"resume_data": "again"}, r"resume_data='again': expected exact or reseed"),
    ({"optimizer": {"schedule": "linear"}}, r"optimizer.schedule='linear': expected cosine or constant"),
    ({"steps": "10"}, r"steps='10': expected an int"),
    ({"mesh": 4}, r"mesh=4: expected a block of fields \(MeshConfig\)"),
    ({"data": {"fim_rat": 0.5}}, r"data: unknown data config fields \['fim_rat'\]"),
])
def test_the_schema_names_the_bad_field(tree, message):
    from qcjax.train.config import ConfigError, from_config

    with pytest.raises(ConfigError, match=message):
        from_config(tree)


@pytest.mark.parametrize("tree, message", [
    ({"steps": 0}, r"steps=0: must be positive"),
    ({"optimizer": {"lr": float("nan")}}, r"optimizer.lr=nan: must be a finite number > 0"),
    ({"checkpoint_every": 0}, r"log_every and checkpoint_every must be positive"),
    ({"grad_accum": 3}, r"batch_size=8 is not divisible by grad_accum=3"),
    ({"per_device_batch": 2, "grad_accum": 2}, r"per_device_batch=2 and grad_accum=2 both set"),
    ({"lora": {"rank": -1}}, r"lora.rank=-1: must be >= 0"),
    ({"task": "sft"}, r"data.sources\[0\] \(stdlib\): format 'text' does not belong in a sft mixture"),
    ({"task": "rl", "lora": {"rank": 4}}, r"lora.rank=4 with task rl"),
    ({"task": "rl", "rl": {"clip_low": -0.1}}, r"rl.kl_coef, rl.clip_low and rl.clip_high must be >= 0"),
    ({"task": "rl", "rl": {"group_size": 3}}, r"batch_size=8 is not divisible by rl.group_size=3"),
    ({"task": "rl", "rl": {"top_p": 0.0}}, r"rl.top_p=0.0: must be in \(0, 1\]"),
])
def test_the_schema_checks_the_values_at_parse_time(tree, message):
    """What can be wrong with the run config by itself fails in from_config (before any model or device work),
    naming the field."""
    from qcjax.train.config import ConfigError, from_config

    with pytest.raises(ConfigError, match=message):
        from_config(tree)


def test_the_loop_reads_the_parsed_config(tmp_path):
    """loop.train checks its config (a TrainConfig made in code too) before it touches the workdir; the program
    builder takes the typed TrainConfig."""
    import jax

    from qcjax.train import loop
    from qcjax.train.config import ConfigError, ModelFields, TrainConfig

    with pytest.raises(ConfigError, match="steps=0: must be positive"):
        loop.train(TrainConfig(steps=0), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # nothing written, no model built
    tc = TrainConfig(model=ModelFields(preset="tiny", dtype="float32", remat="none"), seq_len=64, task="pretrain")
    cfg = loop.model_config(tc)
    mesh = loop.validate(tc, cfg)
    with jax.set_mesh(mesh):
        prog = loop.build_train_program(tc, cfg, mesh)
    assert prog.abstract_batch(tc)["tokens"].shape == (tc.batch_size, tc.seq_len)


def test_every_field_has_a_typed_command_line_override():
    """--config.FIELD=VALUE reaches every field, a None-default one too (typed placeholders), and a misspelt
    field fails naming it."""
    import os

    from absl import flags
    from ml_collections import config_flags

    from qcjax.train.config import from_config

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
    def parse(*args):
        argv = ["train.py", *args]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", tiny, flag_values=fv, sys_argv=argv)
        fv(argv)
        return fv.config

    tc = from_config(parse(f"--config={tiny}:sft", "--config.optimizer.lr=1e-5", "--config.data.repo_budget=4096",
                           "--config.data.overlong=skip", "--config.data.num_epochs=2", "--config.mesh.tensor=2",
                           "--config.model.yarn_factor=4", "--config.data.sources[0].weight=2.5"))
    assert (tc.stage, tc.optimizer.lr, tc.mesh.tensor, tc.model.yarn_factor) == ("sft", 1e-5, 2, 4.0)
    assert (tc.data.repo_budget, tc.data.overlong, tc.data.num_epochs) == (4096, "skip", 2)
    assert tc.data.sources[0].weight == 2.5
    with pytest.raises((KeyError, AttributeError, flags.Error), match="lrr"):
        parse(f"--config={tiny}", "--config.optimizer.lrr=1e-5")
