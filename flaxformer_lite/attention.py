"""Scaled dot-product attention, boolean masks and the multi-head attention module.

Layout everywhere: query `[B, T, N, H]`, key/value `[B, S, K, H]` with K dividing N (grouped-query
heads: query head n reads key/value head n // (N // K)); masks are booleans broadcastable to
`[B, N, T, S]`, True meaning "may attend".
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxformer_lite.config import TransformerConfig
from flaxformer_lite import layers

# Finite stand-in for -inf: keeps softmax free of inf - inf = NaN; fully masked rows are zeroed below.
_MASKED = jnp.finfo(jnp.float32).min


def make_causal_mask(q_len: int, kv_len: int | None = None) -> jax.Array:
  """`[1, 1, q_len, kv_len]`: query i may attend to keys j <= i (top-left aligned)."""
  kv_len = q_len if kv_len is None else kv_len
  return jnp.tril(jnp.ones((q_len, kv_len), dtype=bool))[None, None]


def make_padding_mask(query_valid: jax.Array, key_valid: jax.Array | None = None) -> jax.Array:
  """`[B, 1, T, S]` from validity vectors `query_valid [B, T]` and `key_valid [B, S]`.

  A padded query attends to nothing (its output is zeros); a padded key is never attended to.
  `key_valid=None` means self-attention (`key_valid = query_valid`).
  """
  key_valid = query_valid if key_valid is None else key_valid
  return query_valid.astype(bool)[:, None, :, None] & key_valid.astype(bool)[:, None, None, :]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of the masks that are not None (None if all are)."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  return functools.reduce(jnp.logical_and, masks)


def _check_shapes(query, key, value):
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(f'query/key/value must be [batch, length, heads, head_dim]; got shapes '
                     f'{query.shape}, {key.shape}, {value.shape}')
  if key.shape != value.shape:
    raise ValueError(f'key shape {key.shape} != value shape {value.shape}')
  b, _, n, h = query.shape
  if key.shape[0] != b or key.shape[3] != h:
    raise ValueError(f'query {query.shape} and key {key.shape} disagree on batch or head_dim')
  if n % key.shape[2]:
    raise ValueError(f'query heads={n} is not divisible by key/value heads={key.shape[2]}')


def attention_weights(query, key, *, bias=None, mask=None, is_causal=False) -> jax.Array:
  """Softmax weights `[B, N, T, S]` in float32; rows with nothing to attend to are all zero."""
  _check_shapes(query, key, key)
  b, t, n, h = query.shape
  s, k = key.shape[1], key.shape[2]
  # Group query heads by the key/value head they read, so no key/value copy is made.
  q = query.reshape(b, t, k, n // k, h)
  logits = jnp.einsum('btkgh,bskh->bkgts', q, key, preferred_element_type=jnp.float32)
  logits = logits.reshape(b, n, t, s).astype(jnp.float32) / math.sqrt(h)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
    # A -inf bias masks like False does: the row may end up with nothing to attend to.
    mask = combine_masks(mask, logits > -jnp.inf)
  if is_causal:
    mask = combine_masks(mask, make_causal_mask(t, s))
  if mask is None:
    return jax.nn.softmax(logits, axis=-1)
  mask = jnp.broadcast_to(mask, logits.shape)
  weights = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1)
  return jnp.where(mask.any(axis=-1, keepdims=True), weights, 0.0)


def _xla_attention(query, key, value, *, bias, mask, is_causal, dropout_rate, dropout_rng):
  weights = attention_weights(query, key, bias=bias, mask=mask, is_causal=is_causal)
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  b, t, n, h = query.shape
  k = key.shape[2]
  weights = weights.reshape(b, k, n // k, t, -1).astype(value.dtype)
  out = jnp.einsum('bkgts,bskh->btkgh', weights, value)
  return out.reshape(b, t, n, h)


IMPLEMENTATIONS = {'xla': _xla_attention}


def default_implementation(query=None, key=None) -> str:
  """The backend `implementation=None` resolves to for these inputs."""
  return 'xla'


def dot_product_attention(query, key, value, *, bias=None, mask=None, is_causal=False,
                          implementation=None, dropout_rate=0.0, dropout_rng=None) -> jax.Array:
  """softmax(q k^T / sqrt(H) + bias) v, softmax in float32.

  Args:
    query: `[B, T, N, H]`.
    key, value: `[B, S, K, H]`, K divides N.
    bias: additive, broadcastable to `[B, N, T, S]`.
    mask: boolean, broadcastable to `[B, N, T, S]`, True = may attend.
    is_causal: also apply `make_causal_mask(T, S)`.
    implementation: None (best for the platform), 'xla' (reference), 'blockwise', 'cudnn'.
    dropout_rate, dropout_rng: attention dropout on the weights (training only).
  Returns:
    `[B, T, N, H]` in query's dtype. A query row that may attend to nothing gives zeros.
  """
  _check_shapes(query, key, value)
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError(f'dropout_rate={dropout_rate} needs a dropout_rng')
  if implementation is None:
    implementation = default_implementation(query, key)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation={implementation!r} is not available; expected one of '
                     f'{[None, *IMPLEMENTATIONS]}')
  out = IMPLEMENTATIONS[implementation](query, key, value, bias=bias, mask=mask,
                                        is_causal=is_causal, dropout_rate=dropout_rate,
                                        dropout_rng=dropout_rng)
  return out.astype(query.dtype)


def apply_rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (rotate-half layout) of `x [B, L, N, H]` at `positions [B, L]`."""
  h = x.shape[-1]
  freqs = base ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
  angles = positions[..., None].astype(jnp.float32) * freqs  # [B, L, H/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class MultiHeadAttention(nn.Module):
  """Self- or cross-attention with grouped-query heads and a key/value cache.

  Parameters (logical axes): `qkv [D, 3, N, H]` when fused self-attention with K == N, otherwise
  `query [D, N, H]` and `kv [D, 2, K, H]` (fused) or `key`/`value [D, K, H]`; `out [N, H, D]`.

  Decoding (`decode=True`, self-attention only) keeps `cached_key/cached_value [B, L, K, H]` in the
  'cache' collection, L being the length of the input used at `init`. Each example writes its
  new keys at its own `positions [B, T]` (-1: a pad token, not written, attends to nothing) and
  attends to cached keys at positions <= its query's.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, context=None, *, mask=None, positions=None, decode=False,
               deterministic=True, capture_attention=False):
    """x `[B, T, D]`, context `[B, S, D]` (None: self-attention) -> `[B, T, D]`.

    `mask` is boolean `[B|1, 1|N, T, S]`; `positions [B, T]` feed rotary embeddings and the cache.
    """
    cfg = self.config
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.head_size
    self_attention = context is None
    context = x if self_attention else context
    dense = functools.partial(layers.dense_general, cfg)

    if cfg.fused_qkv and self_attention and k == n:
      qkv = dense((3, n, h), ('embed', None, 'heads', 'head_dim'), name='qkv')(x)
      query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      query = dense((n, h), ('embed', 'heads', 'head_dim'), name='query')(x)
      if cfg.fused_qkv:
        kv = dense((2, k, h), ('embed', None, 'kv_heads', 'head_dim'), name='kv')(context)
        key, value = kv[:, :, 0], kv[:, :, 1]
      else:
        key = dense((k, h), ('embed', 'kv_heads', 'head_dim'), name='key')(context)
        value = dense((k, h), ('embed', 'kv_heads', 'head_dim'), name='value')(context)

    if cfg.positions == 'rotary' and self_attention:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
      query = apply_rotary(query, positions, cfg.rope_base)
      key = apply_rotary(key, positions, cfg.rope_base)

    if decode:
      if not self_attention:
        raise ValueError('decode=True caches self-attention only; cross-attention keys come '
                         'from the encoder output')
      key, value, mask = self._update_cache(key, value, positions)

    dropout_rng = None
    dropout_rate = 0.0 if deterministic else cfg.attention_dropout_rate
    if dropout_rate > 0.0:
      dropout_rng = self.make_rng('dropout')
    out = dot_product_attention(query, key, value, mask=mask, implementation=cfg.attention_impl,
                                dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if capture_attention:
      self.sow('intermediates', 'attention_weights', attention_weights(query, key, mask=mask))
    return dense(cfg.d_model, ('heads', 'head_dim', 'embed'), axis=(-2, -1), name='out')(out)

  def _update_cache(self, key, value, positions):
    """Writes `key/value [B, T, K, H]` at `positions [B, T]`; returns the whole cache and mask."""
    is_init = not self.has_variable('cache', 'cached_key')
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, value.shape, value.dtype)
    if is_init:
      # `init(..., decode=True)` only sizes the cache: length = the input's length.
      return key, value, make_causal_mask(key.shape[1])
    if positions is None:
      raise ValueError('decode=True needs per-example positions [batch, length]')
    batch = jnp.arange(key.shape[0])[:, None]
    length = cached_key.value.shape[1]
    if not isinstance(positions, jax.core.Tracer) and int(positions.max()) >= length:
      raise ValueError(f'decoding position {int(positions.max())} is past the cache length '
                       f'{length} set at init(..., decode=True)')
    # Pad tokens (position -1) and positions past the end are dropped by the scatter.
    slots = jnp.where(positions >= 0, positions, length)
    cached_key.value = cached_key.value.at[batch, slots].set(key, mode='drop')
    cached_value.value = cached_value.value.at[batch, slots].set(value, mode='drop')
    # Slots past a query's position are either future tokens or stale entries of pad tokens;
    # a query past the cache's end (only possible under jit) attends to nothing: zeros.
    mask = ((jnp.arange(length)[None, None, None, :] <= positions[:, None, :, None])
            & (positions < length)[:, None, :, None])  # [B, 1, T, L]
    return cached_key.value, cached_value.value, mask
