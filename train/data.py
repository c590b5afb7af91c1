"""Deterministic data: a byte tokenizer, the tasks' example sources and grain pipelines.

Every training dataset is a grain `MapDataset` indexed by step: the batch of step s is
`dataset[s]`, a pure function of (seed, s). The data position of a checkpoint is therefore its
step, and a resumed run reads exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import sysconfig

import grain
import numpy as np

from train.config import UsageError

PAD, BOS, EOS, MASK = 0, 1, 2, 3
_OFFSET = 4  # byte b is token b + 4
VOCAB_SIZE = 264  # 4 specials + 256 bytes, rounded up to a multiple of 8


class DataError(UsageError):
  """Bad user data: the CLI prints it as one line and exits non-zero."""


def encode(text: str | bytes) -> np.ndarray:
  data = text.encode('utf-8') if isinstance(text, str) else text
  return np.frombuffer(data, np.uint8).astype(np.int32) + _OFFSET


def decode(tokens) -> str:
  """Token ids -> text; stops at the first EOS and skips the other special tokens."""
  out = bytearray()
  for t in np.asarray(tokens).tolist():
    if t == EOS:
      break
    if _OFFSET <= t < _OFFSET + 256:  # ids past the bytes only round the vocabulary up
      out.append(t - _OFFSET)
  return out.decode('utf-8', errors='replace')


class OwnSpecials:
  """Sequences as our own tokenizers build them, around PAD/BOS/EOS/MASK: a source is its tokens,
  a target (the labels) and a document end with EOS. A checkpoint's tokenizer
  (train/hf_tokenizer.py) builds them as transformers does instead."""
  special_ids = frozenset()  # never masked by mlm (EOS is: this keeps the byte runs as they were)
  mask_id = MASK

  def encode_source(self, text: str, length: int) -> np.ndarray:
    return self.encode(text)[:length]

  def encode_target(self, text: str, length: int) -> np.ndarray:
    return np.append(self.encode(text)[:length - 1], EOS).astype(np.int32)

  def encode_document(self, text: str) -> np.ndarray:
    return np.append(self.encode(text), EOS).astype(np.int32)

  def random_ids(self, rng, n: int) -> np.ndarray:
    """Replacement tokens for mlm: a random byte."""
    return rng.integers(_OFFSET, _OFFSET + 256, n)


class ByteTokenizer(OwnSpecials):
  """UTF-8 bytes, shifted past the special tokens: needs no training and no download."""
  name = 'byte'
  vocab_size = VOCAB_SIZE

  def encode(self, text: str) -> np.ndarray:
    return encode(text)

  def decode(self, tokens) -> str:
    return decode(tokens)


class TrainedTokenizer(OwnSpecials):
  """A vocabulary trained on the run's own training text, kept in the workdir so that a resumed
  run and `train.generate` read the same one. Subclasses: `_train` and `__init__(model_path)`."""

  @staticmethod
  def owner_path(model_path: str) -> str:
    """Where the options the model was trained with are kept, beside it."""
    return model_path[:model_path.rindex('.')] + '.json'

  @classmethod
  def train_or_load(cls, texts: list[str], model_path: str, vocab_size: int,
                    data: str | None = None):
    """Trains on `texts` unless the workdir has this run's model already. The model's options
    (vocabulary size, a fingerprint of the data) are kept beside it, so a model trained for
    another run is refused, never reused."""
    owner_path = cls.owner_path(model_path)
    owner = {'vocab_size': vocab_size, 'data': data}
    if pathlib.Path(model_path).exists() and pathlib.Path(owner_path).exists():
      saved = json.loads(pathlib.Path(owner_path).read_text())
      if saved.get('vocab_size') != vocab_size:
        raise DataError(f'{model_path} was trained with --vocab-size {saved.get("vocab_size")}, '
                        f'not {vocab_size}; it belongs to another run: use another --workdir')
      if saved.get('data') != data:
        raise DataError(f'{model_path} was trained on other --data ({saved.get("data")}; this '
                        f'one: {data}); it belongs to another run: use another --workdir')
    elif not pathlib.Path(model_path).exists():
      # The options first: a kill before the model lands leaves no model, so it is retrained.
      from train.workdir import write_json
      write_json(owner_path, owner)
      cls._train(texts, model_path, vocab_size)
    return cls(model_path)


class SentencePieceTokenizer(TrainedTokenizer):
  """A SentencePiece unigram model of the run's training text (`tokenizer.model`)."""
  name = 'sentencepiece'

  def __init__(self, model_path: str):
    import sentencepiece
    self.processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
    # Rounded up to a multiple of 8 for the embedding's sake; the extra ids are never produced.
    self.vocab_size = -(-self.processor.vocab_size() // 8) * 8

  @staticmethod
  def _train(texts: list[str], model_path: str, vocab_size: int) -> None:
    import sentencepiece
    prefix = f'{model_path[:-len(".model")]}.tmp-{os.getpid()}'
    try:
      sentencepiece.SentencePieceTrainer.train(
          sentence_iterator=iter(t for text in texts for t in text.splitlines() if t.strip()),
          model_prefix=prefix, vocab_size=vocab_size, model_type='unigram',
          pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=MASK, character_coverage=1.0,
          num_threads=1, minloglevel=2)
    except RuntimeError as e:
      raise DataError(f'cannot train a SentencePiece model of --vocab-size {vocab_size} on '
                      f'this data: {str(e).splitlines()[-1]}') from None
    # Renamed whole into place: a kill mid-training never leaves half a model behind.
    os.replace(prefix + '.vocab', model_path[:-len('.model')] + '.vocab')
    os.replace(prefix + '.model', model_path)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.processor.encode(text), np.int32)

  def decode(self, tokens) -> str:
    ids = []
    for t in np.asarray(tokens).tolist():
      if t == EOS:
        break
      if t > MASK and t < self.processor.vocab_size():
        ids.append(t)
    return self.processor.decode(ids)


def pad_to(tokens: np.ndarray, length: int, fill: int = PAD) -> np.ndarray:
  out = np.full(length, fill, np.int32)
  tokens = tokens[:length]
  out[:len(tokens)] = tokens
  return out


def read_text(path: str | pathlib.Path, on_bad_bytes: str = 'error') -> str:
  """Reads UTF-8 text; bad bytes are reported with file and offset, or replaced (U+FFFD)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f'--data {path}: no such file')
  data = path.read_bytes()
  if not data.strip():
    raise DataError(f'--data {path}: the file is empty')
  try:
    return data.decode('utf-8', errors='strict' if on_bad_bytes == 'error' else 'replace')
  except UnicodeDecodeError as e:
    raise DataError(f'--data {path}: byte {e.start} (0x{data[e.start]:02x}) is not valid UTF-8; '
                    'pass --on-bad-bytes replace to replace such bytes') from None


# ----------------------------------------------------------------------------------------------
# dates: "Tuesday, 24 November 2026" -> "2026-11-24"

MONTHS = ['January', 'February', 'March', 'April', 'May', 'June', 'July', 'August', 'September',
          'October', 'November', 'December']
WEEKDAYS = ['Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday', 'Sunday']
_FIRST, _LAST = datetime.date(1950, 1, 1).toordinal(), datetime.date(2049, 12, 31).toordinal()
# Every 10th day (by ordinal) is held out: evaluation dates never appear in training.
_DAYS = np.arange(_FIRST, _LAST + 1)
TRAIN_DAYS, EVAL_DAYS = _DAYS[_DAYS % 10 != 3], _DAYS[_DAYS % 10 == 3]


def _ordinal_suffix(d: int) -> str:
  return 'th' if 10 <= d % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d % 10, 'th')


_FORMATS = [
    lambda d, w: f'{WEEKDAYS[w]}, {d.day} {MONTHS[d.month - 1]} {d.year}',
    lambda d, w: f'{WEEKDAYS[w]} {MONTHS[d.month - 1]} {d.day}, {d.year}',
    lambda d, w: f'{d.day} {MONTHS[d.month - 1]} {d.year}',
    lambda d, w: f'{MONTHS[d.month - 1]} {d.day}, {d.year}',
    lambda d, w: f'{MONTHS[d.month - 1][:3].lower()} {d.day} {d.year}',
    lambda d, w: f'{d.day} {MONTHS[d.month - 1][:3]} {d.year}',
    lambda d, w: f'{d.day:02d}/{d.month:02d}/{d.year % 100:02d}',
    lambda d, w: f'{d.day}.{d.month}.{d.year}',
    lambda d, w: f'{d.day:02d}-{MONTHS[d.month - 1][:3].upper()}-{d.year}',
    lambda d, w: f'the {d.day}{_ordinal_suffix(d.day)} of {MONTHS[d.month - 1]} {d.year}',
    lambda d, w: f'{WEEKDAYS[w][:3]} {d.day} {MONTHS[d.month - 1][:3]} {d.year % 100:02d}',
    lambda d, w: f'{MONTHS[d.month - 1].upper()} {d.day} {d.year}',
]


def date_example(seed: int, index: int, split: str) -> tuple[str, str]:
  """The index-th (human-written date, ISO date) pair of a split, a pure function of its args."""
  rng = np.random.default_rng([seed, index, 0 if split == 'train' else 1])
  days = TRAIN_DAYS if split == 'train' else EVAL_DAYS
  day = datetime.date.fromordinal(int(days[rng.integers(len(days))]))
  text = _FORMATS[rng.integers(len(_FORMATS))](day, day.weekday())
  return text, day.isoformat()


# ----------------------------------------------------------------------------------------------
# text corpora, split by document

def stdlib_documents(limit_bytes: int = 8_000_000) -> list[str]:
  """The Python standard library's own .py files (every machine has them), sorted by path."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  docs, total = [], 0
  for path in sorted(root.glob('*.py')) + sorted(root.glob('*/*.py')):
    if 'site-packages' in path.parts or 'test' in path.parts:
      continue
    text = path.read_bytes().decode('utf-8', errors='replace')
    docs.append(text)
    total += len(text)
    if total >= limit_bytes:
      break
  return docs


def text_documents(data: str | None, on_bad_bytes: str = 'error') -> list[str]:
  """Documents of --data (a file split at blank lines, or a folder's files) or the stdlib's."""
  if data is None:
    return stdlib_documents()
  path = pathlib.Path(data)
  if path.is_dir():
    files = sorted(p for p in path.rglob('*') if p.is_file())
    if not files:
      raise DataError(f'--data {path}: the folder has no files')
    return [read_text(p, on_bad_bytes) for p in files]
  docs = [d for d in read_text(path, on_bad_bytes).split('\n\n') if d.strip()]
  return docs


def split_documents(docs: list, what: str, every: int = 10) -> tuple[list, list]:
  """Every `every`-th document is held out for evaluation; fewer than `every` is a DataError
  (holding one out would leave evaluation on training data or nothing to train on)."""
  if len(docs) < every:
    raise DataError(f'--data has {len(docs)} {what}; at least {every} are needed, as every '
                    f'{every}th is held out for evaluation')
  return ([d for i, d in enumerate(docs) if i % every != every - 1],
          [d for i, d in enumerate(docs) if i % every == every - 1])


def split_text(docs: list[str], every: int = 10) -> tuple[list[str], list[str], str | None]:
  """(train, held out, a note for the log): documents split as `split_documents` does; with
  fewer than `every`, the last 1/`every` of the text is held out by position instead."""
  if len(docs) >= every:
    return (*split_documents(docs, 'documents', every), None)
  text = '\n\n'.join(docs)
  cut = len(text) - max(1, len(text) // every)
  note = (f'--data has {len(docs)} document(s), fewer than {every}: its last '
          f'{len(text) - cut:,} of {len(text):,} characters are held out for evaluation')
  return [text[:cut]], [text[cut:]], note


def fingerprint(path: str | None) -> str | None:
  """Size and SHA-256 of the first and last MiB of --data's files: enough to notice a changed
  file on resume without reading a large corpus whole."""
  root = pathlib.Path(path) if path is not None else None
  if root is None or not root.exists():  # no --data, or a missing one that prepare() reports
    return None
  files = sorted(p for p in root.rglob('*') if p.is_file()) if root.is_dir() else [root]
  digest, size = hashlib.sha256(), 0
  for f in files:
    n = f.stat().st_size
    size += n
    digest.update(f'{f.relative_to(root) if root.is_dir() else ""}:{n}'.encode())
    with open(f, 'rb') as handle:
      digest.update(handle.read(1 << 20))
      if n > 2 << 20:
        handle.seek(-(1 << 20), os.SEEK_END)
        digest.update(handle.read())
  return f'{size} bytes, sha256 {digest.hexdigest()[:16]}'


def token_stream(docs: list[str], tokenizer=ByteTokenizer()) -> np.ndarray:
  """All documents as one token array, each as the tokenizer ends a document (ours: EOS)."""
  return np.concatenate([tokenizer.encode_document(d) for d in docs]).astype(np.int32)


def read_pairs(path: str, on_bad_bytes: str = 'error') -> list[tuple[str, str]]:
  """Tab-separated (source, target) lines."""
  pairs = []
  for n, line in enumerate(read_text(path, on_bad_bytes).splitlines(), 1):
    if not line.strip():
      continue
    fields = line.split('\t')
    if len(fields) != 2:
      raise DataError(f'--data {path}: line {n} has {len(fields)} tab-separated fields, '
                      'expected 2 (source<TAB>target)')
    pairs.append((fields[0], fields[1]))
  if not pairs:
    raise DataError(f'--data {path}: no sentence pairs')
  return pairs


# ----------------------------------------------------------------------------------------------
# batches

def batched(examples: grain.MapDataset, global_batch: int,
            rows: slice | None = None) -> grain.MapDataset:
  """This process's rows of each global batch; `dataset[s]` belongs to step s.

  Row r of global batch s is example s * global_batch + r; a process reads only `rows` (those its
  devices hold), so no host reads more of the batch than it needs.
  """
  rows = slice(0, global_batch) if rows is None else rows
  b = rows.stop - rows.start
  steps = len(examples) // global_batch
  local = grain.MapDataset.range(steps * b).map(
      lambda j: examples[(j // b) * global_batch + rows.start + j % b])
  return local.batch(b, drop_remainder=True)


def prefetch(dataset: grain.MapDataset, start: int):
  """Iterates `dataset[start], dataset[start + 1], ...` with background threads."""
  return iter(dataset[start:].to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)))
