"""python -m benchmarks.compile_time: how long a GPT training step takes to compile, with and
without `scan_layers`, as the depth grows.

    python -m benchmarks.compile_time [--preset gpt2-small] [--layers 12 24] [--seq-len 1024]

Each configuration is lowered and compiled once (`jax.jit(step).lower(...).compile()`, abstract
arguments: nothing is allocated or run) in a fresh compilation cache; the figure is wall time.
Under `nn.scan` XLA compiles one layer and loops over it, so its time should not grow with depth.
Writes benchmarks/results/compile_time-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from benchmarks.attention import device_name, versions
from flaxformer_lite import GPT, TransformerConfig

RESULTS = pathlib.Path(__file__).parent / 'results'


def train_step(cfg: TransformerConfig, batch: int, seq_len: int):
  """(jitted AdamW step of GPT(cfg), its abstract (params, opt_state, tokens [B, T + 1]))."""
  model, tx = GPT(cfg), optax.adamw(3e-4)
  tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)  # inputs and shifted targets
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.ones(
      (1, seq_len), jnp.int32))['params']))
  opt_state = jax.eval_shape(tx.init, params)

  def step(params, opt_state, tokens):
    def loss_fn(params):
      logits = model.apply({'params': params}, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1)), (params, opt_state, tokens)


def compile_seconds(cfg: TransformerConfig, batch: int, seq_len: int) -> float:
  """Wall seconds to lower and compile `train_step` (a fresh compilation cache each time)."""
  step, args = train_step(cfg, batch, seq_len)
  jax.clear_caches()
  start = time.perf_counter()
  step.lower(*args).compile()
  return time.perf_counter() - start


def main(argv=None):
  p = argparse.ArgumentParser(prog='python -m benchmarks.compile_time', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', default='gpt2-small')
  p.add_argument('--layers', type=int, nargs='+', default=[12, 24])
  p.add_argument('--seq-len', type=int, default=1024)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--out', default=str(RESULTS))
  args = p.parse_args(argv)
  rows = []
  for layers in args.layers:
    for scan in (False, True):
      cfg = TransformerConfig.preset(args.preset, num_decoder_layers=layers, scan_layers=scan,
                                     dropout_rate=0.0)
      seconds = compile_seconds(cfg, args.batch, args.seq_len)
      rows.append({'layers': layers, 'scan_layers': scan, 'compile_s': seconds})
      print(f'{args.preset} layers={layers:3d} scan_layers={scan!s:5}: {seconds:6.1f} s')
  out = pathlib.Path(args.out) / f'compile_time-{device_name()}.json'
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'preset': args.preset, 'seq_len': args.seq_len, 'batch': args.batch,
                             'versions': versions(None), 'rows': rows},
                            indent=2) + '\n')
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
