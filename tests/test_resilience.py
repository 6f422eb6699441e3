"""Preemption and hard kills: a resumed run is the uninterrupted run, exactly."""

import os
import random
import shutil
import signal
import time

import numpy as np
import pytest

from mtnt_tpu import commands
from mtnt_tpu import metrics
from tests import helpers

pytestmark = pytest.mark.slow  # runs main in subprocesses

STEPS = 30
FLAGS = (f'--config.train.num_steps={STEPS}', '--config.train.log_every=1',
         '--config.train.eval_every=1000', '--config.train.checkpoint_every=10',
         '--config.eval.decode_examples=0')


def _losses(workdir) -> dict[int, float]:
  # A replayed step keeps its last value.
  return {row['step']: row['loss'] for row in metrics.read(workdir) if 'loss' in row}


def _final_params(workdir):
  path = os.path.join(workdir, 'checkpoints', str(STEPS), 'state')
  return helpers.restore_numpy(path)['params']


def _popen(workdir):
  return commands.popen(commands.tiny_main(workdir, *FLAGS))


def _wait_for_step(workdir, step, proc, timeout=300):
  deadline = time.time() + timeout
  path = os.path.join(workdir, 'metrics.jsonl')
  while time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    if os.path.exists(path) and max(_losses(workdir), default=0) >= step:
      return
    time.sleep(0.05)
  raise TimeoutError(f'step {step} not reached')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('straight') / 'wd'
  r = helpers.run_main(workdir, *FLAGS)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def _assert_same_run(a, b):
  la, lb = _losses(a), _losses(b)
  assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
  assert la == lb, 'every per-step loss identical'
  pa, pb = _final_params(a), _final_params(b)
  import jax
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path, uninterrupted):
  workdir = tmp_path / 'wd'
  proc = _popen(workdir)
  # Seeded, so a failure names a step that reproduces it (MTNT_TEST_SEED picks others).
  seed = int(os.environ.get('MTNT_TEST_SEED', '0'))
  at = random.Random(seed).randint(3, STEPS - 8)
  _wait_for_step(workdir, at, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, f'SIGTERM at step {at} (MTNT_TEST_SEED={seed}): {err[-3000:]}'
  assert 'preempted: saved step' in err
  saved = max(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert at <= saved < STEPS
  r = helpers.run_main(workdir, *FLAGS)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'step {saved}' in r.stderr
  _assert_same_run(workdir, uninterrupted)


def test_sigkill_then_half_written_checkpoint_is_never_loaded(tmp_path, uninterrupted):
  workdir = tmp_path / 'wd'
  proc = _popen(workdir)
  _wait_for_step(workdir, 12, proc)
  deadline = time.time() + 120
  while not (workdir / 'checkpoints' / '10').exists() and time.time() < deadline:
    time.sleep(0.05)  # orbax renames step 10's dir into place once it is complete
  proc.kill()
  proc.communicate()
  ckpt_dir = workdir / 'checkpoints'
  complete = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  # What a kill in the middle of saving step 20 leaves: orbax's temporary dir.
  partial = ckpt_dir / f'{complete + 10}.orbax-checkpoint-tmp'
  shutil.copytree(ckpt_dir / str(complete), partial)
  shutil.rmtree(partial / 'state' / 'd', ignore_errors=True)
  r = helpers.run_main(workdir, *FLAGS)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'resuming from {ckpt_dir} step {complete}' in r.stderr
  _assert_same_run(workdir, uninterrupted)
