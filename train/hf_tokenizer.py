"""A Hugging Face checkpoint's own tokenizer, read from local files without transformers.

Three layouts, looked for in this order (`find`):
  * Marian (OPUS-MT): `source.spm` / `target.spm` (SentencePiece) + `vocab.json`. Pieces become
    ids through vocab.json (unknown pieces: `<unk>`), a `>>lang<<` code in front is one token,
    and `</s>` is appended, as MarianTokenizer does; targets use target.spm, and decoded ids go
    back through vocab.json to pieces that target.spm joins.
  * `tokenizer.json`: the `tokenizers` package (GPT-2, BERT, BART, T5 and most hub models). Its
    post-processor adds the special tokens transformers adds ([CLS]/[SEP], <s>/</s>, </s>).
  * T5's `spiece.model`: SentencePiece ids are the model's ids, `</s>` appended.
Literal special-token text inside a sentence (e.g. "</s>") is encoded as text, not as the token.

Every tokenizer here offers what the tasks need: `encode` (plain ids), `encode_source` /
`encode_target` (a seq2seq source and its labels, truncated as transformers truncates: the
special tokens are kept), `encode_document` (text/mlm streams), `decode` (up to the model's eos,
special tokens skipped), `special_ids`, `mask_id` and `vocab_size` (ids it can produce).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

KINDS = {'marian': ('source.spm', 'target.spm', 'vocab.json'),
         'tokenizers': ('tokenizer.json',),
         'spiece': ('spiece.model',)}


def find(directory) -> str | None:
  """The kind of tokenizer `directory` holds (a key of KINDS), or None."""
  directory = pathlib.Path(directory)
  for kind, files in KINDS.items():
    if all((directory / f).is_file() for f in files):
      return kind
  return None


def load(directory, kind: str, *, eos_id: int, doc_end: int | None = None,
         source_prefix: str = ''):
  """The tokenizer of `kind` in `directory`. `eos_id`: the model's end token (decoding stops
  there); `doc_end`: a token appended to every document (GPT-2's <|endoftext|>), if any;
  `source_prefix`: text put before every source (T5's task prefix)."""
  cls = {'marian': MarianTokenizer, 'tokenizers': JsonTokenizer, 'spiece': SpieceTokenizer}[kind]
  return cls(pathlib.Path(directory), eos_id=eos_id, doc_end=doc_end,
             source_prefix=source_prefix)


def _ids(values) -> np.ndarray:
  return np.asarray(values, np.int32).reshape(-1)


class _Base:
  name = 'pretrained'
  mask_id = None  # set where the vocabulary has a mask token (BERT's [MASK])

  def __init__(self, eos_id: int, doc_end: int | None, source_prefix: str):
    self.eos_id, self.doc_end, self.source_prefix = eos_id, doc_end, source_prefix

  def _with_specials(self, text: str, length: int, target: bool) -> np.ndarray:
    """Ids with the layout's special tokens, truncated to `length` with the specials kept."""
    raise NotImplementedError

  def encode_source(self, text: str, length: int) -> np.ndarray:
    return self._with_specials(self.source_prefix + text, length, target=False)

  def encode_target(self, text: str, length: int) -> np.ndarray:
    """The labels: they end with eos even where the post-processor adds none."""
    ids = self._with_specials(text, length, target=True)
    if not len(ids) or ids[-1] != self.eos_id:
      ids = np.append(ids[:length - 1], self.eos_id)
    return _ids(ids)

  def encode_document(self, text: str) -> np.ndarray:
    ids = self._with_specials(text, 1 << 30, target=False)
    return _ids(ids if self.doc_end is None else np.append(ids, self.doc_end))

  def random_ids(self, rng, n: int) -> np.ndarray:
    """Replacement tokens for mlm: any id, as transformers' DataCollatorForLanguageModeling."""
    return rng.integers(0, self.vocab_size, n)

  def _until_eos(self, tokens) -> list[int]:
    ids = np.asarray(tokens).tolist()
    return ids[:ids.index(self.eos_id)] if self.eos_id in ids else ids


class JsonTokenizer(_Base):
  """tokenizer.json through the `tokenizers` package."""

  def __init__(self, directory: pathlib.Path, **kw):
    super().__init__(**kw)
    import tokenizers
    self.tok = tokenizers.Tokenizer.from_file(str(directory / 'tokenizer.json'))
    # A saved padding/truncation setting would pad or cut every encode: sequences are built here.
    self.tok.no_padding()
    self.tok.no_truncation()
    added = self.tok.get_added_tokens_decoder()
    self.special_ids = frozenset(i for i, t in added.items() if t.special)
    self.mask_id = next((i for i, t in added.items() if t.special and 'mask' in t.content.lower()),
                        None)
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> np.ndarray:
    return _ids(self.tok.encode(text, add_special_tokens=False).ids)

  def _with_specials(self, text, length, target):
    # Truncated before the post-processor adds the special tokens, as transformers truncates.
    encoding = self.tok.encode(text, add_special_tokens=False)
    encoding.truncate(max(length - self.tok.num_special_tokens_to_add(False), 0))
    return _ids(self.tok.post_process(encoding).ids)

  def decode(self, tokens) -> str:
    return self.tok.decode(self._until_eos(tokens), skip_special_tokens=True)


class _SentencePiece(_Base):
  """Shared by Marian and T5: ids + eos, truncated to keep the eos."""

  def _with_specials(self, text, length, target):
    return _ids(np.append(self._encode(text, target)[:max(length - 1, 0)], self.eos_id))

  def encode(self, text: str) -> np.ndarray:
    return _ids(self._encode(text, False))


class MarianTokenizer(_SentencePiece):

  def __init__(self, directory: pathlib.Path, **kw):
    super().__init__(**kw)
    import sentencepiece
    self.source = sentencepiece.SentencePieceProcessor(model_file=str(directory / 'source.spm'))
    self.target = sentencepiece.SentencePieceProcessor(model_file=str(directory / 'target.spm'))
    self.vocab = json.loads((directory / 'vocab.json').read_text(encoding='utf-8'))
    if '<unk>' not in self.vocab:
      raise ValueError(f'{directory / "vocab.json"} has no <unk> token')
    self.pieces = {i: p for p, i in self.vocab.items()}
    self.special_ids = frozenset(self.vocab[t] for t in ('</s>', '<unk>', '<pad>')
                                 if t in self.vocab)
    self.vocab_size = max(self.vocab.values()) + 1

  def _encode(self, text: str, target: bool) -> list[int]:
    code = []
    if text.startswith('>>') and (end := text.find('<<')) != -1:  # a language code: one token
      code, text = [text[:end + 2]], text[end + 2:]
    pieces = code + (self.target if target else self.source).encode(text, out_type=str)
    unk = self.vocab['<unk>']
    return [self.vocab.get(p, unk) for p in pieces]

  def decode(self, tokens) -> str:
    pieces = [self.pieces.get(i) or self.target.IdToPiece(i) for i in self._until_eos(tokens)
              if i not in self.special_ids and 0 <= i]
    return self.target.decode_pieces(pieces).replace('\u2581', ' ').strip()


class SpieceTokenizer(_SentencePiece):
  """T5's spiece.model: its ids are the model's (pad 0, eos 1, unk 2)."""

  def __init__(self, directory: pathlib.Path, **kw):
    super().__init__(**kw)
    import sentencepiece
    self.spm = sentencepiece.SentencePieceProcessor(model_file=str(directory / 'spiece.model'))
    self.special_ids = frozenset(
        i for i in (self.spm.pad_id(), self.spm.eos_id(), self.spm.unk_id(), self.eos_id)
        if i >= 0)
    self.vocab_size = self.spm.vocab_size()

  def _encode(self, text: str, target: bool) -> list[int]:
    return self.spm.encode(text)

  def decode(self, tokens) -> str:
    n = self.spm.vocab_size()
    return self.spm.decode([i for i in self._until_eos(tokens)
                            if i not in self.special_ids and 0 <= i < n])
