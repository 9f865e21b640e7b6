"""Orbax checkpoints: the one layout that training saves and restores and that HF conversion writes.

A checkpoint directory is an Orbax CheckpointManager directory; each step holds separate items:
    params     StandardSave of the params pytree (scanned layout: every layer param has a leading layer axis)
    opt_state  StandardSave of the optimizer state (training only)
    data_iter  Grain iterator state (training only; grain.checkpoint.CheckpointHandler)
    config     JSON {"model": ModelConfig.to_dict(), ...extra, e.g. "train": {...}, a LoRA run's "adaptation":
               Adaptation.to_dict()}: a load needs no other file
A converted HF checkpoint is step 0 with params and config only.

Restores go through abstract targets (ShapeDtypeStructs carrying the target sharding), so a checkpoint saved on one
mesh restores onto any other mesh or one device, and params restore alone out of a full training checkpoint.

What a restore may decide, and where it is decided (here, once):
- A step Orbax has not committed is never listed (Orbax's own notion: its temporary directory, or no
  commit_success.txt on object stores).
- A committed step whose bytes cannot be read, or whose arrays do not match the checksums written with them at save
  time (`checksums` in the config item: two 32-bit sums per array, computed on device), is *corrupt*
  (CheckpointCorrupt); `restore_newest` then falls back to the previous step and says so.
- A readable step that does not fit what is asked for (shapes, optimizer structure, process count) is a *mismatch*
  (CheckpointMismatch): an error naming what differs, never a fallback.
- Steps beyond `max_to_keep` are deleted by `Checkpointer` itself, each deletion logged; a `protect`ed step is kept.
- Params with a non-finite value are never saved (NonFiniteParams).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from qcjax import paths as qpaths
from qcjax.config import NO_ADAPTATION, Adaptation, ModelConfig, adaptation_from_dict
from qcjax.hf import release_free_memory

PARAMS, OPT_STATE, DATA_ITER, CONFIG = "params", "opt_state", "data_iter", "config"
RUN_FIELDS = ("dtype", "remat", "attention_impl")  # config fields a restore may change (param_dtype: `dtype=`)
_METADATA_FILE = "_CHECKPOINT_METADATA"  # Orbax's per-step metadata (lists each item's handler)
CHECKSUM_CASTS = ("bfloat16",)  # float params also get the checksum of their cast, so a cast restore is verified too

log = logging.getLogger("qcjax.checkpoint")
_REPORTED: set = set()  # (directory, step, reason) of the corrupt steps this process has reported


class _QuietDiskFull(logging.Filter):
    """Drops Orbax's error logs (tracebacks from each of its threads) of a save that failed for a full disk: the
    Checkpointer raises DiskFull, one line, for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return not qpaths.is_disk_full(Exception(text))


for _name in ("absl", "asyncio"):  # Orbax's own logs; asyncio's "exception was never retrieved" of its writes
    logging.getLogger(_name).addFilter(_QuietDiskFull())


def _quiet_closed_loop(hook):
    """When one of Orbax's writes fails (a full disk), it closes its event loop while TensorStore still completes
    the others, whose callbacks then raise RuntimeError('Event loop is closed') where nobody can catch it (one
    traceback per array). The failure itself is raised (DiskFull); these are dropped, anything else is not."""
    def unraisable(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        hook(u)
    return unraisable


sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
# ... and the save coroutines of its other handlers, abandoned by that failure, are collected un-awaited at exit.
warnings.filterwarnings("ignore", message=r"coroutine '\w+CheckpointHandler\.\w+' was never awaited",
                        category=RuntimeWarning)


class CheckpointCorrupt(ValueError):
    """A committed step whose bytes cannot be read back or differ from what was saved."""

    def __init__(self, directory: str, step: int, reason: str):
        super().__init__(f"checkpoint step {step} in {directory} is corrupt or unreadable: {reason}")
        self.directory, self.step, self.reason = directory, step, reason


class CheckpointMismatch(ValueError):
    """A readable step that does not fit what the caller asks to restore (model shapes, optimizer structure,
    process count): `differences` names each."""

    def __init__(self, directory: str, step: int, differences: list[str]):
        super().__init__(f"checkpoint step {step} in {directory} does not match this run: " + "; ".join(differences))
        self.directory, self.step, self.differences = directory, step, differences


class NonFiniteParams(FloatingPointError):
    """Refused save: the params hold NaN or infinity."""


# ---- checksums: two 32-bit sums per array, on device ----------------------------------------------------------------
_M1, _M2, _M3 = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77), np.uint32(0xC2B2AE3D)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (8-byte types: two words per element)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]).astype(jnp.uint32)


def _digest(x: jax.Array) -> jax.Array:
    """[2] uint32: sum(word * odd(index)) (any single changed word changes it) and a mixed sum. Sums mod 2**32
    are exact and order-free, so the value does not depend on the sharding or the device count."""
    u = _words(x)
    idx, stride = jnp.zeros(u.shape, jnp.uint32), 1
    for d in reversed(range(u.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * np.uint32(stride % 2**32)
        stride *= u.shape[d]
    h1 = jnp.sum(u * (idx * _M1 | np.uint32(1)), dtype=jnp.uint32)
    m = u ^ (idx * _M2)
    m = (m ^ (m >> 16)) * _M3
    h2 = jnp.sum(m ^ (m >> 13), dtype=jnp.uint32)
    return jnp.stack([h1, h2])


@functools.partial(jax.jit, static_argnames=("casts",))
def _digests(tree: Any, casts: tuple[str, ...] = ()) -> tuple[Any, jax.Array]:
    def leaf(x):
        out = {jnp.dtype(x.dtype).name: _digest(x)}
        if jnp.issubdtype(x.dtype, jnp.floating):
            for dt in casts:
                if jnp.dtype(dt) != x.dtype:
                    out[jnp.dtype(dt).name] = _digest(x.astype(dt))
        return out

    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats])) if floats else jnp.array(True)
    return jax.tree.map(leaf, tree), finite


def _host(x: jax.Array) -> np.ndarray:
    """A small replicated result on the host (every process has a copy)."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def checksums(tree: Any, casts: tuple[str, ...] = ()) -> tuple[dict[str, dict[str, str]], bool]:
    """({path: {dtype: 16 hex digits}}, all float leaves finite) of a tree of arrays; `casts`: also the checksum
    of each float leaf cast to these dtypes."""
    digests, finite = _digests(tree, casts=tuple(casts))
    out = {}
    for path, per_dtype in jax.tree_util.tree_flatten_with_path(digests, is_leaf=lambda d: isinstance(d, dict)
                                                                and all(isinstance(v, jax.Array) for v in d.values()))[0]:
        out[_path_str(path)] = {dt: "".join(f"{int(w):08x}" for w in _host(h)) for dt, h in per_dtype.items()}
    return out, bool(_host(finite))


def _path_str(path) -> str:
    """A tree path as text, attribute and dict keys alike (what Orbax's metadata tree and optax's states agree on)."""
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(key))
    return "/".join(parts)


def _grain():
    try:
        import grain

        return grain
    except ImportError:
        return None


def _handlers() -> dict[str, Any]:
    handlers = {
        PARAMS: ocp.StandardCheckpointHandler(),
        OPT_STATE: ocp.StandardCheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
    }
    grain = _grain()
    if grain is not None:
        handlers[DATA_ITER] = grain.checkpoint.CheckpointHandler()
    return handlers


def config_json(cfg: ModelConfig, extra_config: dict | None = None) -> dict:
    """The config item: the full model config plus the caller's metadata (the key "model" is reserved)."""
    extra = dict(extra_config or {})
    if "model" in extra:
        raise ValueError('extra_config may not contain the key "model"; it holds the ModelConfig')
    return {"model": cfg.to_dict(), **extra}


def _one_device_mesh():
    from qcjax.sharding import make_mesh

    return make_mesh(devices=jax.devices()[:1])


def param_targets(cfg: ModelConfig, mesh=None, adaptation: Adaptation = NO_ADAPTATION) -> Any:
    """Abstract params (ShapeDtypeStructs with each param's NamedSharding on `mesh`; default one device): the restore
    target that places every param straight into its sharding (with LoRA adapters: the adapters alone)."""
    from flax import linen as nn

    from qcjax import adapters
    from qcjax.sharding import param_shardings

    boxed = adapters.abstract_params(cfg, adaptation)
    shardings = param_shardings(boxed, mesh if mesh is not None else _one_device_mesh())
    targets = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                           shardings)
    if adaptation.lora is not None:  # a LoRA run's checkpoint holds the adapters only (qcjax.loader adds the base)
        targets = adapters.split(targets)[1]
    return targets


def _as_target(tree: Any) -> Any:
    """Concrete arrays -> ShapeDtypeStructs with their sharding (what a restore needs); abstract leaves pass."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


def _shapes(tree: Any) -> list[tuple[str, tuple]]:
    """[(path, shape)] of a tree's arrays (abstract, concrete or Orbax metadata), in path order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return sorted((_path_str(p), tuple(x.shape)) for p, x in leaves if hasattr(x, "shape"))


def _describe(name: str, have: list, want: list) -> str:
    h, w = dict(have), dict(want)
    shape = [f"{p}: {h[p]} in the checkpoint, {w[p]} now" for p in sorted(set(h) & set(w)) if h[p] != w[p]]
    only_h, only_w = sorted(set(h) - set(w)), sorted(set(w) - set(h))
    parts = shape[:3] + ([f"{len(shape) - 3} more shapes differ"] if len(shape) > 3 else [])
    if only_h or only_w:
        parts.append(f"{len(only_h)} arrays only in the checkpoint ({', '.join(only_h[:2])}{' ...' if len(only_h) > 2 else ''}), "
                     f"{len(only_w)} only now ({', '.join(only_w[:2])}{' ...' if len(only_w) > 2 else ''})")
    return f"{name}: " + "; ".join(parts)


class _ReadErrors:
    errors = (OSError, ValueError, KeyError, EOFError)  # what unreadable or undecodable bytes raise

    def __init__(self, directory: str, step: int, what: str):
        self.directory, self.step, self.what = directory, step, what
        if what == CONFIG:  # a damaged JSON item can decode into the wrong types
            self.errors = self.errors + (TypeError, AttributeError)

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        # Orbax wraps a failed TensorStore read of an array in a bare Exception ("Encountered error while reading
        # array index"): that exact type, never a subclass, is a read failure too.
        if kind is not None and (issubclass(kind, self.errors) or kind is Exception) \
                and not isinstance(e, (CheckpointCorrupt, CheckpointMismatch)):
            err = e
            if "See full TensorStore details" in str(e) and (e.__cause__ or e.__context__) is not None:
                err = e.__cause__ or e.__context__  # Orbax's wrapper formats a bound method, not the details
            text = str(err).strip()
            first = text.splitlines()[0][:300] if text else ""
            raise CheckpointCorrupt(self.directory, self.step,
                                    f"reading its {self.what}: {type(err).__name__}: {first}") \
                from e
        return False


def _everywhere(ok: bool) -> bool:
    """True when `ok` holds on every process (one small all-gather when there are several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok, np.int32))))


class Checkpointer:
    """A CheckpointManager over the qcjax layout: save / wait / latest_step / restore_params / restore_train_state.

        ck = Checkpointer(dir, max_to_keep=3)                  # async saves by default
        ck.save(step, params, cfg, opt_state=opt, data_iter=it, extra_config={"train": {...}})
        ...
        ck.close()                                             # waits for the last save
    """

    def __init__(
        self,
        ckpt_dir: str,
        *,
        max_to_keep: int | None = None,
        save_interval_steps: int = 1,
        async_: bool = True,
        read_only: bool = False,
    ):
        self.directory = qpaths.absolute(ckpt_dir)  # a gs:// URL stays a URL (Orbax and TensorStore take it)
        if read_only and not qpaths.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoint directory {self.directory}")
        self.max_to_keep, self.read_only = max_to_keep, read_only
        self._protected: int | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # deletions are decided (and logged) by `prune`, which keeps the protected step
            save_interval_steps=0 if read_only else save_interval_steps,
            enable_async_checkpointing=async_,
            read_only=read_only,
            create=not read_only,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

    # ---- saving ---------------------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        params: Any,
        cfg: ModelConfig,
        *,
        opt_state: Any = None,
        data_iter: Any = None,
        extra_config: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Save a step (asynchronously unless async_=False); False when the save interval skips this step.
        Params holding a NaN or infinity are refused (NonFiniteParams). The config item records a checksum of
        every array (verified by the restores) and the process count. Older steps beyond max_to_keep are deleted
        first (`prune`), once every earlier save has been committed."""
        if not force and not self._mngr.should_save(step):
            return False
        sums, finite = checksums(params, casts=CHECKSUM_CASTS)
        if not finite:
            raise NonFiniteParams(f"step {step}: the params hold NaN or infinite values; not saving them over "
                                  f"{self.directory} (newest saved step: {self.latest_step()})")
        record = {PARAMS: sums}
        if opt_state is not None:
            record[OPT_STATE] = checksums(opt_state)[0]
        extra = {**(extra_config or {}), "checksums": record, "processes": jax.process_count()}
        self.prune()
        need, free = self._step_bytes(params, opt_state), qpaths.free_bytes(self.directory)
        if free is not None and need > free:  # refuse before Orbax writes half a step into a full disk
            raise self._disk_full(f"checkpoint step {step} (about {qpaths.human_bytes(need)})")
        args = {PARAMS: ocp.args.StandardSave(params), CONFIG: ocp.args.JsonSave(config_json(cfg, extra))}
        if opt_state is not None:
            args[OPT_STATE] = ocp.args.StandardSave(opt_state)
        if data_iter is not None:
            args[DATA_ITER] = self._grain_args("CheckpointSave", data_iter)
        with self._full_disk(f"checkpoint step {step}"):
            return self._mngr.save(step, args=ocp.args.Composite(**args), force=True)

    def _step_bytes(self, params: Any, opt_state: Any) -> int:
        """What the next step will take on disk: its arrays' bytes, or the newest saved step's size (local disks)
        where that is larger (metadata, the data iterator's state)."""
        total = 0
        steps = self.all_steps()
        if steps and not qpaths.is_url(self.directory):
            for root, _, files in os.walk(os.path.join(self.directory, str(max(steps)))):
                for f in files:
                    try:
                        total += os.path.getsize(os.path.join(root, f))
                    except OSError:
                        pass
        return max(total, sum(getattr(a, "nbytes", 0) for a in jax.tree.leaves((params, opt_state))))

    def _disk_full(self, what: str) -> OSError:
        return qpaths.DiskFull(self.directory, what,
                               f"nothing was lost: the newest complete checkpoint is step {self.latest_step()}; free "
                               "some space and rerun the same command to resume")

    @contextlib.contextmanager
    def _full_disk(self, what: str):
        """A save that fails for a full disk (Orbax reports TensorStore's ENOSPC in a ValueError) raises DiskFull in
        one line; Orbax's own error logs of it are dropped (_QuietDiskFull)."""
        try:
            yield
        except Exception as e:
            if qpaths.is_disk_full(e):
                raise self._disk_full(what) from None
            raise

    def protect(self, step: int | None) -> None:
        """Never delete this step (the newest one known to be good) while this Checkpointer prunes."""
        self._protected = step

    def prune(self) -> list[int]:
        """Delete committed steps beyond the newest max_to_keep (never the protected one), logging each; waits for
        pending saves first, so only committed steps count. Returns the deleted steps."""
        if self.max_to_keep is None or self.read_only:
            return []
        self.wait()
        deleted = []
        newest = sorted(self.all_steps(), reverse=True)
        for step in newest[self.max_to_keep:]:
            if step == self._protected:
                log.info("keeping checkpoint step %d in %s beyond keep_checkpoints=%d: the newest step known to "
                         "train finitely", step, self.directory, self.max_to_keep)
                continue
            log.info("deleting checkpoint step %d in %s (keep_checkpoints=%d keeps %s)", step, self.directory,
                     self.max_to_keep, newest[:self.max_to_keep])
            self._mngr.delete(step)
            deleted.append(step)
        return deleted

    def wait(self) -> None:
        """Block until any async save has been committed (DiskFull when it failed for a full disk)."""
        with self._full_disk("the checkpoint being saved"):
            self._mngr.wait_until_finished()

    def close(self) -> None:
        try:
            self.prune()  # waits for the last save
        finally:
            self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading ---------------------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def _step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"{self.directory} holds no checkpoint steps")
            return max(steps)
        if step not in steps:
            raise FileNotFoundError(f"{self.directory} has no step {step}; it has steps {sorted(steps)}")
        return step

    def step_dir(self, step: int | None = None) -> str:
        return qpaths.join(self.directory, str(self._step(step)))

    def read_config(self, step: int | None = None) -> tuple[ModelConfig, dict]:
        """(model config, the whole config item) of a step (default: the newest step whose config item reads, each
        skipped one reported)."""
        if step is None:
            return self.restore_newest(lambda s: self.read_config(s))[1]
        step = self._step(step)
        if not qpaths.isdir(qpaths.join(self.directory, str(step), CONFIG)):
            raise CheckpointCorrupt(self.directory, step, f"no {CONFIG!r} item (not a qcjax checkpoint, or its "
                                    f"{CONFIG}/ directory was removed)")
        with self._reading(step, CONFIG):
            meta = self._mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
        if not isinstance(meta, dict) or "model" not in meta:
            raise CheckpointCorrupt(self.directory, step, f"the {CONFIG} item has no 'model' entry")
        with self._reading(step, CONFIG):
            return ModelConfig.from_dict(meta["model"]), meta

    def restore_params(
        self,
        step: int | None = None,
        *,
        mesh=None,
        dtype: str | None = None,
        expect: ModelConfig | None = None,
        **run_overrides,
    ) -> tuple[ModelConfig, Any]:
        """(config, params) of a step, each param restored straight into its sharding on `mesh` (default: one
        device), cast to `dtype` if given, and checked against the checksums saved with it. Other items (optimizer
        state, data iterator) are not read. step None: the newest step that restores intact (a corrupt newer one
        is reported and skipped); an explicit step that is corrupt raises CheckpointCorrupt."""
        if step is None:
            return self.restore_newest(lambda s: self.restore_params(s, mesh=mesh, dtype=dtype, expect=expect,
                                                                     **run_overrides))[1]
        step = self._step(step)
        cfg, meta = self.read_config(step)
        if expect is not None:
            from qcjax.hf import check_same_model

            check_same_model(cfg, expect, f"checkpoint {self.directory} step {step}")
        bad = sorted(set(run_overrides) - set(RUN_FIELDS))
        if bad:
            raise ValueError(f"restore may override only {RUN_FIELDS} (and param dtype via dtype=); got {bad}")
        cfg = cfg.replace(**run_overrides, **({"param_dtype": str(np.dtype(dtype))} if dtype else {}))
        target = param_targets(cfg, mesh, adaptation_from_dict(meta))
        with self._reading(step, PARAMS):
            out = self._mngr.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
        self._verify(step, meta, PARAMS, out[PARAMS])
        return cfg, out[PARAMS]

    def restore_train_state(
        self,
        step: int | None = None,
        *,
        params: Any,
        opt_state: Any = None,
        data_iter: Any = None,
    ) -> dict[str, Any]:
        """Restore what the training loop saved. params / opt_state: targets (abstract ShapeDtypeStructs with
        shardings, or concrete arrays whose shape, dtype and sharding are taken); data_iter: a Grain iterator whose
        state is restored in place. Returns {"step", "config" (ModelConfig), "meta" (the config item), "params",
        "opt_state", "data_iter"}. A step whose arrays differ in shape or structure from the targets, or which
        another process count wrote (with data_iter), raises CheckpointMismatch before anything is read; one that
        does not read back intact raises CheckpointCorrupt."""
        step = self._step(step)
        cfg, meta = self.read_config(step)
        params, opt_state = _as_target(params), _as_target(opt_state)
        diffs = self.differences(step, meta, params=params, opt_state=opt_state,
                                 processes=jax.process_count() if data_iter is not None else None)
        if diffs:
            raise CheckpointMismatch(self.directory, step, diffs)
        args = {PARAMS: ocp.args.StandardRestore(params)}
        if opt_state is not None:
            args[OPT_STATE] = ocp.args.StandardRestore(opt_state)
        if data_iter is not None:
            args[DATA_ITER] = self._grain_args("CheckpointRestore", data_iter)
        with self._reading(step, "train state"):
            out = self._mngr.restore(step, args=ocp.args.Composite(**args))
        self._verify(step, meta, PARAMS, out[PARAMS])
        if opt_state is not None:
            self._verify(step, meta, OPT_STATE, out[OPT_STATE])
        return {"step": step, "config": cfg, "meta": meta, "params": out[PARAMS],
                "opt_state": out.get(OPT_STATE) if opt_state is not None else None,
                "data_iter": out.get(DATA_ITER) if data_iter is not None else None}

    def restore_newest(self, attempt: Callable[[int], Any], steps: Sequence[int] | None = None
                       ) -> tuple[int, Any, list[int]]:
        """(step, attempt(step), corrupt steps) for the newest step (of `steps`, default all committed ones) that
        `attempt` restores; a CheckpointCorrupt step is reported and the previous one tried. The processes agree:
        a step corrupt on any of them is corrupt on all. Any other error (a mismatch) is raised. No step left:
        FileNotFoundError naming the corrupt ones."""
        corrupt = []
        for step in sorted(self.all_steps() if steps is None else steps, reverse=True):
            err = None
            try:
                result = attempt(step)
            except CheckpointCorrupt as e:
                err = e
            if not _everywhere(err is None):
                err = err or CheckpointCorrupt(self.directory, step, "unreadable on another process")
            if err is None:
                return step, result, corrupt
            if (self.directory, step, err.reason) not in _REPORTED:  # once per process, however often it is read
                _REPORTED.add((self.directory, step, err.reason))
                print(f"[qcjax] checkpoint step {step} is corrupt or unreadable ({err.reason}); falling back to an "
                      "earlier one", file=sys.stderr)
            corrupt.append(step)
        if corrupt:
            raise FileNotFoundError(f"{self.directory}: no intact checkpoint step; corrupt or unreadable: {corrupt}")
        raise FileNotFoundError(f"{self.directory} holds no checkpoint steps")

    def differences(self, step: int, meta: dict, *, params: Any = None, opt_state: Any = None,
                    processes: int | None = None) -> list[str]:
        """What keeps `step` from restoring into these targets: array shapes and tree structure per item (from
        Orbax's metadata, so older checkpoints are checked too) and the process count that wrote the data
        iterator. [] when it fits."""
        diffs = []
        with self._reading(step, "metadata"):
            saved = self._mngr.item_metadata(step)
        for name, target in ((PARAMS, params), (OPT_STATE, opt_state)):
            if target is None:
                continue
            item = saved.get(name) if hasattr(saved, "get") else None
            if item is None:
                diffs.append(f"the checkpoint has no {name!r} item")
                continue
            have = _shapes(getattr(item, "tree", item))
            want = _shapes(target)
            if have != want:
                diffs.append(_describe(name, have, want))
        if processes is not None:
            wrote = meta.get("processes") or self._iterator_processes(step)
            if wrote is not None and wrote != processes:
                diffs.append(f"process count: {wrote} in the checkpoint, {processes} now (the data iterator's "
                             "position is saved per process)")
        return diffs

    def _iterator_processes(self, step: int) -> int | None:
        d = qpaths.join(self.directory, str(step), DATA_ITER)
        names = qpaths.listdir(d) if qpaths.isdir(d) else []
        counts = {int(n.rsplit("-of-", 1)[1].split(".")[0]) for n in names if "-of-" in n}
        return counts.pop() if len(counts) == 1 else None

    def _verify(self, step: int, meta: dict, name: str, tree: Any) -> None:
        saved = (meta.get("checksums") or {}).get(name)
        if saved is None:  # written before checksums existed, or by the converter
            return
        got, _ = checksums(tree)
        bad, unchecked = [], 0
        for path, per_dtype in got.items():
            (dt, value), = per_dtype.items()
            want = saved.get(path, {}).get(dt)
            if want is None:
                unchecked += 1
            elif want != value:
                bad.append(path)
        if bad:
            raise CheckpointCorrupt(self.directory, step, f"{len(bad)} array(s) of {name!r} differ from their "
                                    f"checksum at save time ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
        if unchecked:
            log.warning("checkpoint step %d: %d array(s) of %r restored in a dtype without a saved checksum; not "
                        "verified", step, unchecked, name)

    def _reading(self, step: int, what: str):
        """Read errors (missing or unreadable files, undecodable bytes) become CheckpointCorrupt."""
        return _ReadErrors(self.directory, step, what)

    @staticmethod
    def _grain_args(kind: str, it: Any) -> Any:
        grain = _grain()
        if grain is None:
            raise ValueError("saving or restoring a data iterator needs grain, which is not installed")
        return getattr(grain.checkpoint, kind)(it)


# ---- module-level shortcuts ---------------------------------------------------------------------------------------
def save(
    ckpt_dir: str,
    step: int,
    params: Any,
    cfg: ModelConfig,
    opt_state: Any = None,
    data_iter: Any = None,
    extra_config: dict | None = None,
    async_: bool = True,
) -> Checkpointer:
    """Save one step; returns the open Checkpointer (call .wait() or .close() to be sure an async save landed)."""
    ck = Checkpointer(ckpt_dir, async_=async_)
    ck.save(step, params, cfg, opt_state=opt_state, data_iter=data_iter, extra_config=extra_config, force=True)
    return ck


def restore_params(
    ckpt_dir: str, step: int | None = None, mesh=None, dtype: str | None = None, **kwargs
) -> tuple[ModelConfig, Any]:
    """(config, params) out of any qcjax checkpoint (converted or training), onto `mesh` (default one device)."""
    with Checkpointer(ckpt_dir, read_only=True) as ck:
        return ck.restore_params(step, mesh=mesh, dtype=dtype, **kwargs)


def restore_train_state(ckpt_dir: str, step: int | None = None, **kwargs) -> dict[str, Any]:
    """See Checkpointer.restore_train_state."""
    with Checkpointer(ckpt_dir, read_only=True) as ck:
        return ck.restore_train_state(step, **kwargs)


def read_config(ckpt_dir: str, step: int | None = None) -> tuple[ModelConfig, dict]:
    with Checkpointer(ckpt_dir, read_only=True) as ck:
        return ck.read_config(step)


# ---- streaming: one param at a time (conversion) ------------------------------------------------------------------
def _nest(path: tuple[str, ...], value: Any) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


def _partial_api():
    try:
        from orbax.checkpoint.experimental.v1 import partial

        return partial
    except ImportError:  # older Orbax: fall back to one whole-tree save
        return None


def save_params_streaming(
    ckpt_dir: str,
    cfg: ModelConfig,
    paths: Sequence[tuple[str, ...]],
    get_leaf: Callable[[tuple[str, ...]], Any],
    *,
    step: int = 0,
    extra_config: dict | None = None,
    progress: bool = False,
) -> None:
    """Write a params-only step into a new checkpoint directory, asking `get_leaf(path)` for one param at a time.

    Each param is written by an Orbax partial save, dropped and its memory released before the next is asked for,
    so one param is in memory at once (get_leaf must not keep a reference). The result is the params item a
    whole-tree StandardSave writes, restored by the same code. An Orbax without partial saving gets a whole-tree save.
    """
    from tqdm import tqdm

    ckpt_dir = qpaths.absolute(ckpt_dir)
    if qpaths.exists(ckpt_dir) and qpaths.listdir(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} is not empty")
    partial = _partial_api()
    bar = tqdm(paths, unit="param", desc="params", disable=not progress)  # iterates the paths only
    with Checkpointer(ckpt_dir, async_=False) as ck:
        if partial is None:
            tree: dict = {}
            for path in bar:
                node = tree
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = get_leaf(path)
            ck.save(step, tree, cfg, extra_config=extra_config, force=True)
            return
        ck._mngr.save(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonSave(config_json(cfg, extra_config))}),
                      force=True)
    # Orbax's partial save cannot write to an object store (its commit-file temporary paths have no snapshot), so
    # for a gs:// checkpoint the params item is built in a local scratch directory and then uploaded.
    local_scratch = tempfile.mkdtemp(prefix="qcjax-partial-") if qpaths.is_url(ckpt_dir) else None
    scratch = os.path.join(local_scratch or ckpt_dir, f"_{PARAMS}_partial")  # no dots: Orbax parses the name
    try:
        for path in bar:
            x = get_leaf(path)
            partial.save(scratch, _nest(path, x))
            nbytes = x.nbytes
            del x
            release_free_memory(nbytes)
        partial.finalize(scratch)
        items = [d for d in os.listdir(scratch) if os.path.exists(os.path.join(scratch, d, "_METADATA"))]
        if len(items) != 1:
            raise RuntimeError(f"Orbax partial save left {sorted(os.listdir(scratch))} in {scratch}; expected one "
                               "pytree")
        step_dir = qpaths.join(ckpt_dir, str(step))
        if local_scratch:
            qpaths.upload(os.path.join(scratch, items[0]), qpaths.join(step_dir, PARAMS))
            # On object stores Orbax takes an item as complete only with its commit marker (what it writes itself).
            with qpaths.open_file(qpaths.join(step_dir, PARAMS, "commit_success.txt"), "w") as f:
                f.write(f"Checkpoint commit was successful to {qpaths.join(step_dir, PARAMS)}")
        else:
            os.rename(os.path.join(scratch, items[0]), os.path.join(step_dir, PARAMS))
            shutil.rmtree(scratch)
    finally:
        if local_scratch:
            shutil.rmtree(local_scratch, ignore_errors=True)
    # Record the params item's handler as a StandardSave would, so Orbax finds it without being told.
    meta_path = qpaths.join(step_dir, _METADATA_FILE)
    with qpaths.open_file(meta_path) as f:
        meta = json.load(f)
    h = ocp.StandardCheckpointHandler
    meta.setdefault("item_handlers", {})[PARAMS] = f"{h.__module__}.{h.__qualname__}"
    with qpaths.open_file(meta_path, "w") as f:
        json.dump(meta, f)


class ParamsReader:
    """One param at a time out of a step's params item (an Orbax partial restore), as a host numpy array.

    Works on converted and full training checkpoints alike (only the params item is read)."""

    def __init__(self, ckpt_dir: str, step: int | None = None):
        with Checkpointer(ckpt_dir, read_only=True) as ck:
            self.step = ck._step(step)
            self.config, self.meta = ck.read_config(self.step)
            self.directory = qpaths.join(ck.step_dir(self.step), PARAMS)
        if not qpaths.isdir(self.directory):
            raise ValueError(f"{ck.directory} step {self.step} has no {PARAMS!r} item")
        self._ckptr = ocp.PyTreeCheckpointer()
        self._last_nbytes = 0

    def __call__(self, path: tuple[str, ...], dtype: Any = None) -> np.ndarray:
        release_free_memory(self._last_nbytes)  # the previous param (the caller has let it go), its buffers
        x = self._read(path, dtype)
        self._last_nbytes = x.nbytes
        return x

    def _read(self, path: tuple[str, ...], dtype: Any) -> np.ndarray:
        args = ocp.args.PyTreeRestore(
            item=_nest(path, 0),
            restore_args=_nest(path, ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)),
            partial_restore=True,
        )
        out = self._ckptr.restore(self.directory, args=args)
        for key in path:
            out = out[key]
        return out
