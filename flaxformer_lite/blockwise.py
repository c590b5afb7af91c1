"""Memory-efficient attention: FlashAttention-2's online softmax over key blocks in pure JAX.

The forward pass walks the key blocks of each query block, keeping a running maximum `m`, a running
sum `l` and an unnormalized output in float32, and saves only the output and the log-sum-exp per
query row. The backward pass (a `jax.custom_vjp`) recomputes each tile's probabilities from them:
no `[T, S]` array is ever stored, so memory grows linearly with the length. Causal tiles above the
diagonal are skipped, in both passes.

Inside, queries are laid out `[nq, B, K, bq*G, H]`: query block, batch, key/value head, then the
block's rows (time major, then the G query heads that share a key/value head, so grouped-query
attention never copies keys or values), head dim. Keys and values are `[nk, B, K, bk, H]`. A mask
or bias keeps its broadcast dimensions (size 1) and is laid out the same way, so a `[B, 1, 1, S]`
padding mask stays `O(B*S)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# (block_q, block_k) by platform; override per call. CPU: the fastest of six tilings in a sweep of
# causal and full fwd+bwd at T = 512..4096 (the README's benchmark section). GPU: the fastest of
# 128, 512 and 1024 square tiles on an H200, bfloat16 causal fwd+bwd, B=1, N=8, H=64, T = 1024,
# 4096, 16384: 0.3, 2.6, 27 ms against 2.8, 34, 510 ms with 128 (results/attention-h200.json).
# TPU: untuned.
BLOCK_SIZES = {'cpu': (256, 512), 'gpu': (1024, 1024), 'tpu': (512, 512)}


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything about one call that shapes the program (hashable: a custom_vjp static arg)."""
  t: int  # query length
  s: int  # key length
  groups: int  # G = N // K
  block_q: int
  block_k: int
  scale: float
  is_causal: bool
  dropout_rate: float
  unroll: bool
  compute_dtype: Any  # dtype of the matmul operands

  @property
  def nq(self):
    return -(-self.t // self.block_q)

  @property
  def nk(self):
    return -(-self.s // self.block_k)


def blockwise_attention(query, key, value, *, bias=None, mask=None, is_causal=False,
                        query_seq_lengths=None, key_value_seq_lengths=None, dropout_rate=0.0,
                        dropout_rng=None, block_q=None, block_k=None, unroll=False):
  """softmax(q k^T / sqrt(H) + bias) v in `O(T + S)` memory; the arguments of
  `dot_product_attention`, plus:

    block_q, block_k: tile sizes (default `BLOCK_SIZES` for the platform).
    unroll: run the block loops in Python instead of `lax` loops: a bigger program whose
      `cost_analysis()` counts every tile (a `lax` loop body is counted once). Same results.

  Returns float32 `[B, T, N, H]`. Dropout masks are drawn per tile, so a given rng gives the same
  result for the same block sizes (not the same pattern as `'xla'`).
  """
  b, t, n, h = query.shape
  s, k = key.shape[1], key.shape[2]
  default_q, default_k = BLOCK_SIZES.get(jax.default_backend(), BLOCK_SIZES['cpu'])
  for name, size in (('block_q', block_q), ('block_k', block_k)):
    if size is not None and (not isinstance(size, int) or size <= 0):
      raise ValueError(f'{name}={size!r} must be a positive integer')
  block_q = min(block_q or default_q, t)
  block_k = min(block_k or default_k, s)
  static = _Static(t=t, s=s, groups=n // k, block_q=block_q, block_k=block_k,
                   scale=1.0 / math.sqrt(h), is_causal=bool(is_causal),
                   dropout_rate=float(dropout_rate), unroll=bool(unroll),
                   compute_dtype=jnp.promote_types(query.dtype, key.dtype))
  # Lengths are only checked where they can cut a row short: padded query rows are sliced off
  # (and get no gradient), padded key columns must be masked.
  q_len = None if query_seq_lengths is None else jnp.asarray(query_seq_lengths, jnp.int32)
  kv_len = key_value_seq_lengths
  if kv_len is None and s % block_k:
    kv_len = jnp.full((b,), s, jnp.int32)
  kv_len = None if kv_len is None else jnp.asarray(kv_len, jnp.int32)
  bias_tiles = None if bias is None else _to_tiles(_as_4d(bias), static, b, n, k, 0.0)
  mask_tiles = None if mask is None else _to_tiles(_as_4d(mask).astype(bool), static, b, n, k,
                                                   False)
  rng = dropout_rng if static.dropout_rate > 0.0 else None
  out = _attention(_queries_to_tiles(query, static), _keys_to_tiles(key, static),
                   _keys_to_tiles(value, static), bias_tiles, mask_tiles, q_len, kv_len, rng,
                   static)
  return _tiles_to_queries(out, static, b, n, h)


# ----------------------------------------------------------------------------------------------
# Layouts. Plain differentiable reshapes and pads: autodiff carries the gradients back through them.

def _as_4d(x):
  x = jnp.asarray(x)
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _pad_axis(x, axis, size, value):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _queries_to_tiles(query, st):
  """`[B, T, N, H]` -> `[nq, B, K, bq*G, H]`."""
  b, t, n, h = query.shape
  k = n // st.groups
  q = _pad_axis(query, 1, st.nq * st.block_q, 0)
  q = q.reshape(b, st.nq, st.block_q, k, st.groups, h).transpose(1, 0, 3, 2, 4, 5)
  return q.reshape(st.nq, b, k, st.block_q * st.groups, h)


def _tiles_to_queries(out, st, b, n, h):
  """`[nq, B, K, bq*G, H]` -> `[B, T, N, H]`."""
  k = n // st.groups
  out = out.reshape(st.nq, b, k, st.block_q, st.groups, h).transpose(1, 0, 3, 2, 4, 5)
  return out.reshape(b, st.nq * st.block_q, n, h)[:, :st.t]


def _keys_to_tiles(x, st):
  """`[B, S, K, H]` -> `[nk, B, K, bk, H]`."""
  b, _, k, h = x.shape
  x = _pad_axis(x, 1, st.nk * st.block_k, 0)
  return x.reshape(b, st.nk, st.block_k, k, h).transpose(1, 0, 3, 2, 4)


def _to_tiles(x, st, b, n, k, pad_value):
  """A bias or mask broadcastable to `[B, N, T, S]` -> `[nq|1, nk|1, B|1, K|1, bq|1, G|1, bk|1]`.

  Dimensions of size 1 stay size 1 (no copy is broadcast out); a full head dimension splits
  into (K, G).
  """
  full = (b, n, st.t, st.s)
  if any(d not in (1, f) for d, f in zip(x.shape, full)):
    raise ValueError(f'mask/bias shape {x.shape} does not broadcast to [batch, heads, q_len, '
                     f'kv_len] = {list(full)}')
  xb, xn, xt, xs = x.shape
  kk, g = (k, st.groups) if xn == n and n > 1 else (1, 1)
  nq, bq = (st.nq, st.block_q) if xt == st.t and st.t > 1 else (1, 1)
  nk, bk = (st.nk, st.block_k) if xs == st.s and st.s > 1 else (1, 1)
  x = x.reshape(xb, kk, g, xt, xs)
  x = _pad_axis(_pad_axis(x, 3, nq * bq, pad_value), 4, nk * bk, pad_value)
  x = x.reshape(xb, kk, g, nq, bq, nk, bk).transpose(3, 5, 0, 1, 4, 2, 6)
  return x


# ----------------------------------------------------------------------------------------------
# Loops: `lax` loops (the default), or Python loops when `unroll` (bounds are then Python ints).

def _fori(lo, hi, body, carry, unroll):
  if unroll:
    for i in range(lo, hi):
      carry = body(i, carry)
    return carry
  return lax.fori_loop(lo, hi, body, carry)


def _key_blocks_for(i, st):
  """Key blocks `[0, end)` that query block i may see: causal skips those right of the diagonal."""
  if not st.is_causal:
    return st.nk
  last_query = (i + 1) * st.block_q - 1
  end = last_query // st.block_k + 1
  return min(end, st.nk) if st.unroll else jnp.minimum(end, st.nk)


def _tile_index(tiles, i, j):
  """The `(i, j)` tile of a laid-out mask or bias (index 0 along broadcast block axes)."""
  if tiles is None:
    return None
  i = i if tiles.shape[0] > 1 else 0
  j = j if tiles.shape[1] > 1 else 0
  return tiles[i, j]


# ----------------------------------------------------------------------------------------------
# One tile.

def _rows(x, st):
  """A `[B', K', bq', G', bk']` mask or bias tile -> `[B', K', bq*G | 1, bk']`, the logits' rows."""
  if x.shape[2] == 1 and x.shape[3] == 1:
    return x.reshape(x.shape[0], x.shape[1], 1, x.shape[4])
  x = jnp.broadcast_to(x, (*x.shape[:2], st.block_q, st.groups, x.shape[4]))
  return x.reshape(x.shape[0], x.shape[1], -1, x.shape[4])


def _logits(q, k, bias, mask, q_len, kv_len, i, j, st):
  """Query block i against key block j: scaled logits `[B, K, bq*G, bk]` (float32) and where
  attention is allowed (mask, causal, lengths, padding; None: everywhere)."""
  s = jnp.einsum('bkrh,bksh->bkrs', q, k, preferred_element_type=jnp.float32) * st.scale
  if bias is not None:
    s = s + _rows(bias, st).astype(jnp.float32)
  q_pos = (i * st.block_q + jnp.arange(st.block_q * st.groups) // st.groups)[:, None]
  k_pos = (j * st.block_k + jnp.arange(st.block_k))[None, :]
  allowed = [None if mask is None else _rows(mask, st)]
  if q_len is not None:
    allowed.append(q_pos < q_len[:, None, None, None])
  if kv_len is not None:
    allowed.append(k_pos < kv_len[:, None, None, None])
  if st.is_causal:
    allowed.append(k_pos <= q_pos)
  allowed = [a for a in allowed if a is not None]
  return s, (functools.reduce(jnp.logical_and, allowed) if allowed else None)


def _masked(x, allowed, fill):
  return x if allowed is None else jnp.where(allowed, x, fill)


def _keep(rng, i, j, shape, st):
  """The dropout keep-mask of tile (i, j): the same in the forward and the backward pass."""
  return jax.random.bernoulli(jax.random.fold_in(rng, i * st.nk + j), 1.0 - st.dropout_rate,
                              shape)


def _dropped(p, rng, i, j, st):
  if rng is None:
    return p
  keep = _keep(rng, i, j, p.shape, st)
  return jnp.where(keep, p / (1.0 - st.dropout_rate), 0.0)


# ----------------------------------------------------------------------------------------------
# Forward and backward passes.

def _forward(q, k, v, bias, mask, q_len, kv_len, rng, st):
  """-> output `[nq, B, K, bq*G, H]` float32 and log-sum-exp `[nq, B, K, bq*G]` (+inf: empty row)."""
  def query_block(i):
    qi = q[i]

    def key_block(j, carry):
      m, l, acc = carry
      s, allowed = _logits(qi, k[j], _tile_index(bias, i, j), _tile_index(mask, i, j), q_len,
                           kv_len, i, j, st)
      s = _masked(s, allowed, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=-1))
      # A row with nothing allowed yet keeps m = -inf; shift by 0 so exp(-inf) = 0, not NaN.
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      pv = jnp.einsum('bkrs,bksh->bkrh', _dropped(p, rng, i, j, st).astype(st.compute_dtype),
                      v[j], preferred_element_type=jnp.float32)
      return m_new, l * alpha + p.sum(axis=-1), acc * alpha[..., None] + pv

    m = jnp.full(qi.shape[:-1], -jnp.inf, jnp.float32)
    init = (m, jnp.zeros_like(m), jnp.zeros(qi.shape, jnp.float32))
    m, l, acc = _fori(0, _key_blocks_for(i, st), key_block, init, st.unroll)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    return (jnp.where(empty[..., None], 0.0, acc / l_safe[..., None]),
            jnp.where(empty, jnp.inf, m + jnp.log(l_safe)))

  if st.unroll:
    outs = [query_block(i) for i in range(st.nq)]
    return jnp.stack([o for o, _ in outs]), jnp.stack([lse for _, lse in outs])
  return lax.map(query_block, jnp.arange(st.nq))


def _reduce_to(x, shape):
  """Sums `x` over the axes where `shape` has size 1 (the gradient of a broadcast)."""
  axes = tuple(a for a, (d, e) in enumerate(zip(shape, x.shape)) if d == 1 and e != 1)
  return x.sum(axis=axes, keepdims=True) if axes else x


def _backward(res, d_out, st):
  """Gradients of q, k, v and bias from the saved output and log-sum-exp, tile by tile.

  Query blocks outside (each one's rows are sliced once; dq_i is complete after its inner loop),
  key blocks inside, with the same causal skipping as the forward pass; dK and dV accumulate.
  """
  # The barrier keeps XLA from merging the recomputed logits with the forward pass's (unrolled
  # loops make them identical expressions): that would keep every [T, S] tile alive in between.
  q, k, v, bias, mask, q_len, kv_len, rng, out, lse = lax.optimization_barrier(res)
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out, axis=-1)  # [nq, B, K, r]: rowsum(P * dP) = rowsum(dO * O)
  d_out = d_out.astype(st.compute_dtype)
  # dK and dV accumulate as [H, bk]: products contracting over the rows r then read q and dO
  # transposed once ([H, r]), which XLA:CPU multiplies ~1.4x faster than a transposed operand.
  q_t, d_out_t = jnp.swapaxes(q, -1, -2), jnp.swapaxes(d_out, -1, -2)

  def query_block(i, carry):
    dq, dk_t, dv_t, dbias = carry
    qi, qi_t, doi, doi_t, lse_i, delta_i = q[i], q_t[i], d_out[i], d_out_t[i], lse[i], delta[i]

    def key_block(j, inner):
      dqi, dk_t, dv_t, dbias = inner
      kj, vj = k[j], v[j]
      s, allowed = _logits(qi, kj, _tile_index(bias, i, j), _tile_index(mask, i, j), q_len,
                           kv_len, i, j, st)
      # The exact probabilities: 0 where not allowed, and in rows with nothing allowed (lse=inf).
      p = _masked(jnp.exp(s - lse_i[..., None]), allowed, 0.0)
      p_dropped = _dropped(p, rng, i, j, st).astype(st.compute_dtype)
      dv_t = dv_t.at[j].add(jnp.einsum('bkhr,bkrs->bkhs', doi_t, p_dropped,
                                       preferred_element_type=jnp.float32))
      dp = _dropped(jnp.einsum('bkrh,bksh->bkrs', doi, vj, preferred_element_type=jnp.float32),
                    rng, i, j, st)
      ds = p * (dp - delta_i[..., None])  # gradient of the scaled logits (and of the bias)
      if dbias is not None:
        tile = _reduce_to(ds.reshape(ds.shape[0], ds.shape[1], st.block_q, st.groups, -1),
                          dbias.shape[2:])
        bi, bj = (i if dbias.shape[0] > 1 else 0), (j if dbias.shape[1] > 1 else 0)
        dbias = dbias.at[bi, bj].add(tile.astype(dbias.dtype))
      ds = ds.astype(st.compute_dtype)
      dqi = dqi + jnp.einsum('bkrs,bksh->bkrh', ds, kj, preferred_element_type=jnp.float32)
      dk_t = dk_t.at[j].add(jnp.einsum('bkhr,bkrs->bkhs', qi_t, ds,
                                       preferred_element_type=jnp.float32))
      return dqi, dk_t, dv_t, dbias

    zeros = jnp.zeros(qi.shape, jnp.float32)
    dqi, dk_t, dv_t, dbias = _fori(0, _key_blocks_for(i, st), key_block,
                                   (zeros, dk_t, dv_t, dbias), st.unroll)
    return dq.at[i].set(dqi * st.scale), dk_t, dv_t, dbias

  zeros = lambda shape: jnp.zeros(shape, jnp.float32)
  kv_t_shape = (*k.shape[:3], k.shape[4], k.shape[3])  # [nk, B, K, H, bk]
  init = (zeros(q.shape), zeros(kv_t_shape), zeros(kv_t_shape),
          None if bias is None else zeros(bias.shape))
  dq, dk_t, dv_t, dbias = _fori(0, st.nq, query_block, init, st.unroll)
  dk, dv = jnp.swapaxes(dk_t, -1, -2) * st.scale, jnp.swapaxes(dv_t, -1, -2)
  dbias = None if bias is None else dbias.astype(bias.dtype)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _attention(q, k, v, bias, mask, q_len, kv_len, rng, st):
  return _forward(q, k, v, bias, mask, q_len, kv_len, rng, st)[0]


def _attention_fwd(q, k, v, bias, mask, q_len, kv_len, rng, st):
  out, lse = _forward(q, k, v, bias, mask, q_len, kv_len, rng, st)
  return out, (q, k, v, bias, mask, q_len, kv_len, rng, out, lse)


def _attention_bwd(st, res, d_out):
  dq, dk, dv, dbias = _backward(res, d_out, st)
  return dq, dk, dv, dbias, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
