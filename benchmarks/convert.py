"""python -m benchmarks.convert: Hugging Face checkpoints read by ours next to transformers.

    python -m benchmarks.convert [--quick] [--out DIR]

Two measurements:
  - parity: for every architecture and head of `benchmarks.hf_tiny` (tiny random-weight models,
    eager attention, float32), the max abs difference between our outputs and transformers' on a
    padded batch (left padding for GPT-2, right for the others): logits, or BERT's hidden states
    and head outputs.
  - loading: a GPT-2-small-sized random checkpoint (124M parameters, float32, one
    model.safetensors) read by `convert.from_pretrained` and by transformers'
    `GPT2LMHeadModel.from_pretrained`, each in a fresh process: wall time of the call (imports
    and JAX's backend start excluded; the best of `--repeats` processes) and the process's peak resident memory
    (VmHWM) minus its resident memory just before the call.
Writes benchmarks/results/convert-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks.attention import device_name, versions

RESULTS = pathlib.Path(__file__).parent / 'results'

_LOAD = r'''
import json, sys, time
def status_mb(key):  # VmHWM: this process's peak (ru_maxrss would carry the parent's over exec)
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
which, path = sys.argv[1], sys.argv[2]
if which == 'ours':
  from flaxformer_lite import convert
  import jax
  jax.devices()  # the backend starts before the clock, as torch's does at import
  load = lambda: jax.block_until_ready(convert.from_pretrained(path)[1])
else:
  import transformers
  load = lambda: transformers.GPT2LMHeadModel.from_pretrained(path)
before = status_mb('VmRSS')
start = time.perf_counter()
load()
seconds = time.perf_counter() - start
peak = status_mb('VmHWM')
print(json.dumps(dict(seconds=seconds, peak_mb=peak, before_mb=before, added_peak_mb=peak - before)))
'''


def parity() -> dict:
  """kind -> max abs diff of ours against transformers (see the module docstring)."""
  import jax.numpy as jnp
  import torch
  from benchmarks.hf_tiny import KINDS, V, saved
  from flaxformer_lite import convert
  rng = np.random.default_rng(0)
  out = {}
  for kind in KINDS:
    with tempfile.TemporaryDirectory() as tmp:
      hf, _ = saved(kind, tmp)
      model, variables = convert.from_pretrained(tmp)
    ids = rng.integers(3, V - 2, (3, 9))
    mask = np.ones_like(ids)
    mask[1, slice(0, 3) if kind == 'gpt2' else slice(-3, None)] = 0  # left pads for GPT-2
    ids_t, mask_t, valid = torch.tensor(ids), torch.tensor(mask), jnp.asarray(mask, bool)
    with torch.no_grad():
      if kind == 'gpt2':
        pos = torch.tensor(np.maximum(mask.cumsum(1) - 1, 0))
        pairs = [(hf(ids_t, attention_mask=mask_t, position_ids=pos).logits,
                  model.apply(variables, jnp.asarray(ids), valid=valid))]
      elif kind.startswith('bert'):
        ref = hf(ids_t, attention_mask=mask_t)
        method = {'bert': None, 'bert-mlm': 'mlm_logits', 'bert-cls': 'classify',
                  'bert-qa': 'qa_logits'}[kind]
        ours = model.apply(variables, jnp.asarray(ids), valid=valid,
                           **({'method': method} if method else {}))
        if kind == 'bert':
          pairs = [(ref.last_hidden_state, ours)]
        elif kind == 'bert-qa':
          pairs = [(ref.start_logits, ours[0]), (ref.end_logits, ours[1])]
        else:
          pairs = [(ref.logits, ours)]
      elif kind == 'whisper':  # log-mel-like features; Whisper's encoder sees no padding
        feats = rng.normal(size=(3, 24, 8)).astype(np.float32)
        tgt = ids[:, :6].copy()
        tgt[:, 0] = model.config.decoder_start_id
        ref = hf(input_features=torch.tensor(feats.transpose(0, 2, 1)),
                 decoder_input_ids=torch.tensor(tgt)).logits
        pairs = [(ref, model.apply(variables, jnp.asarray(feats), jnp.asarray(tgt),
                                   tgt_valid=jnp.ones(tgt.shape, bool)))]
      else:
        tgt = ids[:, :6].copy()
        tgt[:, 0] = model.config.decoder_start_id
        ref = hf(input_ids=ids_t, attention_mask=mask_t, decoder_input_ids=torch.tensor(tgt)).logits
        pairs = [(ref, model.apply(variables, jnp.asarray(ids), jnp.asarray(tgt), src_valid=valid,
                                   tgt_valid=jnp.ones(tgt.shape, bool)))]
    diffs = []  # over real positions only: a pad's own output is never read
    for ref, ours in pairs:
      d = np.abs(np.asarray(ref) - np.asarray(ours))
      if d.ndim >= 2 and d.shape[:2] == mask.shape:
        d = d[mask.astype(bool)]
      diffs.append(float(d.max()))
    out[kind] = max(diffs)
    print(f'{kind:10s} max abs diff {out[kind]:.2e}', flush=True)
  return out


def loading(repeats: int, quick: bool) -> dict:
  import torch
  import transformers as tf
  torch.manual_seed(0)
  shape = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64, bos_token_id=0,
               eos_token_id=0) if quick else {}
  model = tf.GPT2LMHeadModel(tf.GPT2Config(**shape))
  n_params = sum(p.numel() for p in model.parameters())
  out = {'n_params': n_params}
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    del model
    for which in ('ours', 'transformers'):
      runs = [json.loads(subprocess.run([sys.executable, '-c', _LOAD, which, tmp], check=True,
                                        capture_output=True, text=True).stdout.splitlines()[-1])
              for _ in range(repeats)]
      out[which] = min(runs, key=lambda r: r['seconds'])
      print(f'{which:12s} load {out[which]["seconds"]:.2f} s, peak +'
            f'{out[which]["added_peak_mb"]:.0f} MB', flush=True)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--repeats', type=int, default=3, help='load processes of each')
  p.add_argument('--quick', action='store_true', help='a tiny checkpoint, for smoke tests')
  p.add_argument('--out', type=pathlib.Path, default=None)
  args = p.parse_args(argv)
  record = {'parity_max_abs_diff': parity(), 'loading': loading(args.repeats, args.quick)}
  import torch
  record['versions'] = versions(torch.__version__)
  default_dir = pathlib.Path(tempfile.gettempdir()) if args.quick else RESULTS
  out = (args.out or default_dir) / f'convert-{device_name()}{"-quick" if args.quick else ""}.json'
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=1))
  load = record['loading']
  print(f'load ours / transformers: time {load["ours"]["seconds"] / load["transformers"]["seconds"]:.2f}x, '
        f'peak memory {load["ours"]["added_peak_mb"] / load["transformers"]["added_peak_mb"]:.2f}x')
  print(f'wrote {out}')
  return record


if __name__ == '__main__':
  main()
