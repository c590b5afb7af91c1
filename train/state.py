"""TrainState: everything a step changes, as one pytree that orbax saves whole."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer micro-steps taken = batches consumed
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 key data; step s uses fold_in(rng, s) for dropout


def create(model, task, tx, seed: int, batch) -> TrainState:
  """Initializes parameters and optimizer state (pure: usable under jit / eval_shape)."""
  init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
  variables = model.init(init_rng, *task.init_args(batch), method=task.init_method)
  params = nn.unbox(variables['params'])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(dropout_rng))


def abstract_boxed_params(model, task, seed: int, batch):
  """Parameter shapes still wrapped in their logical-axis metadata (nothing is allocated)."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(seed), *task.init_args(batch),
                                            method=task.init_method))
  return boxed['params']


def create_from(params, tx, seed: int) -> TrainState:
  """A state around given parameters (a checkpoint's): the optimizer starts fresh, the dropout
  key is `create`'s for the same seed."""
  _, dropout_rng = jax.random.split(jax.random.key(seed))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(dropout_rng))
