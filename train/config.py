"""The run's settings: one frozen dataclass, and the command line generated from its fields.

Each field of `RunConfig` is declared with `option(...)`: its default, its help text, its group in
`--help` and, for a closed set of values, its choices. `parser()` builds every option from those
fields, so a default is written once and `--help` shows it. `RunConfig` validates itself (choices,
ranges, finiteness), whether it comes from the command line or from code.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing

from flaxformer_lite import PRESETS
from train import optim


class UsageError(ValueError):
  """Bad user input (options, data, devices, workdir): the CLI prints one line and exits 2.

  Anything else is a bug and keeps its traceback.
  """

TASK_NAMES = ('dates', 'text', 'mlm', 'translate', 'summarize', 'qa', 'speech')
# Per-task defaults chosen so `python -m train` with no arguments converges on 2 CPU cores.
TASK_DEFAULTS = {
    'dates': dict(steps=3000, batch_size=64, learning_rate=2e-3, warmup=300),
    'translate': dict(steps=5000, batch_size=64, learning_rate=1e-3, warmup=500),
    'text': dict(steps=2000, batch_size=32, learning_rate=1e-3, warmup=200),
    'mlm': dict(steps=2000, batch_size=32, learning_rate=1e-3, warmup=200),
    'summarize': dict(steps=2000, batch_size=32, learning_rate=2e-3, warmup=200),
    # qa: small without dropout (it underfits, it does not overfit); with the question's words
    # marked in the context (train/squad.py) it passes held-out F1 90 by step ~500.
    'qa': dict(preset='small', dropout=0.0, seq_len=192, steps=1000, batch_size=32,
               learning_rate=1e-3, warmup=200, vocab_size=2000),
    'speech': dict(steps=3000, batch_size=32, learning_rate=2e-3, warmup=300),
}
# The --tokenizer values each task takes, its default first. word-pieces decodes with spaces at
# punctuation, so only qa (answers are spans of the context) takes it; qa learns several times
# faster with it than with bytes or SentencePiece (train/word_pieces.py says why). Summarize
# learns faster from SentencePiece pieces than from bytes (train/task_summarize.py).
TASK_TOKENIZERS = {'dates': ('byte',), 'text': ('byte', 'sentencepiece'), 'mlm': ('byte',),
                   'translate': ('byte', 'sentencepiece'), 'summarize': ('sentencepiece', 'byte'),
                   'qa': ('word-pieces', 'byte', 'sentencepiece'), 'speech': ('byte',)}
# The options' groups in --help, in order: field metadata 'group' -> title.
GROUPS = {'model': 'model', 'data': 'data', 'optimization': 'optimization',
          'checkpoints': 'checkpoints, evaluation and reports', 'parallel': 'parallel'}
DISTRIBUTED_ARGS = ('coordinator', 'num_processes', 'process_id', 'distributed')


def option(default, help: str, group: str, *, choices: tuple | None = None,
           shown: str | None = None, flag: str | None = None):
  """A RunConfig field that is also a command-line option.

  `shown`: what --help says of the default (where the value itself would not say it, e.g. None);
  `flag`: the option's name where it is not --FIELD-NAME (a bool field's flag turns it around).
  """
  return dataclasses.field(default=default, metadata=dict(
      help=help, group=group, choices=choices, shown=shown, flag=flag))


def option_name(field_name: str) -> str:
  return '--' + field_name.replace('_', '-')


def _per_task(name: str, default=128) -> str:
  return 'per task (' + ', '.join(f'{task} {TASK_DEFAULTS[task].get(name, default)}'
                                  for task in TASK_NAMES) + ')'


@dataclasses.dataclass(frozen=True)
class RunConfig:
  task: str = option('dates', 'what to train', 'model', choices=TASK_NAMES)
  preset: str | None = option(None, 'model preset (not with --init-from)', 'model',
                              choices=tuple(sorted(PRESETS)), shown='small for qa, tiny for the others')
  init_from: str | None = option(
      None, 'a local Hugging Face checkpoint folder to start from: its model, weights and '
      'tokenizer (translate, dates, summarize: marian, bart or t5; text: gpt2; mlm: '
      'BertForMaskedLM; qa: bert); the '
      'optimizer starts fresh', 'model', shown='none: a new model of --preset')
  steps: int | None = option(None, 'total training steps (micro-batches)', 'optimization',
                             shown=_per_task('steps'))
  batch_size: int | None = option(None, 'global batch size (all devices)', 'optimization',
                                  shown=_per_task('batch_size'))
  workdir: str = option('workdir', 'checkpoints, metrics and plots go here', 'checkpoints')
  data: str | None = option(
      None, 'text file/folder (text, mlm), TSV file (translate), TSV or JSON Lines (summarize), '
      'SQuAD JSON (qa), a folder of audio files with transcripts.tsv (speech)', 'data',
      shown="generated or the Python standard library's own (see the README)")
  seq_len: int | None = option(None, 'sequence length (text, mlm, translate; qa: the window)',
                               'data', shown=_per_task('seq_len'))
  seed: int = option(0, 'initial parameters, dropout and the order of the data', 'data')
  learning_rate: float | None = option(None, 'peak learning rate', 'optimization',
                                       shown=_per_task('learning_rate'))
  schedule: str | None = option(
      None, 'learning-rate schedule: rsqrt (the paper), cosine or constant', 'optimization',
      choices=tuple(optim.SCHEDULES), shown='per task: rsqrt for dates, translate, summarize '
      'and speech, cosine for text, mlm and qa')
  warmup: int | None = option(None, 'warmup steps', 'optimization', shown=_per_task('warmup'))
  weight_decay: float = option(0.01, "AdamW's weight decay (matrices only)", 'optimization')
  clip_norm: float = option(1.0, 'gradients are clipped to this global norm', 'optimization')
  label_smoothing: float = option(0.1, 'label smoothing of the training loss', 'optimization')
  accumulate: int = option(1, 'micro-batches per optimizer update', 'optimization')
  dtype: str = option('float32', 'compute dtype (parameters stay float32)', 'model',
                      choices=('float32', 'bfloat16'))
  dropout: float | None = option(None, "override the preset's dropout rate", 'model',
                                 shown="the preset's; 0 for qa's own preset")
  eval_every: int = option(500, 'steps between evaluations', 'checkpoints')
  checkpoint_every: int = option(500, 'steps between checkpoints', 'checkpoints')
  keep_checkpoints: int = option(3, 'how many of the newest checkpoints are kept', 'checkpoints')
  log_every: int = option(50, 'steps between lines of metrics.jsonl', 'checkpoints')
  examples: int = option(8, 'example outputs printed at the end', 'checkpoints')
  on_bad_bytes: str = option('error', 'invalid UTF-8 in --data: an error, or replaced', 'data',
                             choices=('error', 'replace'))
  on_nan: str = option(
      'stop', 'a step whose loss or gradient norm is not finite is never applied; stop: end '
      'the run there, the newest checkpoint being the last good one; skip: skip such steps, '
      'counted in metrics.jsonl as skipped', 'optimization', choices=('stop', 'skip'))
  progress: bool = option(True, 'hide the progress bar', 'checkpoints', flag='--no-progress',
                          shown='shown')
  tokenizer: str | None = option(
      None, 'byte; sentencepiece: a SentencePiece model trained on the training data (text, '
      'translate, summarize, qa); word-pieces: one trained on its words split as BERT splits '
      'them (qa)', 'data', choices=('byte', 'sentencepiece', 'word-pieces'),
      shown='per task: word-pieces for qa, sentencepiece for summarize, byte for the others')
  vocab_size: int | None = option(None, 'vocabulary size of a trained tokenizer', 'data',
                                  shown=_per_task('vocab_size', 1024))
  doc_stride: int = option(64, 'qa: tokens between the starts of overlapping context windows',
                           'data')
  max_answer_len: int = option(48, 'qa: the longest answer span predicted, in tokens', 'data')
  beam_size: int = option(4, 'summarize, speech: beams of the evaluation decoding', 'checkpoints')
  parallel: str = option('mesh', "mesh (jit + shardings) or pmap (one host; under dropout its "
                         "masks differ from mesh's, which equal one device's)", 'parallel',
                         choices=('mesh', 'pmap'))
  mesh: str | None = option(None, 'mesh shape, e.g. data=8 or data=2,fsdp=2,tensor=2 (-1 takes '
                            'the remaining devices)', 'parallel', shown='every device on data')

  def __post_init__(self):
    for field in dataclasses.fields(self):
      choices, value = field.metadata['choices'], getattr(self, field.name)
      if choices and value not in choices and not (value is None and field.default is None):
        raise UsageError(f'{option_name(field.name)} {value!r} is not one of '
                         f'{", ".join(choices)}')
    self._check_ranges()
    self._check_init_from()
    defaults = TASK_DEFAULTS[self.task]
    for name in ('steps', 'batch_size', 'learning_rate', 'warmup', 'seq_len'):
      if getattr(self, name) is None:
        object.__setattr__(self, name, defaults.get(name, 128))
    self._check_tokenizer()

  def _check_tokenizer(self):
    takes = TASK_TOKENIZERS[self.task]
    if self.tokenizer is None:
      object.__setattr__(self, 'tokenizer', takes[0])
    elif self.tokenizer not in takes and not self.init_from:
      raise UsageError(f'--tokenizer {self.tokenizer} does not apply to --task {self.task}; it '
                       f'takes {" or ".join(takes)}')
    if self.vocab_size is None:
      object.__setattr__(self, 'vocab_size', TASK_DEFAULTS[self.task].get('vocab_size', 1024))

  def _check_init_from(self):
    """--init-from takes the model and tokenizer from the checkpoint: options that would choose
    them too are refused, not ignored. (--dropout and --dtype still apply to its model.)"""
    if self.init_from is None:
      defaults = TASK_DEFAULTS[self.task]
      if self.preset is None:
        object.__setattr__(self, 'preset', defaults.get('preset', 'tiny'))
      if self.dropout is None and self.preset == defaults.get('preset', 'tiny'):
        object.__setattr__(self, 'dropout', defaults.get('dropout'))  # None: the preset's
      return
    if not self.init_from.strip():
      raise UsageError('--init-from needs a folder')
    if self.preset is not None:
      raise UsageError(f'--preset {self.preset} and --init-from: the model comes from the '
                       'checkpoint; drop --preset')
    if self.tokenizer is not None:
      raise UsageError(f'--tokenizer {self.tokenizer} and --init-from: the checkpoint\'s own '
                       'tokenizer is used; drop --tokenizer')
    object.__setattr__(self, 'tokenizer', 'byte')  # no tokenizer of its own: config.json says so

  def _check_ranges(self):
    for name in ('steps', 'batch_size', 'seq_len', 'accumulate', 'eval_every', 'checkpoint_every',
                 'keep_checkpoints', 'log_every', 'warmup'):
      value = getattr(self, name)
      if value is not None and value < (0 if name == 'warmup' else 1):
        raise UsageError(f'{option_name(name)} {value} must be positive')
    for name, low, high in (('learning_rate', 0.0, None), ('weight_decay', -1e-12, None),
                            ('clip_norm', 0.0, None), ('label_smoothing', -1e-12, 1.0),
                            ('dropout', -1e-12, 1.0)):
      value = getattr(self, name)
      if value is not None and not math.isfinite(value):  # NaN passes every comparison below
        raise UsageError(f'{option_name(name)} {value} must be a finite number')
      if value is not None and (value <= low or (high is not None and value >= high)):
        bound = f'in [0, {high})' if high else ('>= 0' if low < 0 else '> 0')
        raise UsageError(f'{option_name(name)} {value} must be {bound}')
    if self.examples < 0:
      raise UsageError(f'--examples {self.examples} must be >= 0')


def parser() -> argparse.ArgumentParser:
  """`python -m train`'s options: one per RunConfig field, grouped, plus the multi-host ones."""
  p = argparse.ArgumentParser(prog='python -m train', description=(
      'Train a flaxformer_lite model. Rerunning the same command with the same --workdir '
      'resumes from the newest checkpoint.'))
  groups = {name: p.add_argument_group(title) for name, title in GROUPS.items()}
  types = typing.get_type_hints(RunConfig)
  for field in dataclasses.fields(RunConfig):
    _add_option(groups[field.metadata['group']], field, types[field.name])
  # Not RunConfig fields: they say how to join the other processes, not what to train.
  g = p.add_argument_group('multi-host', 'one process per host; every process runs the same '
                           'command')
  g.add_argument('--coordinator', help='HOST:PORT of process 0')
  g.add_argument('--num-processes', type=int)
  g.add_argument('--process-id', type=int)
  g.add_argument('--distributed', action='store_true', help='jax.distributed.initialize() '
                 'from the cluster environment (SLURM, TPU pods, ...)')
  return p


def _add_option(group, field: dataclasses.Field, hint) -> None:
  meta = field.metadata
  shown = field.default if meta['shown'] is None else meta['shown']
  help_text = f'{meta["help"]} (default: {shown})'.replace('%', '%%')  # argparse formats with %
  flag = meta['flag'] or option_name(field.name)
  if hint is bool:
    group.add_argument(flag, dest=field.name, help=help_text, default=field.default,
                       action='store_false' if field.default else 'store_true')
    return
  # Choices are shown, not enforced here: RunConfig refuses a bad value with its one-line error.
  value_type = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
  choices = meta['choices']
  group.add_argument(flag, dest=field.name, type=value_type, default=field.default,
                     help=help_text, metavar='{' + ','.join(choices) + '}' if choices else None)


def from_args(argv=None) -> tuple[RunConfig, dict]:
  """(run config, multi-host arguments)."""
  args = vars(parser().parse_args(argv))
  distributed = {k: args.pop(k) for k in DISTRIBUTED_ARGS}
  return RunConfig(**args), distributed
