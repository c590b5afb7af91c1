"""Logical axis names and the one small table that maps them onto mesh axes.

Parameters and large activations are annotated with logical names (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); a mesh with axes `data`, `fsdp`, `tensor` gives them meaning:
- `data`: pure data parallelism, the batch is split, parameters are replicated;
- `fsdp`: the batch is split and so are parameters (along `embed`), gathered when used;
- `tensor`: Megatron-style model parallelism, heads and the feed-forward hidden units are split.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh

MESH_AXES = ('data', 'fsdp', 'tensor')

# Flax applies the first rule whose mesh axes are still free in a given array, so `embed` falls
# back to replication in activations whose batch already took `fsdp`.
LOGICAL_AXIS_RULES = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('embed', 'fsdp'),
    ('length', None),
    ('head_dim', None),
    ('layers', None),
)


def mesh_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a tree of `nn.Partitioned` leaves (e.g. `jax.eval_shape(model.init, ...)`)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
  """A mesh with the axes (data, fsdp, tensor); missing axes have size 1, one -1 takes the rest."""
  devices = jax.devices() if devices is None else devices
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'mesh axes {sorted(unknown)} are not among {MESH_AXES}')
  sizes = {axis: shape.get(axis, 1) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f'only one mesh axis may be -1, got {free}')
  known = 1
  for axis, size in sizes.items():
    if size != -1:
      if size < 1:
        raise ValueError(f'mesh axis {axis}={size} must be positive or -1')
      known *= size
  if free:
    if len(devices) % known:
      raise ValueError(f'{len(devices)} devices cannot be split as {shape}')
    sizes[free[0]] = len(devices) // known
  total = 1
  for size in sizes.values():
    total *= size
  if total != len(devices):
    raise ValueError(f'mesh {sizes} needs {total} devices, but there are {len(devices)}')
  # Auto axes: XLA's GSPMD propagates shardings from the annotated parameters and activations.
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
