"""Marian (`MarianMTModel`, the OPUS-MT translators) and BART (`BartForConditionalGeneration`)
<-> our `Transformer`. The two share a layout; they differ in positions (Marian: sinusoidal,
[sin | cos] halves; BART: learned, offset by 2 rows), BART's norm after the embeddings, and the
activation."""

from __future__ import annotations

from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.hf.rules import (ACTIVATION_TO_HF, Layout, activation_from_hf,
                                      check_representable, dense, ids_to_hf, linear, linear_in,
                                      norm, refuse, same, stacked, token_ids, Tensor)
from flaxformer_lite.models import Transformer

BART_POSITION_OFFSET = 2  # BART's learned table keeps two rows before position 0


def _same_both_sides(hf: dict, encoder_key: str, decoder_key: str):
  if hf.get(encoder_key) != hf.get(decoder_key):
    raise ValueError(f'{hf.get("model_type")} config {encoder_key}={hf.get(encoder_key)!r} != '
                     f'{decoder_key}={hf.get(decoder_key)!r}: our encoder and decoder share it')
  return hf.get(encoder_key)


def config_from_hf(hf: dict) -> Transformer:
  kind = hf['model_type']
  refuse(hf, 'normalize_before', [False], 'pre-norm mBART-style stacks are not implemented')
  refuse(hf, 'add_final_layer_norm', [False], 'mBART-style final norms are not implemented')
  if kind == 'marian':
    refuse(hf, 'share_encoder_decoder_embeddings', [True],
           'our Transformer has one embedding for source and target')
    if hf.get('decoder_vocab_size') not in (None, hf['vocab_size']):
      raise ValueError(f'marian config decoder_vocab_size={hf["decoder_vocab_size"]} != '
                       f'vocab_size={hf["vocab_size"]}: one vocabulary is supported')
  vocab = hf['vocab_size']
  cfg = TransformerConfig(
      vocab_size=vocab, d_model=hf['d_model'],
      num_heads=_same_both_sides(hf, 'encoder_attention_heads', 'decoder_attention_heads'),
      num_encoder_layers=hf['encoder_layers'], num_decoder_layers=hf['decoder_layers'],
      d_ff=_same_both_sides(hf, 'encoder_ffn_dim', 'decoder_ffn_dim'),
      activation=activation_from_hf(hf.get('activation_function', 'gelu')),
      norm='layernorm', norm_position='post', norm_eps=1e-5,
      positions='sinusoidal' if kind == 'marian' else 'learned',
      position_offset=0 if kind == 'marian' else BART_POSITION_OFFSET,
      max_len=hf.get('max_position_embeddings', 1024),
      dropout_rate=hf.get('dropout', 0.1), attention_dropout_rate=hf.get('attention_dropout', 0.0),
      use_bias=True, tie_embeddings=hf.get('tie_word_embeddings', True),
      scale_embeddings=hf.get('scale_embedding', False), embed_norm=kind == 'bart',
      final_logits_bias=True, init_std=hf.get('init_std', 0.02), **token_ids(hf, vocab))
  return Transformer(cfg)


def config_to_hf(model: Transformer, params) -> dict:
  cfg = model.config
  kind = 'bart' if cfg.positions == 'learned' else 'marian'
  check_representable(cfg, kind, norm='layernorm', norm_position='post', use_bias=True,
                      positions=('sinusoidal', 'learned'), num_kv_heads=cfg.num_heads,
                      head_dim=cfg.d_model // cfg.num_heads, activation=tuple(ACTIVATION_TO_HF),
                      attention_scale=None, norm_eps=1e-5, scale_tied_output=False,
                      embed_norm=kind == 'bart',
                      position_offset=BART_POSITION_OFFSET if kind == 'bart' else 0)
  arch = 'BartForConditionalGeneration' if kind == 'bart' else 'MarianMTModel'
  out = dict(model_type=kind, architectures=[arch], vocab_size=cfg.vocab_size,
             d_model=cfg.d_model, encoder_layers=cfg.num_encoder_layers,
             decoder_layers=cfg.num_decoder_layers, encoder_attention_heads=cfg.num_heads,
             decoder_attention_heads=cfg.num_heads, encoder_ffn_dim=cfg.d_ff,
             decoder_ffn_dim=cfg.d_ff, activation_function=ACTIVATION_TO_HF[cfg.activation],
             max_position_embeddings=cfg.max_len, scale_embedding=cfg.scale_embeddings,
             dropout=cfg.dropout_rate, attention_dropout=cfg.attention_dropout_rate,
             activation_dropout=0.0, init_std=cfg.init_std or 0.02,
             tie_word_embeddings=cfg.tie_embeddings, is_encoder_decoder=True, **ids_to_hf(cfg))
  if cfg.decoder_start_id is None:
    out['decoder_start_token_id'] = cfg.bos_id
  if kind == 'marian':
    out.update(share_encoder_decoder_embeddings=True, decoder_vocab_size=cfg.vocab_size)
  return out


def _attention(ours, hf, cfg, cross: bool) -> list:
  n, h = cfg.num_heads, cfg.head_dim
  q, k, v, o = (f'{hf}.{x}_proj' for x in ('q', 'k', 'v', 'out'))
  if cross:
    rules = [*dense(f'{ours}/query', q, n, h),
             stacked(f'{ours}/kv/kernel', [f'{k}.weight', f'{v}.weight'], n, h),
             stacked(f'{ours}/kv/bias', [f'{k}.bias', f'{v}.bias'], n, h, weights=False)]
  else:
    rules = [stacked(f'{ours}/qkv/kernel', [f'{x}.weight' for x in (q, k, v)], n, h),
             stacked(f'{ours}/qkv/bias', [f'{x}.bias' for x in (q, k, v)], n, h, weights=False)]
  return rules + [linear_in(f'{ours}/out/kernel', f'{o}.weight', n, h),
                  same(f'{ours}/out/bias', f'{o}.bias')]


def layer(cfg, stack: str, i: int, attention=_attention) -> list:
  """Layer i of `stack` in the BART layout (Marian's and Whisper's too; Whisper brings its own
  `attention` rules)."""
  ours, hf = f'{stack}/layers_{i}', f'model.{stack}.layers.{i}'
  name = 'norm_attention' if stack == 'encoder' else 'norm_self_attention'
  rules = [*attention(f'{ours}/self_attention', f'{hf}.self_attn', cfg, cross=False),
           *norm(f'{ours}/{name}', f'{hf}.self_attn_layer_norm')]
  if stack == 'decoder':
    rules += [*attention(f'{ours}/cross_attention', f'{hf}.encoder_attn', cfg, cross=True),
              *norm(f'{ours}/norm_cross_attention', f'{hf}.encoder_attn_layer_norm')]
  return rules + [*dense(f'{ours}/mlp/wi', f'{hf}.fc1'), *dense(f'{ours}/mlp/wo', f'{hf}.fc2'),
                  *norm(f'{ours}/norm_mlp', f'{hf}.final_layer_norm')]


def tensors(model: Transformer, head=None) -> list:
  cfg = model.config
  rules = [same('embed/embedding', 'model.shared.weight')]
  if cfg.final_logits_bias:  # stored [1, V]
    rules.append(Tensor('final_logits_bias', ('final_logits_bias',), lambda b: b.reshape(-1),
                        lambda b: (b.reshape(1, -1),)))
  for stack in ('encoder', 'decoder'):
    if cfg.positions == 'learned':
      rules.append(same(f'{stack}_positions/embedding', f'model.{stack}.embed_positions.weight'))
    if cfg.embed_norm:
      rules += norm(f'{stack}_embed_norm', f'model.{stack}.layernorm_embedding')
    layers = cfg.num_encoder_layers if stack == 'encoder' else cfg.num_decoder_layers
    for i in range(layers):
      rules += layer(cfg, stack, i)
  if not cfg.tie_embeddings:
    rules.append(linear('lm_head/kernel', 'lm_head.weight'))
  return rules


LAYOUT = Layout(model_types=('marian', 'bart'), base_prefix='model.',
                config_from_hf=config_from_hf, config_to_hf=config_to_hf, tensors=tensors)
