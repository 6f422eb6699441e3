"""Two JAX processes x 4 CPU devices train exactly as one process x 8 devices."""

import os
import re
import signal
import socket
import time

import jax
import numpy as np
import pytest

from mtnt_tpu import commands
from mtnt_tpu import metrics
from tests import helpers

pytestmark = pytest.mark.slow  # runs main in subprocesses

STEPS = 12
FLAGS = (f'--config.train.num_steps={STEPS}', '--config.train.log_every=1',
         '--config.train.eval_every=6', '--config.train.checkpoint_every=6',
         '--config.data.num_shards=2', '--config.eval.decode_examples=0')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _params(workdir):
  path = os.path.join(workdir, 'checkpoints', str(STEPS), 'state')
  return helpers.restore_numpy(path)['params']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('mp')
  one = root / 'one'
  r = helpers.run_main(one, *FLAGS)
  assert r.returncode == 0, r.stderr[-3000:]
  two = root / 'two'
  port = _free_port()
  procs = [commands.popen(commands.tiny_main(
      two, *FLAGS, '--config.runtime.cpu_devices=4', f'--coordinator_address=127.0.0.1:{port}',
      '--num_processes=2', f'--process_id={i}', '--distributed_timeout=60')) for i in range(2)]
  errs = [p.communicate(timeout=600)[1] for p in procs]
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
  return one, two, errs


def test_two_processes_match_one(runs):
  one, two, errs = runs
  assert 'process 1 of 2' in errs[1] and '4 local / 8 global devices' in errs[1]
  a, b = metrics.read(one), metrics.read(two)
  assert [r['step'] for r in a] == [r['step'] for r in b]
  for ra, rb in zip(a, b):
    for key in ('loss', 'eval_loss'):
      if key in ra:
        assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra['step'], key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               _params(one), _params(two))


def test_only_process_zero_writes_metrics(runs):
  one, two, errs = runs
  assert 'metrics.py' not in errs[1]  # process 1 logs no metric lines
  # One row per logged step, as one process writes: a second writer doubles them.
  steps = [r['step'] for r in metrics.read(two)]
  assert steps == [r['step'] for r in metrics.read(one)]
  assert len(steps) > STEPS and sorted(steps) == steps


def test_unreachable_coordinator_is_a_bounded_one_line_error(tmp_path):
  r = helpers.run_main(tmp_path / 'wd', f'--coordinator_address=127.0.0.1:{_free_port()}',
                       '--num_processes=2', '--process_id=1', '--distributed_timeout=5',
                       timeout=120)
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: the coordinator 127.0.0.1:')
  assert 'did not answer within 5s' in last
  assert not (tmp_path / 'wd').exists()


def test_sigterm_to_one_process_saves_one_agreed_step_on_both(tmp_path):
  """A spot VM's SIGTERM reaches the hosts at different times, or only one:
  JAX's preemption sync point makes every process save the same step and exit 0."""
  wd = tmp_path / 'wd'
  port = _free_port()
  long_run = ('--config.train.num_steps=100000', '--config.train.log_every=1',
              '--config.train.eval_every=100000', '--config.train.checkpoint_every=100000',
              '--config.data.num_shards=2', '--config.eval.decode_examples=0',
              '--config.train.eval_at_start=False')
  procs = [commands.popen(commands.tiny_main(
      wd, *long_run, '--config.runtime.cpu_devices=4', f'--coordinator_address=127.0.0.1:{port}',
      '--num_processes=2', f'--process_id={i}', '--distributed_timeout=60')) for i in range(2)]
  try:
    deadline = time.monotonic() + 300
    jsonl = wd / 'metrics.jsonl'
    while not jsonl.exists() or jsonl.read_text().count('\n') < 3:
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # process 0 is never signalled
    errs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
  saved = [int(m) for err in errs for m in re.findall(r'preempted: saved step (\d+)', err)]
  assert len(saved) == 2 and saved[0] == saved[1], errs[0][-2000:]
  assert os.listdir(wd / 'checkpoints') == [str(saved[0])]
  assert metrics.read(wd)[-1]['step'] <= saved[0] < 100000
