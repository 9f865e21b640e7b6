"""The Hugging Face <-> qcjax name and layout mapping (kept as data), and reading HF safetensors checkpoints.

HF stores each Linear as weight [out, in]; qcjax stores kernels [in..., out...] with heads split out, and stacks the
layers on a leading axis for `nn.scan`. Each mapping row says: HF tensor name, our param path, and the layout kind:
  "copy"      same shape both sides (norms, embedding)
  "flat"      HF keeps it 1-D (q/k/v bias [H*D] <-> ours [H, D])
  "linear:N"  HF [out, in] <-> ours [in..., out...] whose first N dims are the input dims
Export (`params_to_hf`) reads the same rows backwards: there is no second mapping.

Both directions stream, one param at a time: import copies each HF tensor out of the memory-mapped safetensors into
its (stacked) param and drops the mapped pages; export writes safetensors shards whose headers are planned from the
shapes, appending each tensor's bytes as it is produced. Output directories appear whole or not at all.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import mmap
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np

from qcjax import paths
from qcjax.config import ModelConfig

Row = tuple[str, tuple[str, ...], str]

# "{i}" is the layer index; layer rows map onto the stacked "layers" subtree (leading layer axis).
LAYER_MAPPING: tuple[Row, ...] = (
    ("model.layers.{i}.input_layernorm.weight", ("layers", "input_norm", "scale"), "copy"),
    ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "q_proj", "kernel"), "linear:1"),  # [E,H,D]
    ("model.layers.{i}.self_attn.q_proj.bias", ("layers", "attn", "q_proj", "bias"), "flat"),  # [H,D]
    ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "k_proj", "kernel"), "linear:1"),
    ("model.layers.{i}.self_attn.k_proj.bias", ("layers", "attn", "k_proj", "bias"), "flat"),
    ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "v_proj", "kernel"), "linear:1"),
    ("model.layers.{i}.self_attn.v_proj.bias", ("layers", "attn", "v_proj", "bias"), "flat"),
    ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "attn", "o_proj", "kernel"), "linear:2"),  # [H,D,E]
    ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"), "copy"),
    ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), "linear:1"),  # [E,I]
    ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), "linear:1"),
    ("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), "linear:1"),  # [I,E]
)
GLOBAL_MAPPING: tuple[Row, ...] = (
    ("model.embed_tokens.weight", ("embed",), "copy"),  # [V,E]
    ("model.norm.weight", ("final_norm", "scale"), "copy"),
    ("lm_head.weight", ("lm_head",), "linear:1"),  # [E,V]; untied checkpoints only
)


def mapping(cfg: ModelConfig) -> list[Row]:
    """The rows that apply to this config (a tied model has no lm_head: it reuses the embedding)."""
    rows = [r for r in GLOBAL_MAPPING if not (cfg.tie_word_embeddings and r[1] == ("lm_head",))]
    return rows + list(LAYER_MAPPING)


def hf_names(cfg: ModelConfig, row: Row) -> list[str]:
    name = row[0]
    return [name.format(i=i) for i in range(cfg.num_layers)] if "{i}" in name else [name]


def hf_shape(our_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The HF shape of one (un-stacked) param of our shape."""
    if kind == "copy":
        return tuple(our_shape)
    if kind == "flat":
        return (math.prod(our_shape),)
    n_in = int(kind.split(":")[1])
    return (math.prod(our_shape[n_in:]), math.prod(our_shape[:n_in]))


def to_ours(x: np.ndarray, our_shape: tuple[int, ...], kind: str, name: str) -> np.ndarray:
    """One HF tensor -> our layout; a misshapen tensor is an error naming it and both shapes."""
    want = hf_shape(our_shape, kind)
    if tuple(x.shape) != want:
        raise ValueError(f"tensor {name!r} has shape {tuple(x.shape)}, expected {want} (our param shape {our_shape})")
    if kind.startswith("linear"):
        x = x.T
    return x.reshape(our_shape)


def to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    """One of our (un-stacked) params -> the HF layout."""
    if kind == "copy":
        return x
    if kind == "flat":
        return x.reshape(-1)
    n_in = int(kind.split(":")[1])
    return x.reshape(math.prod(x.shape[:n_in]), -1).T


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set_path(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def check_names(cfg: ModelConfig, names: set[str]) -> None:
    """Missing or unexpected tensors are an error listing them (a tied model may carry a spare lm_head.weight)."""
    expected = {n for r in mapping(cfg) for n in hf_names(cfg, r)}
    missing = sorted(expected - names)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    extra = sorted(n for n in names - expected if not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if extra:
        raise ValueError(f"checkpoint has {len(extra)} unexpected tensor(s): {extra[:8]}{' ...' if len(extra) > 8 else ''}")


def empty_aligned(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """np.empty aligned to 64 bytes: a CPU jax.device_put then aliases the buffer instead of copying it."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = np.empty(nbytes + align, np.uint8)
    start = -buf.ctypes.data % align
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def param_from_hf(
    cfg: ModelConfig,
    row: Row,
    spec: Any,
    get_tensor: Callable[[str], np.ndarray],
    release: Callable[[str], None] | None = None,
) -> np.ndarray:
    """One param in our layout and dtype (spec: its ShapeDtypeStruct), stacking the layers for layer rows.

    Each HF tensor is copied in and then `release`d (e.g. its mapped pages dropped), so building a param costs the
    param plus one HF tensor; a caller that saves or places each param and lets it go streams the checkpoint."""
    out = empty_aligned(spec.shape, spec.dtype)  # [layers, ...] for layer params
    if row[0].startswith("model.layers."):
        for i, name in enumerate(hf_names(cfg, row)):
            out[i] = to_ours(get_tensor(name), tuple(spec.shape[1:]), row[2], name)  # casts to the dtype
            if release is not None:
                release(name)
    else:
        out[...] = to_ours(get_tensor(row[0]), tuple(spec.shape), row[2], row[0])
        if release is not None:
            release(row[0])
    return out


def hf_to_params(
    cfg: ModelConfig,
    get_tensor: Callable[[str], np.ndarray],
    names: set[str],
    abstract: Any,
    place: Callable[[tuple[str, ...], np.ndarray], Any] = lambda path, x: x,
    release: Callable[[str], None] | None = None,
) -> dict:
    """Build our params tree from HF tensors, one param (one stacked layer tensor) at a time.

    abstract: our params as ShapeDtypeStructs (unboxed), giving shapes and dtypes. `place` turns each host array into
    its final form (e.g. a device_put into its sharding) so no second full copy is held.
    """
    check_names(cfg, names)
    params: dict = {}
    for row in mapping(cfg):
        _set_path(params, row[1], place(row[1], param_from_hf(cfg, row, _get_path(abstract, row[1]), get_tensor, release)))
    return params


def hf_tensor_specs(cfg: ModelConfig, abstract: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of every tensor, in the order `iter_hf_tensors` yields them (param-major)."""
    specs = []
    for row in mapping(cfg):
        shape = tuple(_get_path(abstract, row[1]).shape)
        if row[0].startswith("model.layers."):
            specs += [(name, hf_shape(shape[1:], row[2])) for name in hf_names(cfg, row)]
        else:
            specs.append((row[0], hf_shape(shape, row[2])))
    return specs


def iter_hf_tensors(
    cfg: ModelConfig, get_leaf: Callable[[tuple[str, ...]], Any]
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, HF-layout host array), un-stacking the layers; `get_leaf(path)` is asked once per param."""
    for row in mapping(cfg):
        x = np.asarray(get_leaf(row[1]))
        if row[0].startswith("model.layers."):
            for i, name in enumerate(hf_names(cfg, row)):
                yield name, to_hf(x[i], row[2])
        else:
            yield row[0], to_hf(x, row[2])
        del x


def params_to_hf(cfg: ModelConfig, params: Any) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, HF-layout host array) one tensor at a time, un-stacking the layers."""
    return iter_hf_tensors(cfg, lambda path: _get_path(params, path))


def check_same_model(cfg: ModelConfig, expected: ModelConfig, source: str) -> None:
    """A checkpoint whose architecture differs from the model asked for is an error naming each differing field."""
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "dim_per_head", "tie_word_embeddings", "rope_theta", "rms_norm_eps")
    diff = [f"{f}: {getattr(cfg, f)!r} in {source}, {getattr(expected, f)!r} requested"
            for f in fields if getattr(cfg, f) != getattr(expected, f)]
    if diff:
        raise ValueError(f"{source} is not the requested model: " + "; ".join(diff))


FULL_GC_BYTES = 16 << 20  # a param at least this large is worth a full garbage collection once it is let go


def release_free_memory(nbytes: int | None = None) -> None:
    """Free the param just let go (`nbytes` large) now, not at some later garbage collection, then hand freed heap
    back to the OS. A jax.device_put onto several devices leaves its host source in a reference cycle, and
    TensorStore's buffers stay in malloc's arenas (glibc malloc_trim returns them); without this a param-by-param
    conversion's RSS ratchets up towards the model size. A full collection costs ~0.1-0.6 s, hence the threshold."""
    if nbytes is None or nbytes >= FULL_GC_BYTES:
        gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- safetensors, read lazily -------------------------------------------------------------------------------------
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_PAGE = mmap.PAGESIZE


class SafetensorsReader:
    """Memory-mapped tensors of one HF checkpoint directory (single file or sharded with an index).

    safetensors' numpy backend returns bfloat16 only since safetensors 0.8, and only once ml_dtypes has been
    imported (checked with 0.8.0: before that import it raises "data type 'bfloat16' not understood";
    requirements.txt also allows versions before 0.8), and its flax backend puts every tensor on a device; this
    reader maps the files and views each tensor in place (bfloat16 through ml_dtypes), so reading costs no copy. A
    gs:// directory is first downloaded (its safetensors files and index only) into a local temporary directory,
    which the mapping needs.
    Mapped pages a process has touched count towards its RSS until unmapped: `release(name)` drops a tensor's
    pages once it has been copied out, which keeps a streaming conversion's memory flat.
    """

    def __init__(self, hf_dir: str):
        if paths.is_url(hf_dir):
            names = ["model.safetensors.index.json", "model.safetensors"]
            idx = paths.join(hf_dir, names[0])
            if paths.exists(idx):
                try:
                    names += sorted(set(json.loads(paths.read_bytes(idx))["weight_map"].values()))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{idx}: not a safetensors index with a weight_map ({e!r})") from e
            hf_dir = paths.local_copy(hf_dir, only=tuple(names))
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        weight_map: dict[str, str] | None = None
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from e
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self._where: dict[str, tuple[mmap.mmap, str, tuple[int, ...], int, int]] = {}
        for fname in files:
            path = os.path.join(hf_dir, fname)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{index} lists {fname}, which does not exist")
            try:
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n))
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                start, end = meta["data_offsets"]
                self._where[name] = (mm, meta["dtype"], tuple(meta["shape"]), 8 + n + start, 8 + n + end)
                if end + 8 + n > len(mm):
                    raise ValueError(f"{path}: tensor {name!r} ends at byte {8 + n + end}, past the file's {len(mm)}")
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(self._where))
            if lost:
                raise ValueError(f"{index} lists tensor(s) its files lack: {lost[:8]}")

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the mapped tensor (no copy)."""
        mm, dtype, shape, start, end = self._where[name]
        if dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r}: unsupported safetensors dtype {dtype}")
        dt = np.dtype(_ST_DTYPES[dtype])
        if (end - start) != math.prod(shape) * dt.itemsize:
            raise ValueError(f"tensor {name!r}: {end - start} bytes for shape {shape} of {dtype}")
        return np.frombuffer(mm, dt, count=math.prod(shape), offset=start).reshape(shape)

    def release(self, name: str) -> None:
        """Drop the tensor's mapped pages from this process (they stay in the page cache; a later get re-reads)."""
        mm, _, _, start, end = self._where[name]
        lo = start // _PAGE * _PAGE
        if end > lo and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)


# ---- safetensors, written one tensor at a time --------------------------------------------------------------------
def plan_shards(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
    """Split tensors (given in write order by byte size) into consecutive shards of at most max_shard_bytes each;
    a tensor larger than the limit gets a shard of its own (as transformers does)."""
    shards: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if shards[-1] and total + size > max_shard_bytes:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += size
    return shards if shards[0] else []


def _safetensors_header(entries: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer pads it
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors_shards(
    out_dir: str,
    specs: list[tuple[str, tuple[int, ...]]],
    tensors: Iterator[tuple[str, np.ndarray]],
    dtype: Any,
    max_shard_bytes: int,
    progress: bool = False,
    stem: str = "model",
) -> list[str]:
    """Write `tensors` (arriving in `specs` order) as HF safetensors shards, streaming: each header is computed from
    the specs, then each tensor's bytes are appended as it arrives. Returns the file names; several shards get
    `model-0000k-of-0000n.safetensors` names and `model.safetensors.index.json`, one shard is `model.safetensors`
    (`stem` replaces "model": PEFT's adapters are `adapter_model.safetensors`)."""
    from tqdm import tqdm

    dtype = np.dtype(dtype)
    if dtype not in _ST_NAMES:
        raise ValueError(f"cannot write dtype {dtype} to safetensors")
    sizes = [math.prod(shape) * dtype.itemsize for _, shape in specs]
    shards = plan_shards(sizes, max_shard_bytes)
    n = len(shards)
    fnames = [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map = {}
    it = iter(tensors)
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="safetensors", disable=not progress) as bar:
        for fname, shard in zip(fnames, shards):
            entries = [(specs[i][0], specs[i][1], dtype) for i in shard]
            with paths.open_file(paths.join(out_dir, fname), "wb") as f:
                f.write(_safetensors_header(entries))
                for name, shape, _ in entries:
                    got_name, x = next(it)
                    if got_name != name or tuple(x.shape) != tuple(shape):
                        raise ValueError(f"tensor {got_name!r} {tuple(x.shape)} arrived where {name!r} {shape} was planned")
                    f.write(np.ascontiguousarray(x.astype(dtype, copy=False)).reshape(-1).view(np.uint8).data)
                    del x  # a view into a whole stacked param: let it go before the next one is read
                    weight_map[name] = fname
                    bar.update(math.prod(shape) * dtype.itemsize)
    if next(it, None) is not None:
        raise ValueError("more tensors arrived than were planned")
    if n > 1:
        with paths.open_file(paths.join(out_dir, f"{stem}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
    return fnames


def _write_torch_bin(out_dir: str, fnames: list[str]) -> None:
    """pytorch_model*.bin mirroring the safetensors shards (one shard in memory at a time)."""
    import torch
    from safetensors.torch import load_file

    bins = ["pytorch_model.bin"] if len(fnames) == 1 else [
        f.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for f in fnames]
    weight_map, total = {}, 0
    for st, bn in zip(fnames, bins):
        sd = load_file(os.path.join(out_dir, st))
        torch.save(sd, os.path.join(out_dir, bn))
        for k, v in sd.items():
            weight_map[k] = bn
            total += v.numel() * v.element_size()
        del sd
    if len(bins) > 1:
        with open(os.path.join(out_dir, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---- output directories: written whole or not at all --------------------------------------------------------------
def check_output(path: str, overwrite: bool = False) -> None:
    """Refuse an existing non-empty `path` unless `overwrite`: `atomic_dir` asks on entry, and a caller with slow work
    before the write (loading a base to merge into) asks first, so a refusal costs nothing."""
    if paths.exists(path) and not overwrite and (not paths.isdir(path) or paths.listdir(path)):
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary sibling of `path`; on success it is renamed to `path`, on any failure (an exception,
    Ctrl-C) it is deleted, so `path` never holds a partial result. An existing non-empty `path` is refused unless
    `overwrite`, and is then replaced only once the new output is complete.

    A URL (gs://) path: the temporary sibling is a prefix `.NAME.tmp-XXXXXXXX` beside it, copied to `path` and
    deleted when complete (an object store has no atomic rename: a reader during that copy sees part of `path`, and
    an overwrite deletes the old objects first). A failure deletes the temporary prefix."""
    if paths.is_url(path):
        with _atomic_url_dir(path, overwrite) as tmp:
            yield tmp
        return
    path = os.path.abspath(path)
    check_output(path, overwrite)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(path, os.path.join(old, name))
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _atomic_url_dir(path: str, overwrite: bool) -> Iterator[str]:
    import uuid

    path = paths.absolute(path)
    check_output(path, overwrite)
    tmp = paths.join(paths.dirname(path), f".{paths.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if paths.exists(path):
            paths.rmtree(path)
        paths.replace(tmp, path)
    except BaseException:
        paths.rmtree(tmp, ignore_errors=True)
        raise


# ---- an HF model directory ----------------------------------------------------------------------------------------
# spm.model: a SentencePiece run's tokenizer (qcjax reads it; transformers does not)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "spm.model", "generation_config.json")


def write_hf_dir(
    out_dir: str,
    cfg: ModelConfig,
    get_leaf: Callable[[tuple[str, ...]], Any],
    *,
    dtype: str | None = None,
    max_shard_size: int = 5 * 10**9,
    tokenizer_dir: str | None = None,
    torch_bin: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> str:
    """Write a transformers-loadable Qwen2ForCausalLM directory, asking `get_leaf(path)` for one param at a time.

    dtype: the tensors' dtype (default: cfg.param_dtype). Files: config.json, generation_config.json, safetensors
    (sharded at max_shard_size bytes, with model.safetensors.index.json), tokenizer files copied from tokenizer_dir
    (its generation_config.json, if any, replaces the default one), and with torch_bin pytorch_model*.bin too.
    """
    from flax import linen as nn

    from qcjax.model import abstract_params

    dtype = str(np.dtype(dtype or cfg.param_dtype))
    if torch_bin:
        import importlib.util

        if paths.is_url(out_dir):
            raise ValueError("torch_bin is not supported for a gs:// output: write locally, then copy")

        if importlib.util.find_spec("torch") is None:
            raise ValueError("torch_bin needs torch, which is not installed")
    if tokenizer_dir is not None:
        found = [f for f in TOKENIZER_FILES if paths.isfile(paths.join(tokenizer_dir, f))]
        if not any(f != "generation_config.json" for f in found):
            raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} has none of {TOKENIZER_FILES[:-1]}")
    abstract = nn.meta.unbox(abstract_params(cfg))
    specs = hf_tensor_specs(cfg, abstract)
    out_cfg = cfg.replace(param_dtype=dtype).to_hf_dict()
    with atomic_dir(out_dir, overwrite) as tmp:
        with paths.open_file(paths.join(tmp, "config.json"), "w") as f:
            json.dump(out_cfg, f, indent=2)
        gen = {k: out_cfg[k] for k in ("bos_token_id", "eos_token_id") if k in out_cfg}
        with paths.open_file(paths.join(tmp, "generation_config.json"), "w") as f:
            json.dump({**gen, "do_sample": False, "max_new_tokens": 2048}, f, indent=2)
        fnames = write_safetensors_shards(tmp, specs, iter_hf_tensors(cfg, get_leaf), dtype, max_shard_size, progress)
        if torch_bin:
            _write_torch_bin(tmp, fnames)
        if tokenizer_dir is not None:
            for fname in found:
                if paths.is_url(tokenizer_dir) or paths.is_url(tmp):
                    with paths.open_file(paths.join(tmp, fname), "wb") as f:
                        f.write(paths.read_bytes(paths.join(tokenizer_dir, fname)))
                else:
                    shutil.copyfile(os.path.join(tokenizer_dir, fname), os.path.join(tmp, fname))
    return paths.absolute(out_dir)


def save_hf(out_dir: str, cfg: ModelConfig, params: Any, **kwargs) -> str:
    """Write in-memory params as an HF directory (see `write_hf_dir` for the options)."""
    return write_hf_dir(out_dir, cfg, lambda path: _get_path(params, path), **kwargs)


def load_hf(
    hf_dir: str,
    dtype: str | None = None,
    *,
    mesh: Any = None,
    expect: ModelConfig | None = None,
    **config_overrides,
) -> tuple[ModelConfig, dict]:
    """(config, params) from an HF checkpoint directory. dtype: param dtype (default float32).

    mesh: place each param straight into its NamedSharding on this mesh (one device_put per param, so a model
    larger than one device never gathers on one); default: the default device. expect: a config the checkpoint
    must match (same shapes, tying, rope theta, norm eps), else a ValueError naming the fields.
    """
    import jax
    from flax import linen as nn

    from qcjax.model import abstract_params
    from qcjax.sharding import param_shardings

    overrides = dict(config_overrides)
    if dtype is not None:
        overrides["param_dtype"] = dtype
    cfg = ModelConfig.from_hf_json(hf_dir, **overrides)
    if expect is not None:
        check_same_model(cfg, expect, paths.join(hf_dir, "config.json"))
    reader = SafetensorsReader(hf_dir)
    check_names(cfg, reader.names())
    boxed = abstract_params(cfg)
    abstract = nn.meta.unbox(boxed)
    shardings = param_shardings(boxed, mesh) if mesh is not None else None
    params: dict = {}
    for row in mapping(cfg):
        x = param_from_hf(cfg, row, _get_path(abstract, row[1]), reader.get, reader.release)
        # jnp.asarray aliases the aligned buffer on one CPU device; a device_put onto a mesh copies into the shards.
        y = jax.numpy.asarray(x) if shardings is None else jax.device_put(x, _get_path(shardings, row[1]))
        del x
        _set_path(params, row[1], y)
        if shardings is not None:
            release_free_memory(y.nbytes)  # the host copy, before the next param is built
    return cfg, params
