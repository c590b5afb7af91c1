"""dot_product_attention, masks, attention_weights and MultiHeadAttention against references."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import (MultiHeadAttention, attention_weights, combine_masks,
                             dot_product_attention, make_causal_mask, make_padding_mask)

# float32 softmax-attention over <= 8 keys vs a float64 reference: rounding is ~1e-7 relative,
# so 1e-5 absolute leaves two orders of magnitude of headroom and still catches any real bug.
TOL = 1e-5
# bfloat16 keeps 8 significant bits (eps 2**-8 ~ 4e-3); inputs, weights and the output are each
# rounded once, on values of order 1.
BF16_TOL = 3e-2


def reference_attention(q, k, v, *, bias=None, mask=None, is_causal=False, keep=None, rate=0.0):
  """Independent float64 NumPy attention: returns (output [B,T,N,H], weights [B,N,T,S])."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  k = np.repeat(k, n // kv_heads, axis=2)  # query head i reads key/value head i // (N // K)
  v = np.repeat(v, n // kv_heads, axis=2)
  logits = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(h)
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  allowed = np.ones(logits.shape, bool)
  if mask is not None:
    allowed &= np.broadcast_to(np.asarray(mask, bool), logits.shape)
  if is_causal:
    allowed &= np.tril(np.ones((t, s), bool))  # top-left aligned: query i sees keys j <= i
  logits = np.where(allowed, logits, -np.inf)
  weights = np.zeros(logits.shape)
  for idx in np.ndindex(*logits.shape[:3]):
    row = logits[idx]
    if allowed[idx].any():  # a fully masked row stays all zeros
      e = np.exp(row - row.max())
      weights[idx] = e / e.sum()
  if keep is not None:
    weights = np.where(keep, weights / (1.0 - rate), 0.0)
  return np.einsum('bnts,bsnh->btnh', weights, v), weights


def make_case(name):
  """Random inputs for one masking scenario: dict of q, k, v and dot_product_attention kwargs."""
  shapes = {'cross': (2, 3, 7, 4, 4, 8), 'cross_causal': (2, 3, 7, 4, 4, 8),
            'gqa': (2, 6, 6, 4, 2, 8), 'mqa': (2, 6, 6, 4, 1, 8)}
  b, t, s, n, kv, h = shapes.get(name, (2, 6, 6, 4, 4, 8))
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, s, kv, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, s, kv, h)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(b, n, t, s)), jnp.float32)
  key_valid = jnp.asarray(np.arange(s)[None, :] < np.array([s, s - 2])[:, None])  # row 1 padded
  query_valid = jnp.asarray(np.arange(t)[None, :] < np.array([t, t - 1])[:, None])
  kwargs = {
      'none': {},
      'padding': {'mask': make_padding_mask(query_valid, key_valid)},
      'causal_flag': {'is_causal': True},
      'causal_mask': {'mask': make_causal_mask(t, s)},
      'padding_causal': {'mask': combine_masks(make_causal_mask(t, s),
                                               make_padding_mask(query_valid, key_valid))},
      'bias': {'bias': bias},
      'bias_mask': {'bias': bias, 'mask': make_padding_mask(jnp.ones_like(query_valid), key_valid)},
      'cross': {'mask': make_padding_mask(jnp.ones((b, t), bool), key_valid)},
      'cross_causal': {'is_causal': True},
      'gqa': {'is_causal': True, 'bias': bias[:1]},
      'mqa': {'mask': make_padding_mask(query_valid, key_valid)},
  }[name]
  return dict(q=q, k=k, v=v, **kwargs)


CASES = ['none', 'padding', 'causal_flag', 'causal_mask', 'padding_causal', 'bias', 'bias_mask',
         'cross', 'cross_causal', 'gqa', 'mqa']


def test_masks_match_their_definitions():
  np.testing.assert_array_equal(make_causal_mask(3, 4)[0, 0],
                                [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
  pad = make_padding_mask(jnp.array([[1, 1, 0]]), jnp.array([[1, 0]]))
  assert pad.shape == (1, 1, 3, 2) and pad.dtype == jnp.bool_
  np.testing.assert_array_equal(pad[0, 0], [[1, 0], [1, 0], [0, 0]])
  query_pad = pad[..., :1].repeat(3, -1)  # [1, 1, 3, 3]: rows of padded queries all False
  np.testing.assert_array_equal(combine_masks(make_causal_mask(3), None, query_pad),
                                make_causal_mask(3) & query_pad)
  assert combine_masks(None, None) is None


@pytest.mark.parametrize('implementation', ['xla', None])
@pytest.mark.parametrize('name', CASES)
def test_matches_numpy_reference(name, implementation):
  case = make_case(name)
  q, k, v = case.pop('q'), case.pop('k'), case.pop('v')
  out = dot_product_attention(q, k, v, implementation=implementation, **case)
  expected, _ = reference_attention(q, k, v, **case)
  assert out.dtype == jnp.float32 and out.shape == expected.shape
  np.testing.assert_allclose(out, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize('implementation', ['xla', None])
@pytest.mark.parametrize('name', CASES)
def test_matches_jax_nn(name, implementation):
  case = make_case(name)
  q, k, v = case.pop('q'), case.pop('k'), case.pop('v')
  out = dot_product_attention(q, k, v, implementation=implementation, **case)
  theirs = jax.nn.dot_product_attention(q, k, v, **case)
  # jax.nn gives fully masked rows a uniform average rather than zeros: compare the others only.
  _, weights = reference_attention(q, k, v, **case)
  attends = weights.sum(-1).transpose(0, 2, 1) > 0  # [B, T, N]
  assert attends.sum() > attends.size // 2
  np.testing.assert_allclose(np.asarray(out)[attends], np.asarray(theirs)[attends],
                             rtol=0, atol=TOL)


def test_fully_masked_rows_are_zero_in_output_and_gradients():
  case = make_case('padding')
  q, k, v, mask = case['q'], case['k'], case['v'], case['mask']
  mask = mask.at[0].set(False)  # batch 0 has no keys at all; batch 1's last query is padding
  dead = ~np.asarray(mask).any(-1)[:, 0]  # [B, T] queries with nothing to attend to
  assert dead[0].all() and dead[1, -1] and not dead[1, 0]

  out = dot_product_attention(q, k, v, mask=mask)
  assert not np.isnan(np.asarray(out)).any()
  assert np.all(np.asarray(out)[dead] == 0.0)
  np.testing.assert_allclose(out, reference_attention(q, k, v, mask=mask)[0], rtol=0, atol=TOL)

  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)
  grads = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, mask=mask) * cotangent),
                   argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  dq, dk, dv = (np.asarray(g) for g in grads)
  assert np.all(dq[dead] == 0.0)  # a dead query influences nothing
  assert np.all(dk[0] == 0.0) and np.all(dv[0] == 0.0)  # batch 0's keys are never read
  assert np.abs(dq[1, 0]).max() > 0  # ... while live rows do get gradients


def test_bfloat16_output_dtype_and_accuracy():
  case = make_case('padding_causal')
  q, k, v, mask = (case[n] for n in ('q', 'k', 'v', 'mask'))
  q16, k16, v16 = (a.astype(jnp.bfloat16) for a in (q, k, v))
  out = dot_product_attention(q16, k16, v16, mask=mask)
  assert out.dtype == jnp.bfloat16
  expected, _ = reference_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=0, atol=BF16_TOL)

  weights = attention_weights(q16, k16, mask=mask)
  assert weights.dtype == jnp.float32  # the softmax runs in float32 whatever the input dtype
  sums = np.asarray(weights).sum(-1)
  live = np.asarray(jnp.broadcast_to(mask, weights.shape)).any(-1)
  np.testing.assert_allclose(sums[live], 1.0, rtol=0, atol=1e-5)  # float32 rounding of 6 terms
  assert np.all(sums[~live] == 0.0)


def test_attention_weights_match_reference():
  case = make_case('gqa')
  weights = attention_weights(case['q'], case['k'], bias=case['bias'], is_causal=True)
  _, expected = reference_attention(case['q'], case['k'], case['v'], bias=case['bias'],
                                    is_causal=True)
  np.testing.assert_allclose(weights, expected, rtol=0, atol=TOL)


def test_dropout_matches_reference_with_the_same_keep_mask():
  case = make_case('padding_causal')
  q, k, v, mask = (case[n] for n in ('q', 'k', 'v', 'mask'))
  rng = jax.random.key(42)
  rate = 0.5
  # The xla backend draws one keep mask for the whole [B, N, T, S] (blockwise draws per tile).
  out = dot_product_attention(q, k, v, mask=mask, dropout_rate=rate, dropout_rng=rng,
                              implementation='xla')
  b, t, n, _ = q.shape
  keep = np.asarray(jax.random.bernoulli(rng, 1.0 - rate, (b, n, t, k.shape[1])))
  expected, _ = reference_attention(q, k, v, mask=mask, keep=keep, rate=rate)
  np.testing.assert_allclose(out, expected, rtol=0, atol=TOL)
  # Dropout really happened: the result is not the dropout-free one.
  assert np.abs(np.asarray(out) - reference_attention(q, k, v, mask=mask)[0]).max() > 0.1

  again = dot_product_attention(q, k, v, mask=mask, dropout_rate=rate, dropout_rng=rng,
                                implementation='xla')
  np.testing.assert_array_equal(out, again)
  other = dot_product_attention(q, k, v, mask=mask, dropout_rate=rate,
                                dropout_rng=jax.random.key(43), implementation='xla')
  assert np.abs(np.asarray(out) - np.asarray(other)).max() > 0.1


def test_dropout_without_rng_raises():
  case = make_case('none')
  with pytest.raises(ValueError, match='dropout_rate=0.5'):
    dot_product_attention(case['q'], case['k'], case['v'], dropout_rate=0.5)


@pytest.mark.parametrize('q_shape, kv_shape, v_shape, match', [
    ((2, 5, 4), (2, 5, 4, 8), None, r'\[batch, length, heads, head_dim\]'),
    ((2, 5, 4, 8), (2, 5, 4, 8), (2, 6, 4, 8), r'value shape \(2, 6, 4, 8\)'),
    ((2, 5, 4, 8), (3, 5, 4, 8), None, 'disagree on batch or head_dim'),
    ((2, 5, 4, 8), (2, 5, 4, 16), None, 'disagree on batch or head_dim'),
    ((2, 5, 4, 8), (2, 5, 3, 8), None, 'heads=4 is not divisible by key/value heads=3'),
    ((0, 5, 4, 8), (0, 5, 4, 8), None, r'query \(0, 5, 4, 8\) and key \(0, 5, 4, 8\) must not be '
                                       'empty'),
    ((2, 5, 4, 8), (2, 0, 4, 8), None, 'must not be empty'),
])
def test_bad_shapes_raise(q_shape, kv_shape, v_shape, match):
  q, k = jnp.zeros(q_shape), jnp.zeros(kv_shape)
  v = jnp.zeros(v_shape or kv_shape)
  with pytest.raises(ValueError, match=match):
    dot_product_attention(q, k, v)


@pytest.mark.parametrize('implementation', ['xla', 'blockwise', None])
def test_float_mask_is_refused_with_a_pointer_to_bias(implementation):
  case = make_case('none')
  additive = jnp.where(make_causal_mask(6), 0.0, -1e9)  # what some libraries call a mask
  with pytest.raises(ValueError, match='mask must be boolean .* got dtype float32; pass an '
                                       'additive float mask as bias='):
    dot_product_attention(case['q'], case['k'], case['v'], mask=additive,
                          implementation=implementation)
  with pytest.raises(ValueError, match='mask must be boolean'):
    attention_weights(case['q'], case['k'], mask=additive.astype(jnp.int32))
  # ... and as bias= it is exactly the causal mask.
  np.testing.assert_allclose(
      dot_product_attention(case['q'], case['k'], case['v'], bias=additive),
      dot_product_attention(case['q'], case['k'], case['v'], is_causal=True), rtol=0, atol=TOL)


def test_unknown_implementation_raises():
  case = make_case('none')
  with pytest.raises(ValueError, match="implementation='bogus'"):
    dot_product_attention(case['q'], case['k'], case['v'], implementation='bogus')


@pytest.mark.parametrize('num_kv_heads', [None, 2])
def test_rotary_self_attention_is_invariant_to_shifting_positions(tiny_config, num_kv_heads):
  cfg = tiny_config(positions='rotary', num_kv_heads=num_kv_heads)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, cfg.d_model)), jnp.float32)
  mha = MultiHeadAttention(cfg)
  params = mha.init(jax.random.key(0), x)
  mask = make_causal_mask(6)
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))

  def attend(pos):
    return np.asarray(mha.apply(params, x, mask=mask, positions=pos))

  base = attend(positions)
  # Rotary scores depend only on position differences (shifts kept small: float32 angles lose
  # ~eps * angle absolute accuracy), so a per-example constant shift changes nothing...
  np.testing.assert_allclose(attend(positions + jnp.array([[3], [11]])), base, rtol=0, atol=TOL)
  # ...while changing the differences does change the output (the positions are really used).
  assert np.abs(attend(positions * 2) - base).max() > 1e-3


def test_captured_attention_equals_recomputed_weights(gpt, random_tokens):
  model, params = gpt
  cfg = model.config
  assert cfg.norm_position == 'post'  # so a layer's attention input is the layer's input
  tokens = random_tokens(3, (2, 7))
  logits, state = model.apply(
      {'params': params}, tokens, capture_attention=True, mutable=['intermediates'],
      capture_intermediates=lambda mdl, _: mdl.name in ('positions',) or
      (mdl.name or '').startswith('layers_'))
  np.testing.assert_allclose(logits, model.apply({'params': params}, tokens), rtol=0, atol=TOL)
  inter = state['intermediates']
  layer_input = np.asarray(inter['positions']['__call__'][0], np.float64)
  b, t = tokens.shape
  n = cfg.num_heads
  for i in range(cfg.num_decoder_layers):
    layer = f'layers_{i}'
    (captured,) = inter['decoder'][layer]['self_attention']['attention_weights']
    assert captured.shape == (b, n, t, t) and captured.dtype == jnp.float32
    qkv = params['decoder'][layer]['self_attention']['qkv']
    kernel, bias = np.asarray(qkv['kernel'], np.float64), np.asarray(qkv['bias'], np.float64)
    q = np.einsum('btd,dnh->btnh', layer_input, kernel[:, 0]) + bias[0]
    k = np.einsum('btd,dnh->btnh', layer_input, kernel[:, 1]) + bias[1]
    _, expected = reference_attention(q, k, k, is_causal=True)
    np.testing.assert_allclose(captured, expected, rtol=0, atol=TOL)
    above_diagonal = ~np.tril(np.ones((t, t), bool))
    assert np.all(np.asarray(captured)[..., above_diagonal] == 0.0)
    layer_input = np.asarray(inter['decoder'][layer]['__call__'][0], np.float64)


def test_minus_inf_bias_masks_like_false():
  """A -inf bias excludes a key even where the boolean mask allows it; a row left with nothing
  gives zeros (no NaN), and masked keys never take the weight a -inf key gave up."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 3, 2, 8)), jnp.float32) for _ in range(3))
  bias = np.zeros((1, 1, 3, 3), np.float32)
  bias[..., 0, :] = -np.inf        # query 0: every key excluded by the bias
  bias[..., 1, 0] = -np.inf        # query 1: key 0 excluded by the bias ...
  mask = np.ones((1, 1, 3, 3), bool)
  mask[..., 1, 1:] = False         # ... and keys 1, 2 by the mask: nothing left
  mask[..., 2, 2] = False
  out = dot_product_attention(q, k, v, bias=jnp.asarray(bias), mask=jnp.asarray(mask))
  assert not np.isnan(np.asarray(out)).any()
  np.testing.assert_array_equal(np.asarray(out[:, :2]), 0.0)
  weights = attention_weights(q, k, bias=jnp.asarray(bias), mask=jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(weights[..., 2, 2]), 0.0)
  np.testing.assert_allclose(np.asarray(weights[..., 2, :2].sum(-1)), 1.0, atol=1e-6)
