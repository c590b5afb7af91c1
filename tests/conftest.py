"""Shared test fixtures: tiny configs, token helpers, model variables initialized once a session and
jitted `apply`s shared between tests."""

import importlib.metadata
import os

# XLA's compile time dominates these tests on CPU (tiny models, many shapes and variants). Without
# LLVM optimization and with the classic CPU emitters, compiling is ~2.5x faster; neither changes
# the float32 semantics (no fast-math either way). Set before JAX starts its backend, only where no
# GPU plugin is installed (GPU codegen is left alone); flags already set are kept.
_GPU_PLUGIN = any(
    (d.metadata['Name'] or '').lower().replace('_', '-').startswith(('jax-cuda', 'jax-rocm'))
    for d in importlib.metadata.distributions())
_FAST_COMPILE = {'--xla_backend_optimization_level': '0', '--xla_cpu_use_fusion_emitters': 'false'}
_flags = os.environ.get('XLA_FLAGS', '')
if not _GPU_PLUGIN:
  os.environ['XLA_FLAGS'] = ' '.join(
      [_flags] + [f'{k}={v}' for k, v in _FAST_COMPILE.items() if k not in _flags]).strip()

import flax.linen as nn  # noqa: E402  (after XLA_FLAGS)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from flaxformer_lite import GPT, BertEncoder, Transformer, TransformerConfig

# The numerical tests compare float32 results with float64 references at ~1e-5. On GPUs JAX may
# run float32 matmuls in TF32 by default, which is ~1e-3 accurate; ask for full float32 everywhere
# (a no-op on CPU).
jax.config.update('jax_default_matmul_precision', 'highest')

# Tiny enough to run everything on two CPU cores in seconds; dropout off unless a test turns it on.
TINY = dict(vocab_size=64, d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
            d_ff=64, max_len=32, dropout_rate=0.0, attention_dropout_rate=0.0)

MODELS = {'gpt': GPT, 'transformer': Transformer, 'bert': BertEncoder}


def _tiny_config(**overrides) -> TransformerConfig:
  return TransformerConfig.preset('tiny', **{**TINY, **overrides})


def _random_tokens(seed, shape, vocab_size=TINY['vocab_size']):
  """Random int32 token ids in [1, vocab_size): never the pad id 0."""
  return jnp.asarray(np.random.default_rng(seed).integers(1, vocab_size, size=shape), jnp.int32)


def _example_inputs(kind, batch=2, length=8):
  tokens = _random_tokens(0, (batch, length))
  return (tokens, tokens) if kind == 'transformer' else (tokens,)


@pytest.fixture(scope='session')
def tiny_config():
  """tiny_config(**overrides) -> the tiny preset shrunk to d_model 32, 4 heads, 2 layers."""
  return _tiny_config


@pytest.fixture(scope='session')
def random_tokens():
  """random_tokens(seed, shape, vocab_size=64) -> int32 ids in [1, vocab_size), never pad_id 0."""
  return _random_tokens


@pytest.fixture(scope='session')
def init_model():
  """init_model(kind, **config_overrides) -> (model, params), `kind` 'gpt', 'transformer' or 'bert'.

  Each distinct (kind, config) is initialized once per session and shared by every test that
  asks for it. BertEncoder is initialized with both heads (masked-LM and classifier) as well as
  the backbone and pooler.
  """
  cache = {}

  def get(kind, **overrides):
    cfg = _tiny_config(**overrides)
    if (kind, cfg) not in cache:
      model = MODELS[kind](cfg)
      method = (lambda m, tokens: (m.mlm_logits(tokens), m.classify(tokens))) if kind == 'bert' \
          else None
      init = jax.jit(lambda rng, *inputs: model.init(rng, *inputs, method=method))
      variables = init(jax.random.key(0), *_example_inputs(kind))
      cache[kind, cfg] = (model, nn.unbox(variables)['params'])  # plain arrays, no axis metadata
    return cache[kind, cfg]

  return get


@pytest.fixture(scope='session')
def jit_apply():
  """jit_apply(model, variables, *args, rngs=None, **static) == model.apply(variables, *args,
  rngs=rngs, **static), through one `jax.jit` per (model, static kwargs) for the whole session, so
  tests that run the same model on the same shapes share one compilation. Static kwargs must be
  hashable (pass `mutable` as a tuple). Token values are not checked under jit (traced)."""
  cache = {}

  def run(model, variables, *args, rngs=None, **static):
    key = (model, tuple(sorted(static.items(), key=lambda kv: kv[0])))
    if key not in cache:
      cache[key] = jax.jit(lambda variables, *args, rngs: model.apply(variables, *args, rngs=rngs,
                                                                       **static))
    return cache[key](variables, *args, rngs=rngs)

  return run


@pytest.fixture(scope='session')
def gpt(init_model):
  """The default tiny GPT: (model, params)."""
  return init_model('gpt')


@pytest.fixture(scope='session')
def transformer(init_model):
  """The default tiny encoder-decoder Transformer: (model, params)."""
  return init_model('transformer')


@pytest.fixture(scope='session')
def bert(init_model):
  """The default tiny BertEncoder with both heads: (model, params)."""
  return init_model('bert')
