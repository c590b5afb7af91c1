"""Checks made before a training run compiles anything big (issue 11, items 10 and 12).

  * Layouts: every parameter dimension the logical-axis rules split over a mesh axis must divide by
    that axis's size (`flaxformer_lite.sharding.check_divisible`); `python -m train` refuses a mesh
    that breaks this with one `error:` line instead of jax's IndivisibleError traceback. The helper
    only reads the mesh's axis sizes, so most cases run in-process on `AbstractMesh`es; one run of
    `python -m train` with 8 fake CPU devices checks the command line end to end.
  * Memory: the train step is compiled ahead of time (`train.parallel`'s `Layout.compile_steps`
    given the abstract state and a batch) and refused when XLA's memory analysis says one step
    needs more than a device has. The available memory is monkeypatched here; nothing big is
    ever run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from cli import BASE, _env, assert_one_error_line, checkpoint_steps, train
from flaxformer_lite import GPT, BertEncoder, Transformer, sharding
from train import loop, parallel
from train import state as state_lib
from train.config import RunConfig, UsageError
from train.step import make_eval_step, make_train_step

MODELS = {'gpt': GPT, 'transformer': Transformer, 'bert': BertEncoder}


def _mesh(**sizes) -> AbstractMesh:
  return AbstractMesh(tuple(sizes.get(a, 1) for a in sharding.MESH_AXES), sharding.MESH_AXES)


def _boxed(kind, config):
  """Parameter shapes with their logical axis names (nothing is allocated or compiled)."""
  model = MODELS[kind](config)
  tokens = jnp.ones((2, 8), jnp.int32)
  inputs = (tokens, tokens) if kind == 'transformer' else (tokens,)
  method = (lambda m, t: (m.mlm_logits(t), m.classify(t))) if kind == 'bert' else None
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, method=method))['params']


def _refusal(boxed, mesh, rules=sharding.LOGICAL_AXIS_RULES) -> str:
  with pytest.raises(ValueError) as info:
    sharding.check_divisible(boxed, mesh, rules)
  message = str(info.value)
  assert '\n' not in message
  return message


# ------------------------------------------------------------------------------------------------
# 1. mesh axes must divide the dimensions split over them

def test_indivisible_mesh_is_one_error_line(tmp_path):
  """The issue's command (tiny has 4 heads, tensor=8) on 8 fake CPU devices, before compiling."""
  flags = ' '.join([os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8'])
  result = train(BASE + ['--mesh', 'tensor=8', '--steps', '2', '--workdir', tmp_path / 'run'],
                 env=_env(XLA_FLAGS=flags.strip()))
  line = assert_one_error_line(result, '--mesh tensor=8:', 'heads', 'of size 4 (',
                               'does not divide by tensor=8',
                               'use a size for tensor that divides 4')
  assert re.search(r"'(kv_)?heads' of size 4 \((en|de)coder/layers_\d+/", line), line
  assert result.returncode == 2
  assert checkpoint_steps(tmp_path / 'run') == []


def test_fsdp_that_does_not_divide_embed(tiny_config):
  message = _refusal(_boxed('gpt', tiny_config()), _mesh(fsdp=3))  # d_model 32
  assert message.startswith("'embed' of size 32 (decoder/layers_0/"), message
  assert 'does not divide by fsdp=3; use a size for fsdp that divides 32' in message
  assert 'also' not in message  # nothing else is split over fsdp


@pytest.mark.parametrize('kind', list(MODELS))
@pytest.mark.parametrize('mesh', ['data=8', 'fsdp=8', 'tensor=4', 'data=2,fsdp=2,tensor=2',
                                  'fsdp=4,tensor=2'])
def test_meshes_that_divide_pass(tiny_config, kind, mesh):
  sizes = {axis: int(size) for axis, size in (part.split('=') for part in mesh.split(','))}
  assert sharding.check_divisible(_boxed(kind, tiny_config()), _mesh(**sizes)) is None


def test_grouped_query_kv_heads(tiny_config):
  """4 query heads share 2 key/value heads: tensor=4 splits the heads but not the kv_heads."""
  boxed = _boxed('gpt', tiny_config(num_kv_heads=2))
  message = _refusal(boxed, _mesh(tensor=4))
  assert message.startswith("'kv_heads' of size 2 (decoder/layers_0/self_attention/kv/"), message
  assert 'does not divide by tensor=4; use a size for tensor that divides 2' in message
  assert "'heads'" not in message
  assert sharding.check_divisible(boxed, _mesh(tensor=2, fsdp=4)) is None


def test_vocabulary_is_checked_too(tiny_config):
  """The embedding's vocabulary is split over tensor as well; 66 = 2 x 33."""
  message = _refusal(_boxed('gpt', tiny_config(vocab_size=66)), _mesh(tensor=4))
  assert message.startswith("'vocab' of size 66 (embed/embedding)"), message
  assert 'use a size for tensor that divides 2' in message  # gcd of heads 4, mlp 64, vocab 66


def test_other_offending_dimensions_are_listed_briefly(tiny_config):
  """The first one in parameter order in full, the others by name and size (and mesh axes where
  they differ from the first one's)."""
  message = _refusal(_boxed('transformer', tiny_config()), _mesh(fsdp=3, tensor=8))
  assert message == ("'kv_heads' of size 4 (decoder/layers_0/cross_attention/kv/bias) does not "
                     'divide by tensor=8; use a size for tensor that divides 4 '
                     "(also 'embed' of size 32 by fsdp=3, 'heads' of size 4)"), message


def test_rules_splitting_over_several_mesh_axes(tiny_config):
  """Flax resolves the rules (a tuple of mesh axes here); the product of their sizes counts."""
  rules = (('embed', ('fsdp', 'tensor')),)
  boxed = _boxed('gpt', tiny_config())
  message = _refusal(boxed, _mesh(fsdp=2, tensor=3), rules)
  assert 'does not divide by fsdp=2 x tensor=3; use sizes for fsdp x tensor whose product ' \
         'divides 32' in message, message
  assert sharding.check_divisible(boxed, _mesh(fsdp=2, tensor=4), rules) is None
  # The default rules split heads, mlp and vocab over tensor, embed over fsdp only.
  assert 'by tensor=3;' in _refusal(boxed, _mesh(fsdp=2, tensor=3))


def test_state_shardings_raises_parallel_error(tiny_config):
  """The train program's wrapper: a UsageError (one `error:` line) naming --mesh as given."""
  boxed = _boxed('gpt', tiny_config())
  layout = parallel.MeshLayout(_mesh(tensor=8), 8, 'tensor=-1')
  with pytest.raises(parallel.ParallelError) as info:
    layout.state_shardings(None, None, boxed)
  assert isinstance(info.value, UsageError)
  assert re.match(r"--mesh tensor=-1: '(kv_)?heads' of size 4 \(.*\) does not divide by "
                  r'tensor=8; use a size for tensor that divides 4$', str(info.value)), info.value


# ------------------------------------------------------------------------------------------------
# 2. a train step that needs more memory than a device has is refused before it runs

@pytest.fixture(scope='module')
def text_setup(tmp_path_factory):
  """A tiny GPT on `text` (--seq-len 32, --batch-size 4) and its uncompiled train step."""
  run = RunConfig(task='text', seq_len=32, batch_size=4, steps=4, dropout=0.0,
                  workdir=str(tmp_path_factory.mktemp('text')))
  setup = loop.build(run)
  return setup, _train_step(setup)


def _train_step(setup):
  return make_train_step(setup.model, setup.task, setup.tx, label_smoothing=0.1,
                         learning_rate_fn=setup.learning_rate,
                         axis_name=setup.layout.axis_name)


def _compile(setup, step, aot=True):
  extra = {}
  if aot:
    extra = dict(abstract_state=setup.abstract_state, run=setup.run,
                 batch=setup.task.dummy_batch(setup.run.batch_size))
  train, _ = setup.layout.compile_steps(step, make_eval_step(setup.model, setup.task),
                                       setup.shardings, **extra)
  return train


def _fresh_state(setup):
  create = functools.partial(state_lib.create, setup.model, setup.task, setup.tx, 0,
                             setup.task.dummy_batch(setup.run.batch_size))
  with setup.layout.context():
    state = jax.jit(create, out_shardings=setup.shardings)()
  return setup.layout.put_state(state, setup.shardings)  # pmap: one copy per device


def _mib(n: int) -> str:
  return f'{n / 2**20:.1f} MiB'


def test_memory_decision_follows_xla_memory_analysis(text_setup, monkeypatch):
  """Enough memory (to the byte) compiles; one byte less is refused with XLA's own figures."""
  setup, step = text_setup
  train = _compile(setup, step)  # this machine's real memory: plenty for this step
  assert isinstance(train, jax.stages.Compiled)
  stats = train.memory_analysis()
  need = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
          - stats.alias_size_in_bytes)
  # On CPU the state is already resident when the step is compiled: free memory no longer holds
  # it, so the arguments count as available on top of the host's free memory.
  free = need - stats.argument_size_in_bytes
  monkeypatch.setattr(parallel, 'host_available_memory', lambda: free)
  assert isinstance(_compile(setup, step), jax.stages.Compiled)
  monkeypatch.setattr(parallel, 'host_available_memory', lambda: free - 1)
  with pytest.raises(parallel.StepTooLargeError) as info:
    _compile(setup, step)
  assert isinstance(info.value, UsageError)  # the CLI prints it as one `error:` line
  message = str(info.value)
  assert '\n' not in message
  assert message == (
      f'--seq-len 32 with --batch-size 4 and --preset tiny needs about {_mib(need)} per device '
      f'for one train step, but {_mib(need - 1)} are available; lower --seq-len or --batch-size '
      '(--accumulate N with an N times smaller --batch-size keeps the examples per update)')


def test_without_seq_len_in_the_batch_the_message_leaves_it_out(tmp_path, monkeypatch):
  """dates has fixed lengths: only --batch-size can make its step smaller."""
  run = RunConfig(task='dates', batch_size=4, steps=4, workdir=str(tmp_path))
  setup = loop.build(run)
  monkeypatch.setattr(parallel, 'host_available_memory', lambda: 0)
  with pytest.raises(parallel.StepTooLargeError,
                     match=r'^--batch-size 4 and --preset tiny needs about [\d.]+ MiB per device '
                           r'for one train step, but [\d.]+ MiB are available; lower --batch-size '
                           r'\(--accumulate N'):
    _compile(setup, _train_step(setup))


def test_unknown_memory_is_not_checked(text_setup, monkeypatch):
  setup, step = text_setup
  monkeypatch.setattr(parallel, 'host_available_memory', lambda: None)
  assert isinstance(_compile(setup, step), jax.stages.Compiled)


def test_host_available_memory_is_read():
  available = parallel.host_available_memory()
  assert available is None or (isinstance(available, int) and available > 0)
  if os.path.exists('/proc/meminfo'):
    assert available is not None


@pytest.mark.parametrize('kind', ['mesh', 'pmap'])
def test_compiled_step_donates_and_matches_the_lazy_one(text_setup, kind):
  """The compiled executable is what trains (no second compilation): it donates the state and
  takes the same step as `jax.jit` / `jax.pmap` compiling on the first call."""
  setup, _ = text_setup
  if kind == 'pmap':
    layout = parallel.make_layout('pmap', None, setup.run.batch_size)
    shardings = layout.state_shardings(setup.tx, setup.abstract_state, None)
    setup = dataclasses.replace(setup, layout=layout, shardings=shardings)
  step = _train_step(setup)
  host_batch = setup.task.dummy_batch(setup.run.batch_size)
  host_batch['inputs'][:, :8] = host_batch['targets'][:, :8] = 5  # some non-pad tokens
  losses = {}
  for aot in (True, False):
    train = _compile(setup, step, aot)
    assert isinstance(train, jax.stages.Compiled) == aot
    state = _fresh_state(setup)
    with setup.layout.context():
      new_state, metrics = train(state, setup.layout.put_batch(host_batch))
      assert all(x.is_deleted() for x in jax.tree.leaves(state.params))  # donated
      new_state, metrics = train(new_state, setup.layout.put_batch(host_batch))
    unreplicated = setup.layout.unreplicate(new_state)
    assert int(unreplicated.step) == 2
    losses[aot] = float(np.asarray(setup.layout.unreplicate(metrics)['loss']))
  assert np.isfinite(losses[True]) and losses[True] == losses[False], losses


def test_boxed_params_shapes_match_the_unboxed_leaves(tiny_config):
  """`parameter_splits` pairs names with shapes leaf by leaf; the split sizes are real ones."""
  boxed = _boxed('gpt', tiny_config(num_kv_heads=2))
  splits = sharding.parameter_splits(boxed)
  leaves = {jax.tree_util.keystr(p, simple=True, separator='/'): x.shape
            for p, x in jax.tree_util.tree_leaves_with_path(nn.unbox(boxed))}
  assert {s.path for s in splits} <= set(leaves)
  assert {(s.name, s.size) for s in splits} == {('embed', 32), ('heads', 4), ('kv_heads', 2),
                                                 ('mlp', 64), ('vocab', 64)}
  for s in splits:
    assert s.size in leaves[s.path]


# ------------------------------------------------------------------------------------------------
# 3. one layout object per --parallel kind: the loop calls its methods and never asks which

def test_make_layout_gives_each_kind_its_own_object():
  n = jax.device_count()
  rows = 2 * n
  mesh = parallel.make_layout('mesh', None, rows)
  pmap = parallel.make_layout('pmap', None, rows)
  assert isinstance(mesh, parallel.MeshLayout) and mesh.axis_name is None
  assert isinstance(pmap, parallel.PmapLayout) and pmap.axis_name == 'data'
  assert mesh.process_rows() == pmap.process_rows() == slice(0, rows)  # one process
  batch = {'inputs': np.arange(rows * 3).reshape(rows, 3)}
  assert mesh.put_batch(batch)['inputs'].shape == (rows, 3)
  assert pmap.put_batch(batch)['inputs'].shape == (n, 2, 3)  # one slice per device
  tree = {'x': jnp.arange(3.0)}
  assert mesh.unreplicate(tree) is tree
  copies = pmap.put_state(tree, None)
  assert copies['x'].shape == (n, 3)
  np.testing.assert_array_equal(pmap.unreplicate(copies)['x'], tree['x'])


@pytest.mark.parametrize('kind, mesh_text, message', [
    ('mesh', 'foo=2', "--mesh foo=2: mesh axes ['foo'] are not among ('data', 'fsdp', 'tensor')"),
    ('mesh', 'data=two', '--mesh data=two: expected comma-separated AXIS=SIZE with AXIS in data, '
                         'fsdp, tensor and SIZE an integer or -1'),
    ('mesh', 'data=-1,fsdp=-1', '--mesh data=-1,fsdp=-1: only one mesh axis may be -1'),
    ('pmap', 'data=1', '--mesh applies to --parallel mesh only'),
])
def test_bad_layouts_are_one_line_parallel_errors(kind, mesh_text, message):
  """The axis names and sizes are checked once, by `sharding.make_mesh`; the syntax by
  `parse_mesh`."""
  with pytest.raises(parallel.ParallelError, match=f'^{re.escape(message)}'):
    parallel.make_layout(kind, mesh_text, 8 * jax.device_count())
