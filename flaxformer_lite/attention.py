"""Scaled dot-product attention, boolean masks and the multi-head attention module.

Layout everywhere: query `[B, T, N, H]`, key/value `[B, S, K, H]` with K dividing N (grouped-query
heads: query head n reads key/value head n // (N // K)); masks are booleans broadcastable to
`[B, N, T, S]`, True meaning "may attend".
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import blockwise, fused, layers
from flaxformer_lite.config import TransformerConfig

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
  if 0 in query.shape or 0 in key.shape:
    raise ValueError(f'query {query.shape} and key {key.shape} must not be empty (an empty batch, '
                     'length or head dimension)')
  b, _, n, h = query.shape
  if key.shape[0] != b or key.shape[3] != h:
    raise ValueError(f'query {query.shape} and key {key.shape} disagree on batch or head_dim')
  if n % key.shape[2]:
    raise ValueError(f'query heads={n} is not divisible by key/value heads={key.shape[2]}')


def _check_extras(query, key, bias, mask, query_seq_lengths, key_value_seq_lengths):
  """One clear error, whatever the backend, for a mask, bias or lengths of the wrong shape."""
  b, t, n, _ = query.shape
  full = (b, n, t, key.shape[1])
  if mask is not None and jnp.result_type(mask) != jnp.bool_:
    raise ValueError(f'mask must be boolean (True = may attend), got dtype '
                     f'{jnp.result_type(mask)}; pass an additive float mask as bias=')
  for name, x in (('mask', mask), ('bias', bias)):
    shape = None if x is None else tuple(jnp.shape(x))
    if shape is not None and (len(shape) > 4 or any(
        d not in (1, f) for d, f in zip(shape[::-1], full[::-1]))):
      raise ValueError(f'{name} shape {shape} does not broadcast to [batch, heads, q_len, '
                       f'kv_len] = {list(full)}')
  for name, x in (('query_seq_lengths', query_seq_lengths),
                  ('key_value_seq_lengths', key_value_seq_lengths)):
    if x is not None and tuple(jnp.shape(x)) != (b,):
      raise ValueError(f'{name} must have shape [batch] = ({b},), got {tuple(jnp.shape(x))}')


def attention_weights(query, key, *, bias=None, mask=None, is_causal=False) -> jax.Array:
  """Softmax weights `[B, N, T, S]` in float32; rows with nothing to attend to are all zero."""
  _check_shapes(query, key, key)
  _check_extras(query, key, bias, mask, None, None)
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


def _xla_attention(query, key, value, *, bias=None, mask=None, is_causal=False,
                   query_seq_lengths=None, key_value_seq_lengths=None, dropout_rate=0.0,
                   dropout_rng=None):
  """The reference: the whole `[B, N, T, S]` softmax in memory."""
  mask = combine_masks(mask, _length_mask(query_seq_lengths, key_value_seq_lengths,
                                          query.shape[1], key.shape[1]))
  weights = attention_weights(query, key, bias=bias, mask=mask, is_causal=is_causal)
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  b, t, n, h = query.shape
  k = key.shape[2]
  weights = weights.reshape(b, k, n // k, t, -1).astype(value.dtype)
  out = jnp.einsum('bkgts,bskh->btkgh', weights, value)
  return out.reshape(b, t, n, h)


def _length_mask(query_seq_lengths, key_value_seq_lengths, q_len, kv_len):
  """`[B, 1, T|1, S|1]` from lengths `[B]` (right padding), or None."""
  q_valid = None if query_seq_lengths is None else (
      jnp.arange(q_len)[None, :] < jnp.asarray(query_seq_lengths)[:, None])[:, None, :, None]
  kv_valid = None if key_value_seq_lengths is None else (
      jnp.arange(kv_len)[None, :] < jnp.asarray(key_value_seq_lengths)[:, None])[:, None, None, :]
  return combine_masks(q_valid, kv_valid)


def _pallas_attention(query, key, value, *, is_causal, **unused):
  del unused  # bias, masks, lengths and dropout are refused by why_not_pallas
  return fused.pallas_attention(query, key, value, is_causal=is_causal)


# name -> (function, why_not(call) -> reason or None).
IMPLEMENTATIONS = {
    'xla': (_xla_attention, lambda call: None),
    'blockwise': (blockwise.blockwise_attention, lambda call: None),
    'cudnn': (functools.partial(fused.cudnn_with_masks, reference=_xla_attention),
              fused.why_not_cudnn),
    'pallas': (_pallas_attention, fused.why_not_pallas),
}

# Where `implementation=None` switches from 'xla' to 'blockwise': query length x key length, per
# platform. CPU: measured by `python -m benchmarks.attention` (results/attention-cpu.json).
# GPU: measured on an H200 (results/attention-h200.json, gpu_check-h200.log; causal fwd+bwd,
# B=1, N=8, H=64): blockwise never beats xla by much (1024-tiles, bfloat16: on par at T=1024,
# 1.2x slower at 4096 and 16384; 128-tiles 6-22x slower), so the switch is for memory and stays
# where xla's float32 `[B, N, T, S]` arrays reach 16 MiB per batch row and head. TPU: not
# measured.
BLOCKWISE_FROM = {'cpu': 128 * 128, 'gpu': 2048 * 2048, 'tpu': 2048 * 2048}


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  """The facts about one attention call that decide which backends can compute it."""
  platform: str
  dtype: str
  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  bias_shape: tuple | None = None
  mask_shape: tuple | None = None
  is_causal: bool = False
  dropout: bool = False
  seq_lengths: bool = False


@dataclasses.dataclass(frozen=True)
class Choice:
  """The backend `dot_product_attention` uses for a call, and why."""
  implementation: str
  reason: str

  def __str__(self):
    return f'{self.implementation}: {self.reason}'


def _as_key_lengths(call: AttentionCall) -> AttentionCall | None:
  """`call` with its mask given as key_value_seq_lengths, when the mask is a key mask (it
  broadcasts to `[B, 1, 1, S]`: padding, which is how the models pass it); else None."""
  if call.mask_shape is None:
    return None
  shape = (1,) * (4 - len(call.mask_shape)) + tuple(call.mask_shape)
  if shape[1:3] != (1, 1):
    return None
  return dataclasses.replace(call, mask_shape=None, seq_lengths=True)


def _cudnn_with_key_mask(call: AttentionCall) -> bool:
  """cuDNN refuses boolean masks, but takes a key mask as lengths where it is right-padded."""
  as_lengths = _as_key_lengths(call)
  return as_lengths is not None and fused.why_not_cudnn(as_lengths) is None


KEY_MASK_NOTE = ('the key mask as key_value_seq_lengths where every row is right-padded '
                 '(checked on the device), else blockwise')


def explain(query, key, *, bias=None, mask=None, is_causal=False, dropout_rate=0.0,
            query_seq_lengths=None, key_value_seq_lengths=None, implementation=None) -> Choice:
  """Which backend `dot_product_attention` would use for these arguments, and the reason.

  Raises ValueError when `implementation` is named but cannot compute the call exactly.
  """
  call = AttentionCall(
      platform=jax.default_backend(), dtype=jnp.dtype(query.dtype).name, batch=query.shape[0],
      q_len=query.shape[1], kv_len=key.shape[1], num_heads=query.shape[2],
      num_kv_heads=key.shape[2], head_dim=query.shape[3],
      bias_shape=None if bias is None else tuple(jnp.shape(bias)),
      mask_shape=None if mask is None else tuple(jnp.shape(mask)), is_causal=bool(is_causal),
      dropout=dropout_rate > 0.0,
      seq_lengths=query_seq_lengths is not None or key_value_seq_lengths is not None)
  if implementation is not None:
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f'implementation={implementation!r} is not one of '
                       f'{[None, *IMPLEMENTATIONS]}')
    reason = IMPLEMENTATIONS[implementation][1](call)
    if reason is not None and implementation == 'cudnn' and _cudnn_with_key_mask(call):
      return Choice(implementation, f'asked for by name; {KEY_MASK_NOTE}')
    if reason is not None:
      raise ValueError(f'implementation={implementation!r} cannot compute this call: {reason}')
    return Choice(implementation, 'asked for by name')
  return _choose(call)


def _choose(call: AttentionCall) -> Choice:
  for name, why in (('cudnn', 'cuDNN flash attention: fused kernel, O(T) memory'),
                    ('pallas', 'the Pallas flash-attention kernel: fused, O(T) memory')):
    if IMPLEMENTATIONS[name][1](call) is None:
      return Choice(name, why)
    if name == 'cudnn' and _cudnn_with_key_mask(call):
      return Choice(name, f'{why}; {KEY_MASK_NOTE}')
  threshold = BLOCKWISE_FROM.get(call.platform, BLOCKWISE_FROM['gpu'])
  size = f'q_len x kv_len = {call.q_len} x {call.kv_len}'
  if call.q_len * call.kv_len >= threshold:
    return Choice('blockwise', f'{size} >= {threshold} on {call.platform}: online softmax over '
                  'key blocks, O(T) memory' + (', causal tiles skipped' if call.is_causal else ''))
  return Choice('xla', f'{size} < {threshold} on {call.platform}: the whole softmax is small')


def default_implementation(query, key, **kwargs) -> str:
  """The backend `implementation=None` resolves to for these inputs (see `explain`)."""
  return explain(query, key, **kwargs).implementation


def dot_product_attention(query, key, value, *, bias=None, mask=None, is_causal=False,
                          implementation=None, dropout_rate=0.0, dropout_rng=None,
                          query_seq_lengths=None, key_value_seq_lengths=None) -> jax.Array:
  """softmax(q k^T / sqrt(H) + bias) v, softmax in float32.

  Args:
    query: `[B, T, N, H]`.
    key, value: `[B, S, K, H]`, K divides N.
    bias: additive, broadcastable to `[B, N, T, S]`.
    mask: boolean, broadcastable to `[B, N, T, S]`, True = may attend.
    is_causal: also apply `make_causal_mask(T, S)` (query i sees keys j <= i).
    implementation: None (the best for the platform and the call: see `explain`), 'xla' (the
      reference), 'blockwise' (memory-efficient, any platform), 'cudnn' (NVIDIA GPUs; a key
      mask `[B, 1, 1, S]`, the models' padding, runs on it as key lengths when every row is
      right-padded, else on 'blockwise', decided on the device), 'pallas' (GPU and TPU kernels).
    dropout_rate, dropout_rng: attention dropout on the weights (training only).
    query_seq_lengths, key_value_seq_lengths: int `[B]`; positions at or past them are padding
      (as in `jax.nn.dot_product_attention`).
  Returns:
    `[B, T, N, H]` in query's dtype. A query row that may attend to nothing gives zeros.
  """
  _check_shapes(query, key, value)
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError(f'dropout_rate={dropout_rate} needs a dropout_rng')
  _check_extras(query, key, bias, mask, query_seq_lengths, key_value_seq_lengths)
  options = dict(bias=bias, mask=mask, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
                 key_value_seq_lengths=key_value_seq_lengths)
  choice = explain(query, key, dropout_rate=dropout_rate, implementation=implementation,
                   **options)
  function = IMPLEMENTATIONS[choice.implementation][0]
  out = function(query, key, value, dropout_rate=dropout_rate, dropout_rng=dropout_rng, **options)
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
  def __call__(self, x, context=None, *, mask=None, is_causal=False, positions=None,
               decode=False, deterministic=True, capture_attention=False, relative_table=None):
    """x `[B, T, D]`, context `[B, S, D]` (None: self-attention) -> `[B, T, D]`.

    `mask` is boolean `[B|1, 1|N, T|1, S]` (a key-padding mask `[B, 1, 1, S]` keeps memory
    linear in the length for the blockwise backend); `is_causal` adds the causal mask, except
    while decoding, where the cache builds its own. `positions [B, T]` feed rotary embeddings,
    relative position biases and the cache. `relative_table [buckets, N]`: the stack's relative
    position bias (self-attention; bidirectional unless causal).
    """
    cfg = self.config
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self_attention = context is None
    context = x if self_attention else context
    dense = functools.partial(layers.dense_general, cfg)
    # Decoding with cross-attention: the context's keys/values are projected at the first step
    # and kept in the cache, so each later token costs O(S*D) attention, not O(S*D^2).
    cross_cached = (decode and not self_attention and not self.is_initializing()
                    and self.has_variable('cache', 'cross_key'))

    if cfg.fused_qkv and self_attention and k == n:
      qkv = dense((3, n, h), ('embed', None, 'heads', 'head_dim'), name='qkv')(x)
      query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      query = dense((n, h), ('embed', 'heads', 'head_dim'), name='query')(x)
      if cross_cached:
        key = self.get_variable('cache', 'cross_key')
        value = self.get_variable('cache', 'cross_value')
      elif cfg.fused_qkv:
        kv = dense((2, k, h), ('embed', None, 'kv_heads', 'head_dim'), name='kv')(context)
        key, value = kv[:, :, 0], kv[:, :, 1]
      else:
        key = dense((k, h), ('embed', 'kv_heads', 'head_dim'), name='key')(context)
        value = dense((k, h), ('embed', 'kv_heads', 'head_dim'), name='value')(context)

    if positions is None:
      if decode and self_attention:
        raise ValueError('decode=True needs per-example positions [batch, length]')
      positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    if cfg.positions == 'rotary' and self_attention:
      query = apply_rotary(query, positions, cfg.rope_base)
      key = apply_rotary(key, positions, cfg.rope_base)

    if cfg.attention_scale is not None:  # the kernels divide by sqrt(H); fold the rest in here
      query = query * jnp.asarray(cfg.attention_scale * math.sqrt(h), query.dtype)
    bias = None
    if relative_table is not None:
      # While decoding the keys are the cache's slots, slot i holding position i.
      key_positions = jnp.arange(self._cache_length(x))[None] if decode else positions
      bias = layers.relative_bias(cfg, relative_table, positions, key_positions,
                                  bidirectional=not is_causal)
    if decode and self_attention:
      key, value, mask = self._update_cache(key, value, positions)
      is_causal = False  # the cache's mask holds causality
    elif decode and not cross_cached and not self.is_initializing():
      # Created at the first decoding step, not at init: the zero cache has no stale entry that
      # could pass for the source's keys.
      self.put_variable('cache', 'cross_key', key)
      self.put_variable('cache', 'cross_value', value)
    dropout_rng = None
    dropout_rate = 0.0 if deterministic else cfg.attention_dropout_rate
    if dropout_rate > 0.0:
      dropout_rng = self.make_rng('dropout')
    out = dot_product_attention(query, key, value, bias=bias, mask=mask, is_causal=is_causal,
                                implementation=cfg.attention_impl, dropout_rate=dropout_rate,
                                dropout_rng=dropout_rng)
    if capture_attention:
      self.sow('intermediates', 'attention_weights',
               attention_weights(query, key, bias=bias, mask=mask, is_causal=is_causal))
    return dense(cfg.d_model, ('heads', 'head_dim', 'embed'), axis=(-2, -1), name='out')(out)

  def _cache_length(self, x):
    """The key/value cache's length (at `init`, the input's length, which sets it)."""
    if self.has_variable('cache', 'cached_key'):
      return self.get_variable('cache', 'cached_key').shape[1]
    return x.shape[1]

  def _update_cache(self, key, value, positions):
    """Writes `key/value [B, T, K, H]` at `positions [B, T]`; returns the whole cache and mask."""
    is_init = not self.has_variable('cache', 'cached_key')
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, value.shape, value.dtype)
    if is_init:
      # `init(..., decode=True)` only sizes the cache: length = the input's length.
      return key, value, make_causal_mask(key.shape[1])
    batch = jnp.arange(key.shape[0])[:, None]
    length = cached_key.value.shape[1]
    # NumPy on a concrete array: under nn.scan even a concrete array's jnp.max is traced.
    last = None if isinstance(positions, jax.core.Tracer) else int(np.asarray(positions).max())
    if last is not None and last >= length:
      raise ValueError(f'decoding position {last} is past the cache length {length} set at '
                       'init(..., decode=True)')
    # Pad tokens (position -1) and positions past the end are dropped by the scatter.
    slots = jnp.where(positions >= 0, positions, length)
    cached_key.value = cached_key.value.at[batch, slots].set(key, mode='drop')
    cached_value.value = cached_value.value.at[batch, slots].set(value, mode='drop')
    # Slots past a query's position are either future tokens or stale entries of pad tokens;
    # a query past the cache's end (only possible under jit) attends to nothing: zeros.
    mask = ((jnp.arange(length)[None, None, None, :] <= positions[:, None, :, None])
            & (positions < length)[:, None, :, None])  # [B, 1, T, L]
    return cached_key.value, cached_value.value, mask
