"""How Hugging Face checkpoints map onto our models: configs both ways, and one rule a tensor.

An architecture is a `Layout`: `config_from_hf` (the checkpoint's config.json -> our model,
refusing by name what we cannot compute), `config_to_hf` (the reverse) and `tensors(model)`, a
list of `Tensor` rules. A rule names one of our parameters, the checkpoint tensors it is made of,
and the exact (reshape / transpose / stack) functions both ways, so a round trip keeps every bit.

Checkpoint names are written as the head model saves them (`transformer.h.0...`,
`model.encoder...`, `bert.embeddings...`); `base_prefix` is the part a bare base model
(`GPT2Model`, `BertModel`, `BartModel`) leaves out. torch `Linear` weights are `[out, in]`:
our kernels are `[in, *out]` with heads split out, e.g. a query kernel `[D, N, H]`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from flaxformer_lite.bert import BertEncoder
from flaxformer_lite.config import TransformerConfig
from flaxformer_lite.models import GPT, Transformer


@dataclasses.dataclass(frozen=True)
class Tensor:
  """Our parameter `ours` ('a/b/kernel') = to_ours(*checkpoint tensors `hf`); `to_hf` inverts."""
  ours: str
  hf: tuple[str, ...]
  to_ours: Callable[..., np.ndarray]
  to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  optional: bool = False  # may be absent (a pooler): then ours is left out too


def same(ours, hf, **kw):
  return Tensor(ours, (hf,), lambda x: x, lambda x: (x,), **kw)


def linear(ours, hf, *out_shape, **kw):
  """torch Linear weight `[out, in]` -> kernel `[in, *out_shape]` (out_shape: its split)."""
  def to_ours(w):
    return np.ascontiguousarray(w.T).reshape(w.shape[1], *(out_shape or (w.shape[0],)))
  return Tensor(ours, (hf,), to_ours,
                lambda k: (np.ascontiguousarray(k.reshape(k.shape[0], -1).T),), **kw)


def linear_in(ours, hf, *in_shape):
  """torch Linear weight `[out, in]` -> kernel `[*in_shape, out]` (an attention output)."""
  return Tensor(ours, (hf,), lambda w: np.ascontiguousarray(w.T).reshape(*in_shape, w.shape[0]),
                lambda k: (np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T),))


def reshaped(ours, hf, *shape, hf_shape=(-1,)):
  """A tensor whose values are ours in another shape: ours `shape`, theirs `hf_shape` (GPT-2's
  Conv1D weights, biases)."""
  return Tensor(ours, (hf,), lambda x: x.reshape(shape), lambda x: (x.reshape(hf_shape),))


def stacked(ours, hfs, *shape, weights=True):
  """Several Linear weights `[out, in]` (q, k, v) -> one kernel `[in, len(hfs), *shape]`; or
  their biases `[out]` -> `[len(hfs), *shape]`."""
  n = len(hfs)
  if weights:
    return Tensor(ours, tuple(hfs),
                  lambda *ws: np.stack([np.ascontiguousarray(w.T).reshape(w.shape[1], *shape)
                                        for w in ws], axis=1),
                  lambda k: tuple(np.ascontiguousarray(k[:, i].reshape(k.shape[0], -1).T)
                                  for i in range(n)))
  return Tensor(ours, tuple(hfs), lambda *bs: np.stack([b.reshape(shape) for b in bs]),
                lambda b: tuple(b[i].reshape(-1) for i in range(n)))


def norm(ours, hf, bias=True):
  rules = [same(f'{ours}/scale', f'{hf}.weight')]
  return rules + ([same(f'{ours}/bias', f'{hf}.bias')] if bias else [])


def dense(ours, hf, *out_shape, bias=True, optional=False):
  """A Linear layer: kernel (split to out_shape) and bias."""
  rules = [linear(f'{ours}/kernel', f'{hf}.weight', *out_shape, optional=optional)]
  if bias:
    rules.append(reshaped(f'{ours}/bias', f'{hf}.bias', *(out_shape or (-1,))))
    rules[-1] = dataclasses.replace(rules[-1], optional=optional)
  return rules


def refuse(hf: dict, name: str, allowed, why: str = '') -> None:
  """ValueError naming a config option we cannot honour."""
  value = hf.get(name, allowed[0] if isinstance(allowed, (list, tuple)) else allowed)
  ok = value in allowed if isinstance(allowed, (list, tuple)) else value == allowed
  if not ok:
    raise ValueError(f'{hf.get("model_type")} config {name}={value!r} is not supported '
                     f'(supported: {allowed!r}){": " + why if why else ""}')


def activation_from_hf(name: str) -> str:
  table = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
           'relu': 'relu', 'silu': 'silu', 'swish': 'silu'}
  if name not in table:
    raise ValueError(f'activation {name!r} is not supported (supported: {sorted(table)})')
  return table[name]


ACTIVATION_TO_HF = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu', 'silu': 'swish'}


def token_ids(hf: dict, vocab: int) -> dict:
  """Our pad/bos/eos/decoder-start fields from a config's token ids (None where absent)."""
  def get(key, default=None):
    value = hf.get(key, default)
    if isinstance(value, list):
      if len(value) != 1:
        raise ValueError(f'{key}={value} lists several ids; one is supported')
      value = value[0]
    if value is not None and not 0 <= value < vocab:
      raise ValueError(f'{key}={value} is outside the vocabulary [0, {vocab})')
    return value
  eos = get('eos_token_id')
  if eos is None:
    raise ValueError('eos_token_id is not set: decoding needs an end token')
  bos = get('bos_token_id')
  return dict(pad_id=get('pad_token_id'), bos_id=eos if bos is None else bos, eos_id=eos,
              decoder_start_id=get('decoder_start_token_id'))


def ids_to_hf(cfg: TransformerConfig) -> dict:
  out = dict(pad_token_id=cfg.pad_id, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id)
  if cfg.decoder_start_id is not None:
    out['decoder_start_token_id'] = cfg.decoder_start_id
  return out


def check_representable(cfg: TransformerConfig, arch: str, **expected) -> None:
  """ValueError naming the first of our settings a checkpoint of `arch` cannot hold."""
  for name, allowed in expected.items():
    value = getattr(cfg, name)
    if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
      raise ValueError(f'{arch} cannot hold {name}={value!r} (it needs {allowed!r})')


@dataclasses.dataclass(frozen=True)
class Layout:
  model_types: tuple[str, ...]
  base_prefix: str
  config_from_hf: Callable[[dict], object]  # -> a model (GPT / BertEncoder / Transformer)
  config_to_hf: Callable[[object, dict], dict]  # (model, params) -> config.json dict
  tensors: Callable[..., list]  # (model, head) -> [Tensor]; head: a BERT head or None


def family_of(model) -> type:
  for cls in (GPT, BertEncoder, Transformer):
    if isinstance(model, cls):
      return cls
  raise ValueError(f'{type(model).__name__} is not one of our model families')
