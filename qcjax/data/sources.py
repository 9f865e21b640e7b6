"""Record sources: random-access (len + getitem) readers that Grain shuffles, shards and maps. I/O lives here.

Every record is a dict; "__where__" names its file and line/row (for error messages). A record that cannot be
decoded (bad JSON, not UTF-8) comes back as {"__bad__": message, "__where__": ...}: the format stage skips and
counts it or fails, by config. A file that cannot be opened or an empty source fails at construction, naming it.

    text records   {"text": ...}                                  (JSONL / Parquet / TFDS; field name configurable)
    repo records   {"repo": name, "files": [{"path":, "content":}, ...]}   (tree / stdlib sources, or JSONL/Parquet)
    chat records   {"messages": [{"role":, "content":}, ...]}      (or ShareGPT "conversations": [{"from":, "value":}])
    FIM SFT        {"prefix":, "middle":, "suffix":}  or a text field split at random
    DPO records    {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
                   (without "prompt", a "chosen" conversation minus its last turn is the prompt)
"""
from __future__ import annotations

import collections
import fnmatch
import glob
import json
import os
import random
import sysconfig
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from qcjax import paths
from qcjax.data.config import SourceConfig

BAD = "__bad__"
WHERE = "__where__"
PROBE_RECORDS = 32  # a source whose first records are all unreadable is refused before training starts


class DataError(ValueError):
    """A data source that cannot feed training (empty, unreadable, no record giving tokens): one line naming it."""


def _expand(path: str, suffix: str) -> list[str]:
    """A file, a directory (its *suffix files, recursively, sorted) or a glob -> sorted file list. gs:// URLs too."""
    if paths.is_url(path):
        if paths.isdir(path):
            out = paths.glob(paths.join(path, "**", f"*{suffix}"))
        elif any(c in path for c in "*?["):
            out = paths.glob(path)
        else:
            if not paths.exists(path):
                raise FileNotFoundError(f"data file {path} does not exist")
            out = [path]
        return [p for p in out if paths.isfile(p)]
    if os.path.isdir(path):
        out = sorted(glob.glob(os.path.join(path, "**", f"*{suffix}"), recursive=True))
    elif any(c in path for c in "*?["):
        out = sorted(glob.glob(path, recursive=True))
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"data file {path} does not exist")
        out = [path]
    return [p for p in out if os.path.isfile(p)]


def _newlines(path: str, chunk: int = 1 << 26) -> tuple[np.ndarray, int]:
    """Byte offsets of every newline in a file (read in chunks: memory stays small for big files), and its size."""
    out, pos = [], 0
    with paths.open_file(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            out.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + pos)
            pos += len(block)
    return (np.concatenate(out) if out else np.zeros(0, np.int64)), pos


class JsonlSource:
    """JSON Lines files, one record per non-blank line, read by offset (an index of line starts is built once)."""

    def __init__(self, path: str):
        self.path = path
        self.files = _expand(path, ".jsonl")
        if not self.files:
            raise FileNotFoundError(f"no .jsonl files at {path}")
        starts, ends, fids, lines = [], [], [], []
        for k, f in enumerate(self.files):
            if f.endswith((".gz", ".zst", ".bz2", ".xz")):
                raise ValueError(f"{f}: compressed JSONL cannot be read by offset; decompress it or convert it to "
                                 f"Parquet or an ArrayRecord TFDS dataset")
            try:
                nl, size = _newlines(f)
            except OSError as e:
                raise OSError(f"cannot read {f}: {e}") from e
            s = np.concatenate([[0], nl + 1])
            e = np.concatenate([nl, [size]])
            keep = e > s
            # blank lines are not records (whitespace-only lines come back as bad records)
            starts.append(s[keep])
            ends.append(e[keep])
            fids.append(np.full(int(keep.sum()), k, np.int32))
            lines.append(np.flatnonzero(keep).astype(np.int64) + 1)  # 1-based line numbers for messages
        self._start = np.concatenate(starts).astype(np.int64)
        self._end = np.concatenate(ends).astype(np.int64)
        self._fid = np.concatenate(fids)
        self._line = np.concatenate(lines)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fds"], d["_lock"] = {}, None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._start)

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            with self._lock:
                fd = self._fds.get(k)
                if fd is None:
                    fd = self._fds[k] = os.open(self.files[k], os.O_RDONLY)
        return fd

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, s, e = int(self._fid[i]), int(self._start[i]), int(self._end[i])
        if paths.is_url(self.files[k]):
            raw = paths.read_range(self.files[k], s, e)  # one ranged GET per record
        else:
            raw = os.pread(self._fd(k), e - s, s)  # thread-safe (no shared file position)
        where = f"{self.files[k]}:{int(self._line[i])}"
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return {BAD: f"{where}: invalid JSON: {err}", WHERE: where}
        if not isinstance(rec, dict):
            return {BAD: f"{where}: a JSONL record must be an object, got {type(rec).__name__}", WHERE: where}
        rec[WHERE] = where
        return rec


class ParquetSource:
    """Parquet files; rows are read a row group at a time (a small cache of decoded row groups is kept)."""

    def __init__(self, path: str, columns: Sequence[str] | None = None, cache_row_groups: int = 4):
        import pyarrow.parquet as pq

        self.path = path
        self.files = _expand(path, ".parquet")
        if not self.files:
            raise FileNotFoundError(f"no .parquet files at {path}")
        self.columns = list(columns) if columns else None
        self._groups: list[tuple[int, int]] = []  # (file, row group)
        counts = []
        for k, f in enumerate(self.files):
            try:
                pf = pq.ParquetFile(paths.open_file(f, "rb") if paths.is_url(f) else f)
                md = pf.metadata
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError on corrupt files
                raise ValueError(f"cannot read Parquet file {f}: {e}") from e
            missing = [c for c in (self.columns or ()) if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"Parquet file {f} has no column {missing[0]!r} (columns: {pf.schema_arrow.names})")
            for g in range(md.num_row_groups):
                self._groups.append((k, g))
                counts.append(md.row_group(g).num_rows)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._cache_size = cache_row_groups
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_cache"], d["_lock"] = collections.OrderedDict(), None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _rows(self, g: int) -> list[dict]:
        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
        import pyarrow.parquet as pq

        k, rg = self._groups[g]
        try:
            f = self.files[k]
            with (paths.open_file(f, "rb") if paths.is_url(f) else open(f, "rb")) as fh:
                rows = pq.ParquetFile(fh).read_row_group(rg, columns=self.columns).to_pylist()
        except Exception as e:
            raise ValueError(f"cannot read row group {rg} of Parquet file {self.files[k]}: {e}") from e
        with self._lock:
            self._cache[g] = rows
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = int(np.searchsorted(self._offsets, i, side="right")) - 1
        row = dict(self._rows(g)[i - int(self._offsets[g])])
        k, rg = self._groups[g]
        row[WHERE] = f"{self.files[k]} (row group {rg}, row {i - int(self._offsets[g])})"
        return row


_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", "node_modules", ".tox", ".venv", "venv"}


def list_files(root: str, extensions: Sequence[str]) -> list[str]:
    """Relative paths of the files under root (sorted, hidden and cache directories skipped)."""
    out = []
    url = paths.is_url(root)
    for d, dirs, files in paths.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
        for f in sorted(files):
            if f.startswith(".") or (extensions and not f.endswith(tuple(extensions))):
                continue
            if url:  # "/"-separated, like the local paths on POSIX
                sub = d.rstrip("/")[len(root.rstrip("/")):].strip("/")
                out.append(f"{sub}/{f}" if sub else f)
            else:
                out.append(os.path.relpath(os.path.join(d, f), root))
    return out


def read_text(path: str, max_bytes: int) -> str | None:
    """UTF-8 text of a file, or None for binary / non-UTF-8 / huge files."""
    try:
        if paths.getsize(path) > max_bytes:
            return None
        with paths.open_file(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class RepoTreeSource:
    """A directory tree where each subdirectory is a repository (loose files: one-file repositories).

    level="repo": one record per repository {"repo", "files": [{"path", "content"}]} (paths relative to the
    repository; unreadable files are left out and counted in "skipped_files"). level="file": one record per file
    {"text", "path", "repo"}. Listing happens once at construction; files are read on access.
    """

    def __init__(self, root: str, level: str = "repo", exclude: Sequence[str] = (), extensions: Sequence[str] = (),
                 max_file_bytes: int = 4_000_000):
        if paths.is_url(root):
            root = paths.absolute(root)
        if not paths.isdir(root):
            raise FileNotFoundError(f"repository tree {root} is not a directory")
        self.root, self.level, self.max_file_bytes = root, level, max_file_bytes
        ex = tuple(exclude)
        self.repos: list[tuple[str, list[str]]] = []  # (repo name, file paths relative to root)
        for entry in sorted(paths.listdir(root)):
            full = paths.join(root, entry)
            if entry.startswith(".") or entry in _SKIP_DIRS or any(fnmatch.fnmatch(entry, p) for p in ex):
                continue
            is_dir = paths.isdir(full)
            if is_dir:
                files = [paths.join(entry, f) for f in list_files(full, extensions)]
            elif paths.isfile(full) and (not extensions or entry.endswith(tuple(extensions))):
                files = [entry]
            else:
                continue
            if files:
                name = entry[:-3] if entry.endswith(".py") and not is_dir else entry
                self.repos.append((name, files))
        self.files = [(r, f) for r, fs in self.repos for f in fs]
        if level not in ("repo", "file"):
            raise ValueError(f"tree level must be 'repo' or 'file', got {level!r}")

    def __len__(self) -> int:
        return len(self.repos) if self.level == "repo" else len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.level == "file":
            repo, rel = self.files[i]
            path = paths.join(self.root, rel)
            text = read_text(path, self.max_file_bytes)
            if text is None:
                return {BAD: f"{path}: not UTF-8 text (binary, undecodable or over {self.max_file_bytes} bytes)",
                        WHERE: path}
            return {"text": text, "path": rel, "repo": repo, WHERE: path}
        name, rels = self.repos[i]
        files, skipped = [], 0
        for rel in rels:
            text = read_text(paths.join(self.root, rel), self.max_file_bytes)
            if text is None:
                skipped += 1
                continue
            # paths inside the repository (a one-file repository keeps its file name)
            sep = "/" if paths.is_url(self.root) else os.sep
            files.append({"path": rel.split(sep, 1)[1] if sep in rel else rel, "content": text})
        return {"repo": name, "files": files, "skipped_files": skipped, WHERE: paths.join(self.root, name)}


STDLIB_EXCLUDE = ("site-packages", "dist-packages", "test", "lib-dynload", "config-*", "__pycache__",
                  "idlelib", "turtledemo")


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_source(level: str = "repo", exclude: Sequence[str] | None = None,
                  extensions: Sequence[str] = (".py",)) -> RepoTreeSource:
    """The running interpreter's standard library as a code corpus: real code on every machine, no download.
    Each top-level package is a repository, each top-level module a one-file repository. By default the CPython
    test suite ("test", with deliberately malformed files), IDLE and turtledemo are left out."""
    root = stdlib_root()
    src = RepoTreeSource(root, level, STDLIB_EXCLUDE if exclude is None else exclude, extensions or (".py",))
    if len(src) == 0:
        raise FileNotFoundError(f"no Python source files in the standard library at {root} "
                                f"(this interpreter may ship only bytecode)")
    return src


def stdlib_files() -> list[str]:
    """Absolute paths of the stdlib .py files (default exclusions), sorted."""
    src = stdlib_source("file")
    return [os.path.join(src.root, rel) for _, rel in src.files]


def stdlib_sample(max_chars: int = 3_000_000, seed: int = 0, progress: bool = True) -> list[str]:
    """Source files of the running interpreter's standard library, shuffled by `seed`, up to `max_chars` chars."""
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    texts: list[str] = []
    n = 0
    try:
        from tqdm import tqdm
        bar = tqdm(total=max_chars, unit="char", unit_scale=True, desc="reading stdlib", disable=not progress)
    except ImportError:  # pragma: no cover
        bar = None
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                t = fh.read()
        except (OSError, UnicodeDecodeError):
            continue  # a few stdlib files are not UTF-8: this is only a sample
        t = t[: max_chars - n]
        texts.append(t)
        n += len(t)
        if bar is not None:
            bar.update(len(t))
        if n >= max_chars:
            break
    if bar is not None:
        bar.close()
    return texts


def _to_str(x: Any) -> Any:
    """TFDS text features come back as bytes (or numpy arrays of bytes): decode recursively."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray) and x.dtype.kind in "SO":
        return [_to_str(v) for v in x.tolist()]
    if isinstance(x, dict):
        return {k: _to_str(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_str(v) for v in x]
    return x


class TfdsSource:
    """A TFDS dataset through the data-source API (ArrayRecord; TensorFlow is not needed).

    `name` is a registered dataset name (read from data_dir) or a prepared dataset directory (the one holding
    dataset_info.json)."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None):
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        try:
            if os.path.isfile(os.path.join(name, "dataset_info.json")):
                self._ds = tfds.builder_from_directory(name).as_data_source(split=split)
            else:
                self._ds = tfds.data_source(name, data_dir=data_dir, split=split, download=False)
        except Exception as e:
            raise ValueError(f"cannot open TFDS dataset {name!r} split {split!r} (data_dir={data_dir}): {e}. "
                             f"It must be prepared with file_format='array_record'.") from e

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        where = f"tfds:{self.name}[{self.split}] #{i}"
        try:
            rec = _to_str(self._ds[i])
        except UnicodeDecodeError as e:
            return {BAD: f"{where}: a text feature is not UTF-8: {e}", WHERE: where}
        if not isinstance(rec, dict):
            rec = {"text": rec}
        rec[WHERE] = where
        return rec


def make_source(cfg: SourceConfig):
    """The reader for one SourceConfig; raises naming the source when it is unreadable or empty."""
    level = "repo" if cfg.format == "repo" else "file"
    try:
        if cfg.kind == "jsonl":
            src = JsonlSource(cfg.path)
        elif cfg.kind == "parquet":  # text documents: read only the text column (and fail early without it)
            src = ParquetSource(cfg.path, [cfg.text_field] if cfg.format == "text" else None)
        elif cfg.kind == "tree":
            src = RepoTreeSource(cfg.path, level, cfg.exclude or (), cfg.extensions)
        elif cfg.kind == "stdlib":
            src = stdlib_source(level, cfg.exclude, cfg.extensions)
        elif cfg.kind == "tfds":
            src = TfdsSource(cfg.path, cfg.split, cfg.data_dir)
        else:
            raise ValueError(f"unknown source kind {cfg.kind!r}")
    except (OSError, ValueError) as e:
        raise type(e)(f"data source {cfg.label}: {e}") from e
    if len(src) == 0:
        raise DataError(f"data source {cfg.label} is empty (no records)")
    first = [src[i] for i in range(min(PROBE_RECORDS, len(src)))]
    if all(BAD in r for r in first):  # e.g. a binary file: every line is invalid JSON
        raise DataError(f"data source {cfg.label}: none of its first {len(first)} records is readable (first: "
                        f"{first[0][BAD][:200]}); is it a {cfg.kind} file of {cfg.format} records?")
    return src
