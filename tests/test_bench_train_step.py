"""benchmarks/train_step.py: the FLOPs formulas against hand counts, and tiny measuring runs.

Timings are the benchmark's output and are never asserted; the tests check the work done.
"""

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import pytest

from benchmarks import train_step
from flaxformer_lite import GPT

TINY = dict(model='gpt', n_layer=2, n_head=2, d_model=16, seq_len=8, batch=2, vocab=32)
TINY_SEQ2SEQ = dict(model='transformer', n_layer=2, n_head=2, d_model=16, d_ff=24, src_len=6,
                    seq_len=5, batch=3, vocab=40)


def test_flops_per_token_matches_hand_count():
  L, D, T, V = 2, 16, 8, 32
  per_layer = 3 * D * D + D * D + 2 * D * 4 * D + 2 * D  # qkv, out, mlp (no bias), 2 norm scales
  n = L * per_layer + D + V * D  # + final norm + tied token embedding; no position table
  cfg = train_step.model_config(TINY)
  params = nn.unbox(jax.eval_shape(GPT(cfg).init, jax.random.key(0),
                                   jnp.ones((1, T), jnp.int32)))['params']
  assert train_step.count_params(params) == n
  assert train_step.count_params(params, exclude=()) == n + T * D
  assert train_step.flops_per_token(n, L, T, D) == 6 * n + 12 * L * T * D
  flops = train_step.model_flops(cfg, TINY)
  assert flops['n_params'] == n
  assert flops['flops_per_step'] == 2 * T * (6 * n + 12 * L * T * D)  # batch 2


def test_transformer_flops_match_hand_count():
  """Post-norm layers with biases: attention 4(D^2 + D), FFN 2DF + F + D, a LayerNorm 2D; the
  decoder adds cross-attention and a third norm. Sinusoidal positions have no parameters."""
  L, D, F, S, T, B, V = 2, 16, 24, 6, 5, 3, 40
  attention, ffn, norm = 4 * (D * D + D), 2 * D * F + F + D, 2 * D
  n_enc, n_dec = L * (attention + ffn + 2 * norm), L * (2 * attention + ffn + 3 * norm)
  by_hand = (6 * (n_enc * B * S + n_dec * B * T + V * D * B * T)
             + 12 * (L * S * S + L * T * T + L * T * S) * D * B)
  flops = train_step.model_flops(train_step.model_config(TINY_SEQ2SEQ), TINY_SEQ2SEQ)
  assert (flops['n_encoder'], flops['n_decoder'], flops['n_output']) == (n_enc, n_dec, V * D)
  assert flops['n_params'] == n_enc + n_dec + V * D  # the one shared embedding
  assert flops['flops_per_step'] == by_hand


def test_transformer_peer_has_our_parameter_count():
  """torch.nn.Transformer without its two stack-final norms, plus one shared embedding, has
  exactly our Transformer's parameters; the config's fields reach it (post-norm, relu, F)."""
  pytest.importorskip('torch')
  from benchmarks import torch_peers
  for shape in (TINY_SEQ2SEQ, dict(train_step.SHAPES['transformer', 'full'],
                                   model='transformer')):
    cfg = train_step.model_config(shape)
    peer = torch_peers.Seq2Seq(cfg)
    assert torch_peers.num_params(peer) == train_step.model_flops(cfg, shape)['n_params']
    assert peer.transformer.encoder.norm is None and peer.transformer.decoder.norm is None
    layer = peer.transformer.decoder.layers[0]
    assert not layer.norm_first and layer.linear1.out_features == cfg.d_ff
  with pytest.raises(ValueError, match='norm_position'):
    torch_peers.Seq2Seq(train_step.model_config(TINY))  # a GPT config is pre-norm


def test_measure_quick_trains_both_models_from_the_same_start():
  """A quick run of both frameworks: the same parameter count, two steps each, and a first loss
  near ln(vocab) (both start from small random weights)."""
  pytest.importorskip('torch')
  results = train_step.measure(TINY, steps=2, warmup=0, rounds_of=1)
  assert set(results) == {'ours (jax)', 'torch'}
  assert results['ours (jax)']['n_params'] == results['torch']['n_params']
  for r in results.values():
    assert r['steps'] == 2
    assert abs(r['loss_first'] - math.log(TINY['vocab'])) < 0.5, r
    assert math.isfinite(r['loss_last']), r


def test_measure_quick_transformer_pair():
  """Both encoder-decoders train: equal parameter counts, first losses near ln(vocab) (the
  logits start with unit variance: tied embedding of std D^-1/2 against normalized states, so
  about ln(V) + 1/2), then lower on the same batch; tokens/s of source + target are reported."""
  pytest.importorskip('torch')
  results = train_step.measure(TINY_SEQ2SEQ, steps=3, warmup=0, rounds_of=2)
  assert results['ours (jax)']['n_params'] == results['torch']['n_params']
  for r in results.values():
    assert r['steps'] == 3 and r['loss_last'] < r['loss_first'], r
    assert abs(r['loss_first'] - math.log(TINY_SEQ2SEQ['vocab'])) < 1.0, r
    assert r['src_tgt_tokens_per_s'] == pytest.approx(r['tokens_per_s'] * (6 + 5) / 5)


def test_measure_quick_bf16_with_full_remat_keeps_float32_weights():
  """--dtype bfloat16 --remat full: both losses finite and near ln(vocab), weights float32."""
  pytest.importorskip('torch')
  results = train_step.measure(TINY, steps=2, warmup=0, rounds_of=1, dtype='bfloat16',
                               remat='full')
  cfg = train_step.model_config(TINY, 'bfloat16', 'full')
  assert cfg.remat == 'full' and cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32
  for r in results.values():
    assert r['param_dtypes'] == ['float32'], r
    assert math.isfinite(r['loss_last']), r
    assert abs(r['loss_first'] - math.log(TINY['vocab'])) < 0.5, r


def test_cli_quick_writes_json_with_the_options(tmp_path):
  """The CLI's quick mode on the transformer, bf16, dots_saveable: the file name and JSON name
  the options, and the CPU run says the GPU was not measured."""
  record = train_step.main(['--quick', '--model', 'transformer', '--dtype', 'bfloat16',
                            '--remat', 'dots_saveable', '--steps', '1', '--out', str(tmp_path)])
  [path] = tmp_path.glob('*.json')
  assert path.name.startswith('train_step-transformer-bfloat16-remat-dots_saveable-')
  assert path.with_suffix('.png').exists()
  assert record['config']['remat'] == 'dots_saveable' and record['config']['dtype'] == 'bfloat16'
  assert record['config']['model'] == 'transformer'
  assert record['config']['model_config']['scale_embeddings'] is True
  assert record['results']['ours (jax)']['flops_per_step'] == record['flops']['flops_per_step']
  if jax.devices()[0].platform == 'cpu':
    assert record['gpu'].startswith('not measured')
    assert record['peak']['method'].startswith('measured')


def test_published_peak_is_keyed_by_device_kind():
  table, match = train_step.PUBLISHED_PEAKS, train_step.published_key
  assert match('NVIDIA H100 80GB HBM3') == 'H100' and table['H100']['bfloat16'] == 989.4
  assert match('NVIDIA H100 PCIe') == 'H100 PCIe' and match('NVIDIA H200') == 'H200'
  assert match('NVIDIA A100-SXM4-80GB') == 'A100' and table['A100']['bfloat16'] == 312.0
  assert match('cpu') is None  # falls back to the measured matmul peak


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
