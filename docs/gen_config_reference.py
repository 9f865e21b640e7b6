#!/usr/bin/env python
"""Write docs/config.md, the configuration reference, from the config code itself, so that it cannot drift.

    python docs/gen_config_reference.py            # rewrite docs/config.md
    python docs/gen_config_reference.py --check    # exit 1 when docs/config.md is stale (tests/test_docs.py)

Each meaning lives in one place: the "Fields:" section of the docstring of the dataclass that has the field. The run
config is the schema qcjax.train.config.TrainConfig (its sections ModelFields, OptimizerConfig, DpoConfig,
MeshConfig, and DataConfig with SourceConfig); a meaning written `see Class.field` is that class's (the run config
feeds it: model.dtype is ModelConfig.dtype). Defaults come from configs/base.py, which builds its ConfigDict from the
schema. Flags come from the CLIs' own parsers. A field without a meaning or a meaning without a field is an error,
so adding a field without documenting it fails the test.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import os
import sys
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "config.md")
sys.path.insert(0, ROOT)

from absl import flags  # noqa: E402

from configs import base  # noqa: E402
from qcjax import config as model_config  # noqa: E402
from qcjax.data.config import DataConfig, SourceConfig  # noqa: E402
from qcjax.train import config as schema  # noqa: E402
from qcjax.train.config import OptimizerConfig, TrainConfig  # noqa: E402

# The classes a schema meaning may refer to with `see Class.field`.
REFERENCED = {"ModelConfig": model_config.ModelConfig, "LoraSpec": model_config.LoraSpec}


class DocError(ValueError):
    """A field without a meaning, or a meaning without a field."""


# ---- reading the meanings ---------------------------------------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """{field: meaning} from the "Fields:" section of a dataclass docstring: `name: text` lines, continuation lines
    indented, the section ending at a blank line. Every field must be there, and nothing else."""
    lines = (cls.__doc__ or "").expandtabs().splitlines()
    body = [ln for ln in lines[1:] if ln.strip()]
    indent = min((len(ln) - len(ln.lstrip()) for ln in body), default=0)
    lines = [ln[indent:] for ln in lines]
    if "Fields:" not in lines:
        raise DocError(f"{cls.__qualname__}: its docstring has no 'Fields:' section")
    docs: dict[str, str] = {}
    name = None
    for ln in lines[lines.index("Fields:") + 1:]:
        if not ln.strip():
            break
        if ln[0].isspace():
            if name is None:
                raise DocError(f"{cls.__qualname__}: indented line before the first field: {ln.strip()!r}")
            docs[name] += " " + ln.strip()
            continue
        name, sep, text = ln.partition(":")
        if not sep or not name.isidentifier():
            raise DocError(f"{cls.__qualname__}: expected 'field: meaning', got {ln!r}")
        if name in docs:
            raise DocError(f"{cls.__qualname__}: field {name!r} is described twice")
        docs[name] = text.strip()
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [f for f in fields if f not in docs]
    unknown = [d for d in docs if d not in fields]
    if missing or unknown:
        raise DocError(f"{cls.__qualname__} docstring 'Fields:' section: undocumented fields {missing}, "
                       f"entries for fields that do not exist {unknown}")
    return {f: docs[f] for f in fields}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b": leaf}; lists (data.sources) are leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def run_config(stage: str = "file") -> dict[str, Any]:
    return flatten(base.get_config(stage).to_dict())


def meaning(cls: type, name: str) -> tuple[str, str]:
    """(meaning, the class that documents it) of field `name` of schema class `cls`, `see Class.field` resolved."""
    text = field_docs(cls)[name]
    if text.startswith("see ") and len(text.split()) == 2:
        owner, _, field = text[4:].partition(".")
        if owner not in REFERENCED:
            raise DocError(f"{cls.__qualname__}.{name}: 'see {owner}.{field}' names no known class "
                           f"({', '.join(REFERENCED)})")
        return field_docs(REFERENCED[owner])[field], owner
    return text, ""


def run_config_meanings() -> dict[str, tuple[str, str]]:
    """{field: (meaning, where it is documented)} for every run-config field, in the schema's order; every field of
    every stage's config must be in the schema."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        section = schema.hints(TrainConfig)[f.name]
        if not dataclasses.is_dataclass(section):
            out[f.name] = meaning(TrainConfig, f.name)
            continue
        where = section.__qualname__ if section in (DataConfig, OptimizerConfig) else ""
        for g in dataclasses.fields(section):
            text, owner = meaning(section, g.name)
            out[f"{f.name}.{g.name}"] = (text, owner or where)
    for stage in base.STAGES:
        extra = sorted(set(run_config(stage)) - set(out))
        if extra:
            raise DocError(f"base.get_config({stage!r}) has fields the schema (qcjax.train.config) does not: {extra}")
    return out


# ---- formatting ---------------------------------------------------------------------------------------------------
def value(v: Any) -> str:
    """A default as Python source (strings in double quotes), dataclass instances by their non-default fields."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        args = [repr(getattr(v, f.name)) if i == 0 else f"{f.name}={value(getattr(v, f.name))}"
                for i, f in enumerate(dataclasses.fields(v))
                if i == 0 or getattr(v, f.name) != f.default]
        return f"{type(v).__name__}({', '.join(args)})".replace("'", '"')
    if isinstance(v, tuple):
        return "(" + ", ".join(value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, (str, list, dict)):
        return json.dumps(v)
    return repr(v)


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def code(text: str) -> str:
    return f"`{cell(text)}`" if text != "" else ""


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def dataclass_table(cls: type, note: Callable[[str], str] = lambda f: "") -> list[str]:
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = code(value(f.default))
        elif f.default_factory is not dataclasses.MISSING:
            default = code(value(f.default_factory()))
        else:
            default = "required"
        rows.append([f"`{f.name}`", code(str(f.type)), default, cell(docs[f.name] + note(f.name))])
    return table(["field", "type", "default", "meaning"], rows)


# ---- sections -----------------------------------------------------------------------------------------------------
def run_config_section() -> list[str]:
    meanings = run_config_meanings()
    file_stage = run_config("file")
    rows = []
    for key, (text, where) in meanings.items():
        ref = f" ({where})" if where else ""
        rows.append([f"`{key}`", code(value(file_stage[key])) if key in file_stage else "", cell(text + ref)])
    out = ["## Run config (`qcjax.train.config.TrainConfig`)", "",
           "Every field of the training config, with its default in `base.get_config()` (stage `file`), which is the",
           "schema `qcjax.train.config.TrainConfig` as an ml_collections ConfigDict. Set any of them with",
           "`--config.FIELD=VALUE` on the `train.py` command line; a field the schema does not have, a value of the",
           "wrong type or outside a field's choices is an error naming the field. Where a meaning names a class,",
           "that class documents the field (the run config feeds it).", ""]
    out += table(["field", "default", "meaning"], rows)
    stages = {s: run_config(s) for s in base.STAGES}
    differ = [k for k in file_stage if len({json.dumps(stages[s].get(k), default=repr) for s in base.STAGES}) > 1]
    out += ["", "### Stage defaults", "",
            "`base.get_config(stage)` differs by stage (`--config=FILE:stage`) in these fields:", ""]
    out += table(["field"] + [f"`{s}`" for s in base.STAGES],
                 [[f"`{k}`"] + [code(value(stages[s][k])) for s in base.STAGES] for k in differ])
    out += ["", "### The real sizes (`base.size_config`)", "",
            "`configs/0.5b.py` ... `configs/32b.py` call `base.size_config(preset, stage)`: continued pretraining",
            "(`file`, `repo`) or fine-tuning (`sft`, `dpo`) of the released checkpoint given as `init_from`. It",
            "changes these fields from `base.get_config(stage)`:", ""]
    sized = {s: flatten(base.size_config("7b", s).to_dict()) for s in base.STAGES}
    unset = object()

    def change(s: str, k: str) -> str:
        v = sized[s].get(k, unset)
        if v == stages[s].get(k, unset):
            return ""
        return "unset" if v is unset else code(value(v))

    keys = list(dict.fromkeys(k for s in base.STAGES for k in [*stages[s], *sized[s]]))
    rows = [[f"`{k}`"] + [change(s, k) for s in base.STAGES] for k in keys]
    out += table(["field"] + [f"`{s}`" for s in base.STAGES], [r for r in rows if any(r[1:])])
    out += ["", "(`model.preset` is the size's name; shown here for `7b.py`.)", ""]
    return out


def config_files_section() -> list[str]:
    out = ["### Config files", "", "What each file in `configs/` changes from `base.get_config()` (stage `file`):", ""]
    rows = []
    base_cfg = run_config("file")
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if not name.endswith(".py") or name in ("base.py", "__init__.py"):
            continue
        spec = importlib.util.spec_from_file_location(f"configs_{name[:-3].replace('.', '_')}",
                                                      os.path.join(ROOT, "configs", name))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cfg = flatten(mod.get_config().to_dict())
        diff = [f"{k}={value(v)}" for k, v in cfg.items() if base_cfg.get(k, object()) != v]
        first = (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else ""
        rows.append([f"`configs/{name}`", cell(first), cell(", ".join(f"`{d}`" for d in diff))])
    return out + table(["file", "what", "changes"], rows) + [""]


def model_section() -> list[str]:
    MC = model_config.ModelConfig
    run = ", ".join(f"`{f}`" for f in model_config.RUN_FIELDS)
    out = ["## Model (`qcjax.config.ModelConfig`)", "",
           "What a checkpoint's model is (the architecture) plus the numerics it is traced with. Checkpoints store",
           f"every field; a restore may change only the run fields ({run}; `param_dtype` through `dtype=`).", ""]
    out += dataclass_table(MC)
    out += ["", "### `YarnScaling` (`ModelConfig.rope_scaling`)", ""] + dataclass_table(model_config.YarnScaling)
    out += ["", "### `Adaptation` (`qcjax.config.Adaptation`: beside the model, never in it)", "",
            "How a base model is changed from outside it (`qcjax.adapters.build(cfg, adaptation)`); a LoRA run's",
            "checkpoint stores it as its config item's \"adaptation\" entry. The run config's `lora` block makes it.",
            ""] + dataclass_table(model_config.Adaptation)
    out += ["", "### Presets (`qcjax.get_config(name, **overrides)`)", ""]
    rows = []
    for name, p in model_config.PRESETS.items():
        rows.append([f"`{name}`", str(p.vocab_size), str(p.hidden_size), str(p.intermediate_size), str(p.num_layers),
                     str(p.num_heads), str(p.num_kv_heads), str(p.dim_per_head),
                     "yes" if p.tie_word_embeddings else "no", str(p.max_position_embeddings)])
    out += table(["preset", "vocab", "hidden", "MLP", "layers", "heads", "KV heads", "head dim", "tied", "context"],
                 rows)
    return out + [""]


def data_section() -> list[str]:
    out = ["## Data (`qcjax.data.config.DataConfig`)", "",
           "The run config's `data` block is a `DataConfig` (`DataConfig.from_dict(config.data)`): every field can",
           "be set with `--config.data.FIELD=VALUE` (a field whose default is None takes a value of its type, e.g.",
           "`--config.data.repo_budget=4096`). Formats and layouts: [data.md](data.md).", ""]
    out += dataclass_table(DataConfig)
    out += ["", "### `SourceConfig` (each entry of `data.sources`)", "",
            "In a config file, each source is a dict of these fields; `configs/base.py`'s",
            "`source(kind, path, **fields)` writes one with the four keys a command line most often changes, so on",
            "every shipped config `--config.data.sources[0].path=data/chat.jsonl` (or `.kind`, `.format`, `.weight`)",
            "works. To set",
            "another field or change the number of sources, pass the whole mixture as a list of dicts:",
            "`--config.data.sources=\"[{'kind': 'jsonl', 'path': 'data/a.jsonl'}, {'kind': 'tree', 'path': 'repos',",
            "'weight': 2.0, 'exclude': ['tests']}]\"` (a lone dict without the brackets is an error).", ""]
    return out + dataclass_table(SourceConfig) + [""]


def optimizer_section() -> list[str]:
    out = ["## Optimizer (`qcjax.train.config.OptimizerConfig`)", "",
           "The run config's `optimizer` block (`--config.optimizer.FIELD=VALUE`); the schedule's length is the run's",
           "`steps`.", ""]
    return out + dataclass_table(OptimizerConfig) + [""]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"qcjax_doc_{name}", os.path.join(ROOT, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _argparse_rows(actions) -> list[list[str]]:
    rows = []
    for a in actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        flag = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.dest}`"
        default = a.default
        if a.required or default in (None, argparse.SUPPRESS) or isinstance(a, argparse._StoreTrueAction):
            default_s = "required" if a.required else ""
        else:
            default_s = code(value(default))
        text = a.help or ""
        if a.choices and not isinstance(a.choices, dict):
            text += f" (one of {', '.join(map(str, a.choices))})"
        rows.append([flag, default_s, cell(text)])
    return rows


def argparse_section(title: str, parser: argparse.ArgumentParser) -> list[str]:
    out = [f"### `{title}`", ""]
    groups = [g for g in parser._action_groups
              if any(not isinstance(a, argparse._HelpAction) for a in g._group_actions)]
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for g in groups:
        rows = _argparse_rows(g._group_actions)
        if rows:
            if len(groups) > 1:
                out += [f"*{g.title}*", ""]
            out += table(["flag", "default", "meaning"], rows) + [""]
    for s in subs:
        for name, sub in s.choices.items():
            out += [f"`{title} {name}`: {cell(sub.description or '')}", ""]
            out += table(["flag", "default", "meaning"], _argparse_rows(sub._actions)) + [""]
    return out


def cli_section() -> list[str]:
    out = ["## Command-line flags", "", "From the parsers themselves; `--help` prints the same.", "",
           "### `train.py`", ""]
    train = _load_script("train")
    rows = []
    for holder in vars(train).values():
        if isinstance(holder, flags.FlagHolder):
            f = flags.FLAGS[holder.name]
            default = f.default_unparsed  # a config-file flag's default is the path, not the loaded config
            default = "" if default is None else code(value(default))
            rows.append([f"`--{holder.name}`", default, cell(f.help)])
    out += table(["flag", "default", "meaning"], rows)
    out += ["", "plus `--config.FIELD=VALUE` for every "
            "[run-config field](#run-config-qcjaxtrainconfigtrainconfig).", ""]
    out += argparse_section("infer.py", _load_script("infer").build_parser())
    from qcjax import convert

    out += argparse_section("python -m qcjax.convert", convert.build_parser())
    return out


def render() -> str:
    out = ["<!-- Generated by docs/gen_config_reference.py from the config code: do not edit. Change the code (the",
           "'Fields:' docstrings of the dataclasses: qcjax/train/config.py for the run config), then run",
           "python docs/gen_config_reference.py. -->", "", "# Configuration reference", "",
           "Every field of every config, its default and its meaning, generated from the code (tests/test_docs.py",
           "fails when this file is stale). Guides: [training and data walkthrough](walkthrough.md),",
           "[running on TPU pods and GPU hosts](running.md), [data formats](data.md),",
           "[checkpoints](checkpoints.md), [sampling](sampling.md).", "",
           "- [Run config](#run-config-qcjaxtrainconfigtrainconfig): "
           "`train.py --config=FILE.py[:stage] --config.FIELD=VALUE`",
           "- [Model](#model-qcjaxconfigmodelconfig): `ModelConfig`, YaRN, presets",
           "- [Data](#data-qcjaxdataconfigdataconfig): `DataConfig`, `SourceConfig`",
           "- [Optimizer](#optimizer-qcjaxtrainconfigoptimizerconfig): `OptimizerConfig`",
           "- [Command-line flags](#command-line-flags): `train.py`, `infer.py`, `python -m qcjax.convert`", ""]
    out += run_config_section() + config_files_section() + model_section() + data_section() + optimizer_section()
    out += cli_section()
    while out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/config.md differs from what the code says")
    args = p.parse_args(argv)
    try:
        text = render()
    except DocError as e:
        print(f"gen_config_reference: error: {e}", file=sys.stderr)
        return 2
    rel = os.path.relpath(OUT, ROOT)
    if args.check:
        old = open(OUT, encoding="utf-8").read() if os.path.exists(OUT) else ""
        if old == text:
            return 0
        diff = difflib.unified_diff(old.splitlines(), text.splitlines(), rel, "generated", lineterm="", n=0)
        print("\n".join(list(diff)[:40]), file=sys.stderr)
        print(f"{rel} is stale: run `python docs/gen_config_reference.py` and commit it", file=sys.stderr)
        return 1
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
