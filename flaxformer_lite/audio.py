"""Speech front end: log-mel features of 16 kHz audio and the convolutional down-sampler.

`log_mel` is Whisper's (and the common ASR) front end: 25 ms Hann windows every 10 ms (400 / 160
samples at 16 kHz), power spectrum, 80 Slaney mel bins (librosa's default scale and area
normalization), log10, then each example clamped to 8 decades below its loudest bin and scaled
to about [-1, 1] ((x + 4) / 4). In JAX, so it can run inside a jit-compiled step.
`ConvFrontEnd` turns `[B, T, M]` features into `[B, T / prod(strides), D]` encoder inputs with
two GELU 1-D convolutions (kernel 3), and carries the padding mask along.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import layers
from flaxformer_lite.config import TransformerConfig

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms


def _hz_to_mel(f):
  """Slaney's scale: linear (3 per 200 Hz) below 1 kHz, logarithmic above."""
  f = np.asarray(f, np.float64)
  step, knee, log_step = 200.0 / 3, 1000.0, math.log(6.4) / 27
  return np.where(f < knee, f / step, knee / step + np.log(np.maximum(f, 1e-10) / knee) / log_step)


def _mel_to_hz(m):
  m = np.asarray(m, np.float64)
  step, knee, log_step = 200.0 / 3, 1000.0, math.log(6.4) / 27
  return np.where(m < knee / step, m * step, knee * np.exp(log_step * (m - knee / step)))


def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Triangular mel filters `[n_fft // 2 + 1, n_mels]` over 0 .. sample_rate / 2, each divided
  by its width in Hz (Slaney's area normalization, librosa's default)."""
  edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
  freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  lower = (freqs[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
  upper = (edges[None, 2:] - freqs[:, None]) / (edges[2:] - edges[1:-1])
  weights = np.maximum(0.0, np.minimum(lower, upper))
  return (weights * (2.0 / (edges[2:] - edges[:-2]))).astype(np.float32)


def num_frames(num_samples):
  """Feature frames of `num_samples` samples (Whisper's: the centred STFT's last frame dropped)."""
  return num_samples // HOP


def log_mel(audio: jax.Array, n_mels: int = 80) -> jax.Array:
  """audio `[B, N]` float (16 kHz, in [-1, 1]) -> log-mel features `[B, N // 160, n_mels]`.

  Padding after the audio (zeros) is silence: it cannot raise an example's loudest bin, so the
  clamp is the same as for the audio alone; mask its frames with `num_frames(length)`.
  """
  audio = jnp.asarray(audio, jnp.float32)
  padded = jnp.pad(audio, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode='reflect')
  count = num_frames(audio.shape[1])
  starts = jnp.arange(count) * HOP
  frames = padded[:, starts[:, None] + jnp.arange(N_FFT)[None, :]]  # [B, F, N_FFT]
  window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(N_FFT) / N_FFT)  # periodic Hann
  power = jnp.abs(jnp.fft.rfft(frames * window, axis=-1)) ** 2
  mel = power @ jnp.asarray(mel_filters(n_mels))
  logs = jnp.log10(jnp.maximum(mel, 1e-10))
  logs = jnp.maximum(logs, logs.max(axis=(1, 2), keepdims=True) - 8.0)
  return (logs + 4.0) / 4.0


def _downsampled(valid: jax.Array, stride: int) -> jax.Array:
  """A frame mask `[B, T]` after a kernel-3, padding-1 convolution of `stride`: output frame i
  is centred on input frame i * stride, real when that frame is."""
  return valid[:, ::stride]


class ConvFrontEnd(nn.Module):
  """features `[B, T, M]` -> `[B, T', D]`, T' = T down-sampled by each of `config.audio_strides`.

  Two 1-D convolutions (kernel 3, padding 1, GELU) as Whisper's encoder starts; the padding
  mask follows the strides.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, features, valid):
    cfg = self.config
    # Padding frames read as zeros, as the convolutions' own padding past the end does, so a
    # padded batch computes what each example alone would.
    x = jnp.where(valid[..., None], jnp.asarray(features, cfg.dtype), 0)
    init = layers.kernel_init(cfg, 2, 1)
    for i, stride in enumerate(cfg.audio_strides):
      x = nn.Conv(cfg.d_model, (3,), strides=(stride,), padding=((1, 1),), dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, use_bias=True, name=f'conv_{i}',
                  kernel_init=nn.with_logical_partitioning(init, (None, None, 'embed')))(x)
      x = nn.gelu(x, approximate=False)
      valid = _downsampled(valid, stride)
      x = jnp.where(valid[..., None], x, 0)
    return x, valid
