"""benchmarks/train_step.py: the FLOPs formula against a hand count, and a tiny measuring run."""

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import pytest

from benchmarks import train_step
from flaxformer_lite import GPT

TINY = dict(n_layer=2, n_head=2, d_model=16, seq_len=8, batch=2, vocab=32)


def test_flops_per_token_matches_hand_count():
  L, D, T, V = 2, 16, 8, 32
  per_layer = 3 * D * D + D * D + 2 * D * 4 * D + 2 * D  # qkv, out, mlp (no bias), 2 norm scales
  n = L * per_layer + D + V * D  # + final norm + tied token embedding; no position table
  cfg = train_step.model_config(TINY)
  params = nn.unbox(jax.eval_shape(GPT(cfg).init, jax.random.key(0),
                                   jnp.ones((1, T), jnp.int32)))['params']
  assert train_step.count_params(params) == n
  assert train_step.count_params(params, exclude=()) == n + T * D
  assert train_step.flops_per_token(n, TINY) == 6 * n + 12 * L * T * D


def test_measure_quick_returns_finite_positive_numbers():
  pytest.importorskip('torch')
  results = train_step.measure(TINY, steps=2, warmup=0, rounds_of=1)
  assert set(results) == {'ours (jax)', 'torch'}
  assert results['ours (jax)']['n_params'] == results['torch']['n_params']
  for r in results.values():
    for key in ('step_ms', 'tokens_per_s', 'loss_first', 'loss_last'):
      assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert r['steps'] == 2


def test_compile_time_compiles_plain_and_scanned_steps():
  """benchmarks.compile_time lowers and compiles a full step for both layer layouts (no timing is
  asserted: the figures live in benchmarks/results/)."""
  from benchmarks import compile_time
  from flaxformer_lite import TransformerConfig
  for scan in (False, True):
    cfg = TransformerConfig.preset('tiny', num_decoder_layers=2, scan_layers=scan, max_len=16)
    seconds = compile_time.compile_seconds(cfg, batch=2, seq_len=8)
    assert math.isfinite(seconds) and seconds > 0
