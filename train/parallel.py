"""Devices: the mesh, where the batch and the state live, and the compiled steps."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class ParallelError(ValueError):
  """A parallel layout that does not fit the devices or the batch."""


def make_mesh(batch_size: int) -> Mesh:
  """A data-parallel mesh over every device; the batch is split along 'data'."""
  devices = jax.devices()
  if batch_size % len(devices):
    raise ParallelError(f'--batch-size {batch_size} is not divisible by the device count '
                        f'{len(devices)}')
  return Mesh(np.array(devices), ('data',))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(mesh: Mesh, abstract_state):
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def put_batch(batch: dict, mesh: Mesh) -> dict:
  return jax.device_put(batch, batch_sharding(mesh))


def compile_steps(train_step, eval_step, mesh: Mesh, shardings):
  """jit with explicit shardings; the train step donates the old state's buffers."""
  data = batch_sharding(mesh)
  train = jax.jit(train_step, in_shardings=(shardings, data),
                  out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(shardings.params, data),
                     out_shardings=replicated(mesh))
  return train, evaluate
