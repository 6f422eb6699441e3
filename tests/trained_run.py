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
import subprocess

from mtnt_tpu import commands
from tests import helpers

OVERRIDES = {'train.num_steps': 100, 'train.eval_every': 50, 'train.checkpoint_every': 50,
             'train.log_every': 10, 'eval.num_logged_examples': 16}
FLAGS = tuple(f'--config.{k}={v}' for k, v in OVERRIDES.items())


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
  if stdin_bytes is None:
    return commands.run(commands.command(module, *args), input=stdin, timeout=timeout)
  # Raw bytes (e.g. invalid UTF-8) cannot go through a text-mode pipe.
  r = subprocess.run(commands.command(module, *args), cwd=commands.ROOT, env=commands.env(),
                     input=stdin_bytes, capture_output=True, timeout=timeout)
  r.stdout, r.stderr = r.stdout.decode(errors='replace'), r.stderr.decode(errors='replace')
  return r
