"""`python -m train --task speech`: end to end on the synthesized corpus and on a `--data` folder,
exact resume after SIGKILL, and one `error:` line for a folder that does not read.

The runs are tiny (tiny preset, batch 8, a few steps, greedy decoding) and start together in
background threads; the bad-folder runs fail in `prepare`, before anything is compiled.
"""

from __future__ import annotations

import concurrent.futures
import pathlib
import signal
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import soundfile

from cli import (BASE, Background, assert_one_error_line, checkpoint_steps, max_logged_step,
                 read_metrics, restore_state, train, without_wallclock)
from train import speech_data as sd
from train import tasks  # noqa: F401  (first: it imports the task modules, which import it)
from train import generate as generate_cli
from train.config import RunConfig
from train.task_speech import SpeechTask, features, time_labels

STEPS = 4
OPTS = ['--task', 'speech', '--steps', STEPS, '--log-every', '2', '--eval-every', '4',
        '--checkpoint-every', '2', '--beam-size', '1', '--learning-rate', '3e-3', '--warmup', '2',
        *BASE]
RESUME_STEPS = 12
RESUME_OPTS = ['--task', 'speech', '--steps', RESUME_STEPS, '--log-every', '2', '--eval-every',
               '12', '--checkpoint-every', '4', '--beam-size', '1', *BASE]
TEXTS = ['one two three', 'the red box', 'seven', 'a small dog', 'nine hundred', 'by the river',
         'the baker', 'forty two', 'last night', 'the green lamp', 'on sunday', 'eighty six']


def _folder(root: pathlib.Path) -> pathlib.Path:
  """12 short synthesized utterances as .wav files (22,050 Hz: load_audio resamples) + TSV."""
  root.mkdir(parents=True)
  lines = []
  for i, text in enumerate(TEXTS):
    audio = sd.resample(sd.synthesize(text, 'en-us'), sd.SAMPLE_RATE, 22_050)
    soundfile.write(root / f'u{i}.wav', audio, 22_050)
    lines.append(f'u{i}.wav\t{text.capitalize()}.')
  (root / sd.TRANSCRIPTS).write_text('\n'.join(lines) + '\n')
  return root


def _bad_folders(root: pathlib.Path) -> dict[str, pathlib.Path]:
  undecodable = _folder(root / 'undecodable')
  (undecodable / 'u3.wav').write_bytes(b'this is not audio at all' * 20)
  missing = _folder(root / 'missing')
  tsv = missing / sd.TRANSCRIPTS
  lines = tsv.read_text().splitlines()
  lines[4] = 'nowhere.wav\tsomething said'
  tsv.write_text('\n'.join(lines) + '\n')
  return {'undecodable': undecodable, 'missing': missing}


def _resume(root: pathlib.Path) -> dict:
  """A uninterrupted; B killed with SIGKILL mid-training (after its step-4 checkpoint), rerun."""
  a = Background([*RESUME_OPTS, '--workdir', root / 'A'], root / 'logs', 'A')
  b_dir = root / 'B'
  b = Background([*RESUME_OPTS, '--workdir', b_dir], root / 'logs', 'B1')
  caught = b.wait_for(lambda: max_logged_step(b_dir) >= 6 and 4 in checkpoint_steps(b_dir))
  b.signal(signal.SIGKILL)
  killed = b.wait()
  rerun = train([*RESUME_OPTS, '--workdir', b_dir])
  return dict(a_rc=a.wait(), a_dir=root / 'A', b_dir=b_dir, caught=caught, killed=killed,
              rerun=rerun, a_err=a.stderr)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('speech')
  folder = _folder(root / 'data')
  bad = _bad_folders(root)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    jobs = {'default': pool.submit(train, [*OPTS, '--workdir', root / 'default']),
            'folder': pool.submit(train, [*OPTS, '--data', folder, '--workdir', root / 'folder'])}
    for name, path in bad.items():  # the workdir is not the data folder: that would be refused
      jobs[name] = pool.submit(train, [*OPTS, '--data', path, '--workdir', root / f'{name}_run'])
    out = {name: job.result() for name, job in jobs.items()}
  out['root'] = root
  return out


def _ok(result):
  assert result.returncode == 0, f'{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}'
  return result.stdout


@pytest.mark.parametrize('name', ['default', 'folder'])
def test_run_writes_wer_cer_examples_and_attention(runs, name):
  stdout = _ok(runs[name])
  workdir = runs['root'] / name
  assert f'final evaluation after {STEPS} steps' in stdout and 'examples (held-out):' in stdout
  assert ' expected ' in stdout or ' ok' in stdout
  evals = [r for r in read_metrics(workdir) if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [4]
  for r in evals:
    assert {'loss', 'accuracy', 'wer', 'cer'} <= set(r), r
    assert r['wer'] >= 0 and r['cer'] >= 0 and np.isfinite(r['loss'])
  png = workdir / 'attention.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert checkpoint_steps(workdir) == [2, 4]


def test_default_run_caches_synthesized_audio_in_workdir(runs):
  assert list((runs['root'] / 'default' / 'audio_cache').glob('*.npy'))


@pytest.fixture(scope='module')
def resume(runs):  # after the other runs: the machine has two cores
  return _resume(runs['root'] / 'resume')


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(resume):
  r = resume
  assert r['a_rc'] == 0, r['a_err'][-3000:]
  assert r['caught'] and r['killed'] == -signal.SIGKILL
  stdout = _ok(r['rerun'])
  assert 'resuming from step' in stdout
  a = restore_state(r['a_dir'], RESUME_STEPS)
  b = restore_state(r['b_dir'], RESUME_STEPS)
  for (path, x), (_, y) in zip(jax.tree.flatten_with_path(a)[0], jax.tree.flatten_with_path(b)[0]):
    assert np.array_equal(np.asarray(x), np.asarray(y)), f'{jax.tree_util.keystr(path)} differs'
  assert without_wallclock(read_metrics(r['b_dir'])) == without_wallclock(read_metrics(r['a_dir']))


def test_undecodable_audio_is_one_error_line_naming_file_and_line(runs):
  tsv = runs['root'] / 'undecodable' / sd.TRANSCRIPTS
  assert_one_error_line(runs['undecodable'], 'u3.wav', 'line 4', str(tsv))


def test_missing_audio_file_is_one_error_line_naming_file_and_line(runs):
  assert_one_error_line(runs['missing'], 'nowhere.wav', 'line 5')


# --- python -m train.generate --audio FILE ----------------------------------------------------

def call_generate(capsys, *args):
  """`train.generate.main(args)` in this process, as a CompletedProcess-like result."""
  rc = generate_cli.main([str(a) for a in args])
  out = capsys.readouterr()
  return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


def test_generate_transcribes_as_the_evaluation_does(runs, capsys):
  """The printed transcript is SpeechTask.transcribe's on the default corpus' features (640
  frames, 80 bytes, the run's one beam) of the same file, with the checkpoint's params."""
  _ok(runs['default'])
  workdir = runs['root'] / 'default'
  wav = runs['root'] / 'data' / 'u0.wav'  # 22,050 Hz: resampled as training resamples
  result = call_generate(capsys, '--workdir', workdir, '--audio', wav)
  assert result.returncode == 0, result.stderr
  gen = generate_cli.load(str(workdir))
  task = SpeechTask(RunConfig(task='speech'))
  mel, valid = features(sd.load_audio(wav), task.frames)
  expected = task.transcribe(gen.model, gen.params, [{'src': mel, 'src_valid': valid}], 1)
  assert result.stdout.splitlines() == [f'{wav} -> {expected[0]}']


def test_generate_audio_errors_are_one_line(runs, capsys):
  workdir, root = runs['root'] / 'default', runs['root']
  missing = root / 'data' / 'nowhere.wav'
  assert_one_error_line(call_generate(capsys, '--workdir', workdir, '--audio', missing),
                        f'--audio {missing}: no such file')
  garbage = root / 'undecodable' / 'u3.wav'
  assert_one_error_line(call_generate(capsys, '--workdir', workdir, '--audio', garbage),
                        f'--audio {garbage}', 'does not decode as audio')
  assert_one_error_line(call_generate(capsys, '--workdir', workdir, '--input', 'x'),
                        'speech run', '--audio FILE', 'not --input')


# --- pieces, no training --------------------------------------------------------------------

def test_features_pad_with_invalid_frames_and_cut_long_audio():
  audio = np.random.default_rng(0).uniform(-0.5, 0.5, 16_000).astype(np.float32)  # 1 s
  mel, valid = features(audio, 150)
  assert mel.shape == (150, 80) and mel.dtype == np.float32
  assert valid.sum() == 100 and valid[:100].all()
  mel_cut, valid_cut = features(audio, 50)
  assert mel_cut.shape == (50, 80) and valid_cut.all()


def test_time_labels_sit_on_the_ticks_viz_draws():
  labels = time_labels(125, 0.04)  # 5 s of 40 ms encoder frames: viz shows every 2nd label
  shown = labels[::2]
  assert shown[0] == '0.0s' and '0.4s' in shown and '4.8s' in shown
  assert all(label == '' for label in labels[1::2])
  assert time_labels(10, 0.04)[5] == '0.2s'


def test_kept_training_features_compute_what_the_example_computes(tmp_path):
  """The default corpus' training features are computed once and kept: a later reading is the
  same valid frames and targets, and the model encodes it exactly as the freshly made example
  (whose padding frames hold log-mel of silence, where the kept ones hold zeros)."""
  from flaxformer_lite import SpeechTransformer
  task = SpeechTask(RunConfig(task='speech', workdir=str(tmp_path)))
  task.n_train = 4
  task.prepare()
  fresh = [task.example(*task._train[i]) for i in range(2)]
  kept = [task._kept_example(i) for i in range(2)]
  assert set(task._kept) == {0, 1}
  again = task._kept_example(1)
  assert all(np.array_equal(again[k], kept[1][k]) for k in again)
  for f, k in zip(fresh, kept):
    n = int(f['src_valid'].sum())
    assert 0 < n < task.frames
    np.testing.assert_array_equal(k['src'][:n], f['src'][:n])
    assert not k['src'][n:].any() and f['src'][n:].any()
    for key in ('src_valid', 'tgt_in', 'tgt_out', 'tgt_valid'):
      np.testing.assert_array_equal(k[key], f[key])
  model = SpeechTransformer(task.config('tiny'))
  batch = lambda es, key: np.stack([e[key] for e in es])
  variables = model.init(jax.random.key(0), batch(fresh, 'src'), batch(fresh, 'tgt_in'))
  encode = lambda es: model.apply(variables, batch(es, 'src'), src_valid=batch(es, 'src_valid'),
                                  method='encode')
  np.testing.assert_array_equal(np.asarray(encode(kept)), np.asarray(encode(fresh)))
