"""python -m benchmarks.attention: every attention backend of ours next to what a user would pick
instead, forward and forward+backward, causal or not, float32 and bfloat16, over lengths.

Ours: `dot_product_attention` with implementation 'xla', 'blockwise' (and 'cudnn', 'pallas' on a
GPU). Peers: `flax.linen.dot_product_attention`, `jax.nn.dot_product_attention` (xla; cudnn on a
GPU) and PyTorch's `scaled_dot_product_attention` (where torch is installed). For each length
all backends run in turns, `--rounds` times each after a warm-up, so they share the machine's
state; the median is reported. FLOPs: 4*B*N*T*S*H forward, x2.5 forward+backward, halved when
causal. Memory: the compiled program's temporary buffers (`memory_analysis()`), also for lengths
too slow to run. A backend whose call takes longer than `--max-seconds` is not run at longer
lengths. Writes benchmarks/results/attention-<device>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import dot_product_attention
from flaxformer_lite.attention import explain

RESULTS = pathlib.Path(__file__).parent / 'results'


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--lengths', type=int, nargs='+',
                 default=[128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768])
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--head-dims', type=int, nargs='+', default=None,
                 help='default: 64 (and 128 on a GPU)')
  p.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'])
  p.add_argument('--modes', nargs='+', default=['fwd', 'fwd+bwd'], choices=['fwd', 'fwd+bwd'])
  p.add_argument('--causal', nargs='+', default=['causal', 'full'], choices=['causal', 'full'])
  p.add_argument('--blocks', nargs='+', default=[], metavar='QxK',
                 help='also time blockwise with these tilings (e.g. 256x512 512x512)')
  p.add_argument('--rounds', type=int, default=5, help='timed calls of each backend')
  p.add_argument('--max-seconds', type=float, default=5.0,
                 help='a backend slower than this per call stops at that length')
  p.add_argument('--out', type=pathlib.Path, default=None)
  return p.parse_args(argv)


def device_name() -> str:
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return 'cpu'
  return device.device_kind.lower().replace('nvidia ', '').replace(' ', '-')


# ----------------------------------------------------------------------------------------------
# Backends: name -> fn(q, k, v, is_causal) on [B, T, N, H] arrays, for the current platform.

def _ours(implementation):
  return lambda q, k, v, causal: dot_product_attention(q, k, v, is_causal=causal,
                                                       implementation=implementation)


def _flax(q, k, v, causal):
  mask = nn.make_causal_mask(jnp.ones(q.shape[:2], bool)) if causal else None
  return nn.dot_product_attention(q, k, v, mask=mask)


def _jax_nn(implementation):
  return lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                              implementation=implementation)


def _tiled(block_q, block_k):
  from flaxformer_lite.blockwise import blockwise_attention
  return lambda q, k, v, causal: blockwise_attention(q, k, v, is_causal=causal, block_q=block_q,
                                                     block_k=block_k).astype(q.dtype)


def jax_backends(blocks=()) -> dict:
  backends = {'xla': _ours('xla'), 'blockwise': _ours('blockwise')}
  for tiling in blocks:
    backends[f'blockwise {tiling}'] = _tiled(*map(int, tiling.split('x')))
  if jax.default_backend() == 'gpu':
    backends.update({'cudnn': _ours('cudnn'), 'pallas': _ours('pallas')})
  backends.update({'flax.linen': _flax, 'jax.nn (xla)': _jax_nn('xla')})
  if jax.default_backend() == 'gpu':
    backends['jax.nn (cudnn)'] = _jax_nn('cudnn')
  return backends


def torch_sdpa():
  """PyTorch's SDPA as a (setup, step) pair, or None without torch."""
  try:
    import torch
  except ImportError:
    return None
  device = 'cuda' if torch.cuda.is_available() else 'cpu'

  def setup(b, t, n, h, dtype, causal, mode):
    torch_dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
    q, k, v = (torch.randn(b, n, t, h, dtype=torch_dtype, device=device,
                           requires_grad=mode == 'fwd+bwd') for _ in range(3))
    cotangent = torch.randn(b, n, t, h, dtype=torch_dtype, device=device)

    def step():
      with torch.set_grad_enabled(mode == 'fwd+bwd'):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if mode == 'fwd+bwd':
          q.grad = k.grad = v.grad = None
          out.backward(cotangent)
      if device == 'cuda':
        torch.cuda.synchronize()
    return step
  return setup, f'torch {torch.__version__} ({device})'


# ----------------------------------------------------------------------------------------------
# One cell: every backend at one (length, dtype, mode, causal).

def jax_step(fn, shape, dtype, causal, mode):
  """-> (step callable running the compiled program once, temp bytes, reason it cannot run)."""
  q = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  if mode == 'fwd':
    program = jax.jit(lambda q, k, v: fn(q, k, v, causal))
    args = (q, q, q)
  else:  # a cotangent argument: XLA would simplify a product with all-ones
    loss = lambda q, k, v, ct: jnp.sum(fn(q, k, v, causal).astype(jnp.float32) * ct)
    program = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    args = (q, q, q, jax.ShapeDtypeStruct(shape, jnp.float32))
  try:
    compiled = program.lower(*args).compile()
  except Exception as e:  # a backend refusing the call (e.g. cuDNN and float32) is a result
    return None, None, f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
  temp = compiled.memory_analysis().temp_size_in_bytes
  keys = jax.random.split(jax.random.key(0), len(args))
  values = [jax.random.normal(key, a.shape, a.dtype) for key, a in zip(keys, args)]
  return (lambda: jax.block_until_ready(compiled(*values))), temp, None


def available_bytes() -> int:
  if jax.default_backend() == 'cpu':
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('bytes_limit', 16 << 30)


def run_cell(steps: dict, rounds: int, max_seconds: float) -> dict:
  """Warm each step up once, then time them in turns. -> name -> list of seconds."""
  times = {}
  for name, step in steps.items():
    start = time.perf_counter()
    step()  # first run (allocation, caches)
    first = time.perf_counter() - start
    times[name] = [first] if first > max_seconds else []
  for _ in range(rounds):
    for name, step in steps.items():
      if len(times[name]) == 1 and times[name][0] > max_seconds:
        continue  # too slow: one measurement is enough
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  return times


def flops(b, t, n, h, causal, mode):
  f = 4 * b * n * t * t * h * (2.5 if mode == 'fwd+bwd' else 1.0)
  return f / 2 if causal else f


def benchmark_series(args, h, dtype, mode, causal, torch_setup, on_row=lambda row: None):
  """All lengths of one (head_dim, dtype, mode, causal): a list of result rows; `on_row(row)`
  after each length."""
  rows, stopped = [], set()
  for t in args.lengths:
    shape = (args.batch, t, args.heads, h)
    steps, row = {}, {'length': t, 'head_dim': h, 'dtype': dtype, 'mode': mode,
                      'causal': causal, 'backends': {}}
    for name, fn in jax_backends(args.blocks).items():
      step, temp, error = jax_step(fn, shape, dtype, causal, mode)
      entry = row['backends'][name] = {'temp_bytes': temp}
      if error:
        entry['error'] = error
      elif name in stopped:
        entry['skipped'] = f'slower than {args.max_seconds} s at a shorter length'
      elif temp > 0.6 * available_bytes():
        entry['skipped'] = f'needs {temp / 2**30:.1f} GiB of temporary memory'
      else:
        steps[name] = step
    if torch_setup and 'torch' not in stopped:
      steps['torch'] = torch_setup(args.batch, t, args.heads, h, dtype, causal, mode)
      row['backends']['torch'] = {}
    times = run_cell(steps, args.rounds, args.max_seconds)
    for name, ts in times.items():
      seconds = statistics.median(ts)
      row['backends'][name].update(seconds=seconds, runs=len(ts),
                                   tflops=flops(args.batch, t, args.heads, h, causal, mode)
                                   / seconds / 1e12)
      if seconds > args.max_seconds:
        stopped.add(name)
    row['auto'] = str(explain(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)),
                              jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)), is_causal=causal))
    rows.append(row)
    print(format_row(row), flush=True)
    on_row(row)
  return rows


def format_row(row) -> str:
  cells = []
  for name, e in row['backends'].items():
    if 'seconds' in e:
      cells.append(f'{name} {e["seconds"] * 1e3:.1f} ms')
    elif 'error' in e:
      cells.append(f'{name} n/a')
  kind = f'{row["dtype"]} {row["mode"]} {"causal" if row["causal"] else "full"} H={row["head_dim"]}'
  return f'{kind} T={row["length"]}: ' + ', '.join(cells)


# ----------------------------------------------------------------------------------------------
# A whole model at a long length: a GPT forward+backward with the blockwise backend.

def gpt_long(tokens: int) -> dict:
  """GPT (the tiny preset, 4 heads of 16) forward+backward on one sequence of `tokens` tokens:
  blockwise runs it; xla's compiled memory says what it would need."""
  from flaxformer_lite import GPT, TransformerConfig
  result = {'tokens': tokens}
  for impl in ('blockwise', 'xla'):
    cfg = TransformerConfig.preset('tiny', max_len=tokens, dropout_rate=0.0, attention_impl=impl)
    model = GPT(cfg)
    x = jnp.ones((1, tokens), jnp.int32)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), x[:, :8]))['params'])

    def loss(params, x):
      logits = model.apply({'params': params}, x)
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 1])
    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    entry = result[impl] = {'temp_bytes': compiled.memory_analysis().temp_size_in_bytes}
    if impl == 'blockwise':
      real = nn.unbox(model.init(jax.random.key(0), x[:, :8]))['params']
      start = time.perf_counter()
      grads = jax.block_until_ready(compiled(real, x))
      entry['seconds'] = time.perf_counter() - start
      entry['finite'] = bool(all(np.isfinite(np.asarray(g)).all()
                                 for g in jax.tree.leaves(grads)))
  return result


# ----------------------------------------------------------------------------------------------
# Reporting.

def plot(rows, path, device=None):
  """Causal forward+backward of the first head_dim, float32 if measured (else the first dtype):
  time and memory against length. `device`: the title's (default: this machine's)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  if not rows:
    return
  dtype = 'float32' if any(r['dtype'] == 'float32' for r in rows) else rows[0]['dtype']
  selected = [r for r in rows if r['dtype'] == dtype and r['mode'] == 'fwd+bwd'
              and r['causal'] and r['head_dim'] == rows[0]['head_dim']]
  if not selected:
    return
  fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
  names = list(dict.fromkeys(n for r in selected for n in r['backends']))
  for name in names:
    pts = [(r['length'], r['backends'].get(name, {}).get('seconds')) for r in selected]
    pts = [(t, s) for t, s in pts if s is not None]
    if pts:
      ax_time.plot(*zip(*pts), marker='o', label=name)
    mem = [(r['length'], r['backends'].get(name, {}).get('temp_bytes')) for r in selected]
    mem = [(t, m / 2**20) for t, m in mem if m]
    if mem:
      ax_mem.plot(*zip(*mem), marker='o', label=name)
  for ax, label in ((ax_time, 'seconds (median)'), (ax_mem, 'temporary memory (MiB)')):
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('sequence length T = S')
    ax.set_ylabel(label)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  h = selected[0]['head_dim']
  fig.suptitle(f'causal attention forward+backward, {dtype}, B=1, N=8, H={h} '
               f'({device or device_name()})')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def markdown_table(rows, dtype=None, mode='fwd+bwd', causal=True) -> str:
  """The README's table: ms per call and the ratio of torch's time to ours (>1: we are faster).
  `dtype` None: float32 if measured, else the first dtype."""
  if dtype is None and rows:
    dtype = 'float32' if any(r['dtype'] == 'float32' for r in rows) else rows[0]['dtype']
  selected = [r for r in rows if r['dtype'] == dtype and r['mode'] == mode
              and r['causal'] == causal]
  names = [n for n in dict.fromkeys(n for r in selected for n in r['backends'])]
  lines = ['| T | ' + ' | '.join(names) + ' | best of ours vs torch |',
           '|---' * (len(names) + 2) + '|']
  for r in selected:
    b = r['backends']
    cells = [f'{b[n]["seconds"] * 1e3:,.1f}' if 'seconds' in b.get(n, {}) else '-' for n in names]
    ours = [b[n]['seconds'] for n in ('xla', 'blockwise', 'cudnn', 'pallas')
            if 'seconds' in b.get(n, {})]
    ratio = (f'{b["torch"]["seconds"] / min(ours):.2f}x' if ours and 'seconds' in
             b.get('torch', {}) else '-')
    lines.append(f'| {r["length"]} | ' + ' | '.join(cells) + f' | {ratio} |')
  return '\n'.join(lines)


def crossovers(rows) -> dict:
  """Per (dtype, mode, causal): the shortest length from which blockwise beats xla at every
  measured length (the threshold `implementation=None` uses), or None."""
  out = {}
  for key in dict.fromkeys((r['dtype'], r['mode'], r['causal']) for r in rows):
    series = [r for r in rows if (r['dtype'], r['mode'], r['causal']) == key
              and all('seconds' in r['backends'].get(n, {}) for n in ('xla', 'blockwise'))]
    wins = [r['backends']['blockwise']['seconds'] < r['backends']['xla']['seconds']
            for r in series]
    first = next((i for i in range(len(wins)) if all(wins[i:])), None)
    out[f'{key[0]} {key[1]} {"causal" if key[2] else "full"}'] = (
        None if first is None else series[first]['length'])
  return out


def versions(torch_label) -> dict:
  device = jax.devices()[0]
  return {'device': device_name(), 'device_kind': device.device_kind, 'platform': device.platform,
          'jax': jax.__version__, 'flax': flax.__version__, 'torch': torch_label,
          'python': platform.python_version(), 'machine': platform.machine(),
          'cpu_count': os.cpu_count()}


def main(argv=None):
  args = parse_args(argv)
  head_dims = args.head_dims or ([64, 128] if jax.default_backend() == 'gpu' else [64])
  torch_info = torch_sdpa()
  torch_setup, torch_label = torch_info if torch_info else (None, None)
  out = args.out or RESULTS / f'attention-{device_name()}.json'
  out.parent.mkdir(parents=True, exist_ok=True)
  rows = []

  def write(**extra):  # after every length too, so that a run cut short keeps what it measured
    result = {'config': vars(args) | {'out': None}, 'versions': versions(torch_label),
              'rows': rows, 'blockwise_faster_from': crossovers(rows), **extra}
    out.write_text(json.dumps(result, indent=1, default=str))
    return result

  for h in head_dims:
    for dtype in args.dtypes:
      for mode in args.modes:
        for causal in args.causal:
          benchmark_series(args, h, dtype, mode, causal == 'causal', torch_setup,
                           on_row=lambda row: (rows.append(row), write(complete=False)))
  result = write(complete=True)
  print('blockwise beats xla from length:', json.dumps(result['blockwise_faster_from']))
  if jax.default_backend() == 'cpu' or max(args.lengths) >= 32768:
    result = write(complete=True, gpt_32k=gpt_long(32768))
    print('GPT fwd+bwd at 32768 tokens:', json.dumps(result['gpt_32k']))
  plot(rows, out.with_suffix('.png'))
  print(markdown_table(rows))
  print(f'wrote {out} and {out.with_suffix(".png")}')


if __name__ == '__main__':
  main()
