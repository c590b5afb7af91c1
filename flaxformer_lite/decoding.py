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


def _prefill(model, params, inputs, max_new_tokens):
  """Runs the prompt (GPT) or BOS (Transformer) through the decoder.

  Returns `step(cache, tokens [B, T]) -> (logits [B, T, V], cache)`, the cache after the prompt
  and the logits that predict each row's first new token `[B, V]`.
  """
  cfg = model.config
  batch = inputs.shape[0]
  if isinstance(model, Transformer):
    encoded = model.apply({'params': params}, inputs, method='encode')
    prompt = jnp.full((batch, 1), cfg.bos_id, jnp.int32)
    cache = _zeros_cache(model, inputs, jnp.zeros((batch, max_new_tokens), jnp.int32))

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

  logits, cache = step(cache, prompt)
  last = (prompt != cfg.pad_id).sum(axis=1) - 1
  return step, cache, logits[jnp.arange(batch), last]


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'greedy', 'top_k'))
def _generate(model, params, inputs, rng, temperature, top_p, *, max_new_tokens, greedy, top_k):
  cfg = model.config
  batch = inputs.shape[0]
  step, cache, first_logits = _prefill(model, params, inputs, max_new_tokens)

  def draw(logits, rng):
    # pad_id marks finished rows in the output, so it is never sampled.
    logits = logits.at[:, cfg.pad_id].set(-jnp.inf)
    if greedy:
      return sample_logits(logits, rng)
    return sample_logits(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)

  rng, first_rng = jax.random.split(rng)
  token = draw(first_logits, first_rng)
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


def _check_request(name, model, inputs, max_new_tokens) -> jax.Array:
  """Host-side checks before anything is compiled; returns inputs as an int32 array."""
  if not isinstance(model, (GPT, Transformer)):
    raise ValueError(f'{name} needs a GPT or a Transformer, got {type(model).__name__}')
  cfg = model.config
  inputs = jnp.asarray(inputs)
  check_tokens(inputs, cfg, 'inputs')
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens!r} must be a positive integer')
  lengths = np.asarray((inputs != cfg.pad_id).sum(axis=1))
  if (lengths == 0).any():
    raise ValueError(f'inputs row {int(np.argmin(lengths))} is all padding (pad_id={cfg.pad_id})')
  prompt = inputs.shape[1] if isinstance(model, GPT) else 0
  # The last new token is only emitted, never fed back, so it needs no position of its own;
  # the Transformer's decoder input starts with BOS.
  needed = prompt + max_new_tokens - 1 if prompt else max_new_tokens
  if needed > cfg.max_len:
    raise ValueError(f'{prompt} prompt tokens + max_new_tokens={max_new_tokens} exceed '
                     f'max_len={cfg.max_len}')
  return inputs.astype(jnp.int32)


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
  inputs = _check_request('generate', model, inputs, max_new_tokens)
  cfg = model.config
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0 is greedy)')
  if top_k is not None and not 0 < top_k <= cfg.vocab_size:
    raise ValueError(f'top_k={top_k} must be in [1, vocab_size={cfg.vocab_size}]')
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p={top_p} must be in (0, 1]')
  greedy = temperature == 0.0
  if not greedy and rng is None:
    raise ValueError(f'temperature={temperature} samples and needs rng=jax.random.key(...)')
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, variables['params'], inputs, rng,
                   jnp.float32(temperature if not greedy else 1.0),
                   None if top_p is None else jnp.float32(top_p),
                   max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k)


_NEG = -1.0e9  # finite "impossible" score: keeps top_k and sums free of inf - inf


def _gather_beams(cache, beams, batch, beam_size):
  """Reorders every cache row `[B * W, ...]` by `beams [B, W]` (the parent of each new beam).

  Under `scan_layers` the cache under 'layers' carries a leading layer axis, so its batch axis
  is the second one.
  """
  def gather(path, x):
    if x.ndim == 0:
      return x
    axis = 1 if any(getattr(p, 'key', None) == 'layers' for p in path) else 0
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape((batch, beam_size) + x.shape[1:])
    x = jnp.take_along_axis(x, beams.reshape(beams.shape + (1,) * (x.ndim - 2)), axis=1)
    return jnp.moveaxis(x.reshape((batch * beam_size,) + x.shape[2:]), 0, axis)
  return jax.tree_util.tree_map_with_path(gather, cache)


@functools.partial(jax.jit, static_argnames=('model', 'beam_size', 'max_new_tokens'))
def _beam_search(model, params, inputs, length_penalty, *, beam_size, max_new_tokens):
  cfg = model.config
  batch, vocab = inputs.shape[0], cfg.vocab_size
  flat = jnp.repeat(inputs, beam_size, axis=0)  # row b * W + w is beam w of example b
  step, cache, logits = _prefill(model, params, flat, max_new_tokens)

  def normalized(logp, length):
    return logp / length.astype(jnp.float32) ** length_penalty

  def body(state):
    i, cache, logits, seqs, logp, done_seqs, done_scores = state
    token_logp = jax.nn.log_softmax(logits.at[:, cfg.pad_id].set(-jnp.inf))
    scores = (logp[:, :, None] + token_logp.reshape(batch, beam_size, vocab))
    # 2W candidates always leave W that do not end here, whatever ends.
    cand_logp, cand = jax.lax.top_k(scores.reshape(batch, -1), 2 * beam_size)
    parent, token = cand // vocab, (cand % vocab).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(seqs, parent[:, :, None], axis=1).at[:, :, i].set(token)
    ends = token == cfg.eos_id
    # Finished pool: the best W of the old pool and the candidates that end now.
    pool_scores = jnp.concatenate(
        [done_scores, jnp.where(ends, normalized(cand_logp, i + 1), _NEG)], axis=1)
    done_scores, keep = jax.lax.top_k(pool_scores, beam_size)
    done_seqs = jnp.take_along_axis(jnp.concatenate([done_seqs, cand_seqs], axis=1),
                                    keep[:, :, None], axis=1)
    # Alive beams: the best W candidates that do not end.
    logp, keep = jax.lax.top_k(jnp.where(ends, _NEG, cand_logp), beam_size)
    seqs = jnp.take_along_axis(cand_seqs, keep[:, :, None], axis=1)
    token = jnp.take_along_axis(token, keep, axis=1)
    cache = _gather_beams(cache, jnp.take_along_axis(parent, keep, axis=1), batch, beam_size)
    logits, cache = jax.lax.cond(
        i + 1 < max_new_tokens,
        lambda: step(cache, token.reshape(-1, 1)),
        lambda: (logits[:, None], cache))
    return i + 1, cache, logits[:, 0], seqs, logp, done_seqs, done_scores

  def cond(state):
    i, _, _, _, logp, _, done_scores = state
    # The best an alive beam can still reach: its log-probability only falls, and the length
    # normalization favours it most at the longest length when length_penalty > 0.
    length = jnp.where(length_penalty > 0, max_new_tokens, jnp.maximum(i, 1))
    best_alive = normalized(logp[:, 0], length)
    return (i < max_new_tokens) & ~jnp.all(best_alive < done_scores[:, -1])

  seqs = jnp.full((batch, beam_size, max_new_tokens), cfg.pad_id, jnp.int32)
  logp = jnp.tile(jnp.array([0.0] + [_NEG] * (beam_size - 1)), (batch, 1))  # one live beam
  state = (jnp.int32(0), cache, logits, seqs, logp, seqs, jnp.full((batch, beam_size), _NEG))
  _, _, _, seqs, logp, done_seqs, done_scores = jax.lax.while_loop(cond, body, state)
  # Beams still alive at the length limit compete with the finished ones.
  scores = jnp.concatenate([done_scores, normalized(logp, jnp.int32(max_new_tokens))], axis=1)
  every = jnp.concatenate([done_seqs, seqs], axis=1)
  best = jnp.argmax(scores, axis=1)
  return every[jnp.arange(batch), best]


def beam_search(model, variables, inputs, *, beam_size, max_new_tokens, length_penalty=1.0):
  """The highest-scoring continuation under beam search, in one compiled loop.

  A finished hypothesis scores sum(log p) / length ** length_penalty, length counting the new
  tokens including `eos_id`; hypotheses still open at `max_new_tokens` compete with the same
  formula. The search stops early once no open beam can beat the finished ones.

  Args: as `generate`; `beam_size` beams per row.
  Returns:
    `[B, max_new_tokens]` int32, the best hypothesis of each row, `pad_id` after its `eos_id`.
  """
  inputs = _check_request('beam_search', model, inputs, max_new_tokens)
  if not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f'beam_size={beam_size!r} must be a positive integer')
  return _beam_search(model, variables['params'], inputs, jnp.float32(length_penalty),
                      beam_size=beam_size, max_new_tokens=max_new_tokens)
