"""viz: attention heat-maps and the collection of sown attention weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import image as mpimg

from flaxformer_lite import GPT, Transformer, TransformerConfig
from flaxformer_lite.viz import collect_attention, plot_attention


def tiny(**overrides):
  return TransformerConfig.preset('tiny', d_model=32, num_heads=2, d_ff=64, vocab_size=64,
                                  max_len=32, **overrides)


def read_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  return mpimg.imread(path)


def test_plot_attention_writes_png_growing_with_heads(tmp_path):
  rng = np.random.default_rng(0)
  weights = rng.random((4, 5, 7)).astype(np.float32)
  keys = [f'k{i}' for i in range(7)]
  queries = [f'q{i}' for i in range(5)]
  sizes = {}
  for heads in (1, 2, 4):
    w = weights[0] if heads == 1 else weights[:heads]
    path = tmp_path / f'heads{heads}.png'
    assert plot_attention(w, keys, queries, path, title=f'{heads} heads') == path
    pixels = read_png(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels[..., :3].var() > 0  # not blank
    sizes[heads] = pixels.shape[0] * pixels.shape[1]
  assert sizes[1] < sizes[2] < sizes[4]


def test_plot_attention_accepts_jax_arrays_and_creates_folder(tmp_path):
  weights = jax.nn.softmax(jnp.arange(12.0).reshape(2, 3, 2))  # [heads, q_len, kv_len]
  path = plot_attention(weights, ['a', 'b'], ['x', 'y', 'z'], str(tmp_path / 'new' / 'map.png'))
  assert read_png(path)[..., :3].var() > 0


@pytest.mark.parametrize('shape, x_n, y_n, match', [
    ((3, 5), 4, 3, 'x_labels has 4 labels'),
    ((3, 5), 5, 2, 'y_labels has 2 labels'),
    ((2, 3, 5), 5, 4, 'y_labels has 4 labels'),
    ((2, 2, 3, 5), 5, 3, r'\[q_len, kv_len\]'),
])
def test_plot_attention_rejects_mismatched_labels(tmp_path, shape, x_n, y_n, match):
  path = tmp_path / 'bad.png'
  with pytest.raises(ValueError, match=match):
    plot_attention(np.zeros(shape), ['k'] * x_n, ['q'] * y_n, path)
  assert not path.exists()


def stack_layers(params):
  """Plain params ('layers_0'..'layers_{L-1}') -> the scanned layout ('layers', stacked on axis 0)."""
  if not isinstance(params, dict):
    return params
  names = sorted((k for k in params if k.startswith('layers_')), key=lambda k: int(k[7:]))
  out = {k: stack_layers(v) for k, v in params.items() if k not in names}
  if names:
    out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in names])
  return out


def run_both_layouts(model_cls, inputs):
  results = []
  plain_params = None
  for scan in (False, True):
    model = model_cls(tiny(scan_layers=scan))
    if plain_params is None:
      plain_params = nn.meta.unbox(model.init(jax.random.key(0), *inputs)['params'])
      params = plain_params
    else:
      params = stack_layers(plain_params)
      # The mapped tree has exactly the scanned model's structure and shapes.
      expected = jax.eval_shape(lambda: nn.meta.unbox(
          model.init(jax.random.key(0), *inputs)['params']))
      assert jax.tree.structure(params) == jax.tree.structure(expected)
      assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda s: s.shape, expected)
    logits, state = model.apply({'params': params}, *inputs, capture_attention=True,
                                mutable=['intermediates'])
    results.append((logits, collect_attention(state)))
  return results


def assert_same_maps(plain, scanned):
  assert list(plain) == list(scanned)
  for key in plain:
    np.testing.assert_allclose(plain[key], scanned[key], atol=1e-5, err_msg=key)


def test_collect_attention_gpt_scan_and_plain_agree():
  tokens = jnp.array([[5, 6, 7, 8, 9, 0], [3, 4, 5, 6, 7, 8]])
  (logits, plain), (scan_logits, scanned) = run_both_layouts(GPT, (tokens,))
  np.testing.assert_allclose(logits, scan_logits, atol=1e-5)
  assert list(plain) == ['decoder/layers_0/self_attention', 'decoder/layers_1/self_attention']
  assert_same_maps(plain, scanned)
  weights = plain['decoder/layers_1/self_attention']
  assert weights.shape == (2, 2, 6, 6)  # [B, N, T, S]
  assert jnp.all(jnp.triu(weights, k=1) == 0)  # causal
  assert jnp.all(weights[0, :, :, 5] == 0)  # the pad token is never attended to
  np.testing.assert_allclose(weights[1].sum(-1), 1.0, atol=1e-5)


def test_collect_attention_transformer_scan_and_plain_agree():
  src = jnp.array([[5, 6, 7, 8, 0], [3, 4, 5, 6, 7]])
  tgt = jnp.array([[1, 9, 10, 11], [1, 12, 13, 0]])
  (_, plain), (_, scanned) = run_both_layouts(Transformer, (src, tgt))
  assert list(plain) == [
      'decoder/layers_0/cross_attention', 'decoder/layers_0/self_attention',
      'decoder/layers_1/cross_attention', 'decoder/layers_1/self_attention',
      'encoder/layers_0/self_attention', 'encoder/layers_1/self_attention']
  assert_same_maps(plain, scanned)
  assert plain['decoder/layers_0/cross_attention'].shape == (2, 2, 4, 5)
  assert plain['encoder/layers_1/self_attention'].shape == (2, 2, 5, 5)


def test_collect_attention_accepts_the_bare_collection_and_plots(tmp_path):
  tokens = jnp.array([[5, 6, 7, 8]])
  model = GPT(tiny())
  variables = model.init(jax.random.key(0), tokens)
  _, state = model.apply(variables, tokens, capture_attention=True, mutable=['intermediates'])
  maps = collect_attention(state)
  assert list(collect_attention(state['intermediates'])) == list(maps)
  with pytest.raises(ValueError, match='mapping'):
    collect_attention([1, 2])
  weights = maps['decoder/layers_0/self_attention'][0]  # [N, T, S] of the first example
  labels = [str(t) for t in tokens[0].tolist()]
  path = plot_attention(weights, labels, labels, tmp_path / 'gpt.png', title='layer 0')
  assert read_png(path)[..., :3].var() > 0
