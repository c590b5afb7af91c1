"""The decoding loops' protocol: a new model family decodes without any change to decoding.py.

`HashChain` is such a family in a few lines, not even a linen module: its next-token logits are
a row of a fixed table chosen by rolling hashes of every token so far, kept in a cache whose
rows sit on axis 1 of one leaf and axis 0 of another. The expected tokens come from a plain
Python re-run over each full sequence, with no cache.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import BertEncoder, TransformerConfig
from flaxformer_lite.decoding import Decoder, _beam_search, _generate, beam_search, generate

PAD, EOS, VOCAB, STATES = 0, 1, 6, 13
MULTIPLIERS = (3, 5)  # one rolling hash per "layer" of the cache
TABLE = np.random.default_rng(5).normal(size=(STATES, VOCAB)).astype(np.float32) * 2
TABLE[:, EOS] -= 1  # seed and shift chosen so some rows end early and beams beat greedy
VARIABLES = {'params': {'table': jnp.asarray(TABLE)}}
PROMPTS = np.array([[2, 3, 4], [5, 2, 0], [0, 4, 4], [3, 0, 0]], np.int32)


@dataclasses.dataclass(frozen=True)
class HashChain:
  """A toy model family implementing `check_decoding` and `decoder_for`."""

  def check_decoding(self, inputs, max_new_tokens):
    return jnp.asarray(inputs, jnp.int32)

  def decoder_for(self, variables, inputs, max_new_tokens):
    table = variables['params']['table']
    mult = jnp.array(MULTIPLIERS)[:, None]

    def feed(cache, tokens):  # tokens [B]; pad leaves a row as it was
      real = tokens != PAD
      hashes = jnp.where(real, (cache['hash'] * mult + tokens) % STATES, cache['hash'])
      return {'hash': hashes, 'length': cache['length'] + real}

    def logits(cache):
      h = cache['hash']
      return table[(h[0] + 2 * h[1] + cache['length']) % STATES]

    def tokens_to_logits(cache, tokens):
      cache = feed(cache, tokens)
      return logits(cache), cache

    batch = inputs.shape[0]
    cache = {'hash': jnp.zeros((len(MULTIPLIERS), batch), jnp.int32),
             'length': jnp.zeros((batch,), jnp.int32)}
    for t in range(inputs.shape[1]):
      cache = feed(cache, inputs[:, t])
    return Decoder(cache=cache, logits=logits(cache), tokens_to_logits=tokens_to_logits,
                   pad_id=PAD, eos_id=EOS, cache_batch_axes={'hash': 1, 'length': 0})


def reference_logits(seq):
  """The toy's logits after the non-pad tokens `seq`, recomputed from scratch."""
  hashes = [0] * len(MULTIPLIERS)
  for token in seq:
    hashes = [(h * m + token) % STATES for h, m in zip(hashes, MULTIPLIERS)]
  return TABLE[(hashes[0] + 2 * hashes[1] + len(seq)) % STATES]


def no_repeat(scores, tokens, index):
  """A logits processor: never the token chosen just before (at index 0 that is pad_id)."""
  previous = tokens[:, jnp.maximum(index - 1, 0)]
  return scores.at[jnp.arange(scores.shape[0]), previous].set(-jnp.inf)


def reference_scores(prompt, seq, rule):
  """Log-probabilities after prompt + seq: pad banned, log-softmax, then the processor rule."""
  logits = jnp.asarray(reference_logits(prompt + seq)).at[PAD].set(-jnp.inf)
  logp = np.array(jax.nn.log_softmax(logits))
  if rule and seq:
    logp[seq[-1]] = -np.inf
  return logp


def naive_greedy(prompt, n, rule=False):
  seq = []
  while len(seq) < n and (not seq or seq[-1] != EOS):
    seq.append(int(np.argmax(reference_scores(prompt, seq, rule))))
  return seq + [PAD] * (n - len(seq))


def naive_beam_search(prompt, n, beam_size, alpha, rule=False):
  """Beam search over plain lists, every score recomputed from the full sequence: of the best
  2W candidates the ones ending with EOS are finished, the best W others stay open; the best
  finished or open hypothesis at the end wins. With at most 4 beams the compiled loop's
  placeholder beams never stay open (5 first candidates, one EOS), so the two agree exactly."""
  live, finished = [([], 0.0)], []
  for length in range(1, n + 1):
    candidates = []
    for seq, logp in live:
      scores = reference_scores(prompt, seq, rule)
      candidates += [(seq + [t], logp + float(scores[t])) for t in range(VOCAB) if t != PAD]
    candidates = sorted(candidates, key=lambda c: -c[1])[:2 * beam_size]
    finished += [(seq, logp / length ** alpha) for seq, logp in candidates if seq[-1] == EOS]
    live = [(seq, logp) for seq, logp in candidates if seq[-1] != EOS][:beam_size]
  best = max(finished + [(seq, logp / n ** alpha) for seq, logp in live], key=lambda c: c[1])[0]
  return best + [PAD] * (n - len(best))


def prompt_list(row):
  return [int(t) for t in row if t != PAD]


def test_a_new_family_decodes_greedy_with_generate():
  out = np.asarray(generate(HashChain(), VARIABLES, PROMPTS, max_new_tokens=8))
  assert out.tolist() == [naive_greedy(prompt_list(row), 8) for row in PROMPTS]
  # Rows end at different steps, and one runs to the limit: the early stop waits for all.
  assert (out == EOS).any(axis=1).tolist() == [True, True, False, True]


@pytest.mark.parametrize('beam_size', [2, 4])
@pytest.mark.parametrize('alpha', [0.0, 1.0])
def test_a_new_family_decodes_with_beam_search(beam_size, alpha):
  # Eight steps of reordered beams: a cache leaf gathered on the wrong axis, or not at all,
  # feeds a beam another beam's history.
  out = np.asarray(beam_search(HashChain(), VARIABLES, PROMPTS, beam_size=beam_size,
                               max_new_tokens=8, length_penalty=alpha))
  assert out.tolist() == [naive_beam_search(prompt_list(row), 8, beam_size, alpha)
                          for row in PROMPTS]
  greedy = np.asarray(generate(HashChain(), VARIABLES, PROMPTS, max_new_tokens=8))
  assert not np.array_equal(out, greedy)  # the search matters here


def test_logits_processors_see_each_rows_tokens_in_both_loops():
  prompts = jnp.asarray(PROMPTS)
  greedy = _generate(HashChain(), VARIABLES, prompts, jax.random.key(0), jnp.float32(1.0), None,
                     max_new_tokens=8, greedy=True, top_k=None, processors=(no_repeat,))
  assert np.asarray(greedy).tolist() == [naive_greedy(prompt_list(row), 8, rule=True)
                                         for row in PROMPTS]
  beam = _beam_search(HashChain(), VARIABLES, prompts, jnp.float32(1.0), beam_size=4,
                      max_new_tokens=8, processors=(no_repeat,))
  assert np.asarray(beam).tolist() == [naive_beam_search(prompt_list(row), 8, 4, 1.0, rule=True)
                                       for row in PROMPTS]


def test_a_model_without_a_generator_is_refused():
  model = BertEncoder(TransformerConfig.preset('tiny'))
  with pytest.raises(ValueError, match='BertEncoder has no generator'):
    generate(model, {}, PROMPTS, max_new_tokens=2)
  with pytest.raises(ValueError, match='BertEncoder has no generator'):
    beam_search(model, {}, PROMPTS, beam_size=2, max_new_tokens=2)
