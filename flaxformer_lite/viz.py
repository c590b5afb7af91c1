"""Attention-map plots: collect the weights a model sows and draw them as labelled heat-maps.

    logits, state = model.apply(variables, tokens, capture_attention=True,
                                mutable=['intermediates'])
    maps = collect_attention(state)              # {'decoder/layers_0/self_attention': [B, N, T, S]}
    plot_attention(maps['decoder/layers_0/self_attention'][0], keys, queries, 'attention.png')

Drawing uses matplotlib's object-oriented API on an Agg canvas: no display is needed and the
process-wide pyplot backend is left alone.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Readable layout limits (inches): each label gets `_INCH_PER_LABEL`, a panel is clamped to
# [_MIN_PANEL, _MAX_PANEL], and at most `_MAX_TICKS` labels are written per axis.
_INCH_PER_LABEL = 0.28
_MIN_PANEL = 2.5
_MAX_PANEL = 12.0
_MAX_TICKS = 64
_MAX_COLUMNS = 4


def _natural_key(name: str):
  """'layers_10' sorts after 'layers_9'."""
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def collect_attention(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Flattens sown attention weights into `{'decoder/layers_0/self_attention': [B, N, T, S]}`.

  Args:
    intermediates: the state returned by `apply(..., capture_attention=True,
      mutable=['intermediates'])`, either whole (`{'intermediates': {...}}`) or the collection
      itself. Each `MultiHeadAttention` sows `attention_weights` as a tuple with one entry per call.
  Returns:
    One `[B, N, T, S]` array per attention module, keyed by its module path, in natural order.
    Under `scan_layers=True` the stacked `layers` weights `[L, B, N, T, S]` are split into
    `layers_0 .. layers_{L-1}`, so both layouts give the same keys and values. A module called
    more than once in the same `apply` gives one key per call, suffixed `/call_0`, `/call_1`, ...
  """
  if not isinstance(intermediates, Mapping):
    raise ValueError(f'intermediates must be a mapping; got {type(intermediates).__name__}')
  if set(intermediates) == {'intermediates'}:
    intermediates = intermediates['intermediates']

  out: dict[str, jax.Array] = {}

  def add(path: list[str], weights) -> None:
    weights = jnp.asarray(weights)
    if weights.ndim == 4:
      out['/'.join(path)] = weights
      return
    # nn.scan stacks its layers on a leading axis: the module path names them 'layers'.
    scanned = [i for i, name in enumerate(path) if name == 'layers']
    if weights.ndim != 5 or not scanned:
      raise ValueError(f'attention weights at {"/".join(path)!r} have shape {weights.shape}; '
                       'expected [batch, heads, q_len, kv_len] or a scanned [layers, ...] stack')
    at = scanned[0]
    for layer in range(weights.shape[0]):
      add(path[:at] + [f'layers_{layer}'] + path[at + 1:], weights[layer])

  def walk(node: Mapping, path: list[str]) -> None:
    for name, child in node.items():
      if name == 'attention_weights':
        calls = child if isinstance(child, (tuple, list)) else (child,)
        if len(calls) == 1:
          add(path, calls[0])
        else:
          for i, weights in enumerate(calls):
            add(path + [f'call_{i}'], weights)
      elif isinstance(child, Mapping):
        walk(child, path + [str(name)])

  walk(intermediates, [])
  return {key: out[key] for key in sorted(out, key=_natural_key)}


def _check_labels(labels: Sequence, expected: int, what: str, axis_name: str) -> list[str]:
  labels = [str(label) for label in labels]
  if len(labels) != expected:
    raise ValueError(f'{what} has {len(labels)} labels but the weights have {expected} '
                     f'{axis_name}')
  return labels


def _panel_size(n_labels: int) -> float:
  return min(_MAX_PANEL, max(_MIN_PANEL, 1.0 + _INCH_PER_LABEL * min(n_labels, _MAX_TICKS)))


def _set_ticks(set_ticks, set_labels, labels: list[str], **kwargs) -> None:
  step = max(1, math.ceil(len(labels) / _MAX_TICKS))
  positions = list(range(0, len(labels), step))
  set_ticks(positions)
  set_labels([labels[i] for i in positions], **kwargs)


def plot_attention(weights, x_labels: Sequence, y_labels: Sequence, path, *,
                   title: str | None = None):
  """Writes a labelled heat-map of attention weights to `path` (PNG) and returns `path`.

  Args:
    weights: `[q_len, kv_len]` (one head) or `[heads, q_len, kv_len]` (one panel per head, in a
      grid of at most four columns). Any array type numpy can read, e.g. one entry of
      `collect_attention(...)[name][example]`.
    x_labels: one label per key (columns), e.g. the source tokens.
    y_labels: one label per query (rows), e.g. the target tokens.
    path: where to write the image; its folder is created if missing.
    title: drawn above the whole figure.
  Raises:
    ValueError: for weights that are not 2-D or 3-D, or label counts that do not match them.
  """
  w = np.asarray(jax.device_get(weights), dtype=np.float32)
  if w.ndim == 2:
    w = w[None]
    single = True
  elif w.ndim == 3:
    single = False
  else:
    raise ValueError(f'weights must be [q_len, kv_len] or [heads, q_len, kv_len]; got shape '
                     f'{w.shape}')
  heads, q_len, kv_len = w.shape
  if heads == 0:
    raise ValueError(f'weights have no heads; got shape {w.shape}')
  x_labels = _check_labels(x_labels, kv_len, 'x_labels', f'keys (kv_len, shape {w.shape})')
  y_labels = _check_labels(y_labels, q_len, 'y_labels', f'queries (q_len, shape {w.shape})')

  from matplotlib.figure import Figure  # imported here: the library does not need it otherwise

  columns = min(heads, _MAX_COLUMNS)
  rows = math.ceil(heads / columns)
  panel_w, panel_h = _panel_size(kv_len), _panel_size(q_len)
  fig = Figure(figsize=(columns * panel_w + 1.0, rows * panel_h + (0.6 if title else 0.2)),
               layout='constrained')
  axes = fig.subplots(rows, columns, squeeze=False)
  finite = w[np.isfinite(w)]
  vmin = min(0.0, float(finite.min())) if finite.size else 0.0
  vmax = float(finite.max()) if finite.size else 1.0
  vmax = vmax if vmax > vmin else vmin + 1.0
  image = None
  for head, ax in enumerate(axes.flat):
    if head >= heads:
      ax.set_axis_off()
      continue
    image = ax.imshow(w[head], cmap='viridis', vmin=vmin, vmax=vmax, aspect='auto',
                      interpolation='nearest')
    _set_ticks(ax.set_xticks, ax.set_xticklabels, x_labels, rotation=90, fontsize=8)
    _set_ticks(ax.set_yticks, ax.set_yticklabels, y_labels, fontsize=8)
    ax.set_xlabel('keys')
    if head % columns == 0:
      ax.set_ylabel('queries')
    if not single:
      ax.set_title(f'head {head}', fontsize=10)
  fig.colorbar(image, ax=axes, shrink=0.8)
  if title:
    fig.suptitle(title)
  folder = os.path.dirname(os.fspath(path))
  if folder:
    os.makedirs(folder, exist_ok=True)
  fig.savefig(path, format='png', dpi=100)
  return path
