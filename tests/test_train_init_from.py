"""`python -m train --init-from DIR`: fine-tuning from a local Hugging Face checkpoint.

A tiny random-weight Marian model is built with transformers and saved with an OPUS-MT layout:
`source.spm` / `target.spm` (SentencePiece models trained here on the pairs' two sides) and a
`vocab.json` of the model's vocabulary size. Then:
  * the run's step-0 evaluation (the checkpoint before any update, on the held-out pairs) equals
    transformers' loss of `MarianMTModel(input_ids, attention_mask, labels=...)` on the same
    pairs, tokenized by transformers' MarianTokenizer (tolerance: 1e-5 relative, float32);
  * a run killed with SIGKILL after its first checkpoint and rerun, with DIR deleted before the
    rerun, ends bit for bit as an uninterrupted run, with the same metrics.jsonl; and
    `python -m train.generate` works on it without DIR;
  * rerunning that workdir with another --init-from is refused, the workdir untouched;
  * a GPT-2 directory with --task translate, a missing folder, a folder without config.json or
    without a tokenizer and --preset with --init-from are each one error line;
  * our reading of the Marian tokenizer files equals transformers' MarianTokenizer, and of a
    tokenizer.json (BART) and T5's spiece.model (with its translation prefix) AutoTokenizer's.
"""

from __future__ import annotations

import io
import json
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cli import (ROOT, Background, _env, assert_one_error_line, checkpoint_steps, read_metrics,
                 restore_state, snapshot, train, tsv_text, without_wallclock)

STEPS = 12
SEQ_LEN = 32
# Eval covers the 20 held-out pairs exactly (batch 4 x 5), as transformers' one batch does.
OPTS = ['--task', 'translate', '--seq-len', SEQ_LEN, '--batch-size', '4', '--steps', STEPS,
        '--log-every', '2', '--eval-every', '6', '--checkpoint-every', '4', '--dropout', '0.1',
        '--learning-rate', '1e-3', '--warmup', '2', '--examples', '2', '--no-progress']
LOSS_RTOL = 1e-5


def _pairs() -> list[tuple[str, str]]:
  return [tuple(line.split('\t')) for line in tsv_text().splitlines()]


def write_marian_tokenizer(directory: pathlib.Path, pairs) -> dict:
  """OPUS-MT's tokenizer files: an spm model per side, one vocab.json (</s> 0, <unk> 1, the
  pieces of both sides, <pad> last). Returns the vocabulary."""
  import sentencepiece as spm
  for name, side in (('source.spm', 0), ('target.spm', 1)):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([p[side] for p in pairs]), model_writer=model, vocab_size=30,
        model_type='unigram', character_coverage=1.0, num_threads=1, minloglevel=2)
    (directory / name).write_bytes(model.getvalue())
  vocab = {'</s>': 0, '<unk>': 1}
  for name in ('source.spm', 'target.spm'):
    sp = spm.SentencePieceProcessor(model_file=str(directory / name))
    for i in range(sp.vocab_size()):
      if not (sp.is_control(i) or sp.is_unknown(i)):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
  vocab['<pad>'] = len(vocab)
  (directory / 'vocab.json').write_text(json.dumps(vocab))
  return vocab


def build_marian(directory: pathlib.Path):
  """A tiny random MarianMTModel with its tokenizer files, saved to `directory`."""
  torch = pytest.importorskip('torch')
  tf = pytest.importorskip('transformers')
  directory.mkdir(parents=True, exist_ok=True)
  vocab = write_marian_tokenizer(directory, _pairs())
  v = len(vocab)
  torch.manual_seed(0)
  cfg = tf.MarianConfig(vocab_size=v, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                        decoder_ffn_dim=48, max_position_embeddings=64, scale_embedding=True,
                        activation_function='swish', pad_token_id=v - 1, eos_token_id=0,
                        decoder_start_token_id=v - 1, forced_eos_token_id=0)
  model = tf.MarianMTModel(cfg).eval()
  model.save_pretrained(directory)
  return model


def build_gpt2(directory: pathlib.Path) -> None:
  pytest.importorskip('torch')
  tf = pytest.importorskip('transformers')
  cfg = tf.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                      bos_token_id=62, eos_token_id=63)
  tf.GPT2LMHeadModel(cfg).save_pretrained(directory)


def marian_tokenizer(directory: pathlib.Path):
  tf = pytest.importorskip('transformers')
  return tf.MarianTokenizer(str(directory / 'source.spm'), str(directory / 'target.spm'),
                            str(directory / 'vocab.json'))


# ------------------------------------------------------------------------------------------------
# the runs: A uninterrupted; B (its own copy of DIR) killed after its first checkpoint, DIR
# deleted, then rerun to the end. Started together; both wait on subprocesses.

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('init_from')
  hf = build_marian(root / 'marian')
  shutil.copytree(root / 'marian', root / 'marian_b')
  (root / 'pairs.tsv').write_text(tsv_text())
  common = [*OPTS, '--data', root / 'pairs.tsv']
  a = Background([*common, '--init-from', root / 'marian', '--workdir', root / 'A'],
                 root / 'logs', 'A')
  b_args = [*common, '--init-from', root / 'marian_b', '--workdir', root / 'B']
  b = Background(b_args, root / 'logs', 'B1')
  caught = b.wait_for(lambda: 4 in checkpoint_steps(root / 'B'))
  b.signal(signal.SIGKILL)
  first = dict(rc=b.wait(), caught=caught, checkpoints=checkpoint_steps(root / 'B'))
  shutil.rmtree(root / 'marian_b')  # a resume reads the workdir only
  b = Background(b_args, root / 'logs', 'B2')
  second = dict(rc=b.wait(), stdout=b.stdout, stderr=b.stderr)
  # The same workdir from another checkpoint: refused, untouched (argparse: the last one wins).
  before = snapshot(root / 'B')
  other = dict(result=train([*b_args, '--init-from', root / 'marian']), before=before,
               after=snapshot(root / 'B'))
  return dict(root=root, hf=hf, a=dict(rc=a.wait(), stdout=a.stdout, stderr=a.stderr),
              first=first, second=second, other=other)


def _ok(run: dict) -> None:
  assert run['rc'] == 0, f'exit {run["rc"]}\n{run["stdout"][-3000:]}\n{run["stderr"][-3000:]}'


@pytest.mark.filterwarnings('ignore:Recommended')  # sacremoses, which it does not need here
@pytest.mark.slow
def test_step_zero_eval_loss_equals_transformers(runs):
  import torch
  _ok(runs['a'])
  root = runs['root']
  evals = [r for r in read_metrics(root / 'A') if r['split'] == 'eval']
  assert evals[0]['step'] == 0, evals
  held_out = [p for i, p in enumerate(_pairs()) if i % 10 == 9]
  tok = marian_tokenizer(root / 'marian')
  batch = tok([s for s, _ in held_out], text_target=[t for _, t in held_out], padding=True,
              truncation=True, max_length=SEQ_LEN, return_tensors='pt')
  labels = batch['labels'].masked_fill(batch['labels'] == tok.pad_token_id, -100)
  with torch.no_grad():
    out = runs['hf'](input_ids=batch['input_ids'], attention_mask=batch['attention_mask'],
                     labels=labels)
  expected = float(out.loss)  # the mean over every real label token: what our eval loss is
  print(f'step-0 eval loss {evals[0]["loss"]!r}, transformers {expected!r}')
  assert abs(evals[0]['loss'] - expected) <= LOSS_RTOL * expected, (evals[0]['loss'], expected)


@pytest.mark.slow
def test_killed_run_resumes_without_dir_and_ends_bit_identical(runs):
  _ok(runs['a'])
  first, second = runs['first'], runs['second']
  assert first['caught'] and first['rc'] == -signal.SIGKILL, first
  _ok(second)
  assert f'resuming from step {max(first["checkpoints"])}' in second['stdout']
  root = runs['root']
  a, b = restore_state(root / 'A', STEPS), restore_state(root / 'B', STEPS)
  a_leaves, a_def = jax.tree.flatten_with_path(a)
  b_leaves, b_def = jax.tree.flatten_with_path(b)
  assert a_def == b_def
  for (path, x), (_, y) in zip(a_leaves, b_leaves):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
  assert without_wallclock(read_metrics(root / 'B')) == without_wallclock(read_metrics(root / 'A'))


@pytest.mark.slow
def test_another_init_from_is_refused_and_the_workdir_untouched(runs):
  other = runs['other']
  assert_one_error_line(other['result'], 'started from --init-from', 'marian_b',
                        'use another --workdir')
  assert other['after'] == other['before']


@pytest.mark.slow
def test_the_run_learns_and_reports(runs):
  _ok(runs['a'])
  assert f'final evaluation after {STEPS} steps' in runs['a']['stdout']
  assert 'examples (held-out):' in runs['a']['stdout']
  root = runs['root']
  evals = [r for r in read_metrics(root / 'A') if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [0, 6, 12]
  assert evals[-1]['loss'] < evals[0]['loss']
  assert (root / 'A' / 'attention.png').is_file()
  config = json.loads((root / 'A' / 'config.json').read_text())
  assert config['run']['init_from'] == str(root / 'marian')
  assert config['model_config']['decoder_start_id'] == config['model_config']['pad_id']
  assert {p.name for p in (root / 'A' / 'pretrained').iterdir()} == {
      'source.spm', 'target.spm', 'vocab.json', 'source.json'}


@pytest.mark.slow
def test_generate_reads_the_workdir_only(runs):
  _ok(runs['second'])
  root = runs['root']
  outputs = []
  for workdir in ('A', 'B'):  # B's DIR is gone
    result = subprocess.run(
        [sys.executable, '-m', 'train.generate', '--workdir', root / workdir, '--input',
         'red cat', '--input', 'blue sun moon', '--max-new-tokens', '8', '--beam-size', '1'],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs.append(result.stdout)
  assert outputs[0] == outputs[1]
  assert outputs[0].splitlines()[0].startswith('red cat -> ')


# ------------------------------------------------------------------------------------------------
# refusals: one line each, before any data is read

def test_refusals_are_one_line(tmp_path):
  build_gpt2(tmp_path / 'gpt2')
  (tmp_path / 'empty').mkdir()
  pairs = tmp_path / 'pairs.tsv'
  pairs.write_text(tsv_text())
  no_tokenizer = tmp_path / 'marian_no_tokenizer'
  shutil.copytree(tmp_path / 'gpt2', no_tokenizer)
  config = json.loads((no_tokenizer / 'config.json').read_text())
  (no_tokenizer / 'config.json').write_text(json.dumps({**config, 'model_type': 'marian'}))
  cases = {
      'gpt2': (['--init-from', tmp_path / 'gpt2'], ['--task translate', "'gpt2'", 'GPT',
                                                     'encoder-decoder']),
      'missing': (['--init-from', tmp_path / 'nowhere'], ['no such folder']),
      'no config': (['--init-from', tmp_path / 'empty'], ['no config.json']),
      'no tokenizer': (['--init-from', no_tokenizer], ['has no tokenizer', 'source.spm']),
      'preset': (['--init-from', tmp_path / 'gpt2', '--preset', 'tiny'], ['--preset tiny']),
  }
  for name, (args, fragments) in cases.items():
    result = train(['--task', 'translate', '--data', pairs, '--steps', '2', '--workdir',
                    tmp_path / f'w_{name}', '--no-progress', *args])
    assert_one_error_line(result, *fragments)


# ------------------------------------------------------------------------------------------------
# the tokenizer, against transformers'

@pytest.mark.filterwarnings('ignore:Recommended')  # sacremoses, which it does not need here
def test_marian_tokenizer_matches_transformers(tmp_path):
  from train import hf_tokenizer
  write_marian_tokenizer(tmp_path, _pairs())
  theirs = marian_tokenizer(tmp_path)
  ours = hf_tokenizer.load(tmp_path, 'marian', eos_id=theirs.eos_token_id)
  sources = ['red cat sun', 'moon  fish star ', 'zebra quux', 'blue.', '']
  targets = ['sun cat red', 'star fish moon', 'unknown words here']
  assert [ours.encode_source(s, 64).tolist() for s in sources] == theirs(sources).input_ids
  assert [ours.encode_source(s, 3).tolist() for s in sources] == theirs(
      sources, truncation=True, max_length=3).input_ids
  labels = theirs(text_target=targets).input_ids
  assert [ours.encode_target(t, 64).tolist() for t in targets] == labels
  for ids in labels + theirs(sources).input_ids:
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
  # Decoding stops at eos (what generate emits is followed by padding).
  assert ours.decode(labels[0] + [5, 6]) == theirs.decode(labels[0], skip_special_tokens=True)


def _spm_model(texts, **options) -> bytes:
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                 model_type='unigram', character_coverage=1.0, num_threads=1,
                                 minloglevel=2, **options)
  return model.getvalue()


def build_t5(directory: pathlib.Path) -> None:
  """T5's layout: spiece.model (pad 0, eos 1, unk 2) and task_specific_params."""
  pytest.importorskip('torch')
  tf = pytest.importorskip('transformers')
  texts = [s for s, _ in _pairs()] + ['translate English to German:'] * 5
  directory.mkdir()
  (directory / 'spiece.model').write_bytes(
      _spm_model(texts, vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
  cfg = tf.T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                    task_specific_params={'summarization': {'prefix': 'summarize: '},
                                          'translation_en_to_de': {
                                              'prefix': 'translate English to German: '}})
  tf.T5ForConditionalGeneration(cfg).save_pretrained(directory)


def build_bart(directory: pathlib.Path) -> None:
  """A tokenizer.json (byte-level BPE, '<s> $A </s>') beside a tiny BART."""
  pytest.importorskip('torch')
  tf = pytest.importorskip('transformers')
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([s for s, _ in _pairs()], trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<s>', '<pad>', '</s>', '<unk>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = processors.TemplateProcessing(single='<s> $A </s>',
                                                     special_tokens=[('<s>', 0), ('</s>', 2)])
  directory.mkdir()
  tok.save(str(directory / 'tokenizer.json'))
  cfg = tf.BartConfig(vocab_size=tok.get_vocab_size(), d_model=32, encoder_layers=1,
                      decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                      encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
  tf.BartForConditionalGeneration(cfg).save_pretrained(directory)


@pytest.mark.parametrize('kind', ['t5', 'bart'])
def test_checkpoint_tokenizers_build_what_transformers_builds(kind, tmp_path):
  """tokenizer.json (BART) and spiece.model (T5) as the run reads them: sources (with T5's
  translation prefix) and labels equal AutoTokenizer's, truncation included; decode too."""
  tf = pytest.importorskip('transformers')
  from train import pretrained
  from train.config import RunConfig
  directory = tmp_path / kind
  (build_t5 if kind == 't5' else build_bart)(directory)
  source = pretrained.load(RunConfig(task='translate', init_from=str(directory),
                                     workdir=str(tmp_path / 'w')))
  prefix = source.record['tokenizer']['source_prefix']
  assert prefix == ('translate English to German: ' if kind == 't5' else '')
  theirs = tf.AutoTokenizer.from_pretrained(directory)
  ours = source.tokenizer
  sources, targets = ['red cat sun', 'moon  fish star', 'zebra!'], ['sun cat red', 'x y']
  for length in (64, 4):
    expected = theirs([prefix + s for s in sources], text_target=targets, truncation=True,
                      max_length=length)
    assert [ours.encode_source(s, length).tolist() for s in sources] == expected.input_ids
    assert [ours.encode_target(t, length).tolist() for t in targets] == expected.labels
  for ids in theirs(sources).input_ids:
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
