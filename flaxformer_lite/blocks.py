"""EncoderLayer, DecoderLayer and the layer stack (optionally under nn.remat and nn.scan)."""

from __future__ import annotations

import flax.linen as nn
import jax

from flaxformer_lite.attention import MultiHeadAttention
from flaxformer_lite.config import TransformerConfig
from flaxformer_lite import layers

REMAT_POLICIES = {'full': None, 'dots_saveable': jax.checkpoint_policies.dots_saveable}


def residual(cfg, x, fn, norm, drop, deterministic):
  """Post-norm `norm(x + drop(fn(x)))` (the paper) or pre-norm `x + drop(fn(norm(x)))`."""
  if cfg.norm_position == 'pre':
    return x + drop(fn(norm(x)), deterministic=deterministic)
  return norm(x + drop(fn(x), deterministic=deterministic))


class EncoderLayer(nn.Module):
  """Self-attention + feed-forward, each with a residual and a norm (the paper's encoder layer).

  The mode flags are attributes, set by `LayerStack`: `nn.remat` and `nn.scan` then see arrays
  only.
  """
  config: TransformerConfig
  deterministic: bool = True
  capture_attention: bool = False

  @nn.compact
  def __call__(self, x, mask, positions, relative_table=None):
    """x `[B, T, D]`, mask boolean `[B|1, 1, T|1, T]`, positions `[B, T]` -> `[B, T, D]`;
    relative_table `[buckets, N]`: the stack's relative position bias, if it has one."""
    cfg, deterministic = self.config, self.deterministic
    drop = nn.Dropout(cfg.dropout_rate)
    attn = MultiHeadAttention(cfg, name='self_attention')
    x = residual(
        cfg, x, lambda h: attn(h, mask=mask, positions=positions, deterministic=deterministic,
                          capture_attention=self.capture_attention,
                          relative_table=relative_table),
        layers.norm(cfg, 'norm_attention'), drop, deterministic)
    ff = layers.FeedForward(cfg, name='mlp')
    x = residual(cfg, x, lambda h: ff(h, deterministic), layers.norm(cfg, 'norm_mlp'), drop,
                 deterministic)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class DecoderLayer(nn.Module):
  """Masked self-attention + encoder-decoder attention + feed-forward (the paper's decoder layer).

  With `encoded=None` the cross-attention sublayer is absent: the decoder-only (GPT) block.
  `decode=True` attends over (and appends to) the key/value cache; the cross-attention's keys and
  values are projected once, at the first decoding step, and read from the cache after.
  """
  config: TransformerConfig
  deterministic: bool = True
  decode: bool = False
  capture_attention: bool = False

  @nn.compact
  def __call__(self, x, encoded, self_mask, cross_mask, positions, relative_table=None):
    """x `[B, T, D]`, encoded `[B, S, D]` or None, masks boolean `[B|1, 1, T|1, T|S]` (the self-
    attention is causal besides), positions `[B, T]` -> `[B, T, D]`; relative_table as in
    `EncoderLayer` (self-attention only, causal buckets)."""
    cfg, deterministic, capture = self.config, self.deterministic, self.capture_attention
    drop = nn.Dropout(cfg.dropout_rate)
    self_attn = MultiHeadAttention(cfg, name='self_attention')
    x = residual(
        cfg, x, lambda h: self_attn(h, mask=self_mask, is_causal=True, positions=positions,
                               decode=self.decode, deterministic=deterministic,
                               capture_attention=capture, relative_table=relative_table),
        layers.norm(cfg, 'norm_self_attention'), drop, deterministic)
    if encoded is not None:
      cross_attn = MultiHeadAttention(cfg, name='cross_attention')
      x = residual(
          cfg, x, lambda h: cross_attn(h, encoded, mask=cross_mask, decode=self.decode,
                                  deterministic=deterministic, capture_attention=capture),
          layers.norm(cfg, 'norm_cross_attention'), drop, deterministic)
    ff = layers.FeedForward(cfg, name='mlp')
    x = residual(cfg, x, lambda h: ff(h, deterministic), layers.norm(cfg, 'norm_mlp'), drop,
                 deterministic)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class LayerStack(nn.Module):
  """`num_layers` copies of `layer` applied in turn, then a final norm under pre-norm.

  `config.remat` wraps each layer in `nn.remat` (recompute activations in the backward pass);
  `config.scan_layers` runs them under `nn.scan`, parameters stacked on a leading 'layers' axis,
  so compile time does not grow with depth. All four combinations compute the same function.
  With `positions='relative'` the stack owns the relative position bias table its layers share.
  """
  config: TransformerConfig
  layer: type
  num_layers: int

  @nn.compact
  def __call__(self, x, *, deterministic=True, capture_attention=False, decode=False, **arrays):
    """x `[B, T, D]` -> `[B, T, D]`; `arrays` are the layer's array arguments by name (e.g.
    `mask=`, `positions=`); the flags become the layers' attributes (`decode` for decoder
    stacks only)."""
    cfg = self.config
    if cfg.positions == 'relative':  # one table for the stack, read by every layer (T5)
      arrays['relative_table'] = layers.relative_table(self, cfg)
    flags = dict(deterministic=deterministic, capture_attention=capture_attention)
    if decode:
      flags['decode'] = True
    layer_cls = self.layer
    if cfg.remat != 'none':
      layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat],
                           prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      def body(layer, carry, arrays):
        return layer(carry, **arrays), None
      scan = nn.scan(body, variable_axes={'params': 0, 'cache': 0, 'intermediates': 0},
                     split_rngs={'params': True, 'dropout': True}, in_axes=(nn.broadcast,),
                     length=self.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = scan(layer_cls(cfg, **flags, name='layers'), x, arrays)
    else:
      for i in range(self.num_layers):
        x = layer_cls(cfg, **flags, name=f'layers_{i}')(x, **arrays)
    if cfg.norm_position == 'pre':
      x = layers.norm(cfg, 'final_norm')(x)
    return x
