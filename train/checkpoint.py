"""Orbax checkpoints: state + metadata (config, data position) in one step directory."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from train.config import UsageError


class CheckpointMismatch(UsageError):
  """The workdir's checkpoint was made for another model or task."""


# Fields that change numerics or memory use but not the parameters: a resume may change them.
RUNTIME_FIELDS = {'dtype', 'attention_impl', 'remat', 'dropout_rate', 'attention_dropout_rate'}
# Run options that decide which batches, updates and random numbers follow: an exact resume
# needs them unchanged. (--steps may grow; the cosine schedule's horizon grows with it.)
RUN_FIELDS = ('seed', 'batch_size', 'seq_len', 'data', 'learning_rate', 'schedule', 'warmup',
              'weight_decay', 'clip_norm', 'label_smoothing', 'accumulate', 'tokenizer',
              'vocab_size')


class Checkpoints:
  """Keeps the newest `keep` checkpoints under `directory`, saving asynchronously."""

  def __init__(self, directory: str, keep: int = 3):
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

  def check(self, step: int, task: str, model_config: dict, run: dict) -> dict:
    """Raises CheckpointMismatch unless the checkpoint at `step` fits the requested run."""
    meta = self.meta(step)
    if meta['task'] != task:
      raise CheckpointMismatch(f'the checkpoint at step {step} is for --task {meta["task"]}, not '
                               f'{task}; use another --workdir')
    saved = meta['model_config']
    diff = sorted(k for k in set(saved) | set(model_config)
                  if k not in RUNTIME_FIELDS and saved.get(k) != model_config.get(k))
    if diff:
      details = ', '.join(f'{k}: saved {saved.get(k)!r} vs requested {model_config.get(k)!r}'
                          for k in diff)
      raise CheckpointMismatch(f'the checkpoint at step {step} has another model ({details}); '
                               'use another --workdir or the same options')
    changed = [k for k in RUN_FIELDS if meta['run'].get(k) != run.get(k)]
    if changed:
      details = ', '.join(f'--{k.replace("_", "-")} saved {meta["run"].get(k)!r} vs requested '
                          f'{run.get(k)!r}' for k in changed)
      raise CheckpointMismatch(f'the checkpoint at step {step} was trained with other options '
                               f'({details}); resuming would not continue the same run')
    return meta

  def restore(self, step: int, abstract_state):
    """`abstract_state`: ShapeDtypeStructs with shardings, so arrays land where the step wants."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def save(self, step: int, state, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def close(self) -> None:
    self.manager.wait_until_finished()
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
