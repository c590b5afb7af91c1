"""The default `--task qa` data: questions on the Python standard library's own API documentation.

Every machine has it, so nothing is downloaded. A context is a documentation page of a few
entries, each a signature line and the first paragraph of its docstring, e.g.

  socket.create_connection(address, timeout=..., source_address=None, *, all_errors=False)
  Connect to *address* and return the socket object. ...

and the questions (`_questions`) ask for a default value, the parameter that follows another,
the first parameter, what a function returns or does (its first docstring sentence), which
function a sentence documents and which module defines an entry. Every answer is an exact
character span of its context (its first occurrence where the entry is, not a lucky match).

Held out by module: evaluation uses EVAL_MODULES only, never seen in training. The data is a
pure function of the seed and the Python version (docstrings and reprs differ between versions);
defaults whose repr depends on the process (addresses, set order) are left out.
`python -m train.qa_data` prints the counts and two trivial baselines' scores.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import warnings

import numpy as np

from train.squad import Answer, Example, normalize_answer, squad_scores

TRAIN_MODULES = (
    'abc', 'argparse', 'ast', 'base64', 'binascii', 'bz2', 'cmath', 'cmd', 'code', 'codecs',
    'collections', 'colorsys', 'configparser', 'contextlib', 'copy', 'dataclasses', 'datetime',
    'dis', 'doctest', 'email.utils', 'enum', 'filecmp', 'fileinput', 'fnmatch', 'fractions',
    'ftplib', 'functools', 'getopt', 'gettext', 'glob', 'graphlib', 'gzip', 'hashlib', 'hmac',
    'http.client', 'http.cookiejar', 'http.cookies', 'imaplib', 'importlib', 'inspect', 'io',
    'itertools', 'linecache', 'locale', 'logging', 'lzma', 'mailbox', 'math', 'mimetypes',
    'netrc', 'operator', 'optparse', 'os', 'os.path', 'pathlib', 'pickle', 'pkgutil', 'platform',
    'plistlib', 'poplib', 'pprint', 'pstats', 'queue', 'quopri', 'random', 're', 'reprlib',
    'runpy', 'sched', 'secrets', 'selectors', 'shelve', 'shutil', 'smtplib', 'socket', 'sqlite3',
    'ssl', 'stat', 'string', 'struct', 'subprocess', 'sysconfig', 'tarfile', 'tempfile',
    'threading', 'time', 'timeit', 'tokenize', 'trace', 'traceback', 'types', 'typing',
    'unicodedata', 'unittest', 'urllib.parse', 'urllib.request', 'uuid', 'warnings', 'wave',
    'weakref', 'webbrowser', 'xml.dom.minidom', 'xml.etree.ElementTree', 'xmlrpc.client',
    'zipfile', 'zlib')
EVAL_MODULES = ('bisect', 'calendar', 'csv', 'difflib', 'heapq', 'html', 'ipaddress', 'json',
                'shlex', 'statistics', 'textwrap', 'urllib.robotparser')
ENTRIES_PER_CONTEXT = 3
TRAIN_PAGES = 8  # shufflings of each training module into contexts (`module_examples`)
_MAX_DOC = 400  # characters of docstring per entry: a paragraph, not a page
_MAX_DEFAULT = 40  # longer default reprs are not asked for


def _signature(obj, is_method: bool) -> inspect.Signature | None:
  """The signature without annotations (and without self for methods), or None."""
  try:
    sig = inspect.signature(obj)
  except (TypeError, ValueError):
    return None
  params = list(sig.parameters.values())[1 if is_method else 0:]
  return sig.replace(parameters=[p.replace(annotation=p.empty) for p in params],
                     return_annotation=sig.empty)


def _doc(obj) -> str:
  """The docstring's first paragraph, whitespace collapsed, cut at a sentence near _MAX_DOC."""
  doc = inspect.getdoc(obj) or ''
  para = ' '.join(doc.split('\n\n')[0].split())
  if len(para) > _MAX_DOC:
    cut = para.rfind('. ', 0, _MAX_DOC)
    para = para[:cut + 1] if cut > 0 else ''
  return para


def _members(module) -> list[tuple[str, object, bool]]:
  """(qualified name, object, is_method): the module's public functions and classes defined
  there, and the classes' public methods, sorted by name."""
  out = []
  for name, obj in sorted(vars(module).items()):
    if name.startswith('_') or getattr(obj, '__module__', None) != module.__name__:
      continue
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
      out.append((name, obj, False))
    elif inspect.isclass(obj):
      out.append((name, obj, False))
      for meth, fn in sorted(vars(obj).items()):
        if not meth.startswith('_') and inspect.isfunction(fn):
          out.append((f'{name}.{meth}', fn, True))
  return out


def _default_ok(param: inspect.Parameter) -> bool:
  if param.default is param.empty or isinstance(param.default, (set, frozenset, dict)):
    return False
  text = repr(param.default)
  return len(text) <= _MAX_DEFAULT and ' at 0x' not in text and '\n' not in text


def entries(module_name: str) -> list[dict]:
  """The documentation entries of one module: {'module', 'name', 'signature' (str(signature)),
  'params' (`_param_spans`), 'doc' (first docstring paragraph)}."""
  with warnings.catch_warnings():  # deprecated modules warn on import and on getdoc
    warnings.simplefilter('ignore')
    module = importlib.import_module(module_name)
    return [e for name, obj, is_method in _members(module)
            if (e := _entry(module_name, name, obj, is_method))]


def _entry(module_name: str, name: str, obj, is_method: bool) -> dict | None:
  sig = _signature(obj, is_method)
  if sig is None:
    return None
  text = str(sig)
  if any(ch in text for ch in '\n<>') or len(text) > 300:
    return None  # process-dependent reprs (<object ...>) or unreadable walls of defaults
  return {'module': module_name, 'name': name, 'signature': text,
          'params': _param_spans(sig, text), 'doc': _doc(obj)}


def _param_spans(sig: inspect.Signature, text: str) -> list[tuple]:
  """(name, where the name starts in `text`, default repr or None, where it starts) of each
  parameter; `text` is str(sig), which lists them in order (with / and * markers between)."""
  out, cursor = [], 0
  for p in sig.parameters.values():
    at = text.index(str(p), cursor)
    cursor = at + len(str(p))
    stars = len(str(p)) - len(str(p).lstrip('*'))
    default = repr(p.default) if _default_ok(p) else None
    # str(p) is name=repr(default): the default follows the name and '='.
    out.append((p.name, at + stars, default, at + len(p.name) + 1 if default else None))
  return out


def _first_sentence(doc: str) -> str:
  """The docstring's first sentence without its full stop ('' if none is plain enough)."""
  m = re.match(r'([A-Z][^.!?:]{10,150})\.(\s|$)', doc)
  return m.group(1) if m else ''


def _context(group: list[dict]) -> tuple[str, list[int]]:
  """A page of entries (signature line, docstring paragraph) and where each entry starts."""
  parts, starts, pos = [], [], 0
  for e in group:
    text = f"{e['module']}.{e['name']}{e['signature']}" + (f"\n{e['doc']}" if e['doc'] else '')
    parts.append(text)
    starts.append(pos)
    pos += len(text) + 2
  return '\n\n'.join(parts), starts


def _questions(e: dict, at: int, context: str, rng,
               ask_module: bool) -> list[tuple[str, str, str, int]]:
  """(id suffix, question, answer text, answer start) about entry `e`, which starts at `at`.
  The module question is asked once a context (its entries share the module)."""
  full = f"{e['module']}.{e['name']}"
  sig_at = at + len(full)
  params = e['params']
  out = [('module', f'Which module defines `{e["name"]}`?', e['module'], at)] * ask_module
  for name, name_at, default, default_at in params:
    if default is not None:
      out.append((f'default:{name}', f'What is the default value of `{name}` in `{full}`?',
                  default, sig_at + default_at))
  if params:
    out.append(('first', f'What is the first parameter of `{full}`?', params[0][0],
                sig_at + params[0][1]))
  for i in rng.permutation(len(params) - 1)[:2] if len(params) > 1 else []:
    (before, *_), (name, name_at, *_) = params[i], params[i + 1]
    out.append((f'after:{before}', f'Which parameter comes after `{before}` in `{full}`?', name,
                sig_at + name_at))
  sentence = _first_sentence(e['doc'])
  doc_at = sig_at + len(e['signature']) + 1
  verb = re.match(r'Returns? ', sentence)
  if verb:
    out.append(('returns', f'What does `{full}` return?', sentence[verb.end():],
                doc_at + verb.end()))
  elif sentence:
    out.append(('does', f'What does `{full}` do?', sentence, doc_at))
  if sentence and context.count(sentence) == 1:
    out.append(('which', f'Which entry of `{e["module"]}` is documented as "{sentence}"?',
                e['name'], at + len(e['module']) + 1))
  return out


def module_examples(module_names, seed: int, pages: int = 1) -> list[Example]:
  """Contexts of ENTRIES_PER_CONTEXT entries of one module (shuffled by the seed) and their
  questions, module by module; `pages` different shufflings of each module's entries.

  More pages put each entry among other neighbours and at other places: with one page a small
  model learns where the answers of the ~1,000 training contexts lie instead of how to find
  them (its held-out loss rises while the training loss falls)."""
  examples = []
  for m, module_name in enumerate(module_names):
    try:
      found = entries(module_name)
    except ImportError:  # a module this Python was built without (e.g. no _ssl, no _sqlite3)
      continue
    for page in range(pages):
      rng = np.random.default_rng([seed, m] + [page] * (page > 0))
      shuffled = [found[i] for i in rng.permutation(len(found))]
      suffix = f'#{page}' if page else ''
      for c in range(0, len(shuffled), ENTRIES_PER_CONTEXT):
        examples += _page_examples(module_name, shuffled[c:c + ENTRIES_PER_CONTEXT], rng, suffix)
  return examples


def _page_examples(module_name: str, group: list[dict], rng, suffix: str) -> list[Example]:
  context, starts = _context(group)
  out = []
  for k, (e, at) in enumerate(zip(group, starts)):
    for key, question, text, start in _questions(e, at, context, rng, k == 0):
      assert context[start:start + len(text)] == text, (module_name, e['name'], key)
      out.append(Example(f"{e['module']}.{e['name']}:{key}{suffix}", question, context,
                         (Answer(text, start),)))
  return out


def default_examples(seed: int = 0) -> tuple[list[Example], list[Example]]:
  """(train, eval): questions on TRAIN_MODULES and on the held-out EVAL_MODULES.

  Built in a fresh interpreter: what a module exposes can change once other libraries are
  imported (and patch or extend it), so in-process the data would depend on what ran before.
  """
  code = ('import dataclasses, json, sys; from train import qa_data; '
          f'print(json.dumps([[dataclasses.asdict(e) for e in part] '
          f'for part in qa_data.generate_examples({int(seed)})]))')
  root = pathlib.Path(__file__).resolve().parent.parent
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=root, env={**os.environ, 'PYTHONHASHSEED': '0'})
  parts = json.loads(out.stdout)
  return tuple([Example(**{**e, 'answers': tuple(Answer(**a) for a in e['answers'])})
                for e in part] for part in parts)


def generate_examples(seed: int) -> tuple[list[Example], list[Example]]:
  """`default_examples` in this process (see there why it runs in a fresh one)."""
  return (module_examples(TRAIN_MODULES, seed, TRAIN_PAGES),
          module_examples(EVAL_MODULES, seed))


# ---------------------------------------------------------------------------------------------
# Trivial baselines: what a model's F1 must beat

_WORD = re.compile(r"[\w.'\"-]+")


def baseline_first_words(examples: list[Example], n_words: int) -> dict[str, str]:
  """The context's first n_words words (n_words: the typical answer length)."""
  return {ex.id: ' '.join(_WORD.findall(ex.context)[:n_words]) for ex in examples}


def baseline_after_name(examples: list[Example]) -> dict[str, str]:
  """The word following the first occurrence, in the context, of the question's first
  `quoted` name (e.g. `timeout` -> the word after 'timeout')."""
  out = {}
  for ex in examples:
    name = re.search(r'`([^`]+)`', ex.question)
    at = ex.context.find(name.group(1)) if name else -1
    words = _WORD.findall(ex.context[at + len(name.group(1)):]) if at >= 0 else []
    out[ex.id] = words[0] if words else ''
  return out


def main() -> None:
  train, held_out = default_examples(0)
  lengths = [len(normalize_answer(ex.answers[0].text).split()) or 1 for ex in train]
  n = int(np.median(lengths))
  print(f'train: {len(train)} questions, {len({ex.context for ex in train})} contexts, '
        f'{len(TRAIN_MODULES)} modules')
  print(f'eval: {len(held_out)} questions, {len({ex.context for ex in held_out})} contexts, '
        f'modules {", ".join(EVAL_MODULES)}')
  kinds = {}
  for ex in held_out:
    kind = ex.id.split(':')[1]
    kinds[kind] = kinds.get(kind, 0) + 1
  print('eval questions by kind:', kinds)
  print(f'median answer length: {n} words; context length: median '
        f'{int(np.median([len(ex.context) for ex in held_out]))} characters')
  for name, preds in [(f'first {n} words of the context', baseline_first_words(held_out, n)),
                      ('the word after the quoted name', baseline_after_name(held_out))]:
    scores = squad_scores(preds, held_out)
    print(f'baseline {name}: EM {scores["exact_match"]:.1f} F1 {scores["f1"]:.1f}')


if __name__ == '__main__':
  main()
