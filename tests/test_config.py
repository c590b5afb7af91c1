"""TransformerConfig validation, presets, hashing, serialization; early errors for bad tokens."""

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import pytest

from flaxformer_lite import PRESETS, TransformerConfig

BAD_CONFIGS = [
    (dict(d_model=10, num_heads=3), 'd_model=10 is not divisible by num_heads=3'),
    (dict(num_heads=4, num_kv_heads=3), 'num_heads=4 is not divisible by num_kv_heads=3'),
    (dict(num_heads=4, num_kv_heads=0), 'num_kv_heads=0'),
    (dict(activation='tanh'), "activation='tanh'"),
    (dict(norm='batchnorm'), "norm='batchnorm'"),
    (dict(norm_position='middle'), "norm_position='middle'"),
    (dict(positions='alibi'), "positions='alibi'"),
    (dict(attention_impl='flash'), "attention_impl='flash'"),
    (dict(remat='everything'), "remat='everything'"),
    (dict(positions='rotary', d_model=20, num_heads=4), 'head_dim=5'),  # derived head_dim
    (dict(positions='rotary', head_dim=7), 'head_dim=7'),  # explicit head_dim
    (dict(dropout_rate=-0.1), 'dropout_rate=-0.1'),
    (dict(attention_dropout_rate=-0.5), 'attention_dropout_rate=-0.5'),
    (dict(dropout_rate=1.0), 'dropout_rate=1.0'),
    (dict(vocab_size=100, pad_id=100), 'pad_id=100'),
    (dict(pad_id=-1), 'pad_id=-1'),
    (dict(pad_id=2, eos_id=2), 'eos_id=2 equals pad_id'),
    (dict(dropout_rate='0.1'), "dropout_rate='0.1'"),
    (dict(rope_base=0.0), 'rope_base=0.0'),
    (dict(init_std=-0.02), 'init_std=-0.02'),
    (dict(dtype='float33'), "dtype='float33'"),
    (dict(vocab_size=0), 'vocab_size=0'),
    (dict(num_decoder_layers=-1), 'num_decoder_layers=-1'),
]


@pytest.mark.parametrize('overrides, message', BAD_CONFIGS,
                         ids=[m.split('=')[0].split()[-1] for _, m in BAD_CONFIGS])
def test_bad_config_raises_naming_the_value(overrides, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    TransformerConfig(**overrides)
  with pytest.raises(ValueError, match=re.escape(message)):  # presets and replace validate too
    TransformerConfig.preset('tiny', **overrides)
  with pytest.raises(ValueError, match=re.escape(message)):
    TransformerConfig().replace(**overrides)


def test_unknown_preset_raises():
  with pytest.raises(ValueError, match="'gpt5'"):
    TransformerConfig.preset('gpt5')


def test_presets_build_and_accept_overrides():
  for name in PRESETS:
    assert isinstance(TransformerConfig.preset(name), TransformerConfig)
  cfg = TransformerConfig.preset('gpt2-small', dropout_rate=0.0, vocab_size=50304)
  assert (cfg.dropout_rate, cfg.vocab_size, cfg.d_model, cfg.num_decoder_layers) == (0.0, 50304,
                                                                                     768, 12)
  assert cfg.head_dim == 64 and cfg.num_kv_heads == 12


def test_config_is_frozen_hashable_and_a_jit_static_argument():
  a, b = TransformerConfig.preset('tiny'), TransformerConfig.preset('tiny')
  assert a == b and a is not b and hash(a) == hash(b)
  assert {a: 'x'}[b] == 'x'
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.d_model = 32

  traces = []

  @functools.partial(jax.jit, static_argnums=1)
  def scaled(x, cfg):
    traces.append(cfg)
    return x * cfg.d_model

  assert float(scaled(1.0, a)) == a.d_model
  assert float(scaled(1.0, b)) == a.d_model and len(traces) == 1  # equal config: cache hit
  c = a.replace(d_model=128)
  assert float(scaled(1.0, c)) == 128 and len(traces) == 2


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_to_dict_from_dict_round_trip(name):
  cfg = TransformerConfig.preset(name, dtype=jnp.bfloat16)
  fields = cfg.to_dict()
  assert fields['dtype'] == 'bfloat16' and fields['param_dtype'] == 'float32'
  restored = TransformerConfig.from_dict(json.loads(json.dumps(fields)))  # through JSON
  assert restored == cfg
  assert restored.to_dict() == fields
  assert jnp.dtype(restored.dtype) == jnp.bfloat16


def test_round_tripped_config_hashes_like_the_original():
  # Equal objects must have equal hashes (Python's data model): otherwise a config reloaded from
  # config.json misses every dict, set or functools.cache keyed by the original config.
  cfg = TransformerConfig.preset('tiny')
  restored = TransformerConfig.from_dict(cfg.to_dict())
  assert restored == cfg
  assert hash(restored) == hash(cfg)
  assert {cfg: 'found'}.get(restored) == 'found'


def test_from_dict_rejects_unknown_fields():
  fields = {**TransformerConfig().to_dict(), 'num_experts': 8}
  with pytest.raises(ValueError, match='num_experts'):
    TransformerConfig.from_dict(fields)


# Bad token arrays, raised eagerly by `apply` (before anything is compiled). The tiny config has
# vocab_size=64 and max_len=32.
BAD_TOKENS = {
    'too_long': (lambda t: jnp.ones((2, 33), jnp.int32), 'length 33 is longer than max_len=32'),
    'negative': (lambda t: t.at[1, 3].set(-1), 'holds id -1, outside the vocabulary [0, 64)'),
    'too_big': (lambda t: t.at[0, 5].set(64), 'holds id 64, outside the vocabulary [0, 64)'),
    'empty_batch': (lambda t: t[:0], 'shape (0, 8) is empty: batch and length must be positive'),
    'empty_length': (lambda t: t[:, :0], 'shape (2, 0) is empty'),
}


@pytest.mark.parametrize('bad', BAD_TOKENS)
@pytest.mark.parametrize('kind, argument', [('gpt', 0), ('bert', 0), ('transformer', 0),
                                            ('transformer', 1)])
def test_bad_tokens_raise_at_call_time(init_model, random_tokens, kind, argument, bad):
  model, params = init_model(kind)
  make_bad, message = BAD_TOKENS[bad]
  inputs = [random_tokens(0, (2, 8)) for _ in range(2 if kind == 'transformer' else 1)]
  inputs[argument] = make_bad(inputs[argument])
  with pytest.raises(ValueError, match=re.escape(message)):
    model.apply({'params': params}, *inputs)
  if bad == 'too_long':  # shapes are static, so the length is checked while tracing, too
    with pytest.raises(ValueError, match=re.escape(message)):
      jax.jit(lambda p, *a: model.apply({'params': p}, *a))(params, *inputs)


def test_bert_token_types_out_of_range_raise():
  from flaxformer_lite import BertEncoder
  model = BertEncoder(TransformerConfig.preset('tiny', d_model=32, d_ff=64, vocab_size=64))
  tokens = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match=r'token_types holds 2, outside \[0, type_vocab_size=2\)'):
    model.init(jax.random.key(0), tokens, jnp.array([[0, 1, 2, 0]]))


def test_head_counts_and_sizes_have_one_name_each():
  """num_kv_heads and head_dim are resolved once (None: multi-head, d_model // num_heads); a
  derived value follows d_model / num_heads through replace() and round-trips as None."""
  cfg = TransformerConfig.preset('tiny')
  assert (cfg.num_kv_heads, cfg.head_dim) == (4, 16)
  wider = cfg.replace(d_model=128, num_heads=8)
  assert (wider.num_kv_heads, wider.head_dim) == (8, 16)
  assert cfg.to_dict()['head_dim'] is None and cfg.to_dict()['num_kv_heads'] is None
  assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
  explicit = cfg.replace(num_kv_heads=2, head_dim=32)
  assert explicit.replace(d_model=128).head_dim == 32  # given, so kept
  assert explicit.to_dict()['num_kv_heads'] == 2
  assert explicit == TransformerConfig.from_dict(explicit.to_dict())
  assert cfg == cfg.replace(head_dim=16, num_kv_heads=4)  # the same model, however it was spelled
