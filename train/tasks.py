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
from train import data
from train.config import RunConfig
from train.data import BOS, EOS, MASK, PAD


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) array's full value on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _stack(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def seq2seq_example(src: str, tgt: str, src_len: int, tgt_len: int,
                    tokenizer=data.ByteTokenizer()) -> dict:
  """Decoder input is the target shifted right behind BOS; the output ends with EOS."""
  tgt_tokens = tokenizer.encode(tgt)[:tgt_len - 1]
  return {'src': data.pad_to(tokenizer.encode(src), src_len),
          'tgt_in': data.pad_to(np.concatenate([[BOS], tgt_tokens]), tgt_len),
          'tgt_out': data.pad_to(np.concatenate([tgt_tokens, [EOS]]), tgt_len)}


@dataclasses.dataclass
class Task:
  """What the loop needs from a task. `batch_size` is global (all devices together).

  The task reads its options (seed, seq_len, data, on_bad_bytes, tokenizer, vocab_size, workdir)
  from `run`; e.g. `TASKS['text'](RunConfig(task='text', seq_len=32))`.
  """
  run: RunConfig = dataclasses.field(default_factory=RunConfig)
  data_fingerprint: str | None = None  # of --data, kept with the tokenizer trained on it

  tokenizer = data.ByteTokenizer()

  model_cls = None
  init_method = None  # the model method whose parameters training needs
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
    if self.run.tokenizer == 'sentencepiece':
      path = str(pathlib.Path(self.run.workdir).absolute() / 'tokenizer.model')
      # One process trains (the workdir may be shared), the others wait and load its model.
      if jax.process_index() == 0:
        data.SentencePieceTokenizer.train_or_load(texts, path, self.run.vocab_size,
                                                  self.data_fingerprint)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices('tokenizer trained')
      self.tokenizer = data.SentencePieceTokenizer(path)

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


class Seq2SeqTask(Task):
  model_cls = Transformer
  default_schedule = 'rsqrt'
  src_len = 40
  tgt_len = 12

  @property
  def max_positions(self):
    return max(self.src_len, self.tgt_len)

  def init_args(self, batch):
    return batch['src'], batch['tgt_in']

  def forward(self, model, params, batch, *, deterministic=True, rngs=None):
    logits = model.apply({'params': params}, batch['src'], batch['tgt_in'],
                         deterministic=deterministic, rngs=rngs)
    return logits, batch['tgt_out'], (batch['tgt_out'] != PAD).astype(jnp.float32)

  def eval_pairs(self) -> list[tuple[str, str]]:
    raise NotImplementedError

  def eval_batches(self, batch_size):
    examples = [seq2seq_example(s, t, self.src_len, self.tgt_len, self.tokenizer)
                for s, t in self.eval_pairs()]
    n = max(1, len(examples) // batch_size) * batch_size
    examples = (examples * batch_size)[:n] if len(examples) < batch_size else examples[:n]
    return [_stack(examples[i:i + batch_size]) for i in range(0, n, batch_size)]

  def translate(self, model, params, sources: list[str]) -> list[str]:
    src = np.stack([data.pad_to(self.tokenizer.encode(s), self.src_len) for s in sources])
    out = generate(model, {'params': params}, src, max_new_tokens=self.tgt_len)
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
    example = seq2seq_example(src_text, out_text, self.src_len, self.tgt_len, self.tokenizer)
    _, state = model.apply({'params': params}, example['src'][None], example['tgt_in'][None],
                           capture_attention=True, mutable=['intermediates'])
    maps = viz.collect_attention(state)
    cross = [k for k in maps if k.endswith('cross_attention')][-1]
    weights = to_host(maps[cross])[0].mean(axis=0)  # [T, S]
    src_chars = self.pieces(example['src'])
    out_chars = self.pieces(example['tgt_out'])
    return weights[:len(out_chars), :len(src_chars)], src_chars, out_chars


  def pieces(self, tokens) -> list[str]:
    """The non-pad tokens as printable labels (EOS as </s>)."""
    labels = []
    for t in np.asarray(tokens).tolist():
      if t == PAD:
        break
      labels.append('</s>' if t == EOS else self.tokenizer.decode([t]) or '?')
    return labels


class DatesTask(Seq2SeqTask):
  """Human-written dates in many formats -> ISO 8601, held-out dates for evaluation."""

  def train_examples(self):
    seed, src_len, tgt_len = self.run.seed, self.src_len, self.tgt_len
    return grain.MapDataset.range(2 ** 62).map(
        lambda i: seq2seq_example(*data.date_example(seed, i, 'train'), src_len, tgt_len))

  def prepare(self):
    if self.run.tokenizer != 'byte':
      raise data.DataError('--tokenizer sentencepiece applies to --task text and translate')

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
    pairs, src_len, tgt_len, tok = self._train, self.src_len, self.tgt_len, self.tokenizer
    return (grain.MapDataset.range(len(pairs)).shuffle(seed=self.run.seed).repeat(None)
            .map(lambda i: seq2seq_example(*pairs[i], src_len, tgt_len, tok)))

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
    if self.run.tokenizer != 'byte' and isinstance(self, MLMTask):
      raise data.DataError('--tokenizer sentencepiece applies to --task text and translate')
    self.make_tokenizer(train_docs)
    self._train = data.token_stream(train_docs, self.tokenizer)
    self._eval = data.token_stream(eval_docs, self.tokenizer)
    if len(self._train) <= self.run.seq_len + 1:
      raise data.DataError(f'--data holds {len(self._train)} training tokens, fewer than one '
                           f'sequence of --seq-len {self.run.seq_len}')

  def window(self, stream, rng) -> dict:
    start = rng.integers(0, max(1, len(stream) - self.run.seq_len - 1))
    chunk = data.pad_to(stream[start:start + self.run.seq_len + 1], self.run.seq_len + 1)
    return {'inputs': chunk[:-1], 'targets': chunk[1:]}

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
    logits = model.apply({'params': params}, batch['inputs'], deterministic=deterministic,
                         rngs=rngs)
    return logits, batch['targets'], (batch['targets'] != PAD).astype(jnp.float32)

  def examples(self, model, params, n):
    prompt = self.tokenizer.encode('def ')[None]
    out = generate(model, {'params': params}, prompt,
                   max_new_tokens=min(96, model.config.max_len - prompt.shape[1]),
                   temperature=0.8, top_k=40, rng=jax.random.key(self.run.seed))
    return {}, ['def ' + self.tokenizer.decode(to_host(out)[0])]


class MLMTask(TextTask):
  """BERT pretraining: 15% of positions predicted; of those 80% [MASK], 10% random, 10% kept."""
  model_cls = BertEncoder
  init_method = 'mlm_logits'

  def window(self, stream, rng):
    tokens = super().window(stream, rng)['inputs']
    chosen = (rng.random(self.run.seq_len) < 0.15) & (tokens != PAD)
    action = rng.random(self.run.seq_len)
    inputs = np.where(chosen & (action < 0.8), MASK, tokens)
    random_tokens = rng.integers(4, 4 + 256, self.run.seq_len)  # a random byte
    inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    return {'inputs': inputs.astype(np.int32), 'targets': tokens,
            'weights': chosen.astype(np.float32)}

  def forward(self, model, params, batch, *, deterministic=True, rngs=None):
    logits = model.apply({'params': params}, batch['inputs'], deterministic=deterministic,
                         rngs=rngs, method='mlm_logits')
    return logits, batch['targets'], batch['weights']

  def examples(self, model, params, n):
    return {}, []


TASKS = {'dates': DatesTask, 'text': TextTask, 'mlm': MLMTask, 'translate': TranslateTask}
