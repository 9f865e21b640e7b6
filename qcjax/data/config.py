"""The data configuration: plain dataclasses, validated once. Each field's meaning is in its class's "Fields:"
docstring section, from which docs/config.md is generated; docs/data.md describes the formats.

    cfg = DataConfig(sources=(SourceConfig("jsonl", "code/*.jsonl", weight=7),
                              SourceConfig("parquet", "text/", weight=2, fim_rate=0.0),
                              SourceConfig("tfds", "my_math", weight=1, fim_rate=0.0, data_dir="/data/tfds")))
    cfg = DataConfig.from_dict(config_dict.data)      # from an ml_collections ConfigDict or nested dicts
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

SOURCE_KINDS = ("jsonl", "parquet", "tree", "stdlib", "tfds")
FORMATS = ("text", "repo", "chat", "fim_instruct", "dpo")
# Which formats each iterator accepts.
TASK_FORMATS = {"pretrain": ("text", "repo"), "sft": ("chat", "fim_instruct"), "dpo": ("dpo",)}
# Qwen2.5's chat template inserts this system turn when a conversation has none.
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One data source.

    Fields:
    kind: "jsonl" (a file, a directory of *.jsonl, or a glob), "parquet" (same), "tree" (a directory whose
      subdirectories are repositories; loose files in it are one-file repositories), "stdlib" (the running
      interpreter's standard library as a tree: each top-level package a repository), "tfds" (a TFDS dataset
      name, or a prepared dataset directory holding dataset_info.json; read with the data-source API, no TF).
    path: see kind ("stdlib" ignores it).
    weight: mixture weight (> 0); proportions are over tokens or records (DataConfig.mix_by).
    format: "text" (one document per record / per file: next-token + FIM), "repo" (one repository per record:
      repo-level samples), "chat" (ChatML SFT), "fim_instruct" (FIM SFT sample), "dpo" (preference pair).
    name: label in stats and error messages (default "kind:path").
    text_field: the record field holding the document text ("text" / "fim_instruct" formats).
    split: TFDS split.
    data_dir: TFDS data directory (local or gs://; cloud paths need gcsfs installed).
    fim_rate: this source's FIM rate; None = DataConfig.fim_rate (set 0.0 for prose or math sources).
    exclude: tree/stdlib: top-level entry names to skip (stdlib default skips "test", the CPython test suite).
    extensions: tree/stdlib: file suffixes to read, e.g. (".py",); empty = every file that is UTF-8 text.
    """

    kind: str
    path: str = ""
    weight: float = 1.0
    format: str = "text"
    name: str = ""
    text_field: str = "text"
    split: str = "train"
    data_dir: str | None = None
    fim_rate: float | None = None
    exclude: tuple[str, ...] | None = None
    extensions: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name or (f"{self.kind}:{self.path}" if self.path else self.kind)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything the iterators need besides the tokenizer, sequence length, batch size, seed and process.

    Fields:
    sources: the mixture, a tuple of SourceConfig (default: the stdlib code corpus alone).
    mix_by: "tokens" (weights are token proportions, as in the 7:2:1 code/text/math recipe) or "records".
    fim_rate: fraction of documents turned into FIM samples.
    fim_spm_rate: fraction of the FIM samples in suffix-prefix-middle order (0 = all prefix-suffix-middle).
    fim_unit: FIM split points anywhere ("char") or at line boundaries ("line").
    repo_file_order: order of a repository's files: "path" (sorted), "random", "deps" (Python import order: a
      module before its importers), "given" (as the source lists them).
    repo_fim_rate: chance that a repo sample's last file is in FIM form (None = fim_rate).
    repo_overflow: a repository over the budget continues in a new sample ("split") or loses the files that do
      not fit ("cut"; counted).
    repo_budget: tokens per repo sample (None = seq_len).
    system_prompt: system turn inserted into chat samples that have none (Qwen's default; None = never).
    dpo_style: "chatml" (prompt as a user turn, completion as the assistant turn) or "raw" (prompt + completion
      + <|endoftext|>).
    dpo_ref_logps: records carry precomputed reference log-probs "ref_chosen_logp" and "ref_rejected_logp";
      batches then hold them as [B] float32 (the trainer's dpo.reference="precomputed").
    overlong: documents longer than a row are "split" into row-sized pieces, "truncate"d, or "skip"ped; all
      counted. None = task default (pretrain "split", SFT "truncate", DPO "truncate"; DPO cannot split).
    pack_bins: rows packed at once by first fit (0 = max(8, batch_size)).
    shuffle: shuffle each source (per epoch, by seed).
    num_epochs: passes over every source; None = repeat forever.
    on_bad_record: "skip" (count and log) or "fail" (raise, naming the file and field).
    max_record_chars: a record whose text fields hold more characters is a bad record (skipped and counted, or
      raised with on_bad_record="fail") before it is tokenized; in the "repo" format the cap is per file, and a
      longer file is left out (counted in skipped_files). Bounds the memory one record can take (0 = no cap).
    eval_fraction: fraction of every source held out as the "eval" split (a fixed random subset, the same for
      every seed; at least one record when > 0; 0 = no eval split).
    read_threads: reading and tokenizing threads per source.
    prefetch: per-source buffer of read records.
    num_workers: Grain worker processes (0 = in-process).
    """

    sources: tuple[SourceConfig, ...] = (SourceConfig("stdlib"),)
    mix_by: str = "tokens"
    fim_rate: float = 0.5
    fim_spm_rate: float = 0.0
    fim_unit: str = "char"
    repo_file_order: str = "path"
    repo_fim_rate: float | None = None
    repo_overflow: str = "split"
    repo_budget: int | None = None
    system_prompt: str | None = QWEN_DEFAULT_SYSTEM
    dpo_style: str = "chatml"
    dpo_ref_logps: bool = False
    overlong: str | None = None
    pack_bins: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    on_bad_record: str = "skip"
    max_record_chars: int = 1_000_000
    eval_fraction: float = 0.01
    read_threads: int = 2
    prefetch: int = 64
    num_workers: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """From nested dicts or an ml_collections ConfigDict; unknown keys are an error (typos)."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown data config fields {sorted(unknown)}; known: {sorted(fields)}")
        if "sources" in d:
            srcs = []
            sfields = {f.name for f in dataclasses.fields(SourceConfig)}
            for i, s in enumerate(d["sources"]):
                if isinstance(s, SourceConfig):
                    srcs.append(s)
                    continue
                if hasattr(s, "to_dict"):
                    s = s.to_dict()
                if not isinstance(s, Mapping):
                    raise ValueError(
                        f"data.sources[{i}] is {s!r}, not a dict of SourceConfig fields (on the command line, pass "
                        "the mixture as a list of dicts: --config.data.sources=\"[{'kind': 'jsonl', 'path': "
                        "'data/*.jsonl'}]\"; a lone dict is read as a tuple of its keys)")
                s = dict(s)
                bad = set(s) - sfields
                if bad:
                    raise ValueError(f"data.sources[{i}]: unknown fields {sorted(bad)}; known: {sorted(sfields)}")
                for k in ("exclude", "extensions"):
                    if s.get(k) is not None:
                        s[k] = tuple(s[k])
                srcs.append(SourceConfig(**s))
            d["sources"] = tuple(srcs)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, task: str) -> None:
        """Raise a ValueError naming the bad field (called by every iterator factory)."""
        if not self.sources:
            raise ValueError("data config has no sources")
        _choice("mix_by", self.mix_by, ("tokens", "records"))
        _choice("fim_unit", self.fim_unit, ("char", "line"))
        _choice("repo_file_order", self.repo_file_order, ("path", "random", "deps", "given"))
        _choice("repo_overflow", self.repo_overflow, ("split", "cut"))
        _choice("dpo_style", self.dpo_style, ("chatml", "raw"))
        _choice("on_bad_record", self.on_bad_record, ("skip", "fail"))
        if self.overlong is not None:
            _choice("overlong", self.overlong, ("split", "truncate", "skip"))
        if task == "dpo" and self.overlong == "split":
            raise ValueError("overlong='split' is not possible for DPO pairs: use 'truncate' or 'skip'")
        for name in ("fim_rate", "fim_spm_rate", "repo_fim_rate", "eval_fraction"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {v}")
        for name in ("pack_bins", "read_threads", "prefetch", "num_workers", "max_record_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.repo_budget is not None and self.repo_budget < 8:
            raise ValueError(f"data.repo_budget must be >= 8 tokens, got {self.repo_budget}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"data.num_epochs must be >= 1 or None, got {self.num_epochs}")
        for i, s in enumerate(self.sources):
            where = f"data.sources[{i}] ({s.label})"
            if s.kind not in SOURCE_KINDS:
                raise ValueError(f"{where}: kind must be one of {SOURCE_KINDS}, got {s.kind!r}")
            if s.format not in FORMATS:
                raise ValueError(f"{where}: format must be one of {FORMATS}, got {s.format!r}")
            if s.format not in TASK_FORMATS[task]:
                raise ValueError(f"{where}: format {s.format!r} does not belong in a {task} mixture "
                                 f"(allowed: {TASK_FORMATS[task]})")
            w = s.weight
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ValueError(f"{where}: mixture weight must be a positive number, got {w!r}")
            if s.fim_rate is not None and not 0.0 <= s.fim_rate <= 1.0:
                raise ValueError(f"{where}: fim_rate must be in [0, 1], got {s.fim_rate}")
            if s.kind != "stdlib" and not s.path:
                raise ValueError(f"{where}: path is required for kind {s.kind!r}")
            if s.kind in ("tree", "stdlib") and s.format not in ("text", "repo"):
                raise ValueError(f"{where}: a {s.kind} source gives code files: format must be 'text' or 'repo'")

    def source_fim_rate(self, s: SourceConfig) -> float:
        return self.fim_rate if s.fim_rate is None else s.fim_rate


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"data.{name} must be one of {allowed}, got {value!r}")
