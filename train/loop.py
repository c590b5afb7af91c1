"""The training loop: build or resume the state, train, evaluate, checkpoint, report."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from flaxformer_lite import viz
from train import checkpoint, data, optim, parallel
from train import state as state_lib
from train.config import RunConfig, UsageError
from train.metrics import MetricsLog, progress
from train.step import make_eval_step, make_train_step
from train.tasks import TASKS, Seq2SeqTask


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
    if jax.process_count() == 1:
      return self.signal
    if step % self.every:
      return None
    flags = multihost_utils.process_allgather(np.array(self.signal is not None))
    return (self.signal or 'SIGTERM (on another process)') if flags.any() else None

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-test-{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UsageError(f'--workdir {workdir}: not writable ({e.strerror})') from None


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

  @property
  def model_config(self):
    return self.model.config


def build(run: RunConfig) -> Setup:
  task = TASKS[run.task](name=run.task, seed=run.seed, seq_len=run.seq_len, data_path=run.data,
                         on_bad_bytes=run.on_bad_bytes, tokenizer_name=run.tokenizer,
                         vocab_size=run.vocab_size, workdir=run.workdir)
  task.prepare()
  overrides = {'dtype': jnp.dtype(run.dtype)}
  if run.dropout is not None:
    overrides['dropout_rate'] = run.dropout
  try:
    model = task.model_cls(task.config(run.preset, **overrides))
  except ValueError as e:  # e.g. --dropout outside [0, 1)
    raise UsageError(f'--preset {run.preset} with these options: {e}') from None
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
  shardings = parallel.state_shardings(layout, tx, abstract_state, boxed)
  return Setup(run, task, model, tx, learning_rate, layout, abstract_state, shardings)


def restore_or_create(setup: Setup, ckpts: checkpoint.Checkpoints):
  """The newest checkpoint, restored straight into the layout's shardings, or a new state.

  A checkpoint saved under another mesh (or device count) restores under this one.
  """
  latest = ckpts.latest_step()
  if latest is None:
    create = functools.partial(state_lib.create, setup.model, setup.task, setup.tx,
                               setup.run.seed, setup.task.dummy_batch(setup.run.batch_size))
    with setup.layout.context():
      state = jax.jit(create, out_shardings=setup.shardings)()
  else:
    ckpts.check(latest, setup.run.task, setup.model_config.to_dict(),
                dataclasses.asdict(setup.run))
    state, _ = ckpts.restore(latest, checkpoint.abstract(setup.abstract_state, setup.shardings))
  if setup.layout.kind == 'pmap':
    state = parallel.put_state(state, setup.layout, setup.shardings)
  return state


def evaluate(setup: Setup, eval_step, params, batches) -> dict:
  sums = None
  for batch in batches:
    out = eval_step(params, parallel.put_batch(batch, setup.layout))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  weight = max(float(sums['weight']), 1.0)
  result = {'loss': float(sums['nll']) / weight, 'accuracy': float(sums['correct']) / weight}
  if setup.run.task in ('text', 'mlm'):
    result['perplexity'] = math.exp(min(result['loss'], 50.0))
  return result


def run(run: RunConfig) -> dict:
  """Trains (or resumes) as `run` says; returns the final evaluation (None if stopped by a
  signal, after saving a checkpoint)."""
  check_workdir(run.workdir)
  setup = build(run)
  is_main = jax.process_index() == 0
  ckpts = checkpoint.Checkpoints(os.path.join(run.workdir, 'checkpoints'), run.keep_checkpoints)
  try:
    state = restore_or_create(setup, ckpts)
    start = int(parallel.unreplicate(state, setup.layout).step)
    meta = {'task': run.task, 'run': dataclasses.asdict(run),
            'model_config': setup.model_config.to_dict()}
    if is_main:
      with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
        json.dump(meta, f, indent=2)
    log = MetricsLog(run.workdir, start, enabled=is_main)
    result = _train(setup, state, start, ckpts, log, meta)
  finally:
    ckpts.close()
  return result


def _train(setup: Setup, state, start: int, ckpts, log: MetricsLog, meta: dict) -> dict:
  run, task, model = setup.run, setup.task, setup.model
  layout = setup.layout
  train_step = make_train_step(model, task, setup.tx, label_smoothing=run.label_smoothing,
                               learning_rate_fn=setup.learning_rate, accumulate=run.accumulate,
                               axis_name='data' if layout.kind == 'pmap' else None)
  train_step, eval_step = parallel.compile_steps(train_step, make_eval_step(model, task),
                                                 layout, setup.shardings)
  rows = layout.process_rows()
  eval_batches = [{k: v[rows] for k, v in b.items()} for b in task.eval_batches(run.batch_size)]
  batches = data.prefetch(data.batched(task.train_examples(), run.batch_size, rows), start)
  is_main = jax.process_index() == 0
  if start:
    print(f'resuming from step {start}')
  bar = progress(start, run.steps, enabled=run.progress and is_main)
  window_start, window_tokens, final = time.perf_counter(), 0.0, None
  with StopRequested(every=run.log_every) as stop:
    for step in range(start, run.steps):
      with layout.context():
        state, metrics = train_step(state, parallel.put_batch(next(batches), layout))
      window_tokens = window_tokens + metrics['tokens']  # stays on device: no sync per step
      done = step + 1
      bar.update(1)
      if done % run.log_every == 0 or done == run.steps:
        m = jax.device_get(parallel.unreplicate(metrics, layout))  # one host sync per window
        tps = float(np.max(window_tokens)) / max(time.perf_counter() - window_start, 1e-9)
        log.write(done, 'train', loss=m['loss'], accuracy=m['accuracy'],
                  grad_norm=m['grad_norm'], learning_rate=m['learning_rate'],
                  tokens_per_second=tps)
        bar.set_postfix(loss=f'{float(m["loss"]):.3f}', tok_s=f'{tps:,.0f}')
        window_start, window_tokens = time.perf_counter(), 0.0
      stopping = stop.now(done)
      # Save before evaluating: an evaluation that fails or is killed loses no training.
      if stopping or done % run.checkpoint_every == 0 or done == run.steps:
        ckpts.save(done, parallel.unreplicate(state, layout), meta)
      if stopping:
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
  _report(setup, parallel.unreplicate(state, layout), result, lines, is_main)
  log.close()
  return result


def _evaluate_all(setup: Setup, eval_step, state, eval_batches, n_examples: int):
  """Held-out loss/accuracy (and perplexity), plus the task's decoded metrics and examples."""
  with setup.layout.context():
    result = evaluate(setup, eval_step, state.params, eval_batches)
  # Decoding runs outside the mesh's rules: its batch sizes need not split over the devices.
  extra, lines = {}, []
  if isinstance(setup.task, Seq2SeqTask) or n_examples:
    params = parallel.unreplicate(state, setup.layout).params
    extra, lines = setup.task.examples(setup.model, params, n_examples)
  return {**result, **extra}, lines


def _report(setup: Setup, state, result: dict, lines: list[str], is_main: bool) -> None:
  """Prints the final figures and examples, draws attention.png (process 0 writes)."""
  run = setup.run
  if isinstance(setup.task, Seq2SeqTask):
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
  if isinstance(setup.task, Seq2SeqTask):
    weights, x_labels, y_labels = attention
    path = viz.plot_attention(weights, x_labels, y_labels,
                              os.path.join(run.workdir, 'attention.png'),
                              title='cross-attention, last decoder layer (mean over heads)')
    print(f'attention map: {path}')
