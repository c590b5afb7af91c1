"""The data side of --task qa: SQuAD reading, windows, span decoding, the official metric and
the default stdlib question data (train/squad.py, train/qa_data.py)."""

import hashlib
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from train import data, qa_data, squad, word_pieces
from train.data import DataError

CLS, SEP, PAD = 1, 2, 0  # any three ids: the windows only place them
CONTEXT_1 = ('The Zürich café opened in 1896 on the Limmat quay. Its founder, Anna Keller, '
             'served coffee, chocolate and small pastries to students of the polytechnic. '
             'In 1923 the café moved to a larger building near the opera house.')
CONTEXT_2 = ('Tokenizers split text into pieces. A byte-level tokenizer never meets an unknown '
             'character, while a word-piece vocabulary marks rare words with [UNK].')


def _qa(qid, question, context, *answers):
  return {'id': qid, 'question': question,
          'answers': [{'text': a, 'answer_start': context.index(a)} for a in answers]}


SQUAD_V1 = {'version': '1.1', 'data': [
    {'title': 'Cafe', 'paragraphs': [{'context': CONTEXT_1, 'qas': [
        _qa('q1', 'When did the café open?', CONTEXT_1, '1896'),
        _qa('q2', 'Who founded the café?', CONTEXT_1, 'Anna Keller', 'Keller'),
        _qa('q3', 'Where is the café?', CONTEXT_1, 'Zürich'),
        _qa('q4', 'Where did the café move in 1923?', CONTEXT_1,
            'a larger building near the opera house')]}]},
    {'title': 'Tokens', 'paragraphs': [{'context': CONTEXT_2, 'qas': [
        _qa('q5', 'What marks rare words?', CONTEXT_2, '[UNK]'),
        _qa('q6', 'What never meets an unknown character?', CONTEXT_2,
            'A byte-level tokenizer')]}]}]}
SQUAD_V2 = {'version': 'v2.0', 'data': [{'title': 'Cafe', 'paragraphs': [{
    'context': CONTEXT_1, 'qas': [
        dict(_qa('u1', 'When did the café open?', CONTEXT_1, '1896'), is_impossible=False),
        {'id': 'u2', 'question': 'When did the café close?', 'answers': [],
         'plausible_answers': [{'text': '1923', 'answer_start': CONTEXT_1.index('1923')}],
         'is_impossible': True}]}]}]}


def _write(tmp_path, name, content):
  path = tmp_path / name
  path.write_text(content if isinstance(content, str) else json.dumps(content), encoding='utf-8')
  return path


@pytest.fixture(scope='module')
def tokenizers_by_kind(tmp_path_factory):
  """Four tokenize functions: bytes, a tiny SentencePiece unigram model, a tiny lower-cased
  WordPiece and our word-pieces (train/word_pieces.py)."""
  import sentencepiece
  import tokenizers
  from tokenizers import models, normalizers, pre_tokenizers, trainers
  texts = [CONTEXT_1, CONTEXT_2] + [q['question'] for d in SQUAD_V1['data']
                                    for p in d['paragraphs'] for q in p['qas']]
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(texts * 5), model_writer=model, vocab_size=80,
      model_type='unigram', character_coverage=1.0, num_threads=1, minloglevel=2)
  sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
  wp = tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]'))
  wp.normalizer = normalizers.BertNormalizer(lowercase=True)
  wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  wp.train_from_iterator(texts * 5, trainers.WordPieceTrainer(
      vocab_size=150, special_tokens=['[PAD]', '[UNK]', '[CLS]', '[SEP]']))
  ours = word_pieces.WordPiecesTokenizer.train_or_load(
      texts * 5, str(tmp_path_factory.mktemp('wp') / word_pieces.FILE), 100)
  return {'bytes': squad.offset_tokenizer(data.ByteTokenizer()),
          'sentencepiece': squad.offset_tokenizer(sp),
          'wordpiece': squad.offset_tokenizer(wp),
          'word-pieces (ours)': squad.offset_tokenizer(ours)}


def _windows(example, tokenize, max_len=96, doc_stride=16, **kw):
  return squad.windows(example, tokenize, max_len=max_len, doc_stride=doc_stride,
                       max_question_len=24, cls_id=CLS, sep_id=SEP, pad_id=PAD, **kw)


def _answer_text(window):
  return window.context[window.offsets[window.start, 0]:window.offsets[window.end, 1]]


# ---------------------------------------------------------------------------------------------
# read_squad

def test_read_squad_v1_and_v2(tmp_path):
  v1 = squad.read_squad(_write(tmp_path, 'v1.json', SQUAD_V1))
  assert [ex.id for ex in v1] == ['q1', 'q2', 'q3', 'q4', 'q5', 'q6']
  assert v1[1].answers == (squad.Answer('Anna Keller', CONTEXT_1.index('Anna')),
                           squad.Answer('Keller', CONTEXT_1.index('Keller')))
  assert not any(ex.is_impossible for ex in v1)
  v2 = squad.read_squad(_write(tmp_path, 'v2.json', SQUAD_V2))
  assert [(ex.id, ex.is_impossible, len(ex.answers)) for ex in v2] == [('u1', False, 1),
                                                                       ('u2', True, 0)]


def _broken(change):
  doc = json.loads(json.dumps(SQUAD_V1))
  change(doc['data'][0]['paragraphs'][0]['qas'][1])
  return doc


@pytest.mark.parametrize('content, message', [
    ('{"data": [', 'not a SQuAD JSON file'),
    (_broken(lambda qa: qa['answers'][0].update(answer_start=3)), 'outside its context'),
    (_broken(lambda qa: qa['answers'][0].update(text='Anna Kellerman')), 'outside its context'),
    (_broken(lambda qa: qa['answers'][0].update(answer_start=-5)), 'outside its context'),
    (_broken(lambda qa: qa.pop('question')), 'missing field "question"'),
    (_broken(lambda qa: qa['answers'][0].pop('answer_start')), 'missing field "answer_start"'),
    (_broken(lambda qa: qa.update(answers=[])), 'no answers'),
    (_broken(lambda qa: qa.update(id='q1')), 'used twice'),
])
def test_bad_squad_files_give_one_error_naming_file_and_question(tmp_path, content, message):
  path = _write(tmp_path, 'bad.json', content)
  with pytest.raises(DataError) as e:
    squad.read_squad(path)
  text = str(e.value)
  assert message in text and str(path) in text and '\n' not in text
  if message != 'not a SQuAD JSON file':
    assert 'question q2' in text or 'question q1' in text  # the duplicate is named by its id


def test_missing_id_and_missing_file_are_named(tmp_path):
  path = _write(tmp_path, 'noid.json', _broken(lambda qa: qa.pop('id')))
  with pytest.raises(DataError, match=r'noid\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\]'):
    squad.read_squad(path)
  with pytest.raises(DataError, match='no such file'):
    squad.read_squad(tmp_path / 'absent.json')


# ---------------------------------------------------------------------------------------------
# windows

@pytest.mark.parametrize('kind', ['bytes', 'sentencepiece', 'wordpiece',
                                  'word-pieces (ours)'])
@pytest.mark.parametrize('max_len, doc_stride', [(256, 64), (96, 16)])
def test_window_answers_map_back_to_the_exact_characters(tmp_path, tokenizers_by_kind, kind,
                                                         max_len, doc_stride):
  tokenize = tokenizers_by_kind[kind]
  for ex in squad.read_squad(_write(tmp_path, 'v1.json', SQUAD_V1)):
    found = 0
    for w in _windows(ex, tokenize, max_len, doc_stride):
      n = int(w.valid.sum())
      assert w.tokens[0] == CLS and w.tokens[n - 1] == SEP and (w.tokens[n:] == PAD).all()
      q = len(tokenize(ex.question)[0][:24])
      assert w.tokens[q + 1] == SEP and (w.token_types[:q + 2] == 0).all()
      assert (w.token_types[q + 2:n] == 1).all() and (w.offsets[q + 2:n - 1] >= 0).all()
      if w.start:
        assert _answer_text(w) == ex.answers[0].text
        found += 1
      else:
        assert w.end == 0
    assert found >= 1, (kind, ex.id)


def test_question_words_are_whole_words_of_the_question_case_kept():
  question = 'What is the default value of `timeout` in `socket.create_connection`?'
  context = ('socket.create_connection(address, timeout=None, Timeout=1)\n'
             'Connect to *address* with a timeout; see socket.create_connection_ex.')
  marked = squad.question_word_chars(question, context)
  words = [m.group() for m in re.finditer(r'\w+', context) if marked[m.start()]]
  assert words == ['socket', 'create_connection', 'timeout', 'timeout', 'socket']
  # Every character of a marked word is marked, and nothing else is.
  assert marked.sum() == sum(len(w) for w in words)
  assert squad.question_word_chars('', context).sum() == 0
  assert squad.question_word_chars(question, '').shape == (0,)


@pytest.mark.parametrize('kind', ['bytes', 'sentencepiece', 'wordpiece', 'word-pieces (ours)'])
def test_windows_mark_the_context_tokens_of_question_words(tokenizers_by_kind, kind):
  tokenize = tokenizers_by_kind[kind]
  ex = squad.Example('q', 'When did Anna Keller open the café?', CONTEXT_1,
                     (squad.Answer('1896', CONTEXT_1.index('1896')),))
  marked = squad.question_word_chars(ex.question, ex.context)
  plain = _windows(ex, tokenize, max_len=64, doc_stride=16)
  ws = _windows(ex, tokenize, max_len=64, doc_stride=16, question_words=True)
  assert len(ws) == len(plain) > 1
  n_marked = 0
  for w, p in zip(ws, plain):
    assert np.array_equal(w.tokens, p.tokens) and (w.start, w.end) == (p.start, p.end)
    context = np.flatnonzero(p.token_types == 1)[:-1]  # the chunk, without its [SEP]
    expected = np.where(marked[w.offsets[context, 0]], squad.QUESTION_WORD, 1)
    assert np.array_equal(w.token_types[context], expected)
    assert np.array_equal(np.delete(w.token_types, context), np.delete(p.token_types, context))
    n_marked += int((expected == squad.QUESTION_WORD).sum())
  assert n_marked >= 3  # Anna, Keller, the ... in some window


def test_an_answer_split_across_windows_points_at_cls_where_it_is_not_whole():
  ex = squad.Example('long', 'Where did the café move?', CONTEXT_1,
                     (squad.Answer('a larger building near the opera house',
                                   CONTEXT_1.index('a larger')),))
  answer = ex.answers[0]
  ws = _windows(ex, squad.tokenize_bytes, max_len=80, doc_stride=12)
  assert len(ws) > 3
  whole = partial = 0
  for w in ws:
    chars = w.offsets[w.valid & (w.offsets[:, 0] >= 0)]
    first, last = chars[:, 0].min(), chars[:, 1].max()
    if first <= answer.start and answer.end <= last:
      assert _answer_text(w) == answer.text
      whole += 1
    else:
      assert (w.start, w.end) == (0, 0)
      partial += first < answer.end and answer.start < last  # holds a part of it
  assert whole >= 1 and partial >= 1


def test_unanswerable_questions_point_at_cls(tmp_path, tokenizers_by_kind):
  v2 = squad.read_squad(_write(tmp_path, 'v2.json', SQUAD_V2))
  for tokenize in tokenizers_by_kind.values():
    ws = _windows(v2[1], tokenize, max_len=48, doc_stride=10)
    assert len(ws) > 1 and all((w.start, w.end) == (0, 0) for w in ws)
    assert any(w.start for w in _windows(v2[0], tokenize, max_len=48, doc_stride=10))


def test_windows_refuse_a_window_without_room():
  ex = squad.Example('x', 'a long question ' * 4, 'context', (squad.Answer('context', 0),))
  with pytest.raises(ValueError, match='no room'):
    _windows(ex, squad.tokenize_bytes, max_len=20)


def test_offsets_of_the_adapters_are_characters():
  ids, offsets = squad.tokenize_bytes('aé b')  # é is two bytes, both spanning character 1
  assert len(ids) == 5 and offsets.tolist() == [[0, 1], [1, 2], [1, 2], [2, 3], [3, 4]]
  assert squad.offset_tokenizer(data.ByteTokenizer()) is squad.tokenize_bytes
  with pytest.raises(TypeError):
    squad.offset_tokenizer(object())


def test_to_batch_stacks_windows():
  ex = squad.Example('x', 'What?', CONTEXT_2, (squad.Answer('[UNK]', CONTEXT_2.index('[UNK]')),))
  batch = squad.to_batch(_windows(ex, squad.tokenize_bytes, max_len=64))
  assert batch['tokens'].shape == batch['valid'].shape == batch['token_types'].shape
  assert batch['start'].shape == (batch['tokens'].shape[0],) and batch['start'].max() > 0


# ---------------------------------------------------------------------------------------------
# best_span / predict

def _window(context='abcdefgh', head=3, max_len=12):
  """A window whose context characters are one token each, from position `head` on (the
  positions before it stand for [CLS] question [SEP])."""
  offsets = np.full((max_len, 2), -1, np.int32)
  for i, _ in enumerate(context):
    offsets[head + i] = i, i + 1
  valid = np.arange(max_len) < head + len(context) + 1
  return squad.Window('w', context, np.zeros(max_len, np.int32), np.zeros(max_len, np.int32),
                      valid, offsets, 0, 0)


def test_best_span_respects_order_length_and_context():
  w = _window()
  start, end = np.zeros(12), np.zeros(12)
  start[0] = end[0] = 100.0  # [CLS] and the question are never part of a span
  start[1] = end[2] = 50.0
  start[8], end[4] = 5.0, 4.0  # the best start lies after the best end: start <= end wins
  score, a, b = squad.best_span(start, end, w, max_answer_len=30)
  assert a <= b and (score, a, b) == (5.0, 5, 6)  # start 8 with end 8 (context char 5)
  start, end = np.zeros(12), np.zeros(12)
  start[3], end[10] = 3.0, 3.5  # 6.5 for 8 tokens (chars 0-8)
  start[6] = end[6] = 1.0  # 4.0 for tokens 3-6 (chars 0-4)
  assert squad.best_span(start, end, w, max_answer_len=30) == (6.5, 0, 8)
  assert squad.best_span(start, end, w, max_answer_len=4) == (4.0, 0, 4)


def test_predict_takes_the_best_window_and_the_null_rule():
  w1, w2 = _window('abcdefgh'), _window('cdefghij')
  s1, e1, s2, e2 = np.zeros(12), np.zeros(12), np.zeros(12), np.zeros(12)
  s1[4], e1[5] = 1.0, 1.0  # 'bc' scores 2 in w1
  s2[6], e2[8] = 2.0, 2.0  # 'fgh' scores 4 in w2
  assert squad.predict([w1, w2], [s1, s2], [e1, e2]) == ('fgh', 4.0)
  s1[0] = e1[0] = 2.5  # null 5 in w1 but 0 in w2: the smallest null score (0) loses to 4
  assert squad.predict([w1, w2], [s1, s2], [e1, e2], with_null=True) == ('fgh', 4.0)
  s2[0] = e2[0] = 3.0  # null = min(5, 6) = 5 > 4: no answer
  assert squad.predict([w1, w2], [s1, s2], [e1, e2], with_null=True) == ('', 5.0)
  assert squad.predict([w1, w2], [s1, s2], [e1, e2], with_null=True,
                       null_threshold=1.5) == ('fgh', 4.0)


# ---------------------------------------------------------------------------------------------
# The official metric (evaluate-v2.0.py: normalize_answer, compute_exact, compute_f1)

def test_normalize_answer_follows_the_official_rules():
  # lower case; punctuation (string.punctuation) removed; whole words a/an/the removed;
  # whitespace collapsed.
  assert squad.normalize_answer('The  Quick, brown fox!') == 'quick brown fox'
  assert squad.normalize_answer('An apple a day') == 'apple day'
  assert squad.normalize_answer('theater THE-end') == 'theater theend'  # '-' goes first
  assert squad.normalize_answer("  Keller's\tcafé. ") == 'kellers café'


def test_exact_match_and_f1_on_fixed_strings():
  assert squad.exact_match('the Cat.', 'cat') == 1.0 and squad.exact_match('cats', 'cat') == 0.0
  # pred words [cat sat on mat], gold [cat on mat]: P 3/4, R 1, F1 2*.75/1.75 = 6/7
  assert squad.f1('the cat sat on the mat', 'a cat on a mat') == pytest.approx(6 / 7)
  # common counts are clipped: (b b c) & (b c c) = {b: 1, c: 1}: P = R = 2/3
  assert squad.f1('b b c', 'b c c') == pytest.approx(2 / 3)
  assert squad.f1('dog', 'cat') == 0.0
  assert squad.f1('', '') == 1.0 and squad.f1('the', '') == 1.0 and squad.f1('x', '') == 0.0


def test_squad_scores_max_over_golds_missing_and_unanswerable():
  examples = [
      squad.Example('a', 'q', 'c', (squad.Answer('Anna Keller', 0), squad.Answer('Keller', 5))),
      squad.Example('b', 'q', 'c', (squad.Answer('in 1896', 0),)),
      squad.Example('c', 'q', 'c', (), is_impossible=True),
      squad.Example('d', 'q', 'c', (squad.Answer('x', 0),))]
  preds = {'a': 'keller', 'b': '1896', 'c': ''}  # 'd' missing: 0
  scores = squad.squad_scores(preds, examples)
  assert scores['exact_match'] == pytest.approx(100 * 2 / 4)
  assert scores['f1'] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)  # 'b': P 1, R 1/2


# ---------------------------------------------------------------------------------------------
# The default stdlib questions

@pytest.fixture(scope='module')
def stdlib_data():
  return qa_data.default_examples(0)


def test_stdlib_answers_are_exact_spans_and_splits_disjoint(stdlib_data):
  train, held_out = stdlib_data
  assert len(train) > 2000 and len(held_out) > 200
  for ex in train + held_out:
    (answer,) = ex.answers
    assert answer.text.strip() and ex.context[answer.start:answer.end] == answer.text
  assert len({ex.id for ex in train}) == len(train)
  assert not set(qa_data.TRAIN_MODULES) & set(qa_data.EVAL_MODULES)
  assert all(ex.id.startswith(tuple(m + '.' for m in qa_data.EVAL_MODULES)) for ex in held_out)
  assert not any(ex.id.startswith(tuple(m + '.' for m in qa_data.EVAL_MODULES)) for ex in train)
  assert not {ex.context for ex in train} & {ex.context for ex in held_out}


def _digest(examples):
  return hashlib.sha256(repr(examples).encode()).hexdigest()


def test_stdlib_data_is_deterministic(stdlib_data):
  assert qa_data.default_examples(0) == stdlib_data
  assert qa_data.default_examples(1)[0] != stdlib_data[0]  # the seed groups the contexts
  # Another process with another string-hash seed (set order, dict-of-set reprs) agrees.
  code = ('import hashlib; from train import qa_data; '
          'print(hashlib.sha256(repr(qa_data.default_examples(0)).encode()).hexdigest())')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       env={**os.environ, 'PYTHONHASHSEED': '12345'}, cwd=str(_root()))
  assert out.stdout.strip() == _digest(stdlib_data)


def _root():
  import pathlib
  return pathlib.Path(__file__).resolve().parents[1]


def test_stdlib_windows_hold_their_answers(stdlib_data):
  for ex in stdlib_data[1][:100]:
    ws = _windows(ex, squad.tokenize_bytes, max_len=384, doc_stride=128)
    assert any(w.start and _answer_text(w) == ex.answers[0].text for w in ws)
