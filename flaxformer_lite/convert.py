"""Hugging Face checkpoints: `from_pretrained` / `save_pretrained`, local directories only.

    model, variables = from_pretrained('opus-mt-en-de/')   # config.json + model.safetensors
    tokens = generate(model, variables, src, max_new_tokens=64)  # the checkpoint's defaults
    save_pretrained(model, variables, 'out/')              # transformers.from_pretrained reads it

Reads `config.json`, `model.safetensors` (or the shards of `model.safetensors.index.json`) with
safetensors' NumPy API, one tensor at a time, and `generation_config.json` when present. Neither
torch nor transformers is imported. Architectures (`flaxformer_lite.hf`): GPT-2 -> `GPT`;
BERT and its masked-LM / classification / question-answering heads -> `BertEncoder`; Marian,
BART and T5 -> `Transformer`; Whisper -> `SpeechTransformer`. A config option we cannot compute is refused by name.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite.bert import BertEncoder
from flaxformer_lite.generation import GenerationSettings
from flaxformer_lite.hf import LAYOUTS, bart, bert, gpt2, t5, whisper
from flaxformer_lite.models import GPT, Transformer
from flaxformer_lite.speech import SpeechTransformer

# Tied copies: where a checkpoint may keep a tensor under another name (or only there).
ALIASES = {
    'transformer.wte.weight': ('lm_head.weight',),
    'model.shared.weight': ('model.encoder.embed_tokens.weight',
                            'model.decoder.embed_tokens.weight', 'lm_head.weight'),
    'shared.weight': ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'),
    'cls.predictions.bias': ('cls.predictions.decoder.bias',),
    'model.decoder.embed_tokens.weight': ('proj_out.weight',),
}


class _Checkpoint:
  """The tensors of a checkpoint directory by name, read lazily from its safetensors files."""

  def __init__(self, path: pathlib.Path, base_prefix: str):
    from safetensors import safe_open
    self._open, self.base_prefix = safe_open, base_prefix
    index = path / 'model.safetensors.index.json'
    if index.exists():
      files = json.loads(index.read_text())['weight_map']
      self.files = {name: path / file for name, file in files.items()}
    elif (path / 'model.safetensors').exists():
      with safe_open(path / 'model.safetensors', framework='numpy') as f:
        self.files = {name: path / 'model.safetensors' for name in f.keys()}
    else:
      found = sorted(p.name for p in path.iterdir())
      raise ValueError(f'{path} has no model.safetensors or model.safetensors.index.json '
                       f'(found {found}); only safetensors checkpoints are read (no torch)')
    # Old checkpoints name LayerNorm parameters gamma / beta.
    self.names = {self._modern(name): name for name in self.files}

  @staticmethod
  def _modern(name: str) -> str:
    for old, new in (('LayerNorm.gamma', 'LayerNorm.weight'), ('LayerNorm.beta', 'LayerNorm.bias')):
      if name.endswith(old):
        return name[:-len(old)] + new
    return name

  def find(self, name: str) -> str | None:
    """The stored name of tensor `name`: itself, without the base model's prefix, or an alias."""
    for candidate in (name, *ALIASES.get(name, ())):
      for n in (candidate, candidate.removeprefix(self.base_prefix)):
        if n in self.names:
          return self.names[n]
    return None

  def read(self, stored: str) -> np.ndarray:
    with self._open(self.files[stored], framework='numpy') as f:
      return f.get_tensor(stored)


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise ValueError(f'{path} does not exist: a Hugging Face checkpoint directory has one') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from None


def _layout(hf: dict):
  kind = hf.get('model_type')
  if kind not in LAYOUTS:
    raise ValueError(f'model_type={kind!r} is not supported (supported: {sorted(LAYOUTS)})')
  return LAYOUTS[kind]


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split('/')
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _get(tree: dict, path: str):
  for p in path.split('/'):
    if not isinstance(tree, dict) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _init_args(model) -> tuple:
  tokens = jnp.ones((1, 2), jnp.int32)
  if isinstance(model, SpeechTransformer):
    return (jnp.zeros((1, 4, model.config.num_mel_bins)), tokens)
  if isinstance(model, Transformer):
    return (tokens, tokens)
  return (tokens,)


def expected_params(model, head: str | None = None) -> dict:
  """Our parameter shapes for `model` (and a BERT `head`), from `jax.eval_shape` of init."""
  args = _init_args(model)
  method = {'mlm_head': 'mlm_logits', 'classifier': 'classify', 'span_head': 'qa_logits'}.get(head)
  init = lambda rng: model.init(rng, *args, **({'method': method} if method else {}))
  return nn.unbox(jax.eval_shape(init, jax.random.key(0)))['params']


def _check_tree(params, expected, source: str) -> None:
  got = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  for name in sorted(set(want) | set(got)):
    if got.get(name) != want.get(name):
      raise ValueError(f'{source}: parameter {name} has shape {got.get(name)}, the model '
                       f'expects {want.get(name)}')


def _generation(path: pathlib.Path, hf: dict) -> GenerationSettings | None:
  """The checkpoint's generation defaults: generation_config.json, else those in config.json."""
  file = path / 'generation_config.json'
  settings = _read_json(file) if file.exists() else hf
  return GenerationSettings.from_hf(settings)


def _with_dtype(model, dtype, params):
  """The model computing in `dtype` (None: the checkpoint's), its params cast to it."""
  floats = [x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
  dtype = jnp.dtype(dtype if dtype is not None else floats[0])
  params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, params)
  return model.clone(config=model.config.replace(dtype=dtype, param_dtype=dtype)), params


def from_pretrained(path, *, dtype=None):
  """Loads a local Hugging Face checkpoint directory -> `(model, {'params': ...})`.

  `model` is a `GPT`, `BertEncoder` or `Transformer` whose `apply` computes what transformers
  computes (see the module docstring), with the checkpoint's generation defaults attached as
  `model.generation` (GPT and Transformer). `dtype`: compute and parameter dtype (default: the
  checkpoint's). Raises ValueError naming a missing file, an unsupported `model_type` or
  option, or a missing tensor.
  """
  path = pathlib.Path(path)
  hf = _read_json(path / 'config.json')
  layout = _layout(hf)
  model = layout.config_from_hf(hf)
  head = bert.HEADS.get((hf.get('architectures') or ['BertModel'])[0]) \
      if isinstance(model, BertEncoder) else None
  ckpt = _Checkpoint(path, layout.base_prefix)
  params = {}
  for rule in layout.tensors(model, head):
    stored = [ckpt.find(name) for name in rule.hf]
    if None in stored:
      if rule.optional:
        continue
      missing = rule.hf[stored.index(None)]
      raise ValueError(f'{path}: tensor {missing!r} is missing from the checkpoint '
                       f'(needed for {rule.ours})')
    _set(params, rule.ours, rule.to_ours(*(ckpt.read(s) for s in stored)))
  expected = expected_params(model, head)
  if 'pooler' not in params:
    expected = {k: v for k, v in expected.items() if k != 'pooler'}
  _check_tree(params, expected, str(path))
  model, params = _with_dtype(model, dtype, params)
  if not isinstance(model, BertEncoder):
    model = model.clone(generation=_generation(path, hf))
  return model, {'params': jax.tree.map(jnp.asarray, params)}


def _layout_of(model):
  if isinstance(model, GPT):
    return gpt2.LAYOUT
  if isinstance(model, BertEncoder):
    return bert.LAYOUT
  if isinstance(model, SpeechTransformer):
    return whisper.LAYOUT
  if isinstance(model, Transformer):
    return t5.LAYOUT if model.config.positions == 'relative' else bart.LAYOUT
  raise ValueError(f'{type(model).__name__} has no Hugging Face layout (GPT, BertEncoder and '
                   'Transformer do)')


def save_pretrained(model, variables, path) -> None:
  """Writes `model` and its `variables` as a Hugging Face checkpoint directory `path`
  (config.json, model.safetensors, generation_config.json when the model has settings), which
  transformers' `from_pretrained` and ours read back bit for bit."""
  from safetensors.numpy import save_file
  if model.config.scan_layers:
    raise ValueError('save_pretrained needs scan_layers=False parameters (one per layer)')
  params = jax.tree.map(np.asarray, nn.unbox(variables['params']))
  layout = _layout_of(model)
  head = bert.head_of(params) if isinstance(model, BertEncoder) else None
  hf = layout.config_to_hf(model, params)
  hf['torch_dtype'] = jnp.dtype(model.config.param_dtype).name
  tensors, used = {}, set()
  for rule in layout.tensors(model, head):
    value = _get(params, rule.ours)
    if value is None:
      if rule.optional:
        continue
      raise ValueError(f'parameter {rule.ours} is missing from the variables')
    used.add(rule.ours)
    tensors.update({n: np.ascontiguousarray(x) for n, x in zip(rule.hf, rule.to_hf(value))})
  leftover = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
              if '/'.join(k.key for k in p) not in used]
  if leftover:
    raise ValueError(f'{hf["model_type"]} has no place for parameters {leftover}')
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  _write(path / 'model.safetensors', lambda tmp: save_file(tensors, tmp, metadata={'format': 'pt'}))
  files = {'config.json': hf}
  if getattr(model, 'generation', None) is not None:
    files['generation_config.json'] = model.generation.to_hf()
  for name, content in files.items():
    _write(path / name, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(content, indent=2)))


def _write(target: pathlib.Path, write) -> None:
  """`write(temp_path)` then rename into place: a reader never sees half a file."""
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f'.{target.name}.')
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
