"""--task qa (train/task_qa.py): the loss, span answers, and end-to-end runs of `python -m train`.

The runs are tiny (the `tiny` preset, batch 8, a dozen steps) and start together: one on the
default stdlib question data, and, on a small SQuAD JSON file, one uninterrupted run and one
killed with SIGKILL and rerun, which must end bit-for-bit where the first ends.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import signal
import tempfile
from types import SimpleNamespace

import jax
import numpy as np
import optax
import pytest

from cli import (BASE, Background, assert_one_error_line, checkpoint_steps, max_logged_step,
                 read_metrics, restore_state, train, without_wallclock)
from flaxformer_lite import BertEncoder, TransformerConfig
from train.tasks import SpecialIds  # first: train.tasks imports train.task_qa, not the reverse
from train import squad, task_qa  # noqa: I001
from train import generate as generate_cli
from train.config import RunConfig

NAMES = ['Anna', 'Boris', 'Chen', 'Dara', 'Emil', 'Fatou', 'Goran', 'Hana', 'Ivo', 'Jun',
         'Kofi', 'Lena']
CITIES = ['Oslo', 'Lima', 'Pune', 'Kyiv', 'Nice', 'Bern', 'Riga', 'Doha', 'Baku', 'Cork',
          'Graz', 'Ulm']


def squad_json(n_contexts: int = 12) -> dict:
  """A SQuAD v1.1 file of `n_contexts` paragraphs, three questions each."""
  paragraphs = []
  for i in range(n_contexts):
    name, city, year = NAMES[i % 12], CITIES[(i * 5) % 12], 1900 + 7 * i
    context = f'{name} was born in {city} in {year}. Later {name} moved to {CITIES[i % 12]}.'
    qas = [(f'q{i}a', f'Where was {name} born?', city),
           (f'q{i}b', f'When was {name} born?', str(year)),
           (f'q{i}c', f'Where did {name} move?', CITIES[i % 12])]
    paragraphs.append({'context': context, 'qas': [
        {'id': qid, 'question': q,
         'answers': [{'text': a, 'answer_start': context.index(a, len(name))}]}
        for qid, q, a in qas]})
  return {'version': '1.1', 'data': [{'title': 'people', 'paragraphs': paragraphs}]}


# ------------------------------------------------------------------------------------------------
# units

def _task(**run) -> task_qa.QATask:
  run.setdefault('workdir', tempfile.mkdtemp())  # the tokenizer is trained into the workdir
  task = task_qa.QATask(RunConfig(task='qa', **run))
  task.prepare()
  return task


def test_forward_loss_is_mean_of_start_and_end_cross_entropy(tmp_path):
  path = tmp_path / 'squad.json'
  path.write_text(json.dumps(squad_json()))
  task = _task(data=str(path), seq_len=48, vocab_size=64)
  model = BertEncoder(task.config('tiny'))
  batch = task.eval_batches(4)[0]
  assert batch['tokens'].shape == (4, 48) and batch['start'].shape == (4,)
  params = model.init(jax.random.key(0), *task.init_args(batch), method=task.init_method)
  logits, targets, weights = task.forward(model, params['params'], batch)
  assert logits.shape == (4, 2, 48) and targets.shape == (4, 2) and weights.shape == (4, 2)
  start, end = model.apply(params, batch['tokens'], batch['token_types'], valid=batch['valid'],
                           method='qa_logits')
  ce = optax.softmax_cross_entropy_with_integer_labels
  expected = (ce(start, batch['start']) + ce(end, batch['end'])) / 2
  got = ce(logits, targets).mean(axis=1)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # Every gold span lies in its window's context (or is [CLS] when the answer is elsewhere).
  for s, e, types in zip(batch['start'], batch['end'], batch['token_types']):
    assert (s == e == 0) or (types[s] >= 1 and types[e] >= 1 and s <= e)
  # A model from scratch reads the question's words in the context as a third token type.
  assert task.question_words and model.config.type_vocab_size == squad.QUESTION_WORD + 1
  assert not task_qa.reads_question_words(TransformerConfig.preset('bert-base'))  # a checkpoint
  assert (batch['token_types'] == squad.QUESTION_WORD).any()


def test_split_by_context_holds_out_every_tenth_paragraph(tmp_path):
  path = tmp_path / 'squad.json'
  path.write_text(json.dumps(squad_json(20)))
  train_ex, eval_ex = task_qa.split_by_context(squad.read_squad(path))
  assert len(eval_ex) == 6 and len(train_ex) == 54
  assert not {ex.context for ex in eval_ex} & {ex.context for ex in train_ex}


def test_answer_is_a_span_of_the_context():
  cfg = TransformerConfig.preset('tiny', vocab_size=264, pad_id=0, bos_id=1, eos_id=2)
  model = BertEncoder(cfg)
  tokens = np.ones((1, 8), np.int32)
  params = model.init(jax.random.key(0), tokens, tokens * 0, method='qa_logits')['params']
  context = 'Anna was born in Oslo in 1900. ' * 12  # several windows
  text, score = task_qa.answer(model, params, task_qa.data.ByteTokenizer(), 'Where?', context,
                               seq_len=64, doc_stride=32, max_answer_len=10, ids=SpecialIds())
  assert text and text in context and len(text.encode()) <= 10
  assert np.isfinite(score)


# ------------------------------------------------------------------------------------------------
# end to end: all runs start together

STEPS = 12
OPTS = ['--task', 'qa', '--steps', STEPS, '--log-every', '2', '--eval-every', '6',
        '--checkpoint-every', '4', '--learning-rate', '3e-3', '--warmup', '2', *BASE]


def _default_run(root: pathlib.Path) -> dict:
  bg = Background([*OPTS, '--workdir', root / 'default'], root / 'logs', 'default')
  return dict(rc=bg.wait(), stdout=bg.stdout, stderr=bg.stderr, workdir=root / 'default')


def _resume_runs(root: pathlib.Path) -> dict:
  """A uninterrupted; B killed with SIGKILL once step 6 is logged and the step-4 save is
  final, then rerun to the end. Both on a SQuAD JSON file."""
  path = root / 'squad.json'
  path.write_text(json.dumps(squad_json()))
  # A few paragraphs hold too few words for the default 2000 word pieces.
  args = [*OPTS, '--data', path, '--seq-len', '48', '--doc-stride', '16', '--vocab-size', '64']
  a = Background([*args, '--workdir', root / 'A'], root / 'logs', 'A')
  b = Background([*args, '--workdir', root / 'B'], root / 'logs', 'B1')
  caught = b.wait_for(lambda: max_logged_step(root / 'B') >= 6
                      and 4 in checkpoint_steps(root / 'B'))
  b.signal(signal.SIGKILL)
  first = dict(rc=b.wait(), caught=caught)
  b = Background([*args, '--workdir', root / 'B'], root / 'logs', 'B2')
  second = dict(rc=b.wait(), stdout=b.stdout, stderr=b.stderr)
  return dict(a=dict(rc=a.wait(), stdout=a.stdout, stderr=a.stderr), first=first,
              second=second, a_dir=root / 'A', b_dir=root / 'B')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('qa')
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    default = pool.submit(_default_run, root)
    resume = pool.submit(_resume_runs, root)
    return {'default': default.result(), 'resume': resume.result()}


def test_default_data_run_writes_exact_match_and_f1(runs):
  run = runs['default']
  assert run['rc'] == 0, run['stderr'][-3000:]
  evals = [r for r in read_metrics(run['workdir']) if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [6, 12]
  for r in evals:
    assert 0 <= r['exact_match'] <= 100 and 0 <= r['f1'] <= 100 and np.isfinite(r['loss'])
  assert (run['workdir'] / 'attention.png').stat().st_size > 0
  assert ' -> ' in run['stdout'] and 'examples (held-out)' in run['stdout']


def test_squad_run_resumes_exactly_after_sigkill(runs):
  r = runs['resume']
  assert r['a']['rc'] == 0, r['a']['stderr'][-3000:]
  assert r['first']['caught'] and r['first']['rc'] == -signal.SIGKILL
  assert r['second']['rc'] == 0, r['second']['stderr'][-3000:]
  assert 'resuming from step' in r['second']['stdout']
  a, b = restore_state(r['a_dir'], STEPS), restore_state(r['b_dir'], STEPS)
  a_leaves, a_def = jax.tree.flatten_with_path(a)
  b_leaves, b_def = jax.tree.flatten_with_path(b)
  assert a_def == b_def
  for (path, x), (_, y) in zip(a_leaves, b_leaves):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
  a_metrics, b_metrics = read_metrics(r['a_dir']), read_metrics(r['b_dir'])
  assert without_wallclock(b_metrics) == without_wallclock(a_metrics)
  assert any('f1' in m for m in a_metrics if m['split'] == 'eval')


def test_answer_outside_context_is_one_error_line(tmp_path):
  bad = squad_json()
  qa = bad['data'][0]['paragraphs'][3]['qas'][1]
  qa['answers'][0]['answer_start'] += 5
  path = tmp_path / 'bad_squad.json'
  path.write_text(json.dumps(bad))
  result = train([*OPTS, '--data', path, '--workdir', tmp_path / 'w'])
  assert_one_error_line(result, 'bad_squad.json', f'question {qa["id"]}', 'outside its context')


# ------------------------------------------------------------------------------------------------
# python -m train.generate --question Q --context C on the default run's checkpoint

QUESTION = 'What does json.dumps return?'
CONTEXT = ('json.dumps(obj, *, skipkeys=False, ensure_ascii=True, check_circular=True, '
           'allow_nan=True, cls=None, indent=None, separators=None, default=None, '
           'sort_keys=False, **kw): Serialize obj to a JSON formatted str using this conversion '
           'table. The arguments have the same meaning as in dump. Keys in key/value pairs of JSON '
           'are always of the type str. When a dictionary is converted into JSON, all the keys of '
           'the dictionary are coerced to strings. json.loads(s, *, cls=None, object_hook=None, '
           'parse_float=None, parse_int=None, parse_constant=None, object_pairs_hook=None, **kw): '
           'Deserialize s (a str, bytes or bytearray instance containing a JSON document) to a '
           'Python object using this conversion table.')


def call_generate(capsys, *args):
  """`train.generate.main(args)` in this process, as a CompletedProcess-like result."""
  rc = generate_cli.main([str(a) for a in args])
  out = capsys.readouterr()
  return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


def test_generate_prints_the_best_span_and_its_score(runs, capsys):
  """The printed span and score are those of a brute-force search over the logits of the run's
  windows: start <= end, both context tokens, at most --max-answer-len tokens, the first best."""
  run = runs['default']
  assert run['rc'] == 0, run['stderr'][-3000:]
  workdir = str(run['workdir'])
  options = json.loads((run['workdir'] / 'config.json').read_text())['run']
  result = call_generate(capsys, '--workdir', workdir, '--question', QUESTION,
                         '--context', CONTEXT)
  assert result.returncode == 0, result.stderr
  gen = generate_cli.load(workdir)
  example = squad.Example('q', QUESTION, CONTEXT, (), is_impossible=True)
  assert task_qa.reads_question_words(gen.model.config)  # as the run trained: marked words
  windows = task_qa.make_windows([example], gen.tokenizer, SpecialIds(),
                                 seq_len=options['seq_len'], doc_stride=options['doc_stride'],
                                 question_words=True)
  assert len(windows) > 1  # the answer is searched in every window
  batch = squad.to_batch(windows)
  start, end = gen.model.apply({'params': gen.params}, batch['tokens'], batch['token_types'],
                               valid=batch['valid'], method='qa_logits')
  longest, best, text = options['max_answer_len'], -np.inf, None
  for w, s, e in zip(windows, np.asarray(start, np.float64), np.asarray(end, np.float64)):
    context = np.flatnonzero(w.offsets[:, 1] > w.offsets[:, 0])
    for i in context:
      ends = context[(context >= i) & (context < i + longest)]
      j = ends[np.argmax(e[ends])]
      if s[i] + e[j] > best:
        best, text = s[i] + e[j], CONTEXT[w.offsets[i, 0]:w.offsets[j, 1]]
  [line] = result.stdout.splitlines()
  head, _, score = line.rpartition(' (')
  assert head == f'{QUESTION} -> {text}' and text
  assert float(score.rstrip(')')) == pytest.approx(best, abs=1e-3)


def test_generate_request_errors_are_one_line(runs, capsys):
  workdir = runs['default']['workdir']
  assert_one_error_line(call_generate(capsys, '--workdir', workdir, '--question', 'Who?'),
                        '--question and --context come together', '--context')
  assert_one_error_line(call_generate(capsys, '--workdir', workdir, '--input', 'x'),
                        'qa run', '--question Q --context C', 'not --input')
  assert_one_error_line(call_generate(capsys, '--workdir', workdir, '--question', 'Who?',
                                      '--context', 'Anna.', '--beam-size', '2'),
                        '--beam-size', 'qa run')
