"""Our modules against PyTorch's, with the same weights copied in.

Every test builds a PyTorch module, fills *all* of its parameters with random values (so biases and
norm parameters are not the trivial 0/1 of a fresh init and a wiring mistake cannot hide behind
them), copies them into our parameter tree, runs both on the same random float32 inputs and
compares. The copy is checked against the tree our own `init` builds (same names, same shapes), so
a renamed or reshaped parameter fails loudly instead of being silently ignored.

Tolerance: 1e-5 absolute on activations of order 1. Both sides compute in float32 on the CPU with
the same algorithm (matmuls, float32 softmax, LayerNorm), so the only differences are summation
order and the variance formula (flax: E[x^2] - E[x]^2, torch: E[(x - mean)^2]); those are a few
float32 ulps per op and ~1e-6 after a two-layer encoder-decoder. 1e-5 leaves headroom for that and
nothing more: a wrong mask, head split, transpose or norm placement is off by 1e-2 or more.

Conventions that differ and are translated here:
- torch `Linear`/`in_proj_weight` is `[out, in]`; our `DenseGeneral` kernels are `[in, ...out]`.
- torch `key_padding_mask`/`attn_mask` (nn.MultiheadAttention and friends) use True = masked; our
  boolean masks use True = may attend. `F.scaled_dot_product_attention` uses True = may attend.
- A query row with nothing to attend to is zeros for us and NaN (or undefined) for torch; padded
  query rows are masked out entirely by our `make_padding_mask` but still attend for torch. We
  compare only rows that are valid queries with at least one key to attend to.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from flaxformer_lite import (DecoderLayer, EncoderLayer, MultiHeadAttention,  # noqa: E402
                             Transformer, TransformerConfig, combine_masks,
                             dot_product_attention, make_causal_mask, make_padding_mask)
from flaxformer_lite import attention as attention_lib  # noqa: E402

D, N, F, B = 32, 4, 64, 2  # d_model, heads, d_ff, batch
H = D // N
T, S = 5, 7  # query (target) length, key (source) length
ATOL = 1e-5

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')  # torch's nested-tensor notes


def config(**overrides) -> TransformerConfig:
  """Tiny float32 config without dropout; eps = torch's default layer_norm_eps."""
  fields = dict(vocab_size=50, d_model=D, num_heads=N, d_ff=F, num_encoder_layers=2,
                num_decoder_layers=2, dropout_rate=0.0, attention_dropout_rate=0.0,
                norm_eps=1e-5, positions='sinusoidal', max_len=64)
  fields.update(overrides)
  return TransformerConfig(**fields)


# ---------------------------------------------------------------------------------------------
# Helpers: random torch weights, the torch -> flax parameter copy, masks and comparisons.
# ---------------------------------------------------------------------------------------------

def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Fills every parameter with random values of a sensible scale; eval mode, float32."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim >= 2:  # [out, in]: keep activations of order 1
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
      elif 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return module.float().eval()


def np32(t: torch.Tensor) -> np.ndarray:
  return t.detach().cpu().numpy().astype(np.float32)


def mha_params(mha: torch.nn.MultiheadAttention, cfg: TransformerConfig, self_attention: bool):
  """torch MultiheadAttention -> our MultiHeadAttention params.

  torch: in_proj_weight `[3D, D]` (rows q|k|v, head n = rows n*H:(n+1)*H of each), in_proj_bias
  `[3D]`, out_proj `[D, D]`. Ours: `qkv [D, 3, N, H]` (fused self-attention), else `query
  [D, N, H]` with `kv [D, 2, N, H]` (fused) or `key`/`value [D, N, H]`; `out [N, H, D]`.
  """
  w = np32(mha.in_proj_weight).T  # [D, 3D], columns q|k|v
  b = np32(mha.in_proj_bias)
  p = {}
  if cfg.fused_qkv and self_attention:
    p['qkv'] = {'kernel': w.reshape(D, 3, N, H), 'bias': b.reshape(3, N, H)}
  else:
    p['query'] = {'kernel': w[:, :D].reshape(D, N, H), 'bias': b[:D].reshape(N, H)}
    if cfg.fused_qkv:
      p['kv'] = {'kernel': w[:, D:].reshape(D, 2, N, H), 'bias': b[D:].reshape(2, N, H)}
    else:
      p['key'] = {'kernel': w[:, D:2 * D].reshape(D, N, H), 'bias': b[D:2 * D].reshape(N, H)}
      p['value'] = {'kernel': w[:, 2 * D:].reshape(D, N, H), 'bias': b[2 * D:].reshape(N, H)}
  p['out'] = {'kernel': np32(mha.out_proj.weight).T.reshape(N, H, D),
              'bias': np32(mha.out_proj.bias)}
  return p


def norm_params(ln: torch.nn.LayerNorm):
  return {'scale': np32(ln.weight), 'bias': np32(ln.bias)}


def mlp_params(linear1: torch.nn.Linear, linear2: torch.nn.Linear):
  return {'wi': {'kernel': np32(linear1.weight).T, 'bias': np32(linear1.bias)},
          'wo': {'kernel': np32(linear2.weight).T, 'bias': np32(linear2.bias)}}


def encoder_layer_params(layer: torch.nn.TransformerEncoderLayer, cfg):
  return {'self_attention': mha_params(layer.self_attn, cfg, self_attention=True),
          'norm_attention': norm_params(layer.norm1),
          'mlp': mlp_params(layer.linear1, layer.linear2),
          'norm_mlp': norm_params(layer.norm2)}


def decoder_layer_params(layer: torch.nn.TransformerDecoderLayer, cfg):
  return {'self_attention': mha_params(layer.self_attn, cfg, self_attention=True),
          'norm_self_attention': norm_params(layer.norm1),
          'cross_attention': mha_params(layer.multihead_attn, cfg, self_attention=False),
          'norm_cross_attention': norm_params(layer.norm2),
          'mlp': mlp_params(layer.linear1, layer.linear2),
          'norm_mlp': norm_params(layer.norm3)}


def stack_params(layer_params: list, cfg, final_norm: torch.nn.LayerNorm | None):
  """Per-layer trees -> a LayerStack's tree: `layers_i` each, or one `layers` stacked on axis 0."""
  if cfg.scan_layers:
    tree = {'layers': jax.tree.map(lambda *xs: np.stack(xs), *layer_params)}
  else:
    tree = {f'layers_{i}': p for i, p in enumerate(layer_params)}
  if final_norm is not None:
    tree['final_norm'] = norm_params(final_norm)
  return tree


def param_shapes(module: nn.Module, *args, **kwargs):
  """The parameter tree our `init` would build, as shapes only (`jax.eval_shape`: no compute; an
  eager `init` of a scanned stack takes seconds). The lambda keeps Python flags static."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return nn.unbox(variables)['params']


def as_variables(template, params) -> dict:
  """`{'params': params}` as plain jnp arrays, after checking `params` has exactly the names and
  shapes of `template` (`param_shapes` of our module)."""
  assert jax.tree.structure(template) == jax.tree.structure(params), (
      f'parameter names differ:\n ours:  {jax.tree.map(jnp.shape, template)}\n '
      f'torch: {jax.tree.map(np.shape, params)}')
  shapes = jax.tree.map(lambda a, b: (a.shape, b.shape), template, params)
  for path, (ours, theirs) in jax.tree_util.tree_leaves_with_path(
      shapes, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
      and all(isinstance(s, tuple) for s in x)):
    assert ours == theirs, f'{jax.tree_util.keystr(path)}: ours {ours}, copied {theirs}'
  return {'params': jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)}


def random_inputs(seed: int, *shape) -> tuple[np.ndarray, torch.Tensor]:
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return x, torch.from_numpy(x)


def valid_lengths(batch: int, length: int, seed: int) -> np.ndarray:
  """`[batch, length]` right-padded validity; example 0 full length, the rest shorter."""
  lengths = [length] + list(np.random.default_rng(seed).integers(2, length, batch - 1))
  return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


def max_diff(ours, theirs, rows=None) -> float:
  """Max |ours - theirs| over `rows` (a boolean array over the leading axes), asserting <= ATOL."""
  ours = np.asarray(ours)
  theirs = np32(theirs) if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  if rows is not None:
    ours, theirs = ours[rows], theirs[rows]
  assert np.isfinite(theirs).all(), 'the torch reference produced non-finite values'
  diff = float(np.max(np.abs(ours - theirs)))
  assert diff <= ATOL, f'max abs diff {diff:.3g} > {ATOL}'
  return diff


def torch_causal(q_len: int, kv_len: int) -> torch.Tensor:
  """torch's boolean attn_mask (True = masked) for our top-left-aligned `make_causal_mask`."""
  return ~torch.ones(q_len, kv_len, dtype=torch.bool).tril()


# ---------------------------------------------------------------------------------------------
# 1. MultiHeadAttention vs torch.nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('fused_qkv', [True, False])
@pytest.mark.parametrize('kind', ['self', 'cross'])
@pytest.mark.parametrize('masking', ['padding', 'causal', 'both'])
def test_multi_head_attention(fused_qkv, kind, masking):
  """Self-attention (T x T) and cross-attention (T x S, S != T) with a key padding mask, a causal
  mask, or both; output `[B, T, D]` on valid query rows. Fused and unfused projections."""
  cfg = config(fused_qkv=fused_qkv)
  kv_len = T if kind == 'self' else S
  ref = randomize(torch.nn.MultiheadAttention(D, N, dropout=0.0, batch_first=True), seed=0)
  x, x_t = random_inputs(1, B, T, D)
  ctx, ctx_t = random_inputs(2, B, kv_len, D)
  q_valid = valid_lengths(B, T, seed=3) if kind == 'self' else np.ones((B, T), bool)
  k_valid = q_valid if kind == 'self' else valid_lengths(B, kv_len, seed=4)

  mask, key_padding_mask, attn_mask = None, None, None
  if masking in ('padding', 'both'):
    mask = make_padding_mask(jnp.asarray(q_valid), jnp.asarray(k_valid))
    key_padding_mask = torch.from_numpy(~k_valid)
  if masking in ('causal', 'both'):
    mask = combine_masks(mask, make_causal_mask(T, kv_len))
    attn_mask = torch_causal(T, kv_len)
  if masking == 'causal':
    q_valid = np.ones((B, T), bool)  # no padding: every query row is compared

  model = MultiHeadAttention(cfg)
  context = None if kind == 'self' else jnp.asarray(ctx)
  args = (jnp.asarray(x),) if kind == 'self' else (jnp.asarray(x), context)
  variables = as_variables(param_shapes(model, *args),
                           mha_params(ref, cfg, self_attention=kind == 'self'))
  ours = model.apply(variables, *args, mask=mask)
  kv_t = x_t if kind == 'self' else ctx_t
  theirs, _ = ref(x_t, kv_t, kv_t, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                  need_weights=False)
  max_diff(ours, theirs, rows=q_valid)


# ---------------------------------------------------------------------------------------------
# 2. EncoderLayer vs torch.nn.TransformerEncoderLayer
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('norm_position', ['post', 'pre'])
@pytest.mark.parametrize('activation', ['relu', 'gelu'])
def test_encoder_layer(norm_position, activation):
  """One encoder layer with a padding mask; post-norm = torch norm_first=False, pre-norm =
  norm_first=True; our 'gelu' is erf gelu = torch's 'gelu'. Compared on valid positions."""
  cfg = config(norm_position=norm_position, activation=activation)
  ref = randomize(torch.nn.TransformerEncoderLayer(
      D, N, F, dropout=0.0, activation=activation, layer_norm_eps=cfg.norm_eps,
      batch_first=True, norm_first=norm_position == 'pre'), seed=10)
  x, x_t = random_inputs(11, B, S, D)
  valid = valid_lengths(B, S, seed=12)
  mask = make_padding_mask(jnp.asarray(valid))
  positions = jnp.broadcast_to(jnp.arange(S), (B, S))

  layer = EncoderLayer(cfg)
  args = (jnp.asarray(x), mask, positions)  # deterministic, no captured attention: the defaults
  variables = as_variables(param_shapes(layer, *args), encoder_layer_params(ref, cfg))
  ours = layer.apply(variables, *args)
  theirs = ref(x_t, src_key_padding_mask=torch.from_numpy(~valid))
  max_diff(ours, theirs, rows=valid)


# ---------------------------------------------------------------------------------------------
# 3. DecoderLayer vs torch.nn.TransformerDecoderLayer
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('norm_position', ['post', 'pre'])
def test_decoder_layer(norm_position):
  """One decoder layer: causal + padding target mask, source padding mask on the cross-attention
  (T != S). Compared on valid target positions."""
  cfg = config(norm_position=norm_position)
  ref = randomize(torch.nn.TransformerDecoderLayer(
      D, N, F, dropout=0.0, layer_norm_eps=cfg.norm_eps, batch_first=True,
      norm_first=norm_position == 'pre'), seed=20)
  x, x_t = random_inputs(21, B, T, D)
  enc, enc_t = random_inputs(22, B, S, D)
  tgt_valid = valid_lengths(B, T, seed=23)
  src_valid = valid_lengths(B, S, seed=24)
  self_mask = combine_masks(make_causal_mask(T), make_padding_mask(jnp.asarray(tgt_valid)))
  cross_mask = make_padding_mask(jnp.asarray(tgt_valid), jnp.asarray(src_valid))
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))

  layer = DecoderLayer(cfg)
  args = (jnp.asarray(x), jnp.asarray(enc), self_mask, cross_mask, positions)
  variables = as_variables(param_shapes(layer, *args), decoder_layer_params(ref, cfg))
  ours = layer.apply(variables, *args)
  theirs = ref(x_t, enc_t, tgt_mask=torch_causal(T, T),
               tgt_key_padding_mask=torch.from_numpy(~tgt_valid),
               memory_key_padding_mask=torch.from_numpy(~src_valid))
  max_diff(ours, theirs, rows=tgt_valid)


# ---------------------------------------------------------------------------------------------
# 4. The whole encoder-decoder: Transformer vs torch.nn.Transformer
# ---------------------------------------------------------------------------------------------

def sinusoids(length: int, d_model: int) -> torch.Tensor:
  """The paper's position encodings, laid out [sin | cos] by halves (tensor2tensor, Marian)."""
  inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
  angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
  return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


@pytest.mark.parametrize('norm_position', ['post', 'pre'])
@pytest.mark.parametrize('scan_layers', [False, True])
def test_transformer(norm_position, scan_layers):
  """Our `Transformer.apply(src_tokens, tgt_tokens)` (embeddings, positions, masks built from
  pad tokens, encoder stack, decoder stack, tied output projection) against the same pipeline
  around `torch.nn.Transformer`: (E[tokens] * sqrt(D) + sinusoids) -> nn.Transformer ->
  h @ E^T. Logits `[B, T, V]` compared on non-pad target positions. scan_layers=True checks the
  stacked-parameter layout (`layers` with a leading layer axis)."""
  cfg = config(norm_position=norm_position, scan_layers=scan_layers, scale_embeddings=True,
               activation='gelu')
  pre = norm_position == 'pre'
  ref = torch.nn.Transformer(
      D, N, cfg.num_encoder_layers, cfg.num_decoder_layers, F, dropout=0.0,
      activation='gelu', layer_norm_eps=cfg.norm_eps, batch_first=True, norm_first=pre)
  if not pre:
    # The paper's post-norm stack has no final norm (each sublayer already ends in one); our
    # LayerStack adds `final_norm` only under pre-norm, torch's nn.Transformer always has one.
    ref.encoder.norm = None
    ref.decoder.norm = None
  ref = randomize(ref, seed=30)

  rng = np.random.default_rng(31)
  src_valid = valid_lengths(B, S, seed=32)
  tgt_valid = valid_lengths(B, T, seed=33)
  src = np.where(src_valid, rng.integers(3, cfg.vocab_size, (B, S)), cfg.pad_id)
  tgt = np.where(tgt_valid, rng.integers(3, cfg.vocab_size, (B, T)), cfg.pad_id)
  tgt[:, 0] = cfg.bos_id
  embedding = (rng.standard_normal((cfg.vocab_size, D)) / math.sqrt(D)).astype(np.float32)

  params = {
      'embed': {'embedding': embedding},
      'encoder': stack_params([encoder_layer_params(l, cfg) for l in ref.encoder.layers], cfg,
                              ref.encoder.norm),
      'decoder': stack_params([decoder_layer_params(l, cfg) for l in ref.decoder.layers], cfg,
                              ref.decoder.norm),
  }
  model = Transformer(cfg)
  src_j, tgt_j = jnp.asarray(src, jnp.int32), jnp.asarray(tgt, jnp.int32)
  variables = as_variables(param_shapes(model, src_j, tgt_j), params)
  ours = model.apply(variables, src_j, tgt_j)

  emb_t = torch.from_numpy(embedding)
  def embed(tokens):
    return emb_t[torch.from_numpy(tokens)] * math.sqrt(D) + sinusoids(tokens.shape[1], D)
  hidden = ref(embed(src), embed(tgt), tgt_mask=torch_causal(T, T),
               src_key_padding_mask=torch.from_numpy(~src_valid),
               tgt_key_padding_mask=torch.from_numpy(~tgt_valid),
               memory_key_padding_mask=torch.from_numpy(~src_valid))
  theirs = hidden @ emb_t.T
  max_diff(ours, theirs, rows=tgt_valid)


# ---------------------------------------------------------------------------------------------
# 5. Grouped-query dot_product_attention vs F.scaled_dot_product_attention(enable_gqa=True)
# ---------------------------------------------------------------------------------------------

GQA_KV_HEADS = 2
IMPLEMENTATIONS = [None, 'xla', 'blockwise']  # the backends that run on CPU


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
@pytest.mark.parametrize('masking', ['bool', 'bias', 'bias+bool', 'causal'])
def test_grouped_query_attention(implementation, masking):
  """4 query heads over 2 key/value heads (query head n reads kv head n // 2, as torch's
  `enable_gqa` does), with a per-head boolean mask (True = may attend, as in torch's SDPA), an
  additive float bias, both, or `is_causal` with T != S (top-left aligned in both). Output
  `[B, T, N, H]` on rows with a key to attend to; rows with none must be exactly zero for us."""
  rng = np.random.default_rng(40)
  q, q_t = random_inputs(41, B, T, N, H)
  k, k_t = random_inputs(42, B, S, GQA_KV_HEADS, H)
  v, v_t = random_inputs(43, B, S, GQA_KV_HEADS, H)
  mask = rng.random((B, N, T, S)) > 0.3
  mask[0, 1, 2, :] = False  # one row with nothing to attend to
  bias = rng.standard_normal((B, N, T, S)).astype(np.float32)

  kwargs, attn_mask, is_causal = {}, None, False
  rows = np.ones((B, N, T), bool)
  if masking == 'bool':
    kwargs['mask'], attn_mask = jnp.asarray(mask), torch.from_numpy(mask)
    rows = mask.any(-1)
  elif masking == 'bias':
    kwargs['bias'], attn_mask = jnp.asarray(bias), torch.from_numpy(bias)
  elif masking == 'bias+bool':
    kwargs['bias'], kwargs['mask'] = jnp.asarray(bias), jnp.asarray(mask)
    attn_mask = torch.from_numpy(np.where(mask, bias, -np.inf).astype(np.float32))
    rows = mask.any(-1)
  else:
    kwargs['is_causal'], is_causal = True, True

  ours = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                               implementation=implementation, **kwargs)
  theirs = torch.nn.functional.scaled_dot_product_attention(
      q_t.transpose(1, 2), k_t.transpose(1, 2), v_t.transpose(1, 2), attn_mask=attn_mask,
      is_causal=is_causal, enable_gqa=True).transpose(1, 2)  # [B, T, N, H]
  rows = rows.transpose(0, 2, 1)  # [B, T, N], the leading axes of the output
  max_diff(ours, theirs, rows=rows)
  np.testing.assert_array_equal(np.asarray(ours)[~rows], 0.0)
