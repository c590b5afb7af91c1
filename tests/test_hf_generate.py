"""Decoding equals transformers' generate(), token for token.

Part 1 needs no converter: a tiny GPT-2 made into a Markov chain (position embeddings and the
layer's output projections zeroed, so its next-token logits depend on the last real token
only) is decoded by transformers, and `TableChain` - a decoding family that reads the same
logits table - by our loops. What is compared is the loops: processors, beam bookkeeping, early
stopping, the settings taken from a generation config. Prompts are left padded with an
attention mask, as transformers wants them.

Part 2 decodes converted checkpoints (`flaxformer_lite.convert.from_pretrained`) against the
same checkpoints in transformers; it is skipped while the converter is not there.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite.decoding import Decoder, GenerationSettings, generate

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

PAD, EOS, VOCAB, N = 0, 1, 16, 10
ROWS = 25


@pytest.fixture(scope='module')
def markov():
  """The torch model and its logits table `[V, V]` (row t: the logits after token t)."""
  cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=1,
                                n_head=2, bos_token_id=2, eos_token_id=EOS, pad_token_id=PAD,
                                tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():
    model.transformer.wpe.weight.zero_()
    for proj in (model.transformer.h[0].attn.c_proj, model.transformer.h[0].mlp.c_proj):
      proj.weight.zero_()
      proj.bias.zero_()
    model.lm_head.weight.normal_(0, 0.5)
    model.transformer.ln_f.bias.fill_(0.1)
    model.lm_head.weight[EOS] += 1.2  # eos likely enough that hypotheses end at many lengths
    table = model(torch.arange(VOCAB)[:, None]).logits[:, 0].numpy()
  return model, {'table': jnp.asarray(table)}


@dataclasses.dataclass(frozen=True)
class TableChain:
  """A decoding family whose next-token logits are `table[last real token]`."""
  generation: GenerationSettings | None = None

  def check_decoding(self, inputs, max_new_tokens, valid=None):
    tokens = jnp.asarray(inputs, jnp.int32)
    return tokens, jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)

  def decoder_for(self, variables, inputs, max_new_tokens):
    tokens, valid = inputs
    table = variables['table']
    last_index = tokens.shape[1] - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    last = tokens[jnp.arange(tokens.shape[0]), last_index]
    return Decoder(cache=last, logits=table[last],
                   tokens_to_logits=lambda cache, tokens: (table[tokens], tokens),
                   pad_id=PAD, eos_id=EOS, prefix=tokens)  # transformers bans nothing


def prompts(seed=0, length=6, shortest=1):
  """ROWS random prompts, left padded with PAD: tokens `[ROWS, length]`, mask `[ROWS, length]`."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(shortest, length + 1, ROWS)
  mask = np.arange(length)[None, :] >= length - lengths[:, None]
  tokens = np.where(mask, rng.integers(2, VOCAB, (ROWS, length)), PAD).astype(np.int32)
  return tokens, mask


def until_eos(rows, n=N):
  """Each row cut after its first eos and padded to n: transformers fills beams with eos."""
  out = []
  for row in np.asarray(rows).tolist():
    row = row[:row.index(EOS) + 1] if EOS in row else row
    out.append(row + [PAD] * (n - len(row)))
  return out


def hf_generate(model, tokens, mask, **kwargs):
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long), pad_token_id=PAD,
                         eos_token_id=EOS, **kwargs)
  return until_eos(out[:, tokens.shape[1]:].numpy(), kwargs.get('max_new_tokens', N))


def agreement(ours, theirs):
  return sum(a == b for a, b in zip(until_eos(ours), theirs))


GREEDY = [{}, dict(min_length=12), dict(min_new_tokens=5), dict(no_repeat_ngram_size=1),
          dict(no_repeat_ngram_size=2), dict(bad_words_ids=[[6], [12], [EOS]]),
          dict(forced_eos_token_id=EOS), dict(min_length=9, no_repeat_ngram_size=3),
          dict(min_length=14, min_new_tokens=2)]  # min_new_tokens replaces min_length


@pytest.mark.parametrize('config', GREEDY, ids=str)
def test_greedy_equals_transformers(markov, config):
  model, variables = markov
  tokens, mask = prompts()
  theirs = hf_generate(model, tokens, mask, max_new_tokens=N, do_sample=False, **config)
  ours = generate(TableChain(GenerationSettings.from_hf(config)), variables, tokens,
                  valid=mask, max_new_tokens=N)
  assert agreement(ours, theirs) == ROWS


BEAMS = [dict(num_beams=4, length_penalty=lp, early_stopping=es)
         for lp in (1.0, 2.0, 0.0, -0.5) for es in (True, False, 'never')]
BEAMS += [dict(num_beams=2, length_penalty=2.0, early_stopping=es) for es in (True, False, 'never')]
BEAMS += [dict(num_beams=4, length_penalty=0.6, no_repeat_ngram_size=2),
          dict(num_beams=4, length_penalty=1.5, min_length=10, early_stopping=True),
          dict(num_beams=4, min_new_tokens=3, bad_words_ids=[[4]], forced_eos_token_id=EOS)]


@pytest.mark.parametrize('config', BEAMS, ids=str)
def test_beam_search_equals_transformers(markov, config):
  model, variables = markov
  tokens, mask = prompts()
  theirs = hf_generate(model, tokens, mask, max_new_tokens=N, do_sample=False, **config)
  # num_beams comes from the settings: generate() then runs beam search, as transformers does.
  ours = generate(TableChain(GenerationSettings.from_hf(config)), variables, tokens,
                  valid=mask, max_new_tokens=N)
  assert agreement(ours, theirs) == ROWS


def test_early_stopping_modes_give_different_hypotheses(markov):
  """On these prompts the three modes disagree (and each equals transformers, above): True
  stops at the first W finished hypotheses, False goes on while the best open beam (at its
  current length) can still win, 'never' while it could at the longest length (length_penalty
  2 favours long hypotheses)."""
  _, variables = markov
  tokens, mask = prompts()
  out = {es: until_eos(generate(TableChain(), variables, tokens, valid=mask, max_new_tokens=N,
                                num_beams=2, length_penalty=2.0, early_stopping=es))
         for es in (True, False, 'never')}
  differ = lambda a, b: sum(x != y for x, y in zip(out[a], out[b]))
  assert (differ(True, False), differ(False, 'never'), differ(True, 'never')) == (20, 6, 20)


def test_forced_bos_fires_when_input_ids_hold_one_token(markov):
  model, variables = markov
  tokens, mask = prompts(seed=1, length=1)  # one-token prompts: transformers' cur_len == 1
  for beams in (1, 3):
    theirs = hf_generate(model, tokens, mask, max_new_tokens=N, num_beams=beams,
                         forced_bos_token_id=9)
    ours = generate(TableChain(), variables, tokens, valid=mask, max_new_tokens=N,
                    num_beams=beams, forced_bos_id=9)
    assert agreement(ours, theirs) == ROWS and all(row[0] == 9 for row in theirs)


def test_a_saved_generation_config_gives_the_same_defaults(markov, tmp_path):
  """generation_config.json -> GenerationSettings.from_hf -> generate() with no arguments equals
  transformers' generate() with the model's generation config (max_length counts the prompt)."""
  model, variables = markov
  tokens, mask = prompts(seed=2)
  config = transformers.GenerationConfig(
      max_length=tokens.shape[1] + 8, num_beams=3, length_penalty=1.3, early_stopping='never',
      no_repeat_ngram_size=2, min_new_tokens=2, bad_words_ids=[[5]], eos_token_id=EOS,
      pad_token_id=PAD, bos_token_id=2)
  config.save_pretrained(tmp_path)
  settings = GenerationSettings.from_hf(json.loads((tmp_path / 'generation_config.json')
                                                   .read_text()))
  model.generation_config = config
  try:
    theirs = hf_generate(model, tokens, mask, max_new_tokens=8)
  finally:
    model.generation_config = transformers.GenerationConfig(eos_token_id=EOS, pad_token_id=PAD)
  ours = generate(TableChain(settings), variables, tokens, valid=mask)
  assert np.asarray(ours).shape == (ROWS, 8)
  assert agreement(ours, [row[:8] + [PAD] * (N - 8) for row in theirs]) == ROWS


@pytest.mark.parametrize('key, value', [
    ('repetition_penalty', 1.2), ('num_beam_groups', 2), ('diversity_penalty', 0.5),
    ('constraints', ['x']), ('bad_words_ids', [[3, 4]]), ('eos_token_id', [1, 2]),
    ('suppress_tokens', [3]), ('renormalize_logits', True), ('num_return_sequences', 2),
])
def test_from_hf_refuses_what_it_cannot_honour(key, value):
  with pytest.raises(ValueError, match=key):
    GenerationSettings.from_hf({key: value})


def test_from_hf_maps_the_fields():
  settings = GenerationSettings.from_hf({
      'max_length': 64, 'num_beams': 4, 'early_stopping': True, 'length_penalty': 0.6,
      'bad_words_ids': [[58100], [0]], 'eos_token_id': 0, 'forced_eos_token_id': [0],
      'decoder_start_token_id': 58100, 'pad_token_id': 58100, 'repetition_penalty': 1.0,
      'transformers_version': '5.0', 'custom_entry': 'ignored as transformers ignores it'})
  assert settings == GenerationSettings(max_length=64, num_beams=4, early_stopping=True,
                                        length_penalty=0.6, banned_ids=(58100,),
                                        forced_eos_id=0)
  assert GenerationSettings.from_hf({}).banned_ids == ()  # transformers bans nothing


# ----------------------------------------------------------------------------------------------
# Part 2: converted checkpoints, decoded with their own generation configs.

V = 64
EOS_BOOST = 3.0


def _checkpoint(kind):
  """A tiny transformers model with decisive logits and eos likely enough to matter, and the
  generation config its family's hub checkpoints carry (scaled down)."""
  torch.manual_seed(0)
  seq2seq = dict(vocab_size=V, init_std=0.3, d_model=32, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                 decoder_ffn_dim=48, max_position_embeddings=64, dropout=0.0,
                 attention_dropout=0.0, activation_dropout=0.0, attn_implementation='eager')
  gen = transformers.GenerationConfig
  if kind == 'gpt2':
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, initializer_range=0.3, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=V - 1, eos_token_id=V - 1, attn_implementation='eager'))
    config = gen(bos_token_id=V - 1, eos_token_id=V - 1)  # GPT-2's: greedy, 20 new tokens
  elif kind == 'marian':
    model = transformers.MarianMTModel(transformers.MarianConfig(
        **seq2seq, activation_function='swish', scale_embedding=True, pad_token_id=V - 1,
        eos_token_id=0, decoder_start_token_id=V - 1, forced_eos_token_id=0))
    config = gen(bad_words_ids=[[V - 1]], bos_token_id=0, decoder_start_token_id=V - 1,
                 eos_token_id=0, forced_eos_token_id=0, max_length=24, num_beams=4,
                 pad_token_id=V - 1)  # opus-mt's, max_length 512 -> 24
  elif kind == 'bart':
    model = transformers.BartForConditionalGeneration(transformers.BartConfig(
        **seq2seq, activation_function='gelu', pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=2))
    config = gen(bos_token_id=0, decoder_start_token_id=2, eos_token_id=2, early_stopping=True,
                 forced_bos_token_id=0, forced_eos_token_id=2, length_penalty=2.0,
                 max_length=20, min_length=6, no_repeat_ngram_size=3, num_beams=4,
                 pad_token_id=1)  # bart-large-cnn's, lengths scaled down
  else:
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        dropout_rate=0.0, initializer_factor=2.0, decoder_start_token_id=0,
        feed_forward_proj='relu', attn_implementation='eager'))
    config = gen(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)  # t5-small's
  model.generation_config = config
  _perturb(model, kind)
  if kind == 't5':
    model.config.eos_token_id = config.eos_token_id = _frequent_token(model, kind)
  return model


def _perturb(model, kind):
  """Random biases and norm scales (nothing 0 or 1); the eos logit raised (by final_logits_bias,
  or along GPT-2's final norm bias) so that hypotheses end at many lengths."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
      if p.dtype.is_floating_point and p.dim() == 1 or 'final_logits_bias' in name:
        p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    eos = model.config.eos_token_id
    if kind in ('marian', 'bart'):
      model.final_logits_bias[:, eos] += EOS_BOOST
    elif kind == 'gpt2':
      bias = model.transformer.ln_f.bias
      model.lm_head.weight[eos] += EOS_BOOST * bias / bias.square().sum()
  return model.eval()


def _frequent_token(model, kind):
  """A token T5 often produces after its first two (it has no bias to raise eos with)."""
  tokens, mask = _inputs(kind)
  out = _hf(model, kind, tokens, mask, max_new_tokens=10, eos_token_id=None)[:, 2:]
  counts = np.bincount(out.reshape(-1), minlength=V)
  counts[:3] = 0
  return int(np.argmax(counts))


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """kind -> (transformers model, our (model, variables) from its saved directory)."""
  convert = pytest.importorskip('flaxformer_lite.convert')
  out = {}
  for kind in ('gpt2', 'marian', 'bart', 't5'):
    model = _checkpoint(kind)
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    out[kind] = (model, convert.from_pretrained(path))
  return out


def _inputs(kind, seed=0, length=8):
  """25 random prompts (GPT-2: left padded with eos, as its tokenizer would) or sources (right
  padded); ids stay clear of the special tokens."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, length + 1, ROWS)
  real = np.arange(length)[None, :] < lengths[:, None]
  if kind == 'gpt2':
    real = np.ascontiguousarray(real[:, ::-1])
  pad = {'gpt2': V - 1, 'marian': V - 1, 'bart': 1, 't5': 0}[kind]
  return np.where(real, rng.integers(3, V - 2, (ROWS, length)), pad).astype(np.int32), real


def _hf(model, kind, tokens, mask, **kwargs):
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long), **kwargs).numpy()
  start = tokens.shape[1] if kind == 'gpt2' else 1  # new tokens only
  return out[:, start:]


def _same(ours, theirs, eos):
  """Rows equal up to and including the first eos (the fillers after it differ by design)."""
  def cut(row):
    row = list(row)
    return row[:row.index(eos) + 1] if eos in row else row
  return sum(cut(a) == cut(b) for a, b in zip(np.asarray(ours), theirs))


@pytest.mark.parametrize('kind', ['gpt2', 'marian', 'bart', 't5'])
def test_a_converted_checkpoint_decodes_with_its_defaults_as_transformers(checkpoints, kind):
  """No decoding argument on either side: GPT-2 and T5 greedy for 20 tokens, Marian beam search
  to max_length with pad banned and forced eos, BART beam search with forced BOS/EOS, min
  length, no-repeat trigrams, length penalty 2 and early stopping."""
  hf, (model, variables) = checkpoints[kind]
  tokens, mask = _inputs(kind)
  theirs = _hf(hf, kind, tokens, mask)
  ours = generate(model, variables, tokens, valid=mask)
  assert _same(ours, theirs, hf.config.eos_token_id) == ROWS


@pytest.mark.parametrize('kind', ['gpt2', 'marian', 'bart', 't5'])
@pytest.mark.parametrize('early_stopping', [True, False, 'never'])
def test_converted_beam_search_equals_transformers(checkpoints, kind, early_stopping):
  hf, (model, variables) = checkpoints[kind]
  tokens, mask = _inputs(kind, seed=1)
  kwargs = dict(num_beams=4, max_new_tokens=12, length_penalty=1.5, no_repeat_ngram_size=2,
                early_stopping=early_stopping)
  theirs = _hf(hf, kind, tokens, mask, min_length=5, **kwargs)
  ours = generate(model, variables, tokens, valid=mask, min_length=5, **kwargs)
  assert _same(ours, theirs, hf.config.eos_token_id) == ROWS
