"""The run's settings: one frozen dataclass filled from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import math

from flaxformer_lite import PRESETS


class UsageError(ValueError):
  """Bad user input (options, data, devices, workdir): the CLI prints one line and exits 2.

  Anything else is a bug and keeps its traceback.
  """

TASK_NAMES = ('dates', 'text', 'mlm', 'translate')
# Per-task defaults chosen so `python -m train` with no arguments converges on 2 CPU cores.
TASK_DEFAULTS = {
    'dates': dict(steps=3000, batch_size=64, learning_rate=2e-3, warmup=300),
    'translate': dict(steps=5000, batch_size=64, learning_rate=1e-3, warmup=500),
    'text': dict(steps=2000, batch_size=32, learning_rate=1e-3, warmup=200),
    'mlm': dict(steps=2000, batch_size=32, learning_rate=1e-3, warmup=200),
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  task: str = 'dates'
  preset: str = 'tiny'
  steps: int | None = None
  batch_size: int | None = None
  workdir: str = 'workdir'
  data: str | None = None
  seq_len: int = 128
  seed: int = 0
  learning_rate: float | None = None
  schedule: str | None = None  # None: the task's default (rsqrt for seq2seq, else cosine)
  warmup: int | None = None
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  label_smoothing: float = 0.1
  accumulate: int = 1
  dtype: str = 'float32'
  dropout: float | None = None
  eval_every: int = 500
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  log_every: int = 50
  examples: int = 8
  on_bad_bytes: str = 'error'
  on_nan: str = 'stop'
  progress: bool = True
  tokenizer: str = 'byte'
  vocab_size: int = 1024
  parallel: str = 'mesh'
  mesh: str | None = None  # e.g. 'data=2,fsdp=2,tensor=2'; None: all devices on 'data'

  def __post_init__(self):
    if self.task not in TASK_NAMES:
      raise UsageError(f'--task {self.task!r} is not one of {", ".join(TASK_NAMES)}')
    if self.preset not in PRESETS:
      raise UsageError(f'--preset {self.preset!r} is not one of {", ".join(sorted(PRESETS))}')
    for name in ('steps', 'batch_size', 'seq_len', 'accumulate', 'eval_every', 'checkpoint_every',
                 'keep_checkpoints', 'log_every', 'warmup'):
      value = getattr(self, name)
      if value is not None and value < (0 if name == 'warmup' else 1):
        raise UsageError(f'--{name.replace("_", "-")} {value} must be positive')
    for name, low, high in (('learning_rate', 0.0, None), ('weight_decay', -1e-12, None),
                            ('clip_norm', 0.0, None), ('label_smoothing', -1e-12, 1.0),
                            ('dropout', -1e-12, 1.0)):
      value = getattr(self, name)
      if value is not None and not math.isfinite(value):  # NaN passes every comparison below
        raise UsageError(f'--{name.replace("_", "-")} {value} must be a finite number')
      if value is not None and (value <= low or (high is not None and value >= high)):
        bound = f'in [0, {high})' if high else ('>= 0' if low < 0 else '> 0')
        raise UsageError(f'--{name.replace("_", "-")} {value} must be {bound}')
    if self.examples < 0:
      raise UsageError(f'--examples {self.examples} must be >= 0')
    if self.dtype not in ('float32', 'bfloat16'):
      raise UsageError(f'--dtype {self.dtype!r} is not one of float32, bfloat16')
    if self.schedule not in (None, 'rsqrt', 'cosine', 'constant'):
      raise UsageError(f'--schedule {self.schedule!r} is not one of rsqrt, cosine, constant')
    if self.tokenizer not in ('byte', 'sentencepiece'):
      raise UsageError(f'--tokenizer {self.tokenizer!r} is not one of byte, sentencepiece')
    if self.parallel not in ('mesh', 'pmap'):
      raise UsageError(f'--parallel {self.parallel!r} is not one of mesh, pmap')
    if self.on_bad_bytes not in ('error', 'replace'):
      raise UsageError(f'--on-bad-bytes {self.on_bad_bytes!r} is not one of error, replace')
    if self.on_nan not in ('stop', 'skip'):
      raise UsageError(f'--on-nan {self.on_nan!r} is not one of stop, skip')
    defaults = TASK_DEFAULTS[self.task]
    for name in ('steps', 'batch_size', 'learning_rate', 'warmup'):
      if getattr(self, name) is None:
        object.__setattr__(self, name, defaults[name])


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m train', description=(
      'Train a flaxformer_lite model. Rerunning the same command with the same --workdir '
      'resumes from the newest checkpoint.'))
  p.add_argument('--task', default='dates', help=f'one of {", ".join(TASK_NAMES)}')
  p.add_argument('--preset', default='tiny', help=f'model preset: {", ".join(sorted(PRESETS))}')
  p.add_argument('--steps', type=int, help='total training steps (micro-batches)')
  p.add_argument('--batch-size', type=int, help='global batch size (all devices)')
  p.add_argument('--workdir', default='workdir', help='checkpoints, metrics and plots go here')
  p.add_argument('--data', help='text file/folder (text, mlm) or TSV file (translate)')
  p.add_argument('--seq-len', type=int, default=128, help='sequence length (text, mlm, translate)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--learning-rate', type=float, help='peak learning rate')
  p.add_argument('--schedule', help='rsqrt (the paper), cosine or constant')
  p.add_argument('--warmup', type=int, help='warmup steps')
  p.add_argument('--weight-decay', type=float, default=0.01)
  p.add_argument('--clip-norm', type=float, default=1.0)
  p.add_argument('--label-smoothing', type=float, default=0.1)
  p.add_argument('--accumulate', type=int, default=1, help='micro-batches per optimizer update')
  p.add_argument('--dtype', default='float32', help='compute dtype: float32 or bfloat16 '
                 '(parameters stay float32)')
  p.add_argument('--dropout', type=float, help="override the preset's dropout rate")
  p.add_argument('--eval-every', type=int, default=500)
  p.add_argument('--checkpoint-every', type=int, default=500)
  p.add_argument('--keep-checkpoints', type=int, default=3)
  p.add_argument('--log-every', type=int, default=50)
  p.add_argument('--examples', type=int, default=8, help='example outputs printed at the end')
  p.add_argument('--on-bad-bytes', default='error', help='error (default) or replace')
  p.add_argument('--on-nan', default='stop', help='a step whose loss or gradient norm is not '
                 'finite is never applied; stop (default): end the run there, the newest '
                 'checkpoint being the last good one; skip: skip such steps, counted in '
                 'metrics.jsonl as skipped')
  p.add_argument('--tokenizer', default='byte', help='byte (default) or sentencepiece: a '
                 'SentencePiece model trained on the training data (text, translate)')
  p.add_argument('--vocab-size', type=int, default=1024, help='SentencePiece vocabulary size')
  p.add_argument('--no-progress', dest='progress', action='store_false')
  p.add_argument('--parallel', default='mesh', help='mesh (jit + shardings, default) or pmap '
                 "(one host; under dropout its masks differ from mesh's, which equal one device's)")
  p.add_argument('--mesh', help='mesh shape, e.g. data=8 or data=2,fsdp=2,tensor=2 '
                 '(-1 takes the remaining devices; default: every device on data)')
  g = p.add_argument_group('multi-host (one process per host; every process runs the same '
                           'command)')
  g.add_argument('--coordinator', help='HOST:PORT of process 0')
  g.add_argument('--num-processes', type=int)
  g.add_argument('--process-id', type=int)
  g.add_argument('--distributed', action='store_true', help='jax.distributed.initialize() '
                 'from the cluster environment (SLURM, TPU pods, ...)')
  return p


DISTRIBUTED_ARGS = ('coordinator', 'num_processes', 'process_id', 'distributed')


def from_args(argv=None) -> tuple[RunConfig, dict]:
  """(run config, multi-host arguments)."""
  args = vars(parser().parse_args(argv))
  distributed = {k: args.pop(k) for k in DISTRIBUTED_ARGS}
  return RunConfig(**args), distributed
