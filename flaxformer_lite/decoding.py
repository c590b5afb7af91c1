"""Autoregressive generation over the key/value cache: pure functions, one jit-compiled loop.

`generate` works for `GPT` (continue a prompt) and `Transformer` (decode a source, the target
starting with `bos_id`). The loop state is a pytree (cache, last token, output, done flags, rng)
carried through `lax.while_loop`, which stops early once every row has emitted `eos_id`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite.models import GPT, Transformer, check_tokens


def sample_logits(logits, rng, *, temperature=0.0, top_k=None, top_p=None):
  """Draws one token per row of `logits [B, V]` -> `[B]` int32.

  temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted to the
  `top_k` most likely tokens and/or the smallest set whose probability reaches `top_p` (nucleus).
  `temperature` and `top_p` may be traced; `top_k` is static.
  """
  if isinstance(temperature, (int, float)) and temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass strictly before it is below top_p: the first always stays.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits).astype(jnp.int32)


def _zeros_cache(model, *args, method=None):
  """An all-zero cache sized by `args`, built from shapes only (no parameter init is run)."""
  shapes = jax.eval_shape(
      functools.partial(model.init, decode=True, method=method), jax.random.key(0), *args)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])


def _init_decoder(model, src, tgt, decode):
  return model.decode(model.encode(src), src, tgt, decode=decode)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'greedy', 'top_k'))
def _generate(model, params, inputs, rng, temperature, top_p, *, max_new_tokens, greedy, top_k):
  cfg = model.config
  batch = inputs.shape[0]
  if isinstance(model, Transformer):
    encoded = model.apply({'params': params}, inputs, method='encode')
    prompt = jnp.full((batch, 1), cfg.bos_id, jnp.int32)
    cache = _zeros_cache(model, inputs, jnp.zeros((batch, max_new_tokens), jnp.int32),
                         method=_init_decoder)

    def step(cache, tokens):
      logits, mutated = model.apply({'params': params, 'cache': cache}, encoded, inputs, tokens,
                                    decode=True, mutable=['cache'], method='decode')
      return logits, mutated['cache']
  else:
    # Move padding to the right so every prompt starts at position 0 and ends at its length.
    order = jnp.argsort(inputs == cfg.pad_id, axis=1, stable=True)
    prompt = jnp.take_along_axis(inputs, order, axis=1)
    cache = _zeros_cache(model, jnp.zeros((batch, prompt.shape[1] + max_new_tokens - 1),
                                          jnp.int32))

    def step(cache, tokens):
      logits, mutated = model.apply({'params': params, 'cache': cache}, tokens, decode=True,
                                    mutable=['cache'])
      return logits, mutated['cache']

  def draw(logits, rng):
    # pad_id marks finished rows in the output, so it is never sampled.
    logits = logits.at[:, cfg.pad_id].set(-jnp.inf)
    if greedy:
      return sample_logits(logits, rng)
    return sample_logits(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)

  logits, cache = step(cache, prompt)
  last = (prompt != cfg.pad_id).sum(axis=1) - 1
  rng, first_rng = jax.random.split(rng)
  token = draw(logits[jnp.arange(batch), last], first_rng)
  out = jnp.full((batch, max_new_tokens), cfg.pad_id, jnp.int32).at[:, 0].set(token)
  done = token == cfg.eos_id

  def cond(state):
    i, _, _, _, done, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, cache, token, out, done, rng = state
    rng, step_rng = jax.random.split(rng)
    # Finished rows feed pad_id, which does not advance their cache position.
    logits, cache = step(cache, token[:, None])
    token = jnp.where(done, cfg.pad_id, draw(logits[:, 0], step_rng))
    out = out.at[:, i].set(token)
    return i + 1, cache, token, out, done | (token == cfg.eos_id), rng

  state = (jnp.int32(1), cache, token, out, done, rng)
  return jax.lax.while_loop(cond, body, state)[3]


def generate(model, variables, inputs, *, max_new_tokens, temperature=0.0, top_k=None,
             top_p=None, rng=None):
  """Generates up to `max_new_tokens` tokens per row, in one compiled loop.

  Args:
    model: a `GPT` or a `Transformer`.
    variables: its variables (`{'params': ...}`).
    inputs: `[B, L]` int. For GPT the prompts (`pad_id` marks padding; prompts may differ in
      length); for Transformer the source tokens.
    max_new_tokens: how many tokens to produce.
    temperature: 0.0 is greedy; > 0 samples from softmax(logits / temperature).
    top_k, top_p: restrict sampling to the k most likely tokens / the nucleus of mass top_p.
    rng: a `jax.random.key`, required when sampling.
  Returns:
    `[B, max_new_tokens]` int32, the new tokens only; after a row emits `eos_id` the rest of the
    row is `pad_id`.
  """
  if not isinstance(model, (GPT, Transformer)):
    raise ValueError(f'generate needs a GPT or a Transformer, got {type(model).__name__}')
  cfg = model.config
  inputs = jnp.asarray(inputs)
  check_tokens(inputs, cfg, 'inputs')
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens!r} must be a positive integer')
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0 is greedy)')
  if top_k is not None and not 0 < top_k <= cfg.vocab_size:
    raise ValueError(f'top_k={top_k} must be in [1, vocab_size={cfg.vocab_size}]')
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p={top_p} must be in (0, 1]')
  greedy = temperature == 0.0
  if not greedy and rng is None:
    raise ValueError(f'temperature={temperature} samples and needs rng=jax.random.key(...)')
  lengths = np.asarray((inputs != cfg.pad_id).sum(axis=1))
  if (lengths == 0).any():
    raise ValueError(f'inputs row {int(np.argmin(lengths))} is all padding (pad_id={cfg.pad_id})')
  if isinstance(model, GPT):
    needed = inputs.shape[1] + max_new_tokens - 1
  else:
    needed = max_new_tokens
  if needed > cfg.max_len:
    raise ValueError(f'{inputs.shape[1] if isinstance(model, GPT) else 0} prompt tokens + '
                     f'max_new_tokens={max_new_tokens} exceed max_len={cfg.max_len}')
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, variables['params'], inputs.astype(jnp.int32), rng,
                   jnp.float32(temperature if not greedy else 1.0),
                   None if top_p is None else jnp.float32(top_p),
                   max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k)
