"""Autoregressive generation over a model's cache: pure functions, one jit-compiled loop each.

The loops know no model class. A model family decodes when it has two methods (`GPT` and
`Transformer` do; `BertEncoder` has no generator and is refused):

  check_decoding(inputs, max_new_tokens, valid=None) -> inputs
      On the host, before anything is traced: raises ValueError for a bad request (token
      values, all-padding rows, a length past max_len) and returns what the loop is given: an
      array or a pytree of arrays, the batch on axis 0 of every leaf (our models: `(tokens,
      valid)`). `valid [B, L]` bool marks the real prompt tokens (transformers' attention_mask);
      a family without a `valid` parameter decodes requests that pass none.
  decoder_for(variables, inputs, max_new_tokens) -> Decoder
      Inside the compiled loop (shapes static, values traced): runs the prompt (or encodes the
      source and feeds the start token) into a fresh cache and returns a `Decoder`.

`beam_search` calls `decoder_for` with every leaf of the inputs repeated `beam_size` times (row
b * W + w is beam w of example b) and reorders the cache along `Decoder.cache_batch_axes`: a
family never sees beams. Each loop carries a named state (`SamplingState`, `BeamState`) through
`lax.while_loop`.

Decoding follows transformers' `generate()`: its logits processors (`processors.py`: min length,
no-repeat n-grams, banned ids, forced BOS/EOS, in its order) see each row's `Decoder.prefix` +
new tokens; `generate` applies them to the logits before temperature, top-k and top-p;
`beam_search` to the log-probabilities after the log-softmax, keeps the 2W best candidates, lets
a hypothesis finish only from the top W of them, and stops per `early_stopping` (True: once W
hypotheses finished; False: once the best open beam, normalized at the current length, cannot
beat the worst finished one; 'never': the same at the longest length when length_penalty > 0).
A model's `generation` attribute (`GenerationSettings`, e.g. from a checkpoint's
generation_config.json) gives the defaults; explicit arguments override them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# GenerationSettings is re-exported: decoding's callers find it here too.
from flaxformer_lite.generation import GenerationSettings  # noqa: F401
from flaxformer_lite.generation import _check_early_stopping, _check_int, _pick, _request, _settings
from flaxformer_lite.processors import Rules


@dataclasses.dataclass(frozen=True)
class Decoder:
  """What a model family hands the decoding loops, for its B rows: all they know of the model."""
  cache: Any  # the cache after the prompt: a pytree, its rows on `cache_batch_axes`
  logits: jax.Array  # [B, V] float32: predict each row's first new token
  # (cache, tokens [B]) -> (logits [B, V], cache): feeds one token per row. Finished rows are
  # fed pad_id; what they get back is never read.
  tokens_to_logits: Callable[[Any, jax.Array], tuple[jax.Array, Any]]
  pad_id: int  # fills a row after its eos_id
  eos_id: int  # ends a row
  # The axis of each cache leaf that holds the B rows: an int, or a pytree prefix of the cache
  # with int leaves (like jax.vmap's in_axes), e.g. 1 for a layer stack cached under nn.scan.
  cache_batch_axes: Any = 0
  # Names of cache leaves that hold the same value for every beam of an example (e.g. the
  # cross-attention keys of the repeated source): beam search never reorders them.
  beam_shared: tuple[str, ...] = ()
  # [B, P] int32: what transformers' input_ids holds before the first new token (decoder-only:
  # the prompt as given, padding included; encoder-decoder: the start token, [B, 1]). The
  # processors count lengths and match n-grams over it; None counts new tokens only.
  prefix: jax.Array | None = None
  banned_ids: tuple[int, ...] = ()  # never generated unless a request says otherwise


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


def _batch(inputs):
  return jax.tree.leaves(inputs)[0].shape[0]


def _processors(decoder, rules, extra, max_new_tokens):
  """The request's processors for `decoder`, and the prefix `[R, P]` they are given."""
  rows = decoder.logits.shape[0]
  rules.check_vocab(decoder.logits.shape[-1])
  prefix = (jnp.zeros((rows, 0), jnp.int32) if decoder.prefix is None
            else jnp.asarray(decoder.prefix, jnp.int32))
  built = rules.processors(decoder.eos_id, decoder.banned_ids, prefix.shape[1], max_new_tokens)
  return built + tuple(extra), prefix


def _process(processors, scores, tokens, index, prefix):
  """scores `[R, V]` through each logits processor in turn (see processors.py)."""
  for processor in processors:
    scores = processor(scores, tokens, index, prefix)
  return scores


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
                                             'clip_top_k', 'rules', 'processors'))
def _generate(model, variables, inputs, rng, temperature, top_p, *, max_new_tokens, greedy, top_k,
              clip_top_k=False, rules=Rules(), processors=()):
  decoder = model.decoder_for(variables, inputs, max_new_tokens)
  vocab = decoder.logits.shape[-1]  # known once the family's decoder is traced
  if top_k is not None and clip_top_k:  # a settings default (50) may exceed a small vocab
    top_k = min(top_k, vocab)
  if top_k is not None and not 0 < top_k <= vocab:
    raise ValueError(f'top_k={top_k} must be in [1, vocab_size={vocab}]')
  processors, prefix = _processors(decoder, rules, processors, max_new_tokens)

  def advance(state, logits):
    """Draws column cur_index from `logits [B, V]`."""
    rng, draw_rng = jax.random.split(state.rng)
    logits = _process(processors, logits, state.tokens, state.cur_index, prefix)
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

  tokens = jnp.full((_batch(inputs), max_new_tokens), decoder.pad_id, jnp.int32)
  state = SamplingState(cur_index=jnp.int32(0), tokens=tokens, last_token=tokens[:, 0],
                        done=jnp.zeros(tokens.shape[:1], bool), cache=decoder.cache, rng=rng)
  return jax.lax.while_loop(cond, body, advance(state, decoder.logits)).tokens


_NEG = -1.0e9  # transformers' finite "impossible" score: keeps top_k and sums free of inf - inf


@struct.dataclass
class BeamState:
  """The `beam_search` loop's state: B examples, W beams each, L = max_new_tokens."""
  cur_index: jax.Array  # [] int32: the column chosen next
  running_seqs: jax.Array  # [B, W, L] int32: the open beams; pad_id from cur_index on
  running_logp: jax.Array  # [B, W] float32: their summed log-probabilities, best first
  logits: jax.Array  # [B * W, V] float32: predict each open beam's next token
  cache: Any  # the family's cache; row b * W + w is open beam w of example b
  finished_seqs: jax.Array  # [B, W, L] int32: the best hypotheses that ended
  finished_scores: jax.Array  # [B, W] float32: their normalized scores, best first (_NEG: none)
  finished: jax.Array  # [B, W] bool: the slot holds a hypothesis (transformers' is_sent_finished)
  improvable: jax.Array  # [B] bool: an open beam may still beat the worst finished hypothesis


@dataclasses.dataclass(frozen=True)
class _Search:
  """The static parameters of one beam search."""
  beam_size: int
  max_new_tokens: int
  length_penalty: float
  early_stopping: bool | str

  def norm(self, index):
    """length ** length_penalty for `index + 1` new tokens, computed as transformers does (a
    double on the host, used as float32)."""
    table = np.arange(1, self.max_new_tokens + 1, dtype=np.float64) ** self.length_penalty
    return jnp.asarray(table.astype(np.float32))[index]


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


def _update_finished(search, state, cand_logp, cand_seqs, ends):
  """The best W of the finished hypotheses and the candidates `[B, 2W]` that end now; only the
  top W candidates may finish, and none once the example's search is over (transformers'
  `_update_finished_beams`, its -1e9 sums included)."""
  top = jnp.arange(cand_logp.shape[1]) < search.beam_size
  just = ends & top[None, :]
  scores = cand_logp / search.norm(state.cur_index)
  if search.early_stopping is True:
    scores += jnp.all(state.finished, axis=1, keepdims=True).astype(jnp.float32) * _NEG
  scores += (~state.improvable[:, None]).astype(jnp.float32) * _NEG
  scores += (~just).astype(jnp.float32) * _NEG
  merged_scores = jnp.concatenate([state.finished_scores, scores], axis=1)
  finished_scores, keep = jax.lax.top_k(merged_scores, search.beam_size)
  merged_seqs = jnp.concatenate([state.finished_seqs, cand_seqs], axis=1)
  merged_finished = jnp.concatenate([state.finished, just], axis=1)
  return (jnp.take_along_axis(merged_seqs, keep[:, :, None], axis=1), finished_scores,
          jnp.take_along_axis(merged_finished, keep, axis=1))


def _still_improvable(search, improvable, index, running_logp, finished_scores, finished):
  """False for an example once its best open beam cannot beat its worst finished hypothesis
  (transformers' `_check_early_stop_heuristic`, after `index + 1` new tokens)."""
  if search.early_stopping == 'never' and search.length_penalty > 0:
    norm = search.norm(search.max_new_tokens - 1)  # longer only helps: the longest length
  else:
    norm = search.norm(index)
  best = running_logp[:, :1] / norm
  worst = jnp.where(finished, jnp.min(finished_scores, axis=1, keepdims=True), _NEG)
  return improvable & jnp.any(best > worst, axis=1)


def _beam_step(decoder, search, processors, prefix, state):
  """Extends every open beam by one token: of the 2W best candidates the top W that end finish,
  the W best that do not end stay open."""
  batch, beam_size, _ = state.running_seqs.shape
  i = state.cur_index
  token_logp = _process(processors, jax.nn.log_softmax(state.logits),
                        state.running_seqs.reshape(batch * beam_size, -1), i, prefix)
  vocab = token_logp.shape[-1]
  scores = token_logp.reshape(batch, beam_size, vocab) + state.running_logp[:, :, None]
  cand_logp, cand = jax.lax.top_k(scores.reshape(batch, -1), 2 * beam_size)
  parent, token = cand // vocab, (cand % vocab).astype(jnp.int32)
  cand_seqs = jnp.take_along_axis(state.running_seqs, parent[:, :, None], axis=1).at[:, :, i].set(
      token)
  ends = (token == decoder.eos_id) | (i == search.max_new_tokens - 1)
  running_logp, keep = jax.lax.top_k(cand_logp + ends.astype(jnp.float32) * _NEG, beam_size)
  finished_seqs, finished_scores, finished = _update_finished(search, state, cand_logp, cand_seqs,
                                                              ends)
  token = jnp.take_along_axis(token, keep, axis=1).reshape(-1)
  cache = _gather_beams(state.cache, jnp.take_along_axis(parent, keep, axis=1),
                        decoder.cache_batch_axes, decoder.beam_shared)
  # The last column is only chosen, never fed back.
  logits, cache = jax.lax.cond(i + 1 < search.max_new_tokens,
                               lambda: decoder.tokens_to_logits(cache, token),
                               lambda: (state.logits, cache))
  improvable = _still_improvable(search, state.improvable, i, running_logp, finished_scores,
                                 finished)
  return BeamState(cur_index=i + 1,
                   running_seqs=jnp.take_along_axis(cand_seqs, keep[:, :, None], axis=1),
                   running_logp=running_logp, logits=logits, cache=cache,
                   finished_seqs=finished_seqs, finished_scores=finished_scores,
                   finished=finished, improvable=improvable)


def _beam_open(search, state):
  """False once the search is over: at the length limit, when no example can improve, or (with
  early_stopping True) when every example has W finished hypotheses."""
  go = (state.cur_index < search.max_new_tokens) & jnp.any(state.improvable)
  if search.early_stopping is True:
    go &= ~jnp.all(state.finished)
  return go


@functools.partial(jax.jit, static_argnames=('model', 'search', 'rules', 'processors'))
def _beam_search(model, variables, inputs, *, search, rules=Rules(), processors=()):
  batch, beam_size = _batch(inputs), search.beam_size
  repeated = jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0), inputs)
  decoder = model.decoder_for(variables, repeated, search.max_new_tokens)
  processors, prefix = _processors(decoder, rules, processors, search.max_new_tokens)
  seqs = jnp.full((batch, beam_size, search.max_new_tokens), decoder.pad_id, jnp.int32)
  state = BeamState(
      cur_index=jnp.int32(0), running_seqs=seqs,
      # One open beam per example, so the first step does not pick W copies of one token.
      running_logp=jnp.tile(jnp.array([0.0] + [_NEG] * (beam_size - 1)), (batch, 1)),
      logits=decoder.logits, cache=decoder.cache, finished_seqs=seqs,
      finished_scores=jnp.full((batch, beam_size), _NEG),
      finished=jnp.zeros((batch, beam_size), bool), improvable=jnp.ones((batch,), bool))
  state = jax.lax.while_loop(
      functools.partial(_beam_open, search),
      functools.partial(_beam_step, decoder, search, processors, prefix), state)
  # At the length limit every top-W candidate finished: the best finished one wins.
  return state.finished_seqs[:, 0]


# ----------------------------------------------------------------------------------------------
# The public functions: host-side checks, defaults from the model's settings (generation.py),
# then one loop.

def generate(model, variables, inputs, *, max_new_tokens=None, temperature=None, top_k=None,
             top_p=None, rng=None, valid=None, num_beams=None, length_penalty=None,
             early_stopping=None, min_length=None, min_new_tokens=None, no_repeat_ngram_size=None,
             forced_bos_id=None, forced_eos_id=None, banned_ids=None):
  """Generates up to `max_new_tokens` tokens per row, in one compiled loop.

  Every argument left None takes the model's `generation` settings (`GenerationSettings`), as
  transformers' `generate()` takes its generation config; without settings: greedy, 20 tokens.
  With num_beams > 1 this is `beam_search` (length_penalty, early_stopping go to it).

  Args:
    model: a `GPT`, a `Transformer` or any family with the methods of the module docstring.
    variables: its variables (`{'params': ...}`).
    inputs: `[B, L]` int. For GPT the prompts (padding on either side); for Transformer the
      source tokens. `valid [B, L]` bool marks the real tokens (default: the family's rule).
    max_new_tokens: how many tokens to produce.
    temperature: 0.0 is greedy; > 0 samples from softmax(logits / temperature). None: the
      settings' do_sample and temperature.
    top_k, top_p: restrict sampling to the k most likely tokens / the nucleus of mass top_p.
    rng: a `jax.random.key`, required when sampling.
    min_length, min_new_tokens, no_repeat_ngram_size, forced_bos_id, forced_eos_id, banned_ids:
      the logits rules of processors.py, with transformers' meaning (lengths count the prefix).
  Returns:
    `[B, max_new_tokens]` int32, the new tokens only; after a row emits `eos_id` the rest of the
    row is the family's `pad_id`.
  """
  rule_args = dict(min_length=min_length, min_new_tokens=min_new_tokens,
                   no_repeat_ngram_size=no_repeat_ngram_size, forced_bos_id=forced_bos_id,
                   forced_eos_id=forced_eos_id, banned_ids=banned_ids)
  settings = _settings(model)
  beams = _check_int('num_beams', _pick(num_beams, settings.num_beams), 1)
  if beams > 1:
    if temperature:
      raise ValueError(f'temperature={temperature} with num_beams={beams}: beam sampling is not '
                       f'supported')
    return beam_search(model, variables, inputs, beam_size=beams, max_new_tokens=max_new_tokens,
                       length_penalty=length_penalty, early_stopping=early_stopping, valid=valid,
                       **rule_args)
  inputs, max_new_tokens, rules = _request('generate', model, variables, inputs, valid,
                                           max_new_tokens, rule_args)
  sample = settings.do_sample if temperature is None else temperature != 0.0
  temperature = _pick(temperature, settings.temperature if sample else 0.0)
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0 is greedy)')
  clip_top_k = top_k is None  # transformers clips its settings' top_k to the vocabulary
  top_k = _check_int('top_k', _pick(top_k, settings.top_k), 0, optional=True) or None
  top_p = _pick(top_p, settings.top_p)
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p={top_p} must be in (0, 1]')
  if not sample:
    top_k, top_p = None, None
  if sample and rng is None:
    raise ValueError(f'temperature={temperature} samples and needs rng=jax.random.key(...)')
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, variables, inputs, rng, jnp.float32(temperature if sample else 1.0),
                   None if top_p in (None, 1.0) else jnp.float32(top_p),
                   max_new_tokens=max_new_tokens, greedy=not sample, top_k=top_k,
                   clip_top_k=clip_top_k, rules=rules)


def beam_search(model, variables, inputs, *, beam_size=None, max_new_tokens=None,
                length_penalty=None, early_stopping=None, valid=None, min_length=None,
                min_new_tokens=None, no_repeat_ngram_size=None, forced_bos_id=None,
                forced_eos_id=None, banned_ids=None):
  """The best hypothesis of transformers' beam search, in one compiled loop.

  A hypothesis scores sum(log p) / length ** length_penalty, length counting its new tokens
  (eos included), as transformers does for decoder-only and encoder-decoder models alike. Of
  each step's 2W best candidates, the top W that end with eos finish; at the length limit the
  top W all finish. `early_stopping`: True stops an example once W hypotheses finished; False
  (transformers' default) once its best open beam, normalized at the current length, cannot beat
  the worst finished one; 'never' the same, normalized at max_new_tokens when length_penalty > 0.

  Args: as `generate`; `beam_size` beams per row (None: the settings' num_beams);
    length_penalty (None: the settings', 1.0 without); early_stopping (None: the settings',
    False without).
  Returns:
    `[B, max_new_tokens]` int32, the best hypothesis of each row, `pad_id` after its `eos_id`.
  """
  rule_args = dict(min_length=min_length, min_new_tokens=min_new_tokens,
                   no_repeat_ngram_size=no_repeat_ngram_size, forced_bos_id=forced_bos_id,
                   forced_eos_id=forced_eos_id, banned_ids=banned_ids)
  settings = _settings(model)
  beam_size = _check_int('beam_size', _pick(beam_size, settings.num_beams), 1)
  length_penalty = _pick(length_penalty, settings.length_penalty)
  if (isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float, np.number))
      or not np.isfinite(length_penalty)):
    raise ValueError(f'length_penalty={length_penalty!r} must be a finite number')
  early_stopping = _check_early_stopping(_pick(early_stopping, settings.early_stopping))
  inputs, max_new_tokens, rules = _request('beam_search', model, variables, inputs, valid,
                                           max_new_tokens, rule_args)
  search = _Search(beam_size, max_new_tokens, float(length_penalty), early_stopping)
  return _beam_search(model, variables, inputs, search=search, rules=rules)
