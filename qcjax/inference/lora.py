"""Many LoRA adapters over one served base, host side: reading an adapter (a qcjax LoRA checkpoint or a PEFT
directory) and checking it against the base, and the slot table of the device bank (qcjax.row_lora) that the
engine's programs read each row's adapter from.

    slots = LoraSlots(cfg, max_loras=4, max_rank=16)
    slots.add("py", read_adapter("runs/py-lora", cfg))       # host arrays, checked; any thread
    Engine(cfg, params, lora=slots).submit([Request(tokens, 32, adapter="py")])

Every registered adapter's arrays stay in host memory; `max_loras` of them are resident in the device bank at once.
A request's adapter is put in a slot when the request is admitted (a copy of its arrays, between two device calls
of the engine's thread), and stays there while any row uses it; a slot no row uses is reused least recently used
first, and an evicted adapter comes back from host memory when a request asks for it again.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qcjax import paths, platform, row_lora
from qcjax.config import LORA_PROJECTIONS, LORA_TARGETS, LoraSpec, ModelConfig


@dataclasses.dataclass
class Adapter:
    """One adapter's host arrays: per target {"a": [layers, in, rank], "b": [layers, rank, out]} (float32), the
    scale its output is multiplied by (alpha / rank; alpha / sqrt(rank) for rsLoRA) and where it came from."""

    arrays: dict[str, dict[str, np.ndarray]]
    rank: int
    scale: float
    source: str

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in LORA_TARGETS if t in self.arrays)

    def as_single(self) -> tuple[LoraSpec, Any]:
        """This adapter as the one-adapter path (qcjax.adapters, qwix) holds one: its LoraSpec (alpha such that
        alpha / rank is this adapter's scale, rsLoRA's included) and the adapter tree to `adapters.combine` with a
        base."""
        from qcjax import adapters

        tree: dict = {"layers": {}}
        for t in self.targets:
            group, name = LORA_PROJECTIONS[t]
            tree["layers"].setdefault(group, {})[name] = {adapters.LORA_A: self.arrays[t]["a"],
                                                          adapters.LORA_B: self.arrays[t]["b"]}
        return LoraSpec(rank=self.rank, alpha=self.scale * self.rank, targets=self.targets), tree

    def merged_into(self, params: Any, dtype: Any = None) -> Any:
        """The base `params` with this adapter folded into its kernels (qcjax.adapters.merge): the model a server
        per adapter would run, in `dtype` (default: the kernels')."""
        from qcjax import adapters

        spec, tree = self.as_single()
        return adapters.merge(spec, adapters.combine(params, tree), dtype)


# ---- reading ----------------------------------------------------------------------------------------------------------
def read_adapter(path: str, cfg: ModelConfig) -> Adapter:
    """The adapter at `path` (a PEFT directory: adapter_config.json; else a qcjax LoRA checkpoint, any of a run's
    names for it), checked against the base `cfg`. ValueError with one line naming what differs."""
    path = str(path)
    if not paths.isdir(path):
        raise ValueError(f"{path}: no such directory (expected a PEFT adapter directory or a qcjax LoRA checkpoint)")
    if paths.exists(paths.join(path, "adapter_config.json")):
        return _read_peft(path, cfg)
    return _read_qcjax(path, cfg)


def _check_shape(x: np.ndarray, want: tuple[int, ...], what: str, source: str) -> None:
    if tuple(x.shape) != want:
        raise ValueError(f"{source}: {what} has shape {tuple(x.shape)}, the base needs {want}")


def _read_qcjax(path: str, cfg: ModelConfig) -> Adapter:
    from qcjax.checkpoint import read_config, restore_params
    from qcjax.config import adaptation_from_dict
    from qcjax.loader import is_hf_dir, resolve_checkpoint

    ckpt, step = resolve_checkpoint(path)
    if is_hf_dir(ckpt):
        raise ValueError(f"{path}: a whole model (config.json), not an adapter")
    try:
        spec = adaptation_from_dict(read_config(ckpt, step)[1]).lora
        if spec is None:
            raise ValueError(f"{path}: a checkpoint without LoRA adapters (its config has no lora)")
        _, tree = restore_params(ckpt, step, expect=cfg, dtype="float32")
    except (OSError, KeyError) as e:
        raise ValueError(f"{path}: not a PEFT adapter directory or a qcjax checkpoint ({e})") from None
    arrays = {}
    for t in spec.targets:
        group, name = LORA_PROJECTIONS[t]
        node = tree["layers"][group][name]
        n_in, n_out = row_lora.target_dims(cfg, t)
        a = np.asarray(jax.device_get(node["kernel_lora_a"]), np.float32)
        b = np.asarray(jax.device_get(node["kernel_lora_b"]), np.float32)
        _check_shape(a, (cfg.num_layers, n_in, spec.rank), f"{name} lora_a", path)
        _check_shape(b, (cfg.num_layers, spec.rank, n_out), f"{name} lora_b", path)
        arrays[t] = {"a": a, "b": b}
    return Adapter(arrays, spec.rank, float(spec.scale), path)


def _peft_modules() -> dict[str, str]:
    """HF module short name ("q_proj") -> our target ("q") (the names the one HF mapping gives the projections)."""
    return {name: t for t, (_, name) in LORA_PROJECTIONS.items()}


def _read_peft(path: str, cfg: ModelConfig) -> Adapter:
    from safetensors.numpy import load

    from qcjax.peft_export import ADAPTER_FILES, PEFT_PREFIX, template

    with paths.open_file(paths.join(path, ADAPTER_FILES[0])) as f:
        try:
            conf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}/{ADAPTER_FILES[0]}: not JSON ({e})") from None
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {conf.get('peft_type')!r}; only LORA adapters are served")
    for key, ok in (("use_dora", False), ("bias", "none")):
        if conf.get(key, ok) not in (ok, None):
            raise ValueError(f"{path}: {key}={conf[key]!r} is not served (plain LoRA on the projections only)")
    if conf.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save={conf['modules_to_save']} (whole trained modules) is not served")
    rank, alpha = int(conf["r"]), float(conf.get("lora_alpha", conf["r"]))
    for key in ("rank_pattern", "alpha_pattern"):
        if conf.get(key):
            raise ValueError(f"{path}: {key} (per-module ranks or alphas) is not served")
    scale = alpha / (rank ** 0.5 if conf.get("use_rslora") else rank)
    weights = paths.join(path, ADAPTER_FILES[1])
    if not paths.exists(weights):
        raise ValueError(f"{path}: no {ADAPTER_FILES[1]} (only safetensors adapters are read)")
    with paths.open_file(weights, "rb") as f:
        tensors = load(f.read())
    modules = _peft_modules()
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for name, x in sorted(tensors.items()):  # in name order: the same tensor named first on every read
        core = name.removeprefix(PEFT_PREFIX)
        parts = core.split(".")
        # model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}[.default].weight
        if len(parts) < 6 or parts[:2] != ["model", "layers"] or not parts[2].isdigit() or parts[-1] != "weight":
            raise ValueError(f"{path}: tensor {name} is not a LoRA weight of a decoder layer's projection")
        layer, module, kind = int(parts[2]), parts[4], parts[5]
        t = modules.get(module)
        if t is None or kind not in ("lora_A", "lora_B") or core != _peft_name(template(t), layer, kind, parts):
            raise ValueError(f"{path}: tensor {name} is not a LoRA weight of one of {sorted(modules)}")
        if layer >= cfg.num_layers:
            raise ValueError(f"{path}: tensor {name} is for layer {layer}; the base has {cfg.num_layers} layers")
        n_in, n_out = row_lora.target_dims(cfg, t)
        want = (rank, n_in) if kind == "lora_A" else (n_out, rank)
        _check_shape(x, want, f"tensor {name}", path)
        node = arrays.setdefault(t, {"a": np.zeros((cfg.num_layers, n_in, rank), np.float32),
                                     "b": np.zeros((cfg.num_layers, rank, n_out), np.float32)})
        node["a" if kind == "lora_A" else "b"][layer] = np.asarray(x, np.float32).T
    if not arrays:
        raise ValueError(f"{path}: {ADAPTER_FILES[1]} holds no LoRA weights")
    return Adapter(arrays, rank, scale, path)


def _peft_name(tmpl: str, layer: int, kind: str, parts: list[str]) -> str:
    """The expected name of a tensor (keeping a ".default" adapter name where the file has one)."""
    name = tmpl.format(i=layer) + f".{kind}"
    return name + (".default" if "default" in parts[6:-1] else "") + ".weight"


# ---- the slot table ---------------------------------------------------------------------------------------------------
class LoraSlots:
    """The registered adapters (host) and which of them sit in the device bank's `max_loras` slots. `add`/`remove`
    from any thread; `acquire`/`release`/`bank` from the engine's thread only (they touch the device)."""

    def __init__(self, cfg: ModelConfig, *, max_loras: int, max_rank: int, targets=LORA_TARGETS,
                 dtype: Any = None, mesh=None):
        """dtype: the bank's (default: `platform.adapter_dtype` of the compute dtype)."""
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras={max_loras}, max_rank={max_rank}: both must be >= 1")
        bad = sorted(set(targets) - set(LORA_TARGETS))
        if bad or not targets:
            raise ValueError(f"LoRA targets {list(targets)}: each must be one of {list(LORA_TARGETS)}")
        self.cfg, self.max_loras, self.max_rank = cfg, int(max_loras), int(max_rank)
        self.targets = tuple(t for t in LORA_TARGETS if t in targets)
        self.dtype = jnp.dtype(dtype or platform.adapter_dtype(cfg.dtype))
        self.mesh = mesh
        self._lock = threading.Lock()
        self._adapters: dict[str, tuple[Adapter, int]] = {}  # name -> (adapter, generation)
        self._gen = itertools.count(1)
        self._slot_of: dict[tuple[str, int], int] = {}  # (name, generation) -> slot
        self._held: list[tuple[str, int] | None] = [None] * self.max_loras
        self._refs = [0] * self.max_loras
        self._used = [0] * self.max_loras
        self._tick = itertools.count(1)
        self._bank: dict | None = None
        self.loads = 0  # adapters copied into the bank (first loads and reloads after eviction)

    # -- registry (any thread) --
    def check(self, a: Adapter, name: str) -> None:
        """ValueError naming what does not fit this bank: rank above max_rank, targets the bank does not hold."""
        if a.rank > self.max_rank:
            raise ValueError(f"adapter {name!r} ({a.source}) has rank {a.rank}; the server holds ranks up to "
                             f"{self.max_rank} (--max_lora_rank)")
        extra = [t for t in a.targets if t not in self.targets]
        if extra:
            raise ValueError(f"adapter {name!r} ({a.source}) adapts {extra}; the server's adapters target "
                             f"{list(self.targets)}")

    def add(self, name: str, a: Adapter) -> None:
        """Register an adapter under `name` (ValueError: the name is taken, or the adapter does not fit)."""
        if not name or not isinstance(name, str):
            raise ValueError(f"adapter name {name!r}: must be a non-empty string")
        self.check(a, name)
        with self._lock:
            if name in self._adapters:
                raise ValueError(f"an adapter named {name!r} is already loaded (unload it first)")
            self._adapters[name] = (a, next(self._gen))

    def remove(self, name: str) -> None:
        """Unregister `name` (KeyError if unknown). Rows already running with it finish with it."""
        with self._lock:
            del self._adapters[name]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def sources(self) -> dict[str, str]:
        """name -> where each registered adapter was read from."""
        with self._lock:
            return {n: a.source for n, (a, _) in self._adapters.items()}

    def registration(self, name: str) -> tuple[str, int]:
        """(name, generation): which registration of `name` a request gets (KeyError if none). The engine keys the
        request's prefix-cache pages by it, so pages computed under one adapter are never reused under another (nor
        under a later adapter of the same name), and asks `acquire` for that registration."""
        with self._lock:
            return name, self._adapters[name][1]

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._adapters

    # -- the device bank (engine thread) --
    def bank(self) -> dict:
        if self._bank is None:
            bank = row_lora.empty_bank(self.cfg, self.max_loras, self.max_rank, self.targets, self.dtype)
            if self.mesh is not None:
                bank = jax.device_put(bank, bank_shardings(self.cfg, bank, self.mesh))
            self._bank = bank
        return self._bank

    def warmup(self) -> None:
        """Make the bank and compile the copy into a slot (an empty slot gets zeros), so serving compiles nothing."""
        empty = [i for i in range(self.max_loras) if self._held[i] is None]
        if empty:
            zero = Adapter({}, self.max_rank, 0.0, "warm-up")
            self._bank = row_lora.put(self.bank(), jnp.int32(empty[0]), self._padded(zero), jnp.float32(0.0))

    def acquire(self, name: str, generation: int | None = None) -> int | None:
        """The slot holding `name` (copied in now if it is not resident), held until `release`; None when every
        slot is held by running rows. KeyError: `name` is not registered (or no longer the generation asked for)."""
        with self._lock:
            a, gen = self._adapters[name]
        if generation is not None and generation != gen:
            raise KeyError(name)
        key = (name, gen)
        slot = self._slot_of.get(key)
        if slot is None:
            free = [i for i in range(self.max_loras) if self._refs[i] == 0]
            if not free:
                return None
            slot = min(free, key=lambda i: self._used[i])  # empty slots (never used) first, then least recent
            if self._held[slot] is not None:
                del self._slot_of[self._held[slot]]
            self._bank = row_lora.put(self.bank(), jnp.int32(slot), self._padded(a), jnp.float32(a.scale))
            self._held[slot] = key
            self._slot_of[key] = slot
            self.loads += 1
        self._refs[slot] += 1
        self._used[slot] = next(self._tick)
        return slot

    def release(self, slot: int) -> None:
        if slot >= 0:
            self._refs[slot] -= 1

    def resident(self) -> dict[str, int]:
        """name -> slot of the adapters in the bank now (a stale generation's are left out)."""
        with self._lock:
            live = {(n, g) for n, (_, g) in self._adapters.items()}
        return {k[0]: s for k, s in self._slot_of.items() if k in live}

    def _padded(self, a: Adapter) -> dict:
        """The adapter as the bank's slot takes it: every bank target (zeros where the adapter has none), the rank
        zero-padded to max_rank (exact: the padding adds zeros)."""
        out = {}
        r = self.max_rank
        for t in self.targets:
            n_in, n_out = row_lora.target_dims(self.cfg, t)
            layers = self.cfg.num_layers
            av = np.zeros((layers, n_in, r), np.float32)
            bv = np.zeros((layers, r, n_out), np.float32)
            if t in a.arrays:
                av[:, :, : a.rank] = a.arrays[t]["a"]
                bv[:, : a.rank, :] = a.arrays[t]["b"]
            out[t] = {"a": av.astype(self.dtype), "b": bv.astype(self.dtype)}
        return out


def bank_shardings(cfg: ModelConfig, bank: dict, mesh) -> dict:
    """A's input dim and B's output dim split as the kernel's (the logical-axis rules); slots and rank whole."""
    from jax.sharding import NamedSharding

    from qcjax.sharding import logical_to_spec

    dims = {"q": ("embed", "heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"), "o": ("heads", "embed"),
            "gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed")}
    out: dict[str, Any] = {}
    for t, node in bank.items():
        if t == "scale":
            out[t] = NamedSharding(mesh, logical_to_spec((None,)))
            continue
        i, o = dims[t]
        out[t] = {"a": NamedSharding(mesh, logical_to_spec(("layers", None, i, None), node["a"].shape, mesh)),
                  "b": NamedSharding(mesh, logical_to_spec(("layers", None, None, o), node["b"].shape, mesh))}
    return out


__all__ = ["Adapter", "LoraSlots", "bank_shardings", "read_adapter"]
