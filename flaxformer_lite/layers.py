"""Embeddings, positional encodings, feed-forward and normalization layers."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite.config import TransformerConfig


def kernel_init(cfg: TransformerConfig, n_in: int = 1, n_out: int = 1):
  """Xavier uniform over the kernel seen as an [inputs, outputs] matrix (the paper, PyTorch's
  Linear), or normal(init_std) (GPT-2, BERT)."""
  if cfg.init_std is None:
    return nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform',
                                            in_axis=tuple(range(n_in)),
                                            out_axis=tuple(range(n_in, n_in + n_out)))
  return nn.initializers.normal(cfg.init_std)


class DenseGeneral(nn.Module):
  """x contracted over `axis` with a kernel `[*x.shape[axis], *features]`, plus a bias.

  Unlike `nn.DenseGeneral` the kernel is created in its final shape, so its logical axis names
  (`kernel_axes`, one per kernel dimension) apply as-is, also at init under a mesh.
  """
  config: TransformerConfig
  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  axis: tuple[int, ...] = (-1,)
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    axis = tuple(a % x.ndim for a in self.axis)
    shape = tuple(x.shape[a] for a in axis) + self.features
    init = kernel_init(cfg, len(axis), len(self.features))
    kernel = self.param('kernel', nn.with_logical_partitioning(init, self.kernel_axes), shape,
                        cfg.param_dtype)
    x, kernel = x.astype(cfg.dtype), jnp.asarray(kernel, cfg.dtype)
    y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros_init(), self.kernel_axes[len(axis):]), self.features,
                        cfg.param_dtype)
      y = y + jnp.asarray(bias, cfg.dtype)
    return y


def dense_general(cfg: TransformerConfig, features, kernel_axes, axis=-1, *, use_bias=None,
                  name=None) -> DenseGeneral:
  """DenseGeneral with the config's dtypes and bias setting; `features` an int or a tuple."""
  features = features if isinstance(features, tuple) else (features,)
  axis = axis if isinstance(axis, tuple) else (axis,)
  use_bias = cfg.use_bias if use_bias is None else use_bias
  return DenseGeneral(cfg, features, tuple(kernel_axes), axis, use_bias, name=name)


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
  """`[max_len, D]` sinusoids of the paper's frequencies 10000^(-2i/D), laid out [sin | cos] by
  halves rather than interleaved (as tensor2tensor and Marian do)."""
  half = d_model // 2
  inv_freq = np.exp(-math.log(10000.0) * 2 * np.arange(half) / d_model)
  angles = np.arange(max_len)[:, None] * inv_freq[None, :]
  table = np.zeros((max_len, d_model), dtype=np.float32)
  table[:, :half] = np.sin(angles)
  table[:, half:2 * half] = np.cos(angles)
  return table


class Embed(nn.Module):
  """Token embedding `[V, D]`, shared with the output projection via `attend`."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    std = cfg.init_std if cfg.init_std is not None else cfg.d_model ** -0.5
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(nn.initializers.normal(std), ('vocab', 'embed')),
        (cfg.vocab_size, cfg.d_model), cfg.param_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens `[B, T]` -> `[B, T, D]`, times sqrt(D) when `scale_embeddings` (the paper)."""
    x = jnp.take(jnp.asarray(self.embedding, self.config.dtype), tokens, axis=0)
    if self.config.scale_embeddings:
      x = x * jnp.sqrt(jnp.asarray(self.config.d_model, self.config.dtype))
    return x

  def attend(self, x: jax.Array) -> jax.Array:
    """x `[B, T, D]` -> logits `[B, T, V]` with the transposed embedding."""
    return jnp.einsum('btd,vd->btv', x, jnp.asarray(self.embedding, self.config.dtype))


class AddPositions(nn.Module):
  """Adds sinusoidal or learned position embeddings at `positions [B, T]`; rotary adds nothing here."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    cfg = self.config
    if cfg.positions in ('rotary', 'relative'):
      return x  # applied inside attention
    if cfg.positions == 'sinusoidal':
      table = jnp.asarray(sinusoidal_table(cfg.max_len, cfg.d_model))
    else:
      # BART keeps `position_offset` unused rows before position 0: kept so the table
      # converts back bit for bit.
      table = self.param(
          'embedding',
          nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std or 0.02),
                                       (None, 'embed')),
          self.table_shape(), cfg.param_dtype)[cfg.position_offset:]
    # Pad tokens may carry position -1 while decoding; they are never attended to.
    return x + jnp.take(table, jnp.maximum(positions, 0), axis=0).astype(x.dtype)

  @nn.nowrap
  def table_shape(self) -> tuple[int, int]:
    cfg = self.config
    return (cfg.max_len + cfg.position_offset, cfg.d_model)


_ACTIVATIONS = {'relu': nn.relu, 'gelu': functools.partial(nn.gelu, approximate=False),
                'gelu_tanh': functools.partial(nn.gelu, approximate=True), 'silu': nn.silu}
_GATES = {'swiglu': 'silu', 'geglu': 'gelu_tanh'}  # gated units: their gate's activation


def activation(name: str):
  """The elementwise function named `name` (a gated unit's name gives its gate's function)."""
  return _ACTIVATIONS[_GATES.get(name, name)]


class FeedForward(nn.Module):
  """`[B, T, D]` -> `[B, T, D]`: wi, activation, dropout, wo; the gated units (swiglu, geglu)
  multiply `wi(x)` by `act(wi_gate(x))`."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.config
    h = dense_general(cfg, cfg.d_ff, ('embed', 'mlp'), name='wi')(x)
    if cfg.activation in _GATES:
      gate = dense_general(cfg, cfg.d_ff, ('embed', 'mlp'), name='wi_gate')(x)
      h = activation(cfg.activation)(gate) * h
    else:
      h = activation(cfg.activation)(h)
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return dense_general(cfg, cfg.d_model, ('mlp', 'embed'), name='wo')(h)


def norm(cfg: TransformerConfig, name: str | None = None) -> nn.Module:
  """LayerNorm or RMSNorm over the last axis; statistics in float32."""
  scale = nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',))
  if cfg.norm == 'rmsnorm':
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      scale_init=scale, name=name)
  return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      use_bias=cfg.use_bias, scale_init=scale,
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             ('embed',)),
                      name=name)


def relative_bucket(distance: jax.Array, *, bidirectional: bool, num_buckets: int,
                    max_distance: int) -> jax.Array:
  """T5's bucket `[...]` int32 of each `distance` = key position - query position.

  Half the buckets (all, if not bidirectional: only keys at or before the query count) hold the
  exact distances 0, 1, ...; the rest grow logarithmically up to `max_distance`, beyond which
  all distances share the last bucket. Bidirectional: keys after the query use the upper half.
  """
  bucket = jnp.zeros_like(distance)
  if bidirectional:
    num_buckets //= 2
    bucket = jnp.where(distance > 0, num_buckets, 0)
    n = jnp.abs(distance)
  else:
    n = jnp.maximum(-distance, 0)
  exact = num_buckets // 2
  # float32, as T5's own computation, so the rounding of the log lands in the same bucket.
  log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact) / math.log(
      max_distance / exact)
  far = exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32)
  return bucket + jnp.where(n < exact, n, jnp.minimum(far, num_buckets - 1))


def relative_bias(cfg: TransformerConfig, table: jax.Array, query_positions: jax.Array,
                  key_positions: jax.Array, *, bidirectional: bool) -> jax.Array:
  """Attention-logit bias `[B, N, T, S]` (float32) from a bucket table `[buckets, N]`, for
  queries at `query_positions [B, T]` and keys at `key_positions [B|1, S]`."""
  distance = key_positions[:, None, :] - query_positions[:, :, None]
  buckets = relative_bucket(distance, bidirectional=bidirectional,
                            num_buckets=cfg.relative_buckets,
                            max_distance=cfg.relative_max_distance)
  return jnp.take(table.astype(jnp.float32), buckets, axis=0).transpose(0, 3, 1, 2)


def relative_table(module: nn.Module, cfg: TransformerConfig) -> jax.Array:
  """The bucket table `[buckets, N]` of `module` (a layer stack: one table its layers share)."""
  return module.param(
      'relative_bias',
      nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std or cfg.d_model ** -0.5),
                                   (None, 'heads')),
      (cfg.relative_buckets, cfg.num_heads), cfg.param_dtype)
