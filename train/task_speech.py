"""--task speech: speech recognition with `SpeechTransformer`, log-mel frames in, bytes out.

Data: the default corpus is synthesized offline by eSpeak NG (train/speech_data.py: dates, numbers
and sentences read by 72 voices; evaluation on texts and a voice never heard in training), or
`--data FOLDER` holds audio files and a `transcripts.tsv` (every 10th line held out). Targets are
the UTF-8 bytes of `speech_data.normalize_transcript(text)`.

Features are computed on the host, in the data pipeline (grain's worker threads), not inside
`forward`: the train step then sees a fixed-shape `[B, F, 80]` float batch, the evaluation's
decoding (`generate` / `beam_search` take features) and attention.png read the very same arrays,
and the FFTs overlap with the previous step instead of running inside it. Each example's audio is
zero-padded to `frames * 160` samples and put through the library's own `audio.log_mel` (one
jit-compiled shape); padding is silence, which `log_mel` guarantees does not change the real
frames, and `src_valid` masks it out of attention.
"""

from __future__ import annotations

import functools
import math

import grain
import jax
import numpy as np
import soundfile

from flaxformer_lite import SpeechTransformer, audio, generate
from train import data, scoring
from train import speech_data as sd
from train.tasks import Task, _stack, _valid, seq2seq_forward, to_host

DECODE_SUBSET = 100  # held-out utterances decoded for WER/CER at every evaluation
LOSS_SUBSET = 256  # held-out utterances of the eval loss / accuracy
MAX_FOLDER_SECONDS = 30.0  # --data: longer files are cut here (Whisper's window)
MAX_FOLDER_TEXT = 400  # --data: transcript bytes kept (the decoder's positions)


@functools.cache
def _log_mel_fn():
  """audio `[1, N]` -> features `[1, N // 160, 80]`, compiled once per N (one N per run)."""
  return jax.jit(audio.log_mel)


def features(samples: np.ndarray, frames: int) -> tuple[np.ndarray, np.ndarray]:
  """audio float32 [N] at 16 kHz -> (log-mel [frames, 80] float32, valid [frames] bool).

  Audio longer than `frames` * 10 ms is cut; shorter is padded with silence (invalid frames).
  """
  n = min(len(samples), frames * audio.HOP)
  padded = np.zeros((1, frames * audio.HOP), np.float32)
  padded[0, :n] = samples[:n]
  mel = np.asarray(_log_mel_fn()(padded))[0]
  return mel, _valid(max(1, audio.num_frames(n)), frames)


class SpeechTask(Task):
  """Speech recognition: `src` [F, 80] log-mel frames (`src_valid` [F]), byte targets."""
  model_cls = SpeechTransformer
  default_schedule = 'rsqrt'
  decodes_in_eval = True
  attention_title = 'cross-attention over the audio, last decoder layer (mean over heads)'
  frames = 640  # 6.4 s of 10 ms frames (the default corpus' longest is ~5 s): 160 encoder positions
  tgt_len = 80  # transcript bytes + eos (the default corpus' longest is ~70)
  n_train = 8_000  # default corpus: distinct training utterances (synthesized once, cached)

  @property
  def max_positions(self):
    return self.tgt_len

  def config(self, preset, **overrides):
    cfg = super().config(preset, **overrides)
    encoder_positions = self.frames
    for stride in cfg.audio_strides:
      encoder_positions = -(-encoder_positions // stride)
    return cfg.replace(max_source_len=encoder_positions, num_mel_bins=80)

  # --- data --------------------------------------------------------------------------------

  def prepare(self):
    if self.run.init_from:
      raise data.DataError('--init-from is not supported by --task speech yet')
    if self.run.data is None:
      self._train, self._eval = sd.default_corpus(self.run.seed, self.n_train,
                                                  max(LOSS_SUBSET, DECODE_SUBSET),
                                                  cache_dir=f'{self.run.workdir}/audio_cache')
      self._load = lambda corpus, i: corpus[i]
      return
    items = sd.read_folder(self.run.data)
    train, held_out = data.split_documents(items, 'utterances in transcripts.tsv')
    self._fit_to_folder(items)
    self._train, self._eval = train, held_out
    self._load = lambda corpus, i: (sd.load_audio(corpus[i][0]), corpus[i][1])

  def _fit_to_folder(self, items) -> None:
    """Frames and target length from the folder's longest file and transcript (capped)."""
    longest = max(soundfile.info(str(path)).duration for path, _ in items)
    seconds = min(longest, MAX_FOLDER_SECONDS)
    if longest > MAX_FOLDER_SECONDS and jax.process_index() == 0:
      print(f'note: --data has audio up to {longest:.1f} s; files are cut at '
            f'{MAX_FOLDER_SECONDS:.0f} s')
    step = 4  # frames a multiple of the default front end's down-sampling, (2, 2)
    self.frames = step * math.ceil(seconds * 100 / step + 1)
    texts = max(len(data.encode(sd.normalize_transcript(t))) for _, t in items)
    self.tgt_len = min(texts, MAX_FOLDER_TEXT - 1) + 1

  def example(self, samples: np.ndarray, text: str) -> dict:
    """One utterance -> src [F, 80], src_valid [F], tgt_in / tgt_out [L] int32, tgt_valid [L]."""
    mel, valid = features(samples, self.frames)
    labels = self.tokenizer.encode_target(sd.normalize_transcript(text), self.tgt_len)
    return {'src': mel, 'src_valid': valid,
            'tgt_in': data.pad_to(np.concatenate([[self.ids.start], labels[:-1]]), self.tgt_len,
                                  self.ids.pad),
            'tgt_out': data.pad_to(labels, self.tgt_len, self.ids.pad),
            'tgt_valid': _valid(len(labels), self.tgt_len)}

  def train_examples(self):
    corpus, load = self._train, self._load
    if isinstance(corpus, sd.SpeechCorpus):
      make = self._kept_example
    else:  # a --data folder may be any size: its features are computed at each reading
      make = lambda i: self.example(*load(corpus, i))
    return (grain.MapDataset.range(len(corpus)).shuffle(seed=self.run.seed).repeat(None)
            .map(make))

  def _kept_example(self, i: int) -> dict:
    """`example` of training item i of the default corpus, its features computed once.

    Item i (its noise included) is a pure function of i, read ~12 times in a default run; its
    log-mel frames were a third of the step's CPU time. Only the valid frames are kept (~80 KB
    an utterance, ~650 MB for the default 8,000); the frames past them are zeros, which the
    front end reads as it reads any padding (it zeroes the invalid frames before convolving).
    """
    kept = self._kept.get(i)
    if kept is None:
      e = self.example(*self._load(self._train, i))
      n = int(e['src_valid'].sum())
      kept = self._kept[i] = (e['src'][:n].copy(), {k: v for k, v in e.items() if k != 'src'})
    mel, rest = kept
    src = np.zeros((self.frames, mel.shape[1]), np.float32)
    src[:len(mel)] = mel
    return {'src': src, **rest}

  @functools.cached_property
  def _kept(self) -> dict:
    return {}

  @functools.cached_property
  def _eval_examples(self) -> list[dict]:
    return [self.example(*self._load(self._eval, i)) for i in range(len(self._eval))]

  def eval_batches(self, batch_size):
    examples = self._eval_examples[:LOSS_SUBSET]
    n = max(1, len(examples) // batch_size) * batch_size
    examples = (examples * batch_size)[:n]
    return [_stack(examples[i:i + batch_size]) for i in range(0, n, batch_size)]

  def dummy_batch(self, batch_size):
    # Zeros of the right shapes, without computing any features.
    zeros = {'src': ((self.frames, 80), np.float32), 'src_valid': ((self.frames,), bool),
             'tgt_in': ((self.tgt_len,), np.int32), 'tgt_out': ((self.tgt_len,), np.int32),
             'tgt_valid': ((self.tgt_len,), bool)}
    return {k: np.zeros((batch_size,) + shape, dtype) for k, (shape, dtype) in zeros.items()}

  # --- model -------------------------------------------------------------------------------

  def init_args(self, batch):
    return batch['src'], batch['tgt_in']

  forward = staticmethod(seq2seq_forward)

  # --- evaluation --------------------------------------------------------------------------

  def transcribe(self, model, params, examples: list[dict], beams: int) -> list[str]:
    """Decodes `examples` (their src / src_valid), 50 at a time."""
    out = []
    for i in range(0, len(examples), 50):
      chunk = _stack([{k: e[k] for k in ('src', 'src_valid')} for e in examples[i:i + 50]])
      tokens = generate(model, {'params': params}, chunk['src'], valid=chunk['src_valid'],
                        max_new_tokens=self.tgt_len, num_beams=beams)
      out += [self.tokenizer.decode(row) for row in to_host(tokens)]
    return out

  def references(self, count: int) -> list[str]:
    return [sd.normalize_transcript(self._load_text(i)) for i in range(count)]

  def _load_text(self, i: int) -> str:
    if isinstance(self._eval, sd.SpeechCorpus):
      return self._eval.utterance(i).text
    return self._eval[i][1]

  def examples(self, model, params, n):
    """WER / CER (percent) on the first DECODE_SUBSET held-out utterances, --beam-size beams."""
    count = min(DECODE_SUBSET, len(self._eval_examples))
    hypotheses = self.transcribe(model, params, self._eval_examples[:count], self.run.beam_size)
    references = self.references(count)
    self._first_transcript = hypotheses[0]  # attention.png's queries: no batch-1 decode to compile
    lines = []
    for hypothesis, reference in list(zip(hypotheses, references))[:n]:
      mark = 'ok' if hypothesis == reference else f'expected {reference!r}'
      lines.append(f'{hypothesis!r:60} {mark}')
    return scoring.wer_cer(hypotheses, references), lines

  def attention_example(self, model, params):
    """Cross-attention of the last decoder layer over the encoder's frames (40 ms each with the
    default strides), for the first held-out utterance; the queries are its transcript as the
    last evaluation decoded it (or greedily decoded here if none has run)."""
    from flaxformer_lite import viz
    example = self._eval_examples[0]
    text = getattr(self, '_first_transcript', None)
    if text is None:
      text = self.transcribe(model, params, [example], 1)[0]
    labels = self.tokenizer.encode_target(text, self.tgt_len)
    tgt_in = data.pad_to(np.concatenate([[self.ids.start], labels[:-1]]), self.tgt_len,
                         self.ids.pad)
    tgt_valid = _valid(len(labels), self.tgt_len)
    _, state = model.apply({'params': params}, example['src'][None], tgt_in[None],
                           src_valid=example['src_valid'][None], tgt_valid=tgt_valid[None],
                           capture_attention=True, mutable=['intermediates'])
    maps = viz.collect_attention(state)
    cross = [k for k in maps if k.endswith('cross_attention')][-1]
    weights = to_host(maps[cross])[0].mean(axis=0)  # [L, S']
    frames_valid = np.asarray(model.frames_valid(example['src_valid'][None]))[0]
    columns = int(frames_valid.sum())
    rows = [('</s>' if t == self.ids.eos else self.tokenizer.decode([t]) or '?')
            for t in labels.tolist()]
    stride = self.frames // len(frames_valid)
    return weights[:len(rows), :columns], time_labels(columns, stride * 0.01), rows


def time_labels(columns: int, seconds_per_column: float) -> list[str]:
  """Sparse x labels in seconds ('0.0s', '', ..., '0.4s', ...) for `columns` encoder frames.

  viz.plot_attention writes every ceil(columns / 64)-th label only, so labels sit on multiples of
  that step that are also round times (every 0.2 s at 40 ms a frame, or a multiple of it).
  """
  shown = max(1, math.ceil(columns / 64))  # viz's tick step (_MAX_TICKS = 64)
  every = round(0.2 / seconds_per_column) if seconds_per_column < 0.2 else 1
  every = every * shown // math.gcd(every, shown)
  return [f'{j * seconds_per_column:.1f}s' if j % every == 0 else '' for j in range(columns)]
