"""GenerationSettings: a model's decoding defaults, as transformers' generation_config.json holds
them (our names), read and written both ways; and how a `generate` / `beam_search` request
resolves against them on the host: explicit arguments override a model's `generation`
attribute, and the model family checks its inputs."""

from __future__ import annotations

import dataclasses
import inspect

import jax
import numpy as np

from flaxformer_lite.processors import Rules


def _check_int(name, value, minimum, optional=False):
  if optional and value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name}={value!r} must be an integer >= {minimum}')
  return int(value)


def _check_early_stopping(value):
  if not (isinstance(value, bool) or value == 'never'):
    raise ValueError(f"early_stopping={value!r} must be True, False or 'never'")
  return value


def _check_ids(name, ids):
  if ids is None:
    return None
  ids = tuple(ids) if isinstance(ids, (tuple, list)) else (ids,)
  return tuple(_check_int(name, t, 0) for t in ids)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """A model's decoding defaults: transformers' generation_config.json fields, our names.

  `max_length` and `min_length` count the prefix as transformers does (decoder-only: the padded
  prompt; encoder-decoder: the start token); `max_new_tokens` wins over `max_length`.
  `banned_ids` (transformers' single-token bad_words_ids) None: the family's default bans.
  With `do_sample` False decoding is greedy (or beam search when num_beams > 1) whatever the
  sampling fields say; `top_k` 0 / None and `top_p` 1.0 turn those filters off.
  """
  max_length: int | None = None
  max_new_tokens: int | None = None
  min_length: int = 0
  min_new_tokens: int | None = None  # when set, replaces min_length (as in transformers)
  num_beams: int = 1
  length_penalty: float = 1.0
  early_stopping: bool | str = False
  no_repeat_ngram_size: int = 0
  forced_bos_id: int | None = None
  forced_eos_id: int | None = None
  banned_ids: tuple[int, ...] | None = None
  do_sample: bool = False
  temperature: float = 1.0
  top_k: int | None = 50
  top_p: float = 1.0

  def __post_init__(self):
    for name, minimum in (('max_length', 1), ('max_new_tokens', 1), ('min_new_tokens', 0),
                          ('top_k', 0), ('forced_bos_id', 0), ('forced_eos_id', 0)):
      _check_int(name, getattr(self, name), minimum, optional=True)
    for name, minimum in (('min_length', 0), ('num_beams', 1), ('no_repeat_ngram_size', 0)):
      _check_int(name, getattr(self, name), minimum)
    object.__setattr__(self, 'banned_ids', _check_ids('banned_ids', self.banned_ids))
    _check_early_stopping(self.early_stopping)
    if self.do_sample and not self.temperature > 0:
      raise ValueError(f'temperature={self.temperature} must be > 0 when do_sample is True')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p={self.top_p} must be in (0, 1]')
    if self.do_sample and self.num_beams > 1:
      raise ValueError(f'do_sample with num_beams={self.num_beams} (beam sampling) is not '
                       f'supported')

  @classmethod
  def from_hf(cls, config: dict) -> GenerationSettings:
    """Maps a transformers generation_config.json dict; raises ValueError naming a setting we
    cannot honour. Token ids and bookkeeping (pad/bos/decoder start, use_cache, output_*) and
    keys transformers' own generate() ignores are ignored."""
    for key, neutral in _HF_NEUTRAL.items():
      value = config.get(key)
      if value is not None and not any(value == n and type(value) is type(n) for n in neutral):
        raise ValueError(f'generation config {key}={value!r} is not supported')
    eos = config.get('eos_token_id')
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if len(set(eos)) > 1:
      raise ValueError(f'generation config eos_token_id={eos!r}: one eos token is supported')
    fields = {ours: config[theirs] for theirs, ours in _HF_NAMES.items()
              if config.get(theirs) is not None}
    for name in ('forced_bos_id', 'forced_eos_id'):
      value = fields.get(name)
      if isinstance(value, list):
        if len(value) != 1:
          raise ValueError(f'generation config {name}={value!r}: one token is supported')
        fields[name] = value[0]
    bad = config.get('bad_words_ids')
    if bad is not None:
      if any(not isinstance(ids, (list, tuple)) or len(ids) != 1 for ids in bad):
        raise ValueError(f'generation config bad_words_ids={bad!r}: multi-token bad words are '
                         f'not supported')
      # transformers' NoBadWordsLogitsProcessor drops eos from the bad words.
      fields['banned_ids'] = tuple(ids[0] for ids in bad if ids[0] not in eos)
    else:
      fields['banned_ids'] = ()  # transformers bans nothing by default
    return cls(**fields)

  def to_hf(self) -> dict:
    """The generation_config.json dict (from_hf's inverse). banned_ids None (the family's own
    bans, which transformers does not know) writes no bad_words_ids."""
    out = {theirs: getattr(self, ours) for theirs, ours in _HF_NAMES.items()
           if getattr(self, ours) is not None}
    if self.banned_ids:
      out['bad_words_ids'] = [[t] for t in self.banned_ids]
    return out


_HF_NAMES = {name: name for name in (
    'max_length', 'max_new_tokens', 'min_length', 'min_new_tokens', 'num_beams',
    'length_penalty', 'early_stopping', 'no_repeat_ngram_size', 'do_sample', 'temperature',
    'top_k', 'top_p')}
_HF_NAMES.update(forced_bos_token_id='forced_bos_id', forced_eos_token_id='forced_eos_id')
# Settings whose effect we do not implement: accepted only at values that turn them off.
_HF_NEUTRAL = {
    'repetition_penalty': (1.0, 1), 'encoder_repetition_penalty': (1.0, 1),
    'num_beam_groups': (1,), 'diversity_penalty': (0.0, 0), 'constraints': (),
    'force_words_ids': (), 'forced_decoder_ids': (), 'typical_p': (1.0, 1),
    'epsilon_cutoff': (0.0, 0), 'eta_cutoff': (0.0, 0), 'min_p': (), 'top_h': (),
    'encoder_no_repeat_ngram_size': (0,), 'exponential_decay_length_penalty': (),
    'suppress_tokens': (), 'begin_suppress_tokens': (), 'sequence_bias': (),
    'guidance_scale': (1.0, 1), 'penalty_alpha': (), 'dola_layers': (),
    'watermarking_config': (), 'stop_strings': (), 'max_time': (), 'num_return_sequences': (1,),
    'renormalize_logits': (False,), 'remove_invalid_values': (False,), 'low_memory': (False,),
    'token_healing': (False,), 'prompt_lookup_num_tokens': (), 'use_mtp': (False,),
}


_NO_SETTINGS = GenerationSettings(top_k=None)  # a model without settings: no top-k filter


def _settings(model) -> GenerationSettings:
  settings = getattr(model, 'generation', None)
  return _NO_SETTINGS if settings is None else settings


def _pick(value, default):
  return default if value is None else value


def _rules(settings, args) -> Rules:
  """The request's logits rules: each explicit argument (not None) overrides the setting."""
  value = {name: _pick(given, getattr(settings, name)) for name, given in args.items()}
  min_new = _check_int('min_new_tokens', value['min_new_tokens'], 0, optional=True)
  # transformers: a set min_new_tokens replaces min_length by prefix + min_new_tokens.
  min_length = 0 if min_new is not None else _check_int('min_length', value['min_length'], 0)
  return Rules(
      min_length=min_length, min_new_tokens=min_new or 0,
      no_repeat_ngram_size=_check_int('no_repeat_ngram_size', value['no_repeat_ngram_size'], 0),
      forced_bos_id=_check_int('forced_bos_id', value['forced_bos_id'], 0, optional=True),
      forced_eos_id=_check_int('forced_eos_id', value['forced_eos_id'], 0, optional=True),
      banned_ids=_check_ids('banned_ids', value['banned_ids']))


def _family_check(model, inputs, max_new_tokens, valid):
  if valid is None:
    return model.check_decoding(inputs, max_new_tokens)
  if 'valid' not in inspect.signature(model.check_decoding).parameters:
    raise ValueError(f'valid was given, but {type(model).__name__}.check_decoding takes none')
  return model.check_decoding(inputs, max_new_tokens, valid=valid)


def _prefix_length(model, variables, inputs, valid) -> int:
  """P, the prefix length as transformers counts it, from the shape of the family's prefix."""
  checked = _family_check(model, inputs, 1, valid)
  prefix = jax.eval_shape(lambda v, x: model.decoder_for(v, x, 1).prefix, variables, checked)
  return 0 if prefix is None else prefix.shape[1]


def _request(name, model, variables, inputs, valid, max_new_tokens, rule_args):
  """Host-side checks before anything is traced -> (the family's inputs, max_new_tokens, Rules).

  max_new_tokens: the argument, else the settings' max_new_tokens, else their max_length less
  the prefix, else 20 (transformers' default).
  """
  if not all(callable(getattr(model, m, None)) for m in ('check_decoding', 'decoder_for')):
    raise ValueError(f'{name} needs a model with check_decoding and decoder_for methods (GPT, '
                     f'Transformer); {type(model).__name__} has no generator')
  settings = _settings(model)
  rules = _rules(settings, rule_args)
  max_new_tokens = _pick(max_new_tokens, settings.max_new_tokens)
  if max_new_tokens is None and settings.max_length is not None:
    prefix = _prefix_length(model, variables, inputs, valid)
    max_new_tokens = settings.max_length - prefix
    if max_new_tokens < 1:
      raise ValueError(f'max_length={settings.max_length} leaves no new token after the '
                       f'{prefix}-token prefix')
  max_new_tokens = _check_int('max_new_tokens', _pick(max_new_tokens, 20), 1)
  return _family_check(model, inputs, max_new_tokens, valid), max_new_tokens, rules
