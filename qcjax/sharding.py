"""Meshes and the logical-axis rules: the only place that decides which mesh axis shards which tensor dimension.

Params and activations carry logical axis names (embed, heads, mlp, ...); `LOGICAL_RULES` maps each name to mesh
axes. A dimension that a mesh axis does not divide evenly (e.g. 2 KV heads over tensor=4) is replicated instead of
failing, so every preset runs on every mesh.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# context: sequence (context) parallelism - activations split along the sequence, keys and values gathered for
# attention (all-gather, as MaxText's context_parallel_strategy="all_gather"); for long rows (the 32K repo stage)
# whose saved activations do not fit one chip.
MESH_AXES = ("data", "fsdp", "context", "tensor")

# logical name -> mesh axes (a tuple shards one dimension over several axes). Every name the model uses is here:
# an unmapped name would be passed through verbatim as a mesh axis name.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # params
    ("vocab", "tensor"),
    ("embed", ("fsdp", "context")),  # context devices also hold a share of the weights (as fsdp), as in MaxText
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
)
_RULES = dict(LOGICAL_RULES)


def make_mesh(shape: dict[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
    """A (data, fsdp, context, tensor) mesh; one size may be -1 (the rest). Default: everything on fsdp."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if shape is None:
        shape = {"data": 1, "fsdp": -1, "context": 1, "tensor": 1}
    if not isinstance(shape, dict):
        shape = dict(zip(MESH_AXES, shape))
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} unknown; the mesh axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {shape}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh {shape}: {n} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; there are {n}")
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    dev = np.asarray(devices).reshape(sizes)
    return Mesh(dev, MESH_AXES, axis_types=axis_types)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
    """Map logical names to a PartitionSpec; with shape and mesh, replicate dims the mesh axes don't divide."""
    out = []
    used: set[str] = set()
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in _RULES:
            raise KeyError(f"logical axis {name!r} has no rule in qcjax.sharding.LOGICAL_RULES")
        axes = _RULES[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if a not in used)  # a mesh axis may shard only one dim
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
            if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                # Drop axes from the end until the rest divides (e.g. batch 2 over data=1 x fsdp=4 -> fsdp dropped).
                while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                    axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint for an activation, a no-op unless a mesh is set (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def batch_shards(size: int, name: str = "act_batch") -> int:
    """How many ways the current mesh (`jax.set_mesh`) splits a dimension of `size` named `name`; 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    axes = logical_to_spec([name], [size], mesh)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def param_specs(boxed_params: Any, mesh: Mesh) -> Any:
    """PartitionSpecs for a (possibly abstract) params tree whose leaves are `nn.Partitioned` boxes."""

    def spec(leaf):
        if isinstance(leaf, nn.Partitioned):
            return logical_to_spec(leaf.names, leaf.value.shape, mesh)
        return P()

    return jax.tree.map(spec, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shardings(boxed_params: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(boxed_params, mesh))


def serving_mesh_shape(cfg: Any, n_devices: int, batch: int = 1) -> dict[str, int]:
    """The mesh sampling takes by default on `n_devices` (cfg: a ModelConfig; its KV heads decide): tensor parallel
    over the largest divisor of the device count that divides the KV heads (each device holds whole KV heads of the cache and 1/t of every weight, so a
    decode step reads each weight once over the slice), then data parallel over the batch rows (the largest divisor
    of what is left that is <= batch), and fsdp over the rest (weights sharded further, gathered per layer)."""
    n = int(n_devices)
    t = max(d for d in range(1, n + 1) if n % d == 0 and cfg.num_kv_heads % d == 0)
    rest = n // t
    d = max(x for x in range(1, rest + 1) if rest % x == 0 and x <= max(1, int(batch)))
    return {"data": d, "fsdp": rest // d, "tensor": t}
