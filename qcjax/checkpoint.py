"""Orbax checkpoints: the one layout that training saves and restores and that HF conversion writes.

A checkpoint directory is an Orbax CheckpointManager directory; each step holds separate items:
    params     StandardSave of the params pytree (scanned layout: every layer param has a leading layer axis)
    opt_state  StandardSave of the optimizer state (training only)
    data_iter  Grain iterator state (training only; grain.checkpoint.CheckpointHandler)
    config     JSON {"model": ModelConfig.to_dict(), ...extra, e.g. "train": {...}}: a load needs no other file
A converted HF checkpoint is step 0 with params and config only.

Restores go through abstract targets (ShapeDtypeStructs carrying the target sharding), so a checkpoint saved on one
mesh restores onto any other mesh or one device, and params restore alone out of a full training checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from qcjax.config import ModelConfig
from qcjax.hf import release_free_memory

PARAMS, OPT_STATE, DATA_ITER, CONFIG = "params", "opt_state", "data_iter", "config"
RUN_FIELDS = ("dtype", "remat", "attention_impl")  # config fields a restore may change (param_dtype: `dtype=`)
_METADATA_FILE = "_CHECKPOINT_METADATA"  # Orbax's per-step metadata (lists each item's handler)


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


def param_targets(cfg: ModelConfig, mesh=None) -> Any:
    """Abstract params (ShapeDtypeStructs with each param's NamedSharding on `mesh`; default one device): the restore
    target that places every param straight into its sharding."""
    from flax import linen as nn

    from qcjax.model import abstract_params
    from qcjax.sharding import param_shardings

    boxed = abstract_params(cfg)
    shardings = param_shardings(boxed, mesh if mesh is not None else _one_device_mesh())
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed), shardings)


def _as_target(tree: Any) -> Any:
    """Concrete arrays -> ShapeDtypeStructs with their sharding (what a restore needs); abstract leaves pass."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


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
        self.directory = os.path.abspath(ckpt_dir)
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoint directory {self.directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
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
        """Save a step (asynchronously unless async_=False); False when the save interval skips this step."""
        args = {PARAMS: ocp.args.StandardSave(params), CONFIG: ocp.args.JsonSave(config_json(cfg, extra_config))}
        if opt_state is not None:
            args[OPT_STATE] = ocp.args.StandardSave(opt_state)
        if data_iter is not None:
            args[DATA_ITER] = self._grain_args("CheckpointSave", data_iter)
        return self._mngr.save(step, args=ocp.args.Composite(**args), force=force)

    def wait(self) -> None:
        """Block until any async save has been committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
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
        return os.path.join(self.directory, str(self._step(step)))

    def read_config(self, step: int | None = None) -> tuple[ModelConfig, dict]:
        """(model config, the whole config item) of a step (default: the latest)."""
        step = self._step(step)
        if not os.path.isdir(os.path.join(self.directory, str(step), CONFIG)):
            raise ValueError(f"{self.directory} step {step} has no {CONFIG!r} item: not a qcjax checkpoint")
        meta = self._mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
        if "model" not in meta:
            raise ValueError(f"{self.directory} step {step}: the config item has no 'model' entry")
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
        device), cast to `dtype` if given. Other items (optimizer state, data iterator) are not read."""
        step = self._step(step)
        cfg, _ = self.read_config(step)
        if expect is not None:
            from qcjax.hf import check_same_model

            check_same_model(cfg, expect, f"checkpoint {self.directory} step {step}")
        bad = sorted(set(run_overrides) - set(RUN_FIELDS))
        if bad:
            raise ValueError(f"restore may override only {RUN_FIELDS} (and param dtype via dtype=); got {bad}")
        cfg = cfg.replace(**run_overrides, **({"param_dtype": str(np.dtype(dtype))} if dtype else {}))
        target = param_targets(cfg, mesh)
        out = self._mngr.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
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
        "opt_state", "data_iter"}."""
        step = self._step(step)
        cfg, meta = self.read_config(step)
        args = {PARAMS: ocp.args.StandardRestore(_as_target(params))}
        if opt_state is not None:
            args[OPT_STATE] = ocp.args.StandardRestore(_as_target(opt_state))
        if data_iter is not None:
            args[DATA_ITER] = self._grain_args("CheckpointRestore", data_iter)
        out = self._mngr.restore(step, args=ocp.args.Composite(**args))
        return {"step": step, "config": cfg, "meta": meta, "params": out[PARAMS],
                "opt_state": out.get(OPT_STATE) if opt_state is not None else None,
                "data_iter": out.get(DATA_ITER) if data_iter is not None else None}

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

    ckpt_dir = os.path.abspath(ckpt_dir)
    if os.path.exists(ckpt_dir) and os.listdir(ckpt_dir):
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
    scratch = os.path.join(ckpt_dir, f"_{PARAMS}_partial")  # no dots: Orbax parses the name
    for path in bar:
        x = get_leaf(path)
        partial.save(scratch, _nest(path, x))
        nbytes = x.nbytes
        del x
        release_free_memory(nbytes)
    partial.finalize(scratch)
    items = [d for d in os.listdir(scratch) if os.path.exists(os.path.join(scratch, d, "_METADATA"))]
    if len(items) != 1:
        raise RuntimeError(f"Orbax partial save left {sorted(os.listdir(scratch))} in {scratch}; expected one pytree")
    step_dir = os.path.join(ckpt_dir, str(step))
    os.rename(os.path.join(scratch, items[0]), os.path.join(step_dir, PARAMS))
    shutil.rmtree(scratch)
    # Record the params item's handler as a StandardSave would, so Orbax finds it without being told.
    meta_path = os.path.join(step_dir, _METADATA_FILE)
    with open(meta_path) as f:
        meta = json.load(f)
    h = ocp.StandardCheckpointHandler
    meta.setdefault("item_handlers", {})[PARAMS] = f"{h.__module__}.{h.__qualname__}"
    with open(meta_path, "w") as f:
        json.dump(meta, f)


class ParamsReader:
    """One param at a time out of a step's params item (an Orbax partial restore), as a host numpy array.

    Works on converted and full training checkpoints alike (only the params item is read)."""

    def __init__(self, ckpt_dir: str, step: int | None = None):
        with Checkpointer(ckpt_dir, read_only=True) as ck:
            self.step = ck._step(step)
            self.config, self.meta = ck.read_config(self.step)
            self.directory = os.path.join(ck.step_dir(self.step), PARAMS)
        if not os.path.isdir(self.directory):
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
