"""benchmarks/convert.py runs: every architecture's parity figure and both loaders' records."""

import json

import pytest


def test_quick_run_records_parity_and_loading(tmp_path):
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  from benchmarks import convert, hf_tiny
  convert.main(['--quick', '--repeats', '1', '--out', str(tmp_path)])
  record = json.loads(next(tmp_path.glob('convert-*.json')).read_text())
  assert set(record['parity_max_abs_diff']) == set(hf_tiny.KINDS)
  assert max(record['parity_max_abs_diff'].values()) <= 1e-5
  for who in ('ours', 'transformers'):  # both loaded the checkpoint, each in its own process
    memory = record['loading'][who]  # its time is the benchmark's figure, not asserted here
    assert memory['peak_mb'] >= memory['before_mb'] > 0
    assert memory['added_peak_mb'] == memory['peak_mb'] - memory['before_mb']
  assert record['loading']['n_params'] > 0
