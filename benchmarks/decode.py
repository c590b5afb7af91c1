"""python -m benchmarks.decode: greedy generation tokens/s, with and without the cache, vs transformers.

    python -m benchmarks.decode [--repeats 2] [--quick] [--out DIR]

For GPT (GPT-2 shape) and the encoder-decoder Transformer (Marian shape), prompt / source length
128, 128 new tokens, batch 1 and 32, greedy:
  - ours, cached: the public `flaxformer_lite.generate` (one compiled loop over the key/value
    cache). A warm-up call compiles; the best of `--repeats` later calls is timed, blocked on.
  - ours, uncached: full recompute. One jitted `lax.fori_loop` that re-runs the whole model
    (`model.apply`; for the Transformer encoder and decoder both) on a fixed buffer of prompt +
    new tokens each step and takes the argmax of the last real position. It is O(n^2), so it makes
    only `uncached_new` (16) tokens: its tokens/s is per token at that length, not over 128.
  - transformers: `generate(do_sample=False, num_beams=1, use_cache=True,
    min_new_tokens=max_new_tokens)` under `torch.no_grad()` on `GPT2LMHeadModel` / `MarianMTModel`
    built from configs with random weights, float32, torch's default thread count.
Shapes match between frameworks (scaled down to run in minutes on a small CPU); weights do not.
Every timing includes the prompt's prefill (GPT) or the source's encoding (Transformer).
tokens/s = batch * new tokens / seconds. Neither side may stop early: transformers has
min_new_tokens; ours has eos_id = vocab - 1 and the new tokens are checked (a row that ends pads
the rest; `steps` records how many columns the loop ran). Also: the Transformer's per-token time
against source length S (batch 1, cached), to see whether it is flat in S: all 128 tokens, and
the decode steps alone ((t(128 new) - t(1 new)) / 127, which takes the encoder out). And beam
search (the Transformer, 4 beams, batch 1 and 8, 64 new tokens): ours as shipped, where beams share
the cached cross-attention keys/values (`Decoder.beam_shared`), ours reordering every cache leaf
each step, and transformers `generate(num_beams=4)`.
Writes benchmarks/results/decode-<device>.json and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.attention import device_name, versions
from flaxformer_lite import GPT, Transformer, TransformerConfig, beam_search, generate

RESULTS = pathlib.Path(__file__).parent / 'results'
FULL = dict(gpt=dict(layers=6, heads=6, d_model=384, vocab=2048),
            transformer=dict(layers=6, heads=4, d_model=256, vocab=2048),
            prompt_len=128, new_tokens=128, uncached_new=16, batches=(1, 32),
            source_lens=(64, 256, 1024), beam=dict(beams=4, batches=(1, 8), new_tokens=64))
QUICK = dict(gpt=dict(layers=2, heads=2, d_model=32, vocab=128),
             transformer=dict(layers=2, heads=2, d_model=32, vocab=128),
             prompt_len=16, new_tokens=8, uncached_new=4, batches=(1, 2), source_lens=(16, 64),
             beam=dict(beams=2, batches=(1,), new_tokens=4))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--repeats', type=int, default=2, help='timed calls of each, after a warm-up')
  p.add_argument('--no-transformers', action='store_true', help='skip the Hugging Face peer')
  p.add_argument('--quick', action='store_true', help='a tiny config, for smoke tests')
  p.add_argument('--out', type=pathlib.Path, default=None,
                 help='directory (default results/; the temp dir with --quick)')
  return p.parse_args(argv)


def model_config(family: str, shape: dict, max_len: int) -> TransformerConfig:
  """GPT-2 (pre-norm, learned positions, gelu_tanh) or Marian (post-norm, sinusoidal, relu)."""
  common = dict(vocab_size=shape['vocab'], d_model=shape['d_model'], num_heads=shape['heads'],
                d_ff=4 * shape['d_model'], max_len=max_len, dropout_rate=0.0, use_bias=True,
                tie_embeddings=True, pad_id=0, bos_id=1, eos_id=shape['vocab'] - 1)
  if family == 'gpt':
    return TransformerConfig(**common, num_encoder_layers=0, num_decoder_layers=shape['layers'],
                             activation='gelu_tanh', norm_position='pre', positions='learned',
                             init_std=0.02)
  return TransformerConfig(**common, num_encoder_layers=shape['layers'],
                           num_decoder_layers=shape['layers'], activation='relu',
                           norm_position='post', positions='sinusoidal', scale_embeddings=True)


def build(family: str, cfg: TransformerConfig, batch: int, length: int, seed=0):
  """-> (model, variables, inputs [batch, length] int32 in [3, vocab - 1): no pad/bos/eos)."""
  inputs = jnp.asarray(np.random.default_rng(seed).integers(3, cfg.vocab_size - 1,
                                                            (batch, length)), jnp.int32)
  if family == 'gpt':
    model = GPT(cfg)
    return model, model.init(jax.random.key(seed), inputs[:, :8]), inputs
  model = Transformer(cfg)
  return model, model.init(jax.random.key(seed), inputs[:, :8], inputs[:, :8]), inputs


@functools.partial(jax.jit, static_argnames=('model', 'new_tokens'))
def uncached_generate(model, variables, inputs, *, new_tokens):
  """Greedy without a cache: the whole model on prompt + new tokens (pad_id-filled) each step."""
  cfg = model.config
  batch = inputs.shape[0]
  gpt = isinstance(model, GPT)
  start = inputs.shape[1] if gpt else 1  # where the new tokens go in the buffer
  first = inputs if gpt else jnp.full((batch, 1), cfg.bos_id, jnp.int32)
  buf = jnp.concatenate([first, jnp.full((batch, new_tokens), cfg.pad_id, jnp.int32)], axis=1)

  def body(i, buf):
    logits = model.apply(variables, buf) if gpt else model.apply(variables, inputs, buf)
    logits = jax.lax.dynamic_index_in_dim(logits, start - 1 + i, axis=1, keepdims=False)
    token = jnp.argmax(logits.at[:, cfg.pad_id].set(-jnp.inf), axis=-1).astype(jnp.int32)
    return jax.lax.dynamic_update_index_in_dim(buf, token, start + i, axis=1)

  return jax.lax.fori_loop(0, new_tokens, body, buf)[:, start:]


def steps_run(tokens: np.ndarray, eos_id: int) -> int:
  """Columns the loop ran: it stops once every row has emitted eos_id."""
  ends = [int(np.argmax(row == eos_id)) + 1 if (row == eos_id).any() else len(row)
          for row in tokens]
  return max(ends)


def best_time(fn, repeats: int):
  """fn() once to compile / warm up, then the best of `repeats` timed calls -> (s, output)."""
  out = fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return min(times), out


class _CopyEveryLeaf(Transformer):
  """Our Transformer with nothing shared by beams: beam search reorders all its cache."""

  def decoder_for(self, *args):
    return dataclasses.replace(super().decoder_for(*args), beam_shared=())


def time_beam(cfg, batch, length, new_tokens, beams, repeats, shared=True) -> dict:
  model, variables, inputs = build('transformer', cfg, batch, length)
  model = model if shared else _CopyEveryLeaf(cfg)
  fn = lambda: jax.block_until_ready(beam_search(model, variables, inputs, beam_size=beams,
                                                 max_new_tokens=new_tokens))
  seconds, _ = best_time(fn, repeats)
  return dict(seconds=seconds, tokens_per_s=batch * new_tokens / seconds,
              ms_per_token=seconds / new_tokens * 1e3)


def time_hf_beam(cfg, batch, length, new_tokens, beams, repeats) -> dict:
  import torch
  model = hf_model('transformer', cfg)
  ids = torch.as_tensor(np.array(build('transformer', cfg, batch, length)[2]), dtype=torch.long)

  def fn():
    with torch.no_grad():
      return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            num_beams=beams, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, pad_token_id=cfg.pad_id,
                            eos_token_id=cfg.eos_id, decoder_start_token_id=cfg.bos_id)
  seconds, _ = best_time(fn, repeats)
  return dict(seconds=seconds, tokens_per_s=batch * new_tokens / seconds,
              ms_per_token=seconds / new_tokens * 1e3)


def measure_beam(cfg, setup: dict, repeats: int, with_hf: bool) -> list:
  beam, rows = setup['beam'], []
  for batch in beam['batches']:
    args = (cfg, batch, setup['prompt_len'], beam['new_tokens'], beam['beams'], repeats)
    row = dict(batch=batch, beams=beam['beams'], shared=time_beam(*args),
               copied=time_beam(*args, shared=False))
    if with_hf:
      row['transformers'] = time_hf_beam(*args)
    rows.append(row)
  return rows


def beam_table(rows: list) -> str:
  lines = ['| Transformer beam search: batch | beams | ours, shared cross cache tok/s | '
           'ours, every leaf reordered tok/s | transformers tok/s | ours / transformers |',
           '|---|---|---|---|---|---|']
  for r in rows:
    hf = r.get('transformers')
    peer = (f'{hf["tokens_per_s"]:,.1f} | '
            f'{r["shared"]["tokens_per_s"] / hf["tokens_per_s"]:.2f}x' if hf else '- | -')
    lines.append(f'| {r["batch"]} | {r["beams"]} | {r["shared"]["tokens_per_s"]:,.1f} | '
                 f'{r["copied"]["tokens_per_s"]:,.1f} | {peer} |')
  return '\n'.join(lines)


def time_ours(family, cfg, batch, length, new_tokens, repeats, cached=True) -> dict:
  model, variables, inputs = build(family, cfg, batch, length)
  if cached:
    fn = lambda: jax.block_until_ready(generate(model, variables, inputs,
                                                max_new_tokens=new_tokens))
  else:
    fn = lambda: jax.block_until_ready(uncached_generate(model, variables, inputs,
                                                         new_tokens=new_tokens))
  seconds, out = best_time(fn, repeats)
  steps = steps_run(np.asarray(out), cfg.eos_id) if cached else new_tokens
  return dict(seconds=seconds, new_tokens=new_tokens, steps=steps,
              tokens_per_s=batch * steps / seconds, ms_per_token=seconds / steps * 1e3)


def hf_model(family: str, cfg: TransformerConfig):
  """The transformers model with our config's shapes, random weights, float32, eval mode."""
  import torch
  import transformers as tf
  torch.manual_seed(0)
  common = dict(vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_id, bos_token_id=cfg.bos_id,
                eos_token_id=cfg.eos_id, tie_word_embeddings=True)
  if family == 'gpt':
    hf_cfg = tf.GPT2Config(**common, n_positions=cfg.max_len, n_embd=cfg.d_model,
                           n_layer=cfg.num_decoder_layers, n_head=cfg.num_heads,
                           n_inner=cfg.d_ff, activation_function='gelu_new',
                           layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0)
    model = tf.GPT2LMHeadModel(hf_cfg)
  else:
    hf_cfg = tf.MarianConfig(**common, d_model=cfg.d_model, encoder_layers=cfg.num_encoder_layers,
                             decoder_layers=cfg.num_decoder_layers,
                             encoder_attention_heads=cfg.num_heads,
                             decoder_attention_heads=cfg.num_heads, encoder_ffn_dim=cfg.d_ff,
                             decoder_ffn_dim=cfg.d_ff, activation_function='relu',
                             max_position_embeddings=cfg.max_len, scale_embedding=True,
                             decoder_start_token_id=cfg.bos_id, forced_eos_token_id=None,
                             share_encoder_decoder_embeddings=True, dropout=0.0,
                             attention_dropout=0.0, activation_dropout=0.0)
    model = tf.MarianMTModel(hf_cfg)
  return model.eval()


def time_hf(family, cfg, batch, length, new_tokens, repeats) -> dict:
  import torch
  model = hf_model(family, cfg)
  _, _, inputs = build(family, cfg, batch, length)
  ids = torch.as_tensor(np.array(inputs), dtype=torch.long)
  kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                use_cache=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id)
  if family == 'transformer':
    kwargs['decoder_start_token_id'] = cfg.bos_id

  def fn():
    with torch.no_grad():
      return model.generate(**kwargs)
  seconds, out = best_time(fn, repeats)
  made = out.shape[1] - (length if family == 'gpt' else 1)  # Marian's output starts with bos
  assert made == new_tokens, (made, new_tokens)
  return dict(seconds=seconds, new_tokens=made, steps=made,
              tokens_per_s=batch * made / seconds, ms_per_token=seconds / made * 1e3,
              n_params=sum(p.numel() for p in model.parameters()))


def measure(setup: dict, repeats: int, with_hf: bool = True) -> dict:
  """-> {'rows': [...one per (model, batch)], 'source_sweep': [...]}."""
  length, new = setup['prompt_len'], setup['new_tokens']
  max_len = max(length + new, max(setup['source_lens']))
  rows = []
  for family in ('gpt', 'transformer'):
    cfg = model_config(family, setup[family], max_len)
    for batch in setup['batches']:
      row = dict(model=family, batch=batch,
                 cached=time_ours(family, cfg, batch, length, new, repeats),
                 uncached=time_ours(family, cfg, batch, length, setup['uncached_new'], repeats,
                                    cached=False))
      if with_hf:
        row['transformers'] = time_hf(family, cfg, batch, length, new, repeats)
        row['ratio_ours_over_transformers'] = (row['cached']['tokens_per_s']
                                               / row['transformers']['tokens_per_s'])
      row['ratio_cached_over_uncached'] = (row['cached']['tokens_per_s']
                                           / row['uncached']['tokens_per_s'])
      rows.append(row)
      print(table([row], header=not rows[:-1]), flush=True)
  cfg = model_config('transformer', setup['transformer'], max_len)
  sweep = []
  for s in setup['source_lens']:
    full, one = (time_ours('transformer', cfg, 1, s, n, repeats) for n in (new, 1))
    # The encoder's cost is in both; the difference is the decoding steps alone.
    sweep.append(dict(source_len=s, **full, encode_plus_first_token_s=one['seconds'],
                      decode_ms_per_token=(full['seconds'] - one['seconds'])
                      / max(full['steps'] - 1, 1) * 1e3))
  return dict(rows=rows, source_sweep=sweep, beam=measure_beam(cfg, setup, repeats, with_hf))


def table(rows: list, header: bool = True) -> str:
  lines = ['| model | batch | ours cached tok/s | ours uncached tok/s | transformers tok/s | '
           'ours / transformers | cached / uncached |', '|---|---|---|---|---|---|---|']
  lines = lines if header else []
  for r in rows:
    hf = r.get('transformers')
    peer = (f'{hf["tokens_per_s"]:,.1f} | {r["ratio_ours_over_transformers"]:.2f}x'
            if hf else '- | -')
    lines.append(f'| {r["model"]} | {r["batch"]} | {r["cached"]["tokens_per_s"]:,.1f} | '
                 f'{r["uncached"]["tokens_per_s"]:,.1f} | {peer} | '
                 f'{r["ratio_cached_over_uncached"]:.1f}x |')
  return '\n'.join(lines)


def sweep_table(sweep: list) -> str:
  lines = ['| Transformer, batch 1, cached: source length S | ms / new token (all) | '
           'encode + 1st token ms | ms / decode step (rest) |', '|---|---|---|---|']
  lines += [f'| {r["source_len"]} | {r["ms_per_token"]:.2f} | '
            f'{r["encode_plus_first_token_s"] * 1e3:.1f} | {r["decode_ms_per_token"]:.2f} |'
            for r in sweep]
  return '\n'.join(lines)


def plot(result: dict, setup: dict, path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows, sweep = result['rows'], result['source_sweep']
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw=dict(width_ratios=[2.2, 1]))
  kinds = [('cached', 'ours, cached'), ('uncached', 'ours, uncached (full recompute)'),
           ('transformers', 'transformers generate()')]
  x = np.arange(len(rows))
  for i, (key, label) in enumerate(kinds):
    vals = [r[key]['tokens_per_s'] if key in r else 0 for r in rows]
    bars = ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=label, color=f'C{i}')
    ax.bar_label(bars, [f'{v:,.0f}' if v else '' for v in vals], fontsize=7)
  ax.set_xticks(x, [f'{r["model"]}\nbatch {r["batch"]}' for r in rows])
  ax.set_yscale('log')
  ax.set_ylabel('new tokens/s (greedy, log scale)')
  ax.set_ylim(top=ax.get_ylim()[1] * 8)  # room for the legend above the bars
  ax.legend(fontsize=8, loc='upper left', ncols=3)
  ax.set_title(f'prompt/source {setup["prompt_len"]}, {setup["new_tokens"]} new tokens '
               f'(uncached: {setup["uncached_new"]}), f32, {device_name()}', fontsize=9)
  for key, label in (('ms_per_token', 'all / new tokens'),
                     ('decode_ms_per_token', 'decode step (encode excluded)')):
    ax2.plot([r['source_len'] for r in sweep], [r[key] for r in sweep], 'o-', label=label)
  ax2.legend(fontsize=8)
  ax2.set_xscale('log', base=2)
  ax2.set_ylim(bottom=0)
  ax2.set_xlabel('source length S')
  ax2.set_ylabel('ms / new token')
  ax2.set_title('Transformer, batch 1, cached', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  setup = QUICK if args.quick else FULL
  with_hf = not args.no_transformers
  try:
    import torch
    import transformers
    torch_label, threads, hf_label = torch.__version__, torch.get_num_threads(), \
        transformers.__version__
  except ImportError:
    torch_label = threads = hf_label = None
    with_hf = False
  result = measure(setup, args.repeats, with_hf)
  print(sweep_table(result['source_sweep']))
  print(beam_table(result['beam']))
  default_dir = pathlib.Path(tempfile.gettempdir()) if args.quick else RESULTS  # keep results/ real
  out = (args.out or default_dir) / f'decode-{device_name()}{"-quick" if args.quick else ""}.json'
  max_len = max(setup['prompt_len'] + setup['new_tokens'], max(setup['source_lens']))
  record = {
      'config': dict(setup, repeats=args.repeats, quick=args.quick, dtype='float32',
                     models={f: model_config(f, setup[f], max_len).to_dict()
                             for f in ('gpt', 'transformer')}),
      'method': __doc__.split('\n\n', 2)[2].strip(),
      'versions': versions(torch_label) | {'torch_threads': threads, 'transformers': hf_label},
      **result}
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=1, default=str))
  plot(result, setup, out.with_suffix('.png'))
  print(f'wrote {out} and {out.with_suffix(".png")}')
  return record


if __name__ == '__main__':
  main()
