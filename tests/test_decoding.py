"""generate(): the cached, compiled loop against a naive re-run of the full forward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import GPT, Transformer, TransformerConfig
from flaxformer_lite.decoding import _generate, beam_search, generate, sample_logits

# init_std 0.5 makes random logits decisive, so float rounding cannot flip an argmax between the
# cached loop and the naive reference.
CFG = TransformerConfig.preset('tiny', d_model=32, num_heads=4, d_ff=64, vocab_size=48,
                               max_len=32, dropout_rate=0.0, init_std=0.5)
PROMPTS = np.array([[5, 6, 7, 8, 9], [10, 11, 0, 0, 0], [0, 0, 12, 13, 14]], np.int32)


_forward = jax.jit(lambda model, variables, *tokens: model.apply(variables, *tokens),
                   static_argnums=0)


def _padded(seq, length=16):
  """One fixed shape for the reference loop, so it compiles once; padding is never attended."""
  return jnp.array([seq + [0] * (length - len(seq))], jnp.int32)


def naive_gpt_greedy(model, variables, prompt_row, n, cfg):
  """Re-runs the whole forward pass for every new token, without the cache."""
  seq = [int(t) for t in prompt_row if t != cfg.pad_id]
  out = []
  for _ in range(n):
    logits = _forward(model, variables, _padded(seq))[0, len(seq) - 1]
    token = int(jnp.argmax(logits.at[cfg.pad_id].set(-jnp.inf)))
    out.append(token)
    if token == cfg.eos_id:
      break
    seq.append(token)
  return out + [cfg.pad_id] * (n - len(out))


def naive_seq2seq_greedy(model, variables, src_row, n, cfg):
  src = jnp.array([src_row], jnp.int32)
  tgt = [cfg.bos_id]
  out = []
  for _ in range(n):
    logits = _forward(model, variables, src, _padded(tgt))[0, len(tgt) - 1]
    token = int(jnp.argmax(logits.at[cfg.pad_id].set(-jnp.inf)))
    out.append(token)
    if token == cfg.eos_id:
      break
    tgt.append(token)
  return out + [cfg.pad_id] * (n - len(out))


@pytest.fixture(scope='module', params=['learned', 'rotary-gqa'])
def gpt(request):
  cfg = CFG if request.param == 'learned' else CFG.replace(positions='rotary', num_kv_heads=2)
  model = GPT(cfg)
  return model, model.init(jax.random.key(0), jnp.asarray(PROMPTS))


@pytest.fixture(scope='module')
def seq2seq():
  model = Transformer(CFG)
  return model, model.init(jax.random.key(1), jnp.asarray(PROMPTS), jnp.asarray(PROMPTS))


def test_gpt_greedy_matches_naive_loop(gpt):
  model, variables = gpt
  out = np.asarray(generate(model, variables, PROMPTS, max_new_tokens=7))
  assert out.shape == (3, 7)
  for row, prompt in zip(out, PROMPTS):
    assert row.tolist() == naive_gpt_greedy(model, variables, prompt, 7, model.config)


def test_left_and_right_padding_give_the_same_continuation(gpt):
  model, variables = gpt
  right = np.array([[12, 13, 14, 0, 0]], np.int32)
  left = np.array([[0, 0, 12, 13, 14]], np.int32)
  alone = np.array([[12, 13, 14]], np.int32)
  results = [np.asarray(generate(model, variables, p, max_new_tokens=5)) for p in
             (right, left, alone)]
  np.testing.assert_array_equal(results[0], results[1])
  np.testing.assert_array_equal(results[0], results[2])


def test_seq2seq_greedy_matches_naive_loop(seq2seq):
  model, variables = seq2seq
  out = np.asarray(generate(model, variables, PROMPTS, max_new_tokens=6))
  for row, src in zip(out, PROMPTS):
    assert row.tolist() == naive_seq2seq_greedy(model, variables, src, 6, model.config)


def test_rows_stop_at_eos_and_are_padded_after(gpt):
  model, variables = gpt
  free = np.asarray(generate(model, variables, PROMPTS, max_new_tokens=8))
  # Make the first token of row 0 that is new to that row (after its first) the end token.
  k = next(i for i in range(1, 8) if free[0, i] not in free[0, :i])
  eos = int(free[0, k])
  cfg = model.config.replace(eos_id=eos)
  eos_model = GPT(cfg)
  out = np.asarray(generate(eos_model, variables, PROMPTS, max_new_tokens=8))
  for row, prompt in zip(out, PROMPTS):
    expected = naive_gpt_greedy(eos_model, variables, prompt, 8, cfg)
    assert row.tolist() == expected
  assert out[0, k] == eos and (out[0, k + 1:] == cfg.pad_id).all()


def test_stops_early_when_every_row_is_done(seq2seq):
  model, variables = seq2seq
  first = np.asarray(generate(model, variables, PROMPTS[:1], max_new_tokens=1))[0, 0]
  cfg = model.config.replace(eos_id=int(first))
  out = np.asarray(generate(Transformer(cfg), variables, PROMPTS[:1], max_new_tokens=6))
  assert out[0].tolist() == [first] + [cfg.pad_id] * 5


def test_sampling_is_reproducible_and_top_k_1_is_greedy(gpt):
  model, variables = gpt
  greedy = generate(model, variables, PROMPTS, max_new_tokens=6)
  top1 = generate(model, variables, PROMPTS, max_new_tokens=6, temperature=0.7, top_k=1,
                  rng=jax.random.key(5))
  np.testing.assert_array_equal(greedy, top1)
  kwargs = dict(max_new_tokens=6, temperature=2.0, rng=jax.random.key(7))
  a = generate(model, variables, PROMPTS, **kwargs)
  b = generate(model, variables, PROMPTS, **kwargs)
  c = generate(model, variables, PROMPTS, max_new_tokens=6, temperature=2.0, rng=jax.random.key(8))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_generate_compiles_once_per_shape(gpt):
  model, variables = gpt
  generate(model, variables, PROMPTS, max_new_tokens=4)
  before = _generate._cache_size()
  generate(model, variables, PROMPTS[::-1].copy(), max_new_tokens=4)
  assert _generate._cache_size() == before


LOGITS = jnp.log(jnp.array([[0.4, 0.3, 0.15, 0.1, 0.05]]))


def _empirical(n=20000, **kwargs):
  keys = jax.random.split(jax.random.key(0), n)
  draws = jax.vmap(lambda k: sample_logits(LOGITS, k, **kwargs)[0])(keys)
  return np.bincount(np.asarray(draws), minlength=5) / n


def test_sample_logits_temperature_one_follows_softmax():
  freq = _empirical(temperature=1.0)
  # 20k draws: the standard error of each frequency is below 0.0035, so 0.015 is > 4 sigma.
  np.testing.assert_allclose(freq, [0.4, 0.3, 0.15, 0.1, 0.05], atol=0.015)


def test_sample_logits_top_k_and_top_p_restrict_the_support():
  top2 = _empirical(temperature=1.0, top_k=2)
  np.testing.assert_allclose(top2, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0], atol=0.015)
  # Nucleus 0.8: 0.4 + 0.3 < 0.8, so the third token (0.15) completes it.
  nucleus = _empirical(temperature=1.0, top_p=0.8)
  np.testing.assert_allclose(nucleus, np.array([0.4, 0.3, 0.15, 0, 0]) / 0.85, atol=0.015)
  hot = _empirical(temperature=1e-3)
  np.testing.assert_allclose(hot, [1, 0, 0, 0, 0])


@pytest.mark.parametrize('kwargs, message', [
    (dict(max_new_tokens=0), 'max_new_tokens=0'),
    (dict(max_new_tokens=40), 'max_len=32'),
    (dict(max_new_tokens=3, temperature=1.0), 'rng'),
    (dict(max_new_tokens=3, temperature=-1.0), 'temperature=-1.0'),
    (dict(max_new_tokens=3, top_k=100, temperature=1.0, rng=jax.random.key(0)), 'top_k=100'),
    (dict(max_new_tokens=3, top_p=1.5, temperature=1.0, rng=jax.random.key(0)), 'top_p=1.5'),
])
def test_bad_arguments_raise(gpt, kwargs, message):
  model, variables = gpt
  with pytest.raises(ValueError, match=message):
    generate(model, variables, PROMPTS, **kwargs)


def test_bad_inputs_raise(gpt):
  model, variables = gpt
  with pytest.raises(ValueError, match='row 1 is all padding'):
    generate(model, variables, np.array([[5, 6], [0, 0]]), max_new_tokens=2)
  with pytest.raises(ValueError, match='id 99'):
    generate(model, variables, np.array([[5, 99]]), max_new_tokens=2)


# ----------------------------------------------------------------------------------------------
# beam search

def test_beam_size_one_is_greedy_when_nothing_ends(gpt, seq2seq):
  for model, variables in (gpt, seq2seq):
    greedy = np.asarray(generate(model, variables, PROMPTS, max_new_tokens=6))
    assert (greedy != model.config.eos_id).all()  # precondition: W=1 then has no other choice
    beam = np.asarray(beam_search(model, variables, PROMPTS, beam_size=1, max_new_tokens=6))
    np.testing.assert_array_equal(beam, greedy)


SMALL = TransformerConfig.preset('tiny', d_model=32, num_heads=4, d_ff=64, vocab_size=6,
                                 max_len=16, dropout_rate=0.0, init_std=0.5)


def _brute_force_best(model, variables, prompt, n, alpha):
  """Scores every continuation of up to n tokens (ending at EOS or at n) with the full forward
  pass and returns the best, padded with pad_id: the exact answer beam search approximates."""
  cfg = model.config
  tokens = [t for t in range(cfg.vocab_size) if t != cfg.pad_id]
  best, best_score = None, -np.inf
  frontier = [([], 0.0)]
  for length in range(1, n + 1):
    grown = []
    for seq, logp in frontier:
      logits = _forward(model, variables, _padded(prompt + seq))[0, len(prompt) + len(seq) - 1]
      # As transformers: bans (the pad token) after the log-softmax.
      logprobs = np.asarray(jax.nn.log_softmax(logits).at[cfg.pad_id].set(-jnp.inf))
      for t in tokens:
        score = logp + float(logprobs[t])
        if t == cfg.eos_id or length == n:
          if score / length ** alpha > best_score:
            best, best_score = seq + [t], score / length ** alpha
        else:
          grown.append((seq + [t], score))
    frontier = grown
  return best + [cfg.pad_id] * (n - len(best))


@pytest.mark.parametrize('alpha', [0.0, 1.0])
def test_wide_beam_finds_the_exact_best_sequence(alpha):
  model = GPT(SMALL)
  prompts = np.array([[3, 4, 5], [5, 3, 0]], np.int32)
  variables = model.init(jax.random.key(3), jnp.asarray(prompts))
  # 5 non-pad tokens: 25 beams keep every prefix of length 2 that did not end (at most 16), so
  # the search is exhaustive. transformers' rule (only the top W of the 2W candidates finish)
  # keeps it so: every real candidate is among the top 25 at steps 1 and 2, and at step 3 the
  # best continuation ranks first by log-probability (every one there has length 3).
  out = np.asarray(beam_search(model, variables, prompts, beam_size=25, max_new_tokens=3,
                               length_penalty=alpha))
  for row, prompt in zip(out, prompts):
    expected = _brute_force_best(model, variables, [int(t) for t in prompt if t], 3, alpha)
    assert row.tolist() == expected


def test_beam_search_seq2seq_and_scan_layers_agree():
  cfg = SMALL.replace(scan_layers=True)
  plain, scanned = Transformer(SMALL), Transformer(cfg)
  src = np.array([[3, 4, 5, 4], [5, 3, 0, 0]], np.int32)
  variables = plain.init(jax.random.key(4), jnp.asarray(src), jnp.asarray(src))
  params = nn.unbox(variables['params'])
  stacked = dict(params)
  for stack in ('encoder', 'decoder'):
    layers = [params[stack][f'layers_{i}'] for i in range(2)]
    stacked[stack] = {k: v for k, v in params[stack].items() if not k.startswith('layers_')}
    stacked[stack]['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  a = beam_search(plain, variables, src, beam_size=4, max_new_tokens=5)
  b = beam_search(scanned, {'params': stacked}, src, beam_size=4, max_new_tokens=5)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='beam_size=0'):
    beam_search(plain, variables, src, beam_size=0, max_new_tokens=5)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_cross_attention_keys_and_values_are_projected_once(scan_layers):
  """The first decoding step stores each layer's cross-attention keys/values in the cache; the
  later steps read them: their logits do not depend on the encoder output passed in any more,
  and equal the full (uncached) pass."""
  model = Transformer(CFG.replace(scan_layers=scan_layers))
  src = jnp.asarray(PROMPTS)
  tgt = jnp.array([[CFG.bos_id, 7, 9]] * len(PROMPTS), jnp.int32)
  variables = model.init(jax.random.key(5), src, tgt)
  encoded = model.apply(variables, src, method='encode')
  cache = model.init(jax.random.key(0), src, tgt, decode=True)['cache']
  cache = jax.tree.map(jnp.zeros_like, cache)
  assert 'cross_key' not in str(jax.tree_util.tree_structure(cache))  # no stale entry at init

  def step(cache, encoded, tokens):
    return model.apply({**variables, 'cache': cache}, encoded, src, tokens, decode=True,
                       mutable=['cache'], method='decode')

  _, mutated = step(cache, encoded, tgt[:, :1])
  cache = mutated['cache']
  cross = [x for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]
           if 'cross_key' in jax.tree_util.keystr(path)]
  assert len(cross) == (1 if scan_layers else CFG.num_decoder_layers)
  logits, _ = step(cache, encoded, tgt[:, 1:2])
  ignored, _ = step(cache, jnp.zeros_like(encoded), tgt[:, 1:2])
  np.testing.assert_array_equal(logits, ignored)
  full = model.apply(variables, src, tgt)
  np.testing.assert_allclose(logits[:, 0], full[:, 1], atol=1e-5)


def test_beam_gather_leaves_shared_cache_leaves_in_place():
  """Parents are always beams of the same example, so leaves every beam of an example shares
  (the cross-attention keys of the repeated source) need no reorder; the others are reordered
  along their own batch axis."""
  from flaxformer_lite.decoding import _gather_beams
  rows = jnp.arange(6.0)  # B=2 examples x W=3 beams
  cache = {'a': {'cross_key': rows[:, None] * jnp.ones((6, 2)), 'cached_key': rows[:, None]},
           'b': {'cached_value': jnp.stack([rows, -rows])}}  # rows on axis 1 (scanned layers)
  parents = jnp.array([[2, 2, 0], [1, 0, 0]])
  out = _gather_beams(cache, parents, {'a': 0, 'b': 1}, shared=('cross_key',))
  expected_rows = np.array([2, 2, 0, 4, 3, 3], np.float32)
  np.testing.assert_array_equal(out['a']['cached_key'][:, 0], expected_rows)
  np.testing.assert_array_equal(out['b']['cached_value'], np.stack([expected_rows, -expected_rows]))
  assert out['a']['cross_key'] is cache['a']['cross_key']


def test_seq2seq_beam_search_shares_the_cross_cache_without_changing_results(seq2seq):
  """The Transformer marks its cross-attention keys/values as shared by beams; beam search gives
  the same hypotheses as when every leaf is reordered each step."""
  import dataclasses
  model, variables = seq2seq
  src = jnp.asarray(PROMPTS)
  decoder = model.decoder_for(variables, model.check_decoding(src, 4), 4)
  assert decoder.beam_shared == ('cross_key', 'cross_value')
  shared = beam_search(model, variables, src, beam_size=3, max_new_tokens=6, length_penalty=0.6)

  class CopyEverything(type(model)):
    def decoder_for(self, *args):
      return dataclasses.replace(super().decoder_for(*args), beam_shared=())
  copied = beam_search(CopyEverything(model.config), variables, src, beam_size=3,
                       max_new_tokens=6, length_penalty=0.6)
  np.testing.assert_array_equal(shared, copied)
