"""Logits processors: the rules of Hugging Face generation configs, as jit-static values.

Each processor is a frozen (hashable) dataclass, called inside the compiled decoding loops as

  processor(scores [R, V], tokens [R, L], index, prefix [R, P]) -> scores [R, V]

for R rows (B, or B * W beams). `tokens` holds each row's new tokens; only columns before
`index` (the column being chosen, traced) are read. `prefix` is what transformers' `input_ids`
holds before the first new token (a decoder-only model: the prompt as given, padding included;
an encoder-decoder: the decoder start token), so a length "as transformers counts it" is
P + index, and n-grams run over prefix + new tokens. Every rule is vectorized: the only Python
loops run over static, small things (the processors themselves).

`Rules` is the static description of one request; `Rules.processors` builds the processors once
the model family's `Decoder` (its eos_id, its default bans, the prefix length) is known, in
transformers' order (`GenerationMixin._get_logits_processor`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def _history(tokens, prefix):
  """prefix + new tokens: `[R, P + L]` int32 (columns from P + index on are not yet chosen)."""
  return jnp.concatenate([prefix.astype(jnp.int32), tokens.astype(jnp.int32)], axis=1)


def _only(scores, token, when):
  """Where `when` (traced bool), every score -inf but `token`'s, which becomes 0."""
  forced = jnp.full_like(scores, -jnp.inf).at[:, token].set(0.0)
  return jnp.where(when, forced, scores)


@dataclasses.dataclass(frozen=True)
class MinLength:
  """Bans `eos_id` while the sequence is shorter than `min_length` (prefix included, as
  transformers' MinLengthLogitsProcessor counts `input_ids`) or fewer than `min_new_tokens`
  new tokens were chosen (its MinNewTokensLengthLogitsProcessor)."""
  eos_id: int
  min_length: int = 0
  min_new_tokens: int = 0

  def __call__(self, scores, tokens, index, prefix):
    hold = (prefix.shape[1] + index < self.min_length) | (index < self.min_new_tokens)
    return scores.at[:, self.eos_id].set(jnp.where(hold, -jnp.inf, scores[:, self.eos_id]))


@dataclasses.dataclass(frozen=True)
class NoRepeatNGram:
  """Bans every token that would complete an n-gram already present in prefix + new tokens
  (transformers' NoRepeatNGramLogitsProcessor over `input_ids`)."""
  n: int

  def __call__(self, scores, tokens, index, prefix):
    history = _history(tokens, prefix)
    rows, total = history.shape
    n, vocab = self.n, scores.shape[-1]
    if total < n:
      return scores
    length = prefix.shape[1] + index  # tokens chosen so far, prefix included
    starts = jnp.arange(total - n + 1)
    windows = history[:, starts[:, None] + jnp.arange(n)]  # [R, S, n]: every n-gram slot
    # The n - 1 last tokens; a window matching them bans its own last token.
    suffix = jax.lax.dynamic_slice_in_dim(history, jnp.maximum(length - n + 1, 0), n - 1, axis=1)
    matches = jnp.all(windows[:, :, :-1] == suffix[:, None, :], axis=-1)
    matches &= starts[None, :] + n <= length  # windows that lie inside the tokens so far
    # Non-matching windows go to a spare column past the vocabulary.
    target = jnp.where(matches, jnp.minimum(windows[:, :, -1], vocab), vocab)
    banned = jnp.zeros((rows, vocab + 1), bool).at[jnp.arange(rows)[:, None], target].set(True)
    return jnp.where(banned[:, :vocab] & (length >= n), -jnp.inf, scores)


@dataclasses.dataclass(frozen=True)
class BannedIds:
  """Never these tokens (transformers' bad_words_ids of single tokens, suppress-style)."""
  ids: tuple[int, ...]

  def __call__(self, scores, tokens, index, prefix):
    return scores.at[:, jnp.asarray(self.ids, jnp.int32)].set(-jnp.inf)


@dataclasses.dataclass(frozen=True)
class ForcedBOS:
  """Forces `token` where transformers' ForcedBOSTokenLogitsProcessor does: when `input_ids`
  holds exactly one token (an encoder-decoder's start token). A decoder-only prompt of several
  tokens is never forced. Without a prefix (P = 0) the first new token is forced."""
  token: int

  def __call__(self, scores, tokens, index, prefix):
    first = index == 0 if prefix.shape[1] == 0 else prefix.shape[1] + index == 1
    return _only(scores, self.token, first)


@dataclasses.dataclass(frozen=True)
class ForcedEOS:
  """Forces `token` at the last position: when prefix + new tokens reach `max_length` - 1
  (transformers' ForcedEOSTokenLogitsProcessor, max_length counting the prefix)."""
  token: int
  max_length: int

  def __call__(self, scores, tokens, index, prefix):
    return _only(scores, self.token, prefix.shape[1] + index == self.max_length - 1)


@dataclasses.dataclass(frozen=True)
class Rules:
  """The logits rules of one `generate`/`beam_search` request (static, hashable).

  `banned_ids` None: the family's `Decoder.banned_ids`. The eos token is never banned (as
  transformers' NoBadWordsLogitsProcessor drops it): use min_length to hold it back.
  """
  min_length: int = 0
  min_new_tokens: int = 0
  no_repeat_ngram_size: int = 0
  forced_bos_id: int | None = None
  forced_eos_id: int | None = None
  banned_ids: tuple[int, ...] | None = None

  def processors(self, eos_id: int, default_bans: tuple[int, ...], prefix_length: int,
                 max_new_tokens: int) -> tuple:
    """The processors, in transformers' order: n-grams, bans, min length, forced tokens."""
    out = []
    if self.no_repeat_ngram_size > 0:
      out.append(NoRepeatNGram(self.no_repeat_ngram_size))
    bans = tuple(t for t in (default_bans if self.banned_ids is None else self.banned_ids)
                 if t != eos_id)
    if bans:
      out.append(BannedIds(bans))
    if self.min_length > 0 or self.min_new_tokens > 0:
      out.append(MinLength(eos_id, self.min_length, self.min_new_tokens))
    if self.forced_bos_id is not None:
      out.append(ForcedBOS(self.forced_bos_id))
    if self.forced_eos_id is not None:
      out.append(ForcedEOS(self.forced_eos_id, prefix_length + max_new_tokens))
    return tuple(out)

  def check_vocab(self, vocab: int) -> None:
    """Raises ValueError for a token id outside the vocabulary (known once traced)."""
    named = [('forced_bos_id', self.forced_bos_id), ('forced_eos_id', self.forced_eos_id)]
    named += [('banned_ids', t) for t in self.banned_ids or ()]
    for name, token in named:
      if token is not None and not 0 <= token < vocab:
        raise ValueError(f'{name}: token id {token} is outside the vocabulary [0, {vocab})')
