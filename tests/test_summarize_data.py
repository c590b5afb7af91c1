"""train.summarize_data: the default stdlib code-summarization pairs, the --data readers and
the baselines."""

import ast
import json

import pytest

from train import summarize_data as sd
from train.data import DataError


@pytest.fixture(scope='module')
def modules():
  return sd.stdlib_pairs()


@pytest.fixture(scope='module')
def default(modules):
  return sd.default_pairs(0)


def test_first_sentence():
  assert sd.first_sentence('Return x.  More text.') == 'Return x.'
  assert sd.first_sentence('Do it, e.g. now, i.e. soon. Then.') == 'Do it, e.g. now, i.e. soon.'
  assert sd.first_sentence('Line one\n   goes on\n\nSecond paragraph.') == 'Line one goes on'
  assert sd.first_sentence('Version 3.11 is out.') == 'Version 3.11 is out.'


SOURCE = '''
def public(a, b=1):
    """Add two numbers together.

    More detail that is not the summary.
    """
    text = """
not indented"""
    return a + b


def _private(a):
    """Add two numbers together privately."""
    return a


def undocumented(a):
    return a


def stub(self):
    """Do something in a subclass."""
    raise NotImplementedError


def trivial(a):
    """Return a."""
    return a


def leaky(a):
    """Return the value unchanged."""
    # Return the value unchanged.
    return a


class Thing:
    def method(self):
        """Tell the thing's name to everyone."""
        return 'thing'
'''


def test_function_pairs():
  pairs = sd.function_pairs(SOURCE)
  assert pairs == [
      ('def public(a, b=1):\n    text = """\nnot indented"""\n    return a + b',
       'Add two numbers together.'),
      ("def method(self):\n    return 'thing'", "Tell the thing's name to everyone."),
  ]
  # A form feed between sections (some modules have them) is not a line break for ast.
  assert sd.function_pairs('\x0c\n# section\x0c two\n' + SOURCE) == pairs


def test_default_pairs_are_real_and_clean(default):
  train, evaluation = default
  assert len(train) > 2000 and len(evaluation) > 200
  for document, summary in train + evaluation:
    function = ast.parse(document).body[0]
    assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
    first = function.body[0]
    # No docstring left, and the summary text is nowhere in the document.
    assert not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str))
    assert summary not in ' '.join(document.split())
    assert len(document) <= sd.MAX_DOCUMENT_CHARS
    # One sentence, one line, whitespace collapsed.
    assert sd.first_sentence(summary) == summary == ' '.join(summary.split())
    assert sd.MIN_SUMMARY_WORDS <= len(summary.split()) <= sd.MAX_SUMMARY_WORDS


def test_default_pairs_hold_out_whole_modules(modules, default):
  train_names, eval_names = sd.split_modules(modules, 0)
  assert eval_names and not set(train_names) & set(eval_names)
  assert sorted(train_names + eval_names) == sorted(modules)
  train, evaluation = default
  assert train == [p for n in train_names for p in modules[n]]
  assert set(evaluation) <= {p for n in eval_names for p in modules[n]}
  assert not {d for d, _ in evaluation} & {d for d, _ in train}
  held = sum(len(modules[n]) for n in eval_names) / sum(len(v) for v in modules.values())
  assert sd.EVAL_FRACTION <= held < 0.25
  assert sd.split_modules(modules, 1) != (train_names, eval_names)  # the seed matters


def test_default_pairs_are_deterministic(default):
  assert sd.default_pairs(0) == default


# ------------------------------------------------------------------------------------------------
# --data files

def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text, encoding='utf-8')
  return str(path)


def test_read_tsv_and_jsonl(tmp_path):
  tsv = write(tmp_path, 'd.tsv', 'An article.\tA summary.\n\nSecond one.\tSecond summary.\r\n')
  assert sd.read_summaries(tsv) == [('An article.', 'A summary.'),
                                    ('Second one.', 'Second summary.')]
  records = [{'document': 'Line one\nline two\x0c end.', 'summary': 'Short.', 'id': '7'},
             {'article': 'CNN text.', 'highlights': 'Highlights.'}]
  jsonl = write(tmp_path, 'd.jsonl', '\n'.join(json.dumps(r) for r in records) + '\n\n')
  assert sd.read_summaries(jsonl) == [('Line one\nline two\x0c end.', 'Short.'),
                                      ('CNN text.', 'Highlights.')]
  json_lines = write(tmp_path, 'd.json', json.dumps(records[0], ensure_ascii=False))
  assert len(sd.read_summaries(json_lines)) == 1


@pytest.mark.parametrize('name, text, message', [
    ('a.tsv', 'doc\tsum\nno tab here\n', 'line 2 has 1 tab-separated fields'),
    ('a.tsv', 'doc\tsum\nid\tdoc\tsum\n', 'line 2 has 3 tab-separated fields'),
    ('a.tsv', 'doc\tsum\n\ndoc\t  \n', 'line 3: the summary is empty'),
    ('a.tsv', '\tsum\n', 'line 1: the document is empty'),
    ('a.jsonl', '{"document": "d", "summary": "s"}\n{"document": "d",\n',
     'line 2 is not valid JSON'),
    ('a.jsonl', '{"document": "d"}\n', 'line 1 has no "summary" field'),
    ('a.jsonl', '{"text": "d", "summary": "s"}\n', 'line 1 has no "document" field'),
    ('a.jsonl', '{"article": "d"}\n', 'line 1 has no "highlights" field'),
    ('a.json', '{"document": "", "summary": "s"}\n', 'line 1: the document is empty'),
    ('a.jsonl', '{"document": "d", "summary": 3}\n', 'line 1: "summary" is not a string'),
    ('a.jsonl', '["d", "s"]\n', 'line 1 is not a JSON object'),
])
def test_bad_data_names_file_and_line(tmp_path, name, text, message):
  path = write(tmp_path, name, text)
  with pytest.raises(DataError) as error:
    sd.read_summaries(path)
  assert str(error.value).startswith(f'--data {path}: ')
  assert message in str(error.value)


def test_bad_files(tmp_path):
  with pytest.raises(DataError, match='unknown extension'):
    sd.read_summaries(write(tmp_path, 'a.csv', 'doc,sum\n'))
  with pytest.raises(DataError, match='no such file'):
    sd.read_summaries(str(tmp_path / 'missing.tsv'))
  with pytest.raises(DataError, match='empty'):
    sd.read_summaries(write(tmp_path, 'blank.jsonl', '\n\n'))
  bad = tmp_path / 'bytes.tsv'
  bad.write_bytes(b'doc\xff\tsum\n')
  with pytest.raises(DataError, match='not valid UTF-8'):
    sd.read_summaries(str(bad))


# ------------------------------------------------------------------------------------------------
# baselines

def test_baselines():
  document = 'def get_closeMatches(word, n=3):\n    return []'
  assert sd.name_baseline(document) == 'Get close matches.'
  assert sd.lead_baseline(document) == 'def get_closeMatches(word, n=3):'
  assert sd.lead_baseline('First sentence. Second one.\nMore.') == 'First sentence.'


def test_baseline_scores():
  pytest.importorskip('rouge_score')
  scores = sd.baseline_scores([('def get_close_matches(word):\n    return []',
                                'Get close matches of a word.')])
  # name: 3 words, all in the 6-word summary: P = 1, R = 1/2, F1 = 2/3.
  assert scores['name']['rouge1'] == pytest.approx(200 / 3)
  # lead: "def get close matches word" (5) vs 6, overlap 4: F1 = 2 * 4 / 11.
  assert scores['lead']['rouge1'] == pytest.approx(800 / 11)
