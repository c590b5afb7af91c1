"""Training throughput of `python -m train` under each parallel layout, on fake host devices.

    python -m benchmarks.train_layouts [--devices 8] [--steps 80] [--preset tiny]

Each layout runs the real CLI (`--task text`) in its own process with
XLA_FLAGS=--xla_force_host_platform_device_count=N; tokens/s is the median of the logged windows
after the first (which includes compilation). On one CPU the "devices" share the same cores, so
the table compares the layouts' overheads, not a speed-up; on real accelerators run the same
command without the flag.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile

import jax

LAYOUTS = [
    ('single device', ['--mesh', 'data=1'], 1),
    ('pmap', ['--parallel', 'pmap'], None),
    ('data=N', ['--mesh', 'data=-1'], None),
    ('fsdp=N', ['--mesh', 'fsdp=-1'], None),
    ('data=2,fsdp=2,tensor=2', ['--mesh', 'data=2,fsdp=2,tensor=2'], None),
    ('tensor=4,data=2', ['--mesh', 'tensor=4,data=2'], None),
]


def run_layout(args, extra, devices, workdir) -> dict:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  root = pathlib.Path(__file__).resolve().parent.parent
  env['PYTHONPATH'] = str(root)
  cmd = [sys.executable, '-m', 'train', '--task', 'text', '--preset', args.preset,
         '--steps', str(args.steps), '--batch-size', str(args.batch_size),
         '--seq-len', str(args.seq_len), '--log-every', str(args.log_every),
         '--eval-every', str(args.steps), '--checkpoint-every', str(args.steps),
         '--examples', '0', '--no-progress', '--workdir', workdir, *extra]
  proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
  if proc.returncode:
    return {'error': proc.stderr.strip().splitlines()[-1]}
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  train = [l for l in lines if l['split'] == 'train']
  rates = [l['tokens_per_second'] for l in train[1:]] or [train[-1]['tokens_per_second']]
  return {'tokens_per_second': statistics.median(rates), 'final_loss': train[-1]['loss']}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--devices', type=int, default=8)
  p.add_argument('--steps', type=int, default=80)
  p.add_argument('--log-every', type=int, default=20)
  p.add_argument('--batch-size', type=int, default=32)
  p.add_argument('--seq-len', type=int, default=128)
  p.add_argument('--preset', default='tiny')
  args = p.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, extra, devices in LAYOUTS:
      result = run_layout(args, extra, devices or args.devices, os.path.join(tmp, str(len(rows))))
      rows.append({'layout': name.replace('N', str(args.devices)),
                   'devices': devices or args.devices, **result})
      print(rows[-1], flush=True)
  base = rows[0].get('tokens_per_second')
  print('\n| layout | devices | tokens/s | vs single device |\n|---|---|---|---|')
  for r in rows:
    if 'error' in r:
      print(f'| {r["layout"]} | {r["devices"]} | error: {r["error"]} | |')
    else:
      print(f'| {r["layout"]} | {r["devices"]} | {r["tokens_per_second"]:,.0f} | '
            f'{r["tokens_per_second"] / base:.2f}x |')
  device = jax.devices()[0].platform
  out = pathlib.Path(__file__).parent / 'results' / f'train_layouts-{device}.json'
  out.write_text(json.dumps({
      'benchmark': 'train_layouts', 'device': device, 'cpu_count': os.cpu_count(),
      'machine': platform.machine(), 'jax': jax.__version__, 'config': vars(args),
      'rows': rows}, indent=2) + '\n')
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
