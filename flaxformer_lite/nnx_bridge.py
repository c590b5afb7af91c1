"""Our linen models as Flax NNX modules: `to_nnx(GPT(cfg), tokens, rngs=nnx.Rngs(0))`.

`nnx.bridge.ToNNX` + `nnx.bridge.lazy_init` wrap any linen module but, under flax 0.12's default
settings, fail on ours: every parameter carries logical axis names (`nn.with_logical_partitioning`),
the bridge makes them `nnx.Param(..., out_sharding=('embed', 'mlp'))`, and NNX shards every new
Variable eagerly by its `out_sharding`, which needs a mesh (and mesh axes, not logical names). So
the bridge's variables are created with eager sharding off (a scoped setting, recorded in each
Variable's metadata, so the optimizer's copies of them follow), and `to_nnx` lays the parameters
out itself with our rules table, hence exactly as the linen path does (`sharding.mesh_shardings`).
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
from flax import nnx
from jax.sharding import Mesh

from flaxformer_lite import sharding


class LinenModel(nnx.bridge.ToNNX):
  """`nnx.bridge.ToNNX` that keeps our sharding context around every call.

  With a mesh, calls run under the mesh and `nn.logical_axis_rules(rules)`, so the model's
  `nn.with_logical_constraint`s on activations mean what they mean in the linen training path.
  Attributes starting with `to_nnx__` are the bridge's own, never taken for linen variables.
  """

  def __init__(self, module: nn.Module, rngs, mesh: Mesh | None = None,
               rules=sharding.LOGICAL_AXIS_RULES):
    super().__init__(module, rngs=rngs)
    self.to_nnx__mesh = mesh
    self.to_nnx__rules = rules

  def __call__(self, *args, **kwargs):
    with contextlib.ExitStack() as stack:
      # Variables the linen module creates or updates come back boxed with logical names: keep
      # NNX from sharding them eagerly (see the module docstring); `to_nnx` places parameters.
      stack.enter_context(nnx.use_eager_sharding(False))
      if self.to_nnx__mesh is not None:
        # The abstract mesh, not `jax.set_mesh`: calls are traced under `nnx.jit`, where
        # `set_mesh` is refused, and linen's constraints read only the abstract one.
        stack.enter_context(jax.sharding.use_abstract_mesh(self.to_nnx__mesh.abstract_mesh))
        stack.enter_context(nn.logical_axis_rules(self.to_nnx__rules))
      return super().__call__(*args, **kwargs)


def to_nnx(module: nn.Module, *example_args, rngs: nnx.Rngs | jax.Array, mesh: Mesh | None = None,
           rules=sharding.LOGICAL_AXIS_RULES, **init_kwargs) -> LinenModel:
  """An initialized `nnx.Module` around one of our linen models (GPT, BertEncoder, Transformer).

  Args:
    module: the linen model, e.g. `GPT(cfg)`.
    *example_args: what `module.init` takes after the rng, e.g. tokens `[B, T]` (GPT, BertEncoder)
      or src `[B, S]`, tgt `[B, T]` (Transformer); only their shapes and dtypes matter.
    rngs: `nnx.Rngs` (or a key) for the parameters. The module keeps a fork of its streams and
      draws the per-call rngs (e.g. dropout) from it, so `nnx.Rngs(0)` or
      `nnx.Rngs(params=0, dropout=1)` both train.
    mesh: with a mesh (axes data, fsdp, tensor: `sharding.make_mesh`), every `nnx.Param` is a
      `jax.Array` laid out as `sharding.mesh_shardings(..., mesh, rules)` lays out linen's, and
      calls constrain activations by the same rules. ValueError, before anything is compiled, if
      a mesh axis does not divide a dimension the rules split over it.
    rules: the logical axis rules.
    **init_kwargs: go to `module.init`, e.g. `method='mlm_logits'` to create BertEncoder's masked-LM
      head too, or `decode=True` to create the key/value cache.

  Returns:
    `model`, called as the linen module is applied, without the variables:
      `model(tokens)` == `module.apply({'params': params}, tokens)` -> logits `[B, T, V]`;
      `model(tokens, deterministic=False)` draws dropout keys from the stored rngs, or from
      `rngs=nnx.Rngs(dropout=key)` (or a key) passed to the call;
      `model.mlm_logits(tokens)` or `model(tokens, method='mlm_logits')` run a method;
      `model(tokens, decode=True, mutable=['cache'])` updates the cache in place.
    It works under `nnx.jit`, `nnx.grad` and `nnx.Optimizer(model, tx, wrt=nnx.Param)`;
    `nnx.state(model, nnx.Param)` holds linen's `params` tree, keyed the same way.
  """
  shardings = None
  if mesh is not None:
    # Abstract linen init: the boxed parameter tree our sharding helpers read.
    boxed = jax.eval_shape(functools.partial(module.init, **init_kwargs), jax.random.key(0),
                           *example_args)['params']
    sharding.check_divisible(boxed, mesh, rules)
    shardings = sharding.mesh_shardings(boxed, mesh, rules)

  def create(rngs, example_args):
    model = LinenModel(module, rngs, mesh, rules)
    model.lazy_init(*example_args, **init_kwargs)
    if shardings is not None:
      params = nnx.state(model, nnx.Param)
      placed = jax.lax.with_sharding_constraint(nnx.to_pure_dict(params), shardings)
      nnx.replace_by_pure_dict(params, placed)
      nnx.update(model, params)
    return model

  # One jitted init whose outputs are constrained to their shardings: XLA creates each parameter
  # in its shards, never whole on one device.
  return nnx.jit(create)(rngs, example_args)
