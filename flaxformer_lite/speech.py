"""SpeechTransformer: speech recognition, log-mel features in, text out.

The encoder-decoder `Transformer` with an audio front end: features `[B, T, M]` (from
`audio.log_mel`) go through `audio.ConvFrontEnd` (two strided convolutions, 4x fewer frames with
the default `audio_strides=(2, 2)`; Whisper's are (1, 2)) and the encoder; the text decoder,
decoding and the cache are the Transformer's. Padding: `src_valid [B, T]` marks the real frames
of audio of different lengths (default: all).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import flax.linen as nn

from flaxformer_lite.audio import ConvFrontEnd, _downsampled
from flaxformer_lite.models import Transformer, key_mask, source_config, token_positions


def check_features(features, valid, cfg, name='features'):
  """Raises ValueError for features that are not `[B, T, num_mel_bins]` floats within
  max_source_len frames after down-sampling; returns (features, valid [B, T] bool)."""
  features = jnp.asarray(features)
  if features.ndim != 3 or features.shape[-1] != cfg.num_mel_bins:
    raise ValueError(f'{name} must be [batch, frames, num_mel_bins={cfg.num_mel_bins}]; got '
                     f'shape {features.shape}')
  if not jnp.issubdtype(features.dtype, jnp.floating):
    raise ValueError(f'{name} must be float log-mel features; got dtype {features.dtype}')
  frames = features.shape[1]
  for stride in cfg.audio_strides:
    frames = -(-frames // stride)
  limit = source_config(cfg).max_len
  if frames > limit:
    raise ValueError(f'{name} has {features.shape[1]} frames, {frames} after down-sampling: '
                     f'more than the encoder\'s {limit} positions')
  if valid is None:
    valid = jnp.ones(features.shape[:2], bool)
  elif jnp.shape(valid) != features.shape[:2]:
    raise ValueError(f'src_valid shape {jnp.shape(valid)} != features frames {features.shape[:2]}')
  return features, jnp.asarray(valid, bool)


class SpeechTransformer(Transformer):
  """Transformer whose source is audio: `apply(variables, features [B, T, M], tgt_tokens [B, L])`
  -> logits `[B, L, V]`; `encode(features)` -> `[B, T', D]`; `decode(encoded, features, tgt)`.
  `generate` / `beam_search` take features as their inputs (and `valid` for padded frames)."""

  def setup(self):
    super().setup()
    self.front_end = ConvFrontEnd(self.config)

  @nn.nowrap
  def frames_valid(self, src_valid):
    """The encoder's frame mask `[B, T']` from the features' `[B, T]`."""
    for stride in self.config.audio_strides:
      src_valid = _downsampled(src_valid, stride)
    return src_valid

  def encode(self, features, *, src_valid=None, deterministic=True, capture_attention=False):
    """features `[B, T, M]` -> encoded `[B, T', D]`."""
    features, valid = check_features(features, src_valid, self.config)
    x, valid = self.front_end(features, valid)
    positions = token_positions(valid)
    x = self.encoder_positions(x, positions)
    x = self.dropout(x, deterministic=deterministic)
    return self.encoder(x, mask=key_mask(valid), positions=positions,
                        deterministic=deterministic, capture_attention=capture_attention)

  def decode(self, encoded, features, tgt_tokens, *, src_valid=None, tgt_valid=None,
             deterministic=True, decode=False, capture_attention=False):
    """encoded `[B, T', D]`, features `[B, T, M]` (for its frame mask), tgt `[B, L]` -> logits."""
    valid = jnp.ones(jnp.shape(features)[:2], bool) if src_valid is None else src_valid
    return self._decode(encoded, self.frames_valid(valid), tgt_tokens, tgt_valid,
                        deterministic=deterministic, decode=decode,
                        capture_attention=capture_attention)

  def __call__(self, features, tgt_tokens, *, src_valid=None, tgt_valid=None,
               deterministic=True, decode=False, capture_attention=False):
    encoded = self.encode(features, src_valid=src_valid, deterministic=deterministic,
                          capture_attention=capture_attention)
    return self.decode(encoded, features, tgt_tokens, src_valid=src_valid, tgt_valid=tgt_valid,
                       deterministic=deterministic, decode=decode,
                       capture_attention=capture_attention)

  @nn.nowrap
  def check_decoding(self, features, max_new_tokens, valid=None):
    """Host-side checks of a `generate`/`beam_search` request -> (features `[B, T, M]` float32,
    valid `[B, T]` bool)."""
    cfg = self.config
    features, valid = check_features(features, valid, cfg)
    if not isinstance(valid, jax.core.Tracer) and not np.asarray(valid).any(axis=1).all():
      raise ValueError('features row with no valid frame')
    if max_new_tokens > cfg.max_len:
      raise ValueError(f'max_new_tokens={max_new_tokens} exceeds max_len={cfg.max_len}')
    return features.astype(jnp.float32), valid
