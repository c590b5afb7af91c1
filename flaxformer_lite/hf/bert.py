"""BERT (`BertModel`, `BertForMaskedLM`, `BertForSequenceClassification`,
`BertForQuestionAnswering`) <-> our `BertEncoder` and its heads."""

from __future__ import annotations

from flaxformer_lite.bert import BertEncoder
from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.hf.rules import (ACTIVATION_TO_HF, Layout, activation_from_hf,
                                      check_representable, dense, linear_in, norm, refuse, same,
                                      stacked)

# Which head a checkpoint holds, by the architecture's name and, when saving, by our params.
HEADS = {'BertForMaskedLM': 'mlm_head', 'BertForSequenceClassification': 'classifier',
         'BertForQuestionAnswering': 'span_head', 'BertModel': None}


def _num_labels(hf: dict) -> int:
  return len(hf['id2label']) if hf.get('id2label') else hf.get('num_labels', 2)


def config_from_hf(hf: dict) -> BertEncoder:
  refuse(hf, 'position_embedding_type', ['absolute'],
         'relative position embeddings of BERT are not implemented')
  refuse(hf, 'is_decoder', [False])
  refuse(hf, 'add_cross_attention', [False])
  vocab = hf['vocab_size']
  pad = hf.get('pad_token_id', 0)
  cfg = TransformerConfig(
      vocab_size=vocab, d_model=hf['hidden_size'], num_heads=hf['num_attention_heads'],
      num_encoder_layers=hf['num_hidden_layers'], num_decoder_layers=0,
      d_ff=hf['intermediate_size'], activation=activation_from_hf(hf.get('hidden_act', 'gelu')),
      norm='layernorm', norm_position='post', norm_eps=hf.get('layer_norm_eps', 1e-12),
      positions='learned', max_len=hf.get('max_position_embeddings', 512),
      type_vocab_size=hf.get('type_vocab_size', 2),
      dropout_rate=hf.get('hidden_dropout_prob', 0.1),
      attention_dropout_rate=hf.get('attention_probs_dropout_prob', 0.1), use_bias=True,
      tie_embeddings=True, init_std=hf.get('initializer_range', 0.02),
      # BERT has no bos/eos: two ids that are not the pad token keep the config valid.
      pad_id=pad, bos_id=(pad + 1) % vocab, eos_id=(pad + 2) % vocab)
  return BertEncoder(cfg, num_labels=_num_labels(hf))


def head_of(params) -> str | None:
  for name in ('span_head', 'classifier', 'mlm_head'):
    if name in params:
      return name
  return None


def config_to_hf(model: BertEncoder, params) -> dict:
  cfg = model.config
  check_representable(cfg, 'BERT', norm='layernorm', norm_position='post', positions='learned',
                      use_bias=True, num_kv_heads=cfg.num_heads,
                      head_dim=cfg.d_model // cfg.num_heads, activation=tuple(ACTIVATION_TO_HF),
                      attention_scale=None, tie_embeddings=True, position_offset=0)
  arch = {v: k for k, v in HEADS.items()}[head_of(params)]
  out = dict(model_type='bert', architectures=[arch], vocab_size=cfg.vocab_size,
             hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads,
             num_hidden_layers=cfg.num_encoder_layers, intermediate_size=cfg.d_ff,
             hidden_act=ACTIVATION_TO_HF[cfg.activation], layer_norm_eps=cfg.norm_eps,
             max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size,
             hidden_dropout_prob=cfg.dropout_rate,
             attention_probs_dropout_prob=cfg.attention_dropout_rate,
             initializer_range=cfg.init_std or 0.02, pad_token_id=cfg.pad_id,
             position_embedding_type='absolute')
  if arch == 'BertForSequenceClassification':
    out['id2label'] = {str(i): f'LABEL_{i}' for i in range(model.num_labels)}
  return out


def _layer(cfg, i) -> list:
  n, h = cfg.num_heads, cfg.head_dim
  ours, hf = f'encoder/layers_{i}', f'bert.encoder.layer.{i}'
  qkv = [f'{hf}.attention.self.{x}' for x in ('query', 'key', 'value')]
  return [
      stacked(f'{ours}/self_attention/qkv/kernel', [f'{x}.weight' for x in qkv], n, h),
      stacked(f'{ours}/self_attention/qkv/bias', [f'{x}.bias' for x in qkv], n, h,
              weights=False),
      linear_in(f'{ours}/self_attention/out/kernel', f'{hf}.attention.output.dense.weight', n, h),
      same(f'{ours}/self_attention/out/bias', f'{hf}.attention.output.dense.bias'),
      *norm(f'{ours}/norm_attention', f'{hf}.attention.output.LayerNorm'),
      *dense(f'{ours}/mlp/wi', f'{hf}.intermediate.dense'),
      *dense(f'{ours}/mlp/wo', f'{hf}.output.dense'),
      *norm(f'{ours}/norm_mlp', f'{hf}.output.LayerNorm')]


def tensors(model: BertEncoder, head: str | None = None) -> list:
  """The backbone's rules and those of `head` ('mlm_head', 'classifier', 'span_head')."""
  cfg = model.config
  rules = [same('embed/embedding', 'bert.embeddings.word_embeddings.weight'),
           same('positions/embedding', 'bert.embeddings.position_embeddings.weight'),
           same('token_type_embedding', 'bert.embeddings.token_type_embeddings.weight'),
           *norm('embed_norm', 'bert.embeddings.LayerNorm'),
           # Checkpoints of the MLM head are saved without the pooler.
           *dense('pooler', 'bert.pooler.dense', optional=True)]
  for i in range(cfg.num_encoder_layers):
    rules += _layer(cfg, i)
  if head == 'mlm_head':
    rules += [*dense('mlm_head/transform', 'cls.predictions.transform.dense'),
              *norm('mlm_head/norm', 'cls.predictions.transform.LayerNorm'),
              same('mlm_head/bias', 'cls.predictions.bias')]
  elif head == 'classifier':
    rules += dense('classifier', 'classifier')
  elif head == 'span_head':
    rules += dense('span_head', 'qa_outputs')
  return rules


LAYOUT = Layout(model_types=('bert',), base_prefix='bert.', config_from_hf=config_from_hf,
                config_to_hf=config_to_hf, tensors=tensors)
