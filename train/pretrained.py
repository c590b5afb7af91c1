"""--init-from DIR: start training from a local Hugging Face checkpoint.

The model and its weights come from `convert.from_pretrained(DIR)`, the tokenizer from DIR's own
files (train/hf_tokenizer.py); the optimizer starts fresh. What a later resume or
`python -m train.generate` needs is copied into WORKDIR/pretrained/: the tokenizer files and
`source.json` (the model's config, generation defaults and tokenizer options). Once the workdir
holds a checkpoint, a rerun takes the model from there and never reads DIR again.

Rules:
  * families: translate and dates take an encoder-decoder (marian, bart, t5), text a GPT-2, mlm
    a BERT with its masked-LM head (BertForMaskedLM); any other pairing is one error line.
  * the tokenizer is DIR's (Marian's spm files, tokenizer.json or T5's spiece.model); a DIR with
    none is refused: our byte tokenizer's ids mean nothing to a pretrained embedding.
  * T5 and --task translate: when config.json has `task_specific_params` for translation, the
    first such entry's `prefix` (in the file's order) is put before every source.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import GPT, BertEncoder, Transformer, TransformerConfig
from flaxformer_lite.decoding import GenerationSettings
from train import hf_tokenizer
from train.config import UsageError

FOLDER = 'pretrained'  # under the workdir
RECORD = 'source.json'
FAMILIES = {'marian': Transformer, 'bart': Transformer, 't5': Transformer, 'gpt2': GPT,
            'bert': BertEncoder}
TASK_FAMILY = {'dates': Transformer, 'translate': Transformer, 'summarize': Transformer,
               'text': GPT, 'mlm': BertEncoder, 'qa': BertEncoder}
NEEDS = {Transformer: 'an encoder-decoder checkpoint (model_type marian, bart or t5)',
         GPT: 'a decoder-only GPT-2 checkpoint (model_type gpt2)',
         BertEncoder: 'a BERT checkpoint (mlm: with its masked-LM head, BertForMaskedLM)'}


# Parameters a task creates but never uses: a checkpoint may lack them.
# qa's span head starts fresh when the checkpoint has none (a BertModel or BertForMaskedLM).
UNUSED = {'BertEncoder': ('pooler', 'span_head')}


class PretrainedError(UsageError):
  """DIR cannot start this run: missing, unsupported, the wrong family, no tokenizer."""


@dataclasses.dataclass
class Pretrained:
  """The checkpoint a run starts from. `params` is None when the run resumes from its workdir
  (the weights are the workdir's); `files`: where the tokenizer files are (DIR or the copy)."""
  model: nn.Module
  tokenizer: object
  record: dict
  files: pathlib.Path
  params: dict | None = None
  fresh: bool = True  # read from DIR (not the workdir's copy): save() copies it


def load(run) -> Pretrained:
  """The checkpoint of `run.init_from`, or its copy in the workdir when the run resumes."""
  copy = pathlib.Path(run.workdir) / FOLDER
  if (copy / RECORD).is_file() and _has_checkpoint(run.workdir):
    return from_workdir(run.workdir)
  return _from_dir(run)


def _has_checkpoint(workdir: str) -> bool:
  directory = pathlib.Path(workdir) / 'checkpoints'
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _hf_config(directory: pathlib.Path, name: str) -> dict:
  if not directory.is_dir():
    what = 'not a folder' if directory.exists() else 'no such folder'
    raise PretrainedError(f'--init-from {name}: {what}')
  path = directory / 'config.json'
  if not path.is_file():
    raise PretrainedError(f'--init-from {name}: no config.json; a Hugging Face checkpoint '
                          'folder has one')
  try:
    hf = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, ValueError) as e:
    raise PretrainedError(f'--init-from {name}: config.json cannot be read ({e})') from None
  if not isinstance(hf, dict):
    raise PretrainedError(f'--init-from {name}: config.json holds no object')
  return hf


def _check_family(task: str, name: str, kind, family) -> None:
  wanted = TASK_FAMILY[task]
  if family is not None and family is not wanted:
    raise PretrainedError(f'--task {task} cannot start from --init-from {name}: its model_type '
                          f'{kind!r} is a {family.__name__}; {task} needs {NEEDS[wanted]}')


def _from_dir(run) -> Pretrained:
  from flaxformer_lite import convert
  name, directory = run.init_from, pathlib.Path(run.init_from)
  hf = _hf_config(directory, name)
  kind = hf.get('model_type')
  _check_family(run.task, name, kind, FAMILIES.get(kind))  # before any weight is read
  tokenizer_kind = hf_tokenizer.find(directory)
  if tokenizer_kind is None:
    files = ', '.join(' + '.join(f) for f in hf_tokenizer.KINDS.values())
    raise PretrainedError(f'--init-from {name} has no tokenizer ({files}); its ids would mean '
                          'nothing to our byte tokenizer')
  try:
    model, variables = convert.from_pretrained(directory, dtype=jnp.float32)
  except ValueError as e:  # an unsupported model_type or option, a missing tensor
    raise PretrainedError(f'--init-from {name}: {e}') from None
  _check_family(run.task, name, kind, type(model))
  if run.task == 'mlm' and 'mlm_head' not in variables['params']:
    raise PretrainedError(f'--task mlm cannot start from --init-from {name}: it has no masked-LM '
                          f'head; mlm needs {NEEDS[BertEncoder]}')
  record = {'init_from': name, 'model_type': kind, 'family': type(model).__name__,
            'model_config': model.config.to_dict(),
            'generation': None if getattr(model, 'generation', None) is None
            else model.generation.to_hf(),
            'tokenizer': dict(kind=tokenizer_kind, **_tokenizer_options(run, hf, model.config))}
  tokenizer = _tokenizer(directory, record, f'--init-from {name}')
  prefix = record['tokenizer']['source_prefix']
  if prefix and jax.process_index() == 0:
    print(f'--init-from {name}: every source starts with its task prefix {prefix!r} '
          '(task_specific_params)')
  return Pretrained(model, tokenizer, record, directory,
                    params=jax.tree.map(np.asarray, variables['params']))


def _tokenizer_options(run, hf: dict, cfg) -> dict:
  """How sequences are built: a GPT document ends with eos (GPT-2's <|endoftext|>); T5
  sources of --task translate (summarize) start with the checkpoint's translation
  (summarization) prefix from task_specific_params, if it has one."""
  prefix = ''
  wanted = {'translate': 'translation', 'summarize': 'summarization'}.get(run.task)
  if wanted and hf.get('model_type') == 't5':
    params = hf.get('task_specific_params') or {}
    # T5 was pretrained with 'summarize: ' in front of its summarization sources.
    prefix = next((v.get('prefix', '') for k, v in params.items()
                   if k.startswith(wanted) and isinstance(v, dict)),
                  'summarize: ' if run.task == 'summarize' else '')
  return {'eos_id': cfg.eos_id, 'doc_end': cfg.eos_id if run.task == 'text' else None,
          'source_prefix': prefix}


def _tokenizer(files: pathlib.Path, record: dict, where: str):
  """The tokenizer `record` names, read from `files`; `where` starts each error line."""
  options = dict(record['tokenizer'])
  kind = options.pop('kind')
  try:
    tokenizer = hf_tokenizer.load(files, kind, **options)
  except (OSError, RuntimeError, ValueError) as e:
    raise PretrainedError(f'{where}: its {kind} tokenizer cannot be read ({e})') from None
  vocab = record['model_config']['vocab_size']
  if tokenizer.vocab_size > vocab:
    raise PretrainedError(f'{where}: its tokenizer has {tokenizer.vocab_size} ids, '
                          f'more than the model\'s vocab_size {vocab}')
  if record['family'] == 'BertEncoder' and tokenizer.mask_id is None:
    raise PretrainedError(f'{where}: its tokenizer has no mask token ([MASK]) for '
                          '--task mlm')
  return tokenizer


def model_of(record: dict) -> nn.Module:
  """The model `record` (source.json) describes, without weights."""
  cfg = TransformerConfig.from_dict(record['model_config'])
  family = {'Transformer': Transformer, 'GPT': GPT, 'BertEncoder': BertEncoder}[record['family']]
  if family is BertEncoder:
    return BertEncoder(cfg)
  generation = record.get('generation')
  return family(cfg, generation=None if generation is None else
                GenerationSettings.from_hf(generation))


def from_workdir(workdir: str) -> Pretrained:
  """The model (no weights) and tokenizer a run started from, as its workdir keeps them."""
  files = pathlib.Path(workdir) / FOLDER
  name = f'--workdir {workdir}: {FOLDER}/{RECORD}'
  try:
    record = json.loads((files / RECORD).read_text(encoding='utf-8'))
    model = model_of(record)
  except FileNotFoundError:
    raise UsageError(f'{name} is missing; this --init-from run has not finished starting, or '
                     'the file was removed') from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UsageError(f'{name} cannot be used ({type(e).__name__}: {e})') from None
  return Pretrained(model, _tokenizer(files, record, name), record, files, fresh=False)


def save(workdir: str, source: Pretrained) -> None:
  """Copies the tokenizer files and source.json into WORKDIR/pretrained (record last: a kill
  before it leaves no record, and the next start reads DIR again)."""
  from train.workdir import write_json
  if not source.fresh or jax.process_index() != 0:
    return
  target = pathlib.Path(workdir) / FOLDER
  target.mkdir(exist_ok=True)
  for name in hf_tokenizer.KINDS[source.record['tokenizer']['kind']]:
    tmp = target / f'.{name}.tmp-{os.getpid()}'
    shutil.copyfile(source.files / name, tmp)
    os.replace(tmp, target / name)
  write_json(str(target / RECORD), source.record)


def check_length(cfg, positions: int, name: str) -> None:
  if positions > cfg.max_len:
    raise PretrainedError(f'--init-from {name}: its model takes at most {cfg.max_len} positions; '
                          f'this task needs {positions} (lower --seq-len)')


def matching_params(source: Pretrained, expected) -> tuple[dict, list[str]]:
  """(the checkpoint's params with the tree the task trains, the parts to initialize anew).

  `expected`: the shapes of the task's init. Parts the checkpoint has and the task does not
  create are dropped; parts it lacks are refused, except those the task never uses (BERT's
  pooler under mlm: BertForMaskedLM has none), which the caller initializes as a new model's.
  """
  params = source.params
  if params is None:  # resumed, yet no checkpoint restored: the weights come from DIR after all
    params = _from_dir_params(source)
  missing = [k for k in expected if k not in params]
  refused = [k for k in missing if k not in UNUSED.get(source.record['family'], ())]
  if refused:
    raise PretrainedError(f'--init-from {source.record["init_from"]}: the checkpoint has no '
                          f'{", ".join(refused)}; the task needs '
                          f'{NEEDS[type(source.model)]}')
  return {k: params[k] for k in expected if k in params}, missing


def _from_dir_params(source: Pretrained) -> dict:
  from flaxformer_lite import convert
  try:
    _, variables = convert.from_pretrained(source.record['init_from'], dtype=jnp.float32)
  except (OSError, ValueError) as e:
    raise PretrainedError(f'--init-from {source.record["init_from"]}: {e}') from None
  return jax.tree.map(np.asarray, variables['params'])
