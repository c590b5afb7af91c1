"""The decoding loops' protocol: a new model family decodes without any change to decoding.py.

`HashChain` is such a family in a few lines, not even a linen module: its next-token logits are
a row of a fixed table chosen by rolling hashes of every real token so far, kept in a cache
whose rows sit on axis 1 of one leaf and axis 0 of another. Its inputs are a pytree
`(tokens, valid)`, its prefix the prompt as given, its default ban the pad token. The expected
tokens come from a plain Python re-run over each full sequence, with no cache, whose logits
rules and beam search follow transformers' source line by line (lists, not arrays).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import BertEncoder, TransformerConfig
from flaxformer_lite.decoding import (Decoder, GenerationSettings, _beam_search, _generate,
                                      _Search, beam_search, generate)

PAD, EOS, VOCAB, STATES = 0, 1, 6, 13
MULTIPLIERS = (3, 5)  # one rolling hash per "layer" of the cache
TABLE = np.random.default_rng(5).normal(size=(STATES, VOCAB)).astype(np.float32) * 2
TABLE[:, EOS] -= 1  # seed and shift chosen so some rows end early and beams beat greedy
VARIABLES = {'params': {'table': jnp.asarray(TABLE)}}
PROMPTS = np.array([[2, 3, 4], [5, 2, 0], [0, 4, 4], [3, 0, 0]], np.int32)


def _hash_decoder(variables, tokens, valid, prefix, banned_ids):
  table = variables['params']['table']
  mult = jnp.array(MULTIPLIERS)[:, None]

  def feed(cache, tokens, real):  # tokens [B]; a token that is not real leaves its row as it was
    hashes = jnp.where(real, (cache['hash'] * mult + tokens) % STATES, cache['hash'])
    return {'hash': hashes, 'length': cache['length'] + real}

  def logits(cache):
    h = cache['hash']
    return table[(h[0] + 2 * h[1] + cache['length']) % STATES]

  def tokens_to_logits(cache, tokens):
    cache = feed(cache, tokens, jnp.ones(tokens.shape, bool))
    return logits(cache), cache

  batch = tokens.shape[0]
  cache = {'hash': jnp.zeros((len(MULTIPLIERS), batch), jnp.int32),
           'length': jnp.zeros((batch,), jnp.int32)}
  for t in range(tokens.shape[1]):
    cache = feed(cache, tokens[:, t], valid[:, t])
  return Decoder(cache=cache, logits=logits(cache), tokens_to_logits=tokens_to_logits,
                 pad_id=PAD, eos_id=EOS, cache_batch_axes={'hash': 1, 'length': 0},
                 prefix=prefix, banned_ids=banned_ids)


@dataclasses.dataclass(frozen=True)
class HashChain:
  """A toy model family implementing `check_decoding` and `decoder_for`."""
  generation: GenerationSettings | None = None

  def check_decoding(self, inputs, max_new_tokens, valid=None):
    tokens = np.asarray(inputs, np.int32)
    valid = tokens != PAD if valid is None else np.asarray(valid, bool)
    return jnp.asarray(tokens), jnp.asarray(valid)  # a pytree, the batch on axis 0

  def decoder_for(self, variables, inputs, max_new_tokens):
    tokens, valid = inputs
    return _hash_decoder(variables, tokens, valid, prefix=tokens, banned_ids=(PAD,))


@dataclasses.dataclass(frozen=True)
class PlainChain:
  """The protocol before `valid`, `prefix` and `banned_ids`: one array in, nothing banned."""

  def check_decoding(self, inputs, max_new_tokens):
    return jnp.asarray(inputs, jnp.int32)

  def decoder_for(self, variables, tokens, max_new_tokens):
    return _hash_decoder(variables, tokens, tokens != PAD, prefix=None, banned_ids=())


def reference_logits(seq):
  """The toy's logits after the real tokens `seq`, recomputed from scratch."""
  hashes = [0] * len(MULTIPLIERS)
  for token in seq:
    hashes = [(h * m + token) % STATES for h, m in zip(hashes, MULTIPLIERS)]
  return TABLE[(hashes[0] + 2 * hashes[1] + len(seq)) % STATES]


def naive_rules(logp, prefix, seq, n_new, rules):
  """transformers' processors over lists, in its order; `prefix` is input_ids before the first
  new token, so len(prefix + seq) is its `input_ids.shape[-1]`."""
  logp, history = logp.copy(), list(prefix) + list(seq)
  n = rules.get('no_repeat_ngram_size', 0)
  if n and len(history) >= n:
    tail = history[len(history) - n + 1:]
    for s in range(len(history) - n + 1):
      if history[s:s + n - 1] == tail:
        logp[history[s + n - 1]] = -np.inf
  for t in rules.get('banned_ids', (PAD,)):
    if t != EOS:
      logp[t] = -np.inf
  if len(history) < rules.get('min_length', 0) or len(seq) < rules.get('min_new_tokens', 0):
    logp[EOS] = -np.inf
  # Forced BOS: when input_ids hold one token; without a prefix, at the first new token.
  first = 1 if len(prefix) else 0
  for key, position in (('forced_bos_id', first), ('forced_eos_id', len(prefix) + n_new - 1)):
    if rules.get(key) is not None and len(history) == position:
      logp = np.where(np.arange(len(logp)) == rules[key], 0.0, -np.inf)
  return logp


def reference_scores(prompt, seq, n_new, rules, extra=None):
  """Log-probabilities after prompt + seq: log-softmax, then the rules (and `extra`)."""
  real = [int(t) for t in prompt if t != PAD]
  logp = np.array(jax.nn.log_softmax(jnp.asarray(reference_logits(real + seq))), np.float64)
  logp = naive_rules(logp, prompt, seq, n_new, rules)
  if extra and seq:
    logp[seq[-1]] = -np.inf
  return logp


def naive_greedy(prompt, n, rules=None, extra=None):
  seq = []
  while len(seq) < n and (not seq or seq[-1] != EOS):
    seq.append(int(np.argmax(reference_scores(prompt, seq, n, rules or {}, extra))))
  return seq + [PAD] * (n - len(seq))


def naive_beam_search(prompt, n, beam_size, alpha, early_stopping=False, rules=None, extra=None):
  """transformers' `_beam_search` over lists: of the best 2W candidates the top W that end (eos,
  or the length limit) finish, the best W others stay open; early stopping per its three modes.
  With at most 4 beams and 5 allowed first tokens its placeholder beams never matter."""
  running, finished, improvable = [([], 0.0)], [], True
  for i in range(n):
    candidates = []
    for seq, logp in running:
      scores = reference_scores(prompt, seq, n, rules or {}, extra)
      candidates += [(seq + [t], logp + scores[t]) for t in range(VOCAB) if scores[t] > -np.inf]
    candidates = sorted(candidates, key=lambda c: -c[1])[:2 * beam_size]
    ends = [seq[-1] == EOS or i == n - 1 for seq, _ in candidates]
    running = [c for c, end in zip(candidates, ends) if not end][:beam_size]
    if improvable and not (early_stopping is True and len(finished) == beam_size):
      finished += [(seq, logp / (i + 1) ** alpha)
                   for (seq, logp), end in zip(candidates[:beam_size], ends) if end]
      finished = sorted(finished, key=lambda c: -c[1])[:beam_size]
    if len(finished) == beam_size:
      length = n if early_stopping == 'never' and alpha > 0 else i + 1
      improvable &= bool(running) and running[0][1] / length ** alpha > finished[-1][1]
      if not improvable or early_stopping is True:
        break
  best = finished[0][0]
  return best + [PAD] * (n - len(best))


def test_a_new_family_decodes_greedy_with_generate():
  out = np.asarray(generate(HashChain(), VARIABLES, PROMPTS, max_new_tokens=8))
  assert out.tolist() == [naive_greedy(row, 8) for row in PROMPTS]
  # Rows end at different steps, and one runs to the limit: the early stop waits for all.
  assert (out == EOS).any(axis=1).tolist() == [True, True, False, True]


@pytest.mark.parametrize('beam_size', [2, 4])
@pytest.mark.parametrize('alpha', [0.0, 1.0])
@pytest.mark.parametrize('early_stopping', [True, False, 'never'])
def test_a_new_family_decodes_with_beam_search(beam_size, alpha, early_stopping):
  # Eight steps of reordered beams: a cache leaf gathered on the wrong axis, or not at all,
  # feeds a beam another beam's history.
  out = np.asarray(beam_search(HashChain(), VARIABLES, PROMPTS, beam_size=beam_size,
                               max_new_tokens=8, length_penalty=alpha,
                               early_stopping=early_stopping))
  assert out.tolist() == [naive_beam_search(row, 8, beam_size, alpha, early_stopping)
                          for row in PROMPTS]
  greedy = np.asarray(generate(HashChain(), VARIABLES, PROMPTS, max_new_tokens=8))
  assert not np.array_equal(out, greedy)  # the search matters here


RULES = [dict(min_length=6), dict(min_new_tokens=3), dict(no_repeat_ngram_size=1),
         dict(no_repeat_ngram_size=2), dict(forced_bos_id=4), dict(forced_eos_id=2),
         dict(banned_ids=(3, EOS)), dict(banned_ids=()),
         dict(min_length=5, no_repeat_ngram_size=2, forced_eos_id=EOS)]


@pytest.mark.parametrize('rules', RULES, ids=str)
def test_logits_rules_count_the_prefix_in_both_loops(rules):
  """The prefix is the prompt as given (3 tokens, padding included): min_length and forced EOS
  count it, n-grams run over it, forced BOS never fires (input_ids never hold one token);
  eos is never banned; banned_ids=() lets the pad token be generated."""
  greedy = np.asarray(generate(HashChain(), VARIABLES, PROMPTS, max_new_tokens=6, **rules))
  assert greedy.tolist() == [naive_greedy(row, 6, rules) for row in PROMPTS]
  beam = np.asarray(beam_search(HashChain(), VARIABLES, PROMPTS, beam_size=3, max_new_tokens=6,
                                **rules))
  assert beam.tolist() == [naive_beam_search(row, 6, 3, 1.0, rules=rules) for row in PROMPTS]


def test_logits_rules_without_a_prefix_count_new_tokens():
  """A family with no prefix: lengths count new tokens only, forced BOS is the first token."""
  rules = dict(min_length=2, forced_bos_id=3, banned_ids=(PAD,))
  out = np.asarray(generate(PlainChain(), VARIABLES, PROMPTS, max_new_tokens=5, **rules))
  assert out.tolist() == [_plain_greedy(row, 5, rules) for row in PROMPTS]
  assert (out[:, 0] == 3).all()


def _plain_greedy(prompt, n, rules):
  real, seq = [int(t) for t in prompt if t != PAD], []
  while len(seq) < n and (not seq or seq[-1] != EOS):
    logp = np.array(jax.nn.log_softmax(jnp.asarray(reference_logits(real + seq))), np.float64)
    seq.append(int(np.argmax(naive_rules(logp, [], seq, n, rules))))
  return seq + [PAD] * (n - len(seq))


def no_repeat(scores, tokens, index, prefix):
  """A logits processor: never the token chosen just before (at index 0 that is pad_id)."""
  previous = tokens[:, jnp.maximum(index - 1, 0)]
  return scores.at[jnp.arange(scores.shape[0]), previous].set(-jnp.inf)


def test_logits_processors_see_each_rows_tokens_in_both_loops():
  inputs = HashChain().check_decoding(PROMPTS, 8)
  greedy = _generate(HashChain(), VARIABLES, inputs, jax.random.key(0), jnp.float32(1.0), None,
                     max_new_tokens=8, greedy=True, top_k=None, processors=(no_repeat,))
  assert np.asarray(greedy).tolist() == [naive_greedy(row, 8, extra=True) for row in PROMPTS]
  beam = _beam_search(HashChain(), VARIABLES, inputs, search=_Search(4, 8, 1.0, False),
                      processors=(no_repeat,))
  assert np.asarray(beam).tolist() == [naive_beam_search(row, 8, 4, 1.0, extra=True)
                                       for row in PROMPTS]


def test_valid_marks_the_real_prompt_tokens():
  """valid reaches the family: a pad-valued token marked valid is real, a real-valued one
  marked invalid is skipped (and both stay in the prefix)."""
  valid = PROMPTS != PAD
  valid[1, 2] = True  # the 0 after "5 2" is a real token now
  valid[0, 0] = False  # the 2 that starts row 0 is not
  out = np.asarray(generate(HashChain(), VARIABLES, PROMPTS, max_new_tokens=6, valid=valid))
  default = np.asarray(generate(HashChain(), VARIABLES, PROMPTS, max_new_tokens=6))
  expected = [_greedy_real([int(t) for t, v in zip(row, ok) if v], 6)
              for row, ok in zip(PROMPTS, valid)]
  assert out.tolist() == expected
  assert out[2:].tolist() == default[2:].tolist() and out[:2].tolist() != default[:2].tolist()
  beam = beam_search(HashChain(), VARIABLES, PROMPTS, beam_size=2, max_new_tokens=6, valid=valid)
  assert np.asarray(beam).shape == (4, 6)  # every leaf of (tokens, valid) repeated per beam


def _greedy_real(real, n):
  seq = []
  while len(seq) < n and (not seq or seq[-1] != EOS):
    logp = np.array(jax.nn.log_softmax(jnp.asarray(reference_logits(real + seq))), np.float64)
    logp[PAD] = -np.inf
    seq.append(int(np.argmax(logp)))
  return seq + [PAD] * (n - len(seq))


def test_a_family_without_valid_decodes_and_refuses_valid():
  plain = np.asarray(generate(PlainChain(), VARIABLES, PROMPTS, max_new_tokens=8))
  unbanned = np.asarray(generate(HashChain(), VARIABLES, PROMPTS, max_new_tokens=8,
                                 banned_ids=()))
  np.testing.assert_array_equal(plain, unbanned)  # nothing banned by default: pad may come
  assert (plain[:, :4] == PAD).any()
  with pytest.raises(ValueError, match='PlainChain.check_decoding takes none'):
    generate(PlainChain(), VARIABLES, PROMPTS, max_new_tokens=2, valid=PROMPTS != PAD)


def test_settings_give_the_defaults_and_arguments_override_them():
  settings = GenerationSettings(max_length=9, num_beams=3, length_penalty=0.0,
                                early_stopping='never', no_repeat_ngram_size=2)
  model = HashChain(generation=settings)
  out = np.asarray(generate(model, VARIABLES, PROMPTS))
  # max_length counts the 3-token prefix: 6 new tokens; num_beams > 1 makes it beam search.
  assert out.tolist() == [naive_beam_search(row, 6, 3, 0.0, 'never',
                                            dict(no_repeat_ngram_size=2)) for row in PROMPTS]
  np.testing.assert_array_equal(out, beam_search(model, VARIABLES, PROMPTS))
  greedy = np.asarray(generate(model, VARIABLES, PROMPTS, num_beams=1, max_new_tokens=4,
                               no_repeat_ngram_size=0))
  assert greedy.tolist() == [naive_greedy(row, 4) for row in PROMPTS]
  # transformers' default: 20 new tokens, greedy.
  assert np.asarray(generate(HashChain(), VARIABLES, PROMPTS)).shape == (4, 20)


def test_sampling_settings_are_used_only_with_do_sample():
  sampling = HashChain(generation=GenerationSettings(do_sample=True, temperature=0.5))
  with pytest.raises(ValueError, match='rng'):
    generate(sampling, VARIABLES, PROMPTS, max_new_tokens=4)
  # top_k=50 (transformers' default) exceeds this vocabulary of 6: clipped, as transformers does.
  a = generate(sampling, VARIABLES, PROMPTS, max_new_tokens=4, rng=jax.random.key(1))
  b = generate(HashChain(), VARIABLES, PROMPTS, max_new_tokens=4, temperature=0.5,
               rng=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  greedy = generate(HashChain(generation=GenerationSettings(temperature=0.5)), VARIABLES,
                    PROMPTS, max_new_tokens=4)
  np.testing.assert_array_equal(greedy, generate(HashChain(), VARIABLES, PROMPTS,
                                                 max_new_tokens=4))


@pytest.mark.parametrize('kwargs, message', [
    (dict(min_length=-1), 'min_length=-1'),
    (dict(min_new_tokens=1.5), 'min_new_tokens=1.5'),
    (dict(no_repeat_ngram_size=-2), 'no_repeat_ngram_size=-2'),
    (dict(forced_bos_id=-1), 'forced_bos_id=-1'),
    (dict(forced_eos_id=99), 'forced_eos_id: token id 99'),
    (dict(banned_ids=(2, 'x')), "banned_ids='x'"),
    (dict(banned_ids=(7,)), 'banned_ids: token id 7'),
    (dict(num_beams=0), 'num_beams=0'),
    (dict(num_beams=2, temperature=1.0), 'beam sampling'),
    (dict(num_beams=2, early_stopping='sometimes'), "early_stopping='sometimes'"),
    (dict(num_beams=2, length_penalty=float('nan')), 'length_penalty=nan'),
    (dict(max_new_tokens=0), 'max_new_tokens=0'),
])
def test_bad_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    generate(HashChain(), VARIABLES, PROMPTS, **{'max_new_tokens': 3, **kwargs})


def test_bad_settings_raise():
  with pytest.raises(ValueError, match="early_stopping='no'"):
    GenerationSettings(early_stopping='no')
  with pytest.raises(ValueError, match='beam sampling'):
    GenerationSettings(do_sample=True, num_beams=2)
  with pytest.raises(ValueError, match='max_length=3 leaves no new token after the 3-token'):
    generate(HashChain(generation=GenerationSettings(max_length=3)), VARIABLES, PROMPTS)


def test_a_model_without_a_generator_is_refused():
  model = BertEncoder(TransformerConfig.preset('tiny'))
  with pytest.raises(ValueError, match='BertEncoder has no generator'):
    generate(model, {}, PROMPTS, max_new_tokens=2)
  with pytest.raises(ValueError, match='BertEncoder has no generator'):
    beam_search(model, {}, PROMPTS, beam_size=2, max_new_tokens=2)
