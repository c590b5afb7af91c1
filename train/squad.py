"""Extractive question answering (SQuAD v1.1 / v2.0): reading, windows, span decoding, scoring.

Pure functions for `--task qa` (BertEncoder's start/end head):
  * `read_squad(path)` -> [Example]; bad input is one `DataError` naming the file and question.
  * `offset_tokenizer(tok)` -> `tokenize(text) -> (ids [n] int32, offsets [n, 2] int32)`, the
    character span of each token in `text`, for our byte and SentencePiece tokenizers and for a
    `tokenizers.Tokenizer` (a checkpoint's tokenizer.json).
  * `windows(example, tokenize, ...)` -> [Window]: `[CLS] question [SEP] context-chunk [SEP]`, as
    BERT's run_squad.py builds them (overlapping chunks of a long context); optionally the
    context tokens of words the question also has marked by a third token type (DrQA's exact
    match feature, `question_word_chars`).
  * `best_span`, `predict`: logits -> answer text; `squad_scores`: the official metric.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
import string
from typing import Callable

import numpy as np

from train import data
from train.data import DataError


@dataclasses.dataclass(frozen=True)
class Answer:
  text: str
  start: int  # character offset in the context: context[start:start + len(text)] == text

  @property
  def end(self) -> int:
    return self.start + len(self.text)


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  question: str
  context: str
  answers: tuple[Answer, ...]  # empty when is_impossible; several gold answers in dev sets
  is_impossible: bool = False  # SQuAD v2.0: no answer in the context


# ---------------------------------------------------------------------------------------------
# Reading SQuAD JSON

def _field(obj, key: str, kind: type, path, where: str):
  """obj[key], which must be of `kind`; otherwise one DataError naming file and place."""
  if not isinstance(obj, dict) or key not in obj:
    raise DataError(f'{path}: {where}: missing field "{key}"')
  value = obj[key]
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise DataError(f'{path}: {where}: field "{key}" is {type(value).__name__}, '
                    f'expected {kind.__name__}')
  return value


def _answers(qa: dict, context: str, path, where: str) -> tuple[Answer, ...]:
  answers = []
  for a in _field(qa, 'answers', list, path, where):
    text = _field(a, 'text', str, path, where)
    start = _field(a, 'answer_start', int, path, where)
    if not text.strip():
      raise DataError(f'{path}: {where}: an answer is empty')
    if start < 0 or context[start:start + len(text)] != text:
      raise DataError(f'{path}: {where}: answer {text!r} at answer_start {start} is outside its '
                      f'context (the context there reads {context[start:start + len(text)]!r})')
    answers.append(Answer(text, start))
  if not answers:
    raise DataError(f'{path}: {where}: no answers (and not marked "is_impossible")')
  return tuple(answers)


def read_squad(path) -> list[Example]:
  """Every question of a SQuAD v1.1 or v2.0 file, in file order. v2.0's unanswerable questions
  (`is_impossible: true`) have no answers (their `plausible_answers` are ignored)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f'{path}: no such file')
  try:
    raw = json.loads(path.read_text(encoding='utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f'{path}: not a SQuAD JSON file ({e})') from None
  examples, seen = [], set()
  for a, article in enumerate(_field(raw, 'data', list, path, 'top level')):
    for p, para in enumerate(_field(article, 'paragraphs', list, path, f'data[{a}]')):
      where = f'data[{a}].paragraphs[{p}]'
      context = _field(para, 'context', str, path, where)
      for q, qa in enumerate(_field(para, 'qas', list, path, where)):
        qid = _field(qa, 'id', str, path, f'{where}.qas[{q}]')
        where_q = f'question {qid}'
        if qid in seen:
          raise DataError(f'{path}: {where_q}: the id is used twice')
        seen.add(qid)
        question = _field(qa, 'question', str, path, where_q)
        impossible = qa.get('is_impossible', False)
        if not isinstance(impossible, bool):
          raise DataError(f'{path}: {where_q}: field "is_impossible" is not true/false')
        answers = () if impossible else _answers(qa, context, path, where_q)
        examples.append(Example(qid, question, context, answers, impossible))
  if not examples:
    raise DataError(f'{path}: no questions')
  return examples


# ---------------------------------------------------------------------------------------------
# Tokenization with character offsets

Tokenize = Callable[[str], tuple[np.ndarray, np.ndarray]]  # text -> ids [n], offsets [n, 2]


def _char_of_byte(text: str) -> np.ndarray:
  """[len(utf-8 bytes) + 1]: the index of the character each byte belongs to (+ the end)."""
  sizes = [len(c.encode('utf-8')) for c in text]
  return np.append(np.repeat(np.arange(len(text)), sizes), len(text)).astype(np.int32)


def _trimmed(text: str, offsets) -> np.ndarray:
  """[n, 2] int32 spans without their surrounding whitespace: SentencePiece's '▁x' and byte-level
  BPE's 'Ġx' cover the space before the word; an answer starts at the word."""
  out = np.zeros((len(offsets), 2), np.int32)
  for i, (a, b) in enumerate(offsets):
    while a < b and text[a].isspace():
      a += 1
    while b > a and text[b - 1].isspace():
      b -= 1
    out[i] = a, b
  return out


def tokenize_bytes(text: str) -> tuple[np.ndarray, np.ndarray]:
  """ByteTokenizer: one token per UTF-8 byte; each byte spans its whole character."""
  starts = _char_of_byte(text)[:-1]
  return data.encode(text), np.stack([starts, starts + 1], axis=1).astype(np.int32)


def sentencepiece_tokenize(processor) -> Tokenize:
  """A `sentencepiece.SentencePieceProcessor`: its proto pieces carry `begin`/`end`, byte offsets
  into the original (unnormalized) text, converted here to character offsets."""
  def tokenize(text):
    try:
      proto = processor.encode(text, out_type='proto')  # sentencepiece >= 0.2.1
    except (ValueError, TypeError):
      proto = processor.encode(text, out_type='immutable_proto')
    char = _char_of_byte(text)
    ids = np.asarray([p.id for p in proto.pieces], np.int32)
    return ids, _trimmed(text, [(char[p.begin], char[p.end]) for p in proto.pieces])
  return tokenize


def tokenizers_tokenize(tokenizer) -> Tokenize:
  """A `tokenizers.Tokenizer`: its encodings carry character offsets (special tokens not added)."""
  def tokenize(text):
    enc = tokenizer.encode(text, add_special_tokens=False)
    return np.asarray(enc.ids, np.int32).reshape(-1), _trimmed(text, enc.offsets)
  return tokenize


def offset_tokenizer(tokenizer) -> Tokenize:
  """The `tokenize(text) -> (ids, offsets)` of any tokenizer the program uses."""
  import sentencepiece
  import tokenizers
  from train import hf_tokenizer, word_pieces
  if isinstance(tokenizer, data.ByteTokenizer):
    return tokenize_bytes
  if isinstance(tokenizer, data.SentencePieceTokenizer):
    return sentencepiece_tokenize(tokenizer.processor)
  if isinstance(tokenizer, word_pieces.WordPiecesTokenizer):
    return tokenizers_tokenize(tokenizer.tok)
  if isinstance(tokenizer, sentencepiece.SentencePieceProcessor):
    return sentencepiece_tokenize(tokenizer)
  if isinstance(tokenizer, hf_tokenizer.JsonTokenizer):
    return tokenizers_tokenize(tokenizer.tok)
  if isinstance(tokenizer, tokenizers.Tokenizer):
    return tokenizers_tokenize(tokenizer)
  raise TypeError(f'no character offsets for a {type(tokenizer).__name__} tokenizer')


# ---------------------------------------------------------------------------------------------
# Windows: [CLS] question [SEP] context-chunk [SEP] (BERT's run_squad.py convert_examples_...)

@dataclasses.dataclass(frozen=True)
class Window:
  """One model input of length L. `start`/`end`: the answer's first/last token when it lies
  wholly in this window, else 0 ([CLS]), as are unanswerable questions."""
  example_id: str
  context: str
  tokens: np.ndarray  # [L] int32
  # [L] int32: 0 [CLS] question [SEP], 1 context [SEP], 0 padding; QUESTION_WORD for context
  # tokens of a word the question has, where the windows were built with question_words
  token_types: np.ndarray
  valid: np.ndarray  # [L] bool, False for padding
  offsets: np.ndarray  # [L, 2] int32: context characters of each context token; -1 elsewhere
  start: int
  end: int


QUESTION_WORD = 2  # the token type of a context token whose word is also a word of the question


def question_word_chars(question: str, context: str) -> np.ndarray:
  """[len(context)] bool: True on the characters of each context word (a run of \\w) that is
  also a word of the question, case kept (`timeout` is not `Timeout` in code).

  DrQA's exact-match feature (Chen et al. 2017): a from-scratch reader learns where the question's
  names stand in the context from a marked token at once, while finding them by attention alone
  takes it thousands of steps (the default qa data: held-out F1 ~50 at 1,000 steps without the
  mark, ~94 at 750 with it). Whole words only: `formatyear` does not mark `formatyearpage`."""
  words = set(re.findall(r'\w+', question))
  marked = np.zeros(len(context), bool)
  for m in re.finditer(r'\w+', context):
    if m.group() in words:
      marked[m.start():m.end()] = True
  return marked


def _token_span(offsets: np.ndarray, answer: Answer) -> tuple[int, int] | None:
  """First and last token (of a text tokenized with `offsets` [n, 2]) overlapping the answer."""
  hit = np.flatnonzero((offsets[:, 1] > offsets[:, 0]) & (offsets[:, 1] > answer.start)
                       & (offsets[:, 0] < answer.end))
  return (int(hit[0]), int(hit[-1])) if len(hit) else None


def _chunk_starts(n: int, room: int, doc_stride: int) -> list[int]:
  """Where each chunk of an n-token context starts: every `doc_stride` tokens (BERT's meaning:
  the step between chunk starts, so consecutive chunks overlap by room - doc_stride tokens)."""
  starts, begin = [], 0
  while True:
    starts.append(begin)
    if begin + room >= n:
      return starts
    begin += min(room, doc_stride)


def windows(example: Example, tokenize: Tokenize, *, max_len: int, doc_stride: int,
            max_question_len: int, cls_id: int, sep_id: int, pad_id: int,
            question_words: bool = False) -> list[Window]:
  """The windows of one example (BERT's SQuAD preprocessing). The question is cut to
  `max_question_len` tokens; the context is split into chunks of max_len - 3 - question tokens
  starting every `doc_stride` tokens. Training uses the first gold answer. `question_words`:
  context tokens starting in a word of the question get token type QUESTION_WORD."""
  q_ids = tokenize(example.question)[0][:max_question_len]
  c_ids, c_offsets = tokenize(example.context)
  room = max_len - len(q_ids) - 3
  if room < 1 or doc_stride < 1:
    raise ValueError(f'max_len {max_len} leaves no room for the context after a question of '
                     f'{len(q_ids)} tokens, or doc_stride {doc_stride} < 1')
  answer = None if example.is_impossible else _token_span(c_offsets, example.answers[0])
  head = len(q_ids) + 2  # where the context starts: after [CLS] question [SEP]
  c_types = np.ones(len(c_ids), np.int32)
  if question_words and len(c_ids):
    marked = question_word_chars(example.question, example.context)
    c_types[marked[np.clip(c_offsets[:, 0], 0, max(len(marked) - 1, 0))]] = QUESTION_WORD
  out = []
  for begin in _chunk_starts(len(c_ids), room, doc_stride):
    stop = min(begin + room, len(c_ids))
    n = head + stop - begin + 1
    tokens = np.full(max_len, pad_id, np.int32)
    tokens[:n] = np.concatenate([[cls_id], q_ids, [sep_id], c_ids[begin:stop], [sep_id]])
    token_types = np.zeros(max_len, np.int32)
    token_types[head:n - 1] = c_types[begin:stop]
    token_types[n - 1] = 1  # the final [SEP]
    offsets = np.full((max_len, 2), -1, np.int32)
    offsets[head:n - 1] = c_offsets[begin:stop]
    start = end = 0
    if answer is not None and begin <= answer[0] and answer[1] < stop:
      start, end = answer[0] - begin + head, answer[1] - begin + head
    out.append(Window(example.id, example.context, tokens, token_types,
                      np.arange(max_len) < n, offsets, start, end))
  return out


def to_batch(batch_windows: list[Window]) -> dict[str, np.ndarray]:
  """Stacks windows: tokens/token_types/valid [B, L], start/end [B] (the training targets)."""
  return {'tokens': np.stack([w.tokens for w in batch_windows]),
          'token_types': np.stack([w.token_types for w in batch_windows]),
          'valid': np.stack([w.valid for w in batch_windows]),
          'start': np.asarray([w.start for w in batch_windows], np.int32),
          'end': np.asarray([w.end for w in batch_windows], np.int32)}


# ---------------------------------------------------------------------------------------------
# Decoding spans

def best_span(start_logits, end_logits, window: Window,
              max_answer_len: int) -> tuple[float, int, int]:
  """(score, char_start, char_end) of the best span of one window: start_logits [T] + end_logits
  [T] at tokens start <= end, both context tokens with characters, at most max_answer_len
  tokens long. (-inf, 0, 0) if the window has no context token. Ties: the earliest span."""
  s = np.asarray(start_logits, np.float64)
  e = np.asarray(end_logits, np.float64)
  off = window.offsets
  ctx = off[:, 1] > off[:, 0]  # -1/-1 outside the context; empty for a bare whitespace piece
  pos = np.arange(len(ctx))
  length = pos[None, :] - pos[:, None] + 1  # [start, end] tokens
  ok = ctx[:, None] & ctx[None, :] & (length >= 1) & (length <= max_answer_len)
  scores = np.where(ok, s[:, None] + e[None, :], -np.inf)
  i, j = np.unravel_index(np.argmax(scores), scores.shape)
  if not np.isfinite(scores[i, j]):
    return float('-inf'), 0, 0
  return float(scores[i, j]), int(off[i, 0]), int(off[j, 1])


def predict(example_windows: list[Window], start_logits, end_logits, *, max_answer_len: int = 30,
            with_null: bool = False, null_threshold: float = 0.0) -> tuple[str, float]:
  """(answer text, score) of one example from its windows' logits [W, T] each.

  The answer is the best span of all windows (`best_span`). With `with_null` (SQuAD v2.0) the
  rule of BERT's run_squad.py: null score = the smallest start[0] + end[0] ([CLS]) over the
  windows; the answer is '' (no answer) when null score - best span score > null_threshold.
  """
  best = (float('-inf'), 0, 0, example_windows[0])
  for w, s, e in zip(example_windows, start_logits, end_logits):
    score, a, b = best_span(s, e, w, max_answer_len)
    if score > best[0]:
      best = (score, a, b, w)
  score, a, b, w = best
  if with_null:
    null = min(float(s[0]) + float(e[0]) for s, e in zip(start_logits, end_logits))
    if null - score > null_threshold:
      return '', null
  return w.context[a:b], score


# ---------------------------------------------------------------------------------------------
# The official evaluation (evaluate-v1.1.py / evaluate-v2.0.py)

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """Lower case, drop string.punctuation, drop the words a/an/the, collapse whitespace."""
  s = ''.join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  s = re.sub(r'\b(a|an|the)\b', ' ', s)
  return ' '.join(s.split())


def exact_match(prediction: str, gold: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
  """Bag-of-words F1 of the normalized words. v2.0's rule when either side is empty: 1 if
  both are, else 0."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if not pred or not ref:
    return float(pred == ref)
  same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], examples: list[Example]) -> dict[str, float]:
  """{'exact_match', 'f1'} in percent: the mean over questions of the best score against any
  gold answer. Unanswerable questions' gold is ''; gold answers normalizing to '' are dropped
  (v2.0). A question without a prediction scores 0 (v1.1)."""
  em = f = 0.0
  for ex in examples:
    golds = [a.text for a in ex.answers if normalize_answer(a.text)] or ['']
    if ex.id in predictions:
      em += max(exact_match(predictions[ex.id], g) for g in golds)
      f += max(f1(predictions[ex.id], g) for g in golds)
  n = max(len(examples), 1)
  return {'exact_match': 100.0 * em / n, 'f1': 100.0 * f / n}
