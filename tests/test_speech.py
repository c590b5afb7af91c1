"""SpeechTransformer: padded audio computes what each example alone would, the cache equals the
full pass, and greedy decoding equals a naive argmax loop over the full model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import SpeechTransformer, TransformerConfig, generate

CFG = TransformerConfig(vocab_size=30, d_model=16, num_heads=2, num_mel_bins=8, max_len=20,
                        dropout_rate=0.0, init_std=0.5, norm_position='pre')
TOL = 1e-5


@pytest.fixture(scope='module')
def speech():
  model = SpeechTransformer(CFG)
  features = jax.random.normal(jax.random.key(0), (2, 23, 8))
  variables = model.init(jax.random.key(1), features, jnp.ones((2, 5), jnp.int32))
  return model, variables, features


@pytest.mark.parametrize('length', [13, 14])  # odd and even: the strided windows differ
def test_padded_audio_equals_the_example_alone(speech, length):
  model, variables, features = speech
  tgt = jnp.array([[1, 5, 7, 9]])
  alone = model.apply(variables, features[:1, :length], tgt)
  padded = features[:1].at[:, length:].set(50.0)  # loud garbage in the padding
  valid = jnp.arange(23)[None] < length
  out = model.apply(variables, padded, tgt, src_valid=valid)
  np.testing.assert_allclose(out, alone, atol=TOL)
  assert model.frames_valid(valid).sum() == -(-(-(-length // 2)) // 2)


def test_cached_decoding_equals_the_full_pass(speech):
  model, variables, features = speech
  tgt = jnp.array([[1, 5, 7, 9, 4], [1, 3, 3, 8, 2]])
  full = model.apply(variables, features, tgt)
  encoded = model.apply(variables, features, method='encode')
  cache = model.init(jax.random.key(0), features, tgt, decode=True)['cache']
  cache = jax.tree.map(jnp.zeros_like, cache)
  steps = []
  for t in range(tgt.shape[1]):
    logits, mutated = model.apply({**variables, 'cache': cache}, encoded, features,
                                  tgt[:, t:t + 1], tgt_valid=jnp.ones((2, 1), bool),
                                  decode=True, mutable=['cache'], method='decode')
    cache = mutated['cache']
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=TOL)


def test_greedy_generate_equals_a_naive_loop(speech):
  model, variables, features = speech
  valid = jnp.arange(23)[None] < jnp.array([[23], [11]])
  out = np.asarray(generate(model, variables, features, max_new_tokens=6, valid=valid))
  for row in range(2):
    seq = [CFG.bos_id]
    for _ in range(6):
      logits = model.apply(variables, features[row:row + 1], jnp.array([seq]),
                           src_valid=valid[row:row + 1])[0, -1]
      token = int(jnp.argmax(logits.at[CFG.pad_id].set(-jnp.inf)))
      seq.append(token)
      if token == CFG.eos_id:
        break
    expected = seq[1:] + [CFG.pad_id] * (7 - len(seq))
    assert out[row].tolist() == expected


def test_bad_features_are_refused():
  model = SpeechTransformer(CFG)
  with pytest.raises(ValueError, match=r'num_mel_bins=8\]; got shape \(2, 5\)'):
    model.check_decoding(jnp.zeros((2, 5)), 4)
  with pytest.raises(ValueError, match='more than the encoder'):
    model.check_decoding(jnp.zeros((1, 200, 8)), 4)
