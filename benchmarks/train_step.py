"""python -m benchmarks.train_step: one full training step of our GPT next to a PyTorch nanoGPT.

    python -m benchmarks.train_step [--steps 12] [--rounds-of 3] [--quick] [--out DIR]

A step is forward + backward + AdamW update. Ours: `GPT` from `TransformerConfig` fields, the step
`jax.jit`-compiled with the (params, optimizer state) argument donated, timed until its loss is
ready (`block_until_ready`, the only host sync). Peer: the same architecture written here in
PyTorch, nanoGPT style (fused qkv `nn.Linear`, `scaled_dot_product_attention(is_causal=True)`,
LayerNorm without bias, tanh-GELU MLP, tied embeddings, `torch.optim.AdamW` with the same
hyperparameters), float32, torch's default thread count. Both run in turns in the same process
(`--rounds-of` steps of one, then of the other) after a warm-up, so they share the machine's load;
the median step is reported.

Model FLOPs per token: 6*N + 12*L*T*D (PaLM / nanoGPT's `estimate_mfu`), with N = all parameters
except the position embeddings (the tied token embedding counts once, as the output projection).
MFU divides the achieved FLOP/s by the peak measured in the same run: the best of a few float32
2048x2048 @ 2048x2048 matmuls, in JAX and in torch; the higher of the two is the peak.
Writes benchmarks/results/train_step-<device>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.attention import device_name, versions
from flaxformer_lite import GPT, TransformerConfig

RESULTS = pathlib.Path(__file__).parent / 'results'
FULL = dict(n_layer=6, n_head=6, d_model=384, seq_len=256, batch=8, vocab=256)
QUICK = dict(n_layer=2, n_head=4, d_model=64, seq_len=32, batch=2, vocab=256)
ADAMW = dict(lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--steps', type=int, default=None, help='timed steps of each (default 12; 2 quick)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps of each, after compiling')
  p.add_argument('--rounds-of', type=int, default=3, help='steps of one before switching')
  p.add_argument('--quick', action='store_true', help='a tiny config, for smoke tests')
  p.add_argument('--out', type=pathlib.Path, default=None,
                 help='directory (default results/; the temp dir with --quick)')
  return p.parse_args(argv)


def model_config(shape: dict) -> TransformerConfig:
  return TransformerConfig(
      vocab_size=shape['vocab'], d_model=shape['d_model'], num_heads=shape['n_head'],
      num_encoder_layers=0, num_decoder_layers=shape['n_layer'], d_ff=4 * shape['d_model'],
      activation='gelu_tanh', norm='layernorm', norm_position='pre', positions='learned',
      max_len=shape['seq_len'], dropout_rate=0.0, use_bias=False, tie_embeddings=True,
      init_std=0.02, dtype=jnp.float32, param_dtype=jnp.float32)


def flops_per_token(n_params: int, shape: dict) -> int:
  """6*N + 12*L*T*D: N without position embeddings; the second term is attention's QK^T and AV."""
  return 6 * n_params + 12 * shape['n_layer'] * shape['seq_len'] * shape['d_model']


def count_params(params, exclude=('positions',)) -> int:
  """Parameters of a Flax tree, leaving out subtrees named in `exclude` (the position table)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(int(np.prod(leaf.shape)) for path, leaf in flat
             if not any(getattr(k, 'key', None) in exclude for k in path))


def batch_data(shape: dict, seed=0):
  """Random tokens in [1, vocab): 0 is our pad id, which would change nothing but the mask."""
  rng = np.random.default_rng(seed)
  size = (shape['batch'], shape['seq_len'])
  return rng.integers(1, shape['vocab'], size), rng.integers(1, shape['vocab'], size)


# ----------------------------------------------------------------------------------------------
# Ours: GPT + optax.adamw, one jitted, donated step.

def jax_trainer(shape: dict):
  """-> (step callable returning the loss as a float, non-position parameter count)."""
  cfg = model_config(shape)
  model = GPT(cfg)
  x, y = (jnp.asarray(a, jnp.int32) for a in batch_data(shape))
  params = nn.unbox(model.init(jax.random.key(0), x)['params'])
  tx = optax.adamw(ADAMW['lr'], b1=ADAMW['b1'], b2=ADAMW['b2'], eps=ADAMW['eps'],
                   weight_decay=ADAMW['weight_decay'])

  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(state, x, y):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  step = jax.jit(step, donate_argnums=0)
  holder = {'state': (params, tx.init(params))}

  def run():
    holder['state'], loss = step(holder['state'], x, y)
    return float(jax.block_until_ready(loss))
  return run, count_params(params)


# ----------------------------------------------------------------------------------------------
# Peer: nanoGPT in PyTorch.

def torch_trainer(shape: dict):
  """-> (step callable returning the loss as a float, non-position parameter count)."""
  import torch
  import torch.nn.functional as F
  from torch import nn as tnn
  torch.manual_seed(0)
  d, h = shape['d_model'], shape['n_head']

  class Block(tnn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1, self.ln_2 = tnn.LayerNorm(d, bias=False), tnn.LayerNorm(d, bias=False)
      self.c_attn, self.c_proj = tnn.Linear(d, 3 * d, bias=False), tnn.Linear(d, d, bias=False)
      self.mlp = tnn.Sequential(tnn.Linear(d, 4 * d, bias=False), tnn.GELU(approximate='tanh'),
                                tnn.Linear(4 * d, d, bias=False))

    def forward(self, x):
      b, t, _ = x.shape
      q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
      q, k, v = (a.view(b, t, h, d // h).transpose(1, 2) for a in (q, k, v))
      att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.c_proj(att.transpose(1, 2).contiguous().view(b, t, d))
      return x + self.mlp(self.ln_2(x))

  class NanoGPT(tnn.Module):
    def __init__(self):
      super().__init__()
      self.wte = tnn.Embedding(shape['vocab'], d)
      self.wpe = tnn.Embedding(shape['seq_len'], d)
      self.blocks = tnn.ModuleList(Block() for _ in range(shape['n_layer']))
      self.ln_f = tnn.LayerNorm(d, bias=False)

    def forward(self, idx):
      x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
      for block in self.blocks:
        x = block(x)
      return self.ln_f(x) @ self.wte.weight.T  # tied output projection

  model = NanoGPT()
  for p in model.parameters():  # nanoGPT's init: N(0, 0.02) weights, ones for the norms
    if p.dim() > 1:
      tnn.init.normal_(p, std=0.02)
  opt = torch.optim.AdamW(model.parameters(), lr=ADAMW['lr'], betas=(ADAMW['b1'], ADAMW['b2']),
                          eps=ADAMW['eps'], weight_decay=ADAMW['weight_decay'])
  x, y = (torch.as_tensor(a, dtype=torch.long) for a in batch_data(shape))

  def run():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x).view(-1, shape['vocab']), y.view(-1))
    loss.backward()
    opt.step()
    return loss.item()
  n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith('wpe'))
  return run, n


# ----------------------------------------------------------------------------------------------
# Measuring.

def peak_gflops(n=2048, repeats=4) -> dict:
  """Best-of-`repeats` GFLOP/s of an n x n float32 matmul, in JAX and in torch."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, a))
  out = {'jax': 0.0}
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    out['jax'] = max(out['jax'], 2 * n**3 / (time.perf_counter() - start) / 1e9)
  try:
    import torch
    t = torch.randn(n, n)
    t @ t
    out['torch'] = 0.0
    for _ in range(repeats):
      start = time.perf_counter()
      t @ t
      out['torch'] = max(out['torch'], 2 * n**3 / (time.perf_counter() - start) / 1e9)
  except ImportError:
    pass
  return out


def measure(shape: dict, steps: int, warmup: int = 2, rounds_of: int = 3) -> dict:
  """Both trainers, warmed up, then timed in alternating rounds. -> name -> result dict."""
  trainers = {'ours (jax)': jax_trainer(shape)}
  try:
    trainers['torch'] = torch_trainer(shape)
  except ImportError:
    pass
  first, losses = {}, {}
  for name, (run, _) in trainers.items():
    start = time.perf_counter()
    losses[name] = [run()]  # compile (JAX) / allocate
    first[name] = time.perf_counter() - start
    losses[name] += [run() for _ in range(warmup)]
  times = {name: [] for name in trainers}
  while any(len(ts) < steps for ts in times.values()):
    for name, (run, _) in trainers.items():
      for _ in range(min(rounds_of, steps - len(times[name]))):
        start = time.perf_counter()
        losses[name].append(run())
        times[name].append(time.perf_counter() - start)
  tokens = shape['batch'] * shape['seq_len']
  results = {}
  for name, (_, n_params) in trainers.items():
    step_s = statistics.median(times[name])
    results[name] = dict(step_ms=step_s * 1e3, tokens_per_s=tokens / step_s, n_params=n_params,
                         first_step_s=first[name], steps=len(times[name]),
                         step_ms_all=[t * 1e3 for t in times[name]],
                         loss_first=losses[name][0], loss_last=losses[name][-1])
  return results


# ----------------------------------------------------------------------------------------------
# Reporting.

def add_mfu(results: dict, shape: dict, peak: float) -> None:
  for r in results.values():
    r['flops_per_token'] = flops_per_token(r['n_params'], shape)
    r['achieved_gflops'] = r['tokens_per_s'] * r['flops_per_token'] / 1e9
    r['mfu'] = r['achieved_gflops'] / peak


def table(results: dict) -> str:
  ours = results['ours (jax)']['tokens_per_s']
  lines = ['| framework | tokens/s | step ms | GFLOP/s | MFU | ours / this (tokens/s) |',
           '|---|---|---|---|---|---|']
  for name, r in results.items():
    lines.append(f'| {name} | {r["tokens_per_s"]:,.0f} | {r["step_ms"]:,.1f} | '
                 f'{r["achieved_gflops"]:,.1f} | {r["mfu"]:.1%} | '
                 f'{ours / r["tokens_per_s"]:.2f}x |')
  return '\n'.join(lines)


def plot(results: dict, peak: float, shape: dict, path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = list(results)
  fig, ax = plt.subplots(figsize=(6, 4))
  bars = ax.bar(names, [results[n]['tokens_per_s'] for n in names], color=['C0', 'C1'][:len(names)])
  for bar, n in zip(bars, names):
    ax.annotate(f'{results[n]["tokens_per_s"]:,.0f}\nMFU {results[n]["mfu"]:.0%}',
                (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha='center', va='bottom')
  ax.set_ylabel('tokens/s (median step)')
  ax.margins(y=0.2)
  ax.set_title(f'GPT train step L={shape["n_layer"]} D={shape["d_model"]} T={shape["seq_len"]} '
               f'B={shape["batch"]}, f32 ({device_name()}, peak {peak:.0f} GFLOP/s)', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  shape = QUICK if args.quick else FULL
  steps = args.steps or (2 if args.quick else 12)
  peaks = peak_gflops(512 if args.quick else 2048)
  peak = max(peaks.values())
  results = measure(shape, steps, 1 if args.quick else args.warmup, args.rounds_of)
  add_mfu(results, shape, peak)
  if 'torch' in results:
    results['ratio_ours_over_torch'] = (results['ours (jax)']['tokens_per_s']
                                        / results['torch']['tokens_per_s'])
  runs = {k: v for k, v in results.items() if isinstance(v, dict)}
  try:
    import torch
    torch_label, threads = torch.__version__, torch.get_num_threads()
  except ImportError:
    torch_label, threads = None, None
  default_dir = pathlib.Path(tempfile.gettempdir()) if args.quick else RESULTS  # keep results/ real
  out = (args.out or default_dir) / f'train_step-{device_name()}{"-quick" if args.quick else ""}.json'
  record = {
      'config': dict(shape, steps=steps, warmup=args.warmup, rounds_of=args.rounds_of,
                     quick=args.quick, adamw=ADAMW, dtype='float32',
                     model=model_config(shape).to_dict()),
      'flops_convention': '6*N + 12*L*T*D per token; N = all parameters except position '
                          'embeddings (tied token embedding counted once)',
      'peak_gflops': peak, 'peak_gflops_by_framework': peaks,
      'peak_method': f'best of 4 float32 {512 if args.quick else 2048}^2 matmuls',
      'versions': versions(torch_label) | {'torch_threads': threads}, 'results': results}
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=1, default=str))
  plot(runs, peak, shape, out.with_suffix('.png'))
  print(f'peak float32 matmul: {peak:.1f} GFLOP/s ({json.dumps(peaks)}); '
        f'FLOPs/token {runs["ours (jax)"]["flops_per_token"]:,} '
        f'(N={runs["ours (jax)"]["n_params"]:,}, no position embeddings)')
  print(table(runs))
  print(f'wrote {out} and {out.with_suffix(".png")}')
  return record


if __name__ == '__main__':
  main()
