"""--task qa: extractive question answering with BertEncoder's span head (SQuAD-style).

Each question becomes one or more windows `[CLS] question [SEP] context-chunk [SEP]`
(train/squad.py); the model scores every token as the answer's first and last token. The loss
is the cross-entropy of the gold start and end token, averaged over the two: forward returns
them as two "positions" of one classification over the window's tokens, logits [B, 2, T] and
targets [B, 2], so train/step.py's token-level cross-entropy computes exactly that mean.

Data: by default questions on the Python standard library's own documentation
(train/qa_data.py, held out by module); with --data a SQuAD v1.1/v2.0 JSON file, every 10th
context (paragraph) held out with all its questions. Tokens: pieces of words trained on the
training questions and contexts by default (train/word_pieces.py), or --tokenizer byte /
sentencepiece, with our BOS/EOS as [CLS]/[SEP]; a BERT checkpoint's own tokenizer and
[CLS]/[SEP] under --init-from. --seq-len is the window length, --doc-stride the step between
context chunks and --max-answer-len the longest span predicted, all in tokens.
"""

from __future__ import annotations

import collections
import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import BertEncoder
from train import data, qa_data, squad
from train.tasks import Task, to_host

EVAL_QUESTIONS = 1000  # the held-out questions scored at each evaluation (all of the default 752)
LOSS_WINDOWS = 256  # held-out windows of the evaluation loss
PREDICT_BATCH = 64  # windows per forward pass when predicting (one compiled shape)


def special_ids(tokenizer, ids) -> tuple[int, int]:
  """([CLS], [SEP]): a checkpoint tokenizer's own tokens where it has them (BERT's
  tokenizer.json), else the model's start/eos ids (ours: data.BOS / data.EOS)."""
  tok = getattr(tokenizer, 'tok', None)
  if tok is not None and tok.token_to_id('[CLS]') is not None:
    return tok.token_to_id('[CLS]'), tok.token_to_id('[SEP]')
  return ids.start, ids.eos


def reads_question_words(cfg) -> bool:
  """Whether a model of `cfg` takes squad.QUESTION_WORD token types: ours from scratch do
  (QATask.config gives them the third type); a BERT checkpoint's two types do not."""
  return cfg.type_vocab_size > squad.QUESTION_WORD


def make_windows(examples, tokenizer, ids, *, seq_len: int, doc_stride: int,
                 question_words: bool = False) -> list:
  """Every window of `examples`; the question is cut to half a window (BERT: 64 of 384).
  `question_words`: context tokens of the question's words marked (squad.question_word_chars)."""
  # A context is asked about many times (the default data: ~10 questions a page): tokenized once.
  tokenize = functools.lru_cache(maxsize=None)(squad.offset_tokenizer(tokenizer))
  cls_id, sep_id = special_ids(tokenizer, ids)
  out = []
  for ex in examples:
    out += squad.windows(ex, tokenize, max_len=seq_len, doc_stride=doc_stride,
                         max_question_len=seq_len // 2, cls_id=cls_id, sep_id=sep_id,
                         pad_id=ids.pad, question_words=question_words)
  return out


def span_logits(model, params, windows: list, apply_fn=None) -> tuple[np.ndarray, np.ndarray]:
  """(start, end) logits [W, T] of `windows`, PREDICT_BATCH at a time (the last one padded,
  so one compiled shape serves every call)."""
  apply_fn = apply_fn or jax.jit(functools.partial(_qa_apply, model))
  starts, ends = [], []
  for i in range(0, len(windows), PREDICT_BATCH):
    chunk = windows[i:i + PREDICT_BATCH]
    batch = squad.to_batch(chunk + [chunk[-1]] * (PREDICT_BATCH - len(chunk)))
    s, e = apply_fn(params, batch['tokens'], batch['token_types'], batch['valid'])
    starts.append(to_host(s)[:len(chunk)])
    ends.append(to_host(e)[:len(chunk)])
  return np.concatenate(starts), np.concatenate(ends)


def _qa_apply(model, params, tokens, token_types, valid):
  return model.apply({'params': params}, tokens, token_types, valid=valid, method='qa_logits')


def predictions(examples, windows, start, end, *, max_answer_len: int) -> dict[str, tuple]:
  """{example id: (answer text, score)} from every window's logits [W, T] (`squad.predict`);
  SQuAD v2.0's no-answer rule where a question may have no answer."""
  by_id = collections.defaultdict(list)
  for k, w in enumerate(windows):
    by_id[w.example_id].append(k)
  with_null = any(ex.is_impossible for ex in examples)
  out = {}
  for ex in examples:
    ks = by_id[ex.id]
    out[ex.id] = squad.predict([windows[k] for k in ks], start[ks], end[ks],
                               max_answer_len=max_answer_len, with_null=with_null)
  return out


def answer(model, params, tokenizer, question: str, context: str, *, seq_len: int,
           doc_stride: int, max_answer_len: int, ids) -> tuple[str, float]:
  """(answer span, its score: start + end logit) of one question about `context`
  (what `python -m train.generate --question Q --context C` prints)."""
  example = squad.Example('question', question, context, (), is_impossible=True)
  windows = make_windows([example], tokenizer, ids, seq_len=seq_len, doc_stride=doc_stride,
                         question_words=reads_question_words(model.config))
  start, end = span_logits(model, params, windows)
  return squad.predict(windows, start, end, max_answer_len=max_answer_len)


def split_by_context(examples: list) -> tuple[list, list]:
  """Every 10th context (in file order) is held out with all its questions."""
  contexts = list(dict.fromkeys(ex.context for ex in examples))
  train_ctx, eval_ctx = data.split_documents(contexts, 'contexts (paragraphs)')
  held = set(eval_ctx)
  return ([ex for ex in examples if ex.context not in held],
          [ex for ex in examples if ex.context in held])


class QATask(Task):
  """Extractive QA: BertEncoder's start/end span head over question + context windows."""
  model_cls = BertEncoder
  init_method = 'qa_logits'
  decodes_in_eval = True  # exact match and F1 at every evaluation
  attention_title = 'self-attention, last layer: question (rows) -> context (mean over heads)'
  question_words = False  # True once config() builds a model that reads them (not a checkpoint)

  def config(self, preset, **overrides):
    # The from-scratch presets take rotary positions here: an answer is found by its offset
    # from a name the question quotes, which rotary attention scores see directly.
    if preset in ('tiny', 'small'):
      overrides.setdefault('positions', 'rotary')
    # A model trained from scratch reads a third token type: the context's words that the
    # question has (squad.question_word_chars says why).
    overrides.setdefault('type_vocab_size', squad.QUESTION_WORD + 1)
    cfg = super().config(preset, **overrides)
    self.question_words = reads_question_words(cfg)
    return cfg

  def prepare(self):
    if self.run.data is None:
      self._train, held = qa_data.default_examples(self.run.seed)
    else:
      self._train, held = split_by_context(squad.read_squad(self.run.data))
    self._eval = held[:EVAL_QUESTIONS]
    if self.run.seq_len < 8:
      raise data.DataError(f'--seq-len {self.run.seq_len} is too short for a question and a '
                           'context window')
    # Each text once: a context is the context of all its questions.
    self.make_tokenizer(list(dict.fromkeys(t for ex in self._train
                                           for t in (ex.question, ex.context))))
    self._windows = {}
    self._apply_fn = None

  def windows(self, split: str) -> list:
    """The windows of 'train' or 'eval', built once the model's special ids are known."""
    if split not in self._windows:
      examples = self._train if split == 'train' else self._eval
      try:
        self._windows[split] = make_windows(examples, self.tokenizer, self.ids,
                                            seq_len=self.run.seq_len,
                                            doc_stride=self.run.doc_stride,
                                            question_words=self.question_words)
      except ValueError as e:  # a window too short for the question, a bad --doc-stride
        raise data.DataError(f'--seq-len {self.run.seq_len} / --doc-stride '
                             f'{self.run.doc_stride}: {e}') from None
    return self._windows[split]

  def train_examples(self):
    arrays = squad.to_batch(self.windows('train'))  # kept stacked: no per-window offsets
    n = len(arrays['start'])
    return (grain.MapDataset.range(n).shuffle(seed=self.run.seed).repeat(None)
            .map(lambda i: {k: v[i] for k, v in arrays.items()}))

  def eval_batches(self, batch_size):
    windows = self.windows('eval')[:LOSS_WINDOWS]
    n = max(1, len(windows) // batch_size) * batch_size
    windows = (windows * batch_size)[:n] if len(windows) < batch_size else windows[:n]
    return [squad.to_batch(windows[i:i + batch_size]) for i in range(0, n, batch_size)]

  def init_args(self, batch):
    return batch['tokens'], batch['token_types']

  def forward(self, model, params, batch, *, deterministic=True, rngs=None):
    """-> logits [B, 2, T] (start, end), targets [B, 2] (gold start, end tokens), weights
    [B, 2]: the loss is the mean of the start and end cross-entropies."""
    start, end = model.apply({'params': params}, batch['tokens'], batch['token_types'],
                             valid=batch['valid'], deterministic=deterministic, rngs=rngs,
                             method='qa_logits')
    logits = jnp.stack([start, end], axis=1)
    targets = jnp.stack([batch['start'], batch['end']], axis=1)
    return logits, targets, jnp.ones(targets.shape, jnp.float32)

  def predict_eval(self, model, params) -> dict[str, tuple]:
    if self._apply_fn is None:  # compiled once for the run's every evaluation
      self._apply_fn = jax.jit(functools.partial(_qa_apply, model))
    windows = self.windows('eval')
    start, end = span_logits(model, params, windows, self._apply_fn)
    return predictions(self._eval, windows, start, end, max_answer_len=self.run.max_answer_len)

  def examples(self, model, params, n):
    """SQuAD exact match and F1 (percent) over the held-out questions, and `n` lines
    'question -> predicted span' with the gold answer where they differ."""
    predicted = self.predict_eval(model, params)
    scores = squad.squad_scores({k: text for k, (text, _) in predicted.items()}, self._eval)
    lines = []
    for ex in self._eval[:n]:
      text, score = predicted[ex.id]
      golds = [a.text for a in ex.answers] or ['']
      ok = max(squad.exact_match(text, g) for g in golds)
      lines.append(f'{ex.question!r} -> {text!r} ({score:.1f}) '
                   f'{"ok" if ok else "expected " + repr(golds[0])}')
    return scores, lines

  def attention_example(self, model, params):
    """Last-layer self-attention of the first held-out window, question rows x context columns,
    averaged over heads."""
    from flaxformer_lite import viz
    w = self.windows('eval')[0]
    _, state = model.apply({'params': params}, w.tokens[None], w.token_types[None],
                           valid=w.valid[None], capture_attention=True,
                           mutable=['intermediates'])
    maps = viz.collect_attention(state)
    weights = to_host(maps[list(maps)[-1]])[0].mean(axis=0)  # [T, T]
    n = int(w.valid.sum())
    context = np.flatnonzero(w.token_types[:n] >= 1)[:-1]  # without the final [SEP]
    question = np.arange(1, context[0] - 1)  # between [CLS] and the first [SEP]
    label = lambda t: self.tokenizer.decode([int(t)]) or '?'
    return (weights[np.ix_(question, context)], [label(w.tokens[i]) for i in context],
            [label(w.tokens[i]) for i in question])
