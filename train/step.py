"""The jit-compiled train and eval steps: pure functions of (state, batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train.state import TrainState


def cross_entropy(logits, targets, weights, label_smoothing=0.0):
  """Weighted sums: (smoothed loss, nll, correct, weight). Computed in float32."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if label_smoothing > 0:
    soft = optax.smooth_labels(jax.nn.one_hot(targets, vocab), label_smoothing)
    loss = optax.softmax_cross_entropy(logits, soft)
  else:
    loss = nll
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return ((loss * weights).sum(), (nll * weights).sum(), (correct * weights).sum(),
          weights.sum())


def make_train_step(model, task, tx, *, label_smoothing: float, learning_rate_fn, accumulate=1,
                    axis_name=None):
  """(state, batch) -> (state, metrics). `axis_name`: the pmap axis to reduce over.

  The loss is normalized by the number of target tokens in the whole global batch, so one
  device, a mesh and pmap all take the same step.
  """
  def loss_fn(params, batch, rng):
    logits, targets, weights = task.forward(model, params, batch, deterministic=False,
                                            rngs={'dropout': rng})
    loss, nll, correct, total = cross_entropy(logits, targets, weights, label_smoothing)
    return loss, {'loss': loss, 'nll': nll, 'correct': correct, 'weight': total}

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    grads, sums = jax.grad(loss_fn, has_aux=True)(state.params, batch, rng)
    if axis_name is not None:
      grads, sums = jax.lax.psum((grads, sums), axis_name)
    total = jnp.maximum(sums['weight'], 1.0)
    grads = jax.tree.map(lambda g: g / total, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A step whose loss or gradient norm is not finite is never applied: parameters and optimizer
    # state stay the last good ones, and the loop (--on-nan) stops there or goes on. (optax's
    # apply_if_finite looks at the updates only and lets them through after a run of failures.)
    finite = jnp.isfinite(sums['loss']) & jnp.isfinite(sums['nll']) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    # `loss` is the cross-entropy, comparable with eval's; label smoothing only shapes the
    # gradient. `tokens` counts the real (not padding) tokens the model read, for tokens/s.
    tokens = sum((batch[k].sum(dtype=jnp.int32) for k in ('valid', 'src_valid', 'tgt_valid')
                  if k in batch), jnp.zeros((), jnp.int32))
    if axis_name is not None:
      tokens = jax.lax.psum(tokens, axis_name)
    metrics = {'loss': sums['nll'] / total, 'accuracy': sums['correct'] / total,
               'tokens': tokens.astype(jnp.float32), 'grad_norm': grad_norm,
               'skipped': 1.0 - finite.astype(jnp.float32),
               'learning_rate': learning_rate_fn(state.step // accumulate)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model, task):
  def eval_step(params, batch):
    logits, targets, weights = task.forward(model, params, batch)
    _, nll, correct, total = cross_entropy(logits, targets, weights)
    return {'nll': nll, 'correct': correct, 'weight': total}
  return eval_step
