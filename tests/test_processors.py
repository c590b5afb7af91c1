"""Each logits processor against transformers' own LogitsProcessor class.

Random scores `[R, V]` and random token histories (prefix + new tokens, transformers'
`input_ids`) go through both; ours runs jit-compiled with a traced index, and is given new-token
columns past the index filled with junk that it must not read.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite.processors import (BannedIds, ForcedBOS, ForcedEOS, MinLength, NoRepeatNGram,
                                        Rules)

torch = pytest.importorskip('torch')
logits_process = pytest.importorskip('transformers.generation.logits_process')

ROWS, VOCAB, NEW = 6, 11, 8


def ours(processor, scores, history, prefix_length):
  """Our processor on `history [R, P + k]` split as transformers' prefix and k new tokens."""
  index = history.shape[1] - prefix_length
  junk = np.random.default_rng(index).integers(0, VOCAB, (ROWS, NEW - index))
  tokens = np.concatenate([history[:, prefix_length:], junk], axis=1)
  run = jax.jit(processor)
  return np.asarray(run(jnp.asarray(scores), jnp.asarray(tokens, jnp.int32), jnp.int32(index),
                        jnp.asarray(history[:, :prefix_length], jnp.int32)))


def theirs(processor, scores, history):
  return processor(torch.tensor(history, dtype=torch.long), torch.tensor(scores)).numpy()


def cases(seed, distinct=VOCAB, min_prefix=0):
  """(scores, history, prefix_length) for every prefix length 0..4 and new-token count 0..7
  (transformers' input_ids are never empty)."""
  rng = np.random.default_rng(seed)
  for prefix_length in range(min_prefix, 5):
    for new in range(NEW):
      if prefix_length + new == 0:
        continue
      scores = rng.normal(size=(ROWS, VOCAB)).astype(np.float32)
      history = rng.integers(0, distinct, (ROWS, prefix_length + new))
      yield scores, history, prefix_length


def check(ours_processor, their_processor, **case_kwargs):
  changed = 0
  for scores, history, prefix_length in cases(**case_kwargs):
    expected = theirs(their_processor(prefix_length), scores, history)
    got = ours(ours_processor, scores, history, prefix_length)
    np.testing.assert_array_equal(got, expected)
    changed += not np.array_equal(expected, scores)
  assert changed > 0  # the rule fired somewhere


@pytest.mark.parametrize('min_length', [2, 4, 9])
def test_min_length(min_length):
  check(MinLength(eos_id=3, min_length=min_length),
        lambda p: logits_process.MinLengthLogitsProcessor(min_length, 3), seed=min_length)


@pytest.mark.parametrize('min_new', [1, 3])
def test_min_new_tokens(min_new):
  check(MinLength(eos_id=2, min_new_tokens=min_new),
        lambda p: logits_process.MinNewTokensLengthLogitsProcessor(p, min_new, 2), seed=min_new)


@pytest.mark.parametrize('n', [1, 2, 3, 4])
def test_no_repeat_ngram(n):
  # Few distinct tokens, so n-grams repeat often.
  check(NoRepeatNGram(n), lambda p: logits_process.NoRepeatNGramLogitsProcessor(n), seed=10 + n,
        distinct=3)


def test_banned_ids():
  ids = (0, 4, 7)
  check(BannedIds(ids), lambda p: logits_process.NoBadWordsLogitsProcessor([[i] for i in ids]),
        seed=20)


def test_forced_bos():
  # transformers forces when input_ids hold one token: a prefix of one and no new token yet.
  # (Without a prefix ours forces the first new token: see the next test.)
  check(ForcedBOS(5), lambda p: logits_process.ForcedBOSTokenLogitsProcessor(5), seed=30,
        min_prefix=1)


@pytest.mark.parametrize('max_length', [3, 8])
def test_forced_eos(max_length):
  check(ForcedEOS(6, max_length),
        lambda p: logits_process.ForcedEOSTokenLogitsProcessor(max_length, 6), seed=40)


def test_forced_bos_without_a_prefix_is_the_first_new_token():
  scores = np.zeros((ROWS, VOCAB), np.float32)
  first = ours(ForcedBOS(5), scores, np.zeros((ROWS, 0), np.int64), 0)
  assert (first[:, 5] == 0).all() and np.isinf(np.delete(first, 5, axis=1)).all()
  second = ours(ForcedBOS(5), scores, np.ones((ROWS, 1), np.int64), 0)
  np.testing.assert_array_equal(second, scores)


def test_processors_are_hashable_static_values():
  assert hash(NoRepeatNGram(2)) == hash(NoRepeatNGram(2)) and BannedIds((1,)) == BannedIds((1,))
  rules = Rules(min_length=4, no_repeat_ngram_size=2, forced_eos_id=1, banned_ids=(0, 1, 5))
  assert rules.processors(eos_id=1, default_bans=(9,), prefix_length=3, max_new_tokens=5) == (
      NoRepeatNGram(2), BannedIds((0, 5)), MinLength(1, 4, 0), ForcedEOS(1, 8))
  # Default bans are the family's, eos never among them; nothing to do gives no processor.
  assert Rules().processors(1, (0, 1), 0, 5) == (BannedIds((0,)),)
  assert Rules(banned_ids=()).processors(1, (0,), 0, 5) == ()
