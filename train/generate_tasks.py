"""`python -m train.generate` for the application tasks: qa answers, summarize summaries and
speech transcripts, each computed by its task's own code (train/task_qa.py, task_summarize.py,
task_speech.py) with the run's settings, as the task's evaluation computes them.

  qa         --question Q --context C: the best span of C (start <= end, inside the context, at
             most the run's --max-answer-len tokens) over the run's windows (--seq-len,
             --doc-stride); printed as 'Q -> span (score)', the score its start + end logit.
  summarize  --input DOCUMENT: beam search with the run's --beam-size (or this --beam-size),
             LENGTH_PENALTY and repeated n-gram ban, the source encoded as training encoded it
             (a T5 checkpoint's 'summarize: ' prefix included); printed as the summary.
  speech     --audio FILE (16 kHz wav/flac; other rates are resampled): the run's log-mel frames
             (the encoder's positions times the front end's down-sampling), decoded with the
             run's --beam-size (or this one); printed as 'FILE -> transcript'.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

from flaxformer_lite import audio
from train import data, task_qa, task_speech, task_summarize
from train import speech_data as sd
from train.config import RunConfig, UsageError
from train.tasks import SpecialIds

TASKS = ('qa', 'summarize', 'speech')
SAMPLING = ('temperature', 'top_k', 'top_p')
# Options a task's decoding has no use for: refused when given, never silently ignored.
UNUSED = {'qa': ('max_new_tokens', 'beam_size', *SAMPLING), 'summarize': SAMPLING,
          'speech': SAMPLING}
HOW = {'qa': 'it answers with the best-scoring span of --context',
       'summarize': 'it decodes with beam search, as its evaluation does (--beam-size)',
       'speech': 'it decodes with beams, as its evaluation does (--beam-size; 1 is greedy)'}


def run_config(workdir: str, run: dict) -> RunConfig:
  """config.json's 'run' as the RunConfig training had (keys of other versions ignored)."""
  names = {f.name for f in dataclasses.fields(RunConfig)}
  try:
    return RunConfig(**{k: v for k, v in run.items() if k in names})
  except (TypeError, ValueError) as e:  # UsageError included: a value RunConfig refuses
    raise UsageError(f'--workdir {workdir}: config.json: run is refused: {e}') from None


def lengths(workdir: str, task: str, run: RunConfig, cfg, tokenizer) -> tuple[int, int]:
  """(source, target) lengths as the task built its examples.

  qa: (window --seq-len, longest answer --max-answer-len), in tokens. summarize: the task's
  BYTE_LENGTHS or PIECE_LENGTHS. speech: (frames = the encoder's positions times the front end's
  down-sampling, target tokens): the default corpus' SpeechTask.tgt_len, a --data run's decoder
  positions (config.json does not keep the length fitted to its folder; it is at most that).
  """
  if task == 'qa':
    return run.seq_len, run.max_answer_len
  if task == 'summarize':
    if isinstance(tokenizer, data.ByteTokenizer):
      return task_summarize.BYTE_LENGTHS
    return task_summarize.PIECE_LENGTHS
  if cfg.max_source_len is None:
    raise UsageError(f'--workdir {workdir}: config.json: model_config has no max_source_len, '
                     'which a speech run\'s has (its encoder positions)')
  tgt_len = task_speech.SpeechTask.tgt_len if run.data is None else cfg.max_len
  return cfg.max_source_len * math.prod(cfg.audio_strides), tgt_len


def check_task_options(task: str, args) -> None:
  """Raises UsageError for an option the task's decoding has no use for (UNUSED)."""
  for name in UNUSED[task]:
    if getattr(args, name):  # given: every default is None or 0
      raise UsageError(f'--{name.replace("_", "-")} does not apply to a {task} run: {HOW[task]}')


# ------------------------------------------------------------------------------------------------
# requests: checked (and audio read) before any checkpoint is

def qa_request(args) -> list[tuple[str, str]]:
  """(question, context) pairs: one --context for every --question, or one per --question."""
  questions, contexts = args.question or [], args.context or []
  if not questions or not contexts:
    missing = '--context C' if questions else '--question Q'
    raise UsageError(f'--question and --context come together: give {missing} too')
  if len(contexts) not in (1, len(questions)):
    raise UsageError(f'{len(questions)} --question and {len(contexts)} --context: give one '
                     '--context for all questions, or one per --question')
  if not all(c.strip() for c in contexts):
    raise UsageError('--context is empty: the answer is a span of it')
  return list(zip(questions, contexts * len(questions) if len(contexts) == 1 else contexts))


def speech_request(gen, args) -> list[dict]:
  """Each --audio file's features as the task computes them: src [F, 80] float32 and
  src_valid [F] bool, F the run's frames. A longer file is cut there (one warning line)."""
  samples = []
  for path in args.audio:
    if not os.path.isfile(path):
      raise UsageError(f'--audio {path}: no such file')
    try:
      samples.append(sd.load_audio(path))  # mono, resampled to 16 kHz
    except data.DataError as e:  # names the file: it does not decode, it has no samples
      raise UsageError(f'--audio {e}') from None
  frames = gen.src_len
  examples = []
  for path, x in zip(args.audio, samples):
    if len(x) > frames * audio.HOP:
      print(f'warning: --audio {path}: {len(x) / sd.SAMPLE_RATE:.1f} s long; only its first '
            f'{frames * audio.HOP / sd.SAMPLE_RATE:.1f} s (the run\'s {frames} frames) are '
            'transcribed', file=sys.stderr)
    mel, valid = task_speech.features(x, frames)
    examples.append({'src': mel, 'src_valid': valid})
  return examples


# ------------------------------------------------------------------------------------------------
# decoding

def answer_lines(gen, pairs: list[tuple[str, str]]) -> list[str]:
  """'question -> span (score)' per pair (task_qa.answer with the run's window settings)."""
  run, ids = gen.run, SpecialIds.of(gen.model.config)
  lines = []
  for question, context in pairs:
    try:
      text, score = task_qa.answer(gen.model, gen.params, gen.tokenizer, question, context,
                                   seq_len=run.seq_len, doc_stride=run.doc_stride,
                                   max_answer_len=run.max_answer_len, ids=ids)
    except ValueError as e:  # windows refused: a --doc-stride or --seq-len edited to nonsense
      raise UsageError(f'--question {question!r}: {e}') from None
    lines.append(f'{question} -> {text} ({score:.4f})')
  return lines


def summarize_lines(gen, documents: list[str], args) -> list[str]:
  """One summary per document: SummarizeTask.summarize with the run's settings."""
  run = gen.run if not args.beam_size else dataclasses.replace(gen.run, beam_size=args.beam_size)
  task = task_summarize.SummarizeTask(run)
  task.tokenizer, task.ids = gen.tokenizer, SpecialIds.of(gen.model.config)
  task.src_len, task.tgt_len = gen.src_len, args.max_new_tokens or gen.tgt_len
  try:
    return task.summarize(gen.model, gen.params, documents)
  except ValueError as e:  # the library's checks, e.g. more new tokens than decoder positions
    raise UsageError(str(e)) from None


def transcribe_lines(gen, examples: list[dict], args) -> list[str]:
  """'FILE -> transcript' per --audio file: SpeechTask.transcribe with the run's settings."""
  task = task_speech.SpeechTask(gen.run)
  task.tokenizer, task.ids = gen.tokenizer, SpecialIds.of(gen.model.config)
  task.frames, task.tgt_len = gen.src_len, args.max_new_tokens or gen.tgt_len
  try:
    texts = task.transcribe(gen.model, gen.params, examples, args.beam_size or gen.run.beam_size)
  except ValueError as e:
    raise UsageError(str(e)) from None
  return [f'{path} -> {text}' for path, text in zip(args.audio, texts)]
