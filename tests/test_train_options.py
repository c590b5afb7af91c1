"""`python -m train`'s options are generated from `RunConfig`'s fields (issue 12, item 3).

One source of truth: every field is an option whose default is the field's, `--help` shows each
default in the option's group, and each check lives in one place (`RunConfig`), whether the
config comes from the command line or from code. Everything here runs in-process, in milliseconds.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from train import config, optim, parallel
from train.config import DISTRIBUTED_ARGS, GROUPS, RunConfig, UsageError, from_args, parser
from train.tasks import TASKS, task_class

FIELDS = dataclasses.fields(RunConfig)


def _flag(field) -> str:
  return field.metadata['flag'] or config.option_name(field.name)


def _squeezed(text: str) -> str:
  """Without whitespace: argparse wraps lines (and may break after a hyphen) to the terminal."""
  return re.sub(r'\s+', '', text)


def test_parser_defaults_are_run_config_defaults():
  args = vars(parser().parse_args([]))
  for field in FIELDS:
    assert args[field.name] == field.default, field.name
  assert {k: args.pop(k) for k in DISTRIBUTED_ARGS} == dict(
      coordinator=None, num_processes=None, process_id=None, distributed=False)
  assert args.keys() == {f.name for f in FIELDS}  # nothing else
  assert from_args([]) == (RunConfig(), dict(coordinator=None, num_processes=None,
                                             process_id=None, distributed=False))


def test_every_field_has_an_option_in_its_group():
  p = parser()
  groups = {g.title: g for g in p._action_groups}
  for field in FIELDS:
    group = groups[GROUPS[field.metadata['group']]]
    actions = [a for a in group._group_actions if a.dest == field.name]
    assert len(actions) == 1, field.name
    assert actions[0].option_strings == [_flag(field)], field.name
  multi_host = groups['multi-host']._group_actions
  assert [a.dest for a in multi_host] == list(DISTRIBUTED_ARGS)


def test_help_shows_every_default_in_its_group():
  text = parser().format_help()
  squeezed = _squeezed(text)
  for field in FIELDS:
    choices, default = field.metadata['choices'], field.metadata['shown'] or field.default
    metavar = ('{' + ','.join(choices) + '}' if choices else
               '' if field.type == 'bool' else field.name.upper())
    # The option, its own help text, then its default: nothing of another option in between.
    expected = f'{_flag(field)} {metavar} {field.metadata["help"]} (default: {default})'
    assert _squeezed(expected) in squeezed, expected
  titles = [line for line in text.splitlines() if line.endswith(':') and not line[0].isspace()]
  assert titles == ['options:', *(f'{t}:' for t in GROUPS.values()), 'multi-host:'], titles
  # A few spelled out, as a user reads them.
  for shown in ['--seq-len SEQ_LEN sequence length (text, mlm, translate; qa: the window) '
                '(default: per task (dates 128, text 128, mlm 128, translate 128, summarize 128, '
                'qa 192, speech 128))',
                '--steps STEPS total training steps (micro-batches) (default: per task (dates '
                '3000, text 2000, mlm 2000, translate 5000, summarize 2000, qa 1000, speech '
                '3000))',
                '(default: per task (dates 0.002, text 0.001, mlm 0.001, translate 0.001, '
                'summarize 0.002, qa 0.001, speech 0.002))',
                '(default: per task (dates 64, text 32, mlm 32, translate 64, summarize 32, '
                'qa 32, speech 32))',
                '(default: per task (dates 300, text 200, mlm 200, translate 500, summarize 200, '
                'qa 200, speech 300))',
                '--schedule {rsqrt,cosine,constant}', '--no-progress hide the progress bar '
                '(default: shown)', '--parallel {mesh,pmap}', '(default: every device on data)',
                "override the preset's dropout rate (default: the preset's; 0 for qa's own preset)",
                '--on-nan {stop,skip}', '(default: stop)',
                '--task {dates,text,mlm,translate,summarize,qa,speech}']:
    assert _squeezed(shown) in squeezed, shown


def test_per_task_defaults_are_the_tasks():
  for task, defaults in config.TASK_DEFAULTS.items():
    run = RunConfig(task=task)
    assert {k: getattr(run, k) for k in defaults} == defaults
    assert from_args(['--task', task])[0] == run
  assert RunConfig(task='text', steps=7, warmup=0).steps == 7
  assert RunConfig(task='text', steps=7, warmup=0).warmup == 0
  # The per-task schedule --help describes.
  schedules = {name: task_class(name).default_schedule for name in config.TASK_NAMES}
  assert schedules == {'dates': 'rsqrt', 'translate': 'rsqrt', 'summarize': 'rsqrt',
                       'speech': 'rsqrt', 'text': 'cosine', 'mlm': 'cosine', 'qa': 'cosine'}
  assert RunConfig.__dataclass_fields__['schedule'].metadata['shown'] == (
      'per task: rsqrt for dates, translate, summarize and speech, cosine for text, mlm and qa')


def test_choices_are_what_the_code_implements():
  choices = {f.name: f.metadata['choices'] for f in FIELDS if f.metadata['choices']}
  assert choices['schedule'] == tuple(optim.SCHEDULES)
  assert choices['parallel'] == tuple(parallel.LAYOUTS)
  assert set(choices['task']) == {name for name in choices['task'] if task_class(name)}
  assert set(choices) == {'task', 'preset', 'schedule', 'dtype', 'on_bad_bytes', 'on_nan',
                          'tokenizer', 'parallel'}


@pytest.mark.parametrize('field', [f for f in FIELDS if f.metadata['choices']],
                         ids=lambda f: f.name)
def test_a_bad_choice_is_one_line_from_run_config(field):
  """argparse takes any string: RunConfig refuses it, with the message the CLI prints."""
  expected = f"{_flag(field)} 'bogus' is not one of {', '.join(field.metadata['choices'])}"
  with pytest.raises(UsageError) as info:
    from_args([_flag(field), 'bogus'])
  assert str(info.value) == expected
  with pytest.raises(UsageError, match=re.escape(expected)):
    RunConfig(**{field.name: 'bogus'})


def test_bad_choice_messages_spelled_out():
  for args, message in [
      (['--task', 'poetry'], "--task 'poetry' is not one of dates, text, mlm, translate, "
                             "summarize, qa, speech"),
      (['--schedule', 'step'], "--schedule 'step' is not one of rsqrt, cosine, constant"),
      (['--parallel', 'dp'], "--parallel 'dp' is not one of mesh, pmap"),
      (['--dtype', 'float16'], "--dtype 'float16' is not one of float32, bfloat16"),
      (['--on-nan', 'ignore'], "--on-nan 'ignore' is not one of stop, skip")]:
    with pytest.raises(UsageError, match=f'^{re.escape(message)}$'):
      from_args(args)
  assert RunConfig(schedule=None).schedule is None  # None: the task's own


@pytest.mark.parametrize('args, message', [
    (['--steps', '0'], '--steps 0 must be positive'),
    (['--batch-size', '-8'], '--batch-size -8 must be positive'),
    (['--warmup', '-1'], '--warmup -1 must be positive'),
    (['--learning-rate', '0'], '--learning-rate 0.0 must be > 0'),
    (['--weight-decay', '-0.1'], '--weight-decay -0.1 must be >= 0'),
    (['--label-smoothing', '1'], '--label-smoothing 1.0 must be in [0, 1.0)'),
    (['--dropout', 'nan'], '--dropout nan must be a finite number'),
    (['--examples', '-1'], '--examples -1 must be >= 0'),
])
def test_ranges_are_checked_after_parsing(args, message):
  with pytest.raises(UsageError, match=f'^{re.escape(message)}$'):
    from_args(args)


def test_flags_and_multi_host_options():
  run, distributed = from_args(['--no-progress', '--coordinator', 'host:1234',
                                '--num-processes', '2', '--process-id', '1', '--seq-len', '64',
                                '--mesh', 'data=2,fsdp=-1', '--learning-rate', '3e-4'])
  assert run == RunConfig(progress=False, seq_len=64, mesh='data=2,fsdp=-1', learning_rate=3e-4)
  assert distributed == dict(coordinator='host:1234', num_processes=2, process_id=1,
                             distributed=False)
  assert not set(DISTRIBUTED_ARGS) & {f.name for f in FIELDS}
  assert from_args(['--distributed'])[1]['distributed'] is True


def test_tasks_take_their_options_from_the_run_config():
  run = RunConfig(task='dates', seed=3)
  task = TASKS['dates'](run)
  assert task.run is run and task.data_fingerprint is None
  task.prepare()
  other = TASKS['dates'](RunConfig(seed=4))
  assert task.eval_pairs()[:5] != other.eval_pairs()[:5]  # the seed reached the task
  assert task.dummy_batch(4)['src'].shape == (4, task.src_len)
