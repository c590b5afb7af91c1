"""Data for `--task summarize`: (document, summary) pairs.

Default data (every machine has it, nothing is downloaded): code summarization over the Python
standard library. Each public function or method with a docstring gives one pair:

  document  its source from the `def` line to its end (decorators not included), dedented, with
            its docstring removed;
  summary   the first sentence of its docstring, whitespace collapsed.

Evaluation holds out whole top-level modules (`email` with all of `email.*`, `difflib`, ...), so
it measures summarizing code from modules never seen in training. The pairs depend on the
Python version's standard library; for one version they are a pure function of the seed.

`--data` files: TSV (`document<TAB>summary`, one pair a line) or JSON Lines with `document` and
`summary` fields (XSum's layout; CNN/DailyMail's `article` / `highlights` are read too).
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import sysconfig

import numpy as np

from train.data import DataError, read_text

MAX_DOCUMENT_CHARS = 1500  # longer functions are skipped: they would not fit a small model
MIN_SUMMARY_WORDS = 3  # "Return self." and the like say nothing worth learning
MAX_SUMMARY_WORDS = 40  # a first "sentence" longer than this is a run-on paragraph
EVAL_FRACTION = 0.1  # about this share of the pairs is held out, by module
_SKIP_PARTS = {'site-packages', 'test', 'tests', 'idle_test'}  # test suites are not library code
# After these a '. ' does not end the sentence.
_ABBREVIATIONS = ('e.g', 'i.e', 'etc', 'vs', 'cf')


# ----------------------------------------------------------------------------------------------
# The default pairs: the standard library's functions

def first_sentence(docstring: str) -> str:
  """The first sentence of a docstring: its first paragraph (up to a blank line), whitespace
  collapsed, cut after the first '. ' that does not follow an abbreviation such as 'e.g.'."""
  paragraph = re.split(r'\n\s*\n', docstring.strip(), maxsplit=1)[0]
  text = ' '.join(paragraph.split())
  for match in re.finditer(r'\.\s', text):
    if not text[:match.start()].lower().endswith(_ABBREVIATIONS):
      return text[:match.start() + 1]
  return text


def _trivial(summary: str, name: str) -> bool:
  """Summaries not worth learning: too short or long, a signature ('S.find(sub) -> int',
  'name(args)'), or the lead-in to a list ('Arguments:')."""
  words = summary.split()
  return (not MIN_SUMMARY_WORDS <= len(words) <= MAX_SUMMARY_WORDS
          or '->' in summary or '=>' in summary
          or re.match(rf'[\w.]*\b{re.escape(name)}\(', summary) is not None
          or summary.endswith(':'))


def _is_stub(statements: list[ast.stmt]) -> bool:
  """A body that is only `pass`, `...` or `raise NotImplementedError`: nothing to summarize."""
  for s in statements:
    if isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)):
      continue
    if isinstance(s, ast.Raise) and 'NotImplementedError' in ast.unparse(s):
      continue
    return False
  return True


def _without_docstring(lines: list[str], node: ast.FunctionDef) -> str | None:
  """The function's source with its docstring lines removed and its indentation taken off, or
  None when the docstring shares a line with code (it cannot be cut out by lines)."""
  doc = node.body[0]
  # ast's column offsets count UTF-8 bytes, so the checks slice encoded lines.
  before = lines[doc.lineno - 1].encode()[:doc.col_offset]
  after = lines[doc.end_lineno - 1].encode()[doc.end_col_offset:]
  if before.strip() or after.strip() or doc.lineno == node.lineno:
    return None
  kept = lines[node.lineno - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
  indent = node.col_offset  # whitespace only, so bytes and characters agree
  # Lines indented less than the `def` (continuations of multi-line strings) stay as they are.
  out = [(line[indent:] if line[:indent].isspace() else line).rstrip() for line in kept]
  return '\n'.join(out)


def _docstring_node(node: ast.stmt) -> bool:
  first = node.body[0] if node.body else None
  return (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
          and isinstance(first.value.value, str))


def function_pairs(source: str) -> list[tuple[str, str]]:
  """(document, summary) for each public function or method of one module's source that has a
  usable docstring, in source order."""
  tree = ast.parse(source)
  # Lines as ast numbers them: str.splitlines would also break at form feeds (\x0c), which
  # some modules use between sections, and shift every line number after them.
  lines = re.split(r'\r\n|\r|\n', source)
  pairs = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    # Private and dunder names are skipped: their docstrings are mostly notes to maintainers
    # or boilerplate ("Return repr(self).").
    if node.name.startswith('_') or not _docstring_node(node) or _is_stub(node.body[1:]):
      continue
    summary = first_sentence(ast.get_docstring(node))
    if _trivial(summary, node.name):
      continue
    document = _without_docstring(lines, node)
    if document is None or len(document) > MAX_DOCUMENT_CHARS:
      continue
    # A summary repeated in a comment or string of the body would be copied, not summarized.
    if summary in ' '.join(document.split()):
      continue
    pairs.append((node.lineno, node.col_offset, document, summary))
  # ast.walk is breadth-first; sorting by position puts the pairs in the file's order.
  return [(document, summary) for _, _, document, summary in sorted(pairs)]


def stdlib_modules() -> dict[str, list[pathlib.Path]]:
  """Top-level module name -> its .py files (a package: all of them), sorted; tests and
  site-packages left out."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  modules: dict[str, list[pathlib.Path]] = {}
  for path in sorted(root.rglob('*.py')):
    rel = path.relative_to(root)
    if _SKIP_PARTS & set(rel.parts) or rel.name.startswith('test_'):
      continue
    modules.setdefault(rel.parts[0].removesuffix('.py'), []).append(path)
  return modules


def stdlib_pairs() -> dict[str, list[tuple[str, str]]]:
  """Top-level module name -> its (document, summary) pairs; modules without any are left out
  and a pair already seen in an earlier module (copied code) is kept only there."""
  seen, out = set(), {}
  for name, paths in stdlib_modules().items():
    pairs = []
    for path in paths:
      try:
        pairs += function_pairs(path.read_bytes().decode('utf-8'))
      except (SyntaxError, UnicodeDecodeError, ValueError):
        continue  # a few data files are deliberately broken Python; they are not library code
    pairs = [p for p in pairs if p not in seen]
    seen.update(pairs)
    if pairs:
      out[name] = pairs
  return out


def split_modules(modules: dict[str, list], seed: int) -> tuple[list[str], list[str]]:
  """(train, eval) module names: modules in a seeded random order are held out until they hold
  EVAL_FRACTION of the pairs."""
  names = sorted(modules)
  order = np.random.default_rng(seed).permutation(len(names))
  total, held = sum(len(v) for v in modules.values()), 0
  eval_names = []
  for i in order:
    if held >= EVAL_FRACTION * total:
      break
    eval_names.append(names[i])
    held += len(modules[names[i]])
  return [n for n in names if n not in eval_names], sorted(eval_names)


def default_pairs(seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """(train, eval) code-summarization pairs from the standard library, held out by module.

  An eval pair whose document also occurs in training (the same function in `decimal` and
  `_pydecimal`, say) is dropped, so evaluation never scores memorized code.
  """
  modules = stdlib_pairs()
  train_names, eval_names = split_modules(modules, seed)
  train = [p for n in train_names for p in modules[n]]
  train_documents = {d for d, _ in train}
  evaluation = [p for n in eval_names for p in modules[n] if p[0] not in train_documents]
  return train, evaluation


# ----------------------------------------------------------------------------------------------
# --data files

# JSON Lines field names: (document, summary). A record is read with the first pair whose
# document field it has; XSum uses the first, CNN/DailyMail the second.
JSON_FIELDS = (('document', 'summary'), ('article', 'highlights'))


def _check_pair(path, n: int, document: str, summary: str) -> tuple[str, str]:
  for field, text in (('document', document), ('summary', summary)):
    if not text.strip():
      raise DataError(f'--data {path}: line {n}: the {field} is empty')
  return document, summary


def _tsv_pair(path, n: int, line: str) -> tuple[str, str]:
  fields = line.split('\t')
  if len(fields) != 2:
    # Exactly one tab: a third column (an id, say) must not slip into the document unnoticed.
    raise DataError(f'--data {path}: line {n} has {len(fields)} tab-separated fields, expected '
                    '2 (document<TAB>summary); documents with tabs or newlines need JSON Lines')
  return _check_pair(path, n, fields[0], fields[1])


def _json_pair(path, n: int, line: str) -> tuple[str, str]:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f'--data {path}: line {n} is not valid JSON ({e.msg}, column {e.colno})') \
        from None
  if not isinstance(record, dict):
    raise DataError(f'--data {path}: line {n} is not a JSON object')
  names = next((f for f in JSON_FIELDS if f[0] in record), JSON_FIELDS[0])
  for name in names:
    if name not in record:
      raise DataError(f'--data {path}: line {n} has no "{name}" field (expected "document" and '
                      '"summary", or "article" and "highlights")')
    if not isinstance(record[name], str):
      raise DataError(f'--data {path}: line {n}: "{name}" is not a string')
  return _check_pair(path, n, record[names[0]], record[names[1]])


def read_summaries(path: str, on_bad_bytes: str = 'error') -> list[tuple[str, str]]:
  """(document, summary) pairs of a UTF-8 --data file, by extension: `.tsv` (one
  `document<TAB>summary` a line) or `.jsonl` / `.json` (JSON Lines, one object a line). Blank
  lines are skipped. Bad input raises one DataError naming the file and the line."""
  suffix = pathlib.Path(path).suffix.lower()
  if suffix not in ('.tsv', '.jsonl', '.json'):
    raise DataError(f'--data {path}: unknown extension {suffix!r} for summarization data; use '
                    '.tsv (document<TAB>summary) or .jsonl / .json (JSON Lines)')
  parse = _tsv_pair if suffix == '.tsv' else _json_pair
  # Split on newlines only: str.splitlines would also break at the form feeds and other line
  # separators that code and articles contain, inside a TSV field or a JSON string.
  lines = read_text(path, on_bad_bytes).split('\n')
  pairs = [parse(path, n, line.rstrip('\r')) for n, line in enumerate(lines, 1) if line.strip()]
  if not pairs:
    raise DataError(f'--data {path}: no (document, summary) pairs')
  return pairs


# ----------------------------------------------------------------------------------------------
# Trivial baselines, so that a model's ROUGE means something

def name_baseline(document: str) -> str:
  """The function's name split into words: `get_close_matches` -> 'Get close matches.'"""
  match = re.search(r'def\s+(\w+)', document)
  if match is None:
    return ''
  words = re.sub(r'([a-z0-9])([A-Z])', r'\1 \2', match.group(1)).replace('_', ' ').split()
  return ' '.join(words).capitalize() + '.'


def lead_baseline(document: str) -> str:
  """The lead sentence: the first sentence of the document's first line. For code that is the
  `def` line (name and arguments), for an article its opening sentence."""
  return first_sentence(document.strip().split('\n', 1)[0])


def baseline_scores(pairs: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
  """ROUGE (train.scoring.rouge) of both baselines on `pairs`: {'name': ..., 'lead': ...}."""
  from train.scoring import rouge
  references = [s for _, s in pairs]
  return {'name': rouge([name_baseline(d) for d, _ in pairs], references),
          'lead': rouge([lead_baseline(d) for d, _ in pairs], references)}


if __name__ == '__main__':
  # python -m train.summarize_data [SEED]: counts, time and the baselines' ROUGE.
  import sys
  import time
  start = time.perf_counter()
  train, evaluation = default_pairs(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
  seconds = time.perf_counter() - start
  print(f'{len(train):,} train and {len(evaluation):,} eval pairs in {seconds:.1f} s')
  for name, scores in baseline_scores(evaluation).items():
    print(f'{name} baseline on eval:', ', '.join(f'{k} {v:.1f}' for k, v in scores.items()))
