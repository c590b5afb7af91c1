"""train/speech_data.py: eSpeak NG synthesis, the default synthetic corpus, the `--data` reader.

Only a handful of short utterances are synthesized (~10 ms each); the corpus split is checked on
its utterance descriptions, which need no synthesis.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from train import speech_data as sd
from train.data import DataError

SENTENCE = 'The baker dropped a red box near the station.'


def _peak_hz(audio: np.ndarray, rate: int = sd.SAMPLE_RATE) -> float:
  spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
  return float(np.fft.rfftfreq(len(audio), 1 / rate)[np.argmax(spectrum)])


@pytest.fixture(scope='module')
def sentence_audio():
  return sd.synthesize(SENTENCE, 'en-us')


# --- synthesis ---------------------------------------------------------------------------------

def test_synthesis_is_16khz_float32_speech_of_plausible_length(sentence_audio):
  audio = sentence_audio
  assert audio.dtype == np.float32 and audio.ndim == 1
  assert 0.3 <= len(audio) / sd.SAMPLE_RATE <= 5.0
  assert np.abs(audio).max() <= 1.0
  assert np.sqrt(np.mean(audio**2)) > 0.01  # not silent
  # espeak's 22,050 Hz resampled to 16 kHz leaves nothing above the new Nyquist band edge.
  spectrum = np.abs(np.fft.rfft(audio)) ** 2
  above = np.fft.rfftfreq(len(audio), 1 / sd.SAMPLE_RATE) > 7_900
  assert spectrum[above].sum() < 1e-3 * spectrum.sum()


def test_synthesis_is_deterministic_whatever_was_spoken_before(sentence_audio):
  # espeak keeps state between utterances (pitch flutter, gain control, a clock-seeded noise
  # generator); other syntheses in between must not change the samples.
  sd.synthesize('Something else entirely, read by another voice.', 'en-gb-x-rp+f2', rate=200)
  sd.synthesize('nine hundred and ninety-nine', 'en+m3', pitch=70)
  np.testing.assert_array_equal(sd.synthesize(SENTENCE, 'en-us'), sentence_audio)


def test_voices_texts_rates_and_pitches_all_change_the_audio(sentence_audio):
  others = [sd.synthesize(SENTENCE, 'en-gb-x-rp+f2'),
            sd.synthesize('Tuesday, the first of May.', 'en-us'),
            sd.synthesize(SENTENCE, 'en-us', rate=250), sd.synthesize(SENTENCE, 'en-us', pitch=80)]
  for other in others:
    assert other.shape != sentence_audio.shape or not np.array_equal(other, sentence_audio)
  assert len(others[2]) < 0.85 * len(sentence_audio)  # faster speech is shorter


def test_synthesis_refuses_bad_arguments():
  with pytest.raises(ValueError, match='no voice'):
    sd.synthesize('hello', 'xx-not-a-voice')
  with pytest.raises(ValueError, match='rate 20'):
    sd.synthesize('hello', rate=20)


@pytest.mark.parametrize('snr_db', [15.0, 22.5, 30.0])
def test_noise_is_added_at_the_requested_snr(sentence_audio, snr_db):
  noisy = sd.add_noise(sentence_audio, snr_db, np.random.default_rng(0))
  noise = noisy.astype(np.float64) - sentence_audio
  measured = 10 * np.log10(np.mean(sentence_audio.astype(np.float64) ** 2) / np.mean(noise**2))
  assert abs(measured - snr_db) < 1.0
  assert noisy.dtype == np.float32 and np.abs(noisy).max() <= 1.0


# --- texts and the default corpus --------------------------------------------------------------

@pytest.mark.parametrize('n, words', [
    (0, 'zero'), (13, 'thirteen'), (40, 'forty'), (312, 'three hundred and twelve'),
    (1001, 'one thousand and one'), (2026, 'two thousand and twenty-six'),
    (12345, 'twelve thousand three hundred and forty-five'), (1_000_000, 'one million')])
def test_number_words(n, words):
  assert sd.number_words(n) == words


def test_dates_are_spelled_as_spoken():
  assert sd._ordinal_words(24) == 'twenty-fourth' and sd._ordinal_words(12) == 'twelfth'
  assert sd._year_words(2026) == 'twenty twenty-six' and sd._year_words(1906) == 'nineteen oh six'
  assert sd.normalize_transcript('Tuesday, the twenty-fourth of November.') == \
      'tuesday the twenty fourth of november'


def test_default_corpus_holds_out_texts_and_a_voice():
  train, held_out = sd.default_corpus(seed=0, n_train=3000, n_eval=300)
  train_u = [train.utterance(i) for i in range(len(train))]
  eval_u = [held_out.utterance(i) for i in range(len(held_out))]
  assert not {u.text for u in train_u} & {u.text for u in eval_u}
  assert not {u.voice for u in train_u} & {u.voice for u in eval_u}
  assert {u.voice for u in eval_u} == {sd.EVAL_VOICE}
  assert len({u.voice for u in train_u}) > 50 and len({u.rate for u in train_u}) > 50
  assert all(15 <= u.snr_db <= 30 for u in train_u + eval_u)
  assert not any(c.isdigit() for u in train_u for c in u.spoken)  # numbers are read as words
  assert any('november' in u.text for u in train_u)  # dates, numbers and sentences all appear
  assert any(u.text.endswith('hundred') or ' and ' in u.text for u in train_u)
  assert any(u.text.startswith('the baker') for u in train_u)


def test_corpus_items_are_a_pure_function_of_seed_split_and_index(tmp_path):
  train, _ = sd.default_corpus(seed=3, n_train=10, n_eval=2, cache_dir=tmp_path / 'cache')
  audio, text = train[4]
  assert audio.dtype == np.float32 and text == train.utterance(4).text
  assert len(list((tmp_path / 'cache').glob('*.npy'))) == 1
  # From the cache (a second object over the same folder) and without one: the same samples.
  again, _ = sd.default_corpus(seed=3, n_train=10, n_eval=2, cache_dir=tmp_path / 'cache')
  uncached, _ = sd.default_corpus(seed=3, n_train=10, n_eval=2)
  np.testing.assert_array_equal(again[4][0], audio)
  np.testing.assert_array_equal(uncached[4][0], audio)
  other_seed, _ = sd.default_corpus(seed=4, n_train=10, n_eval=2)
  assert other_seed.utterance(4) != train.utterance(4)
  with pytest.raises(IndexError):
    train[10]


# --- the --data folder -------------------------------------------------------------------------

def _sine(hz: float, rate: int, seconds: float, amplitude: float) -> np.ndarray:
  t = np.arange(int(rate * seconds)) / rate
  return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _folder(tmp_path, lines):
  folder = tmp_path / 'speech'
  folder.mkdir()
  soundfile.write(folder / 'a.wav', _sine(300, 16_000, 0.5, 0.5), 16_000)
  stereo = np.stack([_sine(440, 8_000, 1.0, 0.5), _sine(440, 8_000, 1.0, 0.1)], axis=1)
  soundfile.write(folder / 'b.flac', stereo, 8_000)  # 8 kHz stereo: resampled and downmixed
  (folder / 'garbage.wav').write_bytes(b'RIFF this is not audio')
  (folder / sd.TRANSCRIPTS).write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
  return folder


def test_read_folder_and_load_audio(tmp_path):
  folder = _folder(tmp_path, ['a.wav\tHELLO WORLD', '', 'b.flac\tsecond one'])
  items = sd.read_folder(folder)
  assert items == [(folder / 'a.wav', 'HELLO WORLD'), (folder / 'b.flac', 'second one')]
  mono = sd.load_audio(items[0][0])
  assert mono.dtype == np.float32 and mono.shape == (8_000,)
  assert abs(_peak_hz(mono) - 300) < 2 * sd.SAMPLE_RATE / len(mono)
  resampled = sd.load_audio(items[1][0])
  assert resampled.dtype == np.float32 and resampled.shape == (16_000,)  # 1 s at 16 kHz
  assert abs(_peak_hz(resampled) - 440) < 2.0  # FFT bins are 1 Hz apart
  middle = resampled[1_000:-1_000]  # away from the filter's edges
  assert abs(np.abs(middle).max() - 0.3) < 0.01  # the mean of the two channels' 0.5 and 0.1


@pytest.mark.parametrize('bad_line, fragments', [
    ('b.flac no tab here', ['no tab']),
    ('missing.wav\tsome words', ["'missing.wav' not found"]),
    ('garbage.wav\tsome words', ["'garbage.wav' does not decode"]),
    ('b.flac\t   ', ["empty transcript for 'b.flac'"]),
])
def test_each_bad_line_is_one_error_naming_file_and_line(tmp_path, bad_line, fragments):
  folder = _folder(tmp_path, ['a.wav\tfine', bad_line])
  with pytest.raises(sd.SpeechDataError) as error:
    sd.read_folder(folder)
  assert isinstance(error.value, DataError)  # the train program prints it as one error: line
  message = str(error.value)
  assert f'{folder / sd.TRANSCRIPTS} line 2:' in message and '\n' not in message
  for fragment in fragments:
    assert fragment in message


def test_folder_level_errors(tmp_path):
  with pytest.raises(sd.SpeechDataError, match='no transcripts.tsv'):
    sd.read_folder(tmp_path)
  folder = _folder(tmp_path, ['', '  '])
  with pytest.raises(sd.SpeechDataError, match='no utterances'):
    sd.read_folder(folder)
  with pytest.raises(sd.SpeechDataError, match='garbage.wav: does not decode'):
    sd.load_audio(folder / 'garbage.wav')
