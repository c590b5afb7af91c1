"""The attention backends against the 'xla' reference: outputs and the gradients of query, key,
value and bias on a grid of masks, shapes and dtypes; dropout; memory and FLOPs."""

import json
import os
import pathlib
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import GPT, attention, blockwise, dot_product_attention, generate, \
    make_padding_mask
from flaxformer_lite.blockwise import blockwise_attention

# float32: both sides round the same float32 sums in another order; over <= 45 keys the
# differences seen are ~1e-6 (outputs and gradients of order 1).
TOL = 2e-6
# bfloat16 inputs and matmul operands: 8 significant bits, rounded in different places.
BF16_TOL = 2e-2
# Small tiles, so that every case spans several query and key blocks, ragged at the end.
BLOCKS = dict(block_q=16, block_k=16)


def make_case(name, dtype=jnp.float32):
  """q, k, v and dot_product_attention kwargs for one scenario; T=37 and S=45 (or 37) are not
  multiples of the 16-wide tiles."""
  b, t, s, n, kv, h = {'cross': (2, 37, 45, 4, 4, 16), 'cross_causal': (2, 45, 37, 4, 4, 16),
                       'gqa': (2, 37, 37, 4, 2, 16), 'mqa': (2, 37, 37, 4, 1, 16)
                       }.get(name, (2, 37, 37, 4, 4, 16))
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k, v = normal(b, t, n, h).astype(dtype), normal(b, s, kv, h).astype(dtype), normal(
      b, s, kv, h).astype(dtype)
  key_valid = jnp.asarray(np.arange(s)[None, :] < np.array([s, s - 9])[:, None])
  query_valid = jnp.asarray(np.arange(t)[None, :] < np.array([t, t - 5])[:, None])
  arbitrary = jnp.asarray(rng.random((b, n, t, s)) > 0.4)
  dead_rows = arbitrary.at[0, 1, 3].set(False).at[1, :, 7].set(False)
  kwargs = {
      'none': {},
      'causal': {'is_causal': True},
      'padding': {'mask': make_padding_mask(query_valid, key_valid)},
      'key_padding': {'mask': key_valid[:, None, None, :], 'is_causal': True},
      'lengths': {'query_seq_lengths': jnp.array([t, t - 5]),
                  'key_value_seq_lengths': jnp.array([s - 20, s])},
      'arbitrary': {'mask': arbitrary},
      'bias': {'bias': normal(b, n, t, s)},
      'bias_broadcast': {'bias': normal(1, n, t, s), 'is_causal': True},
      'bias_2d': {'bias': normal(t, s)},
      'bias_mask': {'bias': normal(b, 1, 1, s), 'mask': arbitrary},
      'dead_rows': {'mask': dead_rows, 'bias': normal(b, n, t, s)},
      'cross': {'mask': key_valid[:, None, None, :]},
      'cross_causal': {'is_causal': True},
      'gqa': {'is_causal': True, 'bias': normal(1, n, t, s)},
      'mqa': {'mask': make_padding_mask(query_valid, key_valid)},
  }[name]
  return q, k, v, kwargs


CASES = ['none', 'causal', 'padding', 'key_padding', 'lengths', 'arbitrary', 'bias',
         'bias_broadcast', 'bias_2d', 'bias_mask', 'dead_rows', 'cross', 'cross_causal', 'gqa',
         'mqa']


def value_and_grads(fn, q, k, v, kwargs):
  """fn's output and the gradients of <output, fixed random cotangent> wrt q, k, v (and bias)."""
  bias = kwargs.get('bias')
  rest = {n: a for n, a in kwargs.items() if n != 'bias'}
  out_shape = jax.eval_shape(lambda: fn(q, k, v, **kwargs)).shape
  cotangent = jnp.asarray(np.random.default_rng(7).normal(size=out_shape), jnp.float32)

  def loss(q, k, v, bias):
    out = fn(q, k, v, bias=bias, **rest)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(q, k, v, bias)
  return out, grads


def assert_close(ours, ref, tol, relative=False):
  """max |ours - ref| <= tol; with `relative`, tol is per unit of max |ref| (when above 1)."""
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape
  assert np.isfinite(ours).all()
  if relative:
    tol = tol * max(1.0, float(np.abs(ref).max()))
  assert np.abs(ours - ref).max() <= tol, f'max abs diff {np.abs(ours - ref).max():.2e} > {tol}'


def xla(q, k, v, **kwargs):
  return dot_product_attention(q, k, v, implementation='xla', **kwargs)


@pytest.fixture(scope='module')
def reference():
  """case name -> (output, grads) of the xla backend, computed once."""
  cache = {}

  def get(name, dtype=jnp.float32):
    if (name, dtype) not in cache:
      q, k, v, kwargs = make_case(name, dtype)
      cache[name, dtype] = value_and_grads(xla, q, k, v, kwargs)
    return cache[name, dtype]
  return get


@pytest.mark.parametrize('unroll', [False, True], ids=['loops', 'unrolled'])
@pytest.mark.parametrize('name', CASES)
def test_blockwise_equals_xla(name, unroll, reference):
  q, k, v, kwargs = make_case(name)
  out, grads = value_and_grads(
      lambda *a, **kw: blockwise_attention(*a, **kw, **BLOCKS, unroll=unroll), q, k, v, kwargs)
  ref_out, ref_grads = reference(name)
  assert_close(out, ref_out, TOL)
  assert len(grads) == len(ref_grads)
  for g, ref_g in zip(grads, ref_grads):  # dq, dk, dv and dbias in the bias's own shape
    assert_close(g, ref_g, TOL)


@pytest.mark.parametrize('name', ['none', 'causal', 'padding', 'bias', 'gqa', 'cross_causal'])
def test_blockwise_bfloat16(name, reference):
  q, k, v, kwargs = make_case(name, jnp.bfloat16)
  out, grads = value_and_grads(
      lambda *a, **kw: blockwise_attention(*a, **kw, **BLOCKS), q, k, v, kwargs)
  assert out.dtype == jnp.float32  # dot_product_attention casts back to the query's dtype
  ref_out, ref_grads = reference(name, jnp.bfloat16)
  assert_close(out, ref_out, BF16_TOL)
  for g, ref_g in zip(grads, ref_grads):
    assert g.dtype == ref_g.dtype
    assert_close(g, ref_g, BF16_TOL)


def test_dead_rows_are_zero_with_zero_gradients():
  q, k, v, kwargs = make_case('dead_rows')
  out, (dq, dk, dv, dbias) = value_and_grads(
      lambda *a, **kw: blockwise_attention(*a, **kw, **BLOCKS), q, k, v, kwargs)
  dead = ~np.asarray(kwargs['mask']).any(-1).transpose(0, 2, 1)  # [B, T, N]
  assert dead.sum() == 1 + 4
  assert np.all(np.asarray(out)[dead] == 0.0) and np.all(np.asarray(dq)[dead] == 0.0)
  assert np.all(np.asarray(dbias)[~np.asarray(kwargs['mask'])] == 0.0)


def _one_hot_values(b, s, kv):
  """value[b, s, k] = e_s: the attention output row then *is* the row of weights."""
  return jnp.broadcast_to(jnp.eye(s)[None, :, None, :], (b, s, kv, s)).astype(jnp.float32)


def test_dropout_is_reproducible_with_the_right_keep_rate():
  rate = 0.3
  b, t, n, s = 4, 64, 4, 64  # 65,536 weights: the kept fraction's std is 0.0018
  rng = np.random.default_rng(5)
  q, k = (jnp.asarray(rng.normal(size=(b, t, n, s)), jnp.float32) for _ in range(2))
  v = _one_hot_values(b, s, n)
  run = lambda key: blockwise_attention(q, k, v, dropout_rate=rate, dropout_rng=key, **BLOCKS)
  dropped = np.asarray(run(jax.random.key(0)))  # [B, T, N, S]: the weights after dropout
  np.testing.assert_array_equal(dropped, np.asarray(run(jax.random.key(0))))
  assert np.abs(dropped - np.asarray(run(jax.random.key(1)))).max() > 0.1

  weights = np.asarray(attention.attention_weights(q, k)).transpose(0, 2, 1, 3)
  kept = dropped != 0
  assert abs(kept.mean() - (1 - rate)) < 0.01, kept.mean()
  np.testing.assert_allclose(dropped[kept], weights[kept] / (1 - rate), rtol=1e-5, atol=TOL)


def test_dropout_gradients_match_xla_with_the_same_keep_mask():
  """The backward pass redraws each tile's mask: its gradients equal those of the xla formula
  with the keep mask the forward pass used (read off with one-hot values)."""
  rate = 0.4
  q, k, v, kwargs = make_case('gqa')
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  rng = jax.random.key(3)
  # One-hot values need head_dim = S: pad q and k with zeros (no logit changes; the 1/sqrt(H)
  # scale is restored on q). The keep masks depend on the tiles, not on head_dim.
  pad = ((0, 0), (0, 0), (0, 0), (0, s - h))
  q_wide, k_wide = jnp.pad(q, pad) * np.sqrt(s / h), jnp.pad(k, pad)
  dropped = blockwise_attention(q_wide, k_wide, _one_hot_values(b, s, kv), dropout_rate=rate,
                                dropout_rng=rng, **kwargs, **BLOCKS)  # [B, T, N, S]
  keep = np.asarray(dropped).transpose(0, 2, 1, 3) != 0  # [B, N, T, S]
  assert 0.5 < keep.sum() / np.asarray(attention.attention_weights(
      q, k, **kwargs) > 0).sum() < 0.7

  def xla_with_keep(q, k, v, bias, is_causal):
    weights = attention.attention_weights(q, k, bias=bias, is_causal=is_causal)
    weights = jnp.where(keep, weights / (1 - rate), 0.0).reshape(b, kv, n // kv, t, s)
    return jnp.einsum('bkgts,bskh->btkgh', weights, v).reshape(q.shape)

  ours = value_and_grads(lambda *a, **kw: blockwise_attention(
      *a, **kw, dropout_rate=rate, dropout_rng=rng, **BLOCKS), q, k, v, kwargs)
  ref = value_and_grads(xla_with_keep, q, k, v, kwargs)
  for a, r in zip([ours[0], *ours[1]], [ref[0], *ref[1]]):
    assert_close(a, r, TOL)


# ----------------------------------------------------------------------------------------------
# Memory and FLOPs of the compiled fwd+bwd (compiled only, never run): B=1, N=8, H=64, causal.

def _fwd_bwd_lowered(implementation, t, is_causal=True, **blockwise_options):
  shape = jax.ShapeDtypeStruct((1, t, 8, 64), jnp.float32)
  if implementation == 'blockwise':
    fn = lambda q, k, v: blockwise_attention(q, k, v, is_causal=is_causal, **blockwise_options)
  else:
    fn = lambda q, k, v: xla(q, k, v, is_causal=is_causal)
  # A cotangent argument, not .sum(): XLA would fold a product with all-ones into a reduction.
  grad = jax.grad(lambda q, k, v, cotangent: jnp.sum(fn(q, k, v) * cotangent), argnums=(0, 1, 2))
  return jax.jit(grad).lower(shape, shape, shape, shape)


def _temp_bytes(implementation, t):
  return _fwd_bwd_lowered(implementation, t).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_a_fraction_of_xla_and_grows_linearly():
  xla_8k = _temp_bytes('xla', 8192)
  blockwise = {t: _temp_bytes('blockwise', t) for t in (4096, 8192, 16384)}
  assert xla_8k > 8 * 8192 * 8192 * 4  # at least one [N, T, S] float32 array
  assert blockwise[8192] <= 0.10 * xla_8k, (blockwise[8192], xla_8k)
  assert blockwise[16384] <= 4.5 * blockwise[4096], blockwise


def test_causal_blockwise_skips_the_tiles_above_the_diagonal():
  """FLOPs of the fwd+bwd program, unrolled so that every tile is counted (a `lax` loop body
  counts once): 7 matmuls of 2*512*512*64*8 flops per tile, 64 tiles, 36 of them causal."""
  lowered = {causal: _fwd_bwd_lowered('blockwise', 4096, is_causal=causal, unroll=True,
                                      block_q=512, block_k=512) for causal in (False, True)}
  tile = 7 * 2 * 512 * 512 * 64 * 8
  flops = {c: low.cost_analysis()['flops'] for c, low in lowered.items()}
  assert 64 * tile <= flops[False] <= 1.02 * 64 * tile, flops[False] / tile
  assert 36 * tile <= flops[True] <= 1.02 * 36 * tile, flops[True] / tile
  # What XLA compiles keeps the ratio.
  compiled = {c: low.compile().cost_analysis()['flops'] for c, low in lowered.items()}
  assert compiled[True] <= 0.6 * compiled[False], compiled


# ----------------------------------------------------------------------------------------------
# The models with attention_impl='blockwise' compute what they compute with 'xla'.

MODEL_TOL = 1e-5


@pytest.fixture
def small_tiles(monkeypatch):
  """4 x 4 tiles, so that the models' 11-token sequences span three ragged blocks."""
  monkeypatch.setitem(blockwise.BLOCK_SIZES, jax.default_backend(), (4, 4))


def _logits_and_grads(model, params, inputs, method=None):
  def loss(params):
    logits = model.apply({'params': params}, *inputs, method=method)
    cotangent = jnp.cos(jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)
    return jnp.sum(logits * cotangent), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


@pytest.mark.parametrize('kind', ['gpt', 'transformer', 'bert'])
def test_models_with_blockwise_equal_xla(kind, small_tiles, init_model, random_tokens):
  model, params = init_model(kind, num_kv_heads=2)
  tokens = random_tokens(3, (2, 11)).at[1, 7:].set(0)  # row 1 right-padded
  inputs = (tokens, random_tokens(4, (2, 9)).at[0, 6:].set(0)) if kind == 'transformer' \
      else (tokens,)
  method = 'mlm_logits' if kind == 'bert' else None
  results = {impl: _logits_and_grads(type(model)(model.config.replace(attention_impl=impl)),
                                     params, inputs, method)
             for impl in ('xla', 'blockwise')}
  (logits, grads), (ref_logits, ref_grads) = results['blockwise'], results['xla']
  assert_close(logits, ref_logits, MODEL_TOL)
  flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
  assert len(flat) == len(ref_flat) > 10
  for g, r in zip(flat, ref_flat):  # embedding gradients reach ~2: 1e-5 per unit of the largest
    assert_close(g, r, MODEL_TOL, relative=True)


def test_gpt_decoding_with_blockwise_equals_xla(small_tiles, init_model, random_tokens):
  model, params = init_model('gpt')
  prompt = random_tokens(5, (2, 6)).at[0, :2].set(0)  # row 0 left-padded
  runs = {}
  for impl in ('xla', 'blockwise'):
    m = GPT(model.config.replace(attention_impl=impl))
    new = generate(m, {'params': params}, prompt, max_new_tokens=7)
    full = jnp.concatenate([prompt, new], axis=1)
    cache = m.init(jax.random.key(0), jnp.zeros_like(full), decode=True)['cache']
    logits, mutated = m.apply({'params': params, 'cache': cache}, full[:, :9], decode=True,
                              mutable=['cache'])  # a 9-token prefill into a 13-token cache
    step, _ = m.apply({'params': params, **mutated}, full[:, 9:10], decode=True,
                      mutable=['cache'])
    runs[impl] = (new, jnp.concatenate([logits, step], axis=1))
  np.testing.assert_array_equal(runs['blockwise'][0], runs['xla'][0])
  assert_close(runs['blockwise'][1], runs['xla'][1], MODEL_TOL)


SHARDED_SCRIPT = r'''
import json, sys
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from flaxformer_lite import GPT, TransformerConfig, blockwise, sharding
blockwise.BLOCK_SIZES['cpu'] = (8, 8)
assert jax.device_count() == 8
cfg = TransformerConfig.preset('tiny', vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2,
                               d_ff=64, max_len=32, dropout_rate=0.0, attention_impl='blockwise')
model = GPT(cfg)
tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (4, 27)), jnp.int32)
tokens = tokens.at[1, 20:].set(0)
boxed = model.init(jax.random.key(0), tokens)
params = nn.unbox(boxed)['params']

def loss(params, tokens):
  logits = model.apply({'params': params}, tokens)
  return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * jnp.cos(logits[..., 5]))

grad = jax.value_and_grad(loss)
single = jax.jit(grad)(params, tokens)
mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
  shardings = sharding.mesh_shardings(boxed, mesh)['params']
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  sharded = jax.jit(grad, in_shardings=(shardings, batch))(jax.device_put(params, shardings),
                                                           jax.device_put(tokens, batch))
diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
         for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded))]
qkv = sharded[1]['decoder']['layers_0']['self_attention']['query']['kernel']
print(json.dumps({'max_diff': max(diffs), 'leaves': len(diffs),
                  'query_spec': str(qkv.sharding.spec)}))
'''


def test_blockwise_under_a_data_fsdp_tensor_mesh(tmp_path):
  """A GPT with blockwise attention, grouped heads split over 'tensor', the batch over 'data' and
  'fsdp': loss and gradients equal the single-device ones (8 fake devices, in a subprocess)."""
  script = tmp_path / 'sharded.py'
  script.write_text(SHARDED_SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(pathlib.Path(__file__).parents[1]))
  env['XLA_FLAGS'] = ' '.join([f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in
                               f] + ['--xla_force_host_platform_device_count=8'])
  env.pop('JAX_NUM_CPU_DEVICES', None)
  done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['leaves'] > 10
  assert 'tensor' in result['query_spec'], result
  assert result['max_diff'] <= MODEL_TOL, result
