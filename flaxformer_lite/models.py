"""The three model families: encoder-decoder Transformer, BertEncoder and GPT."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import layers
from flaxformer_lite.blocks import DecoderLayer, EncoderLayer, LayerStack
from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.decoding import Decoder


def check_tokens(tokens, cfg: TransformerConfig, name: str = 'tokens') -> None:
  """Raises ValueError for a bad token array: shape and length always, values when concrete."""
  if tokens.ndim != 2:
    raise ValueError(f'{name} must be [batch, length]; got shape {tokens.shape}')
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f'{name} must be integer token ids; got dtype {tokens.dtype}')
  if 0 in tokens.shape:
    raise ValueError(f'{name} shape {tokens.shape} is empty: batch and length must be positive')
  if tokens.shape[1] > cfg.max_len:
    raise ValueError(f'{name} length {tokens.shape[1]} is longer than max_len={cfg.max_len}')
  if not isinstance(tokens, jax.core.Tracer) and tokens.size:
    values = np.asarray(tokens)  # on the host: under a trace, jnp would give tracers
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= cfg.vocab_size:
      bad = low if low < 0 else high
      raise ValueError(f'{name} holds id {bad}, outside the vocabulary [0, {cfg.vocab_size})')


def key_mask(valid: jax.Array) -> jax.Array:
  """`[B, 1, 1, S]` from `valid [B, S]`: pad tokens are never attended to.

  Queries are not masked (a pad token's own output is never read by a real one), so the mask
  stays `O(B * S)`: the blockwise backend then never builds a `[T, S]` array.
  """
  return valid[:, None, None, :]


def token_positions(valid: jax.Array) -> jax.Array:
  """Positions `[B, T]` counting non-pad tokens only, so left padding shifts nothing.

  With right padding (or none) this is 0, 1, 2, ...; a pad token takes its predecessor's position
  (it is never attended to, so its position does not matter).
  """
  return jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)


class DecodePosition(nn.Module):
  """Per-example decoding position `[B]` kept in the 'cache' collection.

  Each call returns the cache positions `[B, T]` of its tokens, -1 for pad tokens (which are
  neither cached nor attended to), and advances every example by its number of non-pad tokens:
  prompts of different lengths, padded on either side, continue from their own ends.
  """

  @nn.compact
  def __call__(self, valid: jax.Array) -> jax.Array:
    is_init = not self.has_variable('cache', 'position')
    position = self.variable('cache', 'position', jnp.zeros, valid.shape[:1], jnp.int32)
    if is_init:  # `init(..., decode=True)` only sizes the cache
      return jnp.broadcast_to(jnp.arange(valid.shape[1], dtype=jnp.int32), valid.shape)
    positions = position.value[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
    position.value = position.value + valid.sum(axis=1, dtype=jnp.int32)
    return jnp.where(valid, positions, -1)


def _lm_head(cfg, name=None):
  return layers.dense_general(cfg, cfg.vocab_size, ('embed', 'vocab'), use_bias=False, name=name)


def _output_logits(cfg, embed, x, lm_head=None):
  """`[B, T, D]` -> float32 logits, through the tied embedding or `lm_head`."""
  logits = embed.attend(x) if cfg.tie_embeddings else lm_head(x)
  # Losses and sampling want float32 logits whatever the compute dtype.
  return nn.with_logical_constraint(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))


# ------------------------------------------------------------------------------------------------
# decoding: what GPT and Transformer hand `generate` and `beam_search` (see decoding.py)

def _decoding_tokens(cfg, inputs) -> jax.Array:
  """Host-side checks of a decoding request's tokens `[B, L]`; returns them as int32."""
  inputs = jnp.asarray(inputs)
  check_tokens(inputs, cfg, 'inputs')
  lengths = np.asarray((inputs != cfg.pad_id).sum(axis=1))
  if (lengths == 0).any():
    raise ValueError(f'inputs row {int(np.argmin(lengths))} is all padding (pad_id={cfg.pad_id})')
  return inputs.astype(jnp.int32)


def _zeros_cache(model, *args):
  """An all-zero cache sized by `args`, built from shapes only (no parameter init is run)."""
  shapes = jax.eval_shape(functools.partial(model.init, decode=True), jax.random.key(0), *args)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])


def _decoder(cfg, step, cache, logits) -> Decoder:
  """The loops' view of a model whose cached apply is `step(cache, tokens [B, T]) ->
  (logits [B, T, V], cache)`, given the cache and first-token logits `[B, V]` after the prompt."""
  def tokens_to_logits(cache, tokens):
    logits, cache = step(cache, tokens[:, None])
    return logits[:, 0], cache

  return Decoder(cache=cache, logits=logits, tokens_to_logits=tokens_to_logits,
                 pad_id=cfg.pad_id, eos_id=cfg.eos_id,
                 # Under scan_layers the layer stack's cache is stacked on a leading layer axis.
                 cache_batch_axes={'decode_position': 0, 'decoder': int(cfg.scan_layers)},
                 beam_shared=('cross_key', 'cross_value'))


class GPT(nn.Module):
  """Decoder-only causal language model (GPT-2 with the `gpt2-small` preset).

  Reads `config.num_decoder_layers`. Decoder layers without cross-attention, pre- or post-norm.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens, *, deterministic=True, decode=False, capture_attention=False):
    """tokens `[B, T]` -> logits `[B, T, V]` (float32).

    `decode=True` (with `mutable=['cache']`) appends the tokens to the key/value cache and
    attends over it; tokens equal to `pad_id` are never attended to.
    """
    cfg = self.config
    check_tokens(tokens, cfg)
    valid = tokens != cfg.pad_id
    if decode:
      positions = DecodePosition(name='decode_position')(valid)
      mask = None  # the cache builds its own mask from the positions
    else:
      positions = token_positions(valid)
      mask = key_mask(valid)
    embed = layers.Embed(cfg, name='embed')
    x = layers.AddPositions(cfg, name='positions')(embed(tokens), positions)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = LayerStack(cfg, DecoderLayer, cfg.num_decoder_layers, name='decoder')(
        x, encoded=None, self_mask=mask, cross_mask=None, positions=positions,
        deterministic=deterministic, decode=decode, capture_attention=capture_attention)
    return _output_logits(cfg, embed, x, None if cfg.tie_embeddings else _lm_head(cfg, 'lm_head'))

  @nn.nowrap
  def check_decoding(self, prompts, max_new_tokens) -> jax.Array:
    """Host-side checks of a `generate`/`beam_search` request; returns prompts `[B, T]` int32."""
    cfg = self.config
    prompts = _decoding_tokens(cfg, prompts)
    # The last new token is only emitted, never fed back, so it needs no position of its own.
    if prompts.shape[1] + max_new_tokens - 1 > cfg.max_len:
      raise ValueError(f'{prompts.shape[1]} prompt tokens + max_new_tokens={max_new_tokens} '
                       f'exceed max_len={cfg.max_len}')
    return prompts

  @nn.nowrap
  def decoder_for(self, variables, prompts, max_new_tokens) -> Decoder:
    """Runs `prompts [B, T]` (pad_id padding on either side) into a fresh cache."""
    cfg = self.config
    batch, length = prompts.shape
    # Move padding to the right, so each prompt's last token is at its length - 1.
    order = jnp.argsort(prompts == cfg.pad_id, axis=1, stable=True)
    prompts = jnp.take_along_axis(prompts, order, axis=1)

    def step(cache, tokens):
      logits, mutated = self.apply({**variables, 'cache': cache}, tokens, decode=True,
                                   mutable=['cache'])
      return logits, mutated['cache']

    cache = _zeros_cache(self, jnp.zeros((batch, length + max_new_tokens - 1), jnp.int32))
    logits, cache = step(cache, prompts)
    last = (prompts != cfg.pad_id).sum(axis=1) - 1
    return _decoder(cfg, step, cache, logits[jnp.arange(batch), last])


class Transformer(nn.Module):
  """The encoder-decoder Transformer of "Attention Is All You Need".

  One embedding is shared by source, target and (with `tie_embeddings`) the output projection.
  """
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embed = layers.Embed(cfg)
    self.encoder_positions = layers.AddPositions(cfg)
    self.decoder_positions = layers.AddPositions(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    self.encoder = LayerStack(cfg, EncoderLayer, cfg.num_encoder_layers)
    self.decoder = LayerStack(cfg, DecoderLayer, cfg.num_decoder_layers)
    self.decode_position = DecodePosition()
    if not cfg.tie_embeddings:
      self.lm_head = _lm_head(cfg)

  def encode(self, src_tokens, *, deterministic=True, capture_attention=False):
    """src_tokens `[B, S]` -> encoded `[B, S, D]`."""
    cfg = self.config
    check_tokens(src_tokens, cfg, 'src_tokens')
    valid = src_tokens != cfg.pad_id
    positions = token_positions(valid)
    x = self.encoder_positions(self.embed(src_tokens), positions)
    x = self.dropout(x, deterministic=deterministic)
    return self.encoder(x, mask=key_mask(valid), positions=positions,
                        deterministic=deterministic, capture_attention=capture_attention)

  def decode(self, encoded, src_tokens, tgt_tokens, *, deterministic=True, decode=False,
             capture_attention=False):
    """encoded `[B, S, D]`, src_tokens `[B, S]`, tgt_tokens `[B, T]` -> logits `[B, T, V]`.

    `tgt_tokens` is the decoder input: the target shifted right, starting with `bos_id`.
    """
    cfg = self.config
    check_tokens(tgt_tokens, cfg, 'tgt_tokens')
    src_valid = src_tokens != cfg.pad_id
    tgt_valid = tgt_tokens != cfg.pad_id
    if decode:
      positions = self.decode_position(tgt_valid)
      self_mask = None
    else:
      positions = token_positions(tgt_valid)
      self_mask = key_mask(tgt_valid)
    cross_mask = key_mask(src_valid)
    x = self.decoder_positions(self.embed(tgt_tokens), positions)
    x = self.dropout(x, deterministic=deterministic)
    x = self.decoder(x, encoded=encoded, self_mask=self_mask, cross_mask=cross_mask,
                     positions=positions, deterministic=deterministic, decode=decode,
                     capture_attention=capture_attention)
    return _output_logits(cfg, self.embed, x, None if cfg.tie_embeddings else self.lm_head)

  def __call__(self, src_tokens, tgt_tokens, *, deterministic=True, decode=False,
               capture_attention=False):
    """src `[B, S]`, tgt (decoder input) `[B, T]` -> logits `[B, T, V]` (float32).

    `init(..., decode=True)` sizes the decoder's cache by `tgt_tokens`' length.
    """
    check_tokens(src_tokens, self.config, 'src_tokens')
    check_tokens(tgt_tokens, self.config, 'tgt_tokens')  # before the encoder runs
    if src_tokens.shape[0] != tgt_tokens.shape[0]:
      raise ValueError(f'src_tokens batch {src_tokens.shape[0]} != tgt_tokens batch '
                       f'{tgt_tokens.shape[0]}')
    encoded = self.encode(src_tokens, deterministic=deterministic,
                          capture_attention=capture_attention)
    return self.decode(encoded, src_tokens, tgt_tokens, deterministic=deterministic,
                       decode=decode, capture_attention=capture_attention)

  @nn.nowrap
  def check_decoding(self, src_tokens, max_new_tokens) -> jax.Array:
    """Host-side checks of a `generate`/`beam_search` request; returns the source int32."""
    cfg = self.config
    src_tokens = _decoding_tokens(cfg, src_tokens)
    # The decoder is fed BOS and every new token but the last.
    if max_new_tokens > cfg.max_len:
      raise ValueError(f'max_new_tokens={max_new_tokens} exceeds max_len={cfg.max_len}')
    return src_tokens

  @nn.nowrap
  def decoder_for(self, variables, src_tokens, max_new_tokens) -> Decoder:
    """Encodes `src_tokens [B, S]` once and feeds BOS into a fresh decoder cache."""
    cfg = self.config
    batch = src_tokens.shape[0]
    encoded = self.apply(variables, src_tokens, method='encode')

    def step(cache, tokens):
      logits, mutated = self.apply({**variables, 'cache': cache}, encoded, src_tokens, tokens,
                                   decode=True, mutable=['cache'], method='decode')
      return logits, mutated['cache']

    cache = _zeros_cache(self, src_tokens, jnp.zeros((batch, max_new_tokens), jnp.int32))
    logits, cache = step(cache, jnp.full((batch, 1), cfg.bos_id, jnp.int32))
    return _decoder(cfg, step, cache, logits[:, 0])


class MaskedLMHead(nn.Module):
  """BERT's masked-LM head: dense, gelu, norm, then the token embedding transposed plus a bias."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, hidden, embed: layers.Embed):
    """hidden `[B, T, D]` -> logits `[B, T, V]` (float32)."""
    cfg = self.config
    h = layers.dense_general(cfg, cfg.d_model, ('mlp', 'embed'), name='transform')(hidden)
    h = layers.norm(cfg, 'norm')(nn.gelu(h, approximate=False))
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ('vocab',)),
                      (cfg.vocab_size,), cfg.param_dtype)
    return (embed.attend(h) + bias).astype(jnp.float32)


class BertEncoder(nn.Module):
  """Encoder-only BERT: word + position + token-type embeddings, LayerNorm, encoder stack.

  `init(rng, tokens)` creates the backbone and the [CLS] pooler (BERT-base: 109,482,240
  parameters). The heads are methods: `mlm_logits` and `classify`; initialize with
  `method=BertEncoder.mlm_logits` (or `classify`) to create the head you will train.
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

  def __call__(self, tokens, token_types=None, *, deterministic=True, capture_attention=False):
    """tokens `[B, T]`, token_types `[B, T]` (default zeros) -> hidden `[B, T, D]`."""
    cfg = self.config
    check_tokens(tokens, cfg)
    if token_types is None:
      token_types = jnp.zeros_like(tokens)
    elif token_types.shape != tokens.shape:
      raise ValueError(f'token_types shape {token_types.shape} != tokens shape {tokens.shape}')
    elif not isinstance(token_types, jax.core.Tracer) and token_types.size:
      bad = np.asarray(token_types)
      bad = bad[(bad < 0) | (bad >= cfg.type_vocab_size)]
      if bad.size:
        raise ValueError(f'token_types holds {int(bad[0])}, outside [0, '
                         f'type_vocab_size={cfg.type_vocab_size})')
    valid = tokens != cfg.pad_id
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

  def mlm_logits(self, tokens, token_types=None, *, deterministic=True):
    """Masked-LM logits `[B, T, V]` (float32); the output matrix is the token embedding."""
    hidden = self(tokens, token_types, deterministic=deterministic)
    return self.mlm_head(hidden, self.embed)

  def classify(self, tokens, token_types=None, *, deterministic=True):
    """Sequence-classification logits `[B, num_labels]` (float32) from the pooled [CLS]."""
    hidden = self(tokens, token_types, deterministic=deterministic)
    pooled = self.dropout(self.pool(hidden), deterministic=deterministic)
    return self.classifier(pooled).astype(jnp.float32)
