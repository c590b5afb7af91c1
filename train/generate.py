"""python -m train.generate --workdir DIR [--prompt TEXT | --input TEXT]: decode with the newest
checkpoint of a training run (GPT continues --prompt; the Transformer rewrites --input)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from flaxformer_lite import beam_search, generate
from train import checkpoint, data, loop
from train.config import RunConfig, UsageError
from train.tasks import MLMTask, Seq2SeqTask, to_host


def parser():
  p = argparse.ArgumentParser(prog='python -m train.generate', description=__doc__)
  p.add_argument('--workdir', required=True)
  p.add_argument('--prompt', action='append', help='text to continue (text task); repeatable')
  p.add_argument('--input', action='append', help='source text (dates/translate); repeatable')
  p.add_argument('--max-new-tokens', type=int, default=None)
  p.add_argument('--temperature', type=float, default=0.0, help='0 is greedy')
  p.add_argument('--top-k', type=int)
  p.add_argument('--top-p', type=float)
  p.add_argument('--beam-size', type=int, default=0, help='> 0: beam search instead of sampling')
  p.add_argument('--seed', type=int, default=0)
  return p


def load(workdir: str):
  """(setup, params) of the newest checkpoint in `workdir`."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UsageError(f'--workdir {workdir}: no config.json; is this a training run\'s workdir?')
  with open(path) as f:
    meta = json.load(f)
  # Decoding runs on this machine's devices, whatever layout the training used.
  run = RunConfig(**{**meta['run'], 'workdir': workdir, 'parallel': 'mesh', 'mesh': None,
                     'batch_size': jax.device_count()})
  setup = loop.build(run)
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'))
  try:
    step = ckpts.latest_step()
    if step is None:
      raise UsageError(f'--workdir {workdir}: no finished checkpoint yet')
    state, _ = ckpts.restore(step, checkpoint.abstract(setup.abstract_state, setup.shardings))
  finally:
    ckpts.close()
  return setup, state.params


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    setup, params = load(args.workdir)
    task, model = setup.task, setup.model
    if isinstance(task, MLMTask):
      raise UsageError('an mlm run has no generator; train --task text or a seq2seq task')
    if isinstance(task, Seq2SeqTask):
      texts = args.input or []
      if not texts:
        raise UsageError('give --input TEXT for a sequence-to-sequence run')
      length, max_new = task.src_len, args.max_new_tokens or task.tgt_len
    else:
      texts = args.prompt or []
      if not texts:
        raise UsageError('give --prompt TEXT for a text run')
      length = max(len(task.tokenizer.encode(t)) for t in texts)
      max_new = args.max_new_tokens or 64
    tokens = np.stack([data.pad_to(task.tokenizer.encode(t), length) for t in texts])
    variables = {'params': params}
    try:
      if args.beam_size:
        out = beam_search(model, variables, tokens, beam_size=args.beam_size,
                          max_new_tokens=max_new)
      else:
        out = generate(model, variables, tokens, max_new_tokens=max_new,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       rng=jax.random.key(args.seed))
    except ValueError as e:  # the library's checks of the request, e.g. a prompt too long
      raise UsageError(str(e)) from None
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for text, row in zip(texts, to_host(out)):
    print(f'{text} -> {task.tokenizer.decode(row)}' if isinstance(task, Seq2SeqTask)
          else text + task.tokenizer.decode(row))
  return 0


if __name__ == '__main__':
  sys.exit(main())
