"""convert.from_pretrained / save_pretrained against transformers' own models (random weights).

Each architecture is built tiny from its config with weights large enough that logits are far
apart (initializer_range 0.3; biases, norm scales and final_logits_bias perturbed), saved to a
temporary directory and loaded by ours. transformers runs with eager attention. Tolerance: max
abs diff <= 1e-5 (float32), over real (not padding) positions.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
tf = pytest.importorskip('transformers')

from benchmarks.hf_tiny import KINDS, V, saved  # noqa: E402
from flaxformer_lite import convert  # noqa: E402

TOL = 1e-5
RNG = np.random.default_rng(0)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """kind -> (transformers model, directory it was saved to), built once."""
  return {kind: saved(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}


def _tokens(batch, length, low=3):
  return RNG.integers(low, V - 2, (batch, length))


def _mask(batch, length, left=False):
  """1 for real tokens; row 1 has 3 padding positions (right, or left for GPT-2)."""
  mask = np.ones((batch, length), np.int64)
  mask[1, :3] = 0 if left else 1
  if not left:
    mask[1, -3:] = 0
  return mask


def _close(ours, ref, mask=None):
  ours, ref = np.asarray(ours), np.asarray(ref)
  diff = np.abs(ours - ref)
  if mask is not None:
    diff = diff[mask.astype(bool)]
  assert diff.max() <= TOL, diff.max()
  return float(diff.max())


def test_gpt2_logits_match_with_left_padding(checkpoints):
  hf, path = checkpoints['gpt2']
  model, variables = convert.from_pretrained(path)
  ids, mask = _tokens(3, 9), _mask(3, 9, left=True)
  positions = np.maximum(mask.cumsum(1) - 1, 0)  # what generate() gives left-padded rows
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(positions)).logits
  ours = model.apply(variables, jnp.asarray(ids), valid=jnp.asarray(mask, bool))
  _close(ours, ref, mask)
  assert model.config.pad_id is None  # GPT-2 has no pad token: id 0 is a real token


@pytest.mark.parametrize('kind', ['bert', 'bert-mlm', 'bert-cls', 'bert-qa'])
def test_bert_and_its_heads_match(checkpoints, kind):
  hf, path = checkpoints[kind]
  model, variables = convert.from_pretrained(path)
  ids, mask = _tokens(3, 10), _mask(3, 10)
  types = (np.arange(10) >= 4).astype(np.int64)[None].repeat(3, 0)
  args = (jnp.asarray(ids), jnp.asarray(types))
  kw = dict(valid=jnp.asarray(mask, bool))
  with torch.no_grad():
    out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
             token_type_ids=torch.tensor(types))
  if kind == 'bert':
    _close(model.apply(variables, *args, **kw), out.last_hidden_state, mask)
    _close(model.apply(variables, model.apply(variables, *args, **kw), method='pool'),
           out.pooler_output)
  elif kind == 'bert-mlm':
    _close(model.apply(variables, *args, **kw, method='mlm_logits'), out.logits, mask)
  elif kind == 'bert-cls':
    assert model.num_labels == 3
    _close(model.apply(variables, *args, **kw, method='classify'), out.logits)
  else:
    start, end = model.apply(variables, *args, **kw, method='qa_logits')
    _close(start, out.start_logits, mask)
    _close(end, out.end_logits, mask)


@pytest.mark.parametrize('kind', ['marian', 'bart', 't5', 't5-v1_1'])
def test_seq2seq_logits_match_with_padding(checkpoints, kind):
  hf, path = checkpoints[kind]
  model, variables = convert.from_pretrained(path)
  cfg = model.config
  src, src_mask = _tokens(3, 11), _mask(3, 11)
  tgt, tgt_mask = _tokens(3, 7), _mask(3, 7)
  tgt[:, 0] = cfg.decoder_start_id  # the start token, which may equal pad_id (Marian, T5)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(src), attention_mask=torch.tensor(src_mask),
             decoder_input_ids=torch.tensor(tgt),
             decoder_attention_mask=torch.tensor(tgt_mask)).logits
  ours = model.apply(variables, jnp.asarray(src), jnp.asarray(tgt),
                     src_valid=jnp.asarray(src_mask, bool), tgt_valid=jnp.asarray(tgt_mask, bool))
  _close(ours, ref, tgt_mask)


def _flat(params):
  import jax
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize('kind', ['gpt2', 'bert-qa', 'bert-mlm', 'marian', 'bart', 't5-v1_1',
                                  'whisper'])
def test_save_pretrained_round_trips_bit_for_bit(checkpoints, kind, tmp_path):
  """ours -> save_pretrained -> transformers.from_pretrained -> its save_pretrained -> ours:
  every weight keeps its bits, and transformers' logits on our export equal ours."""
  hf_model, path = checkpoints[kind]
  model, variables = convert.from_pretrained(path)
  convert.save_pretrained(model, variables, tmp_path / 'ours')
  auto = type(hf_model).from_pretrained(tmp_path / 'ours', attn_implementation='eager').eval()
  auto.save_pretrained(tmp_path / 'again')
  again_model, again = convert.from_pretrained(tmp_path / 'again')
  before, after = _flat(variables['params']), _flat(again['params'])
  assert before.keys() == after.keys()
  for name in before:
    np.testing.assert_array_equal(before[name], after[name], err_msg=name)
  assert again_model.config == model.config
  ids = _tokens(2, 6)
  with torch.no_grad():
    if kind == 'whisper':
      feats = RNG.normal(size=(2, 24, 8)).astype(np.float32)
      ref = auto(input_features=torch.tensor(feats.transpose(0, 2, 1)),
                 decoder_input_ids=torch.tensor(ids)).logits
      ours = model.apply(variables, jnp.asarray(feats), jnp.asarray(ids),
                         tgt_valid=jnp.ones(ids.shape, bool))
    elif kind in ('marian', 'bart', 't5-v1_1'):
      tgt = ids.copy()
      ref = auto(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(tgt)).logits
      ours = model.apply(variables, jnp.asarray(ids), jnp.asarray(tgt),
                         tgt_valid=jnp.ones(tgt.shape, bool))
    elif kind == 'bert-qa':
      ref = auto(torch.tensor(ids)).start_logits
      ours = model.apply(variables, jnp.asarray(ids), method='qa_logits')[0]
    elif kind == 'bert-mlm':
      ref = auto(torch.tensor(ids)).logits
      ours = model.apply(variables, jnp.asarray(ids), method='mlm_logits')
    else:
      ref = auto(torch.tensor(ids)).logits
      ours = model.apply(variables, jnp.asarray(ids))
  _close(ours, ref)


def _edit_config(path, **changes):
  cfg = json.loads((path / 'config.json').read_text())
  cfg.update(changes)
  (path / 'config.json').write_text(json.dumps(cfg))


@pytest.mark.parametrize('kind, changes, message', [
    ('gpt2', dict(model_type='llama'), "model_type='llama' is not supported"),
    ('gpt2', dict(scale_attn_by_inverse_layer_idx=True), 'scale_attn_by_inverse_layer_idx=True'),
    ('bert', dict(position_embedding_type='relative_key'),
     "position_embedding_type='relative_key'"),
    ('t5', dict(feed_forward_proj='gated-relu'), "feed_forward_proj='gated-relu'"),
    ('marian', dict(share_encoder_decoder_embeddings=False),
     'share_encoder_decoder_embeddings=False'),
])
def test_unsupported_configs_are_refused_by_name(checkpoints, tmp_path, kind, changes, message):
  import shutil
  path = shutil.copytree(checkpoints[kind][1], tmp_path / kind)
  _edit_config(path, **changes)
  with pytest.raises(ValueError, match=message):
    convert.from_pretrained(path)


def test_missing_tensor_and_files_are_named(checkpoints, tmp_path):
  from safetensors.numpy import load_file, save_file
  import shutil
  path = shutil.copytree(checkpoints['bart'][1], tmp_path / 'bart')
  tensors = load_file(path / 'model.safetensors')
  del tensors['model.decoder.layers.1.fc2.weight']
  save_file(tensors, path / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(ValueError, match="'model.decoder.layers.1.fc2.weight' is missing"):
    convert.from_pretrained(path)
  (path / 'model.safetensors').unlink()
  with pytest.raises(ValueError, match='no model.safetensors'):
    convert.from_pretrained(path)
  with pytest.raises(ValueError, match='config.json does not exist'):
    convert.from_pretrained(tmp_path / 'nowhere')


def test_real_checkpoint_quirks_load(checkpoints, tmp_path):
  """What real checkpoints hold: shards with an index, legacy LayerNorm.gamma/beta names, a
  bare base model's names (no `bert.` prefix), no pooler, tied weights stored twice or once."""
  from safetensors.numpy import load_file, save_file
  hf_model, path = checkpoints['bert-mlm']
  model, variables = convert.from_pretrained(path)
  tensors = load_file(path / 'model.safetensors')
  renamed = {k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias',
                                                                       'LayerNorm.beta'): v
             for k, v in tensors.items() if not k.startswith('bert.pooler')}
  renamed['cls.predictions.decoder.weight'] = tensors['bert.embeddings.word_embeddings.weight']
  names = sorted(renamed)
  shards = {'a.safetensors': names[: len(names) // 2], 'b.safetensors': names[len(names) // 2:]}
  out = tmp_path / 'sharded'
  out.mkdir()
  for file, keys in shards.items():
    save_file({k: renamed[k] for k in keys}, out / file, metadata={'format': 'pt'})
  (out / 'model.safetensors.index.json').write_text(json.dumps(
      {'weight_map': {k: f for f, keys in shards.items() for k in keys}}))
  (out / 'config.json').write_text((path / 'config.json').read_text())
  loaded_model, loaded = convert.from_pretrained(out)
  assert 'pooler' not in loaded['params']
  ids = jnp.asarray(_tokens(2, 6))
  np.testing.assert_array_equal(loaded_model.apply(loaded, ids, method='mlm_logits'),
                                model.apply(variables, ids, method='mlm_logits'))
  # A bare BertModel checkpoint: names without the `bert.` prefix.
  base = {k.removeprefix('bert.'): v for k, v in tensors.items() if k.startswith('bert.')}
  (tmp_path / 'base').mkdir()
  save_file(base, tmp_path / 'base' / 'model.safetensors', metadata={'format': 'pt'})
  (tmp_path / 'base' / 'config.json').write_text((path / 'config.json').read_text())
  _edit_config(tmp_path / 'base', architectures=['BertModel'])
  _, bare = convert.from_pretrained(tmp_path / 'base')
  np.testing.assert_array_equal(bare['params']['embed']['embedding'],
                                variables['params']['embed']['embedding'])


def test_loader_imports_neither_torch_nor_transformers(checkpoints):
  """In a fresh interpreter where importing torch or transformers fails, every architecture
  loads."""
  paths = [str(checkpoints[k][1]) for k in ('gpt2', 'bert-qa', 'marian', 'bart', 't5')]
  code = f"""
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('torch', 'transformers'):
      raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from flaxformer_lite import convert
for path in {paths!r}:
  convert.from_pretrained(path)
print('loaded', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))
"""
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == 'loaded []'


def test_whisper_logits_match(checkpoints):
  """Features [B, 24 frames, 8 bins] (Whisper's encoder takes exactly 2 * max_source_positions
  frames), a decoder input starting with its start token; pad == eos, so padding is by mask."""
  hf, path = checkpoints['whisper']
  model, variables = convert.from_pretrained(path)
  assert model.config.pad_id is None and model.config.audio_strides == (1, 2)
  features = RNG.normal(size=(3, 24, 8)).astype(np.float32)
  tgt, tgt_mask = _tokens(3, 7), _mask(3, 7)
  tgt[:, 0] = model.config.decoder_start_id
  tgt[0, 3] = model.config.eos_id  # an eos inside a real sequence is a real token
  with torch.no_grad():
    ref = hf(input_features=torch.tensor(features.transpose(0, 2, 1)),
             decoder_input_ids=torch.tensor(tgt),
             decoder_attention_mask=torch.tensor(tgt_mask)).logits
  ours = model.apply(variables, jnp.asarray(features), jnp.asarray(tgt),
                     tgt_valid=jnp.asarray(tgt_mask, bool))
  _close(ours, ref, tgt_mask)


def test_whisper_greedy_transcription_equals_generate(checkpoints):
  """Plain transcription (no language/task/timestamp tokens: the tiny model has none): our
  greedy decoding of 25 random feature sets equals transformers' generate(), token for token up
  to each row's eos."""
  from flaxformer_lite import generate
  hf, path = checkpoints['whisper']
  model, variables = convert.from_pretrained(path)
  features = np.random.default_rng(3).normal(size=(25, 24, 8)).astype(np.float32)
  with torch.no_grad():
    ref = hf.generate(input_features=torch.tensor(features.transpose(0, 2, 1)),
                      attention_mask=torch.ones(25, 24), max_new_tokens=10).numpy()
  ours = np.asarray(generate(model, variables, jnp.asarray(features), max_new_tokens=10))
  eos = model.config.eos_id
  same = 0
  for a, b in zip(ours, ref):
    end = lambda row: int(np.argmax(row == eos)) + 1 if (row == eos).any() else len(row)
    same += a[:end(a)].tolist() == b[:end(b)].tolist()
  assert same == 25
