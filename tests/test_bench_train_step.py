"""benchmarks/train_step.py: the FLOPs formula against a hand count, and a tiny measuring run."""

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
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


def test_measure_quick_trains_both_models_from_the_same_start():
  """A quick run of both frameworks: the same parameter count, two steps each, and a first loss
  near ln(vocab) (both start from small random weights). Timings are not asserted: they are
  the benchmark's output."""
  pytest.importorskip('torch')
  results = train_step.measure(TINY, steps=2, warmup=0, rounds_of=1)
  assert set(results) == {'ours (jax)', 'torch'}
  assert results['ours (jax)']['n_params'] == results['torch']['n_params']
  for r in results.values():
    assert r['steps'] == 2
    assert abs(r['loss_first'] - math.log(TINY['vocab'])) < 0.5, r
    assert math.isfinite(r['loss_last']), r


def test_compile_time_step_is_a_training_step_in_both_layouts():
  """The step benchmarks.compile_time compiles, plain and scanned, runs and trains: its first
  loss is about ln(vocab), the parameters change and a second step lowers the loss on the same
  batch."""
  from benchmarks import compile_time
  from flaxformer_lite import TransformerConfig
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 1, 256)
  for scan in (False, True):
    cfg = TransformerConfig.preset('tiny', num_decoder_layers=2, scan_layers=scan, max_len=16,
                                   dropout_rate=0.0, init_std=0.02)  # small logits at first
    step, _ = compile_time.train_step(cfg, batch=2, seq_len=8)
    params = nn.unbox(GPT(cfg).init(jax.random.key(0), tokens[:, :-1]))['params']
    opt_state = optax.adamw(3e-4).init(params)
    before = jax.tree.map(np.asarray, params)  # the step donates (deletes) its inputs
    params, opt_state, first = step(params, opt_state, tokens)
    after = jax.tree.map(np.asarray, params)
    _, _, second = step(params, opt_state, tokens)
    assert abs(float(first) - math.log(256)) < 0.5 and float(second) < float(first)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                         jax.tree.leaves(after)))
