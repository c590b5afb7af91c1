"""Whisper (`WhisperForConditionalGeneration`) <-> our `SpeechTransformer`.

Whisper: two GELU convolutions (strides 1 and 2) over log-mel frames, its encoder's sinusoid
table as stored (a learned table to us, as transformers keeps it), pre-norm stacks with final
norms, learned decoder positions, a tied output, no bias on the key projections, and a pad token
equal to eos (so ours has pad_id=None: padding comes from masks).
"""

from __future__ import annotations

import numpy as np

from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.hf import bart
from flaxformer_lite.hf.rules import (ACTIVATION_TO_HF, Layout, Tensor, activation_from_hf,
                                      check_representable, dense, linear_in, norm, same,
                                      stacked, token_ids)
from flaxformer_lite.speech import SpeechTransformer


def config_from_hf(hf: dict) -> SpeechTransformer:
  vocab = hf['vocab_size']
  for a, b in (('encoder_attention_heads', 'decoder_attention_heads'),
               ('encoder_ffn_dim', 'decoder_ffn_dim')):
    if hf.get(a) != hf.get(b):
      raise ValueError(f'whisper config {a}={hf.get(a)} != {b}={hf.get(b)}: ours shares it')
  ids = token_ids(hf, vocab)
  cfg = TransformerConfig(
      vocab_size=vocab, d_model=hf['d_model'], num_heads=hf['encoder_attention_heads'],
      num_encoder_layers=hf['encoder_layers'], num_decoder_layers=hf['decoder_layers'],
      d_ff=hf['encoder_ffn_dim'], activation=activation_from_hf(hf.get('activation_function',
                                                                       'gelu')),
      norm='layernorm', norm_position='pre', norm_eps=1e-5, positions='learned',
      max_len=hf['max_target_positions'], max_source_len=hf['max_source_positions'],
      num_mel_bins=hf['num_mel_bins'], audio_strides=(1, 2), dropout_rate=hf.get('dropout', 0.0),
      attention_dropout_rate=hf.get('attention_dropout', 0.0), use_bias=True,
      tie_embeddings=True, scale_embeddings=hf.get('scale_embedding', False),
      init_std=hf.get('init_std', 0.02),
      **{**ids, 'pad_id': None})  # Whisper's pad is its eos: padding comes from masks
  return SpeechTransformer(cfg)


def config_to_hf(model: SpeechTransformer, params) -> dict:
  cfg = model.config
  check_representable(cfg, 'whisper', norm='layernorm', norm_position='pre', positions='learned',
                      use_bias=True, num_kv_heads=cfg.num_heads, audio_strides=((1, 2),),
                      head_dim=cfg.d_model // cfg.num_heads, activation=tuple(ACTIVATION_TO_HF),
                      attention_scale=None, norm_eps=1e-5, tie_embeddings=True,
                      embed_norm=False, final_logits_bias=False, position_offset=0)
  start = cfg.bos_id if cfg.decoder_start_id is None else cfg.decoder_start_id
  return dict(model_type='whisper', architectures=['WhisperForConditionalGeneration'],
              vocab_size=cfg.vocab_size, d_model=cfg.d_model, num_mel_bins=cfg.num_mel_bins,
              encoder_layers=cfg.num_encoder_layers, decoder_layers=cfg.num_decoder_layers,
              encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
              encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff,
              activation_function=ACTIVATION_TO_HF[cfg.activation],
              max_source_positions=cfg.max_source_len or cfg.max_len,
              max_target_positions=cfg.max_len, scale_embedding=cfg.scale_embeddings,
              dropout=cfg.dropout_rate, attention_dropout=cfg.attention_dropout_rate,
              init_std=cfg.init_std or 0.02, tie_word_embeddings=True, is_encoder_decoder=True,
              pad_token_id=cfg.eos_id, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id,
              decoder_start_token_id=start, begin_suppress_tokens=None, suppress_tokens=None)


def _no_key_bias(ours, hfs, n, h):
  """Biases of q, (k), v...: Whisper's key projection has none, ours holds zeros there (a key
  bias adds the same q.b to every logit of a row, which the softmax ignores)."""
  def to_ours(*bs):
    parts = [b.reshape(n, h) for b in bs]
    return np.stack(parts[:1] + [np.zeros_like(parts[0])] + parts[1:])
  return Tensor(ours, tuple(hfs), to_ours,
                lambda b: tuple(b[i].reshape(-1) for i in range(len(hfs) + 1) if i != 1))


def _attention(ours, hf, cfg, cross: bool) -> list:
  n, h = cfg.num_heads, cfg.head_dim
  q, k, v, o = (f'{hf}.{x}_proj' for x in ('q', 'k', 'v', 'out'))
  if cross:
    rules = [*dense(f'{ours}/query', q, n, h),
             stacked(f'{ours}/kv/kernel', [f'{k}.weight', f'{v}.weight'], n, h),
             Tensor(f'{ours}/kv/bias', (f'{v}.bias',),
                    lambda b: np.stack([np.zeros((n, h), b.dtype), b.reshape(n, h)]),
                    lambda b: (b[1].reshape(-1),))]
  else:
    rules = [stacked(f'{ours}/qkv/kernel', [f'{x}.weight' for x in (q, k, v)], n, h),
             _no_key_bias(f'{ours}/qkv/bias', [f'{q}.bias', f'{v}.bias'], n, h)]
  return rules + [linear_in(f'{ours}/out/kernel', f'{o}.weight', n, h),
                  same(f'{ours}/out/bias', f'{o}.bias')]


def _conv(ours, hf) -> list:
  """torch Conv1d weight `[out, in, k]` -> flax Conv kernel `[k, in, out]`."""
  return [Tensor(f'{ours}/kernel', (f'{hf}.weight',), lambda w: np.ascontiguousarray(w.T),
                 lambda k: (np.ascontiguousarray(k.T),)),
          same(f'{ours}/bias', f'{hf}.bias')]


def tensors(model: SpeechTransformer, head=None) -> list:
  cfg = model.config
  rules = [same('embed/embedding', 'model.decoder.embed_tokens.weight'),
           same('encoder_positions/embedding', 'model.encoder.embed_positions.weight'),
           same('decoder_positions/embedding', 'model.decoder.embed_positions.weight'),
           *_conv('front_end/conv_0', 'model.encoder.conv1'),
           *_conv('front_end/conv_1', 'model.encoder.conv2'),
           *norm('encoder/final_norm', 'model.encoder.layer_norm'),
           *norm('decoder/final_norm', 'model.decoder.layer_norm')]
  for i in range(cfg.num_encoder_layers):
    rules += bart.layer(cfg, 'encoder', i, attention=_attention)
  for i in range(cfg.num_decoder_layers):
    rules += bart.layer(cfg, 'decoder', i, attention=_attention)
  return rules  # proj_out is the tied embedding


LAYOUT = Layout(model_types=('whisper',), base_prefix='model.', config_from_hf=config_from_hf,
                config_to_hf=config_to_hf, tensors=tensors)
