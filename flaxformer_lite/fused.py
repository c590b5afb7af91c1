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

import math

import jax
import jax.numpy as jnp

# Lengths the Pallas kernels tile by; a length must be a multiple (or shorter than one tile).
PALLAS_BLOCK = 128
_HALF_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _cuda_capability() -> tuple[int, ...] | None:
  """(major, minor) of the first GPU when JAX computes on an NVIDIA GPU, else None."""
  if jax.default_backend() != 'gpu':
    return None
  device = jax.devices()[0]
  capability = getattr(device, 'compute_capability', None)
  if capability is None or 'cuda' not in str(getattr(device.client, 'platform_version', '')):
    return None
  return tuple(int(x) for x in str(capability).split('.'))


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
  if call.bias_shape is not None and (call.q_len % 2 or call.kv_len % 2):
    return f'with a bias cuDNN needs even lengths, got q_len={call.q_len}, kv_len={call.kv_len}'
  return None


def cudnn_attention(query, key, value, *, bias=None, is_causal=False, query_seq_lengths=None,
                    key_value_seq_lengths=None):
  """cuDNN flash attention; padded query rows and rows with no key are zeros, as in `'xla'`."""
  lengths = {}
  if query_seq_lengths is not None:
    lengths['query_seq_lengths'] = jnp.asarray(query_seq_lengths, jnp.int32)
  if key_value_seq_lengths is not None:
    lengths['key_value_seq_lengths'] = jnp.asarray(key_value_seq_lengths, jnp.int32)
  out = jax.nn.dot_product_attention(query, key, value, bias=bias, is_causal=is_causal,
                                     implementation='cudnn', **lengths)
  b, t = query.shape[:2]
  valid = jnp.ones((b, t), bool)
  if query_seq_lengths is not None:
    valid &= jnp.arange(t)[None, :] < lengths['query_seq_lengths'][:, None]
  if key_value_seq_lengths is not None:
    valid &= (lengths['key_value_seq_lengths'] > 0)[:, None]
  return jnp.where(valid[:, :, None, None], out, 0) if lengths else out


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


def pallas_attention(query, key, value, *, is_causal=False, platform=None, interpret=False):
  """`[B, T, N, H]` attention through the Pallas kernel of `platform` ('gpu' or 'tpu'; default:
  JAX's backend). `interpret=True` runs it on any backend, for tests."""
  platform = platform or jax.default_backend()
  if platform == 'tpu':
    return _splash(query, key, value, is_causal=is_causal, interpret=interpret)
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  t, s = query.shape[1], key.shape[1]
  bq, bk = min(PALLAS_BLOCK, t), min(PALLAS_BLOCK, s)
  # The backward tiles stay at the kernel's defaults (32), cut to the lengths.
  bwd_q, bwd_k = min(32, t), min(32, s)
  blocks = gpu_attention.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bwd_q, block_kv_dkv=bwd_k,
                                    block_q_dq=bwd_q, block_kv_dq=bwd_k)
  return gpu_attention.mha(query, key, value, segment_ids=None,
                           sm_scale=1.0 / math.sqrt(query.shape[-1]), causal=is_causal,
                           block_sizes=blocks, interpret=interpret)


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
