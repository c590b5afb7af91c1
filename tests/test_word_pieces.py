"""--tokenizer word-pieces (train/word_pieces.py) and the per-task tokenizer options."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from train import config, data, squad, word_pieces
from train.config import RunConfig, UsageError

ROOT = pathlib.Path(__file__).resolve().parent.parent

TEXTS = ['socket.create_connection(address, timeout=None, source_address=None)\n'
         'Connect to *address* and return the socket object.',
         'What is the default value of `timeout` in `socket.create_connection`?',
         'Which parameter comes after `address` in `socket.create_connection`?'] * 4


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return word_pieces.WordPiecesTokenizer.train_or_load(
      TEXTS, str(tmp_path_factory.mktemp('wp') / word_pieces.FILE), 50)


def _ids(tok, text, word):
  """The ids of the first occurrence of `word` in `text`, found by character offsets."""
  ids, offsets = squad.offset_tokenizer(tok)(text)
  at = text.index(word)
  inside = (offsets[:, 0] >= at) & (offsets[:, 1] <= at + len(word))
  return ids[inside].tolist()


def test_a_name_is_the_same_ids_wherever_it_stands(tok):
  # SentencePiece gives `timeout` in a question other pieces than in '(address, timeout=':
  # the space (or its absence) is part of the piece. Word pieces split at punctuation first.
  question = 'What is the default value of `timeout` in `socket.create_connection`?'
  context = 'socket.create_connection(address, timeout=None)'
  for word in ('timeout', 'socket', 'create', 'connection'):
    assert _ids(tok, question, word) == _ids(tok, context, word), word
    assert _ids(tok, question, word), word


def test_specials_sit_at_our_ids_and_decode_stops_at_eos(tok):
  vocab = tok.tok.get_vocab()
  assert [vocab[t] for t in ('<pad>', '<s>', '</s>', '<unk>')] == [data.PAD, data.BOS, data.EOS,
                                                                   data.MASK]
  ids = tok.encode('Connect to address')
  assert data.EOS not in ids.tolist() and ids.dtype == np.int32
  assert tok.decode(np.concatenate([ids, [data.EOS], ids])) == 'Connect to address'
  assert tok.decode(tok.encode('timeout=None')) == 'timeout = None'  # spaced punctuation
  assert tok.vocab_size % 8 == 0 and tok.vocab_size >= tok.tok.get_vocab_size()
  assert np.array_equal(tok.encode_target('Connect', 8), np.append(tok.encode('Connect'),
                                                                    data.EOS))


_TRAIN = ('import sys; from tests.test_word_pieces import TEXTS; from train import word_pieces; '
          'word_pieces.WordPiecesTokenizer.train_or_load(TEXTS, sys.argv[1], 50)')


def test_the_same_text_gives_the_same_model_byte_for_byte(tok, tmp_path):
  # Trained in fresh processes: the tokenizers package's own trainers differ from run to run.
  paths = [tmp_path / f'{i}.json' for i in range(2)]
  for path in paths:
    subprocess.run([sys.executable, '-c', _TRAIN, str(path)], check=True, cwd=ROOT)
  assert paths[0].read_bytes() == paths[1].read_bytes()
  pieces = [piece for piece, _ in json.loads(paths[0].read_text())['model']['vocab']]
  assert pieces == sorted(tok.tok.get_vocab(), key=tok.tok.get_vocab().get)  # as in-process


def test_a_model_of_other_options_is_refused_never_reused(tok, tmp_path):
  path = str(tmp_path / word_pieces.FILE)
  first = word_pieces.WordPiecesTokenizer.train_or_load(TEXTS, path, 50, data='a')
  again = word_pieces.WordPiecesTokenizer.train_or_load(['other text'], path, 50, data='a')
  assert again.tok.get_vocab() == first.tok.get_vocab()  # loaded, not retrained
  with pytest.raises(data.DataError, match='--vocab-size 50, not 200'):
    word_pieces.WordPiecesTokenizer.train_or_load(TEXTS, path, 200, data='a')
  with pytest.raises(data.DataError, match='other --data'):
    word_pieces.WordPiecesTokenizer.train_or_load(TEXTS, path, 50, data='b')


def test_too_little_text_is_one_clear_error(tmp_path):
  with pytest.raises(data.DataError, match='cannot train a word-pieces model of --vocab-size 500'):
    word_pieces.WordPiecesTokenizer.train_or_load(['a b'], str(tmp_path / word_pieces.FILE), 500)


def test_each_task_takes_its_own_tokenizers():
  assert RunConfig(task='qa').tokenizer == 'word-pieces'
  assert RunConfig(task='qa').vocab_size == config.TASK_DEFAULTS['qa']['vocab_size']
  assert RunConfig(task='text').tokenizer == 'byte' and RunConfig(task='text').vocab_size == 1024
  assert RunConfig(task='qa', tokenizer='byte').tokenizer == 'byte'
  for task in ('translate', 'summarize', 'text', 'dates', 'mlm', 'speech'):
    with pytest.raises(UsageError, match=f'--tokenizer word-pieces does not apply to --task {task}'):
      RunConfig(task=task, tokenizer='word-pieces')
  with pytest.raises(UsageError, match='--tokenizer sentencepiece does not apply to --task speech'
                     '; it takes byte'):
    RunConfig(task='speech', tokenizer='sentencepiece')
  with pytest.raises(UsageError, match='--tokenizer word-pieces and --init-from'):
    RunConfig(task='qa', tokenizer='word-pieces', init_from='bert/')
  assert RunConfig(task='qa', init_from='bert/').tokenizer == 'byte'  # the checkpoint's own
