"""GPT, Transformer and BertEncoder: causality, padding, cached decoding, scan/remat, dropout,
gradients, parameter counts and an end-to-end overfitting check."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxformer_lite import GPT, BertEncoder, Transformer, TransformerConfig

# Tiny float32 models (2 layers, d_model 32): two computations of the same function differ by
# float32 rounding only, ~1e-7 relative on logits of order 1, so 1e-5 absolute is a safe bound
# that any real disagreement (a mask, a position, a cache slot) exceeds by orders of magnitude.
TOL = 1e-5


def lm_loss(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def inputs_for(kind, random_tokens, batch=2, length=8, seed=0):
  tokens = random_tokens(seed, (batch, length))
  if kind == 'transformer':
    return tokens, random_tokens(seed + 1, (batch, length - 1))
  return (tokens,)


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize('t', [0, 3, 7])
def test_gpt_is_causal(gpt, jit_apply, random_tokens, t):
  model, params = gpt
  tokens = random_tokens(1, (2, 8))
  changed = tokens.at[:, t].set((tokens[:, t] + 7) % (model.config.vocab_size - 1) + 1)
  assert np.all(np.asarray(changed[:, t]) != np.asarray(tokens[:, t]))
  before = jit_apply(model, {'params': params}, tokens)
  after = jit_apply(model, {'params': params}, changed)
  np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
  assert np.abs(np.asarray(after[:, t] - before[:, t])).max() > 1e-3


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize('layout', ['append', 'batch_with_longer_row'])
def test_bert_ignores_padding(bert, jit_apply, random_tokens, layout):
  model, params = bert
  tokens = random_tokens(2, (2, 6))
  if layout == 'append':  # every row gets 3 pad tokens (pad_id=0)
    padded = jnp.pad(tokens, ((0, 0), (0, 3)))
  else:  # row 0 padded to the length of a longer row 1
    padded = jnp.concatenate([jnp.pad(tokens[:1], ((0, 0), (0, 3))),
                              random_tokens(3, (1, 9))])
  hidden = jit_apply(model, {'params': params}, tokens)
  hidden_padded = jit_apply(model, {'params': params}, padded)
  rows = slice(None) if layout == 'append' else slice(0, 1)
  np.testing.assert_allclose(hidden_padded[rows, :6], hidden[rows], rtol=0, atol=TOL)


@pytest.mark.parametrize('where', ['src', 'tgt', 'both'])
def test_transformer_ignores_padding(transformer, jit_apply, random_tokens, where):
  model, params = transformer
  src, tgt = random_tokens(4, (2, 6)), random_tokens(5, (2, 5))
  # Row 0 gets 3 trailing pads; row 1 gets real tokens there, so the batch also mixes lengths.
  src_padded = jnp.concatenate([src, random_tokens(6, (2, 3)).at[0].set(0)], axis=1)
  tgt_padded = jnp.concatenate([tgt, random_tokens(7, (2, 3)).at[0].set(0)], axis=1)
  logits = jit_apply(model, {'params': params}, src, tgt)
  padded_src = src_padded if where in ('src', 'both') else src
  padded_tgt = tgt_padded if where in ('tgt', 'both') else tgt
  logits_padded = jit_apply(model, {'params': params}, padded_src, padded_tgt)
  if where == 'tgt':  # row 1's extra target tokens are real, but causality hides them
    np.testing.assert_allclose(logits_padded[:, :5], logits, rtol=0, atol=TOL)
  else:  # row 1's source really changed: only row 0, padded, must be unchanged
    np.testing.assert_allclose(logits_padded[0, :5], logits[0], rtol=0, atol=TOL)
    assert np.abs(np.asarray(logits_padded[1, :5] - logits[1])).max() > 1e-3


# ----------------------------------------------------------------------------- cached decoding

# Every position scheme, with multi-head, grouped-query (K=2) and multi-query (K=1) heads, and
# the cache also under nn.scan.
DECODE_CONFIGS = {
    'learned': dict(positions='learned'),
    'sinusoidal_mqa': dict(positions='sinusoidal', num_kv_heads=1),
    'rotary_gqa_scan': dict(positions='rotary', num_kv_heads=2, scan_layers=True),
    # T5's buckets, the far ones log-spaced within these lengths; also under nn.scan.
    'relative': dict(positions='relative', relative_buckets=8, relative_max_distance=6,
                     attention_scale=1.0),
    'relative_scan': dict(positions='relative', relative_buckets=8, relative_max_distance=6,
                          scan_layers=True),
}


def decode_steps(jit_apply, model, params, cache, chunks, **static):
  """Feeds `chunks` (tuples of positional args) one decode=True apply at a time; the logits of
  all chunks concatenated on the length axis."""
  outputs = []
  for args in chunks:
    logits, mutated = jit_apply(model, {'params': params, 'cache': cache}, *args, decode=True,
                                mutable=('cache',), **static)
    cache = mutated['cache']
    outputs.append(np.asarray(logits))
  return np.concatenate(outputs, axis=1)


def init_for_decoding(model, *inputs, **kwargs):
  """`model.init(rng, *full_length_inputs, decode=True)`: params and a cache sized for them."""
  return nn.unbox(jax.jit(lambda *a: model.init(jax.random.key(0), *a, decode=True, **kwargs))(
      *inputs))


@pytest.mark.parametrize('name', DECODE_CONFIGS)
def test_gpt_cached_decoding_matches_full_forward(tiny_config, jit_apply, random_tokens, name):
  model = GPT(tiny_config(**DECODE_CONFIGS[name]))
  tokens = random_tokens(8, (2, 8))
  variables = init_for_decoding(model, tokens)
  params = variables['params']
  full = jit_apply(model, {'params': params}, tokens)
  prefill = 5  # then one token at a time
  chunks = [(tokens[:, :prefill],)] + [(tokens[:, t:t + 1],) for t in range(prefill, 8)]
  out = decode_steps(jit_apply, model, params, variables['cache'], chunks)
  np.testing.assert_allclose(out, full, rtol=0, atol=TOL)


@pytest.mark.parametrize('name', ['learned', 'rotary_gqa_scan'])
def test_gpt_cached_decoding_with_right_padded_prompt(tiny_config, jit_apply, random_tokens, name):
  model = GPT(tiny_config(**DECODE_CONFIGS[name]))
  tokens = random_tokens(9, (2, 8)).at[1, 6:].set(0)  # row 1 is 6 tokens long
  variables = init_for_decoding(model, tokens)
  params = variables['params']
  # Prompts of 5 and 3 tokens (row 1 right-padded), then 3 steps, each row from its own end.
  prompt = tokens[:, :5].at[1, 3:].set(0)
  steps = [(jnp.array([[tokens[0, 5 + i]], [tokens[1, 3 + i]]]),) for i in range(3)]
  out = decode_steps(jit_apply, model, params, variables['cache'], [(prompt,)] + steps)
  full = np.asarray(jit_apply(model, {'params': params}, tokens))  # [2, 8, V]
  np.testing.assert_allclose(out[0], full[0], rtol=0, atol=TOL)
  np.testing.assert_allclose(out[1, :3], full[1, :3], rtol=0, atol=TOL)  # the valid prompt
  np.testing.assert_allclose(out[1, 5:], full[1, 3:6], rtol=0, atol=TOL)  # the steps


def test_gpt_cached_decoding_never_attends_to_left_padding(tiny_config, jit_apply, random_tokens):
  # GPT's contract: under decode=True "tokens equal to pad_id are never attended to". The full
  # forward masks the pads of a left-padded prompt (its tokens keep positions 2, 3, ...); the
  # cached path must agree at every real token.
  model = GPT(tiny_config(**DECODE_CONFIGS['learned']))
  tokens = random_tokens(17, (2, 8)).at[1, :2].set(0)  # row 1: 2 pads, then 6 tokens
  variables = init_for_decoding(model, tokens)
  params = variables['params']
  chunks = [(tokens[:, :5],)] + [(tokens[:, t:t + 1],) for t in range(5, 8)]
  out = decode_steps(jit_apply, model, params, variables['cache'], chunks)
  full = np.asarray(jit_apply(model, {'params': params}, tokens))
  np.testing.assert_allclose(out[0], full[0], rtol=0, atol=TOL)
  np.testing.assert_allclose(out[1, 2:], full[1, 2:], rtol=0, atol=TOL)


@pytest.mark.parametrize('name', DECODE_CONFIGS)
def test_transformer_cached_decoding_matches_full_forward(tiny_config, jit_apply, random_tokens,
                                                          name):
  model = Transformer(tiny_config(**DECODE_CONFIGS[name]))
  src = random_tokens(11, (2, 6)).at[1, 4:].set(0)  # row 1's source is right-padded
  tgt = random_tokens(12, (2, 7))
  variables = init_for_decoding(
      model, src, tgt, method=lambda m, s, t, decode: m.decode(m.encode(s), s, t, decode=decode))
  params = variables['params']
  full = jit_apply(model, {'params': params}, src, tgt)
  encoded = jit_apply(model, {'params': params}, src, method='encode')
  prefill = 2
  chunks = [(encoded, src, tgt[:, :prefill])]
  chunks += [(encoded, src, tgt[:, t:t + 1]) for t in range(prefill, 7)]
  out = decode_steps(jit_apply, model, params, variables['cache'], chunks, method='decode')
  np.testing.assert_allclose(out, full, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- scan and remat


def stack_layers(tree):
  """Plain-stack params ('layers_0'..'layers_{L-1}') -> scanned ('layers', leaves stacked)."""
  if not isinstance(tree, dict):
    return tree
  names = sorted((k for k in tree if re.fullmatch(r'layers_\d+', k)), key=lambda k: int(k[7:]))
  out = {k: stack_layers(v) for k, v in tree.items() if k not in names}
  if names:
    out['layers'] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[tree[k] for k in names])
  return out


@functools.partial(jax.jit, static_argnums=(0, 3))
def loss_and_grads(model, params, inputs, method=None):
  """(loss, logits, d loss / d params): next-token cross-entropy on the last input (classify:
  labels 0, 1, ...)."""
  def loss(params):
    logits = model.apply({'params': params}, *inputs, method=method)
    if method == 'classify':
      targets = jnp.arange(logits.shape[0]) % logits.shape[1]
    else:
      targets = jnp.roll(inputs[-1], -1, axis=1)
    return lm_loss(logits, targets), logits
  (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, logits, grads


@pytest.fixture(scope='module')
def plain_stack_results(init_model, random_tokens):
  """Per model kind: (params, inputs, logits, grads) of the plain (no scan, no remat) stack."""
  results = {}
  for kind in ('gpt', 'transformer'):
    model, params = init_model(kind)
    inputs = inputs_for(kind, random_tokens, seed=13)
    inputs = tuple(x.at[1, -2:].set(0) for x in inputs)  # some padding, so masks matter
    results[kind] = (params, inputs, *loss_and_grads(model, params, inputs, None)[1:])
  return results


@pytest.mark.parametrize('kind, remat, scan_layers', [
    # GPT: every combination but the plain stack itself.
    ('gpt', 'none', True), ('gpt', 'full', False), ('gpt', 'full', True),
    ('gpt', 'dots_saveable', False), ('gpt', 'dots_saveable', True),
    # Transformer (both layer kinds, encoder and decoder, at once): each policy and scan once,
    # to bound the compile time.
    ('transformer', 'none', True), ('transformer', 'full', False),
    ('transformer', 'dots_saveable', True)])
def test_scan_and_remat_compute_the_same_function(plain_stack_results, tiny_config, kind, remat,
                                                  scan_layers):
  params, inputs, logits, grads = plain_stack_results[kind]
  model = {'gpt': GPT, 'transformer': Transformer}[kind](
      tiny_config(remat=remat, scan_layers=scan_layers))
  if scan_layers:
    params, grads = stack_layers(params), stack_layers(grads)
  # The mapped parameters have exactly the structure and shapes the variant itself creates.
  own = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *inputs))['params'])
  assert jax.tree.map(lambda x: (x.shape, x.dtype), own) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), params)
  _, variant_logits, variant_grads = loss_and_grads(model, params, inputs, None)
  np.testing.assert_allclose(variant_logits, logits, rtol=0, atol=TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=TOL),
               variant_grads, grads)


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize('kind', ['gpt', 'transformer', 'bert'])
def test_dropout_is_off_by_default_and_reproducible(init_model, jit_apply, random_tokens, kind):
  model, params = init_model(kind)
  # Dropout rates do not change the parameters: reuse them with dropout turned on.
  model = type(model)(model.config.replace(dropout_rate=0.3, attention_dropout_rate=0.3))
  inputs = inputs_for(kind, random_tokens, seed=14)
  default = jit_apply(model, {'params': params}, *inputs)
  np.testing.assert_array_equal(jit_apply(model, {'params': params}, *inputs), default)
  np.testing.assert_array_equal(
      jit_apply(model, {'params': params}, *inputs, deterministic=True), default)

  def train(seed):
    return jit_apply(model, {'params': params}, *inputs, deterministic=False,
                     rngs={'dropout': jax.random.key(seed)})

  first = train(1)
  assert np.abs(np.asarray(first - default)).max() > 1e-2
  np.testing.assert_array_equal(train(1), first)
  assert np.abs(np.asarray(train(2) - first)).max() > 1e-2


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['float32', 'bfloat16'])
@pytest.mark.parametrize('kind, method', [('gpt', None), ('transformer', None),
                                          ('bert', 'mlm_logits'), ('bert', 'classify')])
def test_gradients_are_finite(init_model, jit_apply, random_tokens, kind, method, dtype):
  model32, params = init_model(kind)
  model = type(model32)(model32.config.replace(dtype=dtype))  # same float32 parameters
  inputs = inputs_for(kind, random_tokens, seed=13)
  value, logits, grads = loss_and_grads(model, params, inputs, method)
  assert logits.dtype == jnp.float32  # logits (and the loss) in float32 whatever the compute dtype
  assert np.isfinite(float(value))
  leaves = jax.tree.leaves(grads)
  assert all(g.dtype == jnp.float32 for g in leaves)  # gradients in param_dtype
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert float(optax.tree.norm(grads)) > 0
  if dtype == jnp.bfloat16:  # and the bfloat16 model computes nearly the float32 function:
    # bf16 rounds to 8 significant bits (~0.4%) per op; 2 layers stay well inside 5%.
    high = jit_apply(model32, {'params': params}, *inputs, method=method)
    assert np.linalg.norm(logits - high) / np.linalg.norm(high) < 0.05


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize('preset, overrides, model_cls, expected', [
    ('gpt2-small', {}, GPT, 124_439_808),
    ('bert-base', {}, BertEncoder, 109_482_240),  # default init: backbone and pooler
    ('vaswani-base', {'vocab_size': 37000}, Transformer, 63_082_496),
])
def test_preset_parameter_counts(preset, overrides, model_cls, expected):
  model = model_cls(TransformerConfig.preset(preset, **overrides))
  tokens = jnp.ones((1, 8), jnp.int32)
  inputs = (tokens, tokens) if model_cls is Transformer else (tokens,)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))  # nothing allocated
  assert sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)['params'])) == expected


# ----------------------------------------------------------------------------- end to end


def test_tiny_gpt_overfits_a_fixed_batch(gpt, random_tokens):
  model, params = gpt
  tokens = random_tokens(16, (4, 16))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: lm_loss(model.apply({'params': p}, inputs), targets))(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(50):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  # Starts near log(V) = 4.2 (uniform guess); memorizing 60 tokens takes it ~100x lower.
  assert losses[0] > 3.0
  assert losses[-1] < losses[0] / 20, losses


def test_untied_output_projection_transformer_and_gpt(tiny_config, random_tokens):
  """tie_embeddings=False adds an `lm_head [D, V]` and the logits come from it, not the embedding."""
  cfg = tiny_config(tie_embeddings=False)
  src, tgt = random_tokens(0, (2, 6)), random_tokens(1, (2, 5))
  for model, args in ((Transformer(cfg), (src, tgt)), (GPT(cfg), (tgt,))):
    params = nn.unbox(model.init(jax.random.key(0), *args)['params'])
    assert params['lm_head']['kernel'].shape == (cfg.d_model, cfg.vocab_size)
    logits = model.apply({'params': params}, *args)
    zeroed = jax.tree.map(lambda x: x, params)
    zeroed['lm_head'] = {'kernel': jnp.zeros_like(params['lm_head']['kernel'])}
    np.testing.assert_array_equal(np.asarray(model.apply({'params': zeroed}, *args)), 0.0)
    assert float(jnp.abs(logits).max()) > 0


def test_decoding_past_the_cache_raises(tiny_config, random_tokens):
  model = GPT(tiny_config())
  tokens = random_tokens(0, (1, 4))
  variables = model.init(jax.random.key(0), tokens, decode=True)
  with pytest.raises(ValueError, match='past the cache length 4'):
    model.apply(variables, random_tokens(1, (1, 5)), decode=True, mutable=['cache'])


def test_transformer_init_with_decode_sizes_the_cache(tiny_config, random_tokens):
  model = Transformer(tiny_config())
  cache = model.init(jax.random.key(0), random_tokens(0, (2, 6)), random_tokens(1, (2, 9)),
                     decode=True)['cache']
  keys = cache['decoder']['layers_0']['self_attention']['cached_key']
  assert keys.shape[:2] == (2, 9)
