"""The Grain pipeline: packing invariants, every token accounted for, determinism, exact resume, mixtures,
per-process shards, SFT / DPO rows, and clear errors on bad input."""
import json
import logging
import os
import re

import numpy as np
import pytest

from qcjax.data import DataConfig, SourceConfig, iterator_stats, make_dataset, make_iterator
from qcjax.data import formats as F
from qcjax.data.pipeline import RecordError
from test_data_common import (build_tiny_tfds, check_rows, code_docs, qwen_tok, segments, tiny_hf_without_fim,
                              tiny_spm, write_jsonl)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}"  # train.py's --config, as a user passes it
T, B = 64, 4


def cfg_for(*sources, **kw) -> DataConfig:
    """A config over JSONL paths or SourceConfigs; no reading threads and no eval hold-out unless asked."""
    srcs = tuple(s if isinstance(s, SourceConfig) else SourceConfig("jsonl", str(s)) for s in sources)
    return DataConfig(sources=srcs, **{"read_threads": 0, "eval_fraction": 0.0, **kw})


def take(it, n):
    return [next(it) for _ in range(n)]


def drain(it):
    out = []
    for b in it:
        out.append(b)
    return out


@pytest.fixture
def code_jsonl(tmp_path):
    return write_jsonl(tmp_path / "code.jsonl", code_docs(40))


def test_rows_satisfy_packing_invariants(code_jsonl):
    tok = tiny_spm()
    for batch in take(make_iterator("pretrain", cfg_for(code_jsonl), tok, T, B), 6):
        assert set(batch) == {"tokens", "positions", "segment_ids", "loss_mask"}
        assert batch["tokens"].shape == (B, T)
        check_rows(batch, tok.pad_id)


@pytest.mark.parametrize("overlong", ["split", "truncate", "skip"])
def test_every_token_accounted_for(code_jsonl, overlong):
    """One epoch, no shuffle, no FIM: the segments are exactly the documents (split pieces in order, truncated
    heads, or skipped whole), and the counters add up."""
    tok = tiny_spm()
    cfg = cfg_for(code_jsonl, fim_rate=0.0, shuffle=False, num_epochs=1, overlong=overlong)
    it = make_iterator("pretrain", cfg, tok, T, B)
    batches = drain(it)
    for b in batches:
        check_rows(b, tok.pad_id)
    got = [s for b in batches for s, _ in segments(b)]
    want = []
    for rec in code_docs(40):
        d = F.encode_parts(tok, F.plain_parts(rec["text"])).tokens
        if len(d) <= T:
            want.append(d)
        elif overlong == "split":
            want += [d[i:i + T] for i in range(0, len(d), T)]
        elif overlong == "truncate":
            want.append(d[:T])
    assert sorted(map(tuple, got)) == sorted(map(tuple, want))
    st = iterator_stats(it)
    assert st["records"] == st["docs"] == 40 and st["bad_records"] == 0
    assert st["tokens_in"] == st["tokens_out"] + st["tokens_truncated"] + st["tokens_skipped"]
    assert st["tokens_out"] == sum(map(len, got))
    assert st["rows"] * T == st["tokens_out"] + st["pad_tokens"]
    assert {"split": st["docs_split"], "truncate": st["docs_truncated"], "skip": st["docs_skipped"]}[overlong] > 0


def test_split_pieces_stay_in_order_within_a_document(tmp_path):
    tok = tiny_spm()
    text = "".join(f"line_{i} = {i}\n" for i in range(200))
    p = write_jsonl(tmp_path / "long.jsonl", [{"text": text}])
    cfg = cfg_for(p, fim_rate=0.0, shuffle=False, num_epochs=1, pack_bins=1)
    got = np.concatenate([s for b in drain(make_iterator("pretrain", cfg, tok, T, 2)) for s, _ in segments(b)])
    assert got.tolist() == F.encode_parts(tok, F.plain_parts(text)).tokens.tolist()


def test_last_partial_batch_is_padded_not_dropped(tmp_path):
    tok = tiny_spm()
    text = "x = 1\n"
    while len(tok.encode(text)) < T // 2 + 2:  # two documents cannot share a row
        text += "x = 1\n"
    p = write_jsonl(tmp_path / "few.jsonl", [{"text": text}] * 3)
    batches = drain(make_iterator("pretrain", cfg_for(p, fim_rate=0, num_epochs=1), tok, T, 2))
    assert len(batches) == 2 and batches[-1]["tokens"].shape == (2, T)
    assert batches[-1]["segment_ids"][1].max() == 0  # a padding row


def test_same_seed_same_batches_other_seed_differs(code_jsonl):
    tok = tiny_spm()
    a = take(make_iterator("pretrain", cfg_for(code_jsonl), tok, T, B, seed=3), 4)
    b = take(make_iterator("pretrain", cfg_for(code_jsonl), tok, T, B, seed=3), 4)
    c = take(make_iterator("pretrain", cfg_for(code_jsonl), tok, T, B, seed=4), 4)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c))


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_resume_from_saved_state_is_identical(tmp_path, steps):
    """A mixture with FIM and split documents; the state goes through JSON (as Grain's checkpoint handler
    stores it) and a fresh iterator continues exactly."""
    tok = tiny_spm()
    a = write_jsonl(tmp_path / "a.jsonl", code_docs(30, seed=1, tag="a"))
    b = write_jsonl(tmp_path / "b.jsonl", code_docs(30, seed=2, tag="b"))
    cfg = cfg_for(SourceConfig("jsonl", a, weight=3), SourceConfig("jsonl", b, weight=1), pack_bins=3,
                  read_threads=2)
    it = make_iterator("pretrain", cfg, tok, 48, 2, seed=1)
    take(it, steps)
    state = json.loads(json.dumps(it.get_state()))
    want = take(it, 5)
    it2 = make_iterator("pretrain", cfg, tok, 48, 2, seed=1)
    it2.set_state(state)
    got = take(it2, 5)
    for x, y in zip(want, got):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert iterator_stats(it2) == iterator_stats(it)


@pytest.mark.parametrize("mix_by", ["tokens", "records"])
def test_mixture_proportions(tmp_path, mix_by):
    tok = tiny_spm()
    srcs = tuple(SourceConfig("jsonl", write_jsonl(tmp_path / f"{n}.jsonl", code_docs(20, seed=i, tag=n)), weight=w,
                              name=n) for i, (n, w) in enumerate([("code", 7), ("text", 2), ("math", 1)]))
    it = make_iterator("pretrain", cfg_for(*srcs, mix_by=mix_by, fim_rate=0.0), tok, T, B)
    take(it, 150)
    per = iterator_stats(it)["sources"]
    key = "tokens" if mix_by == "tokens" else "records"
    total = sum(s[key] for s in per.values())
    for name, w in [("code", 0.7), ("text", 0.2), ("math", 0.1)]:
        assert abs(per[name][key] / total - w) < 0.02, (name, per)


def doc_numbers(tok, it) -> list[int]:
    """The numbers of the code_docs documents an iterator yields (one epoch)."""
    text = "".join(tok.decode(s) for b in drain(it) for s, _ in segments(b))
    return [int(m) for m in re.findall(r"def doc_(\d+)\(", text)]


def test_process_shards_are_disjoint_and_cover_the_source(tmp_path):
    tok = tiny_spm()
    p = write_jsonl(tmp_path / "c.jsonl", code_docs(10))
    cfg = cfg_for(p, fim_rate=0.0, num_epochs=1)
    seen = [doc_numbers(tok, make_iterator("pretrain", cfg, tok, T, 2, 0, pi, 2)) for pi in range(2)]
    assert len(seen[0]) == len(seen[1]) == 5 and sorted(seen[0] + seen[1]) == list(range(10))


def test_eval_split_is_held_out_and_fixed(code_jsonl):
    tok = tiny_spm()
    cfg = cfg_for(code_jsonl, fim_rate=0.0, num_epochs=1, eval_fraction=0.1)
    ev, tr = (doc_numbers(tok, make_iterator("pretrain", cfg, tok, T, 2, 0, split=s)) for s in ("eval", "train"))
    assert len(ev) == 4 and len(tr) == 36 and sorted(ev + tr) == list(range(40))
    assert sorted(doc_numbers(tok, make_iterator("pretrain", cfg, tok, T, 2, seed=9, split="eval"))) == sorted(ev)


def test_repo_level_pretraining_from_the_stdlib():
    tok = qwen_tok()
    cfg = DataConfig(sources=(SourceConfig("stdlib", format="repo"),), read_threads=0, eval_fraction=0.0)
    batch = next(make_iterator("pretrain", cfg, tok, 512, 2))
    check_rows(batch, tok.pad_id)
    text = tok.decode(batch["tokens"][0][batch["segment_ids"][0] == 1])
    assert text.startswith("<|repo_name|>") and "<|file_sep|>" in text


def test_sft_rows_train_only_assistant_tokens(tmp_path):
    tok = qwen_tok()
    chat = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(6)]
    fim = [{"prefix": "def f():\n    ", "middle": "return 1", "suffix": "\n"}] * 2
    cfg = cfg_for(SourceConfig("jsonl", write_jsonl(tmp_path / "c.jsonl", chat), format="chat"),
                  SourceConfig("jsonl", write_jsonl(tmp_path / "f.jsonl", fim), format="fim_instruct"),
                  system_prompt=None, num_epochs=1, shuffle=False, mix_by="records")
    batches = drain(make_iterator("sft", cfg, tok, 128, 2))
    trained = sorted(tok.decode(t[m == 1]) for b in batches for t, m in segments(b))
    assert trained == sorted([f"a{i}<|im_end|>" for i in range(6)] + ["return 1<|endoftext|>"] * 2)


def test_dpo_rows_hold_one_aligned_pair_each(tmp_path):
    tok = qwen_tok()
    recs = [{"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}", "ref_chosen_logp": -1.0 * i,
             "ref_rejected_logp": -2.0 * i} for i in range(5)]
    cfg = cfg_for(SourceConfig("jsonl", write_jsonl(tmp_path / "d.jsonl", recs), format="dpo"), num_epochs=1,
                  shuffle=False, dpo_ref_logps=True, system_prompt=None)
    batches = drain(make_iterator("dpo", cfg, tok, 64, 2))
    assert len(batches) == 3
    for b in batches:
        check_rows(b, tok.pad_id, "chosen_")
        check_rows(b, tok.pad_id, "rejected_")
        assert b["chosen_segment_ids"].max() <= 1 and b["ref_chosen_logp"].shape == (2,)
        for r in range(2):
            if b["chosen_segment_ids"][r].max() == 0:
                continue
            good = tok.decode(b["chosen_tokens"][r][b["chosen_loss_mask"][r] == 1])
            bad = tok.decode(b["rejected_tokens"][r][b["rejected_loss_mask"][r] == 1])
            i = int(good[4:-len("<|im_end|>")])
            assert (good, bad) == (f"good{i}<|im_end|>", f"bad{i}<|im_end|>")
            assert b["ref_chosen_logp"][r] == -1.0 * i and b["ref_rejected_logp"][r] == -2.0 * i


def test_dpo_full_conversations_give_the_prompt(tmp_path):
    tok = qwen_tok()
    conv = lambda a: [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}]
    p = write_jsonl(tmp_path / "d.jsonl", [{"chosen": conv("good"), "rejected": conv("bad")}])
    cfg = cfg_for(SourceConfig("jsonl", p, format="dpo"), num_epochs=1, system_prompt=None)
    b = next(make_iterator("dpo", cfg, tok, 64, 1))
    assert tok.decode(b["chosen_tokens"][0][b["chosen_segment_ids"][0] == 1]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\ngood<|im_end|>\n")
    assert tok.decode(b["rejected_tokens"][0][b["rejected_loss_mask"][0] == 1]) == "bad<|im_end|>"


def test_tfds_source_end_to_end(tfds_dir):
    tok = tiny_spm()
    cfg = DataConfig(sources=(SourceConfig("tfds", "tiny_code", data_dir=tfds_dir),), read_threads=0,
                     eval_fraction=0.0, num_epochs=1, fim_rate=0.0, shuffle=False)
    batches = drain(make_iterator("pretrain", cfg, tok, 128, 2))
    text = "".join(tok.decode(s) for b in batches for s, _ in segments(b))
    assert all(f"def f{i}():" in text for i in range(12))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return build_tiny_tfds(tmp_path_factory.mktemp("tfds"))


# ---- bad input -----------------------------------------------------------------------------------------------

def test_missing_field_is_skipped_and_counted(tmp_path, caplog):
    tok = tiny_spm()
    p = write_jsonl(tmp_path / "m.jsonl", [{"text": "a = 1\n"}, {"content": "oops"}, "{broken json", {"text": "b\n"}])
    it = make_iterator("pretrain", cfg_for(p, num_epochs=1, shuffle=False, fim_rate=0.0), tok, T, 2)
    with caplog.at_level(logging.WARNING, "qcjax.data"):
        drain(it)
    st = iterator_stats(it)
    assert st["records"] == 4 and st["bad_records"] == 2 and st["docs"] == 2
    assert "m.jsonl:2: missing field 'text'" in caplog.text and "m.jsonl:3: invalid JSON" in caplog.text


def test_a_record_over_the_size_cap_is_skipped_before_tokenizing(tmp_path, caplog, monkeypatch):
    tok = tiny_spm()
    p = write_jsonl(tmp_path / "m.jsonl", [{"text": "a = 1\n"}, {"text": "x" * 5001}, {"text": "b = 2\n"}])
    seen = []
    encode = type(tok).encode
    monkeypatch.setattr(type(tok), "encode", lambda self, text, *a, **k: seen.append(len(text)) or encode(self, text,
                                                                                                         *a, **k))
    it = make_iterator("pretrain", cfg_for(p, num_epochs=1, shuffle=False, fim_rate=0.0, max_record_chars=5000),
                       tok, T, 2)
    with caplog.at_level(logging.WARNING, "qcjax.data"):
        drain(it)
    st = iterator_stats(it)
    assert st["records"] == 3 and st["bad_records"] == 1 and st["docs"] == 2
    assert "m.jsonl:2: record holds 5,001 characters, over data.max_record_chars=5,000" in caplog.text
    assert max(seen) < 5000  # never tokenized


def test_a_repo_file_over_the_size_cap_is_left_out_and_counted(tmp_path):
    tok = tiny_spm()
    files = [{"path": "a.py", "content": "a = 1\n"}, {"path": "big.py", "content": "y = 0\n" * 1000},
             {"path": "c.py", "content": "c = 3\n"}]
    p = write_jsonl(tmp_path / "r.jsonl", [{"repo": "r", "files": files}])
    src = SourceConfig("jsonl", str(p), format="repo")
    it = make_iterator("pretrain", cfg_for(src, num_epochs=1, shuffle=False, fim_rate=0.0, max_record_chars=1000),
                       tok, 256, 2)
    rows = drain(it)
    st = iterator_stats(it)
    assert st["skipped_files"] == 1 and st["bad_records"] == 0
    text = tok.decode([t for b in rows for t in np.asarray(b["tokens"]).ravel().tolist() if t > 0])
    assert "a.py" in text and "c.py" in text and "big.py" not in text


def test_missing_field_fails_when_configured(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"text": "a\n"}, {"body": "x"}])
    it = make_iterator("pretrain", cfg_for(p, num_epochs=1, shuffle=False, on_bad_record="fail"), tiny_spm(), T, 2)
    with pytest.raises(RecordError, match=r"m.jsonl:2: missing field 'text'"):
        drain(it)


def test_bad_config_errors_name_the_culprit(tmp_path, code_jsonl):
    tok = tiny_spm()
    with pytest.raises(ValueError, match=r"sources\[1\].*weight must be a positive number, got 0"):
        make_dataset("pretrain", cfg_for(code_jsonl, SourceConfig("jsonl", code_jsonl, weight=0)), tok, T, B)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        make_dataset("pretrain", cfg_for(str(empty)), tok, T, B)
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        make_dataset("pretrain", cfg_for(str(tmp_path / "nothere.jsonl")), tok, T, B)
    with pytest.raises(ValueError, match="format 'chat' does not belong in a pretrain mixture"):
        make_dataset("pretrain", cfg_for(SourceConfig("jsonl", code_jsonl, format="chat")), tok, T, B)
    with pytest.raises(ValueError, match="unknown data config fields"):
        DataConfig.from_dict({"fim_rat": 0.5})


def test_fim_needs_a_tokenizer_with_fim_tokens(tmp_path, code_jsonl):
    tok = tiny_hf_without_fim(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=r"lacks <\|fim_prefix\|>.*FIM \(fim_rate=0.5"):
        make_dataset("pretrain", cfg_for(code_jsonl), tok, T, B)
    make_dataset("pretrain", cfg_for(code_jsonl, fim_rate=0.0), tok, T, B)  # FIM off: fine


def test_from_dict_accepts_config_dicts():
    from ml_collections import ConfigDict

    c = ConfigDict(dict(sources=[dict(kind="stdlib", format="repo", exclude=["email"])], fim_rate=0.25))
    cfg = DataConfig.from_dict(c)
    assert cfg.sources[0].exclude == ("email",) and cfg.fim_rate == 0.25
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


def test_stats_count_per_source(code_jsonl):
    it = make_iterator("pretrain", cfg_for(code_jsonl), tiny_spm(), T, B)
    take(it, 2)
    st = iterator_stats(it)
    assert st["records"] > 0 and st["sources"] == {f"jsonl:{code_jsonl}": {"records": st["records"],
                                                                           "tokens": st["tokens_in"]}}


def test_grain_checkpoint_handler_round_trip(tmp_path, code_jsonl):
    """The Orbax item handler the training checkpoint uses (grain.checkpoint.CheckpointHandler)."""
    import grain
    from etils import epath

    tok = tiny_spm()
    it = make_iterator("pretrain", cfg_for(code_jsonl), tok, T, B, seed=2)
    take(it, 2)
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), it)
    want = take(it, 3)
    it2 = grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path),
                                                       make_iterator("pretrain", cfg_for(code_jsonl), tok, T, B, 2))
    for x, y in zip(want, take(it2, 3)):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])


@pytest.mark.slow
def test_worker_processes_resume_exactly(code_jsonl):
    """num_workers > 0 (Grain mp_prefetch: spawned processes) keeps determinism and exact resume."""
    tok = tiny_spm()
    cfg = cfg_for(code_jsonl, num_workers=2)
    it = make_iterator("pretrain", cfg, tok, T, B)
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    want = take(it, 3)
    it2 = make_iterator("pretrain", cfg, tok, T, B)
    it2.set_state(state)
    for x, y in zip(want, take(it2, 3)):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_parquet_and_tree_sources_through_the_pipeline(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from test_data_common import make_repo_tree

    tok = qwen_tok()
    pq.write_table(pa.table({"text": [d["text"] for d in code_docs(5)]}), tmp_path / "p.parquet")
    tree = make_repo_tree(tmp_path / "tree")
    cfg = cfg_for(SourceConfig("parquet", str(tmp_path / "p.parquet")),
                  SourceConfig("tree", tree, format="repo", extensions=(".py",)), num_epochs=1, fim_rate=0.0,
                  mix_by="records")
    text = "".join(tok.decode(s) for b in drain(make_iterator("pretrain", cfg, tok, 512, 2)) for s, _ in segments(b))
    assert all(f"def doc_{i}():" in text for i in range(5))
    assert "<|repo_name|>beta\n<|file_sep|>main.py\nimport util\n" in text


def parse_train_flags(*args: str):
    """train.py's --config flag, parsed in-process as a user's command line would be."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["train.py", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)  # overrides are found in argv
    fv(argv)
    return DataConfig.from_dict(fv.config.data)


def test_command_line_points_the_default_config_at_a_jsonl_file():
    cfg = parse_train_flags(TINY_CONFIG, "--config.data.sources[0].kind=jsonl",
                            "--config.data.sources[0].path=/d/a.jsonl", "--config.data.sources[0].weight=2.5")
    assert cfg.sources == (SourceConfig("jsonl", "/d/a.jsonl", weight=2.5),)


def test_command_line_replaces_the_whole_mixture_and_refuses_a_lone_dict():
    cfg = parse_train_flags(TINY_CONFIG, "--config.data.sources=[{'kind': 'jsonl', 'path': 'a.jsonl'}, "
                                         "{'kind': 'tree', 'path': 'repos', 'weight': 2.0, 'exclude': ['tests']}]")
    assert cfg.sources == (SourceConfig("jsonl", "a.jsonl"), SourceConfig("tree", "repos", 2.0, exclude=("tests",)))
    with pytest.raises(ValueError, match=r"data.sources\[0\] is 'kind', not a dict"):
        parse_train_flags(TINY_CONFIG, "--config.data.sources={'kind': 'jsonl', 'path': 'a.jsonl'}")
