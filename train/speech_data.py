"""Speech data for `--task speech`: offline eSpeak NG synthesis, the default synthetic corpus and
the reader of a `--data` folder of audio files with a `transcripts.tsv`.

All audio here is mono float32 of shape [N] (N samples) at SAMPLE_RATE = 16,000 Hz, values in
[-1, 1]. Nothing is downloaded: the `espeakng-loader` wheel carries libespeak-ng and its voices.
"""

from __future__ import annotations

import _ctypes
import ctypes
import dataclasses
import datetime
import hashlib
import math
import os
import pathlib
import re
import threading

import numpy as np
import scipy.signal
import soundfile

from train.data import DataError

SAMPLE_RATE = 16_000  # Hz
TRANSCRIPTS = 'transcripts.tsv'


class SpeechDataError(DataError):
  """A bad `--data` speech folder; the message names the file (and the transcripts.tsv line)."""


# ---------------------------------------------------------------------------------------------
# Synthesis with eSpeak NG (its C API through ctypes; see espeak-ng's speak_lib.h).

_AUDIO_OUTPUT_SYNCHRONOUS = 2  # audio comes back through the callback; espeak_Synth blocks
_INITIALIZE_DONT_EXIT = 0x8000  # missing data: return an error instead of exiting the process
_CHARS_UTF8, _POS_CHARACTER, _EE_OK = 1, 1, 0
_RATE, _PITCH, _RANGE = 1, 3, 4  # espeak_PARAMETER
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_ESPEAK_LOCK = threading.Lock()  # the library is one global state: one utterance at a time


def _espeak_native(text: str, voice: str, rate: int, pitch: int, pitch_range: int):
  """(int16 [M], native rate in Hz (22,050)) for `text` read by espeak-ng.

  The library is loaded fresh for every utterance and unloaded after it. A library initialized
  once keeps state between utterances (wavegen's pitch-flutter index, gain control and echo
  buffer, and a noise generator seeded from the clock), so the same text came out different
  depending on what had been spoken before. A fresh load and initialization costs ~0.2 ms of CPU.
  This assumes nothing else in the process holds libespeak-ng open (dlclose would not reset it).
  """
  import espeakng_loader  # only the synthesis needs it; the folder reader does not
  lib = ctypes.CDLL(espeakng_loader.get_library_path(), mode=ctypes.RTLD_LOCAL)
  try:
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    native_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                        espeakng_loader.get_data_path().encode(),
                                        _INITIALIZE_DONT_EXIT)
    if native_rate <= 0:
      raise RuntimeError(f'espeak-ng did not initialize (data: {espeakng_loader.get_data_path()})')
    try:
      return _speak(lib, text, voice, rate, pitch, pitch_range), native_rate
    finally:
      lib.espeak_Terminate()
  finally:
    _ctypes.dlclose(lib._handle)


def _speak(lib, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
  """Runs one synthesis on an initialized library; int16 [M]."""
  chunks = []

  def collect(wav, num_samples, events):
    if wav and num_samples > 0:  # a NULL buffer or 0 samples carries only events
      chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
    return 0  # 0 = go on synthesizing

  callback = _SYNTH_CALLBACK(collect)  # this local keeps it alive until synthesis ends
  lib.espeak_SetSynthCallback(callback)
  lib.espeak_ng_SetRandSeed(ctypes.c_long(0))  # frication noise; seeded from the clock otherwise
  lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
  if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
    raise ValueError(f'espeak-ng has no voice {voice!r}')
  for parameter, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
    lib.espeak_SetParameter(parameter, value, 0)
  data = text.encode('utf-8') + b'\0'
  lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                               ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
  status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
  if status != _EE_OK or lib.espeak_Synchronize() != _EE_OK:
    raise RuntimeError(f'espeak-ng failed on {text!r} (status {status})')
  return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


def resample(audio: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
  """float [N] at rate_in Hz -> float32 [N * rate_out / rate_in] at rate_out Hz.

  Polyphase filtering (scipy.signal.resample_poly, a Kaiser-windowed sinc low-pass): exact for any
  pair of integer rates, e.g. 22,050 -> 16,000 Hz is up 320, down 441.
  """
  if rate_in == rate_out:
    return np.asarray(audio, np.float32)
  g = math.gcd(rate_in, rate_out)
  return scipy.signal.resample_poly(audio, rate_out // g, rate_in // g).astype(np.float32)


def _as_int16_levels(audio: np.ndarray) -> np.ndarray:
  """Rounds float32 audio to the 16-bit grid: a cache of int16 samples then reads back exactly."""
  levels = np.round(np.clip(audio, -1.0, 32767 / 32768) * 32768)
  return (levels / 32768).astype(np.float32)


def synthesize(text: str, voice: str = 'en', rate: int = 175, pitch: int = 50,
               pitch_range: int = 50) -> np.ndarray:
  """`text` read aloud by espeak-ng -> float32 [N] at 16 kHz in [-1, 1], on the 16-bit grid.

  voice: an espeak-ng voice name with an optional variant ('en-us', 'en-gb-x-rp+f2');
  rate: words per minute (80-450); pitch: base pitch (0-100, 50 normal); pitch_range: 0 monotone
  to 100 (50 normal). Deterministic: the same arguments give the same samples in any process, in
  any order of calls. Thread-safe (calls are serialized). ~7 ms of CPU for a 2.5 s sentence.
  """
  for name, value, low, high in (('rate', rate, 80, 450), ('pitch', pitch, 0, 100),
                                 ('pitch_range', pitch_range, 0, 100)):
    if not low <= value <= high:
      raise ValueError(f'{name} {value} is not in [{low}, {high}]')
  with _ESPEAK_LOCK:
    native, native_rate = _espeak_native(text, voice, int(rate), int(pitch), int(pitch_range))
  return _as_int16_levels(resample(native.astype(np.float32) / 32768, native_rate))


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
  """audio float32 [N] + white Gaussian noise `snr_db` dB below the clip's mean power, clipped."""
  power = np.mean(np.square(audio, dtype=np.float64)) if audio.size else 0.0
  sigma = math.sqrt(power / 10 ** (snr_db / 10))
  noisy = audio + sigma * rng.standard_normal(audio.shape)
  return np.clip(noisy, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Texts of the default corpus: dates, numbers and template sentences, all spelled as spoken.

_ONES = ('zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen '
         'fifteen sixteen seventeen eighteen nineteen').split()
_TENS = ('', '', 'twenty', 'thirty', 'forty', 'fifty', 'sixty', 'seventy', 'eighty', 'ninety')
_ORDINAL_ENDINGS = {'one': 'first', 'two': 'second', 'three': 'third', 'five': 'fifth',
                    'eight': 'eighth', 'nine': 'ninth', 'twelve': 'twelfth'}
_MONTHS = ('January February March April May June July August September October November '
           'December').split()
_WEEKDAYS = 'Monday Tuesday Wednesday Thursday Friday Saturday Sunday'.split()
_SUBJECTS = ('The old fisherman', 'My sister', 'A small dog', 'The teacher', 'Our neighbour',
             'The children', 'A tall woman', 'The bus driver', 'His brother', 'The young doctor',
             'A quiet student', 'The baker', 'Her father', 'The farmer', 'A tired nurse',
             'The new manager')
_VERBS = ('found', 'painted', 'carried', 'opened', 'sold', 'watched', 'cleaned', 'lost', 'fixed',
          'moved', 'bought', 'dropped', 'borrowed', 'wrapped', 'counted', 'hid')
_OBJECTS = ('a red box', 'the kitchen door', 'an empty bottle', 'the morning paper',
            'a heavy suitcase', 'the garden gate', 'a blue umbrella', 'the old piano',
            'a basket of apples', 'the broken clock', 'a letter from home', 'the last ticket',
            'a wooden chair', 'the silver key', 'a bag of flour', 'the green lamp')
_ENDINGS = ('in the garden', 'before lunch', 'near the station', 'last night', 'on the way home',
            'after the storm', 'at the market', 'behind the school', 'early this morning',
            'by the river', 'during the holidays', 'in the rain', 'at the end of the day',
            'next to the bank', 'without a word', 'on Sunday')


def number_words(n: int) -> str:
  """0 <= n < 10**9 in British English words: 312 -> 'three hundred and twelve'."""
  if not 0 <= n < 10**9:
    raise ValueError(f'number_words needs 0 <= n < 10**9, not {n}')
  if n < 20:
    return _ONES[n]
  if n < 100:
    return _TENS[n // 10] + ('' if n % 10 == 0 else '-' + _ONES[n % 10])
  if n < 1000:
    rest = n % 100
    return f'{_ONES[n // 100]} hundred' + ('' if rest == 0 else ' and ' + number_words(rest))
  size, name = (10**6, 'million') if n >= 10**6 else (1000, 'thousand')
  head, rest = divmod(n, size)
  tail = '' if rest == 0 else (' and ' if rest < 100 else ' ') + number_words(rest)
  return f'{number_words(head)} {name}{tail}'


def _ordinal_words(n: int) -> str:
  """21 -> 'twenty-first'."""
  words = number_words(n)
  *head, last = re.split(r'([ -])', words)  # keeps the separators
  if last in _ORDINAL_ENDINGS:
    last = _ORDINAL_ENDINGS[last]
  else:
    last = last[:-1] + 'ieth' if last.endswith('y') else last + 'th'
  return ''.join(head) + last


def _year_words(year: int) -> str:
  """2026 -> 'twenty twenty-six', 2005 -> 'two thousand and five', 1906 -> 'nineteen oh six'."""
  century, rest = divmod(year, 100)
  if 2000 <= year < 2010:
    return number_words(year)
  if rest == 0:
    return f'{number_words(century)} hundred'
  if rest < 10:
    return f'{number_words(century)} oh {number_words(rest)}'
  return f'{number_words(century)} {number_words(rest)}'


def _date_text(rng: np.random.Generator) -> str:
  """A calendar date between 1950 and 2049, as said aloud, in one of three phrasings."""
  day = datetime.date(1950, 1, 1) + datetime.timedelta(days=int(rng.integers(36524)))
  weekday, month = _WEEKDAYS[day.weekday()], _MONTHS[day.month - 1]
  ordinal, year = _ordinal_words(day.day), _year_words(day.year)
  phrasings = (f'{weekday}, the {ordinal} of {month}, {year}.', f'{month} the {ordinal}, {year}.',
               f'{weekday}, {month} the {ordinal}.')
  return phrasings[int(rng.integers(len(phrasings)))]


def _number_text(rng: np.random.Generator) -> str:
  """A number of 1 to 6 digits (each length equally likely) in words."""
  digits = int(rng.integers(1, 7))
  return number_words(int(rng.integers(10 ** (digits - 1) if digits > 1 else 0, 10**digits))) + '.'


def _sentence_text(rng: np.random.Generator) -> str:
  """'The baker dropped a red box near the station.': one of 16**4 = 65,536 sentences."""
  lists = (_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)
  parts = [words[int(rng.integers(len(words)))] for words in lists]
  return ' '.join(parts) + '.'


def normalize_transcript(text: str) -> str:
  """Lowercase words split by single spaces; hyphens become spaces, other punctuation goes."""
  text = re.sub(r"[^a-z0-9' ]", '', text.lower().replace('-', ' '))
  return ' '.join(text.split())


# ---------------------------------------------------------------------------------------------
# The default corpus: synthesized lazily, held out by text and by voice.

_LANGUAGES = ('en', 'en-us', 'en-gb-x-rp', 'en-gb-scotland', 'en-029', 'en-us-nyc')
_VARIANTS = ('', '+m1', '+m2', '+m3', '+m4', '+m5', '+m6', '+m7', '+f1', '+f2', '+f3', '+f5')
TRAIN_VOICES = tuple(language + variant for language in _LANGUAGES for variant in _VARIANTS)
EVAL_VOICE = 'en-us+f4'  # the variant f4 is in no training voice: a speaker never heard
_EVAL_TEXT_PERCENT = 10  # texts whose hash falls in this share belong to the eval side only
_CACHE_VERSION = 1  # bump when synthesis changes, so old cache files are not read


@dataclasses.dataclass(frozen=True)
class Utterance:
  """One item of the corpus: what espeak reads, the transcript, and how it is read."""
  spoken: str  # the text given to espeak ('Tuesday, the twenty-fourth of November, ...')
  text: str  # its transcript: normalize_transcript(spoken)
  voice: str
  rate: int  # words per minute
  pitch: int  # 0-100
  pitch_range: int  # 0-100
  snr_db: float
  noise_seed: int


def _is_eval_text(text: str) -> bool:
  digest = hashlib.sha1(text.encode('utf-8')).digest()
  return int.from_bytes(digest[:4], 'big') % 100 < _EVAL_TEXT_PERCENT


class SpeechCorpus:
  """A random-access dataset (len, [i]) of synthesized speech: item i is (audio float32 [N] at
  16 kHz, transcript str), a pure function of (seed, split, i). Synthesized on first access; with
  `cache_dir`, the clean int16 audio is kept there (shared by all seeds) and read back exactly."""

  def __init__(self, seed: int, split: str, size: int, cache_dir=None):
    if split not in ('train', 'eval'):
      raise ValueError(f'split {split!r} is not train or eval')
    self.seed, self.split, self.size = seed, split, size
    self.cache_dir = None if cache_dir is None else pathlib.Path(cache_dir)

  def __len__(self) -> int:
    return self.size

  def utterance(self, i: int) -> Utterance:
    """What item i says and how, without synthesizing it."""
    if not 0 <= i < self.size:
      raise IndexError(f'{self.split} item {i} is not in [0, {self.size})')
    rng = np.random.default_rng([self.seed, int(self.split == 'eval'), i])
    make_text = (_date_text, _number_text, _sentence_text)[int(rng.integers(3))]
    while True:  # held out by text: each text belongs to one side only (~10 draws for eval)
      spoken = make_text(rng)
      if _is_eval_text(normalize_transcript(spoken)) == (self.split == 'eval'):
        break
    voice = (EVAL_VOICE if self.split == 'eval'
             else TRAIN_VOICES[int(rng.integers(len(TRAIN_VOICES)))])
    return Utterance(spoken=spoken, text=normalize_transcript(spoken), voice=voice,
                     rate=int(rng.integers(130, 211)), pitch=int(rng.integers(30, 71)),
                     pitch_range=int(rng.integers(30, 71)), snr_db=float(rng.uniform(15, 30)),
                     noise_seed=int(rng.integers(2**32)))

  def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
    u = self.utterance(i)
    noisy = add_noise(self.clean_audio(u), u.snr_db, np.random.default_rng(u.noise_seed))
    return noisy, u.text

  def clean_audio(self, u: Utterance) -> np.ndarray:
    """float32 [N] at 16 kHz without noise: from the cache, or synthesized (and cached)."""
    if self.cache_dir is None:
      return synthesize(u.spoken, u.voice, u.rate, u.pitch, u.pitch_range)
    key = f'{_CACHE_VERSION}|{u.spoken}|{u.voice}|{u.rate}|{u.pitch}|{u.pitch_range}'
    path = self.cache_dir / (hashlib.sha1(key.encode('utf-8')).hexdigest() + '.npy')
    if path.exists():
      return np.load(path).astype(np.float32) / 32768
    audio = synthesize(u.spoken, u.voice, u.rate, u.pitch, u.pitch_range)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: a killed run or a second worker never leaves a half file.
    temporary = path.with_name(f'{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp')
    with open(temporary, 'wb') as f:
      np.save(f, np.round(audio * 32768).astype(np.int16))
    os.replace(temporary, path)
    return audio


def default_corpus(seed: int, n_train: int, n_eval: int,
                   cache_dir=None) -> tuple[SpeechCorpus, SpeechCorpus]:
  """(train, eval) synthetic speech: dates, numbers and sentences read by 72 training voices
  (6 English accents x 12 variants) at 130-210 words per minute, pitch 30-70, with white noise at
  15-30 dB SNR. The eval side shares no transcript and no voice with training (EVAL_VOICE)."""
  return (SpeechCorpus(seed, 'train', n_train, cache_dir),
          SpeechCorpus(seed, 'eval', n_eval, cache_dir))


# ---------------------------------------------------------------------------------------------
# A `--data` folder: audio files and a transcripts.tsv of `file<TAB>text` lines.

def read_folder(path) -> list[tuple[pathlib.Path, str]]:
  """[(audio file, transcript)] from `path`/transcripts.tsv, in file order.

  Each line is `file<TAB>text`, the file relative to the folder, any format soundfile reads (wav,
  flac, ogg). Blank lines are skipped. Every file's header is read here, so a file that does not
  decode is reported with its line before training starts. Raises SpeechDataError.
  """
  folder = pathlib.Path(path)
  tsv = folder / TRANSCRIPTS
  if not tsv.is_file():
    raise SpeechDataError(f'{folder}: no {TRANSCRIPTS} (lines of file<TAB>transcript)')
  try:
    lines = tsv.read_text(encoding='utf-8-sig').splitlines()
  except UnicodeDecodeError as e:
    raise SpeechDataError(f'{tsv}: not UTF-8 text ({e.reason} at byte {e.start})') from None
  items = []
  for number, line in enumerate(lines, start=1):
    if line.strip():
      items.append(_read_line(folder, tsv, number, line))
  if not items:
    raise SpeechDataError(f'{tsv}: no utterances')
  return items


def _read_line(folder: pathlib.Path, tsv: pathlib.Path, number: int,
               line: str) -> tuple[pathlib.Path, str]:
  """One transcripts.tsv line -> (audio file, transcript), or the SpeechDataError that names it."""
  where = f'{tsv} line {number}'
  if '\t' not in line:
    raise SpeechDataError(f'{where}: no tab between the file name and the transcript')
  name, text = line.split('\t', 1)
  audio = folder / name.strip()
  text = text.strip()
  if not name.strip() or not audio.is_file():
    raise SpeechDataError(f'{where}: audio file {name.strip()!r} not found in {folder}')
  if not text:
    raise SpeechDataError(f'{where}: empty transcript for {name.strip()!r}')
  try:
    info = soundfile.info(str(audio))
  except (RuntimeError, TypeError) as e:  # soundfile's LibsndfileError is a RuntimeError
    raise SpeechDataError(f'{where}: {name.strip()!r} does not decode as audio '
                          f'({_reason(e)})') from None
  if info.frames == 0:
    raise SpeechDataError(f'{where}: {name.strip()!r} has no samples')
  return audio, text


def _reason(error: Exception) -> str:
  """libsndfile's own words ('Format not recognised.') without the path it repeats."""
  return getattr(error, 'error_string', None) or str(error)


def load_audio(path) -> np.ndarray:
  """An audio file -> float32 [N] at 16 kHz: channels averaged to mono, other rates resampled."""
  try:
    audio, rate = soundfile.read(str(path), dtype='float32', always_2d=True)  # [frames, channels]
  except (RuntimeError, TypeError) as e:
    raise SpeechDataError(f'{path}: does not decode as audio ({_reason(e)})') from None
  if audio.shape[0] == 0:
    raise SpeechDataError(f'{path}: has no samples')
  return np.clip(resample(audio.mean(axis=1), rate), -1.0, 1.0)
