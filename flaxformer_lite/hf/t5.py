"""T5 v1.0, v1.1 and FLAN-T5 (`T5ForConditionalGeneration`, `T5Model`) <-> our `Transformer`.

T5: pre-norm RMSNorm, no biases, no 1/sqrt(H) attention scale, relative position buckets (a
table per stack, stored in its block 0, shared by all its layers), relu (v1.0) or gated-gelu
(v1.1) feed-forward, tied outputs scaled by d_model ** -0.5.
"""

from __future__ import annotations

from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.hf.rules import (Layout, check_representable, dense, ids_to_hf, linear,
                                      linear_in, same, stacked, token_ids)
from flaxformer_lite.models import Transformer

FEED_FORWARD = {'relu': 'relu', 'gelu': 'gelu', 'gated-gelu': 'geglu', 'gated-silu': 'swiglu'}


def config_from_hf(hf: dict) -> Transformer:
  proj = hf.get('feed_forward_proj', 'relu')
  if proj not in FEED_FORWARD:
    raise ValueError(f't5 config feed_forward_proj={proj!r} is not supported (supported: '
                     f'{sorted(FEED_FORWARD)})')
  vocab, tied = hf['vocab_size'], hf.get('tie_word_embeddings', True)
  cfg = TransformerConfig(
      vocab_size=vocab, d_model=hf['d_model'], num_heads=hf['num_heads'], head_dim=hf['d_kv'],
      num_encoder_layers=hf['num_layers'],
      num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'], d_ff=hf['d_ff'],
      activation=FEED_FORWARD[proj], norm='rmsnorm', norm_position='pre',
      norm_eps=hf.get('layer_norm_epsilon', 1e-6), positions='relative',
      relative_buckets=hf.get('relative_attention_num_buckets', 32),
      relative_max_distance=hf.get('relative_attention_max_distance', 128),
      max_len=max(512, hf.get('n_positions') or 0), dropout_rate=hf.get('dropout_rate', 0.1),
      use_bias=False, attention_scale=1.0, tie_embeddings=tied,
      # transformers >= 5 names the scaling; before, a tied output meant a scaled one.
      scale_tied_output=hf.get('scale_decoder_outputs', tied), **token_ids(hf, vocab))
  return Transformer(cfg)


def config_to_hf(model: Transformer, params) -> dict:
  cfg = model.config
  check_representable(cfg, 't5', norm='rmsnorm', norm_position='pre', positions='relative',
                      use_bias=False, num_kv_heads=cfg.num_heads, attention_scale=1.0,
                      activation=tuple(FEED_FORWARD.values()), embed_norm=False,
                      final_logits_bias=False, scale_embeddings=False)
  proj = {v: k for k, v in FEED_FORWARD.items()}[cfg.activation]
  out = dict(model_type='t5', architectures=['T5ForConditionalGeneration'],
             vocab_size=cfg.vocab_size, d_model=cfg.d_model, num_heads=cfg.num_heads,
             d_kv=cfg.head_dim, num_layers=cfg.num_encoder_layers,
             num_decoder_layers=cfg.num_decoder_layers, d_ff=cfg.d_ff, feed_forward_proj=proj,
             layer_norm_epsilon=cfg.norm_eps, relative_attention_num_buckets=cfg.relative_buckets,
             relative_attention_max_distance=cfg.relative_max_distance, n_positions=cfg.max_len,
             dropout_rate=cfg.dropout_rate, tie_word_embeddings=cfg.tie_embeddings,
             scale_decoder_outputs=cfg.scale_tied_output, is_encoder_decoder=True,
             **ids_to_hf(cfg))
  out.setdefault('decoder_start_token_id', cfg.bos_id)
  return out


def _attention(ours, hf, cfg, cross: bool) -> list:
  n, h = cfg.num_heads, cfg.head_dim
  q, k, v, o = (f'{hf}.{x}.weight' for x in 'qkvo')
  if cross:
    rules = [linear(f'{ours}/query/kernel', q, n, h),
             stacked(f'{ours}/kv/kernel', [k, v], n, h)]
  else:
    rules = [stacked(f'{ours}/qkv/kernel', [q, k, v], n, h)]
  return rules + [linear_in(f'{ours}/out/kernel', o, n, h)]


def _mlp(ours, hf, cfg) -> list:
  if cfg.activation in ('geglu', 'swiglu'):  # HF's wi_0 is the activated half: our gate
    return [*dense(f'{ours}/wi_gate', f'{hf}.wi_0', bias=False),
            *dense(f'{ours}/wi', f'{hf}.wi_1', bias=False),
            *dense(f'{ours}/wo', f'{hf}.wo', bias=False)]
  return [*dense(f'{ours}/wi', f'{hf}.wi', bias=False), *dense(f'{ours}/wo', f'{hf}.wo', bias=False)]


def _layer(cfg, stack: str, i: int) -> list:
  ours, hf = f'{stack}/layers_{i}', f'{stack}.block.{i}.layer'
  if stack == 'encoder':
    return [*_attention(f'{ours}/self_attention', f'{hf}.0.SelfAttention', cfg, cross=False),
            same(f'{ours}/norm_attention/scale', f'{hf}.0.layer_norm.weight'),
            *_mlp(f'{ours}/mlp', f'{hf}.1.DenseReluDense', cfg),
            same(f'{ours}/norm_mlp/scale', f'{hf}.1.layer_norm.weight')]
  return [*_attention(f'{ours}/self_attention', f'{hf}.0.SelfAttention', cfg, cross=False),
          same(f'{ours}/norm_self_attention/scale', f'{hf}.0.layer_norm.weight'),
          *_attention(f'{ours}/cross_attention', f'{hf}.1.EncDecAttention', cfg, cross=True),
          same(f'{ours}/norm_cross_attention/scale', f'{hf}.1.layer_norm.weight'),
          *_mlp(f'{ours}/mlp', f'{hf}.2.DenseReluDense', cfg),
          same(f'{ours}/norm_mlp/scale', f'{hf}.2.layer_norm.weight')]


def tensors(model: Transformer, head=None) -> list:
  cfg = model.config
  rules = [same('embed/embedding', 'shared.weight')]
  for stack in ('encoder', 'decoder'):
    rules += [same(f'{stack}/relative_bias',
                   f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'),
              same(f'{stack}/final_norm/scale', f'{stack}.final_layer_norm.weight')]
    layers = cfg.num_encoder_layers if stack == 'encoder' else cfg.num_decoder_layers
    for i in range(layers):
      rules += _layer(cfg, stack, i)
  if not cfg.tie_embeddings:
    rules.append(linear('lm_head/kernel', 'lm_head.weight'))
  return rules


LAYOUT = Layout(model_types=('t5',), base_prefix='', config_from_hf=config_from_hf,
                config_to_hf=config_to_hf, tensors=tensors)
