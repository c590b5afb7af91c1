"""A run owns its workdir: a marker file says the folder is a training run's, a lock says which
process is writing it, and files are replaced atomically so a kill never leaves half of one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from train.config import UsageError

MARKER = 'flaxformer_lite_run.json'
LOCK = '.lock'
# What a run writes; a folder holding only these (and no marker) is a run from before markers.
OURS = {MARKER, LOCK, 'checkpoints', 'config.json', 'metrics.jsonl', 'tensorboard',
        'attention.png', 'tokenizer.model', 'tokenizer.vocab', 'tokenizer.json', 'pretrained'}


class WorkdirError(UsageError):
  """The workdir cannot be used: not ours, in use, or not writable."""


def write_atomic(path: str, text: str) -> None:
  """Replaces `path` with `text` whole: a reader (or a kill) sees the old file or the new one."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: str, value) -> None:
  write_atomic(path, json.dumps(value, indent=2) + '\n')


def _ours_from_before_markers(workdir: str, entries: list[str]) -> bool:
  """A workdir of a run from before markers: only our names, and a config.json of ours."""
  if not set(entries) <= OURS or 'config.json' not in entries:
    return False
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(config, dict) and {'task', 'run', 'model_config'} <= set(config)


def check_owner(workdir: str) -> None:
  """Raises WorkdirError unless `workdir` is missing, empty or a training run's (nothing is
  written here: a refused folder is left as it was)."""
  if not os.path.exists(workdir):
    return
  if not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir {workdir}: not a folder')
  entries = sorted(os.listdir(workdir))
  if MARKER in entries or not [e for e in entries if e != LOCK]:
    return
  if _ours_from_before_markers(workdir, entries):
    return
  foreign = [e for e in entries if e not in OURS] or entries
  shown = ', '.join(foreign[:3]) + (', ...' if len(foreign) > 3 else '')
  raise WorkdirError(f'--workdir {workdir} holds files that are not a training run\'s ({shown}); '
                     'use a new or empty folder')


class _Lock:
  """An exclusive `flock` on WORKDIR/.lock: the OS drops it when the process ends, even by
  SIGKILL, so a stale lock never blocks a rerun."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(self.fd, 64, 0).decode(errors='replace').strip() or '?'
      os.close(self.fd)
      raise WorkdirError(f'--workdir {os.path.dirname(self.path)} is in use by another run '
                         f'(pid {holder}); wait for it to end or use another --workdir') from None
    os.ftruncate(self.fd, 0)
    os.pwrite(self.fd, str(os.getpid()).encode(), 0)

  def release(self) -> None:
    fcntl.flock(self.fd, fcntl.LOCK_UN)
    os.close(self.fd)


def _claim(workdir: str) -> _Lock:
  check_owner(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    lock = _Lock(workdir)
  except OSError as e:
    raise WorkdirError(f'--workdir {workdir}: not writable ({e.strerror})') from None
  marker = os.path.join(workdir, MARKER)
  if not os.path.exists(marker):
    write_json(marker, {'what': 'a flaxformer_lite training run (python -m train)'})
  return lock


@contextlib.contextmanager
def claimed(workdir: str):
  """Holds `workdir` for this run. Process 0 checks and locks it (the folder may be shared by
  every host); the others learn its verdict, so no process goes on alone into a collective."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = _claim(workdir)
    except WorkdirError as e:
      error = e
  if jax.process_count() > 1:
    refused = multihost_utils.broadcast_one_to_all(np.array(error is not None))
    if refused and error is None:
      error = WorkdirError(f'--workdir {workdir}: refused by process 0 (see its error)')
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
