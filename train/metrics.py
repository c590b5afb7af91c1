"""metrics.jsonl, TensorBoard events and the progress bar."""

from __future__ import annotations

import json
import os

import tqdm


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
          try:
            record = json.loads(line)
          except json.JSONDecodeError:  # the last line of a run killed while appending it
            continue
          if record['step'] <= resume_step:
            kept.append(line)
    with open(self.path, 'w') as f:
      f.writelines(kept)
    from tensorboardX import SummaryWriter
    self.writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, **values) -> dict:
    record = {'step': int(step), 'split': split}
    record.update({k: float(v) for k, v in values.items() if v is not None})
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
      for k, v in record.items():
        if k not in ('step', 'split'):
          self.writer.add_scalar(f'{split}/{k}', v, step)
    return record

  def close(self):
    if self.writer is not None:
      self.writer.close()


def progress(start: int, total: int, enabled: bool = True) -> tqdm.tqdm:
  return tqdm.tqdm(initial=start, total=total, disable=not enabled, dynamic_ncols=True,
                   unit='step', mininterval=1.0)
