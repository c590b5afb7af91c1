"""BertEncoder: the encoder-only family, with its masked-LM, classification and span heads."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import layers
from flaxformer_lite.blocks import EncoderLayer, LayerStack
from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.models import check_tokens, key_mask, token_positions, valid_tokens


class MaskedLMHead(nn.Module):
  """BERT's masked-LM head: dense, the config's activation, norm, then the token embedding
  transposed plus a bias."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, hidden, embed: layers.Embed):
    """hidden `[B, T, D]` -> logits `[B, T, V]` (float32)."""
    cfg = self.config
    h = layers.dense_general(cfg, cfg.d_model, ('mlp', 'embed'), name='transform')(hidden)
    h = layers.norm(cfg, 'norm')(layers.activation(cfg.activation)(h))
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ('vocab',)),
                      (cfg.vocab_size,), cfg.param_dtype)
    return (embed.attend(h) + bias).astype(jnp.float32)


def _check_token_types(tokens, token_types, cfg):
  if token_types is None:
    return jnp.zeros_like(tokens)
  if token_types.shape != tokens.shape:
    raise ValueError(f'token_types shape {token_types.shape} != tokens shape {tokens.shape}')
  if not isinstance(token_types, jax.core.Tracer) and token_types.size:
    bad = np.asarray(token_types)
    bad = bad[(bad < 0) | (bad >= cfg.type_vocab_size)]
    if bad.size:
      raise ValueError(f'token_types holds {int(bad[0])}, outside [0, '
                       f'type_vocab_size={cfg.type_vocab_size})')
  return token_types


class BertEncoder(nn.Module):
  """Encoder-only BERT: word + position + token-type embeddings, LayerNorm, encoder stack.

  `init(rng, tokens)` creates the backbone and the [CLS] pooler (BERT-base: 109,482,240
  parameters). The heads are methods: `mlm_logits`, `classify` and `qa_logits`; initialize with
  `method=BertEncoder.mlm_logits` (or another head) to create the head you will train. Every
  method takes `valid [B, T]` bool (transformers' attention_mask; default: not `pad_id`).
  """
  config: TransformerConfig
  num_labels: int = 2

  def setup(self):
    cfg = self.config
    self.embed = layers.Embed(cfg)
    self.positions = layers.AddPositions(cfg)
    self.token_types = self.param(
        'token_type_embedding',
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std or 0.02),
                                     (None, 'embed')),
        (cfg.type_vocab_size, cfg.d_model), cfg.param_dtype)
    self.embed_norm = layers.norm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    self.encoder = LayerStack(cfg, EncoderLayer, cfg.num_encoder_layers)
    self.pooler = layers.dense_general(cfg, cfg.d_model, ('mlp', 'embed'))
    self.mlm_head = MaskedLMHead(cfg)
    self.classifier = layers.dense_general(cfg, self.num_labels, ('embed', None))
    self.span_head = layers.dense_general(cfg, 2, ('embed', None))

  def __call__(self, tokens, token_types=None, *, valid=None, deterministic=True,
               capture_attention=False):
    """tokens `[B, T]`, token_types `[B, T]` (default zeros) -> hidden `[B, T, D]`."""
    cfg = self.config
    check_tokens(tokens, cfg)
    token_types = _check_token_types(tokens, token_types, cfg)
    valid = valid_tokens(tokens, valid, cfg)
    position_ids = token_positions(valid)
    x = self.positions(self.embed(tokens), position_ids)
    x = x + jnp.take(jnp.asarray(self.token_types, cfg.dtype), token_types, axis=0)
    x = self.dropout(self.embed_norm(x), deterministic=deterministic)
    hidden = self.encoder(x, mask=key_mask(valid), positions=position_ids,
                          deterministic=deterministic, capture_attention=capture_attention)
    if self.is_initializing():
      self.pool(hidden)  # the pooler belongs to the backbone's parameters, as in BERT
    return hidden

  def pool(self, hidden):
    """hidden `[B, T, D]` -> `[B, D]`: tanh(dense(hidden of the first, [CLS], token))."""
    return jnp.tanh(self.pooler(hidden[:, 0]))

  def mlm_logits(self, tokens, token_types=None, *, valid=None, deterministic=True):
    """Masked-LM logits `[B, T, V]` (float32); the output matrix is the token embedding."""
    hidden = self(tokens, token_types, valid=valid, deterministic=deterministic)
    return self.mlm_head(hidden, self.embed)

  def classify(self, tokens, token_types=None, *, valid=None, deterministic=True):
    """Sequence-classification logits `[B, num_labels]` (float32) from the pooled [CLS]."""
    hidden = self(tokens, token_types, valid=valid, deterministic=deterministic)
    pooled = self.dropout(self.pool(hidden), deterministic=deterministic)
    return self.classifier(pooled).astype(jnp.float32)

  def qa_logits(self, tokens, token_types=None, *, valid=None, deterministic=True):
    """Extractive question answering: (start, end) logits, each `[B, T]` (float32), of the
    answer span's first and last token (BertForQuestionAnswering's head)."""
    hidden = self(tokens, token_types, valid=valid, deterministic=deterministic)
    logits = self.span_head(hidden).astype(jnp.float32)
    return logits[..., 0], logits[..., 1]
