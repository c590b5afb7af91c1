"""The four tasks: their models, data, forward passes and task-specific evaluation."""

from __future__ import annotations

import dataclasses
import pathlib

import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from flaxformer_lite import GPT, BertEncoder, Transformer, TransformerConfig, generate
from train import data, word_pieces
from train.config import RunConfig
from train.data import BOS, EOS, PAD


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) array's full value on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _stack(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The model's token ids that examples are built with: `pad` fills, `start` begins the
  decoder input, `eos` ends the labels. Ours by default; a checkpoint's from its config."""
  pad: int = PAD
  start: int = BOS
  eos: int = EOS

  @classmethod
  def of(cls, cfg: TransformerConfig) -> SpecialIds:
    # Without a pad token (GPT-2) any id fills: the masks say which tokens are real.
    return cls(pad=cfg.eos_id if cfg.pad_id is None else cfg.pad_id,
               start=cfg.bos_id if cfg.decoder_start_id is None else cfg.decoder_start_id,
               eos=cfg.eos_id)


def _valid(n: int, length: int) -> np.ndarray:
  return np.arange(length) < n


def seq2seq_example(src: str, tgt: str, src_len: int, tgt_len: int,
                    tokenizer=data.ByteTokenizer(), ids: SpecialIds = SpecialIds()) -> dict:
  """Labels `tgt_out` = target + [eos]; decoder input `tgt_in` = [start] + target. Which tokens
  are real is said by `src_valid` / `tgt_valid`, not by pad ids: Marian's and T5's decoder
  start token is their pad token."""
  source = tokenizer.encode_source(src, src_len)
  labels = tokenizer.encode_target(tgt, tgt_len)
  return {'src': data.pad_to(source, src_len, ids.pad), 'src_valid': _valid(len(source), src_len),
          'tgt_in': data.pad_to(np.concatenate([[ids.start], labels[:-1]]), tgt_len, ids.pad),
          'tgt_out': data.pad_to(labels, tgt_len, ids.pad),
          'tgt_valid': _valid(len(labels), tgt_len)}


def seq2seq_forward(model, params, batch, *, deterministic=True, rngs=None):
  """An encoder-decoder's forward pass over a batch of `seq2seq_example`s (or their audio
  twins): (logits, labels, label weights), padding taken from the batch's masks."""
  logits = model.apply({'params': params}, batch['src'], batch['tgt_in'],
                       src_valid=batch['src_valid'], tgt_valid=batch['tgt_valid'],
                       deterministic=deterministic, rngs=rngs)
  return logits, batch['tgt_out'], batch['tgt_valid'].astype(jnp.float32)


# --tokenizer -> (its class, its file in the workdir); 'byte' needs neither.
TRAINED_TOKENIZERS = {'sentencepiece': (data.SentencePieceTokenizer, 'tokenizer.model'),
                      'word-pieces': (word_pieces.WordPiecesTokenizer, word_pieces.FILE)}


@dataclasses.dataclass
class Task:
  """What the loop needs from a task. `batch_size` is global (all devices together).

  The task reads its options (seed, seq_len, data, on_bad_bytes, tokenizer, vocab_size, workdir)
  from `run`; e.g. `TASKS['text'](RunConfig(task='text', seq_len=32))`.
  """
  run: RunConfig = dataclasses.field(default_factory=RunConfig)
  data_fingerprint: str | None = None  # of --data, kept with the tokenizer trained on it

  tokenizer = data.ByteTokenizer()  # --init-from: the checkpoint's (set before prepare)
  ids = SpecialIds()  # set from the model's config once it is built

  model_cls = None
  tokenizers = ('byte', 'sentencepiece')  # the --tokenizer values the task takes
  init_method = None  # the model method whose parameters training needs
  decodes_in_eval = False  # examples() computes metrics at every evaluation (else at the end)
  attention_title = None  # attention.png's title, for tasks with an attention_example
  default_schedule = 'cosine'

  def config(self, preset: str, **overrides) -> TransformerConfig:
    fields = dict(vocab_size=self.tokenizer.vocab_size, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    cfg = TransformerConfig.preset(preset, **{**fields, **overrides})
    if cfg.max_len < self.max_positions:
      cfg = cfg.replace(max_len=self.max_positions)
    return cfg

  @property
  def max_positions(self) -> int:
    return self.run.seq_len

  def prepare(self) -> None:
    """Reads/generates the data; raises data.DataError for bad user data."""

  def make_tokenizer(self, texts: list[str]) -> None:
    """The --tokenizer of the run, trained on `texts` (the byte tokenizer needs no training)."""
    if self.run.tokenizer == 'byte' or self.run.init_from:
      return
    cls, name = TRAINED_TOKENIZERS[self.run.tokenizer]
    path = str(pathlib.Path(self.run.workdir).absolute() / name)
    # One process trains (the workdir may be shared), the others wait and load its model.
    if jax.process_index() == 0:
      cls.train_or_load(texts, path, self.run.vocab_size, self.data_fingerprint)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('tokenizer trained')
    self.tokenizer = cls(path)

  def train_examples(self) -> grain.MapDataset:
    raise NotImplementedError

  def eval_batches(self, batch_size: int) -> list[dict]:
    raise NotImplementedError

  def dummy_batch(self, batch_size: int) -> dict:
    return {k: np.zeros((batch_size,) + v.shape[1:], v.dtype)
            for k, v in self.eval_batches(1)[0].items()}

  def forward(self, model, params, batch, *, deterministic=True, rngs=None):
    """-> (logits [B, T, V], targets [B, T], weights [B, T])."""
    raise NotImplementedError

  def init_args(self, batch):
    raise NotImplementedError

  def examples(self, model, params, n: int) -> tuple[dict, list[str]]:
    """Task metrics computed by decoding (e.g. exact match) and printable example lines."""
    return {}, []

  def attention_example(self, model, params):
    """(weights [rows, columns], column labels, row labels) for attention.png, or None."""
    return None


class Seq2SeqTask(Task):
  model_cls = Transformer
  default_schedule = 'rsqrt'
  decodes_in_eval = True
  attention_title = 'cross-attention, last decoder layer (mean over heads)'
  src_len = 40
  tgt_len = 12

  @property
  def max_positions(self):
    return max(self.src_len, self.tgt_len)

  def init_args(self, batch):
    return batch['src'], batch['tgt_in']

  forward = staticmethod(seq2seq_forward)

  def pair_examples(self, pairs: list[tuple[str, str]]) -> grain.MapDataset:
    """Training examples of (source, target) text pairs: shuffled by the seed, repeated."""
    src_len, tgt_len, tok, ids = self.src_len, self.tgt_len, self.tokenizer, self.ids
    return (grain.MapDataset.range(len(pairs)).shuffle(seed=self.run.seed).repeat(None)
            .map(lambda i: seq2seq_example(*pairs[i], src_len, tgt_len, tok, ids)))

  def eval_pairs(self) -> list[tuple[str, str]]:
    raise NotImplementedError

  def eval_batches(self, batch_size):
    examples = [seq2seq_example(s, t, self.src_len, self.tgt_len, self.tokenizer, self.ids)
                for s, t in self.eval_pairs()]
    n = max(1, len(examples) // batch_size) * batch_size
    examples = (examples * batch_size)[:n] if len(examples) < batch_size else examples[:n]
    return [_stack(examples[i:i + batch_size]) for i in range(0, n, batch_size)]

  def translate(self, model, params, sources: list[str]) -> list[str]:
    """Greedy (num_beams=1 whatever a checkpoint's settings say: examples stay cheap)."""
    rows = [self.tokenizer.encode_source(s, self.src_len) for s in sources]
    src = np.stack([data.pad_to(r, self.src_len, self.ids.pad) for r in rows])
    valid = np.stack([_valid(len(r), self.src_len) for r in rows])
    out = generate(model, {'params': params}, src, valid=valid, max_new_tokens=self.tgt_len,
                   num_beams=1)
    return [self.tokenizer.decode(row) for row in to_host(out)]

  def examples(self, model, params, n):
    pairs = self.eval_pairs()
    outputs = []
    for i in range(0, len(pairs), 256):
      outputs += self.translate(model, params, [s for s, _ in pairs[i:i + 256]])
    exact = float(np.mean([o == t for o, (_, t) in zip(outputs, pairs)]))
    lines = [f'{s!r:40} -> {o!r:14} {"ok" if o == t else "expected " + repr(t)}'
             for (s, t), o in list(zip(pairs, outputs))[:n]]
    return {'exact_match': exact}, lines

  def attention_example(self, model, params) -> tuple[np.ndarray, list[str], list[str]]:
    """Cross-attention of the last decoder layer for one held-out example, averaged over heads."""
    from flaxformer_lite import viz
    src_text = self.eval_pairs()[0][0]
    out_text = self.translate(model, params, [src_text])[0]
    example = seq2seq_example(src_text, out_text, self.src_len, self.tgt_len, self.tokenizer,
                              self.ids)
    _, state = model.apply({'params': params}, example['src'][None], example['tgt_in'][None],
                           src_valid=example['src_valid'][None],
                           tgt_valid=example['tgt_valid'][None],
                           capture_attention=True, mutable=['intermediates'])
    maps = viz.collect_attention(state)
    cross = [k for k in maps if k.endswith('cross_attention')][-1]
    weights = to_host(maps[cross])[0].mean(axis=0)  # [T, S]
    src_chars = self.pieces(example['src'], example['src_valid'])
    out_chars = self.pieces(example['tgt_out'], example['tgt_valid'])
    return weights[:len(out_chars), :len(src_chars)], src_chars, out_chars


  def pieces(self, tokens, valid) -> list[str]:
    """The real tokens as printable labels (eos as </s>)."""
    labels = []
    for t, real in zip(np.asarray(tokens).tolist(), np.asarray(valid).tolist()):
      if not real:
        break
      labels.append('</s>' if t == self.ids.eos else self.tokenizer.decode([t]) or '?')
    return labels


class DatesTask(Seq2SeqTask):
  """Human-written dates in many formats -> ISO 8601, held-out dates for evaluation."""

  def train_examples(self):
    seed, src_len, tgt_len, tok, ids = (self.run.seed, self.src_len, self.tgt_len,
                                        self.tokenizer, self.ids)
    return grain.MapDataset.range(2 ** 62).map(
        lambda i: seq2seq_example(*data.date_example(seed, i, 'train'), src_len, tgt_len, tok,
                                  ids))

  def eval_pairs(self):
    return [data.date_example(self.run.seed, i, 'eval') for i in range(1000)]


class TranslateTask(Seq2SeqTask):
  """Tab-separated sentence pairs from --data; every 10th pair is held out."""
  src_len = 64
  tgt_len = 64

  def prepare(self):
    if self.run.data is None:
      raise data.DataError('--task translate needs --data PATH (tab-separated sentence pairs)')
    self.src_len = self.tgt_len = self.run.seq_len
    self._train, self._eval = data.split_documents(
        data.read_pairs(self.run.data, self.run.on_bad_bytes), 'sentence pairs')
    self.make_tokenizer([text for pair in self._train for text in pair])

  def train_examples(self):
    return self.pair_examples(self._train)

  def eval_pairs(self):
    return self._eval


class TextTask(Task):
  """Byte-level causal language modelling on random windows of the training documents."""
  model_cls = GPT

  def prepare(self):
    train_docs, eval_docs, note = data.split_text(
        data.text_documents(self.run.data, self.run.on_bad_bytes))
    if note and jax.process_index() == 0:
      print(note)
    self.make_tokenizer(train_docs)
    self._train = data.token_stream(train_docs, self.tokenizer)
    self._eval = data.token_stream(eval_docs, self.tokenizer)
    if len(self._train) <= self.run.seq_len + 1:
      raise data.DataError(f'--data holds {len(self._train)} training tokens, fewer than one '
                           f'sequence of --seq-len {self.run.seq_len}')

  def window(self, stream, rng) -> dict:
    """`seq_len + 1` tokens from a random start; `valid` / `weights` mark the real ones (GPT-2
    has no pad token: its id 0 is a real one)."""
    start = rng.integers(0, max(1, len(stream) - self.run.seq_len - 1))
    piece = stream[start:start + self.run.seq_len + 1]
    chunk = data.pad_to(piece, self.run.seq_len + 1, self.ids.pad)
    valid = _valid(len(piece), self.run.seq_len + 1)
    return {'inputs': chunk[:-1], 'targets': chunk[1:], 'valid': valid[:-1],
            'weights': valid[1:].astype(np.float32)}

  def train_examples(self):
    seed, stream = self.run.seed, self._train
    return grain.MapDataset.range(2 ** 62).map(
        lambda i: self.window(stream, np.random.default_rng([seed, i])))

  def eval_batches(self, batch_size, num_batches=8):
    rng = np.random.default_rng([self.run.seed, 2 ** 31])
    return [_stack([self.window(self._eval, rng) for _ in range(batch_size)])
            for _ in range(num_batches)]

  def init_args(self, batch):
    return (batch['inputs'],)

  def forward(self, model, params, batch, *, deterministic=True, rngs=None):
    logits = model.apply({'params': params}, batch['inputs'], valid=batch['valid'],
                         deterministic=deterministic, rngs=rngs)
    return logits, batch['targets'], batch['weights']

  def examples(self, model, params, n):
    prompt = self.tokenizer.encode('def ')[None]
    out = generate(model, {'params': params}, prompt, valid=np.ones(prompt.shape, bool),
                   max_new_tokens=min(96, model.config.max_len - prompt.shape[1]),
                   temperature=0.8, top_k=40, rng=jax.random.key(self.run.seed))
    return {}, ['def ' + self.tokenizer.decode(to_host(out)[0])]


class MLMTask(TextTask):
  """BERT pretraining: 15% of positions predicted; of those 80% [MASK], 10% random, 10% kept."""
  model_cls = BertEncoder
  init_method = 'mlm_logits'

  def window(self, stream, rng):
    window = super().window(stream, rng)
    tokens, valid, n = window['inputs'], window['valid'], self.run.seq_len
    # Special tokens ([CLS], [SEP]) are never predicted, as in transformers' data collator.
    special = np.isin(tokens, list(self.tokenizer.special_ids))
    chosen = (rng.random(n) < 0.15) & valid & ~special
    action = rng.random(n)
    inputs = np.where(chosen & (action < 0.8), self.tokenizer.mask_id, tokens)
    random_tokens = self.tokenizer.random_ids(rng, n)  # ours: a random byte
    inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    return {'inputs': inputs.astype(np.int32), 'valid': valid, 'targets': tokens,
            'weights': chosen.astype(np.float32)}

  def forward(self, model, params, batch, *, deterministic=True, rngs=None):
    logits = model.apply({'params': params}, batch['inputs'], valid=batch['valid'],
                         deterministic=deterministic, rngs=rngs, method='mlm_logits')
    return logits, batch['targets'], batch['weights']

  def examples(self, model, params, n):
    return {}, []


TASKS = {'dates': DatesTask, 'text': TextTask, 'mlm': MLMTask, 'translate': TranslateTask}


def task_class(name: str) -> type:
  """The Task class of `--task name`. The applications live in files of their own, which
  import this one, so they join TASKS here, on first use, never while this module loads."""
  if name not in TASKS:
    from train import task_qa, task_speech, task_summarize
    TASKS.update(summarize=task_summarize.SummarizeTask, qa=task_qa.QATask,
                 speech=task_speech.SpeechTask)
  return TASKS[name]
