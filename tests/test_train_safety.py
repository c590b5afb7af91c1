"""Nothing lost, nothing silent: `python -m train` on workdirs, checkpoints, data and signals that
go wrong, run as subprocesses (tiny runs), plus in-process units of the pieces.

Groups:
  * a run owns its workdir: a folder of someone else's files is refused untouched, a second run
    on a workdir in use is refused;
  * damaged checkpoints (a truncated file, a deleted file, unreadable metadata) are moved aside
    and the run resumes from the newest one that restores, ending bit-equal to an undamaged run;
    when none restores: one line, nothing moved;
  * NaN: options refused; a non-finite step stops the run (the last good checkpoint stays the
    newest) or, with --on-nan skip, is skipped and counted;
  * files replaced whole (config.json, metrics.jsonl, the tokenizer); a stale tokenizer and
    changed data are refused by name;
  * signals: Ctrl-C while starting and a second Ctrl-C during the final save end cleanly;
  * a full disk is one line, the checkpoints already written intact.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import pathlib
import shutil
import signal

import jax
import numpy as np
import pytest

from cli import (BASE, Background, assert_one_error_line, checkpoint_steps, corpus_text,
                 max_logged_step, read_metrics, restore_state, snapshot, train, without_wallclock)

STEPS = 6


@pytest.fixture(scope='module')
def run_args(tmp_path_factory) -> list:
  """GPT on a small text: the cheapest task to compile and evaluate."""
  corpus = tmp_path_factory.mktemp('corpus') / 'corpus.txt'
  corpus.write_text(corpus_text())
  return ['--task', 'text', '--data', corpus, '--seq-len', '32', '--steps', STEPS,
          '--checkpoint-every', '2', '--log-every', '2', '--eval-every', '6', *BASE]


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.strip()]


def _assert_same_state(a_dir: pathlib.Path, b_dir: pathlib.Path, step: int) -> None:
  a, b = restore_state(a_dir, step), restore_state(b_dir, step)
  a_leaves, a_def = jax.tree.flatten(a)
  b_leaves, b_def = jax.tree.flatten(b)
  assert a_def == b_def and len(a_leaves) > 10
  for x, y in zip(a_leaves, b_leaves):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------------
# damaged checkpoints: one undamaged run, copies of its workdir damaged in three ways, rerun

def _largest_file(directory: pathlib.Path) -> pathlib.Path:
  return max((p for p in directory.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


DAMAGES = {
    'truncated-file': lambda step: _largest_file(step / 'state').write_bytes(
        _largest_file(step / 'state').read_bytes()[:100]),
    'deleted-file': lambda step: _largest_file(step / 'state').unlink(),
    'unreadable-meta': lambda step: (step / 'meta' / 'metadata').write_text('{"task": "da'),
}


@pytest.fixture(scope='module')
def damaged(tmp_path_factory, run_args):
  root = tmp_path_factory.mktemp('damaged')
  base = root / 'base'
  result = train([*run_args, '--workdir', base])
  assert result.returncode == 0, result.stderr[-3000:]
  assert checkpoint_steps(base) == [2, 4, 6]
  cases = {}
  for name, damage in DAMAGES.items():
    shutil.copytree(base, root / name)
    damage(root / name / 'checkpoints' / '6')
  # A torn config.json (a kill while an older version wrote it in place) is rewritten whole.
  (root / 'truncated-file' / 'config.json').write_text('{"task": "text", "ru')
  shutil.copytree(base, root / 'all')
  for step in (2, 4, 6):
    DAMAGES['truncated-file'](root / 'all' / 'checkpoints' / str(step))
  before_all = snapshot(root / 'all')
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {name: pool.submit(train, [*run_args, '--workdir', root / name])
               for name in [*DAMAGES, 'all']}
    cases = {name: f.result() for name, f in futures.items()}
  return dict(root=root, base=base, results=cases, before_all=before_all)


@pytest.mark.parametrize('name', sorted(DAMAGES))
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes(damaged, name):
  result, workdir = damaged['results'][name], damaged['root'] / name
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  lines = _error_lines(result.stderr)
  assert len(lines) == 1 and lines[0].startswith('warning:'), result.stderr
  assert 'step 6' in lines[0] and '6.damaged' in lines[0] and 'from step 4' in lines[0]
  assert 'resuming from step 4' in result.stdout
  assert (workdir / 'checkpoints' / '6.damaged' / 'state').is_dir()  # kept, never deleted
  assert checkpoint_steps(workdir) == [2, 4, 6]


@pytest.mark.parametrize('name', sorted(DAMAGES))
def test_resuming_past_a_damaged_checkpoint_ends_as_an_undamaged_run(damaged, name):
  workdir = damaged['root'] / name
  _assert_same_state(damaged['base'], workdir, STEPS)
  assert without_wallclock(read_metrics(workdir)) == without_wallclock(
      read_metrics(damaged['base']))


def test_torn_config_json_is_rewritten(damaged):
  config = json.loads((damaged['root'] / 'truncated-file' / 'config.json').read_text())
  expected = json.loads((damaged['base'] / 'config.json').read_text())
  expected['run']['workdir'] = str(damaged['root'] / 'truncated-file')
  assert config == expected


def test_no_checkpoint_restores_is_one_line_and_nothing_moves(damaged):
  line = assert_one_error_line(damaged['results']['all'], 'no checkpoint', 'step 6', 'step 2',
                               'nothing was moved')
  assert 'resuming' not in damaged['results']['all'].stdout, line
  assert snapshot(damaged['root'] / 'all') == damaged['before_all']


# ------------------------------------------------------------------------------------------------
# the workdir: someone else's files, a second run, Ctrl-C while starting

def test_a_folder_of_someone_elses_files_is_refused_untouched(tmp_path, run_args):
  (tmp_path / 'config.json').write_text('{"learning_rate": 3}\n')
  (tmp_path / 'metrics.jsonl').write_text('{"note": 1}\n[1, 2]\n')
  before = snapshot(tmp_path)
  result = train([*run_args, '--workdir', tmp_path])
  assert_one_error_line(result, str(tmp_path), 'not a training run', 'config.json')
  assert snapshot(tmp_path) == before


@pytest.fixture(scope='module')
def concurrent_runs(tmp_path_factory, run_args):
  """Run A holds a workdir; B is started on it meanwhile; then A gets SIGINT. Run C gets SIGINT
  as soon as it holds its workdir, i.e. while it loads and compiles."""
  root = tmp_path_factory.mktemp('concurrent')
  a_dir, c_dir = root / 'a', root / 'c'
  a = Background([*run_args, '--steps', '100000', '--workdir', a_dir], root / 'logs', 'a')
  c = Background([*run_args, '--workdir', c_dir], root / 'logs', 'c')
  holds = lambda d: (d / '.lock').exists() and (d / '.lock').read_text().strip().isdigit()
  c_held = c.wait_for(lambda: holds(c_dir))
  c.signal(signal.SIGINT)
  a_held = a.wait_for(lambda: holds(a_dir))
  b = train([*run_args, '--seed', '1', '--workdir', a_dir])
  a.signal(signal.SIGINT)
  return dict(a=a, a_rc=a.wait(), a_held=a_held, b=b, c=c, c_rc=c.wait(), c_held=c_held,
              a_dir=a_dir, c_dir=c_dir)


def test_a_second_run_on_a_workdir_in_use_is_refused(concurrent_runs):
  runs = concurrent_runs
  assert runs['a_held']
  assert_one_error_line(runs['b'], str(runs['a_dir']), 'in use by another run',
                        f'pid {runs["a"].proc.pid}')
  assert json.loads((runs['a_dir'] / 'config.json').read_text())['run']['seed'] == 0


def test_sigint_while_starting_ends_cleanly(concurrent_runs):
  runs = concurrent_runs
  for name in ('a', 'c'):
    bg, rc = runs[name], runs[f'{name}_rc']
    assert runs[f'{name}_held']
    assert rc == 0, (name, rc, bg.stderr[-3000:])
    assert 'Traceback' not in bg.stderr and 'Traceback' not in bg.stdout, bg.stderr
    assert _error_lines(bg.stderr) == [], bg.stderr
    stops = [line for line in bg.stdout.splitlines() if line.startswith('SIGINT')]
    assert len(stops) == 1, bg.stdout
  # C was stopped before its first step (it had no time for one): nothing saved.
  assert 'before training began' in runs['c'].stdout, runs['c'].stdout
  assert checkpoint_steps(runs['c_dir']) == []


def test_double_sigint_during_the_final_save_waits_for_it(tmp_path, run_args):
  workdir = tmp_path / 'w'
  bg = Background([*run_args, '--steps', '100000', '--log-every', '1', '--workdir', workdir],
                  tmp_path / 'logs', 'run')
  assert bg.wait_for(lambda: max_logged_step(workdir) >= 3)
  bg.signal(signal.SIGINT)
  saving = lambda: (workdir / 'checkpoints').is_dir() and any(
      p.name not in ('2',) for p in (workdir / 'checkpoints').iterdir())
  bg.wait_for(saving, interval=0.001)
  bg.signal(signal.SIGINT)
  rc = bg.wait()
  assert rc == 0, bg.stderr[-3000:]
  assert 'Traceback' not in bg.stderr + bg.stdout, bg.stderr
  saved = [line for line in bg.stdout.splitlines() if 'saved a checkpoint' in line]
  assert len(saved) == 1, bg.stdout
  step = int(saved[0].split('step ')[1].split(';')[0])
  assert step in checkpoint_steps(workdir)
  assert int(restore_state(workdir, step)['step']) == step  # committed: it restores


# ------------------------------------------------------------------------------------------------
# NaN

@pytest.mark.parametrize('option', ['--learning-rate', '--weight-decay', '--clip-norm',
                                    '--label-smoothing', '--dropout'])
@pytest.mark.parametrize('value', ['nan', 'inf'])
def test_non_finite_float_options_are_refused(option, value):
  from train.config import RunConfig, UsageError
  with pytest.raises(UsageError, match=f'{option} {value} must be a finite number'):
    RunConfig(**{option[2:].replace('-', '_'): float(value)})


@pytest.fixture(scope='module')
def nan_runs(tmp_path_factory, run_args):
  """Learning rate 1e30: step 1 is finite, its update makes every later loss NaN."""
  root = tmp_path_factory.mktemp('nan')
  diverging = [*run_args, '--schedule', 'constant', '--learning-rate', '1e30',
               '--checkpoint-every', '1', '--log-every', '1', '--keep-checkpoints', '10']
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    stop = pool.submit(train, [*diverging, '--workdir', root / 'stop'])
    skip = pool.submit(train, [*diverging, '--on-nan', 'skip', '--workdir', root / 'skip'])
    return dict(root=root, stop=stop.result(), skip=skip.result())


def test_a_non_finite_loss_stops_with_the_last_good_checkpoint_newest(nan_runs):
  workdir = nan_runs['root'] / 'stop'
  assert_one_error_line(nan_runs['stop'], 'step 2', 'nan', '--on-nan skip',
                        'newest checkpoint: step 1')
  assert checkpoint_steps(workdir) == [1]
  state = restore_state(workdir, 1)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))


def test_on_nan_skip_skips_and_counts(nan_runs):
  result, workdir = nan_runs['skip'], nan_runs['root'] / 'skip'
  assert result.returncode == 0, result.stderr[-3000:]
  train_records = [r for r in read_metrics(workdir) if r['split'] == 'train']
  assert [r['skipped'] for r in train_records] == [0.0] + [1.0] * (STEPS - 1)
  # Every update after step 1 was skipped: the parameters are still step 1's.
  first, last = restore_state(workdir, 1), restore_state(workdir, STEPS)
  assert int(last['step']) == STEPS
  for x, y in zip(jax.tree.leaves(first['params']), jax.tree.leaves(last['params'])):
    np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------------
# data: a stale tokenizer, changed data, held-out documents

@pytest.fixture(scope='module')
def data_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  corpus, other = root / 'corpus.txt', root / 'other.txt'
  corpus.write_text(corpus_text())
  other.write_text(corpus_text() + '\nOne more paragraph, so the file differs.\n')
  text = ['--task', 'text', '--steps', '2', '--seq-len', '32', '--checkpoint-every', '2',
          '--eval-every', '2', '--log-every', '1', *BASE]
  sp = ['--tokenizer', 'sentencepiece', '--vocab-size', '200']
  runs = {}
  # Fails after training its tokenizer (no sequence of 100000 tokens in the data).
  runs['sp-failed'] = train([*text, *sp, '--data', corpus, '--seq-len', '100000',
                             '--workdir', root / 'sp'])
  runs['sp-vocab'] = train([*text, *sp, '--vocab-size', '208', '--data', corpus,
                            '--workdir', root / 'sp'])
  runs['sp-data'] = train([*text, *sp, '--data', other, '--workdir', root / 'sp'])
  changing = root / 'changing.txt'
  changing.write_text(corpus_text())
  runs['first'] = train([*text, '--data', changing, '--workdir', root / 'text'])
  changing.write_text(corpus_text().replace('fox', 'cat'))  # same size, other content
  runs['changed'] = train([*text, '--steps', '4', '--data', changing, '--workdir', root / 'text'])
  return dict(root=root, **runs)


def test_a_tokenizer_trained_for_other_options_is_refused(data_runs):
  assert_one_error_line(data_runs['sp-failed'], '--seq-len 100000')
  assert (data_runs['root'] / 'sp' / 'tokenizer.model').exists()
  assert_one_error_line(data_runs['sp-vocab'], 'tokenizer.model', '--vocab-size 200', '208')
  assert_one_error_line(data_runs['sp-data'], 'tokenizer.model', '--data')


def test_changed_data_is_refused_on_resume(data_runs):
  assert data_runs['first'].returncode == 0, data_runs['first'].stderr[-3000:]
  assert_one_error_line(data_runs['changed'], 'changing.txt', 'has changed', 'step 2')
  assert checkpoint_steps(data_runs['root'] / 'text') == [2]


def test_held_out_documents_are_never_training_documents():
  from train import data
  docs = [f'document {i}' for i in range(25)]
  train_docs, eval_docs = data.split_documents(docs, 'documents')
  assert eval_docs == [docs[9], docs[19]] and not set(train_docs) & set(eval_docs)
  with pytest.raises(data.DataError, match='--data has 9 sentence pairs; at least 10'):
    data.split_documents(docs[:9], 'sentence pairs')


def test_fewer_than_ten_documents_are_split_by_position():
  from train import data
  docs = ['a' * 50, 'b' * 48]
  train_docs, eval_docs, note = data.split_text(docs)
  text = '\n\n'.join(docs)
  assert train_docs[0] + eval_docs[0] == text and len(eval_docs[0]) == len(text) // 10
  assert '2 document(s)' in note and '10 of 100 characters are held out' in note
  assert data.split_text(docs * 5)[2] is None


# ------------------------------------------------------------------------------------------------
# units: files replaced whole, foreign metric lines, a full disk

def test_write_atomic_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
  from train import workdir
  path = tmp_path / 'config.json'
  path.write_text('old\n')

  def killed(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(workdir.os, 'replace', killed)
  with pytest.raises(KeyboardInterrupt):
    workdir.write_atomic(str(path), 'new\n')
  assert path.read_text() == 'old\n'


def test_metrics_log_keeps_its_history_when_killed_while_rewriting(tmp_path, monkeypatch):
  from train import metrics, workdir
  lines = ''.join(json.dumps({'step': s, 'split': 'train'}) + '\n' for s in (1, 2, 3))
  (tmp_path / 'metrics.jsonl').write_text(lines)
  monkeypatch.setattr(workdir.os, 'replace', lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
  with pytest.raises(KeyboardInterrupt):
    metrics.MetricsLog(str(tmp_path), resume_step=2)
  assert (tmp_path / 'metrics.jsonl').read_text() == lines


def test_metrics_log_skips_lines_that_are_not_ours(tmp_path):
  from train.metrics import MetricsLog
  (tmp_path / 'metrics.jsonl').write_text(
      '{"note": 1}\n[1, 2]\n{"step": "2"}\n{"step": 2, "split": "train"}\n{"step": 9}\n')
  MetricsLog(str(tmp_path), resume_step=4).close()
  assert (tmp_path / 'metrics.jsonl').read_text() == '{"step": 2, "split": "train"}\n'


@pytest.fixture
def checkpoints(tmp_path):
  from train.checkpoint import Checkpoints
  ckpts = Checkpoints(str(tmp_path / 'checkpoints'))
  yield ckpts
  ckpts.close()


META = {'task': 'dates', 'run': {}, 'model_config': {}}


def test_a_full_disk_is_one_error_and_keeps_the_checkpoints(checkpoints, tmp_path, monkeypatch):
  import jax.numpy as jnp
  from train import checkpoint
  checkpoints.save(1, {'x': jnp.arange(4.0)}, META)
  checkpoints.wait()
  real = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(checkpoint.shutil, 'disk_usage',
                      lambda path: real._replace(free=300 << 10))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'no room for the checkpoint at step 2 in .*checkpoints: it needs '
                           r'about 1.00 MiB and 0.29 MiB are free'):
    checkpoints.save(2, {'x': jnp.arange(4.0)}, META)
  assert checkpoints.manager.all_steps() == [1]


def test_an_io_error_while_saving_is_one_error(checkpoints, monkeypatch):
  import jax.numpy as jnp
  from train import checkpoint

  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(checkpoints.manager, 'save', no_space)
  with pytest.raises(checkpoint.CheckpointError, match='no room for the checkpoint at step 3'):
    checkpoints.save(3, {'x': jnp.arange(4.0)}, META)
  monkeypatch.setattr(checkpoints.manager, 'save',
                      lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, 'denied')))
  with pytest.raises(checkpoint.CheckpointError, match='cannot write a checkpoint in .*denied'):
    checkpoints.save(3, {'x': jnp.arange(4.0)}, META)


def test_abandoned_read_echoes_are_dropped_from_asyncio_logs(caplog):
  """After a failed restore, asyncio may log the abandoned TensorStore reads when their futures
  are collected ('Future exception was never retrieved'): the failure is reported already, so
  these records are dropped; other asyncio errors still show."""
  import logging
  from train import checkpoint
  checkpoint.ignore_abandoned_reads()
  log = logging.getLogger('asyncio')
  with caplog.at_level(logging.ERROR, logger='asyncio'):
    try:
      raise ValueError('OUT_OF_RANGE: Error reading "params.x/0" in OCDBT database')
    except ValueError as e:
      log.error('Future exception was never retrieved\nfuture: <Future finished exception=%r>',
                e, exc_info=(type(e), e, e.__traceback__))
    log.error('Task was destroyed but it is pending!')
  assert [r.getMessage() for r in caplog.records] == ['Task was destroyed but it is pending!']
