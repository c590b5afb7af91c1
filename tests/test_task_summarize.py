"""`python -m train --task summarize`, run as subprocesses (tiny preset, a few steps).

  * on its default data (the standard library's functions) a run trains, writes ROUGE-1/2/L to
    metrics.jsonl's eval lines, prints held-out examples and draws attention.png;
  * the same run killed with SIGKILL after a checkpoint and rerun ends bit for bit as the
    uninterrupted one, with the same metrics.jsonl;
  * `--data` in TSV (with a SentencePiece tokenizer) trains; JSON Lines is read (in-process);
  * a TSV line without a tab, and --init-from while train/pretrained.py has no family for
    summarize, are one `error:` line each.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import re
import signal
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from cli import (BASE, Background, assert_one_error_line, checkpoint_steps, max_logged_step,
                 read_metrics, restore_state, train, without_wallclock)

STEPS = 12
# One evaluation with two beams (128 held-out pairs decoded at step 12) keeps the runs cheap.
OPTS = ['--task', 'summarize', '--steps', STEPS, '--log-every', '2', '--eval-every', '12',
        '--checkpoint-every', '4', '--learning-rate', '3e-3', '--warmup', '2', '--beam-size', '2',
        *BASE]
ROUGE = ('rouge1', 'rouge2', 'rougeL')

_VERBS = ['Return', 'Compute', 'Remove', 'Check', 'Build', 'Parse']
_NOUNS = ['value', 'header', 'item', 'name', 'path', 'entry', 'record']


def _pairs(n: int = 40) -> list[tuple[str, str]]:
  """Small code-summarization pairs: a one-line function and its summary."""
  pairs = []
  for i in range(n):
    verb, noun = _VERBS[i % len(_VERBS)], _NOUNS[i % len(_NOUNS)]
    document = (f'def {verb.lower()}_{noun}(self, key):\n    result = self.{noun}s.get(key)\n'
                f'    return result')
    pairs.append((document, f'{verb} the {noun} stored under key.'))
  return pairs


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp('summaries')
  pairs = _pairs()
  # TSV fields hold no newlines or tabs: the document's newlines become spaces there.
  (d / 'pairs.tsv').write_text(''.join(f'{doc.replace(chr(10), " ")}\t{summary}\n'
                                       for doc, summary in pairs))
  (d / 'pairs.jsonl').write_text(''.join(json.dumps({'document': doc, 'summary': summary}) + '\n'
                                         for doc, summary in pairs))
  (d / 'no_tab.tsv').write_text('def f(): pass\tDo nothing at all.\ndef g(): pass  no tab here\n')
  return d


def _run_default(root: pathlib.Path, resume: bool) -> dict:
  """Run A uninterrupted and, if `resume`, run B (same command) killed with SIGKILL once a
  checkpoint is final and training has gone past it, then rerun; A and B's first segment run
  side by side."""
  a_dir, b_dir = root / 'A', root / 'B'
  a = Background([*OPTS, '--workdir', a_dir], root / 'logs', 'A')
  out = dict(a_dir=a_dir, b_dir=b_dir)
  if resume:
    b = Background([*OPTS, '--workdir', b_dir], root / 'logs', 'B1')
    caught = b.wait_for(lambda: 4 in checkpoint_steps(b_dir) and max_logged_step(b_dir) >= 6)
    b.signal(signal.SIGKILL)
    out['killed'] = dict(rc=b.wait(), caught=caught, checkpoints=checkpoint_steps(b_dir))
    b = Background([*OPTS, '--workdir', b_dir], root / 'logs', 'B2')
    out['rerun'] = dict(rc=b.wait(), stdout=b.stdout, stderr=b.stderr)
  out['a'] = dict(rc=a.wait(), stdout=a.stdout, stderr=a.stderr)
  return out


def _run_data(root: pathlib.Path, files: pathlib.Path) -> dict:
  """A short --data TSV run (with SentencePiece), the bad TSV and --init-from, side by side
  (JSON Lines is read in-process below: the run after reading is the same)."""
  opts = ['--task', 'summarize', '--steps', '4', '--eval-every', '4', '--checkpoint-every', '4',
          '--log-every', '2', '--beam-size', '2', *BASE]
  jobs = {'tsv': [*opts, '--data', files / 'pairs.tsv', '--tokenizer', 'sentencepiece',
                  '--vocab-size', '64'],
          'no_tab': [*opts, '--data', files / 'no_tab.tsv'],
          'init_from': [*opts[:-len(BASE)], '--init-from', root / 'no_such_checkpoint']}
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    futures = {name: pool.submit(train, [*args, '--workdir', root / name])
               for name, args in jobs.items()}
    return {name: (f.result(), root / name) for name, f in futures.items()}


@pytest.fixture(scope='module')
def started(request, tmp_path_factory, files):
  # Both groups wait on subprocesses: started together, the file takes about the longer one.
  # The killed and resumed run B (two more runs) only when its (slow) test is selected.
  resume = any(item.name == 'test_killed_run_resumes_bit_identical'
               for item in request.session.items)
  pool = concurrent.futures.ThreadPoolExecutor(2)
  futures = {'default': pool.submit(_run_default, tmp_path_factory.mktemp('default'), resume),
             'data': pool.submit(_run_data, tmp_path_factory.mktemp('data'), files)}
  yield futures
  pool.shutdown(wait=True)


@pytest.fixture(scope='module')
def default(started):
  return started['default'].result()


@pytest.fixture(scope='module')
def data_runs(started):
  return started['data'].result()


def _ok(result: dict) -> str:
  assert result['rc'] == 0, f'exit {result["rc"]}\n{result["stdout"][-3000:]}\n' \
                            f'{result["stderr"][-3000:]}'
  assert 'Traceback' not in result['stderr']
  return result['stdout']


# ------------------------------------------------------------------------------------------------
# the default data

def test_default_run_reports_rouge_examples_and_attention(default):
  stdout = _ok(default['a'])
  assert f'final evaluation after {STEPS} steps' in stdout
  assert all(f'{k} ' in stdout for k in ROUGE), stdout
  examples = stdout.split('examples (held-out):')[1]
  assert examples.count(' -> ') == 2 and examples.count('reference ') == 2, examples
  png = default['a_dir'] / 'attention.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 1000


def test_default_run_writes_rouge_to_metrics(default):
  _ok(default['a'])
  records = read_metrics(default['a_dir'])
  evals = [r for r in records if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [STEPS]
  for r in evals:
    assert set(ROUGE) <= set(r), r
    assert all(0.0 <= r[k] <= 100.0 for k in ROUGE), r
    assert np.isfinite(r['loss']) and 'exact_match' not in r
  train_loss = [r['loss'] for r in records if r['split'] == 'train']
  assert train_loss[-1] < train_loss[0], train_loss
  config = json.loads((default['a_dir'] / 'config.json').read_text())
  assert config['run']['beam_size'] == 2 and config['model_config']['d_model'] == 64


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(default):
  _ok(default['a'])
  killed = default['killed']
  assert killed['caught'], 'the run ended before it could be killed'
  assert killed['rc'] == -signal.SIGKILL
  stdout = _ok(default['rerun'])
  resumed = re.search(r'resuming from step (\d+)', stdout)
  assert resumed and int(resumed.group(1)) == max(killed['checkpoints']), (stdout, killed)
  a = jax.tree.leaves_with_path(restore_state(default['a_dir'], STEPS))
  b = jax.tree.leaves_with_path(restore_state(default['b_dir'], STEPS))
  assert len(a) == len(b) > 10
  for (path, x), (_, y) in zip(a, b):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
  assert without_wallclock(read_metrics(default['b_dir'])) == \
      without_wallclock(read_metrics(default['a_dir']))


# ------------------------------------------------------------------------------------------------
# --data files and bad input

def test_tsv_data_trains_and_scores(data_runs):
  result, workdir = data_runs['tsv']
  assert result.returncode == 0, result.stderr[-3000:]
  evals = [r for r in read_metrics(workdir) if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [4] and set(ROUGE) <= set(evals[0]), evals
  assert (workdir / 'tokenizer.model').exists()
  assert 'reference ' in result.stdout


def test_tsv_line_without_tab_is_one_error_line(data_runs, files):
  result, _ = data_runs['no_tab']
  assert_one_error_line(result, str(files / 'no_tab.tsv'), 'line 2')


def test_init_from_is_one_error_line(data_runs):
  # Until train/pretrained.py lists summarize (TASK_FAMILY) the task refuses --init-from; after,
  # the missing folder is the error. One line either way, never a KeyError's traceback.
  result, _ = data_runs['init_from']
  assert_one_error_line(result, '--init-from')


# ------------------------------------------------------------------------------------------------
# the task in-process: lengths, the ROUGE subset

def test_task_splits_and_lengths(tmp_path, files):
  from train import tasks  # first: it registers the task modules, which import it
  from train.config import RunConfig
  from train.task_summarize import BYTE_LENGTHS, SummarizeTask
  assert tasks.task_class('summarize') is SummarizeTask
  task = SummarizeTask(RunConfig(task='summarize', data=str(files / 'pairs.jsonl'),
                                 workdir=str(tmp_path), tokenizer='byte'))
  task.prepare()
  assert (task.src_len, task.tgt_len) == BYTE_LENGTHS
  assert len(task._train) == 36 and len(task.eval_pairs()) == 4  # every 10th held out
  assert sorted(task._rouge_pairs) == sorted(task.eval_pairs())
  lengths = [len(d) for d, _ in task._rouge_pairs]
  assert lengths == sorted(lengths)  # the shortest first: attention.png draws it
  batch = task.eval_batches(2)[0]
  assert batch['src'].shape == (2, BYTE_LENGTHS[0]) and batch['tgt_out'].shape == (2, 96)


# ------------------------------------------------------------------------------------------------
# python -m train.generate --input DOCUMENT on the default run's checkpoint

DOCUMENTS = ['def get_header(self, name):\n    """Return the header."""\n'
             '    return self.headers.get(name)',
             'def remove_item(self, key):\n    self.items.pop(key, None)']


def call_generate(capsys, *args):
  """`train.generate.main(args)` in this process, as a CompletedProcess-like result."""
  from train import generate as generate_cli
  rc = generate_cli.main([str(a) for a in args])
  out = capsys.readouterr()
  return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


def test_generate_summarizes_as_the_evaluation_does(default, capsys):
  """The printed summaries are SummarizeTask.summarize's, with the run's settings (byte
  lengths, --beam-size 2 from the run) and the checkpoint's params."""
  from train import generate as generate_cli
  from train.config import RunConfig
  from train import data
  from train.task_summarize import PIECE_LENGTHS, SummarizeTask
  _ok(default['a'])
  workdir = str(default['a_dir'])
  result = call_generate(capsys, '--workdir', workdir, '--input', DOCUMENTS[0],
                         '--input', DOCUMENTS[1])
  assert result.returncode == 0, result.stderr
  gen = generate_cli.load(workdir)
  task = SummarizeTask(RunConfig(task='summarize', beam_size=2))
  task.tokenizer = gen.tokenizer  # the run's own (SentencePiece by default), read from its workdir
  if not isinstance(gen.tokenizer, data.ByteTokenizer):
    task.src_len, task.tgt_len = PIECE_LENGTHS
  expected = task.summarize(gen.model, gen.params, DOCUMENTS)
  assert result.stdout == ''.join(f'{summary}\n' for summary in expected)  # may hold newlines


def test_generate_on_a_summarize_run_refuses_qa_requests(default, capsys):
  _ok(default['a'])
  result = call_generate(capsys, '--workdir', default['a_dir'], '--question', 'Who?',
                         '--context', 'Anna.')
  assert_one_error_line(result, 'summarize run', '--input', 'not --question, --context')
  assert_one_error_line(call_generate(capsys, '--workdir', default['a_dir'], '--input', 'x',
                                      '--temperature', '0.7'), '--temperature', 'summarize run')
