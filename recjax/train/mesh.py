"""The device mesh and the logical-axis rules that place parameters and batches on it.

One mesh with named axes ('data', 'fsdp', 'model'); a degree of -1 means "all remaining
devices". Parameters carry logical axis names ('item', 'embed', 'heads', ...); the rules
map each logical name to a mesh axis (or None = replicated). Both come from gin.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

# maxtext-style defaults: batch over data+fsdp, the big tables and head/mlp dims over model,
# the embedding dim of large weights over fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("item", "model"),
    ("vocab", "model"),
    ("heads", "model"),
    ("mlp", "model"),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("kv", None),
    ("length", None),
    ("latents", None),
    ("latents_embed", None),  # FLARE Perceiver width
    ("text_embed", None),  # frozen text-encoder width
)


def create_mesh(data: int = 1, fsdp: int = -1, model: int = 1, devices: Sequence | None = None) -> Mesh:
  """A ('data', 'fsdp', 'model') mesh over `devices` (default: all, every process)."""
  devices = list(jax.devices() if devices is None else devices)
  degrees = [data, fsdp, model]
  if sum(d == -1 for d in degrees) > 1:
    raise ValueError(f"mesh degrees {dict(zip(MESH_AXES, degrees))}: at most one may be -1")
  known = math.prod(d for d in degrees if d != -1)
  if any(d == 0 or d < -1 for d in degrees) or len(devices) % known:
    raise ValueError(f"mesh degrees {dict(zip(MESH_AXES, degrees))} do not divide {len(devices)} devices")
  degrees = [len(devices) // known if d == -1 else d for d in degrees]
  if math.prod(degrees) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, degrees))} needs {math.prod(degrees)} devices, "
                     f"have {len(devices)}")
  # Auto axes: jit's in/out shardings place the arrays and GSPMD partitions everything in
  # between (the t5x/maxtext model), rather than sharding-in-types everywhere.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(degrees), MESH_AXES, devices=devices, axis_types=auto)


def logical_to_mesh(spec: Sequence[Any], rules=DEFAULT_RULES, mesh: Mesh | None = None) -> P:
  """Maps logical axis names to mesh axes; a mesh axis is used at most once per array,
  and axes of size 1 are dropped (so the same rules serve any mesh shape)."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in spec:
    axes = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no rule; add it to the logical axis rules "
                       f"(known: {sorted(table)})")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def tree_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of nnx Variables (logical names in their metadata), in the
  same structure as `tree`; leaves without names (step counters, optimizer scalars) are
  replicated."""

  def one(x):
    if isinstance(x, nnx.Variable) and not jax.tree.leaves(x):
      return x  # no array (optax's MaskedNode in a partitioned optimizer's state)
    if isinstance(x, nnx.Variable):
      names = tuple(nnx.spmd.get_var_pspec(x))
      return x.replace(NamedSharding(mesh, logical_to_mesh(names, rules, mesh)))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of a batch's leading axis ('batch' logical axis)."""
  return NamedSharding(mesh, logical_to_mesh(("batch",), rules, mesh))


def named_sharding(mesh: Mesh, rules, logical_axes: Sequence[Any]) -> NamedSharding:
  """The NamedSharding of an array whose axes carry `logical_axes` (None = replicated)."""
  return NamedSharding(mesh, logical_to_mesh(tuple(logical_axes), rules, mesh))
