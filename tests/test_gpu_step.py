"""benchmarks/gpu_step.py runs end to end (on the CPU, tiny model) and reports sane figures."""

import json
import os
import subprocess
import sys

import pytest

from tests import helpers


@pytest.mark.slow
def test_gpu_step_script_on_a_tiny_model(tmp_path):
  out = tmp_path / 'gpu_step.json'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'} | {'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run(
      [sys.executable, 'benchmarks/gpu_step.py', '--variant', 'tiny', '--vocab', '512',
       '--shapes', '2x32', '--loss_chunk', '0,16', '--steps', '3', '--warmup', '1',
       '--json', str(out)],
      cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| batch x length (tokens) | loss_chunk |' in proc.stdout
  report = json.loads(out.read_text())
  rows = report['results']
  assert [(r['batch'], r['length'], r['loss_chunk']) for r in rows] == [(2, 32, 0), (2, 32, 16)]
  for r in rows:
    assert r['fits'] and r['step_s'] > 0 and r['compile_s'] > 0, r
    assert abs(r['tokens_per_s'] * r['step_s'] - r['batch'] * r['length']) < 1e-6 * r['tokens_per_s']
    assert 0 < r['mfu'] < 5 and 0 < r['peak_gib'] < 4, r
    assert 0.5 < r['wall_vs_sum'] < 2, r
  # Same weights and batch: the chunked loss starts where the plain one does.
  plain, chunked = rows
  assert abs(plain['first_loss'] - chunked['first_loss']) < 1e-3 * plain['first_loss']
