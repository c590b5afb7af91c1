"""GPT-2 (`GPT2LMHeadModel`, `GPT2Model`) <-> our `GPT`."""

from __future__ import annotations

from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.hf.rules import (ACTIVATION_TO_HF, Layout, activation_from_hf,
                                      check_representable, ids_to_hf, linear, norm, refuse, reshaped,
                                      same, token_ids)
from flaxformer_lite.models import GPT


def config_from_hf(hf: dict) -> GPT:
  refuse(hf, 'scale_attn_by_inverse_layer_idx', [False],
         'attention scaled by 1/layer index is not implemented')
  refuse(hf, 'add_cross_attention', [False])
  d = hf['n_embd']
  cfg = TransformerConfig(
      vocab_size=hf['vocab_size'], d_model=d, num_heads=hf['n_head'], num_encoder_layers=0,
      num_decoder_layers=hf['n_layer'], d_ff=hf.get('n_inner') or 4 * d,
      activation=activation_from_hf(hf.get('activation_function', 'gelu_new')),
      norm='layernorm', norm_position='pre', norm_eps=hf.get('layer_norm_epsilon', 1e-5),
      positions='learned', max_len=hf.get('n_positions', 1024),
      dropout_rate=hf.get('resid_pdrop', 0.1), attention_dropout_rate=hf.get('attn_pdrop', 0.1),
      use_bias=True, tie_embeddings=hf.get('tie_word_embeddings', True),
      init_std=hf.get('initializer_range', 0.02),
      attention_scale=None if hf.get('scale_attn_weights', True) else 1.0,
      **{k: v for k, v in token_ids(hf, hf['vocab_size']).items() if k != 'decoder_start_id'})
  return GPT(cfg)


def config_to_hf(model: GPT, params) -> dict:
  cfg = model.config
  check_representable(cfg, 'GPT-2', norm='layernorm', norm_position='pre', positions='learned',
                      use_bias=True, num_kv_heads=cfg.num_heads,
                      head_dim=cfg.d_model // cfg.num_heads,
                      activation=tuple(ACTIVATION_TO_HF), attention_scale=(None, 1.0),
                      embed_norm=False, final_logits_bias=False, position_offset=0)
  return dict(model_type='gpt2', architectures=['GPT2LMHeadModel'], vocab_size=cfg.vocab_size,
              n_embd=cfg.d_model, n_head=cfg.num_heads, n_layer=cfg.num_decoder_layers,
              n_inner=cfg.d_ff, n_positions=cfg.max_len,
              activation_function=ACTIVATION_TO_HF[cfg.activation],
              layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout_rate,
              embd_pdrop=cfg.dropout_rate, attn_pdrop=cfg.attention_dropout_rate,
              initializer_range=cfg.init_std or 0.02, tie_word_embeddings=cfg.tie_embeddings,
              scale_attn_weights=cfg.attention_scale is None, **ids_to_hf(cfg))


def tensors(model: GPT, head=None) -> list:
  cfg = model.config
  n, h, d = cfg.num_heads, cfg.head_dim, cfg.d_model
  rules = [same('embed/embedding', 'transformer.wte.weight'),
           same('positions/embedding', 'transformer.wpe.weight'),
           *norm('decoder/final_norm', 'transformer.ln_f')]
  for i in range(cfg.num_decoder_layers):
    ours, hf = f'decoder/layers_{i}', f'transformer.h.{i}'
    # Conv1D weights are already [in, out]: only the heads are split out.
    rules += [
        *norm(f'{ours}/norm_self_attention', f'{hf}.ln_1'),
        reshaped(f'{ours}/self_attention/qkv/kernel', f'{hf}.attn.c_attn.weight', d, 3, n, h,
                 hf_shape=(d, -1)),
        reshaped(f'{ours}/self_attention/qkv/bias', f'{hf}.attn.c_attn.bias', 3, n, h),
        reshaped(f'{ours}/self_attention/out/kernel', f'{hf}.attn.c_proj.weight', n, h, d,
                 hf_shape=(-1, d)),
        same(f'{ours}/self_attention/out/bias', f'{hf}.attn.c_proj.bias'),
        *norm(f'{ours}/norm_mlp', f'{hf}.ln_2'),
        same(f'{ours}/mlp/wi/kernel', f'{hf}.mlp.c_fc.weight'),
        same(f'{ours}/mlp/wi/bias', f'{hf}.mlp.c_fc.bias'),
        same(f'{ours}/mlp/wo/kernel', f'{hf}.mlp.c_proj.weight'),
        same(f'{ours}/mlp/wo/bias', f'{hf}.mlp.c_proj.bias')]
  if not cfg.tie_embeddings:
    rules.append(linear('lm_head/kernel', 'lm_head.weight'))  # a Linear: [V, D]
  return rules


LAYOUT = Layout(model_types=('gpt2',), base_prefix='transformer.', config_from_hf=config_from_hf,
                config_to_hf=config_to_hf, tensors=tensors)
