"""One short tiny-config training run, shared by the decode, translate and export tests.

Trained once per test session through `python -m mtnt_tpu.main`, as a user
runs it; pytest-xdist workers of one session share it through a file lock.
100 steps make a model that writes French-looking sentences of varied length
(BLEU well above 0), which is all these tests need; tests/test_train.py and
the README figures cover how far training goes.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import sys
import subprocess

from tests import helpers

FLAGS = ('--config.train.num_steps=100', '--config.train.eval_every=50',
         '--config.train.checkpoint_every=50', '--config.train.log_every=10',
         '--config.eval.num_logged_examples=16')


def workdir(tmp_path_factory) -> pathlib.Path:
  """The trained workdir (best/, checkpoints/50 and 100, samples/, metrics.jsonl)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # this session's workers share the parent of their basetemps
  wd = root / 'tiny_trained'
  with open(root / 'tiny_trained.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (wd / 'TRAINED').exists():
      r = helpers.run_main(wd, *FLAGS)
      assert r.returncode == 0, r.stderr[-3000:]
      (wd / 'TRAINED').write_text('')
  return wd


def run_module(module: str, *args: str, stdin: str | None = None,
               stdin_bytes: bytes | None = None, timeout: int = 300
               ) -> subprocess.CompletedProcess:
  """`python -m mtnt_tpu.<module> ARGS` as a user runs it (devices from the workdir's config)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  r = subprocess.run([sys.executable, '-m', f'mtnt_tpu.{module}', *args], cwd=helpers.ROOT,
                     input=stdin.encode() if stdin is not None else stdin_bytes,
                     capture_output=True, timeout=timeout, env=env)
  r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
  return r
