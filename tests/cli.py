"""Helpers shared by the tests of the training programs (`python -m train`, `train.generate`):
subprocess runs, workdir inspection, the one-error-line check and small data files."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 420  # seconds for any one run: generous, the machine is shared

# Options shared by every training run: tiny model, dropout on (so a resume must also reproduce the
# dropout RNG), no progress bar.
BASE = ['--preset', 'tiny', '--batch-size', '8', '--dropout', '0.1', '--examples', '2',
        '--no-progress']


# ------------------------------------------------------------------------------------------------
# helpers

def _env(**extra) -> dict:
  env = dict(os.environ)
  env['PYTHONPATH'] = str(ROOT)
  env['JAX_PLATFORMS'] = 'cpu'  # the device-count case below fakes CPU devices
  env.pop('XLA_FLAGS', None)
  env.update(extra)
  return env


def _cmd(args) -> list[str]:
  return [sys.executable, '-m', 'train', *map(str, args)]


def train(args, env=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
  """Runs `python -m train ARGS` to completion; stdout/stderr captured as text."""
  return subprocess.run(_cmd(args), cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                        timeout=timeout)


class Background:
  """`python -m train ARGS` started in the background, output going to files (no pipe stalls)."""

  def __init__(self, args, logdir: pathlib.Path, name: str, env=None):
    logdir.mkdir(parents=True, exist_ok=True)
    self.out_path, self.err_path = logdir / f'{name}.out', logdir / f'{name}.err'
    self._out, self._err = open(self.out_path, 'w'), open(self.err_path, 'w')
    self.proc = subprocess.Popen(_cmd(args), cwd=ROOT, env=env or _env(), stdout=self._out,
                                 stderr=self._err, text=True)

  def wait(self, timeout=TIMEOUT) -> int:
    try:
      rc = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise
    finally:
      self._out.close()
      self._err.close()
    return rc

  def wait_for(self, predicate, timeout=TIMEOUT, interval=0.005) -> bool:
    """Polls `predicate()` until true (-> True) or the process exits first (-> False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if predicate():
        return True
      if self.proc.poll() is not None:
        return bool(predicate())
      time.sleep(interval)
    self.proc.kill()
    raise TimeoutError(f'condition not met within {timeout}s')

  def signal(self, sig) -> None:
    self.proc.send_signal(sig)

  @property
  def stdout(self) -> str:
    return self.out_path.read_text()

  @property
  def stderr(self) -> str:
    return self.err_path.read_text()


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  """metrics.jsonl as records; a torn last line (process killed mid-write) is skipped."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return records


def max_logged_step(workdir: pathlib.Path, split='train') -> int:
  return max((r['step'] for r in read_metrics(workdir) if r.get('split') == split), default=-1)


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  """Finalized checkpoint steps (folders named by a bare integer)."""
  ckdir = workdir / 'checkpoints'
  if not ckdir.is_dir():
    return []
  return sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())


def snapshot(directory: pathlib.Path) -> dict:
  """Every file and folder under `directory`: (kind, size, mtime_ns, sha1 of the contents).

  The run's lock file is left out: each run that takes the lock writes its pid there."""
  out = {}
  for path in sorted(directory.rglob('*')):
    rel = str(path.relative_to(directory))
    if rel == '.lock':
      continue
    if path.is_dir():
      out[rel] = ('dir',)
    else:
      st = path.stat()
      out[rel] = ('file', st.st_size, st.st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest())
  return out


def restore_state(workdir: pathlib.Path, step: int):
  """The saved TrainState at `step` as a pytree of numpy arrays (restored with orbax)."""
  import orbax.checkpoint as ocp
  ckptr = ocp.StandardCheckpointer()
  try:
    return ckptr.restore((workdir / 'checkpoints' / str(step) / 'state').absolute())
  finally:
    ckptr.close()


def assert_one_error_line(result, *fragments) -> str:
  """Non-zero exit, no traceback, stderr is exactly one line 'error: ...' containing fragments."""
  stderr = result.stderr
  assert result.returncode != 0, f'exit 0 for bad input\nstdout:\n{result.stdout}'
  assert 'Traceback' not in stderr and 'Traceback' not in result.stdout, stderr
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1, f'expected one line on stderr, got {len(lines)}:\n{stderr}'
  assert lines[0].startswith('error:'), stderr
  for fragment in fragments:
    assert str(fragment) in lines[0], f'{fragment!r} not in {lines[0]!r}'
  return lines[0]


def without_wallclock(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k != 'tokens_per_second'} for r in records]


# ------------------------------------------------------------------------------------------------
# data files

_ENGLISH = [
    'The quick brown fox jumps over the lazy dog near the quiet river bank.',
    'A journey of a thousand miles begins with a single step, or so the proverb says.',
    'Transformers process sequences with attention, weighing every token against the others.',
    'She sells sea shells by the sea shore; the shells she sells are surely sea shells.',
    'In the beginning the universe was created. This has made a lot of people very angry.',
    'It was the best of times, it was the worst of times, it was the age of wisdom.',
    'Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.',
    'All happy families are alike; each unhappy family is unhappy in its own way.',
    'The rain in Spain stays mainly in the plain, said the professor to his student.',
    'To be, or not to be, that is the question: whether tis nobler in the mind to suffer.',
    'Gradient descent walks downhill one small step at a time until the loss stops falling.',
    'Checkpoints let a long job survive a power cut, a preemption or an impatient user.',
]

_PYTHON = [
    'def add(a, b):\n    """Returns the sum of a and b."""\n    return a + b',
    'class Stack:\n    def __init__(self):\n        self.items = []\n\n'
    '    def push(self, item):\n        self.items.append(item)',
    'for i in range(10):\n    if i % 2 == 0:\n        print(i, "is even")\n    else:\n'
    '        print(i, "is odd")',
    'import json\nwith open("config.json") as f:\n    config = json.load(f)\nprint(config["seed"])',
    'def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a',
    'try:\n    value = int(text)\nexcept ValueError:\n    value = None\nfinally:\n    done = True',
]


def corpus_text() -> str:
  """A few KB of English and Python, paragraphs separated by blank lines (~24 documents)."""
  paragraphs = []
  for i, sentence in enumerate(_ENGLISH):
    paragraphs.append(f'{sentence} {" ".join(reversed(sentence.split()))}')
    paragraphs.append(_PYTHON[i % len(_PYTHON)].replace('\n\n', '\n'))
  return '\n\n'.join(paragraphs) + '\n'


def tsv_text(n=200) -> str:
  """`n` lines 'word sequence<TAB>the same words reversed'."""
  words = ['red', 'blue', 'cat', 'dog', 'sun', 'moon', 'tree', 'fish', 'bird', 'star', 'sea',
           'hill', 'rock', 'leaf', 'rain', 'snow']
  rng = np.random.default_rng(0)
  lines = []
  for _ in range(n):
    seq = [words[j] for j in rng.integers(len(words), size=rng.integers(2, 5))]
    lines.append(f'{" ".join(seq)}\t{" ".join(reversed(seq))}')
  return '\n'.join(lines) + '\n'
