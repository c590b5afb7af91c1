"""Tiny random-weight transformers models of every architecture convert.py reads, built from
configs (nothing downloaded): the reference the checkpoint tests and benchmarks compare with.

Weights are large enough that logits are decisive (initializer_range 0.3; T5's factor 1), and
biases, norm scales and final_logits_bias are perturbed, so no parameter sits at 0 or 1 and a
mapped-wrong tensor cannot go unnoticed. Needs torch and transformers.
"""

import torch
import transformers as tf

V = 64  # vocabulary of every tiny model

def perturb(model, scale=0.3):
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
  if kind == 'whisper':  # pad == eos, as Whisper's; 12 encoder positions = 24 input frames
    cfg = tf.WhisperConfig(vocab_size=V, num_mel_bins=8, d_model=32, encoder_layers=2,
                           decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=12,
                           max_target_positions=16, pad_token_id=V - 1, eos_token_id=V - 1,
                           bos_token_id=V - 1, decoder_start_token_id=V - 2,
                           begin_suppress_tokens=None, init_std=0.3, dropout=0.0)
    return tf.WhisperForConditionalGeneration(cfg)
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


KINDS = ['gpt2', 'bert', 'bert-mlm', 'bert-cls', 'bert-qa', 'marian', 'bart', 't5', 't5-v1_1',
         'whisper']


def saved(kind: str, path) -> tuple:
  """The perturbed model of `kind`, eager attention, eval mode, saved to `path` ->
  (model, path)."""
  model = perturb(build(kind))
  model.set_attn_implementation('eager')  # sdpa differs from the math by ~5e-6
  model.save_pretrained(path)
  return model, path
