"""--task summarize: an encoder-decoder Transformer writes a one-sentence summary of a document.

Data (train/summarize_data.py): by default the Python standard library's functions, each
summarized by the first sentence of its docstring, evaluation holding out whole modules; with
`--data` a TSV (`document<TAB>summary`) or JSON Lines file, every 10th pair held out.

Tokens: a SentencePiece model trained on the training pairs by default; on the default data the
tiny model's held-out ROUGE-L reached 17.3 / 19.9 / 18.2 at steps 1000 / 1500 / 2000 with it
and 14.5 at step 1200 with bytes (--tokenizer byte). Lengths, in tokens: 128 source and 48
target tokens with SentencePiece or a checkpoint's tokenizer (a few bytes a token); with bytes:
  source  256 bytes: about 65% of the default documents (median 166 bytes) fit whole; longer
          ones are cut at the end, which keeps the `def` line and the start of the body.
  target   96 bytes with eos: about 94% of the summaries (median 49 bytes) fit whole; longer
          ones are cut (the labels still end with eos).

Evaluation: the held-out loss on every held-out pair, and ROUGE-1/2/L F1 (train.scoring.rouge)
of beam-search summaries (`--beam-size` beams, up to the target length, length penalty 1.0, no
repeated 6-byte / 3-piece n-gram) on a seeded sample of at most EVAL_ROUGE_PAIRS held-out pairs, which keeps each evaluation cheap.
"""

from __future__ import annotations

import numpy as np

from flaxformer_lite import generate
from train import data, pretrained, summarize_data
from train.config import UsageError
from train.tasks import Seq2SeqTask, _valid, to_host

EVAL_ROUGE_PAIRS = 128  # held-out pairs decoded with beams at every evaluation
DECODE_BATCH = 64  # rows per beam-search call (each row holds --beam-size beams)
LENGTH_PENALTY = 1.0  # transformers' default: log-probability per token, no extra push
# A small model's beams fall into loops ('the the the ...'); banning a repeated n-gram stops
# them. Six bytes leave a sentence's repeated short words (' the ', ' of ') alone; three pieces
# are BART's summarization setting. A checkpoint's own generation settings decide for it.
NO_REPEAT_BYTES, NO_REPEAT_PIECES = 6, 3
BYTE_LENGTHS = (256, 96)  # (source, target) with the byte tokenizer
PIECE_LENGTHS = (128, 48)  # with SentencePiece or a checkpoint's tokenizer
HEAD_CHARS = 48  # of a document's first line, in the printed examples


class SummarizeTask(Seq2SeqTask):
  """(document, summary) pairs; ROUGE of beam-search summaries at every evaluation."""
  src_len, tgt_len = BYTE_LENGTHS
  attention_title = 'cross-attention, last decoder layer (mean over heads): summary vs document'

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    # pretrained.load (which runs before prepare) knows only the families of the tasks listed
    # in its TASK_FAMILY; without an entry for summarize it would fail with a KeyError.
    if self.run.init_from and 'summarize' not in pretrained.TASK_FAMILY:
      raise UsageError('--task summarize --init-from: train/pretrained.py does not list '
                       'summarize among its tasks (TASK_FAMILY) yet')

  def prepare(self):
    if self.run.data is None:
      self._train, held_out = summarize_data.default_pairs(self.run.seed)
    else:
      pairs = summarize_data.read_summaries(self.run.data, self.run.on_bad_bytes)
      self._train, held_out = data.split_documents(pairs, '(document, summary) pairs')
    self.make_tokenizer([text for pair in self._train for text in pair])
    if not isinstance(self.tokenizer, data.ByteTokenizer):
      self.src_len, self.tgt_len = PIECE_LENGTHS
    self._rouge_pairs, rest = self._rouge_subset(held_out)
    # The ROUGE pairs first: attention.png draws the first pair (the shortest document of the
    # subset, so that its labels stay legible).
    self._eval = self._rouge_pairs + rest

  def _rouge_subset(self, held_out: list) -> tuple[list, list]:
    """(a seeded sample of at most EVAL_ROUGE_PAIRS pairs sorted by document length, the
    others in their order)."""
    rng = np.random.default_rng([self.run.seed, 2 ** 31])
    chosen = set(rng.choice(len(held_out), min(EVAL_ROUGE_PAIRS, len(held_out)),
                            replace=False).tolist())
    subset = sorted((held_out[i] for i in sorted(chosen)), key=lambda p: len(p[0]))
    return subset, [p for i, p in enumerate(held_out) if i not in chosen]

  def train_examples(self):
    return self.pair_examples(self._train)

  def eval_pairs(self):
    return self._eval

  def summarize(self, model, params, documents: list[str]) -> list[str]:
    """Beam-search summaries of `documents`, DECODE_BATCH at a time (the last call padded to a
    full batch with copies, so that every call has the same shape and compiles once)."""
    out = []
    for i in range(0, len(documents), DECODE_BATCH):
      chunk = documents[i:i + DECODE_BATCH]
      padded = chunk + [chunk[-1]] * (min(DECODE_BATCH, len(documents)) - len(chunk))
      rows = [self.tokenizer.encode_source(d, self.src_len) for d in padded]
      src = np.stack([data.pad_to(r, self.src_len, self.ids.pad) for r in rows])
      valid = np.stack([_valid(len(r), self.src_len) for r in rows])
      tokens = generate(model, {'params': params}, src, valid=valid,
                        max_new_tokens=self.tgt_len, num_beams=self.run.beam_size,
                        length_penalty=LENGTH_PENALTY, early_stopping=True,
                        no_repeat_ngram_size=self._no_repeat())
      out += [self.tokenizer.decode(row) for row in to_host(tokens)[:len(chunk)]]
    return out

  def _no_repeat(self) -> int | None:
    if isinstance(self.tokenizer, data.ByteTokenizer):
      return NO_REPEAT_BYTES
    return None if self.run.init_from else NO_REPEAT_PIECES

  def examples(self, model, params, n):
    """ROUGE-1/2/L F1 (percent) on the ROUGE subset, and `n` of its summaries spread over the
    document lengths: 'document head -> prediction | reference'."""
    from train.scoring import rouge
    pairs = self._rouge_pairs
    predictions = self.summarize(model, params, [d for d, _ in pairs])
    scores = rouge(predictions, [s for _, s in pairs])
    shown = sorted({i * len(pairs) // n for i in range(n)}) if n else []
    lines = [f'{_head(pairs[i][0])!r:{HEAD_CHARS + 2}} -> {predictions[i]!r}\n'
             f'  {"":{HEAD_CHARS + 2}}    reference {pairs[i][1]!r}' for i in shown]
    return scores, lines


def _head(document: str) -> str:
  """The document's first non-blank line, cut to HEAD_CHARS characters."""
  first = next((line.strip() for line in document.splitlines() if line.strip()), '')
  return first if len(first) <= HEAD_CHARS else first[:HEAD_CHARS - 3] + '...'
