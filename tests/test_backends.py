"""Choosing a backend (explain, implementation=None), the guards of the fused kernels, and the
Pallas kernels themselves, run on CPU in interpret mode against 'xla'."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import GPT, TransformerConfig, attention, dot_product_attention, fused
from flaxformer_lite.attention import AttentionCall, explain

from test_blockwise import TOL, assert_close, value_and_grads, xla


def shaped(b, t, n, h, dtype=jnp.float32):
  return jax.ShapeDtypeStruct((b, t, n, h), dtype)


def call(**overrides):
  """An AttentionCall of a plain bfloat16 self-attention on a GPU, with overrides."""
  fields = dict(platform='gpu', dtype='bfloat16', batch=2, q_len=1024, kv_len=1024, num_heads=8,
                num_kv_heads=8, head_dim=64)
  return AttentionCall(**{**fields, **overrides})


# ----------------------------------------------------------------------------------------------
# The automatic choice on this (CPU) machine.

def test_cpu_chooses_xla_for_small_and_blockwise_for_long_attention():
  small = explain(shaped(8, 1, 8, 64), shaped(8, 64, 8, 64))
  assert small.implementation == 'xla' and '1 x 64' in small.reason
  long = explain(shaped(1, 4096, 8, 64), shaped(1, 4096, 8, 64), is_causal=True)
  assert long.implementation == 'blockwise'
  assert '4096 x 4096' in long.reason and 'causal tiles skipped' in long.reason
  assert str(long).startswith('blockwise: ')
  threshold = attention.BLOCKWISE_FROM['cpu']
  side = int(np.sqrt(threshold))
  assert attention.default_implementation(shaped(1, side, 4, 8), shaped(1, side, 4, 8)) == \
      'blockwise'
  assert attention.default_implementation(shaped(1, side - 1, 4, 8), shaped(1, side, 4, 8)) == \
      'xla'


def test_automatic_choice_computes_what_xla_computes():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 160, 4, 16)), jnp.float32) for _ in range(3))
  assert explain(q, k).implementation == 'blockwise'
  assert_close(dot_product_attention(q, k, v, is_causal=True), xla(q, k, v, is_causal=True), TOL)


@pytest.mark.parametrize('name, reason', [('cudnn', 'needs an NVIDIA GPU with cuDNN; JAX '
                                                    'computes on cpu'),
                                          ('pallas', 'needs a GPU or a TPU; JAX computes on cpu')])
def test_gpu_kernels_by_name_are_refused_cleanly_on_cpu(name, reason):
  q = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=f"implementation='{name}' cannot compute this call: "
                                       f'{reason}'):
    dot_product_attention(q, q, q, implementation=name)
  # The same single line from a model configured for it, at its first forward pass.
  model = GPT(TransformerConfig.preset('tiny', attention_impl=name))
  with pytest.raises(ValueError, match=reason):
    model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))


def test_unknown_implementation_names_the_choices():
  q = shaped(1, 4, 2, 8)
  with pytest.raises(ValueError, match=r"implementation='flash' is not one of \[None, 'xla', "
                                       r"'blockwise', 'cudnn', 'pallas'\]"):
    explain(q, q, implementation='flash')


# ----------------------------------------------------------------------------------------------
# The guards, on described calls (the kernels need a GPU; their checks do not).

@pytest.fixture
def on_hopper(monkeypatch):
  monkeypatch.setattr(fused, '_cuda_capability', lambda: (9, 0))


@pytest.mark.parametrize('overrides, reason', [
    ({}, None),
    ({'dtype': 'float16', 'is_causal': True, 'num_kv_heads': 2}, None),  # GQA is native
    ({'bias_shape': (1, 8, 1024, 1024), 'seq_lengths': True}, None),
    ({'dtype': 'float32'}, 'takes bfloat16 or float16 inputs, got float32'),
    ({'dropout': True}, 'no attention dropout'),
    ({'mask_shape': (2, 1, 1, 1024)}, r'not a boolean mask \(got shape \(2, 1, 1, 1024\)\)'),
    ({'is_causal': True, 'kv_len': 2048}, 'q_len=1024 != kv_len=2048'),
    ({'head_dim': 60}, 'head_dim=60 must be a multiple of 8 and at most 256'),
    ({'head_dim': 512}, 'head_dim=512'),
    ({'bias_shape': (1, 8, 1023, 1024), 'q_len': 1023}, 'even lengths'),
    ({'platform': 'tpu'}, 'needs an NVIDIA GPU'),
])
def test_cudnn_guard(on_hopper, overrides, reason):
  got = fused.why_not_cudnn(call(**overrides))
  if reason is None:
    assert got is None
  else:
    assert got is not None and re.search(reason, got), got


@pytest.mark.parametrize('overrides, reason', [
    ({}, None),
    ({'dtype': 'float32', 'is_causal': True}, None),
    ({'platform': 'tpu', 'num_kv_heads': 2, 'kv_len': 2048}, None),  # splash: GQA, T != S
    ({'num_kv_heads': 2}, 'wrong results for grouped-query heads'),
    ({'num_kv_heads': 1}, r'num_heads=8, num_kv_heads=1'),
    ({'kv_len': 2048}, 'needs q_len == kv_len'),
    ({'q_len': 1000, 'kv_len': 1000}, 'q_len=1000 must be a multiple of 128'),
    ({'q_len': 100, 'kv_len': 100}, None),  # one tile shorter than 128
    ({'bias_shape': (1, 8, 1024, 1024)}, 'without a bias'),
    ({'mask_shape': (2, 1, 1, 1024), 'dropout': True}, 'without a boolean mask or dropout'),
    ({'seq_lengths': True}, 'without sequence lengths'),
    ({'platform': 'tpu', 'kv_len': 100, 'q_len': 100}, 'kv_len a multiple of 128'),
    ({'platform': 'cpu'}, 'needs a GPU or a TPU'),
])
def test_pallas_guard(overrides, reason):
  got = fused.why_not_pallas(call(**overrides))
  if reason is None:
    assert got is None
  else:
    assert got is not None and re.search(reason, got), got


def test_gpu_preference_order(on_hopper, monkeypatch):
  """On a GPU: cuDNN when it can, else the Pallas kernel, else by length."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  bf16 = shaped(2, 1024, 8, 64, jnp.bfloat16)
  f32 = shaped(2, 1024, 8, 64)
  assert explain(bf16, bf16, is_causal=True).implementation == 'cudnn'
  assert explain(f32, f32, is_causal=True).implementation == 'pallas'
  assert explain(f32, shaped(2, 1024, 2, 64)).implementation == 'xla'  # GQA: no pallas
  long = shaped(1, 4096, 8, 64)
  mask = jax.ShapeDtypeStruct((1, 1, 1, 4096), jnp.bool_)
  assert explain(long, long, mask=mask).implementation == 'blockwise'
  with pytest.raises(ValueError, match='grouped-query'):
    explain(f32, shaped(2, 1024, 2, 64), implementation='pallas')


# ----------------------------------------------------------------------------------------------
# The Pallas kernels themselves, in interpret mode: outputs and gradients equal xla's.

@pytest.mark.parametrize('platform, shape', [
    ('gpu', (64, 64, 4, 4)),
    ('tpu', (64, 128, 4, 2)),  # splash: one multi-query kernel per key/value head
    ('tpu', (32, 128, 4, 1)),
])
@pytest.mark.parametrize('is_causal', [False, True])
def test_pallas_interpret_equals_xla(platform, shape, is_causal):
  t, s, n, kv = shape
  rng = np.random.default_rng(t + s + n + kv)
  q = jnp.asarray(rng.normal(size=(2, t, n, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, s, kv, 16)), jnp.float32) for _ in range(2))
  assert fused.why_not_pallas(call(platform=platform, q_len=t, kv_len=s, num_heads=n,
                                   num_kv_heads=kv, is_causal=is_causal)) is None

  def pallas(q, k, v, bias=None, **kwargs):
    assert bias is None
    return fused.pallas_attention(q, k, v, platform=platform, interpret=True, **kwargs)

  out, grads = value_and_grads(pallas, q, k, v, {'is_causal': is_causal})
  ref_out, ref_grads = value_and_grads(xla, q, k, v, {'is_causal': is_causal})
  assert_close(out, ref_out, TOL)
  # Grouped heads sum G heads' rows into dk and dv (values up to ~6): a few float32 ulps there.
  for g, r in zip(grads, ref_grads):
    assert_close(g, r, TOL, relative=True)


def test_the_gpu_kernel_is_wrong_for_grouped_heads_which_the_guard_refuses():
  """Why the guard exists: unguarded, the GPU kernel returns wrong numbers without an error."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 64, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, 64, 2, 16)), jnp.float32) for _ in range(2))
  wrong = fused.pallas_attention(q, k, v, platform='gpu', interpret=True)
  assert np.abs(np.asarray(wrong) - np.asarray(xla(q, k, v))).max() > 0.1
  assert 'grouped-query' in fused.why_not_pallas(call(q_len=64, kv_len=64, num_heads=4,
                                                      num_kv_heads=2))


@pytest.mark.parametrize('implementation', ['xla', 'blockwise', None])
@pytest.mark.parametrize('extra, match', [
    ({'mask': jnp.ones((2, 1, 5, 6), bool)}, r'mask shape \(2, 1, 5, 6\) does not broadcast to '
                                             r'\[batch, heads, q_len, kv_len\] = \[2, 4, 5, 7\]'),
    ({'bias': jnp.zeros((3, 4, 5, 7))}, r'bias shape \(3, 4, 5, 7\)'),
    ({'bias': jnp.zeros((1, 1, 1, 2, 5, 7))}, r'bias shape \(1, 1, 1, 2, 5, 7\)'),
    ({'key_value_seq_lengths': jnp.array([3, 4, 5])}, r'must have shape \[batch\] = \(2,\)'),
])
def test_bad_mask_bias_or_lengths_get_one_clear_error(implementation, extra, match):
  q = jnp.zeros((2, 5, 4, 8))
  kv = jnp.zeros((2, 7, 4, 8))
  with pytest.raises(ValueError, match=match):
    dot_product_attention(q, kv, kv, implementation=implementation, **extra)


# ----------------------------------------------------------------------------------------------
# What wraps the cuDNN kernel (key mask -> lengths, a bias's gradients from 'xla'), on CPU with
# the kernel replaced by 'xla' with a bias gradient of zero: what jax.nn's cuDNN call returns.

@pytest.mark.parametrize('padding', ['right', 'left'])  # left: not lengths, so 'blockwise'
@pytest.mark.parametrize('with_bias', [False, True])
def test_cudnn_wrapper_equals_xla_in_values_and_gradients(monkeypatch, padding, with_bias):
  def kernel_without_bias_gradient(q, k, v, *, bias=None, **lengths):
    bias = None if bias is None else jax.lax.stop_gradient(bias)
    return xla(q, k, v, bias=bias, **lengths)

  monkeypatch.setattr(fused, 'cudnn_attention', kernel_without_bias_gradient)
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 8, 4, 16)), jnp.float32) for _ in range(3))
  keep = np.arange(8)[None, :] < np.array([[6], [8]])
  keep = keep if padding == 'right' else keep[:, ::-1]
  kwargs = {'mask': jnp.asarray(keep)[:, None, None, :]}
  if with_bias:
    kwargs['bias'] = jnp.asarray(rng.normal(size=(1, 4, 8, 8)), jnp.float32)
  wrapped = lambda q, k, v, **kw: fused.cudnn_with_masks(
      q, k, v, reference=attention.IMPLEMENTATIONS['xla'][0], dropout_rate=0.0,
      dropout_rng=None, **kw)
  out, grads = value_and_grads(wrapped, q, k, v, kwargs)
  ref_out, ref_grads = value_and_grads(xla, q, k, v, kwargs)
  assert_close(out, ref_out, TOL)
  for g, r in zip(grads, ref_grads):
    assert_close(g, r, TOL, relative=True)
  if with_bias:  # the test can fail: the stand-in kernel's own bias gradient is zero
    assert np.abs(np.asarray(grads[3])).max() > 1e-3
