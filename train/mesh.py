"""The device mesh and the one table from memzoo's logical axis names to mesh axes.

Layers name their parameter axes ("embed", "mlp", ...) in `out_sharding` metadata
(memzoo/layers.py `param`); this file alone decides where each name lands, so changing a
parallelism strategy is an edit to `LOGICAL_AXIS_RULES` or to the mesh sizes, never to a model.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# logical name -> mesh axis, a tuple of mesh axes, or None (replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),       # activations' time axis
    ("embed", "fsdp"),            # ZeRO-3 style: weights split over the fsdp axis, gathered per use
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),       # GQA key/value heads; replicated when fewer than tensor
    ("kv", None),                 # head_dim
    ("vocab", "tensor"),
    ("positions", None),          # learned absolute position embeddings' rows
    ("state", None),              # SSM state: small, and every step of a scan touches all of it
    ("norm", None),
    ("layers", None),             # the stacked axis of scanned layers
    ("classes", None),            # classifier outputs: few
    ("memory_rows", None),        # product-key memory value table rows: gathered by index
    ("memory_dim", "tensor"),     # ...and its embedding dim, split over devices (memory layers
                                  # at scale): each device gathers its columns of every row
)


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over MESH_AXES with sizes from `config` (MeshConfig); -1 = the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [config.data, config.fsdp, config.tensor, config.sequence]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % fixed:
            raise ValueError(f"mesh: {len(devices)} devices do not divide by the fixed axes "
                             f"({dict(zip(MESH_AXES, sizes))}, product {fixed})")
        sizes[sizes.index(-1)] = len(devices) // fixed
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {len(devices)}")
    # Auto axes: jit's in/out shardings pin the state and the batch; XLA propagates the rest.
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_AXIS_RULES, *, where: str = "") -> P:
    """PartitionSpec for an array whose axes carry logical `names`.

    A dimension that the mesh axes do not divide is replicated instead (small models on big
    meshes: S4D's state, a tiny vocab), and a mesh axis is used at most once per array.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"sharding: unknown logical axis name {name!r}"
                             f"{' in ' + where if where else ''}; add it to "
                             f"train/mesh.py LOGICAL_AXIS_RULES (known: {', '.join(table)})")
        target = table[name]
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if not axes or dim % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """The nnx `state` (abstract or concrete) with every Variable's value a NamedSharding.

    Names come from `out_sharding` metadata; a Variable without names (buffers, RNG counts) is
    replicated.
    """
    def one(path, variable):
        names = variable.get_metadata().get("out_sharding")
        shape = variable.get_value().shape
        if names is None:
            return variable.replace(NamedSharding(mesh, P()))
        where = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        if len(names) != len(shape):
            raise ValueError(f"sharding: {where} has {len(names)} axis names {names} for shape "
                             f"{tuple(shape)}")
        return variable.replace(NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules,
                                                                     where=where)))
    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch arrays: leading axis over ("data", "fsdp"); the time axis over "sequence"."""
    spec = [("data", "fsdp")] + (["sequence"] if ndim >= 2 and mesh.shape["sequence"] > 1
                                 else [])
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
