"""python -m benchmarks.train_step: one training step of our GPT or Transformer next to PyTorch.

    python -m benchmarks.train_step [--model gpt|transformer] [--preset NAME] [--seq-len T]
        [--batch B] [--dtype float32|bfloat16] [--remat none|full|dots_saveable]
        [--attention-impl xla|blockwise|cudnn|pallas]
        [--torch-compile | --no-torch-compile] [--steps 12] [--rounds-of 3] [--quick] [--out DIR]

A step is forward + backward + AdamW, ours jitted with its state donated and timed until the
loss is ready, next to the PyTorch peer built from the same config (benchmarks/torch_peers.py:
nanoGPT, `torch.nn.Transformer`), in turns in one process after a warm-up; the median step is
reported. Without torch only ours runs. `--model transformer` is vaswani-base scaled down for
CPU (3+3 layers, D=256, F=1024, S=T=64, B=16, V=1000), loss over every target token; torch's
stack-final LayerNorms are removed (ours has none under post-norm), other differences, none in
parameters or FLOPs, are listed in torch_peers.
`--dtype bfloat16`: bf16 compute, float32 weights and loss (the peer under `torch.autocast`);
`--remat`: our config's policy, mirrored by torch checkpointing; `--preset`: e.g. gpt2-small;
`--attention-impl`: our config's attention backend (default: chosen per call, see `explain`).
MFU = model FLOPs (`flops_per_token`, `transformer_flops_per_step`; recomputation not counted) per
second over the published dense peak of a GPU in `PUBLISHED_PEAKS`, else over the best matmul
measured in the run's dtype. On GPU the peer runs on cuda under `torch.compile`.
Writes results/train_step[-transformer][-PRESET][-bfloat16][-remat-P][-attention-I]-<device>.json
and .png.
"""

from __future__ import annotations

import argparse
import json
import os
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
from flaxformer_lite import GPT, PRESETS, Transformer, TransformerConfig
from flaxformer_lite.config import ATTENTION_IMPLS

RESULTS = pathlib.Path(__file__).parent / 'results'
SHAPES = {  # n_layer: decoder layers (gpt); encoder layers = decoder layers (transformer)
    ('gpt', 'full'): dict(n_layer=6, n_head=6, d_model=384, seq_len=256, batch=8, vocab=256),
    ('gpt', 'quick'): dict(n_layer=2, n_head=4, d_model=64, seq_len=32, batch=2, vocab=256),
    ('transformer', 'full'): dict(n_layer=3, n_head=4, d_model=256, d_ff=1024, src_len=64,
                                  seq_len=64, batch=16, vocab=1000),
    ('transformer', 'quick'): dict(n_layer=1, n_head=2, d_model=32, d_ff=64, src_len=16,
                                   seq_len=16, batch=2, vocab=64),
}
ADAMW = dict(lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
# Published dense (no sparsity) peaks in TFLOP/s from NVIDIA's data sheets, matched in this order
# as substrings of `jax.devices()[0].device_kind` ('NVIDIA H100 80GB HBM3' is the SXM part).
PUBLISHED_PEAKS = {
    'H200': dict(bfloat16=989.4, tf32=494.7, float32=66.9),
    'H100 PCIe': dict(bfloat16=756.0, tf32=378.0, float32=51.2),
    'H100 NVL': dict(bfloat16=835.0, tf32=417.5, float32=60.0),
    'H100': dict(bfloat16=989.4, tf32=494.7, float32=66.9),
    'A100': dict(bfloat16=312.0, tf32=156.0, float32=19.5),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', choices=('gpt', 'transformer'), default='gpt')
  p.add_argument('--preset', choices=sorted(PRESETS), default=None,
                 help='take the model from a preset (e.g. gpt2-small) instead of the CPU shape')
  p.add_argument('--seq-len', type=int, default=None, help='T (and S for the transformer)')
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                 help='compute dtype; parameters stay float32')
  p.add_argument('--remat', choices=('none', 'full', 'dots_saveable'), default='none')
  p.add_argument('--attention-impl', choices=[i for i in ATTENTION_IMPLS if i], default=None,
                 help="our attention backend (default: chosen per call, e.g. 'cudnn' for "
                      'bfloat16 on an NVIDIA GPU)')
  p.add_argument('--torch-compile', action=argparse.BooleanOptionalAction, default=None,
                 help='torch.compile the peer (default: on when it runs on cuda)')
  p.add_argument('--steps', type=int, default=None,
                 help='timed steps of each (default 12; 2 quick)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps of each, after compiling')
  p.add_argument('--rounds-of', type=int, default=3, help='steps of one before switching')
  p.add_argument('--quick', action='store_true', help='a tiny config, for smoke tests')
  p.add_argument('--out', type=pathlib.Path, default=None,
                 help='directory (default results/; the temp dir with --quick)')
  args = p.parse_args(argv)
  for name in ('seq_len', 'batch', 'steps'):
    if getattr(args, name) is not None and getattr(args, name) <= 0:
      p.error(f'--{name.replace("_", "-")}={getattr(args, name)} must be positive')
  return args


def bench_shape(args) -> dict:
  """The model/data shape from the flags: `model`, `batch`, `seq_len` (+ `src_len`), dims or
  `preset` (a preset's default length is its max_len)."""
  shape = dict(SHAPES[args.model, 'quick' if args.quick else 'full'], model=args.model)
  if args.preset:
    shape = dict(model=args.model, preset=args.preset, batch=shape['batch'],
                 seq_len=shape['seq_len'] if args.quick else PRESETS[args.preset]['max_len'])
  shape['batch'] = args.batch or shape['batch']
  shape['seq_len'] = args.seq_len or shape['seq_len']
  if args.model == 'transformer':
    shape['src_len'] = args.seq_len or shape.get('src_len', shape['seq_len'])
  return shape


def model_config(shape: dict, dtype='float32', remat='none',
                 attention_impl=None) -> TransformerConfig:
  """Our config for `shape` (dropout 0; compute `dtype`, float32 parameters)."""
  common = dict(dropout_rate=0.0, dtype=jnp.dtype(dtype), param_dtype=jnp.float32, remat=remat,
                attention_impl=attention_impl)
  max_len = max(shape['seq_len'], shape.get('src_len', 0))
  if shape.get('preset'):
    cfg = TransformerConfig.preset(shape['preset'], **common)
    return cfg.replace(max_len=max(cfg.max_len, max_len))
  dims = dict(vocab_size=shape['vocab'], d_model=shape['d_model'], num_heads=shape['n_head'],
              d_ff=shape.get('d_ff', 4 * shape['d_model']), max_len=max_len)
  if shape['model'] == 'transformer':
    return TransformerConfig.preset('vaswani-base', num_encoder_layers=shape['n_layer'],
                                    num_decoder_layers=shape['n_layer'], **dims, **common)
  return TransformerConfig(
      num_encoder_layers=0, num_decoder_layers=shape['n_layer'], activation='gelu_tanh',
      norm='layernorm', norm_position='pre', positions='learned', use_bias=False,
      tie_embeddings=True, init_std=0.02, **dims, **common)


def batch_data(cfg: TransformerConfig, shape: dict, seed=0) -> tuple:
  """Random tokens in [1, V) (0 is our pad id): gpt (x, y) `[B, T]`; transformer (src `[B, S]`,
  decoder input `[B, T]`, labels `[B, T]`)."""
  rng = np.random.default_rng(seed)
  draw = lambda length: rng.integers(1, cfg.vocab_size, (shape['batch'], length))
  if shape['model'] == 'transformer':
    return draw(shape['src_len']), draw(shape['seq_len']), draw(shape['seq_len'])
  return draw(shape['seq_len']), draw(shape['seq_len'])


def our_model(cfg: TransformerConfig, shape: dict) -> nn.Module:
  return Transformer(cfg) if shape['model'] == 'transformer' else GPT(cfg)


# ----------------------------------------------------------------------------------------------
# Model FLOPs.

def count_params(params, exclude=('positions',)) -> int:
  """Parameters of a Flax tree, leaving out subtrees named in `exclude` (the position table)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(int(np.prod(leaf.shape)) for path, leaf in flat
             if not any(getattr(k, 'key', None) in exclude for k in path))


def flops_per_token(n_params: int, n_layer: int, seq_len: int, d_model: int) -> int:
  """GPT: 6*N + 12*L*T*D; N without position embeddings; the second term is QK^T and AV."""
  return 6 * n_params + 12 * n_layer * seq_len * d_model


def transformer_flops_per_step(n_encoder: int, n_decoder: int, n_output: int, *, enc_layers,
                               dec_layers, src_len, tgt_len, d_model, batch) -> int:
  """6*(N_enc*B*S + (N_dec + V*D)*B*T) + 12*(Le*S*S + Ld*T*T + Ld*T*S)*D*B.

  n_encoder/n_decoder: the layer stacks' parameters (norms and biases included); n_output: the
  output projection V*D (the embedding lookups cost no FLOPs). The attention term is QK^T and AV
  of encoder self-, decoder self- and cross-attention, forward and backward.
  """
  B, S, T, D = batch, src_len, tgt_len, d_model
  dense = 6 * (n_encoder * B * S + (n_decoder + n_output) * B * T)
  return dense + 12 * (enc_layers * S * S + dec_layers * T * T + dec_layers * T * S) * D * B


def model_flops(cfg: TransformerConfig, shape: dict) -> dict:
  """FLOPs of one training step, from our model's parameter shapes (nothing is computed)."""
  inputs = [jnp.asarray(a, jnp.int32) for a in batch_data(cfg, shape)[:-1]]
  params = nn.unbox(jax.eval_shape(our_model(cfg, shape).init, jax.random.key(0), *inputs))
  params = params['params']
  B, T, D = shape['batch'], shape['seq_len'], cfg.d_model
  if shape['model'] == 'gpt':
    n = count_params(params)
    return dict(flops_per_step=B * T * flops_per_token(n, cfg.num_decoder_layers, T, D),
                n_params=n, convention='6*N + 12*L*T*D per token; N = all parameters except '
                'position embeddings (tied token embedding counted once)')
  parts = dict(n_encoder=count_params(params['encoder']), n_decoder=count_params(params['decoder']),
               n_output=cfg.vocab_size * D)
  flops = transformer_flops_per_step(
      **parts, enc_layers=cfg.num_encoder_layers, dec_layers=cfg.num_decoder_layers,
      src_len=shape['src_len'], tgt_len=T, d_model=D, batch=B)
  return dict(flops_per_step=flops, n_params=count_params(params), **parts,
              convention='6*(N_enc*B*S + N_dec*B*T + V*D*B*T) + 12*(Le*S*S + Ld*T*T + Ld*T*S)*D*B '
                         'per step; N_enc/N_dec = encoder/decoder layer parameters')


# ----------------------------------------------------------------------------------------------
# Trainers: dict(run=step returning the loss as a float, n_params, param_dtypes=callable).

def jax_trainer(cfg: TransformerConfig, shape: dict) -> dict:
  """Ours + optax.adamw, one jitted step with (params, optimizer state) donated."""
  model = our_model(cfg, shape)
  *inputs, labels = (jnp.asarray(a, jnp.int32) for a in batch_data(cfg, shape))
  params = nn.unbox(model.init(jax.random.key(0), *inputs)['params'])
  tx = optax.adamw(ADAMW['lr'], b1=ADAMW['b1'], b2=ADAMW['b2'], eps=ADAMW['eps'],
                   weight_decay=ADAMW['weight_decay'])

  def loss_fn(params, inputs, labels):
    logits = model.apply({'params': params}, *inputs).astype(jnp.float32)  # [B, T, V]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(state, inputs, labels):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  step = jax.jit(step, donate_argnums=0)
  holder = {'state': (params, tx.init(params))}

  def run():
    holder['state'], loss = step(holder['state'], inputs, labels)
    return float(jax.block_until_ready(loss))

  def param_dtypes():
    return sorted({jnp.dtype(p.dtype).name for p in jax.tree.leaves(holder['state'][0])})
  return dict(run=run, n_params=count_params(params), param_dtypes=param_dtypes)


def torch_trainer(cfg: TransformerConfig, shape: dict, compile=None) -> dict | None:
  """The PyTorch peer (benchmarks/torch_peers.py); None when torch is not installed."""
  try:
    from benchmarks import torch_peers
  except ImportError:
    return None
  return torch_peers.trainer(cfg, shape['model'], batch_data(cfg, shape), ADAMW,
                             device=torch_peers.device_for(jax.devices()[0].platform),
                             compile=compile)


# ----------------------------------------------------------------------------------------------
# Measuring.

def best_gflops(matmul, n: int, repeats: int = 4) -> float:
  """Best-of-`repeats` GFLOP/s of `matmul()`: one n x n @ n x n product, returning when done."""
  matmul()  # compile / allocate
  best = 0.0
  for _ in range(repeats):
    start = time.perf_counter()
    matmul()
    best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
  return best


def peak_gflops(n=2048, dtype='float32', repeats=4) -> dict:
  """Measured matmul GFLOP/s of `dtype`, in JAX and (if installed) torch."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  matmul = jax.jit(jnp.matmul)
  out = {'jax': best_gflops(lambda: jax.block_until_ready(matmul(a, a)), n, repeats)}
  try:
    from benchmarks import torch_peers
  except ImportError:
    return out
  device = torch_peers.device_for(jax.devices()[0].platform)
  out['torch'] = best_gflops(torch_peers.matmul(n, dtype, device), n, repeats)
  return out


def published_key(device_kind: str) -> str | None:
  """The first `PUBLISHED_PEAKS` key contained in `device_kind` (case-insensitive), or None."""
  return next((k for k in PUBLISHED_PEAKS if k.lower() in device_kind.lower()), None)


def peak_for_run(dtype: str, n: int, before: dict) -> dict:
  """The peak MFU divides by: a published one for this GPU, else the measured matmul peak.

  `before`: `peak_gflops` taken before the steps; measured again now, the best of both is kept
  (on a shared machine one burst of someone else's load would otherwise halve the peak).
  """
  kind = jax.devices()[0].device_kind
  measured = {k: max(v, before[k]) for k, v in peak_gflops(n, dtype).items()}
  key = published_key(kind)
  column = 'bfloat16' if dtype == 'bfloat16' else 'tf32'  # f32 dots run as TF32 there by default
  if key:
    gflops = PUBLISHED_PEAKS[key][column] * 1e3
    method = f'published dense {column} peak of {key} ({kind}): {gflops / 1e3} TFLOP/s'
  else:
    gflops = max(measured.values())
    method = (f'measured: best of 2x4 {dtype} {n}^2 matmuls (before and after the steps) in '
              f'{" and ".join(measured)} ({kind})')
  return dict(gflops=gflops, method=method, measured_gflops=measured, table_tflops=PUBLISHED_PEAKS)


def time_in_turns(runs: dict, steps: int, warmup: int, rounds_of: int) -> tuple:
  """Each `runs[name]()` once (compile) + `warmup` times, then `steps` timed calls of each in
  turns of `rounds_of`. -> (first-call seconds, losses, step seconds), each a dict by name."""
  first, losses = {}, {}
  for name, run in runs.items():
    start = time.perf_counter()
    losses[name] = [run()]  # compile (JAX, torch.compile) / allocate
    first[name] = time.perf_counter() - start
    losses[name] += [run() for _ in range(warmup)]
  times = {name: [] for name in runs}
  while any(len(ts) < steps for ts in times.values()):
    for name, run in runs.items():
      for _ in range(min(rounds_of, steps - len(times[name]))):
        start = time.perf_counter()
        losses[name].append(run())
        times[name].append(time.perf_counter() - start)
  return first, losses, times


def measure(shape: dict, steps: int, warmup: int = 2, rounds_of: int = 3, *, dtype='float32',
            remat='none', torch_compile=None, attention_impl=None) -> dict:
  """Ours and the peer, timed in turns. -> name -> result dict (tokens/s are target tokens)."""
  cfg = model_config(shape, dtype, remat, attention_impl)
  trainers = {'ours (jax)': jax_trainer(cfg, shape)}
  peer = torch_trainer(cfg, shape, torch_compile)
  if peer:
    trainers['torch'] = peer
  first, losses, times = time_in_turns({k: t['run'] for k, t in trainers.items()}, steps, warmup,
                                       rounds_of)
  tgt_tokens = shape['batch'] * shape['seq_len']
  all_tokens = shape['batch'] * (shape.get('src_len', 0) + shape['seq_len'])
  results = {}
  for name, t in trainers.items():
    step_s = statistics.median(times[name])
    results[name] = dict(step_ms=step_s * 1e3, tokens_per_s=tgt_tokens / step_s,
                         n_params=t['n_params'], param_dtypes=t['param_dtypes'](),
                         first_step_s=first[name], steps=len(times[name]),
                         step_ms_all=[s * 1e3 for s in times[name]],
                         loss_first=losses[name][0], loss_last=losses[name][-1])
    if shape['model'] == 'transformer':
      results[name]['src_tgt_tokens_per_s'] = all_tokens / step_s
    if name == 'torch':
      results[name].update(device=t['device'], torch_compile=t['compile'])
  return results


# ----------------------------------------------------------------------------------------------
# Reporting.

def add_mfu(results: dict, flops_per_step: int, peak_gflops: float) -> None:
  for r in results.values():
    r['flops_per_step'] = flops_per_step
    r['achieved_gflops'] = flops_per_step / (r['step_ms'] / 1e3) / 1e9
    r['mfu'] = r['achieved_gflops'] / peak_gflops


def table(results: dict) -> str:
  seq2seq = 'src_tgt_tokens_per_s' in results['ours (jax)']
  ours = results['ours (jax)']['tokens_per_s']
  extra = ' (src+tgt) tokens/s |' if seq2seq else ''
  lines = [f'| framework | {"target " if seq2seq else ""}tokens/s |{extra} step ms | GFLOP/s | '
           'MFU | ours / this (tokens/s) |', '|---|---|' + '---|' * (5 if seq2seq else 4)]
  for name, r in results.items():
    both = f' {r["src_tgt_tokens_per_s"]:,.0f} |' if seq2seq else ''
    lines.append(f'| {name} | {r["tokens_per_s"]:,.0f} |{both} {r["step_ms"]:,.1f} | '
                 f'{r["achieved_gflops"]:,.1f} | {r["mfu"]:.1%} | '
                 f'{ours / r["tokens_per_s"]:.2f}x |')
  return '\n'.join(lines)


def describe(shape: dict, cfg: TransformerConfig) -> str:
  """A one-line label, e.g. 'transformer 3+3 layers D=256 S=64 T=64 B=16 V=1000'."""
  seq2seq = shape['model'] == 'transformer'
  layers = f'{cfg.num_encoder_layers}+' * seq2seq + f'{cfg.num_decoder_layers}'
  return (f'{shape.get("preset") or shape["model"]} {layers} layers D={cfg.d_model} '
          + f'S={shape.get("src_len")} ' * seq2seq + f'T={shape["seq_len"]} B={shape["batch"]} '
          f'V={cfg.vocab_size}')


def plot(results: dict, title: str, path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = list(results)
  fig, ax = plt.subplots(figsize=(6, 4))
  bars = ax.bar(names, [results[n]['tokens_per_s'] for n in names], color=['C0', 'C1'][:len(names)])
  for bar, n in zip(bars, names):
    ax.annotate(f'{results[n]["tokens_per_s"]:,.0f}\nMFU {results[n]["mfu"]:.0%}',
                (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha='center', va='bottom')
  ax.set_ylabel('target tokens/s (median step)')
  ax.margins(y=0.2)
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def output_path(args, directory: pathlib.Path) -> pathlib.Path:
  """train_step[-transformer][-preset][-bfloat16][-remat-P][-attention-I]-<device>[-quick].json
  (options left at their defaults are not named: the default GPT run writes
  train_step-<device>.json)."""
  parts = [args.model == 'transformer' and 'transformer', args.preset,
           args.dtype != 'float32' and args.dtype, args.remat != 'none' and f'remat-{args.remat}',
           args.attention_impl and f'attention-{args.attention_impl}',
           device_name(), args.quick and 'quick']
  return directory / ('-'.join(['train_step'] + [p for p in parts if p]) + '.json')


def make_record(args, shape, cfg, steps, flops, peak, results) -> dict:
  """Everything the JSON keeps: config, FLOPs, the peak and how it was found, versions, results."""
  try:
    import torch
    torch_label, threads = torch.__version__, torch.get_num_threads()
  except ImportError:
    torch_label, threads = None, None
  device = jax.devices()[0]
  ratio = {}
  if 'torch' in results:
    ratio['ratio_ours_over_torch'] = (results['ours (jax)']['tokens_per_s']
                                      / results['torch']['tokens_per_s'])
  return {
      'config': dict(shape, steps=steps, warmup=args.warmup, rounds_of=args.rounds_of,
                     quick=args.quick, adamw=ADAMW, dtype=args.dtype, param_dtype='float32',
                     remat=args.remat, model_config=cfg.to_dict()),
      'flops': flops, 'peak_gflops': peak['gflops'], 'peak': peak,
      'gpu': ('not measured in this run (no GPU lent; platform cpu)' if device.platform == 'cpu'
              else f'measured on {device.device_kind}'),
      'versions': versions(torch_label) | {'torch_threads': threads},
      'results': results | ratio}


def main(argv=None):
  args = parse_args(argv)
  # Both frameworks share one GPU: JAX allocates as it goes instead of taking 75% up front
  # (read when JAX first starts its backend, just below).
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  shape = bench_shape(args)
  cfg = model_config(shape, args.dtype, args.remat, args.attention_impl)
  steps = args.steps or (2 if args.quick else 12)
  gpu = jax.devices()[0].platform == 'gpu'
  n = 512 if args.quick else 8192 if gpu else 2048  # the peak's matmul size
  before = peak_gflops(n, args.dtype)
  results = measure(shape, steps, 1 if args.quick else args.warmup, args.rounds_of,
                    dtype=args.dtype, remat=args.remat, torch_compile=args.torch_compile,
                    attention_impl=args.attention_impl)
  peak = peak_for_run(args.dtype, n, before)
  flops = model_flops(cfg, shape)
  add_mfu(results, flops['flops_per_step'], peak['gflops'])
  record = make_record(args, shape, cfg, steps, flops, peak, results)
  out = output_path(args, args.out or (pathlib.Path(tempfile.gettempdir()) if args.quick
                                       else RESULTS))  # quick runs keep results/ real
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=1, default=str))
  label = f'{args.dtype} compute / float32 params, remat {args.remat}'
  plot(results, f'train step: {describe(shape, cfg)}\n{label}; {device_name()}, peak '
       f'{peak["gflops"]:,.0f} GFLOP/s', out.with_suffix('.png'))
  measured = {k: round(v, 1) for k, v in peak['measured_gflops'].items()}
  print(f'{describe(shape, cfg)}, {label}\n'
        f'peak {peak["gflops"]:,.1f} GFLOP/s ({peak["method"]}; measured {measured})')
  print(f'FLOPs/step {flops["flops_per_step"]:,} = {flops["convention"]} '
        f'(N={flops["n_params"]:,}, no position table)')
  print(table(results))
  print(f'gpu: {record["gpu"]}\nwrote {out} and {out.with_suffix(".png")}')
  return record


if __name__ == '__main__':
  main()
