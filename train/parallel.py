"""Devices: meshes (data / fsdp / tensor), the pmap path, multi-host input, compiled steps.

`--parallel mesh` (default, `MeshLayout`) runs jit-compiled steps with explicit shardings:
parameters and optimizer state are laid out by their logical axis names through
`flaxformer_lite.sharding`'s rules, the batch is split over (data, fsdp). `--parallel pmap`
(`PmapLayout`) is classic data parallelism: replicated state, gradients summed with `lax.psum` and
divided by the global token count, on the local devices of one process. Both have the same
methods, so the training loop never asks which one it has.

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
  """'data=2,fsdp=2,tensor=2' -> {'data': 2, 'fsdp': 2, 'tensor': 2}; None -> {'data': -1}.

  Only the syntax is checked here (ValueError); the axis names and sizes are
  `sharding.make_mesh`'s to check.
  """
  if not text:
    return {'data': -1}
  shape = {}
  for part in text.split(','):
    name, _, size = part.partition('=')
    try:
      shape[name.strip()] = int(size)
    except ValueError:
      raise ValueError('expected comma-separated AXIS=SIZE with AXIS in '
                       f'{", ".join(sharding.MESH_AXES)} and SIZE an integer or -1') from None
  return shape


@dataclasses.dataclass
class Layout:
  """Where state and batches live, and how steps are compiled for them.

  A subclass (`MeshLayout`, `PmapLayout`) provides `create(mesh_text, global_batch)`,
  `process_rows()`, `context()`, `state_shardings(tx, abstract_state, boxed_params)`,
  `batch_sharding()`, `put_batch(batch)`, `put_state(state, shardings)`, `unreplicate(tree)`,
  `abstract_args(abstract_state, batch)` and `_wrap_steps`, which `compile_steps` compiles.
  """
  mesh: Mesh
  global_batch: int

  kind = None  # the --parallel value
  axis_name = None  # the axis the train step reduces over itself (pmap); None: jit does it

  def compile_steps(self, train_step, eval_step, shardings, *, abstract_state=None, batch=None,
                    run=None):
    """Compiled (train, eval). The train step donates the old state's buffers.

    Given `abstract_state` (shapes, as `jax.eval_shape` gives them) and a host `batch` of the
    global batch's shape (`task.dummy_batch`), the train step is compiled here, ahead of time, and
    refused with StepTooLargeError when one device lacks the memory it needs (`run`, the
    RunConfig, words the message). Otherwise it compiles on its first call. The eval step always
    does.
    """
    train, evaluate = self._wrap_steps(train_step, eval_step, shardings)
    if abstract_state is not None:
      train = _compile_within_memory(train, self, abstract_state, batch, run)
    return train, evaluate


@dataclasses.dataclass
class MeshLayout(Layout):
  """jit with explicit shardings over a (data, fsdp, tensor) mesh, on one host or several."""
  mesh_text: str | None = None  # --mesh as given, for messages

  kind = 'mesh'

  @classmethod
  def create(cls, mesh_text: str | None, global_batch: int) -> MeshLayout:
    try:
      mesh = sharding.make_mesh(parse_mesh(mesh_text), jax.devices())
    except ValueError as e:
      raise ParallelError(f'--mesh {mesh_text}: {e}') from None
    split = mesh.shape['data'] * mesh.shape['fsdp']
    if global_batch % split:
      raise ParallelError(f'--batch-size {global_batch} is not divisible by data x fsdp = '
                          f'{split}')
    return cls(mesh, global_batch, mesh_text)

  def process_rows(self) -> slice:
    """The rows of every global batch that this process's devices hold, hence load.

    Processes that share a batch shard (e.g. `tensor` spanning hosts) load the same rows.
    """
    index = self.batch_sharding().addressable_devices_indices_map((self.global_batch,))
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
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES))
    return stack

  def state_shardings(self, tx, abstract_state, boxed_params):
    """NamedShardings for every leaf of the train state.

    Parameters follow their logical axis names; the optimizer's copies of them (Adam's moments)
    follow the parameters; everything else (step, rng, counters) is replicated. Refuses a mesh
    whose axes do not divide the dimensions split over them, before anything is compiled.
    """
    try:
      sharding.check_divisible(boxed_params, self.mesh)
    except ValueError as e:
      given = self.mesh_text or ','.join(f'{k}={v}' for k, v in self.mesh.shape.items())
      raise ParallelError(f'--mesh {given}: {e}') from None
    replicated = NamedSharding(self.mesh, P())
    params = sharding.mesh_shardings(boxed_params, self.mesh)
    opt_state = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params,
                                      transform_non_params=lambda _: replicated)
    return abstract_state.replace(step=replicated, params=params, opt_state=opt_state,
                                  rng=replicated)

  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(('data', 'fsdp')))

  def put_batch(self, batch: dict) -> dict:
    """This process's rows -> global arrays split over the batch axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding(), np.asarray(v),
                                                      (self.global_batch,) + v.shape[1:])
            for k, v in batch.items()}

  def put_state(self, state, shardings):
    """The state (host or device) placed as `shardings` say (a no-op where it already is)."""
    return jax.device_put(state, shardings)

  def unreplicate(self, tree):
    """The state (or metrics) as one logical copy, what checkpoints hold: as it is."""
    return tree

  def _wrap_steps(self, train_step, eval_step, shardings):
    data, replicated = self.batch_sharding(), NamedSharding(self.mesh, P())
    train = jax.jit(train_step, in_shardings=(shardings, data),
                    out_shardings=(shardings, replicated), donate_argnums=0)
    evaluate = jax.jit(eval_step, in_shardings=(shardings.params, data),
                       out_shardings=replicated)
    return train, evaluate

  def abstract_args(self, abstract_state, batch):
    """Shapes of (state, batch) as the train step receives them."""
    return abstract_state, {k: jax.ShapeDtypeStruct((self.global_batch,) + v.shape[1:], v.dtype)
                            for k, v in batch.items()}


@dataclasses.dataclass
class PmapLayout(Layout):
  """Classic data parallelism on the local devices of one process: one copy of the state per
  device, gradients summed with `lax.psum` over `axis_name`."""
  kind = 'pmap'
  axis_name = 'data'

  @classmethod
  def create(cls, mesh_text: str | None, global_batch: int) -> PmapLayout:
    devices = jax.devices()
    if global_batch % len(devices):
      raise ParallelError(f'--batch-size {global_batch} is not divisible by the device count '
                          f'{len(devices)}')
    if jax.process_count() > 1:
      raise ParallelError('--parallel pmap runs in one process; use --parallel mesh on '
                          'several hosts')
    if mesh_text:
      raise ParallelError('--mesh applies to --parallel mesh only')
    return cls(Mesh(np.array(jax.local_devices()), ('data',)), global_batch)

  @property
  def devices(self) -> int:
    return len(self.mesh.devices.flat)

  def process_rows(self) -> slice:
    return slice(0, self.global_batch)  # one process holds every row

  def context(self):
    return contextlib.nullcontext()  # no mesh rules: each device runs the whole model

  def state_shardings(self, tx, abstract_state, boxed_params):
    """Every leaf replicated: the state as created, before `put_state` copies it per device."""
    replicated = NamedSharding(self.mesh, P())
    return jax.tree.map(lambda _: replicated, abstract_state)

  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(self.axis_name))

  def put_batch(self, batch: dict) -> dict:
    """The global batch -> [devices, rows per device, ...], one slice per device."""
    return {k: jax.make_array_from_process_local_data(
        self.batch_sharding(), np.asarray(v).reshape((self.devices, -1) + v.shape[1:]))
        for k, v in batch.items()}

  def put_state(self, state, shardings):
    """One copy of the state per device, the layout jax.pmap takes."""
    n = self.devices
    # Built by a jit whose output is split over the devices: each holds only its own copy.
    copies = jax.jit(lambda s: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), s),
                     out_shardings=NamedSharding(self.mesh, P(self.axis_name)))
    return copies(state)

  def unreplicate(self, tree):
    """The state (or metrics) as one logical copy, what checkpoints hold: device 0's."""
    return jax.tree.map(lambda x: x[0], tree)

  def _wrap_steps(self, train_step, eval_step, shardings):
    axis = self.axis_name
    train = jax.pmap(train_step, axis_name=axis, donate_argnums=0)
    evaluate = jax.pmap(lambda params, batch: jax.lax.psum(eval_step(params, batch), axis),
                        axis_name=axis)

    def evaluate_one(params, batch):  # the psum left the same sums on every device
      return self.unreplicate(evaluate(params, batch))
    return train, evaluate_one

  def abstract_args(self, abstract_state, batch):
    """Shapes of (state, batch) as the train step receives them: one row per device."""
    n = self.devices
    return (jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape, x.dtype), abstract_state),
            {k: jax.ShapeDtypeStruct((n, self.global_batch // n) + v.shape[1:], v.dtype)
             for k, v in batch.items()})


# --parallel's choices (RunConfig validates the name; tests check these keys equal its choices).
LAYOUTS = {'mesh': MeshLayout, 'pmap': PmapLayout}


def make_layout(kind: str, mesh_text: str | None, global_batch: int) -> Layout:
  """The layout `--parallel kind` names, checked against the devices and the batch."""
  return LAYOUTS[kind].create(mesh_text, global_batch)


class StepTooLargeError(UsageError):
  """One train step needs more memory than a device has."""


def _compile_within_memory(train, layout: Layout, abstract_state, batch, run):
  """The compiled train step (what later calls run: no second compilation), if it fits."""
  with layout.context():
    compiled = train.lower(*layout.abstract_args(abstract_state, batch)).compile()
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
    model = f'--init-from {run.init_from}' if run.init_from else f'--preset {run.preset}'
    what, lower = f'--batch-size {run.batch_size} and {model}', '--batch-size'
    # --seq-len shapes the batch only for the tasks that read it (not dates).
    if any(v.ndim > 1 and v.shape[1] == run.seq_len for v in batch.values()):
      what, lower = f'--seq-len {run.seq_len} with {what}', '--seq-len or --batch-size'
  more = '' if platform == 'cpu' else ' or use more devices'  # CPU devices share one host's memory
  return (f'{what} needs about {_gib(need)} per device for one train step, but '
          f'{_gib(available)} are available; lower {lower} (--accumulate N with an N times '
          f'smaller --batch-size keeps the examples per update){more}')


def _gib(n: int) -> str:
  return f'{n / 2**30:.1f} GiB' if n >= 2**30 / 10 else f'{n / 2**20:.1f} MiB'
