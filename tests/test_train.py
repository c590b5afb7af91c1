"""End-to-end tests of the training program, `python -m train`, run as subprocesses.

Every run is tiny (the `tiny` preset, batch 8, a few dozen steps) so the file finishes in a few
minutes on two CPU cores. Expensive runs live in module-scoped fixtures and happen once; runs that
do not depend on each other are started together.

Groups:
  * every task (dates, text, mlm, translate) trains, writes what DESIGN.md promises and learns;
  * a run killed with SIGKILL twice (once while a checkpoint is being written) and rerun ends
    bit-for-bit where an uninterrupted run ends, with the same metrics.jsonl;
  * SIGTERM saves a checkpoint at the current step, exits 0, and the rerun resumes from it;
  * a checkpoint made for another model or task is refused without touching it;
  * bad input gives one `error:` line on stderr, a non-zero exit and loses nothing in the workdir.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from train.workdir import MARKER
from cli import (BASE, Background, _env, assert_one_error_line, checkpoint_steps,
                 corpus_text, max_logged_step, read_metrics, restore_state, snapshot, train,
                 tsv_text, without_wallclock)

SEQ2SEQ = ('dates', 'translate')
LM = ('text', 'mlm')
TASKS = ('dates', 'text', 'mlm', 'translate')


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp('data')
  (d / 'corpus.txt').write_text(corpus_text())
  (d / 'pairs.tsv').write_text(tsv_text())
  return d


def task_args(task: str, files: pathlib.Path) -> list:
  if task in LM:
    return ['--task', task, '--seq-len', '32', '--data', files / 'corpus.txt']
  if task == 'translate':
    return ['--task', task, '--seq-len', '32', '--data', files / 'pairs.tsv']
  return ['--task', task]


# ------------------------------------------------------------------------------------------------
# The expensive runs all start together, in background threads, as soon as the first test that
# needs one of them asks: most of their time is spent waiting on subprocesses, and running the
# groups side by side keeps the file's wall time near its CPU time. Only the groups that the
# selected tests need are started.

@pytest.fixture(scope='module')
def started(request, tmp_path_factory, files):
  jobs = {'task_runs': _run_tasks, 'resume': _run_resume, 'sigterm': _run_sigterm,
          'bad_input': _run_bad_input}
  wanted = set()
  for item in request.session.items:
    wanted |= set(getattr(item, 'fixturenames', ())) & set(jobs)
  pool = concurrent.futures.ThreadPoolExecutor(len(jobs))
  futures = {name: pool.submit(job, tmp_path_factory.mktemp(name), files)
             for name, job in jobs.items() if name in wanted}
  yield futures
  pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------
# 0. the byte tokenizer's decode accepts every id the models can emit

def test_decode_accepts_every_vocabulary_id():
  # The models' vocabulary is data.VOCAB_SIZE (264): 4 specials, 256 bytes and 4 ids of padding
  # that an untrained or briefly trained model can still emit; decoding (used for the printed
  # examples and exact match) must not raise on them.
  from train import data
  ids = np.arange(data.VOCAB_SIZE)
  text = data.decode(ids[ids != data.EOS])
  assert isinstance(text, str)
  assert data.decode(data.encode('2026-11-24 ü')) == '2026-11-24 ü'


# ------------------------------------------------------------------------------------------------
# 1. every task: a short run writes everything and learns

TASK_STEPS = 30
TASK_OPTS = ['--steps', TASK_STEPS, '--log-every', '2', '--eval-every', '15',
             '--checkpoint-every', '10', '--learning-rate', '3e-3', '--warmup', '5', *BASE]


def _run_tasks(root: pathlib.Path, files: pathlib.Path) -> dict:
  """One 30-step run of every task, all started together: task -> (rc, stdout, stderr, workdir)."""
  runs = {}
  for task in TASKS:
    workdir = root / task
    runs[task] = (Background([*task_args(task, files), '--workdir', workdir, *TASK_OPTS],
                             root / 'logs', task), workdir)
  out = {}
  for task, (bg, workdir) in runs.items():
    rc = bg.wait()
    out[task] = (rc, bg.stdout, bg.stderr, workdir)
  return out


@pytest.fixture(scope='module')
def task_runs(started):
  return started['task_runs'].result()


def _task_run(task_runs, task):
  rc, stdout, stderr, workdir = task_runs[task]
  assert rc == 0, f'{task} run failed with exit {rc}\nstdout:\n{stdout[-3000:]}\nstderr:\n' \
                  f'{stderr[-3000:]}'
  return stdout, stderr, workdir


@pytest.mark.parametrize('task', TASKS)
def test_task_run_finishes_and_reports(task_runs, task):
  stdout, stderr, workdir = _task_run(task_runs, task)
  assert 'Traceback' not in stderr
  assert f'final evaluation after {TASK_STEPS} steps' in stdout
  if task in SEQ2SEQ:
    assert 'examples (held-out):' in stdout


@pytest.mark.parametrize('task', TASKS)
def test_task_run_writes_checkpoints(task_runs, task):
  _, _, workdir = _task_run(task_runs, task)
  steps = checkpoint_steps(workdir)
  assert steps == [10, 20, 30], steps
  for step in steps:
    step_dir = workdir / 'checkpoints' / str(step)
    assert (step_dir / 'state').is_dir() and (step_dir / 'meta').is_dir(), \
        sorted(p.name for p in step_dir.iterdir())
  assert not [p for p in (workdir / 'checkpoints').iterdir() if 'tmp' in p.name]
  state = restore_state(workdir, TASK_STEPS)
  assert int(state['step']) == TASK_STEPS
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))


@pytest.mark.parametrize('task', TASKS)
def test_task_run_writes_metrics(task_runs, task):
  _, _, workdir = _task_run(task_runs, task)
  records = read_metrics(workdir)
  train_lines = [r for r in records if r['split'] == 'train']
  eval_lines = [r for r in records if r['split'] == 'eval']
  assert {r['split'] for r in records} == {'train', 'eval'}
  assert [r['step'] for r in train_lines] == list(range(2, TASK_STEPS + 1, 2))
  assert [r['step'] for r in eval_lines] == [15, 30]
  for r in train_lines:
    assert {'step', 'split', 'loss', 'accuracy', 'tokens_per_second', 'learning_rate'} <= set(r), r
    assert r['tokens_per_second'] > 0 and r['learning_rate'] > 0
  for r in eval_lines:
    expected = {'step', 'split', 'loss', 'accuracy'}
    expected |= {'exact_match'} if task in SEQ2SEQ else {'perplexity'}
    assert expected <= set(r), r
    assert not ({'exact_match'} if task in LM else {'perplexity'}) & set(r), r
    if 'perplexity' in r:
      assert r['perplexity'] == pytest.approx(np.exp(r['loss']), rel=1e-6)
  for r in records:
    assert all(np.isfinite(v) for k, v in r.items() if k != 'split'), r
    assert 0.0 <= r['accuracy'] <= 1.0
    if 'exact_match' in r:
      assert 0.0 <= r['exact_match'] <= 1.0


@pytest.mark.parametrize('task', TASKS)
def test_task_run_writes_config_tensorboard_and_plot(task_runs, task):
  _, _, workdir = _task_run(task_runs, task)
  config = json.loads((workdir / 'config.json').read_text())
  assert config['task'] == task
  assert config['run']['task'] == task and config['run']['steps'] == TASK_STEPS
  assert config['run']['batch_size'] == 8 and config['run']['dropout'] == 0.1
  assert config['model_config']['d_model'] == 64
  events = list((workdir / 'tensorboard').rglob('events.out.tfevents.*'))
  assert events and all(e.stat().st_size > 0 for e in events)
  png = workdir / 'attention.png'
  if task in SEQ2SEQ:
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert png.stat().st_size > 1000
  else:
    assert not png.exists()


@pytest.mark.parametrize('task', TASKS)
def test_task_training_loss_falls(task_runs, task):
  _, _, workdir = _task_run(task_runs, task)
  records = read_metrics(workdir)
  train_loss = [r['loss'] for r in records if r['split'] == 'train']
  eval_loss = [r['loss'] for r in records if r['split'] == 'eval']
  first, last = np.mean(train_loss[:2]), np.mean(train_loss[-2:])
  assert last < 0.85 * first, f'train loss {train_loss}'
  assert eval_loss[-1] < eval_loss[0], f'eval loss {eval_loss}'


# ------------------------------------------------------------------------------------------------
# 2. exact resume after SIGKILL

RESUME_STEPS = 24
RESUME_OPTS = ['--steps', RESUME_STEPS, '--log-every', '2', '--eval-every', '6',
               '--checkpoint-every', '4', *BASE]


def _run_resume(root: pathlib.Path, files: pathlib.Path) -> dict:
  """Run A uninterrupted; run B (same command, another workdir) killed twice with SIGKILL and
  rerun each time. A runs while B is being killed."""
  logs = root / 'logs'
  args = task_args('mlm', files) + RESUME_OPTS
  a_dir, b_dir = root / 'A', root / 'B'
  a = Background([*args, '--workdir', a_dir], logs, 'A')
  info = {'a_dir': a_dir, 'b_dir': b_dir, 'segments': []}

  # B, first segment: kill as soon as anything of the step-8 checkpoint shows up, which is
  # normally its `8.orbax-checkpoint-tmp-*` folder, i.e. while the save is in progress.
  ckdir = b_dir / 'checkpoints'
  seen = []

  def step8_appears():
    try:
      names = [p.name for p in ckdir.iterdir()]
    except FileNotFoundError:
      return False
    hits = [n for n in names if n == '8' or n.startswith('8.')]
    seen[:] = hits
    return bool(hits)

  b = Background([*args, '--workdir', b_dir], logs, 'B1')
  caught = b.wait_for(step8_appears)
  b.signal(signal.SIGKILL)
  info['segments'].append(dict(rc=b.wait(), caught=caught, seen=list(seen),
                               checkpoints=checkpoint_steps(b_dir), stdout=b.stdout,
                               stderr=b.stderr))

  # Second segment: resumes; killed in the middle of training, between two checkpoints (once
  # step 14 is logged and the step-12 save, asynchronous, has been finalized).
  b = Background([*args, '--workdir', b_dir], logs, 'B2')
  caught = b.wait_for(lambda: max_logged_step(b_dir) >= 14 and 12 in checkpoint_steps(b_dir))
  b.signal(signal.SIGKILL)
  info['segments'].append(dict(rc=b.wait(), caught=caught, seen=[],
                               checkpoints=checkpoint_steps(b_dir), stdout=b.stdout,
                               stderr=b.stderr))

  # Third segment: runs to the end.
  b = Background([*args, '--workdir', b_dir], logs, 'B3')
  info['segments'].append(dict(rc=b.wait(), caught=None, seen=[],
                               checkpoints=checkpoint_steps(b_dir), stdout=b.stdout,
                               stderr=b.stderr))
  info['a'] = dict(rc=a.wait(), stdout=a.stdout, stderr=a.stderr)
  return info


@pytest.fixture(scope='module')
def resume(started):
  return started['resume'].result()


def _resumed_from(stdout: str) -> int | None:
  m = re.search(r'resuming from step (\d+)', stdout)
  return int(m.group(1)) if m else None


def test_resume_runs_were_killed_and_resumed(resume):
  a = resume['a']
  assert a['rc'] == 0, a['stderr'][-3000:]
  assert 'resuming from step' not in a['stdout']
  first, second, third = resume['segments']
  print(f'first kill after seeing {first["seen"]}; resumed from '
        f'{_resumed_from(second["stdout"])}, then from {_resumed_from(third["stdout"])}')
  for n, seg in enumerate((first, second)):
    assert seg['caught'], f'segment {n + 1} finished before it could be killed:\n{seg["stdout"]}'
    assert seg['rc'] == -signal.SIGKILL, (seg['rc'], seg['stderr'][-3000:])
  assert third['rc'] == 0, third['stderr'][-3000:]
  # Each rerun resumes from the newest finalized checkpoint the previous segment left.
  assert _resumed_from(second['stdout']) == max(first['checkpoints'], default=None), \
      (second['stdout'], first)
  assert _resumed_from(third['stdout']) == max(second['checkpoints']), (third['stdout'], second)
  assert _resumed_from(third['stdout']) >= 12
  assert f'final evaluation after {RESUME_STEPS} steps' in third['stdout']
  # A save killed half-way leaves no finalized step behind, and its leftovers are cleaned up.
  assert not [p for p in (resume['b_dir'] / 'checkpoints').iterdir() if 'tmp' in p.name]


def test_resume_final_state_is_bit_identical(resume):
  assert resume['a']['rc'] == 0 and resume['segments'][-1]['rc'] == 0
  assert checkpoint_steps(resume['a_dir'])[-1] == RESUME_STEPS
  assert checkpoint_steps(resume['b_dir'])[-1] == RESUME_STEPS
  a = restore_state(resume['a_dir'], RESUME_STEPS)
  b = restore_state(resume['b_dir'], RESUME_STEPS)
  a_leaves, a_def = jax.tree.flatten_with_path(a)
  b_leaves, b_def = jax.tree.flatten_with_path(b)
  assert a_def == b_def
  assert len(a_leaves) > 10
  for (path, x), (_, y) in zip(a_leaves, b_leaves):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert np.array_equal(x, y), f'{jax.tree_util.keystr(path)} differs after resume'


def test_resume_metrics_match_uninterrupted_run(resume):
  a = read_metrics(resume['a_dir'])
  b = read_metrics(resume['b_dir'])
  last_resume = _resumed_from(resume['segments'][-1]['stdout'])
  assert last_resume is not None
  a_after = without_wallclock([r for r in a if r['step'] > last_resume])
  b_after = without_wallclock([r for r in b if r['step'] > last_resume])
  assert a_after and b_after == a_after
  # The file reads as if the run had never stopped: no duplicated or missing lines either.
  assert without_wallclock(b) == without_wallclock(a)
  assert all('tokens_per_second' in r for r in b if r['split'] == 'train')


# ------------------------------------------------------------------------------------------------
# 3. SIGTERM: save at the current step, exit 0, resume

SIGTERM_STEPS = 100
SIGTERM_OPTS = ['--steps', SIGTERM_STEPS, '--log-every', '1', '--eval-every', '50',
                '--checkpoint-every', '50', *BASE]


def _run_sigterm(root: pathlib.Path, files: pathlib.Path) -> dict:
  """A run sent SIGTERM once step 10 is logged, then the same command again."""
  workdir = root / 'w'
  args = [*task_args('mlm', files), *SIGTERM_OPTS, '--workdir', workdir]
  run = Background(args, root / 'logs', 'first')
  caught = run.wait_for(lambda: max_logged_step(workdir) >= 10)
  run.signal(signal.SIGTERM)
  rc = run.wait()
  first = dict(rc=rc, caught=caught, stdout=run.stdout, stderr=run.stderr,
               checkpoints=checkpoint_steps(workdir), last_logged=max_logged_step(workdir))
  rerun = train(args)
  return dict(first=first, rerun=rerun, workdir=workdir)


@pytest.fixture(scope='module')
def sigterm(started):
  return started['sigterm'].result()


def test_sigterm_saves_and_exits_zero(sigterm):
  first = sigterm['first']
  assert first['caught'], f'the run ended before SIGTERM could be sent:\n{first["stdout"]}'
  assert first['rc'] == 0, (first['rc'], first['stderr'][-3000:])
  assert 'Traceback' not in first['stderr']
  m = re.search(r'SIGTERM: saved a checkpoint at step (\d+)', first['stdout'])
  assert m, first['stdout']
  stopped = int(m.group(1))
  assert 10 <= stopped < SIGTERM_STEPS
  assert first['checkpoints'] and first['checkpoints'][-1] == stopped, first['checkpoints']
  assert first['last_logged'] == stopped  # --log-every 1: the last step logged is the one saved


def test_sigterm_rerun_resumes(sigterm):
  first, rerun = sigterm['first'], sigterm['rerun']
  stopped = first['checkpoints'][-1]
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'resuming from step {stopped}' in rerun.stdout
  assert f'final evaluation after {SIGTERM_STEPS} steps' in rerun.stdout
  steps = [r['step'] for r in read_metrics(sigterm['workdir']) if r['split'] == 'train']
  assert steps == list(range(1, SIGTERM_STEPS + 1))
  assert checkpoint_steps(sigterm['workdir'])[-1] == SIGTERM_STEPS


# ------------------------------------------------------------------------------------------------
# 4. a checkpoint for another model or task is refused, and left alone

MISMATCHES = {
    'preset': (['--task', 'mlm', '--preset', 'vaswani-base'], ['d_model']),
    'task': (['--task', 'text'], ['mlm', 'text']),
}


@pytest.fixture(scope='module')
def mismatch(tmp_path_factory, task_runs, files):
  """The 30-step mlm workdir, copied once per mismatch and rerun with another model / task."""
  _, _, source = _task_run(task_runs, 'mlm')
  root = tmp_path_factory.mktemp('mismatch')
  jobs = {}
  for name, (change, _) in MISMATCHES.items():
    workdir = root / name
    shutil.copytree(source, workdir)
    before = snapshot(workdir)
    # The same options as the run that made the checkpoint, then the change (argparse: last wins).
    args = [*task_args('mlm', files), *TASK_OPTS, '--workdir', workdir, *change]
    jobs[name] = (workdir, before, args)
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    futures = {name: pool.submit(train, args) for name, (_, _, args) in jobs.items()}
    return {name: (futures[name].result(), before, snapshot(workdir))
            for name, (workdir, before, _) in jobs.items()}


@pytest.mark.parametrize('name', sorted(MISMATCHES))
def test_mismatched_checkpoint_is_refused(mismatch, name):
  result, before, after = mismatch[name]
  line = assert_one_error_line(result, *MISMATCHES[name][1])
  assert result.returncode == 2, (result.returncode, line)
  assert 'resuming' not in result.stdout and 'final evaluation' not in result.stdout
  assert after == before, 'the refused run changed the workdir'


# ------------------------------------------------------------------------------------------------
# 5. bad input: one clear line, non-zero exit, nothing lost

BAD_OFFSET = 1234  # where the invalid byte sits in bad.txt


def _populated_workdir(path: pathlib.Path) -> pathlib.Path:
  """A workdir with a previous run's kind of contents, which no bad-input run may lose."""
  (path / 'checkpoints' / '4' / 'state').mkdir(parents=True)
  (path / 'checkpoints' / '4' / 'state' / 'data').write_bytes(b'\x00\x01' * 100)
  (path / 'metrics.jsonl').write_text('{"step": 4, "split": "train", "loss": 5.0}\n')
  (path / 'config.json').write_text('{"task": "text"}\n')
  (path / 'notes.txt').write_text('keep me\n')
  (path / MARKER).write_text('{}\n')  # a run's workdir, with the user's notes beside it
  return path


def _bad_cases(d: pathlib.Path) -> dict:
  """name -> (args, extra env, expected fragments of the error line or None for success)."""
  text = corpus_text().encode()
  (d / 'empty.txt').write_bytes(b'')
  (d / 'bad.txt').write_bytes(text[:BAD_OFFSET] + b'\xff' + text[BAD_OFFSET:])
  (d / 'notab.tsv').write_text('a b\tb a\nc d\td c\ne f\tf e\nno tab on this line\ng h\th g\n')
  (d / 'regular-file').write_text('not a folder\n')
  return {
      'missing-data': (['--task', 'text', '--data', d / 'missing.txt'], {},
                       ['missing.txt', 'no such file']),
      'empty-data': (['--task', 'text', '--data', d / 'empty.txt'], {}, ['empty.txt', 'empty']),
      'invalid-utf8': (['--task', 'text', '--data', d / 'bad.txt'], {},
                       ['bad.txt', str(BAD_OFFSET), 'UTF-8']),
      'translate-without-data': (['--task', 'translate'], {}, ['--data']),
      'tsv-line-without-tab': (['--task', 'translate', '--data', d / 'notab.tsv'], {},
                               ['notab.tsv', 'line 4']),
      'batch-not-divisible': (['--task', 'dates', '--batch-size', '3'],
                              {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'},
                              ['--batch-size 3', '2']),
      'unknown-task': (['--task', 'poetry'], {}, ['poetry']),
      'unknown-preset': (['--task', 'dates', '--preset', 'gigantic'], {}, ['gigantic']),
  }


def _run_bad_input(d: pathlib.Path, files: pathlib.Path) -> dict:
  """Every bad-input case (and the accepted --on-bad-bytes replace run), run in parallel."""
  cases = _bad_cases(d)
  jobs = {}
  for name, (args, extra_env, fragments) in cases.items():
    workdir = _populated_workdir(d / f'workdir-{name}')
    jobs[name] = (args + ['--workdir', workdir, '--no-progress'], extra_env, workdir, fragments)
  unwritable = d / 'regular-file' / 'workdir'
  jobs['unwritable-workdir'] = (['--task', 'dates', '--workdir', unwritable, '--no-progress'], {},
                                None, [str(unwritable)])
  replace_dir = d / 'workdir-replace'
  replace_dir.mkdir()
  (replace_dir / 'notes.txt').write_text('keep me\n')
  (replace_dir / MARKER).write_text('{}\n')
  jobs['invalid-utf8-replaced'] = (
      ['--task', 'mlm', '--data', d / 'bad.txt', '--on-bad-bytes', 'replace', '--seq-len', '32',
       '--steps', '2', '--log-every', '1', '--checkpoint-every', '2', '--eval-every', '2', *BASE,
       '--workdir', replace_dir], {}, replace_dir, None)
  befores = {name: snapshot(job[2]) for name, job in jobs.items() if job[2] is not None}
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = {name: pool.submit(train, args, _env(**extra_env))
               for name, (args, extra_env, _, _) in jobs.items()}
    results = {name: f.result() for name, f in futures.items()}
  return {name: dict(result=results[name], fragments=jobs[name][3], workdir=jobs[name][2],
                     before=befores.get(name),
                     after=snapshot(jobs[name][2]) if jobs[name][2] is not None else None)
          for name in jobs}


@pytest.fixture(scope='module')
def bad_input(started):
  return started['bad_input'].result()


BAD_CASES = ['missing-data', 'empty-data', 'invalid-utf8', 'translate-without-data',
             'tsv-line-without-tab', 'batch-not-divisible', 'unknown-task', 'unknown-preset',
             'unwritable-workdir']


@pytest.mark.parametrize('name', BAD_CASES)
def test_bad_input_gives_one_error_line(bad_input, name):
  case = bad_input[name]
  assert_one_error_line(case['result'], *case['fragments'])


@pytest.mark.parametrize('name', [n for n in BAD_CASES if n != 'unwritable-workdir'])
def test_bad_input_loses_nothing_in_the_workdir(bad_input, name):
  case = bad_input[name]
  assert case['after'] == case['before']


def test_unwritable_workdir_leaves_the_file_alone(bad_input):
  blocker = pathlib.Path(bad_input['unwritable-workdir']['fragments'][0]).parent
  assert blocker.is_file() and blocker.read_text() == 'not a folder\n'


def test_invalid_utf8_accepted_with_replace(bad_input):
  case = bad_input['invalid-utf8-replaced']
  result = case['result']
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert 'final evaluation after 2 steps' in result.stdout
  assert checkpoint_steps(case['workdir']) == [2]
  assert case['after']['notes.txt'] == case['before']['notes.txt']


# ----------------------------------------------------------------------------------------------
# Units: resume bookkeeping

def test_metrics_log_drops_a_torn_last_line_and_later_steps(tmp_path):
  """A run killed while appending leaves half a JSON line; resuming drops it and every line
  logged after the checkpoint it resumes from."""
  from train.metrics import MetricsLog
  lines = [json.dumps({'step': s, 'split': 'train', 'loss': 1.0 / s}) for s in (2, 4, 6)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 8, "spl')
  log = MetricsLog(str(tmp_path), resume_step=4)
  log.write(6, 'train', loss=0.5)
  log.close()
  steps = [json.loads(l)['step'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert steps == [2, 4, 6]


def test_resume_refuses_changed_run_options():
  from train.checkpoint import CheckpointMismatch, check
  run = {'seed': 0, 'batch_size': 8, 'learning_rate': 1e-3, 'steps': 10, 'data': 'a.txt'}
  saved = {'task': 'dates', 'run': run, 'model_config': {'d_model': 32}, 'data': None}
  check(3, saved, {**saved, 'run': {**run, 'steps': 20}})  # --steps may grow
  with pytest.raises(CheckpointMismatch, match=r'--batch-size saved 8 vs requested 16'):
    check(3, saved, {**saved, 'run': {**run, 'batch_size': 16}})
  with pytest.raises(CheckpointMismatch, match=r'--data a.txt has changed since .* step 3'):
    check(3, {**saved, 'data': '10 bytes, sha256 ab'},
          {**saved, 'data': '11 bytes, sha256 cd'})


def test_closing_checkpoints_waits_for_the_startup_cleanup(tmp_path, monkeypatch):
  """orbax starts removing a killed save's tmp folders in a background thread when the manager
  is built, and its close() does not wait for that: a run that stops early (a refused
  checkpoint) could exit while the thread still works and print an orbax traceback at
  interpreter shutdown. Our close() waits for it."""
  import asyncio
  from orbax.checkpoint._src.path import temporary_paths
  from train import checkpoint
  finished = []

  async def slow_cleanup(*args, **kwargs):
    await asyncio.sleep(0.5)
    finished.append(True)

  monkeypatch.setattr(temporary_paths, 'cleanup_temporary_paths', slow_cleanup)
  checkpoint.Checkpoints(str(tmp_path / 'checkpoints')).close()
  assert finished == [True]
