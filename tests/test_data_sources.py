"""Record sources: JSONL, Parquet, repository trees, the stdlib corpus, TFDS (array_record, no TensorFlow)."""
import os
import pickle

import pytest

from qcjax.data.config import SourceConfig
from qcjax.data.sources import (BAD, WHERE, JsonlSource, ParquetSource, RepoTreeSource, TfdsSource, make_source,
                                stdlib_source)
from test_data_common import build_tiny_tfds, make_repo_tree, write_jsonl


def test_jsonl_reads_records_by_offset_and_names_lines(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, "", {"text": "é\ny"}, "[1, 2]"])
    src = JsonlSource(p)
    assert len(src) == 3  # the blank line is not a record
    assert src[0]["text"] == "x" and src[1]["text"] == "é\ny"
    assert src[1][WHERE] == f"{p}:3"
    assert BAD in src[2] and "a.jsonl:4: a JSONL record must be an object" in src[2][BAD]
    again = pickle.loads(pickle.dumps(src))
    assert again[1]["text"] == "é\ny"


def test_jsonl_directory_and_glob(tmp_path):
    write_jsonl(tmp_path / "x1.jsonl", [{"text": "1"}])
    write_jsonl(tmp_path / "x2.jsonl", [{"text": "2"}, {"text": "3"}])
    assert len(JsonlSource(str(tmp_path))) == 3 and len(JsonlSource(str(tmp_path / "x2*"))) == 2


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(25)], "n": list(range(25))}), p, row_group_size=10)
    src = ParquetSource(str(p))
    assert len(src) == 25 and src[17]["text"] == "doc 17" and src[17]["n"] == 17
    assert "row group 1, row 7" in src[17][WHERE]


def test_parquet_text_column_is_checked_up_front(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="t.parquet has no column 'text'"):
        make_source(SourceConfig("parquet", str(tmp_path / "t.parquet")))


def test_corrupt_parquet_names_the_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="cannot read Parquet file .*bad.parquet"):
        ParquetSource(str(tmp_path / "bad.parquet"))


def test_repo_tree_levels(tmp_path):
    root = make_repo_tree(tmp_path)
    repos = RepoTreeSource(root, "repo")
    assert [repos[i]["repo"] for i in range(len(repos))] == ["alpha", "beta", "loose"]
    assert [f["path"] for f in repos[0]["files"]] == ["README.md", "pkg/__init__.py", "pkg/core.py"]
    files = RepoTreeSource(root, "file", extensions=(".py",))
    assert len(files) == 5 and files[0]["text"] == "from .core import run\n" and files[0]["repo"] == "alpha"


def test_repo_tree_counts_unreadable_files(tmp_path):
    root = make_repo_tree(tmp_path)
    (tmp_path / "beta" / "blob.bin").write_bytes(b"\x00\x01\xff")
    rec = RepoTreeSource(root, "repo")[1]
    assert rec["skipped_files"] == 1 and len(rec["files"]) == 2
    bad = RepoTreeSource(root, "file")[[f for _, f in RepoTreeSource(root, "file").files].index("beta/blob.bin")]
    assert BAD in bad and "blob.bin: not UTF-8 text" in bad[BAD]


def test_stdlib_corpus_is_real_code():
    src = stdlib_source("repo")
    names = {src.repos[i][0] for i in range(len(src))}
    assert {"json", "email", "os", "collections"} <= names and "test" not in names
    rec = src[[r for r, _ in src.repos].index("json")]
    assert any(f["path"] == "__init__.py" and "def dumps" in f["content"] for f in rec["files"])


def test_tfds_data_source_without_tensorflow(tmp_path):
    data_dir = build_tiny_tfds(tmp_path)
    src = TfdsSource("tiny_code", data_dir=data_dir)
    assert len(src) == 12 and isinstance(src[0]["text"], str) and src[0]["text"].startswith("def f")
    by_dir = TfdsSource(os.path.join(data_dir, "tiny_code", "1.0.0"))
    assert sorted(by_dir[i]["text"] for i in range(12)) == sorted(src[i]["text"] for i in range(12))


def test_make_source_errors_name_the_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="data source jsonl:.*missing.jsonl.*does not exist"):
        make_source(SourceConfig("jsonl", str(tmp_path / "missing.jsonl")))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        make_source(SourceConfig("tree", str(tmp_path / "nodir")))
    with pytest.raises(ValueError, match="cannot open TFDS dataset 'no_such_ds'"):
        make_source(SourceConfig("tfds", "no_such_ds", data_dir=str(tmp_path)))
    os.makedirs(tmp_path / "emptytree")
    with pytest.raises(ValueError, match="emptytree is empty"):
        make_source(SourceConfig("tree", str(tmp_path / "emptytree")))
