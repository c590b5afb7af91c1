"""The config fields the Hugging Face architectures need, each usable from scratch, each checked
against a NumPy (or transformers) reference of what it should compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import GPT, BertEncoder, Transformer, TransformerConfig, layers
from flaxformer_lite.models import valid_tokens

TOL = 1e-5


def cfg(**overrides):
  base = dict(vocab_size=40, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
              d_ff=24, max_len=16, dropout_rate=0.0, init_std=0.5)
  return TransformerConfig(**{**base, **overrides})


def tokens(seed, shape, low=1, high=40):
  return jnp.asarray(np.random.default_rng(seed).integers(low, high, shape), jnp.int32)


def init(model, *args, **kw):
  return nn.unbox(model.init(jax.random.key(0), *args, **kw))


@pytest.mark.parametrize('name', ['silu', 'geglu', 'swiglu'])
def test_feed_forward_activations_match_numpy(name):
  c = cfg(activation=name, use_bias=False)
  ff = layers.FeedForward(c)
  x = np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32)
  p = init(ff, jnp.asarray(x))['params']
  silu = lambda v: v / (1 + np.exp(-v))
  gelu_tanh = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
  h = x @ np.asarray(p['wi']['kernel'])
  if name == 'silu':
    h = silu(h)
  else:
    gate = x @ np.asarray(p['wi_gate']['kernel'])
    h = (silu(gate) if name == 'swiglu' else gelu_tanh(gate)) * h
  np.testing.assert_allclose(ff.apply({'params': p}, jnp.asarray(x)),
                             h @ np.asarray(p['wo']['kernel']), atol=TOL)


def test_pad_id_none_masks_nothing_unless_told():
  """Without a pad token every id is real (GPT-2's id 0 is '!'); `valid` alone marks padding,
  and a left-padded row then equals the same tokens unpadded."""
  model = GPT(cfg(pad_id=None, num_encoder_layers=0))
  x = tokens(1, (1, 6), low=0).at[0, 2].set(0)
  p = init(model, x)
  with_zero = model.apply(p, x)
  assert valid_tokens(x, None, model.config).all()
  padded = jnp.concatenate([jnp.full((1, 3), 7), x], axis=1)
  valid = jnp.arange(9)[None] >= 3
  np.testing.assert_allclose(model.apply(p, padded, valid=valid)[:, 3:], with_zero, atol=TOL)
  with pytest.raises(ValueError, match='valid shape'):
    model.apply(p, x, valid=valid)


def test_decoder_start_equal_to_pad_is_attended_to():
  """Marian and T5 start the decoder with their pad token: with tgt_valid the start token is a
  real token, so a later target position sees it (the logits change with its embedding)."""
  c = cfg(decoder_start_id=0)  # == pad_id
  model = Transformer(c)
  src, tgt = tokens(2, (1, 5), high=39), tokens(3, (1, 4), high=39).at[0, 0].set(0)
  p = init(model, src, tgt)
  ones = jnp.ones(tgt.shape, bool)
  masked = model.apply(p, src, tgt)  # by default the pad-valued start token is padding
  real = model.apply(p, src, tgt, tgt_valid=ones)
  assert np.abs(np.asarray(masked - real)[:, 1:]).max() > 1e-3
  # ...and equals the start token fed as an ordinary id through a model whose pad is elsewhere.
  other = Transformer(cfg(decoder_start_id=0, pad_id=39))
  np.testing.assert_allclose(other.apply(p, src, tgt), real, atol=TOL)


def test_final_logits_bias_embed_norm_and_scaled_tied_output():
  """Logits = embed(x * D**-0.5)^T + bias, with a norm after the embeddings: each checked by
  switching it off and adding its term back by hand."""
  src, tgt = tokens(4, (2, 5)), tokens(5, (2, 4))
  full = Transformer(cfg(final_logits_bias=True, embed_norm=True, scale_tied_output=True))
  p = init(full, src, tgt)
  bias = np.random.default_rng(0).normal(size=40).astype(np.float32)
  p['params']['final_logits_bias'] = jnp.asarray(bias)
  assert {'encoder_embed_norm', 'decoder_embed_norm'} <= set(p['params'])
  out = full.apply(p, src, tgt)
  no_bias = Transformer(full.config.replace(final_logits_bias=False))
  params = {k: v for k, v in p['params'].items() if k != 'final_logits_bias'}
  np.testing.assert_allclose(out, no_bias.apply({'params': params}, src, tgt) + bias, atol=TOL)
  unscaled = Transformer(no_bias.config.replace(scale_tied_output=False))
  ratio = no_bias.apply({'params': params}, src, tgt) / unscaled.apply({'params': params}, src, tgt)
  np.testing.assert_allclose(ratio, 16 ** -0.5, rtol=1e-4)
  no_norm = Transformer(unscaled.config.replace(embed_norm=False))
  assert np.abs(np.asarray(unscaled.apply({'params': params}, src, tgt)
                           - no_norm.apply({'params': params}, src, tgt))).max() > 1e-3


def test_learned_positions_with_offset_read_rows_past_the_offset():
  """BART keeps 2 unused rows: position p reads row p + 2, and the table has max_len + 2 rows."""
  c = cfg(positions='learned', position_offset=2, num_encoder_layers=0)
  model = GPT(c)
  x = tokens(6, (1, 5))
  p = init(model, x)
  table = np.asarray(p['params']['positions']['embedding'])
  assert table.shape == (16 + 2, 16)
  plain = GPT(c.replace(position_offset=0))
  shifted = {**p['params'], 'positions': {'embedding': jnp.asarray(table[2:])}}
  np.testing.assert_allclose(model.apply(p, x), plain.apply({'params': shifted}, x), atol=TOL)


def test_attention_scale_none_is_one_over_sqrt_head_dim():
  """attention_scale=s computes softmax(s * q k^T) v: s = 1/sqrt(H) equals the default."""
  x = tokens(7, (2, 6))
  default = GPT(cfg(num_encoder_layers=0))
  p = init(default, x)
  same = GPT(cfg(num_encoder_layers=0, attention_scale=8 ** -0.5))
  np.testing.assert_allclose(same.apply(p, x), default.apply(p, x), atol=TOL)
  assert np.abs(np.asarray(GPT(cfg(num_encoder_layers=0, attention_scale=1.0)).apply(p, x)
                           - default.apply(p, x))).max() > 1e-3


def test_mlm_head_uses_the_config_activation():
  x = tokens(8, (2, 5))
  relu = BertEncoder(cfg(activation='relu', num_decoder_layers=0))
  p = init(relu, x, method='mlm_logits')['params']
  hidden = relu.apply({'params': p}, x)
  head = p['mlm_head']
  h = np.maximum(np.asarray(hidden) @ np.asarray(head['transform']['kernel'])
                 + np.asarray(head['transform']['bias']), 0)
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  h = (h - mu) / np.sqrt(var + 1e-5) * np.asarray(head['norm']['scale']) + np.asarray(
      head['norm']['bias'])
  expected = h @ np.asarray(p['embed']['embedding']).T + np.asarray(head['bias'])
  np.testing.assert_allclose(relu.apply({'params': p}, x, method='mlm_logits'), expected,
                             atol=1e-4)


def test_relative_buckets_match_transformers_t5():
  torch = pytest.importorskip('torch')
  t5 = pytest.importorskip('transformers.models.t5.modeling_t5')
  distance = np.arange(-300, 301)[None, :]
  for bidirectional in (True, False):
    for buckets, max_distance in ((32, 128), (8, 6)):
      ours = layers.relative_bucket(jnp.asarray(distance), bidirectional=bidirectional,
                                    num_buckets=buckets, max_distance=max_distance)
      ref = t5.T5Attention._relative_position_bucket(
          torch.tensor(distance), bidirectional=bidirectional, num_buckets=buckets,
          max_distance=max_distance)
      np.testing.assert_array_equal(ours, ref.numpy())


def test_relative_bias_table_is_one_per_stack_and_scan_equals_plain():
  src, tgt = tokens(9, (2, 6)), tokens(10, (2, 5))
  c = cfg(positions='relative', relative_buckets=8, relative_max_distance=6,
          num_encoder_layers=2, num_decoder_layers=2)
  plain = Transformer(c)
  p = init(plain, src, tgt)['params']
  assert p['encoder']['relative_bias'].shape == (8, 2)
  assert 'relative_bias' in p['decoder'] and 'relative_bias' not in p['encoder']['layers_0']
  stacked = {k: dict(v) for k, v in p.items() if isinstance(v, dict)}
  for stack in ('encoder', 'decoder'):
    layers_ = [stacked[stack].pop(f'layers_{i}') for i in range(2)]
    stacked[stack]['layers'] = jax.tree.map(lambda *a: jnp.stack(a), *layers_)
  scanned = Transformer(c.replace(scan_layers=True))
  np.testing.assert_allclose(scanned.apply({'params': stacked}, src, tgt),
                             plain.apply({'params': p}, src, tgt), atol=TOL)


@pytest.mark.parametrize('overrides, message', [
    (dict(pad_id=40), r'pad_id=40 is outside the vocabulary'),
    (dict(decoder_start_id=-1), r'decoder_start_id=-1 is outside'),
    (dict(activation='gelu_new'), r"activation='gelu_new' is not one of"),
    (dict(positions='alibi'), r"positions='alibi' is not one of"),
    (dict(relative_buckets=1), r'relative_buckets=1 must be an integer >= 2'),
    (dict(position_offset=2), r"position_offset=2 needs positions='learned'"),
    (dict(attention_scale=0.0), r'attention_scale=0.0 must be a positive number'),
    (dict(scale_tied_output=True, tie_embeddings=False), r'scale_tied_output=True needs'),
])
def test_bad_values_are_refused_by_name(overrides, message):
  with pytest.raises(ValueError, match=message):
    cfg(**overrides)
