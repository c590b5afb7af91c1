"""metrics.jsonl, TensorBoard events and the progress bar."""

from __future__ import annotations

import json
import math
import os

import tqdm

from train.workdir import write_atomic


def _step_of(line: str) -> int | None:
  """The step of one of our records, or None for anything else (the torn last line of a run
  killed while appending it, a line that is not ours)."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return None
  step = record.get('step') if isinstance(record, dict) else None
  return step if isinstance(step, int) and not isinstance(step, bool) else None


class MetricsLog:
  """One JSON object a line in `metrics.jsonl`, mirrored to TensorBoard (tensorboardX).

  On resume from step s, lines logged after s by the interrupted run are dropped, so the file
  reads as if the run had never stopped.
  """

  def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.writer = None
    if not enabled:
      return
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          step = _step_of(line)
          # A run starting at step 0 starts the file afresh (its step-0 evaluation, which
          # --init-from runs log, is written again).
          if step is not None and step <= resume_step and resume_step > 0:
            kept.append(line.rstrip('\n') + '\n')
    # The kept lines replace the file whole: a kill here leaves the old file or the new one.
    write_atomic(self.path, ''.join(kept))
    from tensorboardX import SummaryWriter
    self.writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, **values) -> dict:
    record = {'step': int(step), 'split': split}
    record.update({k: float(v) for k, v in values.items() if v is not None})
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
      for k, v in record.items():
        # A NaN is written to metrics.jsonl as it is; TensorBoard would only warn about it.
        if k not in ('step', 'split') and math.isfinite(v):
          self.writer.add_scalar(f'{split}/{k}', v, step)
    return record

  def close(self):
    if self.writer is not None:
      self.writer.close()


def progress(start: int, total: int, enabled: bool = True) -> tqdm.tqdm:
  return tqdm.tqdm(initial=start, total=total, disable=not enabled, dynamic_ncols=True,
                   unit='step', mininterval=1.0)
