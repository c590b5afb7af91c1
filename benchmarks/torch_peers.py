"""PyTorch peers of our models for benchmarks/train_step.py, built from the same TransformerConfig.

- `NanoGPT`: the decoder-only GPT written nanoGPT style (fused qkv `nn.Linear`,
  `scaled_dot_product_attention(is_causal=True)`, pre-norm LayerNorm, GELU MLP, tied embeddings).
- `Seq2Seq`: `torch.nn.Transformer` (post-norm, batch_first, dropout 0) with what it leaves out
  written here: one token embedding shared by source, target and the output projection, the
  sinusoidal table, the sqrt(d_model) embedding scale when the config has `scale_embeddings`.
  torch's stacks end in a LayerNorm each; ours (post-norm) has none, so they are removed.
  Remaining differences, none changing parameters or FLOPs: torch keeps the cross-attention's
  q|k|v in one [3D, D] matrix (Xavier over all of it) where ours has q [D, D] and k|v [D, 2D]
  apart (Xavier over each); ours builds a key-padding mask from the pad id every step (there is
  no padding here), torch gets none.
- `trainer`: forward, float32 cross-entropy, backward, `torch.optim.AdamW` as one step callable.

This module imports torch: train_step imports it only inside a try, so the benchmark still runs
(ours only) when torch is missing. The peers read the config's fields, so their shapes follow ours
by construction; `num_params` counts what `train_step.count_params` counts (no position table).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import checkpoint as ckpt


def require(cfg, **expected) -> None:
  """ValueError naming the first config field a peer cannot reproduce."""
  for name, allowed in expected.items():
    if getattr(cfg, name) not in allowed:
      raise ValueError(f'the PyTorch peer needs {name} in {allowed}; got {getattr(cfg, name)!r}')


def remat_kwargs(remat: str) -> dict | None:
  """`torch.utils.checkpoint` arguments for our `remat` policy; None: store every activation.

  'full' recomputes the whole layer in the backward pass; 'dots_saveable' keeps the outputs of
  matmuls and fused attention and recomputes the rest (selective checkpointing), as JAX's policy.
  """
  if remat == 'none':
    return None
  if remat == 'full':
    return {}
  aten = torch.ops.aten
  names = ('mm', 'addmm', 'bmm', '_scaled_dot_product_flash_attention',
           '_scaled_dot_product_flash_attention_for_cpu', '_scaled_dot_product_efficient_attention',
           '_scaled_dot_product_cudnn_attention')
  ops = [getattr(aten, n).default for n in names if hasattr(aten, n)]
  return {'context_fn': functools.partial(ckpt.create_selective_checkpoint_contexts, ops)}


def run_layers(layers, x, remat, *args, **kwargs):
  """x through `layers` in turn; with `remat` (from `remat_kwargs`) each layer is checkpointed."""
  for layer in layers:
    if remat is None:
      x = layer(x, *args, **kwargs)
    else:
      x = ckpt.checkpoint(layer, x, *args, use_reentrant=False, **remat, **kwargs)
  return x


# ----------------------------------------------------------------------------------------------
# nanoGPT

class Block(nn.Module):
  """Pre-norm decoder block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); x `[B, T, D]`."""

  def __init__(self, cfg):
    super().__init__()
    d, f, bias, eps = cfg.d_model, cfg.d_ff, cfg.use_bias, cfg.norm_eps
    self.n_head = cfg.num_heads
    self.ln_1, self.ln_2 = nn.LayerNorm(d, eps, bias=bias), nn.LayerNorm(d, eps, bias=bias)
    self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
    gelu = nn.GELU(approximate='tanh' if cfg.activation == 'gelu_tanh' else 'none')
    self.mlp = nn.Sequential(nn.Linear(d, f, bias=bias), gelu, nn.Linear(f, d, bias=bias))

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
    q, k, v = (a.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for a in (q, k, v))
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, N, T, H]
    x = x + self.c_proj(att.transpose(1, 2).contiguous().view(b, t, d))
    return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
  """tokens `[B, T]` -> logits `[B, T, V]`: learned positions, blocks, final norm, tied output."""

  def __init__(self, cfg):
    super().__init__()
    require(cfg, norm=('layernorm',), norm_position=('pre',), positions=('learned',),
            activation=('gelu', 'gelu_tanh'), tie_embeddings=(True,), scale_embeddings=(False,),
            num_kv_heads=(cfg.num_heads,), head_dim=(cfg.d_model // cfg.num_heads,))
    self.remat = remat_kwargs(cfg.remat)
    self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
    self.wpe = nn.Embedding(cfg.max_len, cfg.d_model)
    self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_decoder_layers))
    self.ln_f = nn.LayerNorm(cfg.d_model, cfg.norm_eps, bias=cfg.use_bias)
    for name, p in self.named_parameters():  # as ours: N(0, init_std) matrices, zero biases
      if p.dim() > 1:
        nn.init.normal_(p, std=cfg.init_std or 0.02)
      elif name.endswith('bias'):
        nn.init.zeros_(p)

  def forward(self, idx):
    x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
    x = run_layers(self.blocks, x, self.remat)
    return self.ln_f(x) @ self.wte.weight.T  # tied output projection


# ----------------------------------------------------------------------------------------------
# torch.nn.Transformer

def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
  """`[max_len, D]` sinusoids 10000^(-2i/D) laid out [sin | cos] by halves, as ours."""
  half = d_model // 2
  angles = np.arange(max_len)[:, None] * np.exp(-math.log(1e4) * 2 * np.arange(half) / d_model)
  table = np.zeros((max_len, d_model), np.float32)
  table[:, :half], table[:, half:2 * half] = np.sin(angles), np.cos(angles)
  return table


class Seq2Seq(nn.Module):
  """src `[B, S]`, tgt (decoder input) `[B, T]` -> logits `[B, T, V]` through nn.Transformer."""

  def __init__(self, cfg):
    super().__init__()
    require(cfg, norm=('layernorm',), norm_position=('post',), positions=('sinusoidal',),
            activation=('relu', 'gelu'), tie_embeddings=(True,),
            num_kv_heads=(cfg.num_heads,), head_dim=(cfg.d_model // cfg.num_heads,))
    self.remat = remat_kwargs(cfg.remat)
    self.scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
    self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
    self.register_buffer('table', torch.from_numpy(sinusoidal_table(cfg.max_len, cfg.d_model)),
                         persistent=False)
    self.transformer = nn.Transformer(
        cfg.d_model, cfg.num_heads, cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.d_ff,
        dropout=0.0, activation=cfg.activation, layer_norm_eps=cfg.norm_eps, batch_first=True,
        norm_first=False, bias=cfg.use_bias)
    # Our post-norm stacks end with their last layer's norm; torch adds one more to each.
    self.transformer.encoder.norm = self.transformer.decoder.norm = None
    # nn.Transformer has Xavier-uniform matrices (as ours with init_std=None); biases zero as ours.
    for name, p in self.transformer.named_parameters():
      if name.endswith('bias'):
        nn.init.zeros_(p)
    nn.init.normal_(self.embed.weight, std=cfg.init_std or cfg.d_model ** -0.5)

  def forward(self, src, tgt):
    s = self.embed(src) * self.scale + self.table[:src.shape[1]]
    t = self.embed(tgt) * self.scale + self.table[:tgt.shape[1]]
    mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
    if self.remat is None:
      h = self.transformer(s, t, tgt_mask=mask, tgt_is_causal=True)
    else:  # the stacks' own loops, each layer checkpointed
      memory = run_layers(self.transformer.encoder.layers, s, self.remat)
      h = run_layers(self.transformer.decoder.layers, t, self.remat, memory, tgt_mask=mask,
                     tgt_is_causal=True)
    return h @ self.embed.weight.T  # tied output projection


# ----------------------------------------------------------------------------------------------
# Training step and device helpers.

def match_jax_precision(device: str) -> None:
  """On CUDA let float32 matmuls use TF32, as JAX's default precision does on recent GPUs."""
  if device == 'cuda':
    torch.set_float32_matmul_precision('high')


def num_params(model: nn.Module) -> int:
  """Parameters without the learned position table (`wpe`); the tied embedding counts once."""
  return sum(p.numel() for name, p in model.named_parameters() if not name.startswith('wpe'))


def device_for(jax_platform: str) -> str:
  """'cuda' when JAX runs on a GPU and torch sees one; else 'cpu' (never split across devices)."""
  return 'cuda' if jax_platform == 'gpu' and torch.cuda.is_available() else 'cpu'


def trainer(cfg, model_name: str, batch, adamw: dict, *, device='cpu', compile=None) -> dict:
  """The peer of `model_name` ('gpt' | 'transformer') and one training step on `batch`.

  batch: numpy int arrays `(inputs..., labels)`, labels `[B, T]`. Under `cfg.dtype == bfloat16`
  the forward runs in `torch.autocast(bfloat16)` with float32 weights; the loss is float32.
  On CUDA float32 matmuls may use TF32, as JAX's default precision does there; `compile=None`
  compiles (torch.compile) on CUDA only.
  -> dict(run=callable returning the loss as a float, n_params=int, param_dtypes=callable,
          device=str, compile=bool).
  """
  torch.manual_seed(0)
  compile = device == 'cuda' if compile is None else compile
  match_jax_precision(device)
  model = (NanoGPT(cfg) if model_name == 'gpt' else Seq2Seq(cfg)).to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=adamw['lr'], betas=(adamw['b1'], adamw['b2']),
                          eps=adamw['eps'], weight_decay=adamw['weight_decay'],
                          fused=device == 'cuda')
  *inputs, labels = (torch.as_tensor(a, dtype=torch.long, device=device) for a in batch)
  forward = torch.compile(model) if compile else model
  bf16 = str(cfg.dtype) == 'bfloat16'

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      logits = forward(*inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    opt.step()
    return loss.item()  # the host sync

  def param_dtypes():
    return sorted({str(p.dtype).removeprefix('torch.') for p in model.parameters()})
  return dict(run=run, n_params=num_params(model), param_dtypes=param_dtypes, device=device,
              compile=compile)


def matmul(n: int, dtype: str, device: str):
  """A callable computing one n x n @ n x n product of `dtype` on `device`, returning when done."""
  match_jax_precision(device)
  a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  return lambda: (a @ a, sync())
