"""The optimizer: AdamW with a decay mask, warmup schedules, clipping, gradient accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _rsqrt(peak: float, warmup: int, total: int) -> optax.Schedule:
  """The paper's: linear warmup, then peak * sqrt(warmup / step) (d_model^-0.5 folded into the
  peak)."""
  def rsqrt(step):
    step = jnp.maximum(step, 1).astype(jnp.float32)
    return peak * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))
  return rsqrt


def _cosine(peak: float, warmup: int, total: int) -> optax.Schedule:
  """Linear warmup, then cosine decay to 10% of the peak."""
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1),
                                            end_value=0.1 * peak)


def _constant(peak: float, warmup: int, total: int) -> optax.Schedule:
  return optax.constant_schedule(peak)


# --schedule's choices (RunConfig validates the name against these keys).
SCHEDULES = {'rsqrt': _rsqrt, 'cosine': _cosine, 'constant': _constant}


def schedule(name: str, peak: float, warmup: int, total: int) -> optax.Schedule:
  """The learning rate at each optimizer update: one of SCHEDULES by name."""
  return SCHEDULES[name](peak, max(1, warmup), total)


def decay_mask(params):
  """Weight decay on matrices only: no decay on norms, biases or embeddings."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def make_optimizer(*, learning_rate: optax.Schedule, weight_decay: float, clip_norm: float,
                   accumulate: int, b2: float = 0.98) -> optax.GradientTransformation:
  """Adam's b2=0.98 is the paper's; `accumulate` > 1 sums that many micro-steps per update."""
  tx = optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(learning_rate, b1=0.9, b2=b2, eps=1e-9, weight_decay=weight_decay,
                  mask=decay_mask))
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
  return tx
