"""Local paths and cloud URLs (gs://, and the other schemes etils.epath knows) behind one small set of functions.

A local path goes through `os` exactly as before; a URL ("scheme://...") goes through `etils.epath`, which for gs://
uses gcsfs (fsspec) when TensorFlow is not installed and tf.io.gfile when it is. Orbax and Grain take the same URLs
(Orbax writes arrays through TensorStore's own GCS driver).

Object stores have no directories and no atomic rename: `makedirs` is a no-op for a URL, `replace` of a URL
directory copies then deletes each object (not atomic; the callers only move directories nobody else reads), and a
"directory" exists when some object lies under its prefix.

Libraries that can only read local files (SentencePiece, `tokenizers`, safetensors' memory map, pyarrow's ParquetFile
by name) get `local_copy(url)`: the file or directory downloaded once per process into a temporary directory.

Talking to a GCS emulator (tests/test_gcs.py, tests/gcs_emulator.py): gcsfs and google-cloud-storage read
STORAGE_EMULATOR_HOST, TensorStore reads TENSORSTORE_GCS_HTTP_URL (and GOOGLE_AUTH_TOKEN_FOR_TESTING for a fixed bearer
token instead of real credentials); gcsfs takes anonymous access from fsspec's config (FSSPEC_GS='{"token": "anon"}')
and needs GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false at import, or it probes each bucket's type over gRPC first (a 60 s
timeout against an emulator).
"""
from __future__ import annotations

import atexit
import hashlib
import os
import posixpath
import shutil
import tempfile
from typing import IO, Iterator


def is_url(path) -> bool:
    return "://" in str(path)


_CONFIGURED: list[bool] = []


def _configure() -> None:
    """gcsfs caches directory listings per process by default, so a file another process (another host) writes
    later stays invisible to `exists` here; qcjax polls for such files (the tokenizer, the lock), so listings are
    not cached. Set before the first gs:// filesystem is made; an explicit fsspec setting wins."""
    if not _CONFIGURED:
        import fsspec.config

        fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
        _CONFIGURED.append(True)


def _ep(path):
    from etils import epath

    _configure()
    return epath.Path(str(path))


def absolute(path) -> str:
    """os.path.abspath for local paths; a URL as given (without a trailing slash)."""
    if is_url(path):
        s = str(path)
        return s.rstrip("/") if not s.endswith("://") else s
    return os.path.abspath(path)


def join(base, *parts) -> str:
    if is_url(base):
        return posixpath.join(str(base), *[str(p) for p in parts])
    return os.path.join(base, *parts)


def dirname(path) -> str:
    if is_url(path):
        return posixpath.dirname(str(path).rstrip("/"))
    return os.path.dirname(path)


def basename(path) -> str:
    if is_url(path):
        return posixpath.basename(str(path).rstrip("/"))
    return os.path.basename(path)


def exists(path) -> bool:
    return _ep(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _ep(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
    if is_url(path):
        p = _ep(path)
        return p.exists() and not p.is_dir()
    return os.path.isfile(path)


def listdir(path) -> list[str]:
    """Entry names (not paths), like os.listdir."""
    if is_url(path):
        return [p.name for p in _ep(path).iterdir()]
    return os.listdir(path)


def makedirs(path) -> None:
    if not is_url(path):  # an object store has no directories to make
        os.makedirs(path, exist_ok=True)


def open_file(path, mode: str = "r", **kwargs) -> IO:
    if is_url(path):
        f = _ep(path).open(mode, **({"encoding": kwargs["encoding"]} if "encoding" in kwargs and "b" not in mode
                                    else {}))
        return f
    return open(path, mode, **kwargs)


def read_bytes(path) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def getsize(path) -> int:
    return int(_ep(path).stat().length) if is_url(path) else os.path.getsize(path)


def free_bytes(path) -> int | None:
    """Free space on the local disk holding `path` (its nearest existing ancestor); None for a URL."""
    if is_url(path):
        return None
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class DiskFull(OSError):
    """No space left for what a run writes: one line naming the path, what it was for, the free space there and what
    to do (errno ENOSPC)."""

    def __init__(self, path, what: str = "", then: str = ""):
        import errno

        free = free_bytes(path)
        super().__init__(errno.ENOSPC, f"{path}: no space left on the device{' for ' + what if what else ''}"
                         + (f" ({human_bytes(free)} free)" if free is not None else "") + (f"; {then}" if then else ""))

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC, raised directly or reported in the text of a library's error (Orbax/TensorStore: os_error_code=28)."""
    import errno

    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e) \
        or "os_error_code='28'" in str(e)


def remove(path) -> None:
    if is_url(path):
        _ep(path).unlink()
    else:
        os.remove(path)


def rmtree(path, ignore_errors: bool = False) -> None:
    if is_url(path):
        try:
            _ep(path).rmtree(missing_ok=True)
        except Exception:
            if not ignore_errors:
                raise
    else:
        shutil.rmtree(path, ignore_errors=ignore_errors)


def replace(src, dst) -> None:
    """os.replace locally; for URLs a copy and delete of every object (not atomic)."""
    if is_url(src) and is_url(dst) and str(src).split("://")[0] == str(dst).split("://")[0]:
        # object by object (server-side copies), then the source: gcsfs's rename first tries GCS's moveTo API, which
        # emulators lack (a long retry loop before its own copy fallback)
        fs, s = _fs(src)
        d = _fs(dst)[1].rstrip("/")
        if fs.isdir(s):
            s = s.rstrip("/")
            for f in fs.find(s):
                fs.copy(f, d + f[len(s):])
            fs.rm(s, recursive=True)
        else:
            fs.copy(s, d)
            fs.rm(s)
    elif is_url(src) or is_url(dst):
        _ep(src).rename(_ep(dst))
    else:
        os.replace(src, dst)


def walk(root) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk (top-down; the caller may prune `dirs` in place) for local paths and URLs alike."""
    if not is_url(root):
        yield from os.walk(root)
        return
    fs, base = _fs(root)
    for d, dirs, files in fs.walk(base, topdown=True):
        yield _url_of(root, base, d), dirs, files


def glob(pattern) -> list[str]:
    """Sorted matches of a glob ("**" recursive) for local paths and URLs."""
    if not is_url(pattern):
        import glob as _glob

        return sorted(_glob.glob(pattern, recursive=True))
    fs, base = _fs(pattern)
    return sorted(_url_of(pattern, base, p) for p in fs.glob(base))


def _fs(url):
    """(fsspec filesystem, path without the scheme) of a URL."""
    import fsspec

    _configure()
    scheme, rest = str(url).split("://", 1)
    return fsspec.filesystem(scheme), rest


def _url_of(like, base: str, path: str) -> str:
    scheme = str(like).split("://", 1)[0]
    return f"{scheme}://{path.lstrip('/')}"


def read_range(path, start: int, end: int) -> bytes:
    """Bytes [start, end) of a URL object (one ranged request)."""
    fs, p = _fs(path)
    return fs.cat_file(p, start=start, end=end)


# ---- local copies for libraries that read local files only ----------------------------------------------------------
_CACHE: dict[str, str] = {}
_CACHE_ROOT: list[str] = []


def _cache_root() -> str:
    if not _CACHE_ROOT:
        d = tempfile.mkdtemp(prefix="qcjax-url-")
        atexit.register(shutil.rmtree, d, True)
        _CACHE_ROOT.append(d)
    return _CACHE_ROOT[0]


def local_copy(path, only: tuple[str, ...] | None = None) -> str:
    """A local path holding the file or directory `path` (unchanged when local). A URL is downloaded once per
    process into a temporary directory removed at exit; `only`: for a directory, copy just these top-level file
    names (those that exist)."""
    if not is_url(path):
        return str(path)
    key = f"{absolute(path)}|{only}"
    if key in _CACHE and os.path.exists(_CACHE[key]):
        return _CACHE[key]
    src = _ep(path)
    dst = os.path.join(_cache_root(), hashlib.sha1(key.encode()).hexdigest()[:16], basename(path) or "root")
    if src.is_dir():
        os.makedirs(dst, exist_ok=True)
        if only is not None:
            for name in only:
                f = src / name
                if f.exists():
                    with f.open("rb") as fi, open(os.path.join(dst, name), "wb") as fo:
                        shutil.copyfileobj(fi, fo, 1 << 24)
        else:
            fs, base = _fs(path)
            base = base.rstrip("/")
            for f in fs.find(base):
                local = os.path.join(dst, *f[len(base):].strip("/").split("/"))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get_file(f, local)
    else:
        if not src.exists():
            raise FileNotFoundError(f"{path} does not exist")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with src.open("rb") as fi, open(dst, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 24)
    _CACHE[key] = dst
    return dst


def upload(local: str, url: str) -> None:
    """Copy a local file or directory tree to a URL (objects are overwritten)."""
    fs, base = _fs(url)
    if os.path.isdir(local):
        for d, _, files in os.walk(local):
            for f in files:
                rel = os.path.relpath(os.path.join(d, f), local).replace(os.sep, "/")
                fs.put_file(os.path.join(d, f), f"{base.rstrip('/')}/{rel}")
    else:
        fs.put_file(local, base)
