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
from flaxformer_lite import decoding
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


def source_config(cfg: TransformerConfig) -> TransformerConfig:
  """The config the encoder's positions read: `max_len` = `max_source_len` when set."""
  return cfg if cfg.max_source_len is None else cfg.replace(max_len=cfg.max_source_len)


def valid_tokens(tokens, valid, cfg: TransformerConfig, name: str = 'valid') -> jax.Array:
  """`[B, T]` bool, True for real tokens: `valid` as given (transformers' attention_mask),
  else the tokens that are not `pad_id` (all of them when the config has no pad token)."""
  if valid is not None:
    valid = jnp.asarray(valid)
    if valid.shape != tokens.shape:
      raise ValueError(f'{name} shape {valid.shape} != tokens shape {tokens.shape}')
    return valid.astype(bool)
  if cfg.pad_id is None:
    return jnp.ones(tokens.shape, bool)
  return tokens != cfg.pad_id


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


def _logits_bias(module: nn.Module, cfg) -> jax.Array | None:
  """Marian's and BART's `final_logits_bias [V]` (None without one)."""
  if not cfg.final_logits_bias:
    return None
  return module.param('final_logits_bias',
                      nn.with_logical_partitioning(nn.initializers.zeros_init(), ('vocab',)),
                      (cfg.vocab_size,), cfg.param_dtype)


def _output_logits(cfg, embed, x, lm_head=None, bias=None):
  """`[B, T, D]` -> float32 logits, through the tied embedding or `lm_head`, plus `bias`."""
  if cfg.scale_tied_output:
    x = x * jnp.asarray(cfg.d_model ** -0.5, x.dtype)
  logits = embed.attend(x) if cfg.tie_embeddings else lm_head(x)
  if bias is not None:
    logits = logits + jnp.asarray(bias, logits.dtype)
  # Losses and sampling want float32 logits whatever the compute dtype.
  return nn.with_logical_constraint(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))


# ------------------------------------------------------------------------------------------------
# decoding: what GPT and Transformer hand `generate` and `beam_search` (see decoding.py)

def _decoding_inputs(cfg, inputs, valid) -> tuple[jax.Array, jax.Array]:
  """Host-side checks of a decoding request: tokens `[B, L]` and which are real (`valid`, or
  not `pad_id`). Returns both, int32 and bool, as the loops' pytree of inputs."""
  inputs = jnp.asarray(inputs)
  check_tokens(inputs, cfg, 'inputs')
  valid = valid_tokens(inputs, valid, cfg)
  lengths = np.asarray(valid.sum(axis=1))
  if (lengths == 0).any():
    raise ValueError(f'inputs row {int(np.argmin(lengths))} is all padding (pad_id={cfg.pad_id}'
                     f'{"" if cfg.pad_id is not None else ", or valid False everywhere"})')
  return inputs.astype(jnp.int32), valid


def _zeros_cache(model, *args):
  """An all-zero cache sized by `args`, built from shapes only (no parameter init is run)."""
  shapes = jax.eval_shape(functools.partial(model.init, decode=True), jax.random.key(0), *args)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])


def _decoder(cfg, step, cache, logits, prefix) -> Decoder:
  """The loops' view of a model whose cached apply is `step(cache, tokens [B, T]) ->
  (logits [B, T, V], cache)`, given the cache and first-token logits `[B, V]` after the prompt,
  and `prefix [B, P]`: the tokens before the first new one, as transformers counts them."""
  def tokens_to_logits(cache, tokens):
    logits, cache = step(cache, tokens[:, None])
    return logits[:, 0], cache

  # Without a pad token, finished rows are filled with eos_id, and nothing is banned.
  fill = cfg.eos_id if cfg.pad_id is None else cfg.pad_id
  return Decoder(cache=cache, logits=logits, tokens_to_logits=tokens_to_logits,
                 pad_id=fill, eos_id=cfg.eos_id, prefix=prefix,
                 banned_ids=() if cfg.pad_id is None else (cfg.pad_id,),
                 # Under scan_layers the layer stack's cache is stacked on a leading layer axis.
                 cache_batch_axes={'decode_position': 0, 'decoder': int(cfg.scan_layers)},
                 beam_shared=('cross_key', 'cross_value'))


class GPT(nn.Module):
  """Decoder-only causal language model (GPT-2 with the `gpt2-small` preset).

  Reads `config.num_decoder_layers`. Decoder layers without cross-attention, pre- or post-norm.
  `generation`: the defaults of `generate`/`beam_search` for this model (a checkpoint's
  generation config; None: the functions' own defaults).
  """
  config: TransformerConfig
  generation: decoding.GenerationSettings | None = None

  @nn.compact
  def __call__(self, tokens, *, valid=None, deterministic=True, decode=False,
               capture_attention=False):
    """tokens `[B, T]` -> logits `[B, T, V]` (float32).

    `valid [B, T]` bool marks the real tokens (default: those not equal to `pad_id`); the others
    are never attended to and take no position. `decode=True` (with `mutable=['cache']`)
    appends the tokens to the key/value cache and attends over it.
    """
    cfg = self.config
    check_tokens(tokens, cfg)
    valid = valid_tokens(tokens, valid, cfg)
    if decode:
      positions = DecodePosition(name='decode_position')(valid)
      mask = None  # the cache builds its own mask from the positions
    else:
      positions = token_positions(valid)
      mask = key_mask(valid)
    embed = layers.Embed(cfg, name='embed')
    x = layers.AddPositions(cfg, name='positions')(embed(tokens), positions)
    if cfg.embed_norm:
      x = layers.norm(cfg, 'embed_norm')(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = LayerStack(cfg, DecoderLayer, cfg.num_decoder_layers, name='decoder')(
        x, encoded=None, self_mask=mask, cross_mask=None, positions=positions,
        deterministic=deterministic, decode=decode, capture_attention=capture_attention)
    lm_head = None if cfg.tie_embeddings else _lm_head(cfg, 'lm_head')
    return _output_logits(cfg, embed, x, lm_head, _logits_bias(self, cfg))

  @nn.nowrap
  def check_decoding(self, prompts, max_new_tokens, valid=None):
    """Host-side checks of a `generate`/`beam_search` request -> (prompts `[B, T]` int32,
    valid `[B, T]` bool)."""
    cfg = self.config
    prompts, valid = _decoding_inputs(cfg, prompts, valid)
    # The last new token is only emitted, never fed back, so it needs no position of its own.
    if prompts.shape[1] + max_new_tokens - 1 > cfg.max_len:
      raise ValueError(f'{prompts.shape[1]} prompt tokens + max_new_tokens={max_new_tokens} '
                       f'exceed max_len={cfg.max_len}')
    return prompts, valid

  @nn.nowrap
  def decoder_for(self, variables, inputs, max_new_tokens) -> Decoder:
    """Runs the prompts (`inputs`: `(tokens [B, T], valid [B, T])`, padding on either side)
    into a fresh cache."""
    cfg = self.config
    given, valid = inputs
    batch, length = given.shape
    # Move padding to the right, so each prompt's last token is at its length - 1.
    order = jnp.argsort(~valid, axis=1, stable=True)
    prompts = jnp.take_along_axis(given, order, axis=1)
    valid = jnp.take_along_axis(valid, order, axis=1)

    def step(cache, tokens, valid=None):
      # Fed tokens are real: a finished row's filler is never read back.
      valid = jnp.ones(tokens.shape, bool) if valid is None else valid
      logits, mutated = self.apply({**variables, 'cache': cache}, tokens, valid=valid,
                                   decode=True, mutable=['cache'])
      return logits, mutated['cache']

    cache = _zeros_cache(self, jnp.zeros((batch, length + max_new_tokens - 1), jnp.int32))
    logits, cache = step(cache, prompts, valid)
    last = valid.sum(axis=1) - 1
    return _decoder(cfg, step, cache, logits[jnp.arange(batch), last], prefix=given)


class Transformer(nn.Module):
  """The encoder-decoder Transformer of "Attention Is All You Need".

  One embedding is shared by source, target and (with `tie_embeddings`) the output projection.
  Padding: `src_valid`/`tgt_valid [B, S|T]` bool mark the real tokens (default: not `pad_id`).
  `generation`: as in `GPT`.
  """
  config: TransformerConfig
  generation: decoding.GenerationSettings | None = None

  def setup(self):
    cfg = self.config
    self.embed = layers.Embed(cfg)
    self.encoder_positions = layers.AddPositions(source_config(cfg))
    self.decoder_positions = layers.AddPositions(cfg)
    if cfg.embed_norm:  # BART: one per stack
      self.encoder_embed_norm = layers.norm(cfg)
      self.decoder_embed_norm = layers.norm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    self.encoder = LayerStack(cfg, EncoderLayer, cfg.num_encoder_layers)
    self.decoder = LayerStack(cfg, DecoderLayer, cfg.num_decoder_layers)
    self.decode_position = DecodePosition()
    if not cfg.tie_embeddings:
      self.lm_head = _lm_head(cfg)
    self.final_logits_bias = _logits_bias(self, cfg)

  def _embed(self, tokens, positions, add_positions, norm_name, deterministic):
    x = add_positions(self.embed(tokens), positions)
    if self.config.embed_norm:
      x = getattr(self, norm_name)(x)
    return self.dropout(x, deterministic=deterministic)

  def encode(self, src_tokens, *, src_valid=None, deterministic=True, capture_attention=False):
    """src_tokens `[B, S]` -> encoded `[B, S, D]`."""
    cfg = self.config
    check_tokens(src_tokens, source_config(cfg), 'src_tokens')
    valid = valid_tokens(src_tokens, src_valid, cfg, 'src_valid')
    positions = token_positions(valid)
    x = self._embed(src_tokens, positions, self.encoder_positions, 'encoder_embed_norm',
                    deterministic)
    return self.encoder(x, mask=key_mask(valid), positions=positions,
                        deterministic=deterministic, capture_attention=capture_attention)

  def decode(self, encoded, src_tokens, tgt_tokens, *, src_valid=None, tgt_valid=None,
             deterministic=True, decode=False, capture_attention=False):
    """encoded `[B, S, D]`, src_tokens `[B, S]`, tgt_tokens `[B, T]` -> logits `[B, T, V]`.

    `tgt_tokens` is the decoder input: the target shifted right, starting with the decoder start
    token (`decoder_start_id`, default `bos_id`).
    """
    src_valid = valid_tokens(src_tokens, src_valid, self.config, 'src_valid')
    return self._decode(encoded, src_valid, tgt_tokens, tgt_valid, deterministic=deterministic,
                        decode=decode, capture_attention=capture_attention)

  def _decode(self, encoded, src_valid, tgt_tokens, tgt_valid, *, deterministic, decode,
              capture_attention):
    """The decoder over `encoded [B, S, D]` whose real positions are `src_valid [B, S]`."""
    cfg = self.config
    check_tokens(tgt_tokens, cfg, 'tgt_tokens')
    tgt_valid = valid_tokens(tgt_tokens, tgt_valid, cfg, 'tgt_valid')
    if decode:
      positions = self.decode_position(tgt_valid)
      self_mask = None
    else:
      positions = token_positions(tgt_valid)
      self_mask = key_mask(tgt_valid)
    x = self._embed(tgt_tokens, positions, self.decoder_positions, 'decoder_embed_norm',
                    deterministic)
    x = self.decoder(x, encoded=encoded, self_mask=self_mask, cross_mask=key_mask(src_valid),
                     positions=positions, deterministic=deterministic, decode=decode,
                     capture_attention=capture_attention)
    return _output_logits(cfg, self.embed, x, None if cfg.tie_embeddings else self.lm_head,
                          self.final_logits_bias)

  def __call__(self, src_tokens, tgt_tokens, *, src_valid=None, tgt_valid=None,
               deterministic=True, decode=False, capture_attention=False):
    """src `[B, S]`, tgt (decoder input) `[B, T]` -> logits `[B, T, V]` (float32).

    `init(..., decode=True)` sizes the decoder's cache by `tgt_tokens`' length.
    """
    check_tokens(src_tokens, source_config(self.config), 'src_tokens')
    check_tokens(tgt_tokens, self.config, 'tgt_tokens')  # before the encoder runs
    if src_tokens.shape[0] != tgt_tokens.shape[0]:
      raise ValueError(f'src_tokens batch {src_tokens.shape[0]} != tgt_tokens batch '
                       f'{tgt_tokens.shape[0]}')
    encoded = self.encode(src_tokens, src_valid=src_valid, deterministic=deterministic,
                          capture_attention=capture_attention)
    return self.decode(encoded, src_tokens, tgt_tokens, src_valid=src_valid,
                       tgt_valid=tgt_valid, deterministic=deterministic, decode=decode,
                       capture_attention=capture_attention)

  @nn.nowrap
  def check_decoding(self, src_tokens, max_new_tokens, valid=None):
    """Host-side checks of a `generate`/`beam_search` request -> (source `[B, S]` int32,
    valid `[B, S]` bool)."""
    cfg = self.config
    inputs = _decoding_inputs(source_config(cfg), src_tokens, valid)
    # The decoder is fed its start token and every new token but the last.
    if max_new_tokens > cfg.max_len:
      raise ValueError(f'max_new_tokens={max_new_tokens} exceeds max_len={cfg.max_len}')
    return inputs

  @nn.nowrap
  def decoder_for(self, variables, inputs, max_new_tokens) -> Decoder:
    """Encodes the source (`inputs`: `(tokens [B, S], valid [B, S])`) once and feeds the
    decoder start token into a fresh decoder cache."""
    cfg = self.config
    src_tokens, src_valid = inputs
    batch = src_tokens.shape[0]
    encoded = self.apply(variables, src_tokens, src_valid=src_valid, method='encode')

    def step(cache, tokens):
      # Fed tokens are real (the start token may equal pad_id); a finished row's filler is
      # never read back.
      logits, mutated = self.apply({**variables, 'cache': cache}, encoded, src_tokens, tokens,
                                   src_valid=src_valid, tgt_valid=jnp.ones(tokens.shape, bool),
                                   decode=True, mutable=['cache'], method='decode')
      return logits, mutated['cache']

    cache = _zeros_cache(self, src_tokens, jnp.zeros((batch, max_new_tokens), jnp.int32))
    start = cfg.bos_id if cfg.decoder_start_id is None else cfg.decoder_start_id
    prefix = jnp.full((batch, 1), start, jnp.int32)
    logits, cache = step(cache, prefix)
    return _decoder(cfg, step, cache, logits[:, 0], prefix)
