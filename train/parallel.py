"""Devices: meshes (data / fsdp / tensor), the pmap path, multi-host input, compiled steps.

`--parallel mesh` (default) runs jit-compiled steps with explicit shardings: parameters and
optimizer state are laid out by their logical axis names through `flaxformer_lite.sharding`'s
rules, the batch is split over (data, fsdp). `--parallel pmap` is classic data parallelism:
replicated state, gradients summed with `lax.psum` and divided by the global token count, on the
local devices of one process.

Two checks run before a step does: a mesh whose axes do not divide the parameter dimensions split
over them is refused before anything is compiled, and the train step, compiled ahead of time, is
refused when XLA's memory analysis says it needs more than a device has.
"""

from __future__ import annotations

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxformer_lite import sharding
from train.config import UsageError


class ParallelError(UsageError):
  """A parallel layout that does not fit the devices or the batch."""


def parse_mesh(text: str | None) -> dict[str, int]:
  """'data=2,fsdp=2,tensor=2' -> {'data': 2, 'fsdp': 2, 'tensor': 2}; None -> {'data': -1}."""
  if not text:
    return {'data': -1}
  shape = {}
  for part in text.split(','):
    name, _, size = part.partition('=')
    name = name.strip()
    if name not in sharding.MESH_AXES or not size.strip().lstrip('-').isdigit():
      raise ParallelError(f'--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in '
                          f'{", ".join(sharding.MESH_AXES)} and SIZE an integer or -1')
    shape[name] = int(size)
  return shape


@dataclasses.dataclass
class Layout:
  """Where state and batches live, and how steps are compiled for them."""
  kind: str  # 'mesh' | 'pmap'
  mesh: Mesh
  global_batch: int
  mesh_text: str | None = None  # --mesh as given, for messages

  def process_rows(self) -> slice:
    """The rows of every global batch that this process's devices hold, hence load.

    Processes that share a batch shard (e.g. `tensor` spanning hosts) load the same rows.
    """
    if self.kind == 'pmap':
      return slice(0, self.global_batch)
    index = batch_sharding(self).addressable_devices_indices_map((self.global_batch,))
    starts = [s[0].start or 0 for s in index.values()]
    stops = [self.global_batch if s[0].stop is None else s[0].stop for s in index.values()]
    rows = slice(min(starts), max(stops))
    held = {i for s in index.values() for i in range(*s[0].indices(self.global_batch))}
    if len(held) != rows.stop - rows.start:
      raise ParallelError(f'this process holds batch rows {sorted(held)}, not one contiguous '
                          'block; reorder the mesh axes')
    return rows

  def context(self):
    """Active while tracing: logical constraints inside the model resolve against this mesh."""
    if self.kind == 'pmap':
      return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES))
    return stack


def make_layout(kind: str, mesh_text: str | None, global_batch: int) -> Layout:
  if kind not in ('mesh', 'pmap'):
    raise ParallelError(f'--parallel {kind!r} is not one of mesh, pmap')
  devices = jax.devices()
  if kind == 'pmap':
    if global_batch % len(devices):
      raise ParallelError(f'--batch-size {global_batch} is not divisible by the device count '
                          f'{len(devices)}')
    if jax.process_count() > 1:
      raise ParallelError('--parallel pmap runs in one process; use --parallel mesh on '
                          'several hosts')
    if mesh_text:
      raise ParallelError('--mesh applies to --parallel mesh only')
    return Layout('pmap', Mesh(np.array(jax.local_devices()), ('data',)), global_batch)
  shape = parse_mesh(mesh_text)
  try:
    mesh = sharding.make_mesh(shape, devices)
  except ValueError as e:
    raise ParallelError(f'--mesh {mesh_text}: {e}') from None
  split = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % split:
    raise ParallelError(f'--batch-size {global_batch} is not divisible by data x fsdp = {split}')
  return Layout('mesh', mesh, global_batch, mesh_text)


def state_shardings(layout: Layout, tx, abstract_state, boxed_params):
  """NamedShardings for every leaf of the train state.

  Parameters follow their logical axis names; the optimizer's copies of them (Adam's moments)
  follow the parameters; everything else (step, rng, counters) is replicated. Refuses a mesh
  whose axes do not divide the dimensions split over them, before anything is compiled.
  """
  replicated = NamedSharding(layout.mesh, P())
  if layout.kind == 'pmap':
    return jax.tree.map(lambda _: replicated, abstract_state)
  try:
    sharding.check_divisible(boxed_params, layout.mesh)
  except ValueError as e:
    given = layout.mesh_text or ','.join(f'{k}={v}' for k, v in layout.mesh.shape.items())
    raise ParallelError(f'--mesh {given}: {e}') from None
  params = sharding.mesh_shardings(boxed_params, layout.mesh)
  opt_state = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params,
                                    transform_non_params=lambda _: replicated)
  return abstract_state.replace(step=replicated, params=params, opt_state=opt_state,
                                rng=replicated)


def batch_sharding(layout: Layout) -> NamedSharding:
  if layout.kind == 'pmap':
    return NamedSharding(layout.mesh, P('data'))
  return NamedSharding(layout.mesh, P(('data', 'fsdp')))


def put_batch(batch: dict, layout: Layout) -> dict:
  """This process's rows -> global arrays split over the batch axes (or [devices, ...] for pmap)."""
  sharding_ = batch_sharding(layout)
  if layout.kind == 'pmap':
    n = len(layout.mesh.devices.flat)
    batch = {k: v.reshape((n, -1) + v.shape[1:]) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding_, np.asarray(v))
            for k, v in batch.items()}
  return {k: jax.make_array_from_process_local_data(sharding_, np.asarray(v),
                                                    (layout.global_batch,) + v.shape[1:])
          for k, v in batch.items()}


def put_state(state, layout: Layout, shardings):
  """Places a (host or device) state as `shardings` say; pmap gets one copy per device."""
  if layout.kind == 'pmap':
    n = len(layout.mesh.devices.flat)
    # Built by a jit whose output is split over the devices: each holds only its own copy.
    copies = jax.jit(lambda s: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), s),
                     out_shardings=NamedSharding(layout.mesh, P('data')))
    return copies(state)
  return jax.device_put(state, shardings)


def unreplicate(state, layout: Layout):
  """The state as one logical copy (what checkpoints hold)."""
  if layout.kind == 'pmap':
    return jax.tree.map(lambda x: x[0], state)
  return state


def compile_steps(train_step, eval_step, layout: Layout, shardings, *, abstract_state=None,
                  batch=None, run=None):
  """Compiled (train, eval). The train step donates the old state's buffers.

  Given `abstract_state` (shapes, as `jax.eval_shape` gives them) and a host `batch` of the global
  batch's shape (`task.dummy_batch`), the train step is compiled here, ahead of time, and refused
  with StepTooLargeError when one device lacks the memory it needs (`run`, the RunConfig, words
  the message). Otherwise it compiles on its first call. The eval step always does.
  """
  if layout.kind == 'pmap':
    train = jax.pmap(train_step, axis_name='data', donate_argnums=0)
    evaluate = jax.pmap(lambda params, batch: jax.lax.psum(eval_step(params, batch), 'data'),
                        axis_name='data')

    def evaluate_one(params, batch):  # the psum left the same sums on every device
      return jax.tree.map(lambda x: x[0], evaluate(params, batch))
  else:
    data = batch_sharding(layout)
    replicated = NamedSharding(layout.mesh, P())
    train = jax.jit(train_step, in_shardings=(shardings, data),
                    out_shardings=(shardings, replicated), donate_argnums=0)
    evaluate_one = jax.jit(eval_step, in_shardings=(shardings.params, data),
                           out_shardings=replicated)
  if abstract_state is not None:
    train = _compile_within_memory(train, layout, abstract_state, batch, run)
  return train, evaluate_one


class StepTooLargeError(UsageError):
  """One train step needs more memory than a device has."""


def _compile_within_memory(train, layout: Layout, abstract_state, batch, run):
  """The compiled train step (what later calls run: no second compilation), if it fits."""
  with layout.context():
    compiled = train.lower(*_abstract_args(layout, abstract_state, batch)).compile()
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):  # not every backend reports it: nothing to check
    return compiled
  if stats is None:
    return compiled
  # Per device: inputs + outputs + XLA's scratch, less the donated state the outputs reuse.
  need = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
          - stats.alias_size_in_bytes)
  device = next(d for d in layout.mesh.devices.flat if d.process_index == jax.process_index())
  available = device_memory(device, layout)
  if device.platform == 'cpu' and available is not None:
    # The state is already resident, so free memory no longer counts it; the need does.
    available += stats.argument_size_in_bytes
  if available is not None and need > available:
    raise StepTooLargeError(_too_large(run, batch, need, available, device.platform))
  return compiled


def _abstract_args(layout: Layout, abstract_state, batch):
  """Shapes of (state, batch) as the train step receives them (pmap: one row per device)."""
  rows = layout.global_batch
  batch = {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype) for k, v in batch.items()}
  if layout.kind == 'mesh':
    return abstract_state, batch
  n = len(layout.mesh.devices.flat)
  per_device = lambda x, lead: jax.ShapeDtypeStruct(lead + x.shape, x.dtype)  # noqa: E731
  return (jax.tree.map(lambda x: per_device(x, (n,)), abstract_state),
          {k: jax.ShapeDtypeStruct((n, rows // n) + v.shape[1:], v.dtype)
           for k, v in batch.items()})


def device_memory(device, layout: Layout) -> int | None:
  """Bytes one device of `layout` may use (None: unknown).

  Accelerators report their allocator's limit; CPU devices share the host's available memory.
  """
  if device.platform != 'cpu':
    return (device.memory_stats() or {}).get('bytes_limit')
  host = host_available_memory()
  local = sum(d.process_index == jax.process_index() for d in layout.mesh.devices.flat)
  return None if host is None else host // local


def host_available_memory() -> int | None:
  """MemAvailable from /proc/meminfo, capped by a cgroup v2 memory limit; None if unknown."""
  try:
    with open('/proc/meminfo') as f:
      fields = dict(line.split(':', 1) for line in f)
    available = int(fields['MemAvailable'].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return None
  try:  # a container's limit can be far below the host's memory
    with open('/sys/fs/cgroup/memory.max') as f, open('/sys/fs/cgroup/memory.current') as g:
      limit, used = f.read().strip(), int(g.read())
    if limit != 'max':
      available = min(available, max(int(limit) - used, 0))
  except (OSError, ValueError):
    pass
  return available


def _too_large(run, batch, need: int, available: int, platform: str) -> str:
  if run is None:
    what, lower = 'this train step', 'the batch or its length'
  else:
    what, lower = f'--batch-size {run.batch_size} and --preset {run.preset}', '--batch-size'
    # --seq-len shapes the batch only for the tasks that read it (not dates).
    if any(v.ndim > 1 and v.shape[1] == run.seq_len for v in batch.values()):
      what, lower = f'--seq-len {run.seq_len} with {what}', '--seq-len or --batch-size'
  more = '' if platform == 'cpu' else ' or use more devices'  # CPU devices share one host's memory
  return (f'{what} needs about {_gib(need)} per device for one train step, but '
          f'{_gib(available)} are available; lower {lower} (--accumulate N with an N times '
          f'smaller --batch-size keeps the examples per update){more}')


def _gib(n: int) -> str:
  return f'{n / 2**30:.1f} GiB' if n >= 2**30 / 10 else f'{n / 2**20:.1f} MiB'
