"""Scores of generated text: ROUGE for `--task summarize`, WER and CER for `--task speech`.

Both take `predictions` and `references` as equal-length lists of strings and return percents
(0-100, higher ROUGE and lower WER/CER are better). `rouge-score` and `jiwer` are imported inside
the functions: they belong to the `train` extra, and nothing else needs them.
"""

from __future__ import annotations

import unicodedata


def _check(predictions: list[str], references: list[str]) -> None:
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions but {len(references)} references')
  if not references:
    raise ValueError('nothing to score: no references')


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
  """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over the pairs, in percent.

  Computed by Google's `rouge-score` package (the reference implementation of the summarization
  papers): `RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True)`, each pair scored on
  its own and the F1 averaged (no bootstrap aggregation). Its tokenizer lower-cases and keeps only
  runs of [a-z0-9], applying the Porter stemmer; text in other scripts is therefore not scored
  meaningfully. rougeL is the sentence-level LCS (not rougeLsum). An empty prediction or
  reference scores 0 for its pair.
  """
  from rouge_score import rouge_scorer
  _check(predictions, references)
  keys = ('rouge1', 'rouge2', 'rougeL')
  scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
  totals = dict.fromkeys(keys, 0.0)
  for prediction, reference in zip(predictions, references):
    scores = scorer.score(reference, prediction)  # score(target, prediction): order matters
    for k in keys:
      totals[k] += scores[k].fmeasure
  return {k: 100.0 * totals[k] / len(references) for k in keys}


def normalize_transcript(text: str) -> str:
  """The text both sides of WER/CER are compared in: lower case; apostrophes removed ("don't"
  -> "dont"); other punctuation (Unicode category P*) replaced by a space ("well-known" ->
  "well known"); whitespace collapsed to single spaces and stripped. Symbols and digits stay."""
  text = text.lower().replace("'", '').replace('\u2019', '')
  text = ''.join(' ' if unicodedata.category(c).startswith('P') else c for c in text)
  return ' '.join(text.split())


def wer_cer(predictions: list[str], references: list[str]) -> dict[str, float]:
  """Corpus-level word and character error rates in percent, by `jiwer`, after
  `normalize_transcript` on both sides.

  Corpus-level: edits summed over all pairs divided by the references' total words (characters),
  which is how jiwer scores lists, so long utterances weigh more. The error rate can exceed 100
  (insertions). Characters include the single spaces between words (jiwer's CER).

  Empty references (after normalization): such a pair adds its prediction's words (characters)
  as insertions and nothing to the denominator. If every reference is empty the rates are
  undefined and a ValueError is raised.
  """
  import jiwer
  _check(predictions, references)
  hypotheses = [normalize_transcript(p) for p in predictions]
  targets = [normalize_transcript(r) for r in references]
  if not any(targets):
    raise ValueError('every reference is empty after normalization: WER/CER are undefined')
  words = jiwer.process_words(targets, hypotheses)
  chars = jiwer.process_characters(targets, hypotheses)
  return {'wer': 100.0 * _error_rate(words), 'cer': 100.0 * _error_rate(chars)}


def _error_rate(output) -> float:
  """(S + D + I) / (S + D + H): written out rather than read from jiwer's `.wer`, so the rule
  for empty references above does not depend on jiwer's version."""
  edits = output.substitutions + output.deletions + output.insertions
  return edits / (output.substitutions + output.deletions + output.hits)
