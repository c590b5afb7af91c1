"""Orbax checkpoints: state + metadata (config, data position) in one step directory.

A step that no longer restores (a truncated or deleted file, unreadable metadata) is moved aside
to `checkpoints/N.damaged`, never deleted, and the run resumes from the newest step that
restores. A save that finds no room is one error line; the checkpoints already written stay.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from train.config import UsageError


class CheckpointMismatch(UsageError):
  """The workdir's checkpoint was made for another model, task or data."""


class CheckpointError(UsageError):
  """No checkpoint restores, or one cannot be written (a full disk, an I/O error)."""


def short_reason(e: BaseException) -> str:
  """`Type: first line` of an exception, short enough for a one-line message."""
  lines = str(e).strip().splitlines()
  text = lines[0].split(' See full TensorStore details')[0] if lines else ''
  text = text if len(text) <= 160 else text[:157] + '...'
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def ignore_abandoned_reads() -> None:
  """After a failed restore, TensorStore finishes the reads orbax abandoned and hands each result
  to orbax's event loop, already closed ('Event loop is closed'), or leaves the other reads'
  errors unretrieved; each goes to sys.unraisablehook at any moment until exit, as a traceback.
  The failure itself is reported already, so these echoes of it are dropped."""
  default = sys.unraisablehook
  if getattr(default, 'ignores_abandoned_reads', False):
    return

  def hook(unraisable):
    text = str(unraisable.exc_value)
    if not (text == 'Event loop is closed'
            or text.startswith('Encountered error while reading array index')):
      default(unraisable)

  hook.ignores_abandoned_reads = True
  sys.unraisablehook = hook
  # The same echoes reach asyncio's logger instead when a future holding one is collected
  # ('Future exception was never retrieved').
  logging.getLogger('asyncio').addFilter(_AbandonedReadLog())


class _AbandonedReadLog(logging.Filter):
  """Drops asyncio's 'exception was never retrieved' records of abandoned checkpoint reads."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    text = f'{record.getMessage()} {exc}'
    return not ('never retrieved' in text and ('Encountered error while reading array index'
                                               in text or 'OUT_OF_RANGE: Error reading' in text))


def _all_agree(ok: bool) -> bool:
  """True when every process succeeded (a damaged shard may fail on one host only)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.array(ok)).all())


def _no_space(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if 'No space left on device' in str(e):  # orbax and TensorStore re-raise it as text
      return True
    e = e.__cause__ or e.__context__
  return False


# Fields that change numerics or memory use but not the parameters: a resume may change them.
RUNTIME_FIELDS = {'dtype', 'attention_impl', 'remat', 'dropout_rate', 'attention_dropout_rate'}
# Run options that decide which batches, updates and random numbers follow: an exact resume
# needs them unchanged. (--steps may grow; the cosine schedule's horizon grows with it.)
RUN_FIELDS = ('seed', 'batch_size', 'seq_len', 'data', 'learning_rate', 'schedule', 'warmup',
              'weight_decay', 'clip_norm', 'label_smoothing', 'accumulate', 'tokenizer',
              'vocab_size')


def _start(init_from: str | None) -> str:
  return f'--init-from {init_from}' if init_from else 'a new model (no --init-from)'


def check(step: int, saved: dict, requested: dict) -> None:
  """Raises CheckpointMismatch unless the checkpoint at `step` (its metadata `saved`) continues
  the `requested` run: same task, model, data and the options that decide the updates."""
  task = requested['task']
  if saved['task'] != task:
    raise CheckpointMismatch(f'the checkpoint at step {step} is for --task {saved["task"]}, not '
                             f'{task}; use another --workdir')
  old, new = saved['run'].get('init_from'), requested['run'].get('init_from')
  if old != new:  # said before the model differences it implies
    raise CheckpointMismatch(f'the checkpoint at step {step} started from {_start(old)}, not '
                             f'{_start(new)}; use another --workdir or the same --init-from')
  old, new = saved['model_config'], requested['model_config']
  diff = sorted(k for k in set(old) | set(new)
                if k not in RUNTIME_FIELDS and old.get(k) != new.get(k))
  if diff:
    details = ', '.join(f'{k}: saved {old.get(k)!r} vs requested {new.get(k)!r}' for k in diff)
    raise CheckpointMismatch(f'the checkpoint at step {step} has another model ({details}); '
                             'use another --workdir or the same options')
  old, new = saved['run'], requested['run']
  changed = [k for k in RUN_FIELDS if old.get(k) != new.get(k)]
  if changed:
    details = ', '.join(f'--{k.replace("_", "-")} saved {old.get(k)!r} vs requested '
                        f'{new.get(k)!r}' for k in changed)
    raise CheckpointMismatch(f'the checkpoint at step {step} was trained with other options '
                             f'({details}); resuming would not continue the same run')
  # Checkpoints from before data fingerprints have none: nothing to compare.
  if saved.get('data') and saved['data'] != requested.get('data'):
    raise CheckpointMismatch(f'--data {new["data"]} has changed since the checkpoint at step '
                             f'{step} ({saved["data"]} then, {requested.get("data")} now); '
                             'resuming would train on other data: restore it or use another '
                             '--workdir')


def _is_meta(meta) -> bool:
  return isinstance(meta, dict) and {'task', 'run', 'model_config'} <= set(meta) and all(
      isinstance(meta[k], dict) for k in ('run', 'model_config'))


class _OrbaxErrorLogs(logging.Filter):
  """orbax's save threads log each failure with its traceback (dozens for one full disk), then
  raise it again from save() or wait_until_finished(), where `Checkpoints` reports it once: as
  one line for a full disk or an I/O error, or as the exception itself for anything else."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname)


class Checkpoints:
  """Keeps the newest `keep` checkpoints under `directory`, saving asynchronously."""

  def __init__(self, directory: str, keep: int = 3):
    absl_logs = logging.getLogger('absl')
    if not any(isinstance(f, _OrbaxErrorLogs) for f in absl_logs.filters):
      absl_logs.addFilter(_OrbaxErrorLogs())
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.LatestN(keep),
            cleanup_tmp_directories=True,  # leftovers of a save killed half-way
            enable_async_checkpointing=True),
        item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, abstract_state):
    """`abstract_state`: ShapeDtypeStructs with shardings, so arrays land where the step wants."""
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))['state']

  def restore_newest(self, abstract_state, requested: dict) -> tuple[int, object] | None:
    """(step, state) of the newest checkpoint that restores; None when there is none.

    A readable checkpoint of another run (`check` against the `requested` metadata) is refused,
    not skipped. Newer steps that fail to read are moved aside (one warning line
    each) only once an older one restores: when none does, nothing is moved.
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta, error = self.meta(step), None
        if not _is_meta(meta):
          error = ValueError('its metadata is not a training checkpoint\'s')
      except Exception as e:  # noqa: BLE001 -- any failure to read marks the step damaged
        meta, error = None, e
      if _all_agree(error is None):
        check(step, meta, requested)
        try:
          state = self.restore(step, abstract_state)
        except Exception as e:  # noqa: BLE001
          state, error = None, e
          ignore_abandoned_reads()
      if _all_agree(error is None):
        for bad, reason in failed:
          self._move_aside(bad, reason, step)
        return step, state
      failed.append((step, error or RuntimeError('failed on another process')))
    if failed:
      reasons = '; '.join(f'step {s}: {short_reason(e)}' for s, e in failed)
      raise CheckpointError(f'no checkpoint in {self.directory} restores ({reasons}); nothing '
                            'was moved or deleted')
    return None

  def _move_aside(self, step: int, error: BaseException, resume_step: int) -> None:
    path = os.path.join(self.directory, str(step))
    target = path + '.damaged'
    if jax.process_index() == 0:
      n = 1
      while os.path.exists(target):  # a step damaged twice keeps both copies
        target, n = f'{path}.damaged-{n}', n + 1
      os.rename(path, target)
      print(f'warning: the checkpoint at step {step} does not restore ({short_reason(error)}); '
            f'moved it to {target} and resuming from step {resume_step}', file=sys.stderr)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'moved aside {step}')
    self.manager.reload()

  def save(self, step: int, state, meta: dict) -> None:
    """Starts writing `state` at `step` (asynchronously); raises CheckpointError at once when
    the disk has no room for it, so the checkpoints already there stay whole."""
    needed = sum(x.nbytes for x in jax.tree.leaves(state)) + (1 << 20)
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      raise self._space_error(step, needed, free)
    with self._io_errors(step):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    """Returns once every started save has committed."""
    with self._io_errors(None):
      self.manager.wait_until_finished()

  def _space_error(self, step: int | None, needed: int | None, free: int) -> CheckpointError:
    at = f' at step {step}' if step is not None else ''
    need = f'it needs about {needed / 2**20:,.2f} MiB and ' if needed else ''
    return CheckpointError(f'no room for the checkpoint{at} in {self.directory}: {need}'
                           f'{free / 2**20:,.2f} MiB are free; free some space (or lower '
                           '--keep-checkpoints) and rerun to resume')

  @contextlib.contextmanager
  def _io_errors(self, step: int | None):
    """Turns a failed write (raised now, or by an earlier asynchronous save) into one line."""
    try:
      yield
    except UsageError:
      raise
    except Exception as e:
      if _no_space(e):
        raise self._space_error(step, None, shutil.disk_usage(self.directory).free) from None
      if isinstance(e, OSError):
        raise CheckpointError(f'cannot write a checkpoint in {self.directory}: '
                              f'{short_reason(e)}') from None
      raise

  def close(self) -> None:
    self.wait()
    # orbax 0.12 removes leftover tmp folders in a thread started by the constructor, and
    # neither wait_until_finished() nor close() waits for it: a run that stops early would exit
    # under it (a traceback at interpreter shutdown). No public API waits for it.
    await_cleanup = getattr(self.manager, '_maybe_await_cleanup_tmp_directory', None)
    if await_cleanup is not None:
      await_cleanup()
    self.manager.close()


def abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
