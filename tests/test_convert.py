"""convert.from_pretrained / save_pretrained against transformers' own models (random weights).

Each architecture is built tiny from its config with weights large enough that logits are far
apart (initializer_range 0.3; biases, norm scales and final_logits_bias perturbed), saved to a
temporary directory and loaded by ours. transformers runs with eager attention. Tolerance: max
abs diff <= 1e-5 (float32), over real (not padding) positions.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
tf = pytest.importorskip('transformers')

from flaxformer_lite import convert  # noqa: E402

V = 64
TOL = 1e-5
RNG = np.random.default_rng(0)


def _perturb(model, scale=0.3):
  """Random biases, norm scales and buffers such as final_logits_bias: nothing is 0 or 1."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
      if p.dtype.is_floating_point and p.dim() == 1 or 'final_logits_bias' in name:
        p.add_(torch.randn(p.shape, generator=gen) * scale)
  return model.eval()


def build(kind: str):
  torch.manual_seed(0)
  common = dict(vocab_size=V, initializer_range=0.3, init_std=0.3)
  seq2seq = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                 max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                 activation_dropout=0.0)
  if kind == 'gpt2':
    cfg = tf.GPT2Config(**common, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=V - 2,
                        eos_token_id=V - 1, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return tf.GPT2LMHeadModel(cfg)
  if kind.startswith('bert'):
    cfg = tf.BertConfig(**common, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0,
                        attention_probs_dropout_prob=0, num_labels=3 if kind == 'bert-cls' else 2)
    head = {'bert': tf.BertModel, 'bert-mlm': tf.BertForMaskedLM,
            'bert-cls': tf.BertForSequenceClassification, 'bert-qa': tf.BertForQuestionAnswering}
    return head[kind](cfg)
  if kind == 'marian':
    cfg = tf.MarianConfig(**common, **seq2seq, activation_function='swish', scale_embedding=True,
                          pad_token_id=V - 1, eos_token_id=0, decoder_start_token_id=V - 1,
                          forced_eos_token_id=0)
    return tf.MarianMTModel(cfg)
  if kind == 'bart':
    cfg = tf.BartConfig(**common, **seq2seq, activation_function='gelu', pad_token_id=1,
                        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                        forced_eos_token_id=2)
    return tf.BartForConditionalGeneration(cfg)
  t5 = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
            dropout_rate=0.0, initializer_factor=1.0, decoder_start_token_id=0)
  if kind == 't5':
    return tf.T5ForConditionalGeneration(tf.T5Config(**t5, feed_forward_proj='relu'))
  model = tf.T5ForConditionalGeneration(  # v1.1 / FLAN-T5: gated-gelu, unscaled output
      tf.T5Config(**t5, feed_forward_proj='gated-gelu', tie_word_embeddings=False))
  with torch.no_grad():  # logits ~10, not ~20: float32's own error stays under the tolerance
    model.lm_head.weight.mul_(0.5)
  return model


KINDS = ['gpt2', 'bert', 'bert-mlm', 'bert-cls', 'bert-qa', 'marian', 'bart', 't5', 't5-v1_1']


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """kind -> (transformers model, directory it was saved to), built once."""
  out = {}
  for kind in KINDS:
    model = _perturb(build(kind))
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    out[kind] = (model, path)
  return out


def _tokens(batch, length, low=3):
  return RNG.integers(low, V - 2, (batch, length))


def _mask(batch, length, left=False):
  """1 for real tokens; row 1 has 3 padding positions (right, or left for GPT-2)."""
  mask = np.ones((batch, length), np.int64)
  mask[1, :3] = 0 if left else 1
  if not left:
    mask[1, -3:] = 0
  return mask


def _close(ours, ref, mask=None):
  ours, ref = np.asarray(ours), np.asarray(ref)
  diff = np.abs(ours - ref)
  if mask is not None:
    diff = diff[mask.astype(bool)]
  assert diff.max() <= TOL, diff.max()
  return float(diff.max())


def test_gpt2_logits_match_with_left_padding(checkpoints):
  hf, path = checkpoints['gpt2']
  model, variables = convert.from_pretrained(path)
  ids, mask = _tokens(3, 9), _mask(3, 9, left=True)
  positions = np.maximum(mask.cumsum(1) - 1, 0)  # what generate() gives left-padded rows
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(positions)).logits
  ours = model.apply(variables, jnp.asarray(ids), valid=jnp.asarray(mask, bool))
  _close(ours, ref, mask)
  assert model.config.pad_id is None  # GPT-2 has no pad token: id 0 is a real token


@pytest.mark.parametrize('kind', ['bert', 'bert-mlm', 'bert-cls', 'bert-qa'])
def test_bert_and_its_heads_match(checkpoints, kind):
  hf, path = checkpoints[kind]
  model, variables = convert.from_pretrained(path)
  ids, mask = _tokens(3, 10), _mask(3, 10)
  types = (np.arange(10) >= 4).astype(np.int64)[None].repeat(3, 0)
  args = (jnp.asarray(ids), jnp.asarray(types))
  kw = dict(valid=jnp.asarray(mask, bool))
  with torch.no_grad():
    out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
             token_type_ids=torch.tensor(types))
  if kind == 'bert':
    _close(model.apply(variables, *args, **kw), out.last_hidden_state, mask)
    _close(model.apply(variables, model.apply(variables, *args, **kw), method='pool'),
           out.pooler_output)
  elif kind == 'bert-mlm':
    _close(model.apply(variables, *args, **kw, method='mlm_logits'), out.logits, mask)
  elif kind == 'bert-cls':
    assert model.num_labels == 3
    _close(model.apply(variables, *args, **kw, method='classify'), out.logits)
  else:
    start, end = model.apply(variables, *args, **kw, method='qa_logits')
    _close(start, out.start_logits, mask)
    _close(end, out.end_logits, mask)


@pytest.mark.parametrize('kind', ['marian', 'bart', 't5', 't5-v1_1'])
def test_seq2seq_logits_match_with_padding(checkpoints, kind):
  hf, path = checkpoints[kind]
  model, variables = convert.from_pretrained(path)
  cfg = model.config
  src, src_mask = _tokens(3, 11), _mask(3, 11)
  tgt, tgt_mask = _tokens(3, 7), _mask(3, 7)
  tgt[:, 0] = cfg.decoder_start_id  # the start token, which may equal pad_id (Marian, T5)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(src), attention_mask=torch.tensor(src_mask),
             decoder_input_ids=torch.tensor(tgt),
             decoder_attention_mask=torch.tensor(tgt_mask)).logits
  ours = model.apply(variables, jnp.asarray(src), jnp.asarray(tgt),
                     src_valid=jnp.asarray(src_mask, bool), tgt_valid=jnp.asarray(tgt_mask, bool))
  _close(ours, ref, tgt_mask)
