"""Autoregressive generation over a model's cache: pure functions, one jit-compiled loop each.

The loops know no model class. A model family decodes when it has two methods (`GPT` and
`Transformer` do; `BertEncoder` has no generator and is refused):

  check_decoding(inputs, max_new_tokens) -> inputs
      On the host, before anything is traced: raises ValueError for a bad request (token
      values, all-padding rows, a length past max_len) and returns what the loop is given.
  decoder_for(variables, inputs, max_new_tokens) -> Decoder
      Inside the compiled loop (shapes static, values traced): runs the prompt (or encodes the
      source and feeds BOS) into a fresh cache and returns a `Decoder`: that cache, the logits
      of each row's first new token, the one-token step `tokens_to_logits`, the token
      conventions and which axis of each cache leaf holds the rows.

`beam_search` calls `decoder_for` with every input repeated `beam_size` times (row b * W + w is
beam w of example b) and reorders the cache along `Decoder.cache_batch_axes`: a family never
sees beams. Each loop carries a named state (`SamplingState`, `BeamState`) through
`lax.while_loop`, which stops early once every row has emitted `eos_id` (no open beam can win).

Logits processors (min length, banned n-grams, forced tokens, ...) plug into one place,
`_process`: each is `processor(scores [R, V], tokens [R, L], index) -> scores [R, V]` for R rows
(B, or B * W beams) whose new tokens so far are `tokens` (pad_id from column `index`, the one
being chosen, on). `generate` applies them to the logits, before temperature, top-k and top-p;
`beam_search` to the log-probabilities, after the log-softmax, as transformers does. Processors
are static arguments of the compiled loops: make them hashable by value (frozen dataclasses).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class Decoder:
  """What a model family hands the decoding loops, for its B rows: all they know of the model."""
  cache: Any  # the cache after the prompt: a pytree, its rows on `cache_batch_axes`
  logits: jax.Array  # [B, V] float32: predict each row's first new token
  # (cache, tokens [B]) -> (logits [B, V], cache): feeds one token per row. Finished rows are
  # fed pad_id; what they get back is never read.
  tokens_to_logits: Callable[[Any, jax.Array], tuple[jax.Array, Any]]
  pad_id: int  # fills a row after its eos_id; never generated
  eos_id: int  # ends a row
  # The axis of each cache leaf that holds the B rows: an int, or a pytree prefix of the cache
  # with int leaves (like jax.vmap's in_axes), e.g. 1 for a layer stack cached under nn.scan.
  cache_batch_axes: Any = 0
  # Names of cache leaves that hold the same value for every beam of an example (e.g. the
  # cross-attention keys of the repeated source): beam search never reorders them.
  beam_shared: tuple[str, ...] = ()


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


def _process(processors, scores, tokens, index):
  """scores `[R, V]` through each logits processor in turn (see the module docstring)."""
  for processor in processors:
    scores = processor(scores, tokens, index)
  return scores


def _never_pad(logits, pad_id):
  # pad_id marks finished rows in the output, so it is never chosen.
  return logits.at[:, pad_id].set(-jnp.inf)


@struct.dataclass
class SamplingState:
  """The `generate` loop's state: B rows, L = max_new_tokens."""
  cur_index: jax.Array  # [] int32: the column of `tokens` drawn next
  tokens: jax.Array  # [B, L] int32: the new tokens; pad_id from cur_index on and after eos_id
  last_token: jax.Array  # [B] int32: the token drawn last, fed next (pad_id once done)
  done: jax.Array  # [B] bool: the row has emitted eos_id
  cache: Any  # the family's cache, rows as in `tokens`
  rng: jax.Array  # key for the draws still to come


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'greedy', 'top_k',
                                             'processors'))
def _generate(model, variables, inputs, rng, temperature, top_p, *, max_new_tokens, greedy, top_k,
              processors=()):
  decoder = model.decoder_for(variables, inputs, max_new_tokens)
  vocab = decoder.logits.shape[-1]  # known once the family's decoder is traced
  if top_k is not None and not 0 < top_k <= vocab:
    raise ValueError(f'top_k={top_k} must be in [1, vocab_size={vocab}]')

  def advance(state, logits):
    """Draws column cur_index from `logits [B, V]`."""
    rng, draw_rng = jax.random.split(state.rng)
    logits = _process(processors, _never_pad(logits, decoder.pad_id), state.tokens,
                      state.cur_index)
    if greedy:
      token = sample_logits(logits, draw_rng)
    else:
      token = sample_logits(logits, draw_rng, temperature=temperature, top_k=top_k, top_p=top_p)
    token = jnp.where(state.done, decoder.pad_id, token)
    return state.replace(cur_index=state.cur_index + 1,
                         tokens=state.tokens.at[:, state.cur_index].set(token),
                         last_token=token, done=state.done | (token == decoder.eos_id), rng=rng)

  def body(state):
    logits, cache = decoder.tokens_to_logits(state.cache, state.last_token)
    return advance(state.replace(cache=cache), logits)

  def cond(state):
    return (state.cur_index < max_new_tokens) & ~jnp.all(state.done)

  tokens = jnp.full((inputs.shape[0], max_new_tokens), decoder.pad_id, jnp.int32)
  state = SamplingState(cur_index=jnp.int32(0), tokens=tokens, last_token=tokens[:, 0],
                        done=jnp.zeros(tokens.shape[:1], bool), cache=decoder.cache, rng=rng)
  return jax.lax.while_loop(cond, body, advance(state, decoder.logits)).tokens


def _check_request(name, model, inputs, max_new_tokens):
  """Host-side checks before anything is traced; returns the family's checked inputs."""
  if not all(callable(getattr(model, m, None)) for m in ('check_decoding', 'decoder_for')):
    raise ValueError(f'{name} needs a model with check_decoding and decoder_for methods (GPT, '
                     f'Transformer); {type(model).__name__} has no generator')
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens!r} must be a positive integer')
  return model.check_decoding(inputs, max_new_tokens)


def generate(model, variables, inputs, *, max_new_tokens, temperature=0.0, top_k=None,
             top_p=None, rng=None):
  """Generates up to `max_new_tokens` tokens per row, in one compiled loop.

  Args:
    model: a `GPT`, a `Transformer` or any family with the methods of the module docstring.
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
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0 is greedy)')
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p={top_p} must be in (0, 1]')
  greedy = temperature == 0.0
  if not greedy and rng is None:
    raise ValueError(f'temperature={temperature} samples and needs rng=jax.random.key(...)')
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, variables, inputs, rng,
                   jnp.float32(temperature if not greedy else 1.0),
                   None if top_p is None else jnp.float32(top_p),
                   max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k)


_NEG = -1.0e9  # finite "impossible" score: keeps top_k and sums free of inf - inf


@struct.dataclass
class BeamState:
  """The `beam_search` loop's state: B examples, W beams each, L = max_new_tokens."""
  cur_index: jax.Array  # [] int32: the column chosen next
  live_seqs: jax.Array  # [B, W, L] int32: the open beams; pad_id from cur_index on
  live_logp: jax.Array  # [B, W] float32: their summed log-probabilities, best first (_NEG: none)
  logits: jax.Array  # [B * W, V] float32: predict each open beam's next token
  cache: Any  # the family's cache; row b * W + w is open beam w of example b
  finished_seqs: jax.Array  # [B, W, L] int32: the best hypotheses that ended with eos_id
  finished_scores: jax.Array  # [B, W] float32: their normalized scores, best first (_NEG: none)


def _normalized(logp, length, length_penalty):
  return logp / length.astype(jnp.float32) ** length_penalty


def _gather_beams(cache, parents, batch_axes, shared=()):
  """Reorders the cache's rows by `parents [B, W]` (the beam each new beam continues).

  `batch_axes`: the axis of each leaf that holds the B * W rows (see `Decoder`). Leaves named
  in `shared` are the same for all beams of an example, and a parent is always a beam of the
  same example, so they are left as they are: no copy per step.
  """
  batch, beam_size = parents.shape
  rows = (parents + beam_size * jnp.arange(batch)[:, None]).reshape(-1)

  def gather(axis, tree):
    def leaf(path, x):
      name = getattr(path[-1], 'key', None) if path else None
      return x if name in shared else jnp.take(x, rows, axis)
    return jax.tree_util.tree_map_with_path(leaf, tree)
  return jax.tree.map(gather, batch_axes, cache)


def _beam_step(decoder, length_penalty, max_new_tokens, processors, state):
  """Extends every open beam by one token: W stay open, the ones that end join the finished."""
  batch, beam_size, _ = state.live_seqs.shape
  i = state.cur_index
  token_logp = _process(processors, jax.nn.log_softmax(_never_pad(state.logits, decoder.pad_id)),
                        state.live_seqs.reshape(batch * beam_size, -1), i)
  vocab = token_logp.shape[-1]
  scores = state.live_logp[:, :, None] + token_logp.reshape(batch, beam_size, vocab)
  # 2W candidates always leave W that do not end here, whatever ends.
  cand_logp, cand = jax.lax.top_k(scores.reshape(batch, -1), 2 * beam_size)
  parent, token = cand // vocab, (cand % vocab).astype(jnp.int32)
  cand_seqs = jnp.take_along_axis(state.live_seqs, parent[:, :, None], axis=1).at[:, :, i].set(
      token)
  ends = token == decoder.eos_id
  # Finished: the best W of the old ones and the candidates that end now.
  pool_scores = jnp.concatenate(
      [state.finished_scores,
       jnp.where(ends, _normalized(cand_logp, i + 1, length_penalty), _NEG)], axis=1)
  finished_scores, keep = jax.lax.top_k(pool_scores, beam_size)
  finished_seqs = jnp.take_along_axis(jnp.concatenate([state.finished_seqs, cand_seqs], axis=1),
                                      keep[:, :, None], axis=1)
  # Open: the best W candidates that do not end.
  live_logp, keep = jax.lax.top_k(jnp.where(ends, _NEG, cand_logp), beam_size)
  token = jnp.take_along_axis(token, keep, axis=1).reshape(-1)
  cache = _gather_beams(state.cache, jnp.take_along_axis(parent, keep, axis=1),
                        decoder.cache_batch_axes, decoder.beam_shared)
  # The last column is only chosen, never fed back.
  logits, cache = jax.lax.cond(i + 1 < max_new_tokens,
                               lambda: decoder.tokens_to_logits(cache, token),
                               lambda: (state.logits, cache))
  return BeamState(cur_index=i + 1,
                   live_seqs=jnp.take_along_axis(cand_seqs, keep[:, :, None], axis=1),
                   live_logp=live_logp, logits=logits, cache=cache,
                   finished_seqs=finished_seqs, finished_scores=finished_scores)


def _beam_open(length_penalty, max_new_tokens, state):
  """False once the search is over: at the length limit, or no open beam can still win."""
  # The best an open beam can still reach: its log-probability only falls, and the length
  # normalization favours it most at the longest length when length_penalty > 0.
  length = jnp.where(length_penalty > 0, max_new_tokens, jnp.maximum(state.cur_index, 1))
  best_open = _normalized(state.live_logp[:, 0], length, length_penalty)
  return ((state.cur_index < max_new_tokens)
          & ~jnp.all(best_open < state.finished_scores[:, -1]))


@functools.partial(jax.jit, static_argnames=('model', 'beam_size', 'max_new_tokens',
                                             'processors'))
def _beam_search(model, variables, inputs, length_penalty, *, beam_size, max_new_tokens,
                 processors=()):
  batch = inputs.shape[0]
  decoder = model.decoder_for(variables, jnp.repeat(inputs, beam_size, axis=0), max_new_tokens)
  seqs = jnp.full((batch, beam_size, max_new_tokens), decoder.pad_id, jnp.int32)
  state = BeamState(
      cur_index=jnp.int32(0), live_seqs=seqs,
      # One open beam per example, so the first step does not pick W copies of one token.
      live_logp=jnp.tile(jnp.array([0.0] + [_NEG] * (beam_size - 1)), (batch, 1)),
      logits=decoder.logits, cache=decoder.cache, finished_seqs=seqs,
      finished_scores=jnp.full((batch, beam_size), _NEG))
  state = jax.lax.while_loop(
      functools.partial(_beam_open, length_penalty, max_new_tokens),
      functools.partial(_beam_step, decoder, length_penalty, max_new_tokens, processors), state)
  # Beams still open at the length limit compete with the finished ones.
  scores = jnp.concatenate(
      [state.finished_scores,
       _normalized(state.live_logp, jnp.int32(max_new_tokens), length_penalty)], axis=1)
  every = jnp.concatenate([state.finished_seqs, state.live_seqs], axis=1)
  return every[jnp.arange(batch), jnp.argmax(scores, axis=1)]


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
  return _beam_search(model, variables, inputs, jnp.float32(length_penalty),
                      beam_size=beam_size, max_new_tokens=max_new_tokens)
