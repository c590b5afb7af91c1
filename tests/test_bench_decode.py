"""benchmarks/decode.py: the uncached loop agrees with `generate`, and a tiny measuring run."""


import numpy as np
import pytest

from benchmarks import decode
from flaxformer_lite import generate

TINY = dict(layers=2, heads=2, d_model=16, vocab=64)


def _until_eos(tokens, eos_id):
  """Each row up to and including its first eos_id (generate pads after it)."""
  out = []
  for row in np.asarray(tokens):
    hits = np.flatnonzero(row == eos_id)
    out.append(row[:hits[0] + 1] if len(hits) else row)
  return out


@pytest.mark.parametrize('family', ['gpt', 'transformer'])
def test_uncached_greedy_matches_cached_generate(family):
  # Wide init and pre-norm: random tiny models otherwise repeat one token, a weak check.
  cfg = decode.model_config(family, TINY, max_len=32).replace(init_std=1.0, norm_position='pre')
  model, variables, inputs = decode.build(family, cfg, batch=3, length=6)
  cached = generate(model, variables, inputs, max_new_tokens=10)
  uncached = decode.uncached_generate(model, variables, inputs, new_tokens=10)
  assert uncached.shape == cached.shape == (3, 10)
  for a, b in zip(_until_eos(cached, cfg.eos_id), _until_eos(uncached, cfg.eos_id)):
    np.testing.assert_array_equal(a, b)


def test_steps_run_counts_columns_until_every_row_ends():
  assert decode.steps_run(np.array([[5, 6, 7], [5, 9, 6]]), eos_id=9) == 3
  assert decode.steps_run(np.array([[9, 0, 0], [5, 9, 0]]), eos_id=9) == 2


def test_measure_quick_runs_every_peer_to_the_full_length():
  """A quick run measures every row and peer, each making all its new tokens (transformers is
  made never to stop early). Timings are not asserted: they are the benchmark's output."""
  pytest.importorskip('torch')  # transformers imports without torch, but its models need it
  pytest.importorskip('transformers')
  setup = dict(gpt=TINY, transformer=TINY, prompt_len=8, new_tokens=4, uncached_new=2,
               batches=(2,), source_lens=(8, 16), beam=dict(beams=2, batches=(1,), new_tokens=3))
  result = decode.measure(setup, repeats=1)
  assert [(r['model'], r['batch']) for r in result['rows']] == [('gpt', 2), ('transformer', 2)]
  for row in result['rows']:
    assert row['cached']['new_tokens'] == row['transformers']['new_tokens'] == 4
    assert row['uncached']['new_tokens'] == 2
  assert [r['source_len'] for r in result['source_sweep']] == [8, 16]
  assert [(r['batch'], r['beams']) for r in result['beam']] == [(1, 2)]
  assert set(result['beam'][0]) >= {'shared', 'copied', 'transformers'}


def test_beam_with_every_leaf_reordered_finds_the_same_hypotheses():
  """The benchmark's comparison point (`_CopyEveryLeaf`) searches the same beams as ours."""
  from flaxformer_lite import beam_search
  cfg = decode.model_config('transformer', TINY, max_len=32).replace(init_std=1.0)
  model, variables, inputs = decode.build('transformer', cfg, batch=3, length=6)
  ours = beam_search(model, variables, inputs, beam_size=3, max_new_tokens=8)
  copied = beam_search(decode._CopyEveryLeaf(cfg), variables, inputs, beam_size=3,
                       max_new_tokens=8)
  np.testing.assert_array_equal(ours, copied)
