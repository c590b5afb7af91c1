"""`--tokenizer word-pieces`: pieces that never cross a word, split first as BERT splits.

BERT's pre-tokenizer cuts the text at every space and punctuation character before any piece is
looked up, so a name is the same ids wherever it stands: `timeout` in a question and in
`(address, timeout=None)` are the same tokens. A plain SentencePiece model glues the space (or
its absence) to the piece, so the two spellings often become different ids, and extractive QA,
which matches the question's words against the context's, then learns far slower. Case is kept:
in code, `Path` and `path` are different names.

The pieces are a SentencePiece unigram model trained on the pre-split words (one thread: the
same text gives the same vocabulary, byte for byte; the `tokenizers` trainers break ties in
hash order, so two trainings on the same text differ). Encoding runs through the `tokenizers`
package (BERT's pre-tokenizer, the unigram pieces), which gives every token its characters.

Decoding puts spaces around punctuation ('os . path'), so only `--task qa`, whose answers are
spans of the context itself, uses it.
"""

from __future__ import annotations

import os

import numpy as np

from train.data import EOS, MASK, DataError, SentencePieceTokenizer, TrainedTokenizer

FILE = 'word_pieces.json'  # in the workdir; its options beside it in word_pieces.owner.json


def _pre_tokenizer():
  from tokenizers import pre_tokenizers
  return pre_tokenizers.Sequence([pre_tokenizers.BertPreTokenizer(),
                                  pre_tokenizers.Metaspace(prepend_scheme='always')])


class WordPiecesTokenizer(TrainedTokenizer):
  """Ids of a unigram model over BERT-split words; our specials at PAD/BOS/EOS, unknown at MASK
  (as SentencePieceTokenizer)."""
  name = 'word-pieces'

  def __init__(self, model_path: str):
    import tokenizers
    self.tok = tokenizers.Tokenizer.from_file(model_path)
    self.vocab_size = -(-self.tok.get_vocab_size() // 8) * 8  # see SentencePieceTokenizer

  @staticmethod
  def owner_path(model_path: str) -> str:
    return model_path[:model_path.rindex('.')] + '.owner.json'  # the model itself is .json

  @staticmethod
  def _train(texts: list[str], model_path: str, vocab_size: int) -> None:
    import sentencepiece
    import tokenizers
    from tokenizers import decoders, models
    pre = _pre_tokenizer()
    # One line of space-separated words per text line: SentencePiece then learns '▁word' pieces,
    # the very strings Metaspace makes of each word at encoding time.
    lines = (' '.join(w[1:] for w, _ in pre.pre_tokenize_str(line))
             for text in texts for line in text.splitlines() if line.strip())
    tmp = f'{model_path}.tmp-{os.getpid()}'
    try:
      sentencepiece.SentencePieceTrainer.train(
          sentence_iterator=lines, model_prefix=tmp, vocab_size=vocab_size,
          model_type='unigram', pad_id=0, bos_id=1, eos_id=EOS, unk_id=MASK,
          character_coverage=1.0, normalization_rule_name='identity', num_threads=1,
          minloglevel=2)
    except RuntimeError as e:
      raise DataError(f'cannot train a word-pieces model of --vocab-size {vocab_size} on this '
                      f'data: {str(e).splitlines()[-1]}') from None
    sp = SentencePieceTokenizer(tmp + '.model').processor
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())]
    tok = tokenizers.Tokenizer(models.Unigram(pieces, unk_id=MASK, byte_fallback=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(prepend_scheme='always')
    tok.save(tmp)
    os.replace(tmp, model_path)  # whole into place: a kill never leaves half a model
    for suffix in ('.model', '.vocab'):
      os.remove(tmp + suffix)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, tokens) -> str:
    """Pieces up to the first EOS, specials and unknowns skipped."""
    ids = []
    for t in np.asarray(tokens).tolist():
      if t == EOS:
        break
      if MASK < t < self.tok.get_vocab_size():
        ids.append(t)
    return self.tok.decode(ids)
