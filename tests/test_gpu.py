"""The GPU kernels on a real NVIDIA GPU: cuDNN, Pallas (Triton) and blockwise, outputs and
gradients against the float32 'xla' reference computed on the same GPU; the automatic choice; a
whole model. Skipped unless JAX computes on a GPU (benchmarks/gpu_check.sh runs it on one).

conftest.py sets float32 matmuls to 'highest', so the reference is true float32 (not TF32).
Each test records its largest errors with `record_property` (`--junitxml` keeps them).
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import GPT, BertEncoder, TransformerConfig, dot_product_attention, fused
from flaxformer_lite.attention import explain

from test_blockwise import assert_close, value_and_grads, xla

pytestmark = pytest.mark.skipif(jax.default_backend() != 'gpu',
                                reason=f'needs a GPU; JAX computes on {jax.default_backend()}')

# float32 kernels against float32 xla: other summation orders and exp2 approximations (~1e-6);
# a kernel that fell back to TF32 would be off by ~1e-3.
F32_TOL = 1e-4
# bfloat16 inputs, per unit of the largest reference value: outputs (~4) are rounded to 8 bits
# (xla's own bfloat16 result is off by up to 0.4% here); gradients more (cuDNN rounds the
# probabilities and dS to bfloat16 before its backward matmuls).
BF16_OUT_TOL = 1e-2
BF16_GRAD_TOL = 3e-2
TOLS = {'float32': (F32_TOL, F32_TOL), 'bfloat16': (BF16_OUT_TOL, BF16_GRAD_TOL)}

B, T, N, H = 2, 256, 4, 64  # T: two 128-tiles of the Pallas kernel


def make_case(name, dtype):
  """q, k, v (dtype) and dot_product_attention kwargs for one scenario."""
  t, s, kv, h = {'cross': (128, T, N, H), 'ragged': (200, 200, N, H), 'gqa': (T, T, 2, H),
                 'mqa': (T, T, 1, H), 'short': (48, 48, N, H), 'tiny': (6, 6, N, 8)
                 }.get(name, (T, T, N, H))
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k, v = normal(B, t, N, h), normal(B, s, kv, h), normal(B, s, kv, h)
  right = jnp.asarray(np.arange(s)[None] < np.array([s, s - 100])[:, None])  # [B, S]
  left = jnp.asarray(np.arange(s)[None] >= np.array([0, 60])[:, None])
  inf_bias = np.asarray(rng.normal(size=(t, s)), np.float32)
  inf_bias[3] = -np.inf  # a row with nothing to attend to
  inf_bias[:, 5:9] = -np.inf
  kwargs = {
      'full': {},
      'short': {'is_causal': True},  # Pallas: padded to a tile of 64
      'tiny': {},  # Pallas: padded to 16, head_dim 8 too
      'causal': {'is_causal': True},
      'ragged': {'is_causal': True},
      'lengths': {'query_seq_lengths': jnp.array([t, t - 56]),
                  'key_value_seq_lengths': jnp.array([s - 76, s])},
      'lengths_causal': {'is_causal': True, 'key_value_seq_lengths': jnp.array([s, s - 106])},
      'key_mask_right': {'mask': right[:, None, None, :], 'is_causal': True},
      'key_mask_left': {'mask': left[:, None, None, :], 'is_causal': True},
      'key_mask_empty': {'mask': right.at[1].set(False)[:, None, None, :]},
      'bias': {'bias': normal(1, N, t, s)},
      'bias_keys': {'bias': normal(B, 1, 1, s), 'is_causal': True},
      'bias_inf': {'bias': jnp.asarray(inf_bias)},
      'cross': {'mask': right[:, None, None, :]},
      'gqa': {'is_causal': True},
      'mqa': {'mask': right[:, None, None, :], 'is_causal': True},
  }[name]
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), kwargs


CASES = ['full', 'causal', 'short', 'tiny', 'ragged', 'lengths', 'lengths_causal',
         'key_mask_right', 'key_mask_left', 'key_mask_empty', 'bias', 'bias_keys', 'bias_inf',
         'cross', 'gqa', 'mqa']
# The Pallas GPU kernel: full or causal attention, equal heads and lengths in whole tiles (or
# shorter than one).
PALLAS_CASES = ['full', 'causal', 'short', 'tiny']


def grid():
  for name in CASES:
    yield name, 'cudnn', 'bfloat16'
    yield name, None, 'bfloat16'
    for dtype in ('float32', 'bfloat16'):
      yield name, 'blockwise', dtype
      if name in PALLAS_CASES:
        yield name, 'pallas', dtype
  for name in ('causal', 'tiny'):
    yield name, None, 'float32'  # Pallas, chosen automatically


@pytest.fixture(scope='module')
def reference():
  """(case, dtype) -> (output, grads) of float32 xla on the dtype's inputs, computed once."""
  cache = {}

  def get(name, dtype):
    if (name, dtype) not in cache:
      q, k, v, kwargs = make_case(name, dtype)
      f32 = [a.astype(jnp.float32) for a in (q, k, v)]
      cache[name, dtype] = value_and_grads(xla, *f32, kwargs)
    return cache[name, dtype]
  return get


def max_errors(out, grads, ref_out, ref_grads):
  err = lambda a, r: float(np.abs(np.asarray(a, np.float32) - np.asarray(r, np.float32)).max())
  rel = lambda a, r: err(a, r) / max(1.0, float(np.abs(np.asarray(r, np.float32)).max()))
  return {'out': err(out, ref_out), **{f'd{n}': rel(g, r)
                                       for n, g, r in zip('qkvb', grads, ref_grads)}}


@pytest.mark.parametrize('name, implementation, dtype', list(grid()))
def test_kernel_equals_float32_xla(name, implementation, dtype, reference, record_property):
  q, k, v, kwargs = make_case(name, dtype)
  fn = lambda *a, **kw: dot_product_attention(*a, implementation=implementation, **kw)
  out, grads = value_and_grads(fn, q, k, v, kwargs)
  ref_out, ref_grads = reference(name, dtype)
  record_property('max_errors', max_errors(out, grads, ref_out, ref_grads))
  record_property('chosen', str(explain(q, k, implementation=implementation,
                                        **{n: a for n, a in kwargs.items()})))
  out_tol, grad_tol = TOLS[dtype]
  assert out.dtype == q.dtype
  assert_close(out, ref_out, out_tol, relative=True)
  # Rows with nothing to attend to are exact zeros, as in xla.
  dead = np.all(np.asarray(ref_out) == 0, axis=-1)
  assert np.all(np.asarray(out, np.float32)[dead] == 0)
  assert len(grads) == len(ref_grads)
  for g, r in zip(grads, ref_grads):  # dq, dk, dv (and dbias in the bias's own shape)
    assert g.shape == r.shape
    assert_close(g, r, grad_tol, relative=True)


def test_the_automatic_choice_on_this_gpu():
  capability = fused._cuda_capability()
  assert capability is not None, jax.devices()[0]
  bf16 = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
  f32 = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
  assert explain(bf16, bf16, is_causal=True).implementation == 'cudnn'
  assert explain(f32, f32, is_causal=True).implementation == 'pallas'
  key_mask = jax.ShapeDtypeStruct((B, 1, 1, T), jnp.bool_)
  chosen = explain(bf16, bf16, mask=key_mask, is_causal=True)  # how the models pass padding
  assert chosen.implementation == 'cudnn' and 'right-padded' in chosen.reason
  full_mask = jax.ShapeDtypeStruct((B, 1, T, T), jnp.bool_)
  assert explain(bf16, bf16, mask=full_mask).implementation == 'xla'
  # Grouped-query heads: native in cuDNN; never the Pallas GPU kernel (wrong numbers there).
  kv2 = {dt: jax.ShapeDtypeStruct((B, T, 2, H), dt) for dt in (jnp.bfloat16, jnp.float32)}
  assert explain(bf16, kv2[jnp.bfloat16], is_causal=True).implementation == 'cudnn'
  assert explain(f32, kv2[jnp.float32], is_causal=True).implementation == 'xla'
  with pytest.raises(ValueError, match='grouped-query'):
    explain(f32, kv2[jnp.float32], implementation='pallas')
  with pytest.raises(ValueError, match='without a boolean mask'):
    explain(f32, f32, mask=key_mask, implementation='pallas')


def _lowered_text(fn, *args):
  return jax.jit(fn).lower(*args).as_text()


def test_cudnn_is_what_runs():
  """The compiled programs hold cuDNN's fused attention call (not an xla softmax)."""
  q, k, v, kwargs = make_case('key_mask_right', jnp.bfloat16)
  plain = _lowered_text(lambda q, k, v: dot_product_attention(q, k, v, is_causal=True), q, k, v)
  masked = _lowered_text(lambda q, k, v: dot_product_attention(q, k, v, **kwargs), q, k, v)
  assert 'cudnn$fmha' in plain and 'cudnn$fmha' in masked


# ----------------------------------------------------------------------------------------------
# Whole models in bfloat16: cuDNN against xla, both against the model computed in float32.

def _model_errors(results, name):
  """|logits - float32 logits| (real tokens) per unit of the largest, and the relative L2 norm
  of the gradient's difference (every parameter, flattened)."""
  (logits, grads, _), (ref_logits, ref_grads, _), valid = results[name], results['float32'], \
      results['valid']
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(g, np.float32))
                                      for g in jax.tree.leaves(tree)])
  g, r = flat(grads), flat(ref_grads)
  return {'logits': float(np.abs(np.asarray(logits - ref_logits))[valid].max()
                          / np.abs(np.asarray(ref_logits)).max()),
          'grads': float(np.linalg.norm(g - r) / np.linalg.norm(r))}


@pytest.mark.parametrize('kind', ['gpt', 'bert'])
@pytest.mark.parametrize('padding', ['right', 'left'])
def test_bfloat16_model_with_cudnn_is_as_accurate_as_xla(kind, padding, record_property):
  """GPT (causal) and BERT (bidirectional) from the tiny preset, one row padded: right padding
  runs cuDNN with lengths, left padding the blockwise fallback. Against the same model in
  float32, cuDNN's logits and gradients are as close as bfloat16 xla's (a random model's
  gradient is a sum of terms that mostly cancel, so bfloat16 itself moves it by ~10%)."""
  cfg = TransformerConfig.preset('tiny', dtype=jnp.bfloat16, dropout_rate=0.0)
  cls = GPT if kind == 'gpt' else BertEncoder
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 128)), jnp.int32)
  tokens = tokens.at[1, 90:].set(0) if padding == 'right' else tokens.at[1, :38].set(0)
  method = 'mlm_logits' if kind == 'bert' else None
  params = cls(cfg).init(jax.random.key(0), tokens, method=method)['params']
  results = {'valid': np.asarray(tokens != 0)}
  variants = {'xla': {}, 'cudnn': {'attention_impl': 'cudnn'}, 'float32': {'dtype': jnp.float32}}
  for name, overrides in variants.items():
    model = cls(cfg.replace(**{'attention_impl': 'xla', **overrides}))

    def loss(params):
      logits = model.apply({'params': params}, tokens, method=method).astype(jnp.float32)
      cotangent = jnp.cos(jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)
      return jnp.sum(logits * cotangent), logits
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, logits), grads = step(params)
    results[name] = (logits, grads, step.lower(params).as_text())
  errors = {name: _model_errors(results, name) for name in ('cudnn', 'xla')}
  record_property('max_errors', errors)
  assert 'cudnn$fmha' in results['cudnn'][2]
  for what in ('logits', 'grads'):
    assert errors['cudnn'][what] <= 2 * errors['xla'][what] + 1e-3, errors
