"""The training loop: build or resume the state, train, evaluate, checkpoint, report."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from flaxformer_lite import viz
from train import checkpoint, data, optim, parallel, pretrained, workdir
from train import state as state_lib
from train.config import RunConfig, UsageError
from train.metrics import MetricsLog, progress
from train.step import make_eval_step, make_train_step
from train.tasks import SpecialIds, task_class


class StopRequested:
  """SIGTERM/SIGINT set a flag; the loop saves and exits at the next step boundary.

  With several processes they must stop at the same step (a save is collective), so the flags
  are compared across processes every `every` steps and acted on only then.
  """

  def __init__(self, every: int = 1):
    self.signal = None
    self.every = every
    self._old = {}

  def now(self, step: int) -> str | None:
    """The signal to stop for at `step`, checked across processes every `every` steps."""
    if jax.process_count() > 1 and step % self.every:
      return None
    return self.requested()

  def requested(self) -> str | None:
    """The signal to stop for, if any process received one (collective on several)."""
    if jax.process_count() == 1:
      return self.signal
    flags = multihost_utils.process_allgather(np.array(self.signal is not None))
    return (self.signal or 'SIGTERM (on another process)') if flags.any() else None

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.signal is not None:  # e.g. a second Ctrl-C while the checkpoint is written
      print(f'{name} again: still stopping; the checkpoint being written is kept (SIGKILL '
            'would abandon it)', file=sys.stderr)
    self.signal = name

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class Setup:
  """Everything derived from a RunConfig: task, model, optimizer, mesh and abstract state."""
  run: RunConfig
  task: object
  model: object
  tx: object
  learning_rate: object
  layout: parallel.Layout
  abstract_state: object
  shardings: object
  pretrained: pretrained.Pretrained | None = None  # --init-from's checkpoint

  def meta(self) -> dict:
    """What a checkpoint (and config.json) says of the run it belongs to."""
    # As JSON reads it back (tuples become lists), so a saved checkpoint's metadata compares
    # equal to a rerun's.
    return json.loads(json.dumps({
        'task': self.run.task, 'run': dataclasses.asdict(self.run),
        'model_config': self.model_config.to_dict(), 'data': self.task.data_fingerprint}))

  @property
  def model_config(self):
    return self.model.config


def make_model(run: RunConfig, task, source: pretrained.Pretrained | None):
  """The preset's model for the task's tokenizer, or the checkpoint's; --dtype and --dropout
  apply to either."""
  overrides = {'dtype': jnp.dtype(run.dtype)}
  if run.dropout is not None:
    overrides['dropout_rate'] = run.dropout
  if source is not None:
    model = source.model.clone(config=source.model.config.replace(**overrides))
    pretrained.check_length(model.config, task.max_positions, run.init_from)
    return model
  try:
    return task.model_cls(task.config(run.preset, **overrides))
  except ValueError as e:  # e.g. --dropout outside [0, 1)
    raise UsageError(f'--preset {run.preset} with these options: {e}') from None


def build(run: RunConfig) -> Setup:
  task = task_class(run.task)(run, data_fingerprint=data.fingerprint(run.data))
  # Checked before any data is read; its tokenizer is the one the data is read with.
  source = pretrained.load(run) if run.init_from else None
  if source is not None:
    task.tokenizer = source.tokenizer
  task.prepare()
  model = make_model(run, task, source)
  task.ids = SpecialIds.of(model.config)
  updates = -(-run.steps // run.accumulate)
  learning_rate = optim.schedule(run.schedule or task.default_schedule, run.learning_rate,
                                 run.warmup, updates)
  tx = optim.make_optimizer(learning_rate=learning_rate, weight_decay=run.weight_decay,
                            clip_norm=run.clip_norm, accumulate=run.accumulate)
  layout = parallel.make_layout(run.parallel, run.mesh, run.batch_size)
  dummy = task.dummy_batch(run.batch_size)
  abstract_state = jax.eval_shape(
      functools.partial(state_lib.create, model, task, tx, run.seed, dummy))
  boxed = state_lib.abstract_boxed_params(model, task, run.seed, dummy)
  shardings = layout.state_shardings(tx, abstract_state, boxed)
  return Setup(run, task, model, tx, learning_rate, layout, abstract_state, shardings, source)


def restore_or_create(setup: Setup, ckpts: checkpoint.Checkpoints):
  """(state, step): the newest checkpoint that restores, straight into the layout's shardings,
  or a new state at step 0, placed where the layout's train step takes it. A checkpoint saved
  under another mesh (or device count) restores under this one; damaged newer ones are moved
  aside."""
  newest = ckpts.restore_newest(checkpoint.abstract(setup.abstract_state, setup.shardings),
                                setup.meta())
  create = functools.partial(state_lib.create, setup.model, setup.task, setup.tx,
                             setup.run.seed, setup.task.dummy_batch(setup.run.batch_size))
  if newest is None and setup.pretrained is not None:
    state, start = _from_pretrained(setup, create), 0
  elif newest is None:
    with setup.layout.context():
      state, start = jax.jit(create, out_shardings=setup.shardings)(), 0
  else:
    start, state = newest
  return setup.layout.put_state(state, setup.shardings), start


def _from_pretrained(setup: Setup, create):
  """A new state around the checkpoint's params (the optimizer starts fresh); parts the task
  never uses and the checkpoint lacks are a new model's (`create`)."""
  params, missing = pretrained.matching_params(setup.pretrained, setup.abstract_state.params)
  with setup.layout.context():
    if missing:
      new = jax.jit(lambda: create().params, out_shardings=setup.shardings.params)()
      params.update({k: new[k] for k in missing})
    params = jax.device_put(params, setup.shardings.params)  # each device gets its shards only
    create_from = functools.partial(state_lib.create_from, tx=setup.tx, seed=setup.run.seed)
    return jax.jit(create_from, out_shardings=setup.shardings)(params)


def evaluate(setup: Setup, eval_step, params, batches) -> dict:
  sums = None
  for batch in batches:
    out = eval_step(params, setup.layout.put_batch(batch))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  weight = max(float(sums['weight']), 1.0)
  result = {'loss': float(sums['nll']) / weight, 'accuracy': float(sums['correct']) / weight}
  if setup.run.task in ('text', 'mlm'):
    result['perplexity'] = math.exp(min(result['loss'], 50.0))
  return result


class Diverged(UsageError):
  """A non-finite loss or gradient norm under --on-nan stop: one line, exit 2."""


def run(run: RunConfig) -> dict | None:
  """Trains (or resumes) as `run` says; returns the final evaluation (None if stopped by a
  signal, after saving a checkpoint).

  Signals are caught from the start: Ctrl-C while data loads or the step compiles stops cleanly
  too, and a second one while the last checkpoint is written waits for it.
  """
  with StopRequested(every=run.log_every) as stop, workdir.claimed(run.workdir):
    setup = build(run)
    ckpts = checkpoint.Checkpoints(os.path.join(run.workdir, 'checkpoints'), run.keep_checkpoints)
    try:
      state, start = restore_or_create(setup, ckpts)
      if setup.pretrained is not None:  # what resume and train.generate need, without DIR
        pretrained.save(run.workdir, setup.pretrained)
      if jax.process_index() == 0:
        workdir.write_json(os.path.join(run.workdir, 'config.json'), setup.meta())
      log = MetricsLog(run.workdir, start, enabled=jax.process_index() == 0)
      result = _train(setup, state, start, ckpts, log, stop)
    except BaseException:
      with contextlib.suppress(UsageError):  # the first error is the one to report
        ckpts.close()
      raise
    ckpts.close()
    return result


def _stopped_early(stop: StopRequested, start: int) -> bool:
  signal_name = stop.requested()
  if signal_name and jax.process_index() == 0:
    print(f'{signal_name}: stopped before training {"resumed" if start else "began"}; nothing '
          'new to save')
  return signal_name is not None


def _check_finite(setup: Setup, step: int, metrics, last_saved: int | None) -> None:
  """Under --on-nan stop, raises Diverged when step `step` was not applied (non-finite)."""
  if setup.run.on_nan != 'stop':
    return
  m = jax.device_get(setup.layout.unreplicate(metrics))
  if m['skipped']:
    newest = f'step {last_saved}' if last_saved else 'none'
    raise Diverged(f'step {step}: the loss is {float(m["loss"])} and the gradient norm '
                   f'{float(m["grad_norm"])}; training stopped without applying it (newest '
                   f'checkpoint: {newest}); lower --learning-rate, or pass --on-nan skip to '
                   'skip such steps')


def _train(setup: Setup, state, start: int, ckpts, log: MetricsLog, stop) -> dict | None:
  run, task, model = setup.run, setup.task, setup.model
  layout = setup.layout
  train_step = make_train_step(model, task, setup.tx, label_smoothing=run.label_smoothing,
                               learning_rate_fn=setup.learning_rate, accumulate=run.accumulate,
                               axis_name=layout.axis_name)
  # Compiled ahead of time: a step that cannot fit in memory is refused before it runs.
  train_step, eval_step = layout.compile_steps(
      train_step, make_eval_step(model, task), setup.shardings,
      abstract_state=setup.abstract_state, batch=task.dummy_batch(run.batch_size), run=run)
  rows = layout.process_rows()
  eval_batches = [{k: v[rows] for k, v in b.items()} for b in task.eval_batches(run.batch_size)]
  batches = data.prefetch(data.batched(task.train_examples(), run.batch_size, rows), start)
  is_main = jax.process_index() == 0
  if _stopped_early(stop, start):
    return None
  if start:
    print(f'resuming from step {start}')
  elif run.init_from:  # where fine-tuning starts: the checkpoint's own held-out figures
    log.write(0, 'eval', **_evaluate_all(setup, eval_step, state, eval_batches, 0)[0])
  bar = progress(start, run.steps, enabled=run.progress and is_main)
  window_start, window, final = time.perf_counter(), None, None
  last_saved, previous = (start or None), None
  for step in range(start, run.steps):
    with layout.context():
      state, metrics = train_step(state, layout.put_batch(next(batches)))
    if previous is not None:  # the step before, which has finished: this one keeps the device busy
      _check_finite(setup, *previous, last_saved)
    done, previous = step + 1, (step + 1, metrics)
    # Summed on the device: no host sync per step.
    counts = {'tokens': metrics['tokens'], 'skipped': metrics['skipped']}
    window = counts if window is None else jax.tree.map(jnp.add, window, counts)
    bar.update(1)
    if done % run.log_every == 0 or done == run.steps:
      _log_window(setup, log, bar, done, metrics, window, time.perf_counter() - window_start)
      window_start, window = time.perf_counter(), None
    stopping = stop.now(done)
    # Save before evaluating: an evaluation that fails or is killed loses no training.
    if stopping or done % run.checkpoint_every == 0 or done == run.steps:
      _check_finite(setup, done, metrics, last_saved)  # a skipped step is never saved (stop)
      previous = None
      ckpts.save(done, layout.unreplicate(state), setup.meta())
      last_saved = done
    if stopping:
      ckpts.wait()  # "saved" means committed: a rerun will find it
      bar.close()
      if is_main:
        print(f'{stopping}: saved a checkpoint at step {done}; rerun the same command to '
              'resume')
      return None
    if done % run.eval_every == 0 or done == run.steps:
      final = _evaluate_all(setup, eval_step, state, eval_batches,
                            run.examples if done == run.steps else 0)
      log.write(done, 'eval', **final[0])
  bar.close()
  if final is None:  # resumed a run that had already finished
    final = _evaluate_all(setup, eval_step, state, eval_batches, run.examples)
  result, lines = final
  _report(setup, layout.unreplicate(state), result, lines, is_main)
  log.close()
  return result


def _log_window(setup: Setup, log: MetricsLog, bar, done: int, metrics, window, seconds: float):
  """One metrics.jsonl line for the steps since the last: the last step's figures, the
  window's tokens/s and its count of skipped (non-finite) steps."""
  m, window = jax.device_get(setup.layout.unreplicate((metrics, window)))
  tps = float(np.max(window['tokens'])) / max(seconds, 1e-9)
  skipped = float(np.max(window['skipped']))
  log.write(done, 'train', loss=m['loss'], accuracy=m['accuracy'], grad_norm=m['grad_norm'],
            learning_rate=m['learning_rate'], tokens_per_second=tps,
            skipped=skipped if setup.run.on_nan == 'skip' else None)
  postfix = dict(loss=f'{float(m["loss"]):.3f}', tok_s=f'{tps:,.0f}')
  if skipped:
    postfix['skipped'] = int(skipped)
  bar.set_postfix(**postfix)


def _evaluate_all(setup: Setup, eval_step, state, eval_batches, n_examples: int):
  """Held-out loss/accuracy (and perplexity), plus the task's decoded metrics and examples."""
  with setup.layout.context():
    result = evaluate(setup, eval_step, state.params, eval_batches)
  # Decoding runs outside the mesh's rules: its batch sizes need not split over the devices.
  extra, lines = {}, []
  if setup.task.decodes_in_eval or n_examples:
    params = setup.layout.unreplicate(state).params
    extra, lines = setup.task.examples(setup.model, params, n_examples)
  return {**result, **extra}, lines


def _report(setup: Setup, state, result: dict, lines: list[str], is_main: bool) -> None:
  """Prints the final figures and examples, draws attention.png (process 0 writes)."""
  run = setup.run
  # Every process takes part in the computation; only the first one writes.
  attention = setup.task.attention_example(setup.model, state.params)
  if not is_main:
    return
  print(f'\nfinal evaluation after {int(state.step)} steps: ' +
        ', '.join(f'{k} {v:.4f}' for k, v in result.items()))
  if lines:
    print('examples (held-out):')
    for line in lines:
      print('  ' + line)
  if attention is not None:
    weights, x_labels, y_labels = attention
    path = viz.plot_attention(weights, x_labels, y_labels,
                              os.path.join(run.workdir, 'attention.png'),
                              title=setup.task.attention_title)
    print(f'attention map: {path}')
