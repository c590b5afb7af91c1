"""Logical axis names and the one small table that maps them onto mesh axes.

Parameters and large activations are annotated with logical names (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); a mesh with axes `data`, `fsdp`, `tensor` gives them meaning:
- `data`: pure data parallelism, the batch is split, parameters are replicated;
- `fsdp`: the batch is split and so are parameters (along `embed`), gathered when used;
- `tensor`: Megatron-style model parallelism, heads and the feed-forward hidden units are split.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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


class Split(NamedTuple):
  """One parameter dimension that the rules split over mesh axes."""
  path: str  # e.g. 'decoder/layers_0/self_attention/query/kernel'
  name: str  # its logical axis, e.g. 'heads'
  size: int
  axes: tuple[str, ...]  # the mesh axes it is split over, e.g. ('tensor',)


def parameter_splits(boxed_tree, rules=LOGICAL_AXIS_RULES) -> list[Split]:
  """Every parameter dimension of `boxed_tree` (`nn.Partitioned` leaves) split over a mesh axis."""
  specs = jax.tree_util.tree_flatten_with_path(nn.get_partition_spec(boxed_tree))[0]
  shapes = jax.tree.leaves(nn.unbox(boxed_tree))
  splits = []
  for (path, logical), shape in zip(specs, shapes, strict=True):
    # flax's own resolution: the mesh axes `mesh_shardings` gives this parameter.
    mesh_axes = nn.logical_to_mesh_axes(logical, rules)
    for dim, (name, axes) in enumerate(zip(logical, mesh_axes)):
      if axes is None:
        continue
      splits.append(Split(jax.tree_util.keystr(path, simple=True, separator='/'),
                          name if isinstance(name, str) else '+'.join(name), shape.shape[dim],
                          (axes,) if isinstance(axes, str) else tuple(axes)))
  return splits


def check_divisible(boxed_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> None:
  """Raises ValueError if a mesh axis does not divide a parameter dimension the rules split over it.

  `boxed_tree`: `nn.Partitioned` leaves, e.g. `jax.eval_shape(model.init, ...)['params']`; `mesh`:
  anything with a `.shape` of axis sizes (a `Mesh` or `AbstractMesh`). Run it before compiling:
  jax's own IndivisibleError comes later and names only shapes. The message names the first such
  dimension (in parameter order), the mesh sizes that would fit, and briefly any other ones.
  """
  sizes = dict(mesh.shape)
  splits = parameter_splits(boxed_tree, rules)
  bad = [s for s in splits if s.size % math.prod(sizes.get(a, 1) for a in s.axes)]
  if not bad:
    return
  first = bad[0]
  # Any size that divides every dimension split over these axes fits, not just this one's.
  fits = math.gcd(*(s.size for s in splits if s.axes == first.axes))
  joined = ' x '.join(first.axes)
  if fits == 1:
    hint = f'do not split over {joined}'
  elif len(first.axes) == 1:
    hint = f'use a size for {joined} that divides {fits}'
  else:
    hint = f'use sizes for {joined} whose product divides {fits}'
  others = sorted({(s.name, s.size, s.axes) for s in bad} - {(first.name, first.size, first.axes)})
  also = ', '.join(f'{n!r} of size {k}' + ('' if a == first.axes else f' by {_sizes(a, sizes)}')
                   for n, k, a in others)
  raise ValueError(f'{first.name!r} of size {first.size} ({first.path}) does not divide by '
                   f'{_sizes(first.axes, sizes)}; {hint}' + (f' (also {also})' if also else ''))


def _sizes(axes, sizes) -> str:
  return ' x '.join(f'{a}={sizes.get(a, 1)}' for a in axes)


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
