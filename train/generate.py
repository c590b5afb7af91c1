"""python -m train.generate --workdir DIR REQUEST...: decode with the newest checkpoint of a
training run. REQUEST depends on the run's task (the last three: train/generate_tasks.py):

  text              --prompt TEXT     prints the continuation of TEXT (GPT)
  dates, translate  --input TEXT      prints 'TEXT -> output' (Transformer)
  summarize         --input DOCUMENT  prints the summary, decoded as the task's evaluation does:
                                      beam search with the run's --beam-size (Transformer)
  qa                --question Q --context C
                                      prints 'Q -> span (score)': the span of C with the best
                                      start + end logit, the score their sum (BertEncoder)
  speech            --audio FILE      prints 'FILE -> transcript' of a wav or flac file at
                                      16 kHz (other rates are resampled; SpeechTransformer)

Each is repeatable (qa: one --context for every --question, or one per --question). Another
task's request, none, or an option a task's decoding has no use for (qa: --max-new-tokens,
--beam-size, sampling; summarize, speech: sampling) is one `error:` line, as is any bad input.

Of the run only the workdir is read: config.json (its 'task', 'run' and 'model_config'), the
tokenizer model of a sentencepiece run (of an --init-from run: pretrained/, the checkpoint's
tokenizer and generation defaults) and the params of the newest finished checkpoint. Nothing is
written there and the training data is not needed, so this works while the run is still
training (and saving) in the same workdir, and after its --data has been moved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from flaxformer_lite import (GPT, BertEncoder, SpeechTransformer, Transformer, TransformerConfig,
                             beam_search, generate)
from train import checkpoint, data, generate_tasks, pretrained
from train.config import UsageError
from train.tasks import TRAINED_TOKENIZERS, DatesTask, SpecialIds, task_class, to_host

MODELS = {'dates': Transformer, 'translate': Transformer, 'text': GPT, 'summarize': Transformer,
          'qa': BertEncoder, 'speech': SpeechTransformer}
# The options that say what to decode, per task, and how each is written in messages.
REQUESTS = {'text': ('prompt',), 'dates': ('input',), 'translate': ('input',),
            'summarize': ('input',), 'qa': ('question', 'context'), 'speech': ('audio',)}
USAGE = {'prompt': '--prompt TEXT', 'input': '--input TEXT', 'question': '--question Q',
         'context': '--context C', 'audio': '--audio FILE'}
DEFAULT_NEW_TOKENS = 64  # for GPT; a seq2seq run writes up to its target length


def parser():
  p = argparse.ArgumentParser(prog='python -m train.generate', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='the training run\'s --workdir')
  p.add_argument('--prompt', action='append', metavar='TEXT',
                 help='text to continue (text); repeatable')
  p.add_argument('--input', action='append', metavar='TEXT',
                 help='source text (dates, translate) or document (summarize); repeatable')
  p.add_argument('--question', action='append', metavar='Q',
                 help='a question about --context (qa); repeatable')
  p.add_argument('--context', action='append', metavar='C', help='the text holding the answer '
                 '(qa): once for every --question, or once per --question')
  p.add_argument('--audio', action='append', metavar='FILE',
                 help='a wav or flac file to transcribe (speech); repeatable')
  p.add_argument('--max-new-tokens', type=int, default=None,
                 help=f'default: the run\'s target length (text: {DEFAULT_NEW_TOKENS})')
  p.add_argument('--temperature', type=float, default=0.0, help='0 is greedy (text, dates, '
                 'translate)')
  p.add_argument('--top-k', type=int, help='sample from the k likeliest tokens (with '
                 '--temperature)')
  p.add_argument('--top-p', type=float, help='sample from the nucleus of this mass (with '
                 '--temperature)')
  p.add_argument('--beam-size', type=int, default=0, help='> 0: beam search instead of sampling; '
                 'summarize and speech: default the run\'s --beam-size')
  p.add_argument('--seed', type=int, default=0)
  return p


def check_options(args) -> None:
  """Raises UsageError for a request no workdir could satisfy (argparse lets NaN through)."""
  if args.max_new_tokens is not None and args.max_new_tokens < 1:
    raise UsageError(f'--max-new-tokens {args.max_new_tokens} must be positive')
  if not math.isfinite(args.temperature) or args.temperature < 0:
    raise UsageError(f'--temperature {args.temperature} must be a finite number >= 0 '
                     '(0 is greedy)')
  if args.top_k is not None and args.top_k < 1:
    raise UsageError(f'--top-k {args.top_k} must be >= 1')
  if args.top_p is not None and not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
    raise UsageError(f'--top-p {args.top_p} must be in (0, 1]')
  if args.beam_size < 0:
    raise UsageError(f'--beam-size {args.beam_size} must be >= 0 (0: no beam search)')


# ------------------------------------------------------------------------------------------------
# config.json -> model and tokenizer

@dataclasses.dataclass
class Generator:
  """What decoding needs, read from a workdir. `src_len`: source length of a seq2seq model
  (None for GPT; speech: frames; qa: the window); `tgt_len`: its default number of new tokens
  (qa: the longest answer). `run`: the qa, summarize and speech runs' options (RunConfig)."""
  task: str
  model: nn.Module
  tokenizer: object
  src_len: int | None
  tgt_len: int
  run: object = None
  params: object = None  # set by load_params
  step: int | None = None


def read_config(workdir: str) -> dict:
  """config.json's 'task', 'run' and 'model_config', checked for type (other keys ignored)."""
  if not os.path.isdir(workdir):
    what = 'not a folder' if os.path.exists(workdir) else 'no such folder'
    raise UsageError(f'--workdir {workdir}: {what}')
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UsageError(f'--workdir {workdir}: no config.json; is this a training run\'s workdir?')
  bad = f'--workdir {workdir}: config.json'
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except OSError as e:
    raise UsageError(f'{bad} cannot be read ({e.strerror})') from None
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: truncated or not text
    raise UsageError(f'{bad} is not valid JSON ({e})') from None
  if not isinstance(config, dict):
    raise UsageError(f'{bad} holds a {type(config).__name__}, not an object')
  missing = [k for k in ('task', 'run', 'model_config') if k not in config]
  if missing:
    raise UsageError(f'{bad} has no {", ".join(repr(k) for k in missing)}')
  for key in ('run', 'model_config'):
    if not isinstance(config[key], dict):
      raise UsageError(f'{bad}: {key!r} is a {type(config[key]).__name__}, not an object')
  return {k: config[k] for k in ('task', 'run', 'model_config')}


def make_generator(workdir: str, config: dict) -> Generator:
  """The model and tokenizer of `config` (from read_config); no params yet."""
  bad = f'--workdir {workdir}: config.json'
  task, run = config['task'], config['run']
  if task == 'mlm':
    raise UsageError(f'--workdir {workdir} is an mlm run, which has no generator; train --task '
                     'text or a sequence-to-sequence task')
  if not isinstance(task, str) or task not in MODELS:
    raise UsageError(f'{bad}: task {task!r} is not one of {", ".join(MODELS)}')
  try:
    cfg = TransformerConfig.from_dict(config['model_config'])
  except (TypeError, ValueError) as e:
    raise UsageError(f'{bad}: model_config is refused: {e}') from None
  # Decoding picks the attention implementation for this machine, whatever training used.
  cfg = cfg.replace(attention_impl=None)
  src_len, tgt_len = DatesTask.src_len, DatesTask.tgt_len
  options = None
  if task == 'translate':
    seq_len = run.get('seq_len')
    if type(seq_len) is not int or seq_len < 1:
      raise UsageError(f'{bad}: run seq_len {seq_len!r} is not a positive integer')
    src_len = tgt_len = seq_len
  elif task == 'text':
    src_len, tgt_len = None, DEFAULT_NEW_TOKENS
  elif task in generate_tasks.TASKS:
    options = generate_tasks.run_config(workdir, run)
  if run.get('init_from'):  # the checkpoint's tokenizer and generation defaults
    source = pretrained.from_workdir(workdir)
    tokenizer, model = source.tokenizer, source.model.clone(config=cfg)
  else:
    tokenizer, model = make_tokenizer(workdir, run.get('tokenizer')), MODELS[task](cfg)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise UsageError(f'{bad}: model_config vocab_size {cfg.vocab_size} is smaller than the '
                     f'{tokenizer.name} tokenizer\'s {tokenizer.vocab_size}')
  if not isinstance(model, MODELS[task]):
    raise UsageError(f'{bad}: task {task} does not fit its {type(model).__name__} model')
  if options is not None:
    src_len, tgt_len = generate_tasks.lengths(workdir, task, options, cfg, tokenizer)
  return Generator(task, model, tokenizer, src_len, tgt_len, options)


def make_tokenizer(workdir: str, name):
  if name == 'byte':
    return data.ByteTokenizer()
  if name not in TRAINED_TOKENIZERS:
    raise UsageError(f'--workdir {workdir}: config.json: run tokenizer {name!r} is not one of '
                     f'byte, {", ".join(TRAINED_TOKENIZERS)}')
  cls, file = TRAINED_TOKENIZERS[name]
  path = os.path.join(workdir, file)
  if not os.path.isfile(path):
    raise UsageError(f'--workdir {workdir}: no {file}; this {name} run has not finished '
                     'preparing its data, or the file was removed')
  try:
    return cls(path)
  except Exception as e:  # noqa: BLE001 -- sentencepiece: OSError/RuntimeError; tokenizers: Exception
    raise UsageError(f'--workdir {workdir}: {file} cannot be read ({e})') from None


# ------------------------------------------------------------------------------------------------
# checkpoint -> params

def finished_steps(workdir: str) -> list[int]:
  """Steps of finished checkpoints, newest first. Saves in progress (orbax's tmp folders) and
  folders moved aside by training (e.g. '40.damaged') are not named by a bare integer."""
  directory = os.path.join(workdir, 'checkpoints')
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  steps = [int(n) for n in names
           if re.fullmatch(r'[0-9]+', n) and os.path.isdir(os.path.join(directory, n))]
  return sorted(steps, reverse=True)


def init_args(gen: Generator) -> tuple:
  """Inputs of the model's init as the task's `init_args` gives them, batch 1 and as short as
  the model takes: the params' shapes do not depend on the inputs' lengths."""
  tokens = np.ones((1, 1), np.int32)
  if gen.task == 'text':
    return (tokens,)
  if gen.task == 'qa':  # tokens, token types
    return tokens, np.zeros_like(tokens)
  if gen.task == 'speech':  # log-mel frames [1, F, M] (one frame after down-sampling), tokens
    cfg = gen.model.config
    return np.zeros((1, math.prod(cfg.audio_strides), cfg.num_mel_bins), np.float32), tokens
  return tokens, tokens  # source, decoder input


def abstract_params(workdir: str, gen: Generator):
  """The params' shapes and dtypes, as the model's init makes them (nothing allocated): the
  method the task trains (its `init_method`, e.g. BertEncoder's qa_logits) on `init_args`."""
  args, method = init_args(gen), task_class(gen.task).init_method
  try:
    variables = jax.eval_shape(lambda: gen.model.init(jax.random.key(0), *args, method=method))
  except (TypeError, ValueError) as e:  # fields from_dict accepts but the layers cannot use
    raise UsageError(f'--workdir {workdir}: config.json: model_config builds no model: '
                     f'{checkpoint.short_reason(e)}') from None
  return nn.unbox(variables['params'])


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_restored(workdir: str, step: int, restored, expected) -> None:
  """Raises UsageError unless the restored params are the model's, leaf by leaf: a partial
  restore hands back the target's own ShapeDtypeStruct for a leaf the checkpoint lacks."""
  restored, expected = _flat(restored), _flat(expected)
  problems = [f'{k} missing' for k, v in restored.items() if not isinstance(v, np.ndarray)]
  problems += [f'{k} saved {v.shape} {v.dtype} vs {expected[k].shape} {expected[k].dtype}'
               for k, v in restored.items() if isinstance(v, np.ndarray)
               and (v.shape != tuple(expected[k].shape) or v.dtype != expected[k].dtype)]
  if problems:
    more = f' and {len(problems) - 3} more' if len(problems) > 3 else ''
    raise UsageError(f'--workdir {workdir}: config.json\'s model_config does not match the '
                     f'checkpoint at step {step} (params{"; params".join(problems[:3])}{more})')


def restore_params(workdir: str, step: int, abstract):
  """The params subtree of the TrainState saved at `step`, as host numpy arrays. The optimizer
  state is neither read nor described, so its layout may change without breaking this."""
  path = epath.Path(os.path.abspath(os.path.join(workdir, 'checkpoints', str(step), 'state')))
  # Host arrays: decoding runs on this machine's devices, whatever layout training used.
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    restored = handler.restore(path, args=ocp.args.PyTreeRestore(
        item={'params': abstract}, restore_args={'params': restore_args}, partial_restore=True))
  finally:
    handler.close()
  return restored['params']


def load_params(workdir: str, gen: Generator) -> tuple[dict, int]:
  """(params, step) of the newest checkpoint that can be read; each newer one skipped is one
  `warning:` line on stderr (printed only when an older one is used)."""
  steps = finished_steps(workdir)
  if not steps:
    raise UsageError(f'--workdir {workdir}: no finished checkpoint yet')
  abstract = abstract_params(workdir, gen)
  skipped = []
  for step in steps:
    try:
      params = restore_params(workdir, step, abstract)
    except Exception as e:  # noqa: BLE001 -- whatever the files are, they cannot be used
      # Training may be deleting this step (retention) or may have left it damaged.
      checkpoint.ignore_abandoned_reads()
      skipped.append(f'step {step} ({checkpoint.short_reason(e)})')
      continue
    check_restored(workdir, step, params, abstract)
    for reason in skipped:
      print(f'warning: --workdir {workdir}: skipped the checkpoint at {reason}; using step '
            f'{step}', file=sys.stderr)
    return params, step
  raise UsageError(f'--workdir {workdir}: no checkpoint could be read: {"; ".join(skipped)}')


def load(workdir: str) -> Generator:
  """The model, tokenizer and newest readable params of the run in `workdir`."""
  gen = make_generator(workdir, read_config(workdir))
  gen.params, gen.step = load_params(workdir, gen)
  return gen


# ------------------------------------------------------------------------------------------------
# decoding

def request_for(gen: Generator, args):
  """What to decode, checked before any checkpoint is read: the texts (text, dates, translate,
  summarize), (question, context) pairs (qa) or audio features (speech)."""
  wanted = REQUESTS[gen.task]
  usage = ' '.join(USAGE[name] for name in wanted)
  foreign = [name for name in USAGE if name not in wanted and getattr(args, name)]
  if foreign:
    given = ', '.join(USAGE[name].split()[0] for name in foreign)
    raise UsageError(f'--workdir {args.workdir} is a {gen.task} run: give {usage}, not {given}')
  if not any(getattr(args, name) for name in wanted):
    raise UsageError(f'give {usage} for a {gen.task} run')
  if gen.task in generate_tasks.TASKS:
    generate_tasks.check_task_options(gen.task, args)
  if gen.task == 'qa':
    return generate_tasks.qa_request(args)
  if gen.task == 'speech':
    return generate_tasks.speech_request(gen, args)
  return getattr(args, wanted[0])


def decode(gen: Generator, texts: list, args) -> list[str]:
  """One output line per item of `request_for`'s list: the continuation (GPT), 'source ->
  output' (dates, translate), or the application task's line (train/generate_tasks.py)."""
  if gen.task == 'qa':  # texts: (question, context) pairs
    return generate_tasks.answer_lines(gen, texts)
  if gen.task == 'summarize':
    return generate_tasks.summarize_lines(gen, texts, args)
  if gen.task == 'speech':  # texts: the audio files' features
    return generate_tasks.transcribe_lines(gen, texts, args)
  if gen.src_len is not None:  # a source as training built it (special tokens, prefix)
    encoded = [gen.tokenizer.encode_source(t, gen.src_len) for t in texts]
  else:
    encoded = [gen.tokenizer.encode(t) for t in texts]
  length = gen.src_len or max(len(t) for t in encoded)
  fill = SpecialIds.of(gen.model.config).pad
  tokens = np.stack([data.pad_to(t, length, fill) for t in encoded])
  valid = np.stack([np.arange(length) < len(t) for t in encoded])  # pad may be a real id
  max_new = args.max_new_tokens or gen.tgt_len
  variables = {'params': gen.params}
  try:
    if args.beam_size:
      out = beam_search(gen.model, variables, tokens, beam_size=args.beam_size,
                        max_new_tokens=max_new, valid=valid)
    else:
      out = generate(gen.model, variables, tokens, max_new_tokens=max_new,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     rng=jax.random.key(args.seed), valid=valid)
  except ValueError as e:  # the library's checks of the request, e.g. a prompt too long
    raise UsageError(str(e)) from None
  rows = [gen.tokenizer.decode(row) for row in to_host(out)]
  if gen.src_len is not None:
    return [f'{text} -> {row}' for text, row in zip(texts, rows)]
  return [text + row for text, row in zip(texts, rows)]


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    check_options(args)
    gen = make_generator(args.workdir, read_config(args.workdir))
    request = request_for(gen, args)
    gen.params, gen.step = load_params(args.workdir, gen)
    lines = decode(gen, request, args)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for line in lines:
    print(line)
  return 0


if __name__ == '__main__':
  sys.exit(main())
