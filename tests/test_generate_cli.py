"""Tests of `python -m train.generate`: it decodes from the checkpoint alone.

Three tiny training runs (text, dates, sentencepiece text) are made once for the module. Then:
  * decoding reads only config.json, the tokenizer model and the newest checkpoint's params: it
    works after the training data is gone, gives exactly what the checkpoint's params give, never
    writes into the workdir and does not depend on the optimizer state's layout;
  * an unreadable newest checkpoint (damaged, or deleted by training's retention after the
    listing) is skipped with one warning line, in-progress and moved-aside folders are ignored;
  * bad options, workdirs and config.json files are each one `error:` line and exit 2.

Cheap failures run `train.generate.main` in-process; the end-to-end cases run it as a subprocess,
with the XLA flags of this process so both compile alike (greedy outputs are compared).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cli import (BASE, ROOT, TIMEOUT, Background, _env, assert_one_error_line, corpus_text,
                 restore_state, snapshot)
from flaxformer_lite import GPT, Transformer, TransformerConfig, generate
from train import data
from train import generate as generate_cli

TEXT_ARGS = ['--seq-len', '32', '--steps', '4', '--checkpoint-every', '2', '--eval-every', '4',
             '--log-every', '2']
DATES = ['March 3, 2001', '12/25/1999']


def env():
  """Subprocess environment with this process's XLA flags (set by conftest: fast compiles)."""
  return _env(XLA_FLAGS=os.environ.get('XLA_FLAGS', ''))


def run_generate(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'train.generate', *map(str, args)], cwd=ROOT,
                        env=env(), capture_output=True, text=True, timeout=TIMEOUT)


def call_main(capsys, *args):
  """`train.generate.main(args)` in this process, as a CompletedProcess-like result."""
  rc = generate_cli.main([str(a) for a in args])
  out = capsys.readouterr()
  return types.SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{'text', 'dates', 'sp'}: workdirs of finished tiny runs; 'data': their training files.

  The runs start together (they mostly wait on their subprocesses' compiles)."""
  root = tmp_path_factory.mktemp('generate')
  for name in ('text', 'sp'):
    (root / f'{name}.txt').write_text(corpus_text())
  args = {
      'text': ['--task', 'text', '--data', root / 'text.txt', *TEXT_ARGS],
      'dates': ['--task', 'dates', '--steps', '4', '--checkpoint-every', '4', '--log-every', '2'],
      'sp': ['--task', 'text', '--data', root / 'sp.txt', '--tokenizer', 'sentencepiece',
             '--vocab-size', '200', *TEXT_ARGS],
  }
  procs = {name: Background([*a, *BASE, '--workdir', root / name], root / 'logs', name, env=env())
           for name, a in args.items()}
  for name, proc in procs.items():
    assert proc.wait() == 0, proc.stderr
  return {**{name: root / name for name in args}, 'data': root}


def reference(workdir: pathlib.Path, step: int, texts: list[str], max_new: int,
              tokenizer=data.ByteTokenizer()) -> list[str]:
  """Greedy decoding in this process from the params of a full orbax restore of `step`."""
  meta = json.loads((workdir / 'config.json').read_text())
  cfg = TransformerConfig.from_dict(meta['model_config'])
  params = restore_state(workdir, step)['params']
  if meta['task'] == 'text':
    length = max(len(tokenizer.encode(t)) for t in texts)
    tokens = np.stack([data.pad_to(tokenizer.encode(t), length) for t in texts])
    out = generate(GPT(cfg), {'params': params}, tokens, max_new_tokens=max_new)
    return [t + tokenizer.decode(row) for t, row in zip(texts, np.asarray(out))]
  tokens = np.stack([data.pad_to(tokenizer.encode(t), 40) for t in texts])
  out = generate(Transformer(cfg), {'params': params}, tokens, max_new_tokens=max_new)
  return [f'{t} -> {tokenizer.decode(row)}' for t, row in zip(texts, np.asarray(out))]


def assert_same_params(restored, saved):
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
    assert isinstance(a, (np.ndarray, jax.Array))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def copy_workdir(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(src, dst)
  return dst


# ------------------------------------------------------------------------------------------------
# decoding from the checkpoint alone

def test_text_run_decodes_without_its_data_and_writes_nothing(runs):
  workdir = runs['text']
  prompts = ['def ', 'The quick']
  args = ['--workdir', workdir, '--prompt', prompts[0], '--prompt', prompts[1],
          '--max-new-tokens', 8, '--temperature', 0]
  before = run_generate(*args)
  assert before.returncode == 0, before.stderr
  expected = reference(workdir, 4, prompts, 8)
  assert before.stdout.splitlines() == expected
  data_file = runs['data'] / 'text.txt'
  data_file.rename(data_file.with_suffix('.moved'))
  files = snapshot(workdir)
  after = run_generate(*args)
  assert after.returncode == 0, after.stderr
  assert after.stderr.strip() == ''
  assert after.stdout == before.stdout  # greedy: same params, same output
  assert snapshot(workdir) == files  # nothing written, nothing removed


def test_params_only_restore_equals_the_newest_checkpoint(runs):
  loaded = generate_cli.load(str(runs['text']))
  assert loaded.step == 4
  assert isinstance(loaded.model, GPT)
  assert_same_params(loaded.params, restore_state(runs['text'], 4)['params'])


def test_restore_ignores_the_optimizer_state_and_extra_config_keys(runs, tmp_path):
  """A checkpoint whose opt_state has another structure (e.g. wrapped by apply_if_finite)."""
  workdir = copy_workdir(runs['text'], tmp_path / 'w')
  config = json.loads((workdir / 'config.json').read_text())
  config['format_version'] = 2  # keys added by newer training code are ignored
  (workdir / 'config.json').write_text(json.dumps(config))
  saved = restore_state(workdir, 4)
  other = {'step': np.int32(6), 'params': saved['params'], 'rng': saved['rng'],
           'opt_state': {'inner_state': [np.zeros(3, np.float32)], 'notfinite_count': np.int32(0)}}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save((workdir / 'checkpoints' / '6' / 'state').absolute(), other)
  ckptr.wait_until_finished()
  ckptr.close()
  loaded = generate_cli.load(str(workdir))
  assert loaded.step == 6
  assert_same_params(loaded.params, saved['params'])


def test_dates_run_rewrites_inputs_greedy_and_with_beam_search(runs):
  workdir = runs['dates']
  greedy = run_generate('--workdir', workdir, '--input', DATES[0], '--input', DATES[1])
  assert greedy.returncode == 0, greedy.stderr
  assert greedy.stdout.splitlines() == reference(workdir, 4, DATES, 12)
  beam = run_generate('--workdir', workdir, '--input', DATES[0], '--beam-size', 2,
                      '--max-new-tokens', 6)
  assert beam.returncode == 0, beam.stderr
  lines = beam.stdout.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'{DATES[0]} -> ')
  assert len(lines[0]) <= len(f'{DATES[0]} -> ') + 6  # at most 6 new bytes


def test_sentencepiece_run_needs_only_its_tokenizer_model(runs, tmp_path, capsys):
  workdir = runs['sp']
  (runs['data'] / 'sp.txt').unlink()
  tokenizer = data.SentencePieceTokenizer(str(workdir / 'tokenizer.model'))
  result = run_generate('--workdir', workdir, '--prompt', 'The quick', '--max-new-tokens', 6)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == reference(workdir, 4, ['The quick'], 6, tokenizer)
  # Without the tokenizer model: one line, before any checkpoint is read.
  copy = copy_workdir(workdir, tmp_path / 'w')
  (copy / 'tokenizer.model').unlink()
  assert_one_error_line(call_main(capsys, '--workdir', copy, '--prompt', 'x'), 'tokenizer.model')


# ------------------------------------------------------------------------------------------------
# unreadable checkpoints

def damage(step_dir: pathlib.Path, how: str) -> None:
  """'overwrite': every file becomes garbage; 'data': the array data files are gone (as when
  training's retention deletes the step while it is being read), the metadata is intact."""
  for path in step_dir.rglob('*'):
    if path.is_file() and how == 'overwrite':
      path.write_bytes(b'not a checkpoint')
    elif path.is_file() and how == 'data' and path.parent.name == 'd':
      path.unlink()


def test_damaged_newest_checkpoint_falls_back_with_one_warning(runs, tmp_path):
  workdir = copy_workdir(runs['text'], tmp_path / 'w')
  ckpts = workdir / 'checkpoints'
  damage(ckpts / '4', 'data')
  (ckpts / '6.orbax-checkpoint-tmp-1234' / 'state').mkdir(parents=True)  # a save in progress
  shutil.copytree(runs['text'] / 'checkpoints' / '4', ckpts / '8.damaged')  # moved aside
  files = snapshot(workdir)
  result = run_generate('--workdir', workdir, '--prompt', 'def ', '--max-new-tokens', 8)
  assert result.returncode == 0, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('warning:') and 'step 4' in lines[0], lines
  assert 'Traceback' not in result.stderr
  assert result.stdout.splitlines() == reference(workdir, 2, ['def '], 8)
  assert snapshot(workdir) == files  # the tmp folder of the save in progress is left alone
  # Nothing readable at all: one error line.
  damage(ckpts / '2', 'overwrite')
  assert_one_error_line(run_generate('--workdir', workdir, '--prompt', 'def '),
                        'step 4', 'step 2')


def test_step_deleted_between_listing_and_reading(runs, monkeypatch, capsys):
  workdir = str(runs['text'])
  listed = generate_cli.finished_steps(workdir)
  assert listed == [4, 2]
  monkeypatch.setattr(generate_cli, 'finished_steps', lambda w: [6, *listed])
  loaded = generate_cli.load(workdir)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('warning:') and 'step 6' in err[0], err
  assert loaded.step == 4
  assert_same_params(loaded.params, restore_state(runs['text'], 4)['params'])


def test_model_config_that_does_not_fit_the_checkpoint_is_one_line(runs, tmp_path, capsys):
  workdir = copy_workdir(runs['text'], tmp_path / 'w')
  config = json.loads((workdir / 'config.json').read_text())
  for change in ({'d_model': 128}, {'num_decoder_layers': 3}):
    edited = {**config, 'model_config': {**config['model_config'], **change}}
    (workdir / 'config.json').write_text(json.dumps(edited))
    assert_one_error_line(call_main(capsys, '--workdir', workdir, '--prompt', 'x'),
                          'model_config does not match the checkpoint at step 4')


def test_no_finished_checkpoint_yet_is_one_line(runs, tmp_path):
  workdir = tmp_path / 'w'
  (workdir / 'checkpoints' / '2.orbax-checkpoint-tmp-99' / 'state').mkdir(parents=True)
  (workdir / 'checkpoints' / '4.damaged').mkdir()
  shutil.copy(runs['text'] / 'config.json', workdir / 'config.json')
  files = snapshot(workdir)
  assert_one_error_line(run_generate('--workdir', workdir, '--prompt', 'x'),
                        f'--workdir {workdir}', 'no finished checkpoint')
  assert snapshot(workdir) == files
  shutil.rmtree(workdir / 'checkpoints')
  assert_one_error_line(run_generate('--workdir', workdir, '--prompt', 'x'),
                        'no finished checkpoint')


# ------------------------------------------------------------------------------------------------
# bad options, workdirs and config.json files: one line each

@pytest.mark.parametrize('option, value', [
    ('--max-new-tokens', '0'), ('--max-new-tokens', '-3'), ('--temperature', 'nan'),
    ('--temperature', 'inf'), ('--temperature', '-0.5'), ('--top-k', '0'), ('--top-p', '0'),
    ('--top-p', '1.5'), ('--top-p', 'nan'), ('--beam-size', '-1')])
def test_bad_option_is_refused_before_the_workdir(option, value, tmp_path, capsys):
  missing = tmp_path / 'missing'
  result = call_main(capsys, '--workdir', missing, '--prompt', 'x', option, value)
  line = assert_one_error_line(result, option, value)
  assert '--workdir' not in line
  assert not missing.exists()


def test_missing_or_empty_workdir_is_one_line(tmp_path, capsys):
  assert_one_error_line(call_main(capsys, '--workdir', tmp_path / 'missing', '--prompt', 'x'),
                        f'--workdir {tmp_path / "missing"}')
  assert_one_error_line(call_main(capsys, '--workdir', tmp_path, '--prompt', 'x'),
                        f'--workdir {tmp_path}', 'config.json')
  (tmp_path / 'file').write_text('')
  assert_one_error_line(call_main(capsys, '--workdir', tmp_path / 'file', '--prompt', 'x'),
                        '--workdir')


def _edit(**changes):
  """A config.json edit: top-level keys, or 'run__K' / 'model_config__K' inside; None deletes."""
  def apply(config):
    for key, value in changes.items():
      parent, _, name = key.rpartition('__')
      target = config[parent] if parent else config
      if value is None:
        del target[name]
      else:
        target[name] = value
    return json.dumps(config)
  return apply


BAD_CONFIGS = {
    'truncated': lambda c: json.dumps(c)[:200],
    'not utf-8': lambda c: b'\xff\xfe{}',
    'not an object': lambda c: '[1, 2]',
    'no task': _edit(task=None),
    'no run': _edit(run=None),
    'no model_config': _edit(model_config=None),
    'task not a string': _edit(task=7),
    'unknown task': _edit(task='vision'),
    'run not an object': _edit(run='text'),
    'no tokenizer': _edit(run__tokenizer=None),
    'unknown tokenizer': _edit(run__tokenizer='bpe'),
    'model_config not an object': _edit(model_config=[64]),
    'model_config wrong type': _edit(model_config__d_model='64'),
    'model_config refused': _edit(model_config__num_heads=5),
    'model_config unknown field': _edit(model_config__heads=4),
    'model_config bad dtype': _edit(model_config__dtype='float99'),
    'model_config pad_id wrong type': _edit(model_config__pad_id='0'),
    'vocabulary too small': _edit(model_config__vocab_size=16, model_config__pad_id=0,
                                  model_config__bos_id=1, model_config__eos_id=2),
    'translate seq_len wrong type': _edit(task='translate', run__seq_len='long'),
}


@pytest.mark.parametrize('case', list(BAD_CONFIGS))
def test_bad_config_json_is_one_line(case, runs, tmp_path, capsys):
  """Checked before any checkpoint is read: these workdirs have none."""
  config = json.loads((runs['text'] / 'config.json').read_text())
  text = BAD_CONFIGS[case](config)
  path = tmp_path / 'config.json'
  path.write_bytes(text if isinstance(text, bytes) else text.encode())
  result = call_main(capsys, '--workdir', tmp_path, '--prompt', 'x', '--input', 'x')
  assert_one_error_line(result, f'--workdir {tmp_path}: config.json')


def test_config_json_that_is_a_folder_is_one_line(tmp_path, capsys):
  (tmp_path / 'config.json').mkdir()
  assert_one_error_line(call_main(capsys, '--workdir', tmp_path, '--prompt', 'x'),
                        f'--workdir {tmp_path}: config.json')


def test_mlm_run_has_no_generator(runs, tmp_path, capsys):
  config = json.loads((runs['text'] / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**config, 'task': 'mlm'}))
  assert_one_error_line(call_main(capsys, '--workdir', tmp_path, '--prompt', 'x'), 'mlm',
                        'no generator')


def test_request_errors_are_one_line(runs, capsys):
  workdir = runs['text']
  assert_one_error_line(call_main(capsys, '--workdir', workdir), '--prompt')
  assert_one_error_line(call_main(capsys, '--workdir', runs['dates'], '--prompt', 'x'),
                        '--input')
  # The library's own check: prompt + new tokens longer than the model's positions.
  assert_one_error_line(call_main(capsys, '--workdir', workdir, '--prompt', 'x' * 250,
                                  '--max-new-tokens', 10), 'max_len')
