"""flaxformer_lite.audio: the log-mel front end against Whisper's feature extractor, and the
convolutional down-sampler's frames and mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxformer_lite import audio


def _tone(seconds=2.0, freq=440.0, seed=0):
  t = np.arange(int(16000 * seconds)) / 16000
  noise = np.random.default_rng(seed).normal(size=t.shape)
  return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * noise).astype(np.float32)


def test_mel_filters_and_log_mel_match_whisper_feature_extractor():
  tf = pytest.importorskip('transformers')
  fe = tf.WhisperFeatureExtractor()  # 80 bins, n_fft 400, hop 160 (no download: defaults)
  np.testing.assert_allclose(audio.mel_filters(), fe.mel_filters, atol=1e-8)
  waves = np.stack([_tone(freq=440.0), _tone(freq=1500.0, seed=1)])
  ours = np.asarray(audio.log_mel(waves))
  ref = fe._np_extract_fbank_features(waves, 'cpu')  # [B, M, F]
  assert ours.shape == (2, 200, 80) == ref.transpose(0, 2, 1).shape
  np.testing.assert_allclose(ours, ref.transpose(0, 2, 1), atol=1e-4)


def test_a_tone_lights_its_mel_bin_and_padding_changes_nothing():
  wave = _tone(1.0, freq=1000.0)
  feats = np.asarray(audio.log_mel(wave[None]))[0]
  centres = np.argmax(audio.mel_filters(), axis=0) * 8000 / 200  # each bin's peak in Hz
  assert abs(centres[feats.mean(0).argmax()] - 1000.0) < 60
  padded = np.asarray(audio.log_mel(np.pad(wave, (0, 8000))[None]))[0]
  n = audio.num_frames(len(wave))
  # Frames whose window lies in the audio are unchanged by silence after it.
  np.testing.assert_allclose(padded[:n - 2], feats[:n - 2], atol=1e-5)


def test_conv_front_end_downsamples_frames_and_mask():
  from flaxformer_lite import TransformerConfig
  cfg = TransformerConfig(d_model=16, num_heads=2, audio_strides=(2, 2), num_mel_bins=8,
                          dropout_rate=0.0)
  front = audio.ConvFrontEnd(cfg)
  feats = jax.random.normal(jax.random.key(0), (2, 13, 8))
  valid = jnp.arange(13)[None] < jnp.array([[13], [6]])
  params = front.init(jax.random.key(1), feats, valid)
  out, out_valid = front.apply(params, feats, valid)
  assert out.shape == (2, 4, 16)  # 13 -> 7 -> 4 frames
  np.testing.assert_array_equal(out_valid, [[1, 1, 1, 1], [1, 1, 0, 0]])
  # Row 1's real frames do not depend on what its padding frames hold.
  noisy = feats.at[1, 6:].set(100.0)
  np.testing.assert_allclose(front.apply(params, noisy, valid)[0][1, :2], out[1, :2], atol=1e-5)
