"""The fused attention kernels JAX ships, each behind a check of what it computes exactly.

- `cudnn`: cuDNN flash attention on NVIDIA GPUs, through `jax.nn.dot_product_attention`.
- `pallas`: the Pallas Triton kernel on GPUs (`jax.experimental.pallas.ops.gpu.attention.mha`),
  splash attention on TPUs (`jax.experimental.pallas.ops.tpu.splash_attention`).

Each `why_not_*(call)` returns None when the kernel computes what `'xla'` computes for the call
(an `attention.AttentionCall`), else the reason it cannot; `dot_product_attention` raises that
reason as a `ValueError` when the kernel is asked for by name, and routes around it otherwise.
Both Pallas kernels also run on CPU with `interpret=True` (slowly), which is how they are tested
on machines without an accelerator.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from flaxformer_lite import blockwise

# Lengths the Pallas kernels tile by; a length must be a multiple (or shorter than one tile).
PALLAS_BLOCK = 128
_HALF_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# What a -inf bias becomes for cuDNN: jax.nn's own stand-ins for a masked key.
_LARGE_NEGATIVE = {jnp.dtype(jnp.bfloat16): -2.0**41, jnp.dtype(jnp.float16): -2.0**15}


def _cuda_capability() -> tuple[int, ...] | None:
  """(major, minor) of the first GPU when JAX computes on an NVIDIA GPU, else None (ROCm reports
  architecture names such as 'gfx90a', which are not numbers)."""
  if jax.default_backend() != 'gpu':
    return None
  capability = getattr(jax.devices()[0], 'compute_capability', None)
  try:
    return tuple(int(x) for x in str(capability).split('.'))
  except ValueError:
    return None


def why_not_cudnn(call) -> str | None:
  capability = _cuda_capability() if call.platform == 'gpu' else None
  if capability is None:
    return f'needs an NVIDIA GPU with cuDNN; JAX computes on {call.platform}'
  if jnp.dtype(call.dtype) not in _HALF_FLOATS:
    return (f'cuDNN flash attention takes bfloat16 or float16 inputs, got {call.dtype} '
            "(use implementation='blockwise' or 'pallas' for float32)")
  if call.dropout:
    return 'jax.nn exposes no attention dropout for cuDNN'
  if call.mask_shape is not None:
    return (f'cuDNN takes padding as query/key_value_seq_lengths and causality as is_causal, '
            f'not a boolean mask (got shape {call.mask_shape})')
  if call.is_causal and call.q_len != call.kv_len:
    return (f'causal attention with q_len={call.q_len} != kv_len={call.kv_len}: cuDNN aligns '
            'the diagonal differently')
  max_head_dim = 256 if capability >= (9, 0) else 128
  if call.head_dim % 8 or call.head_dim > max_head_dim:
    return f'head_dim={call.head_dim} must be a multiple of 8 and at most {max_head_dim}'
  # With a bias, jax.nn's cuDNN call returns a wrong (~0) bias gradient: `cudnn_with_masks`
  # takes the gradients of such calls from 'xla'.
  if call.bias_shape is not None and (call.q_len % 2 or call.kv_len % 2):
    return f'with a bias cuDNN needs even lengths, got q_len={call.q_len}, kv_len={call.kv_len}'
  return None


def cudnn_attention(query, key, value, *, bias=None, is_causal=False, query_seq_lengths=None,
                    key_value_seq_lengths=None):
  """cuDNN flash attention; padded query rows and rows with no key are zeros, as in `'xla'`.

  A bias may broadcast over any dimension: cuDNN takes `[B|1, N|1, T, S]` only (a `[B, 1, 1, S]`
  bias raises 'Bias must have same seq length as QKV'), so it gets that shape here (its gradient
  flows back to the bias as passed). A -inf in the bias masks that key, as in `'xla'`: cuDNN
  gets the large finite number jax.nn gives it for a masked key instead, and a row left with
  nothing to attend to gives zeros.
  """
  b, t, n, _ = query.shape
  s = key.shape[1]
  lengths = {}
  if query_seq_lengths is not None:
    lengths['query_seq_lengths'] = jnp.asarray(query_seq_lengths, jnp.int32)
  if key_value_seq_lengths is not None:
    lengths['key_value_seq_lengths'] = jnp.asarray(key_value_seq_lengths, jnp.int32)
  alive = None  # [B|1, N|1, T, 1]: query rows the bias leaves something to attend to
  if bias is not None:
    bias = jnp.reshape(bias, (1,) * (4 - jnp.ndim(bias)) + jnp.shape(bias))
    bias = jnp.broadcast_to(bias, bias.shape[:2] + (t, s))
    allowed = allowed_by_bias = bias > -jnp.inf
    if is_causal:
      allowed &= jnp.tril(jnp.ones((t, s), bool))
    if key_value_seq_lengths is not None:
      kv_valid = jnp.arange(s)[None, :] < lengths['key_value_seq_lengths'][:, None]
      allowed &= kv_valid[:, None, None, :]
    alive = allowed.any(-1, keepdims=True)
    bias = jnp.where(allowed_by_bias, bias, _LARGE_NEGATIVE[jnp.dtype(query.dtype)])
  out = jax.nn.dot_product_attention(query, key, value, bias=bias, is_causal=is_causal,
                                     implementation='cudnn', **lengths)
  valid = jnp.ones((b, 1, t, 1), bool)  # [B, 1, T, 1], as the bias
  if query_seq_lengths is not None:
    valid &= (jnp.arange(t)[None, :] < lengths['query_seq_lengths'][:, None])[:, None, :, None]
  if key_value_seq_lengths is not None:
    valid &= (lengths['key_value_seq_lengths'] > 0)[:, None, None, None]
  if alive is not None:
    valid = valid & alive
  if not lengths and alive is None:
    return out
  valid = jnp.broadcast_to(valid, (b, n, t, 1)).transpose(0, 2, 1, 3)  # [B, T, N, 1]
  return jnp.where(valid, out, jnp.zeros((), out.dtype))


# With a bias, jax.nn's cuDNN attention returns a bias gradient of ~0 (measured on an H200: jax
# 0.11.2, cuDNN 9.19; its dq, dk, dv are right): such calls take their gradients from
# `reference` (attention.py's 'xla'), a non-differentiable argument so this file needs no
# import of attention.py.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 7))
def _cudnn_reference_gradients(reference, query, key, value, bias, query_seq_lengths,
                               key_value_seq_lengths, is_causal):
  return cudnn_attention(query, key, value, bias=bias, is_causal=is_causal,
                         query_seq_lengths=query_seq_lengths,
                         key_value_seq_lengths=key_value_seq_lengths)


def _cudnn_reference_gradients_fwd(reference, query, key, value, bias, q_lengths, kv_lengths,
                                   is_causal):
  out = _cudnn_reference_gradients(reference, query, key, value, bias, q_lengths, kv_lengths,
                                   is_causal)
  return out, (query, key, value, bias, q_lengths, kv_lengths)


def _cudnn_reference_gradients_bwd(reference, is_causal, residuals, d_out):
  query, key, value, bias, q_lengths, kv_lengths = residuals
  attend = lambda q, k, v, b: reference(
      q, k, v, bias=b, is_causal=is_causal, query_seq_lengths=q_lengths,
      key_value_seq_lengths=kv_lengths).astype(q.dtype)
  return (*jax.vjp(attend, query, key, value, bias)[1](d_out), None, None)


_cudnn_reference_gradients.defvjp(_cudnn_reference_gradients_fwd, _cudnn_reference_gradients_bwd)


def _cudnn_call(query, key, value, *, reference, bias, is_causal, query_seq_lengths,
                key_value_seq_lengths):
  if bias is None:
    return cudnn_attention(query, key, value, is_causal=is_causal,
                           query_seq_lengths=query_seq_lengths,
                           key_value_seq_lengths=key_value_seq_lengths)
  as_array = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  return _cudnn_reference_gradients(reference, query, key, value, bias,
                                    as_array(query_seq_lengths),
                                    as_array(key_value_seq_lengths), bool(is_causal))


def _key_valid(mask, batch, kv_len):
  """`[B, S]` from a key mask broadcastable to `[B, 1, 1, S]`."""
  mask = jnp.reshape(mask, (1,) * (4 - jnp.ndim(mask)) + jnp.shape(mask))
  return jnp.broadcast_to(mask[:, 0, 0, :], (batch, kv_len))


def cudnn_with_masks(query, key, value, *, reference, dropout_rate, dropout_rng, mask,
                     bias=None, is_causal=False, query_seq_lengths=None,
                     key_value_seq_lengths=None):
  """`cudnn_attention` as `attention.dot_product_attention` calls it: a key mask (one that
  broadcasts to `[B, 1, 1, S]`) becomes key_value_seq_lengths when every row of it is
  right-padded (checked on the device), else the call runs on 'blockwise'. With a bias the
  gradients are `reference`'s (attention.py's 'xla')."""
  del dropout_rate, dropout_rng  # dropout is refused by why_not_cudnn
  options = dict(bias=bias, is_causal=is_causal, query_seq_lengths=query_seq_lengths)
  if mask is None:
    return _cudnn_call(query, key, value, reference=reference,
                       key_value_seq_lengths=key_value_seq_lengths, **options)
  b, s = query.shape[0], key.shape[1]
  valid = _key_valid(mask, b, s)
  if key_value_seq_lengths is not None:
    valid &= jnp.arange(s)[None, :] < jnp.asarray(key_value_seq_lengths)[:, None]
  lengths = valid.sum(axis=-1, dtype=jnp.int32)
  right_padded = jnp.all(valid == (jnp.arange(s)[None, :] < lengths[:, None]))
  on_cudnn = lambda: _cudnn_call(query, key, value, reference=reference,
                                 key_value_seq_lengths=lengths, **options)
  # The fallback keeps O(T) residuals: under grad, lax.cond stores both branches' residuals.
  on_blockwise = lambda: blockwise.blockwise_attention(
      query, key, value, mask=mask, key_value_seq_lengths=key_value_seq_lengths,
      **options).astype(query.dtype)
  return jax.lax.cond(right_padded, on_cudnn, on_blockwise)


def _pallas_kernel(platform):
  return {'gpu': 'the Pallas GPU kernel', 'tpu': 'splash attention'}.get(platform)


def why_not_pallas(call) -> str | None:
  kernel = _pallas_kernel(call.platform)
  if kernel is None:
    return f'needs a GPU or a TPU; JAX computes on {call.platform}'
  unsupported = [name for name, used in (('a bias', call.bias_shape is not None),
                                         ('a boolean mask', call.mask_shape is not None),
                                         ('dropout', call.dropout),
                                         ('sequence lengths', call.seq_lengths)) if used]
  if unsupported:
    return f'{kernel} computes full or causal attention only, without {" or ".join(unsupported)}'
  for name, length in (('q_len', call.q_len), ('kv_len', call.kv_len)):
    if length > PALLAS_BLOCK and length % PALLAS_BLOCK:
      return f'{name}={length} must be a multiple of {PALLAS_BLOCK} (its tile)'
  if call.platform == 'tpu' and call.kv_len % PALLAS_BLOCK:
    return f'{kernel} needs kv_len a multiple of {PALLAS_BLOCK} (its lanes), got {call.kv_len}'
  if call.platform == 'gpu' and call.q_len != call.kv_len:
    return (f'{kernel} needs q_len == kv_len (its backward pass splits both into the same '
            f'number of blocks), got {call.q_len} and {call.kv_len}')
  if call.platform == 'gpu' and call.num_kv_heads != call.num_heads:
    # mha indexes key/value blocks by the query head: with fewer kv heads it reads the wrong
    # heads, or past the end, and returns wrong numbers without an error.
    return (f'{kernel} computes wrong results for grouped-query heads (num_heads='
            f'{call.num_heads}, num_kv_heads={call.num_kv_heads}); it needs equal counts')
  return None


def _tile_length(n: int) -> int:
  """The length the Pallas GPU kernel runs `n` at: Triton's tiles are powers of two of at least
  16 (its smallest matmul), so a length under one tile that is not one is padded up."""
  if n >= PALLAS_BLOCK or (n >= 16 and n & (n - 1) == 0):
    return n
  return max(16, 1 << (n - 1).bit_length())


def pallas_attention(query, key, value, *, is_causal=False, platform=None, interpret=False):
  """`[B, T, N, H]` attention through the Pallas kernel of `platform` ('gpu' or 'tpu'; default:
  JAX's backend). `interpret=True` runs it on any backend, for tests.

  On GPUs a length shorter than one tile is padded to a power of two (the padded keys kept out
  by segment ids; the Triton lowering refuses other sizes) and a head_dim under 16 with zeros.
  """
  platform = platform or jax.default_backend()
  if platform == 'tpu':
    return _splash(query, key, value, is_causal=is_causal, interpret=interpret)
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  b, t, _, h = query.shape
  s = key.shape[1]
  tp, sp, hp = _tile_length(t), _tile_length(s), max(h, 16)
  pad = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, hp - h)))
  q, k, v = pad(query, tp), pad(key, sp), pad(value, sp)
  segment_ids = None
  if (tp, sp) != (t, s):  # why_not_pallas: t == s on GPUs
    segment_ids = jnp.broadcast_to((jnp.arange(tp) < t).astype(jnp.int32), (b, tp))
  bq, bk = min(PALLAS_BLOCK, tp), min(PALLAS_BLOCK, sp)
  # The backward tiles stay at the kernel's defaults (32), cut to the lengths.
  bwd_q, bwd_k = min(32, tp), min(32, sp)
  blocks = gpu_attention.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bwd_q, block_kv_dkv=bwd_k,
                                    block_q_dq=bwd_q, block_kv_dq=bwd_k)
  out = gpu_attention.mha(q, k, v, segment_ids=segment_ids, sm_scale=1.0 / math.sqrt(h),
                          causal=is_causal, block_sizes=blocks, interpret=interpret)
  return out[:, :t, :, :h]


def _splash(query, key, value, *, is_causal, interpret):
  """Splash attention, one multi-query kernel per key/value head: grouped heads share it."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash, splash_attention_mask as masks)
  b, t, n, h = query.shape
  s, k = key.shape[1], key.shape[2]
  g = n // k
  head_mask = masks.CausalMask((t, s)) if is_causal else masks.FullMask((t, s))
  bq, bk = min(PALLAS_BLOCK, t), min(PALLAS_BLOCK, s)
  blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                             block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                             block_kv_dq=bk)
  kernel = splash.make_splash_mqa(masks.MultiHeadMask([head_mask] * g), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)
  # Splash takes the scale folded into the queries; layouts [G, T, H] and [S, H] per kv head.
  q = (query / math.sqrt(h)).astype(query.dtype).reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4)
  kk, vv = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
  out = jax.vmap(jax.vmap(kernel))(q, kk, vv)  # [B, K, G, T, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
