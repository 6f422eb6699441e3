"""Reliability: no NaN ever saved, no wrong figure ever logged, every bad input
one line, a damaged checkpoint survived, a SIGTERM saves before anything else.

Most checks run in this process (a run here compiles once into a shared
compilation cache); the command-line ones reuse the session's trained workdir.
"""

import json
import os
import re
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtnt_tpu import checkpoint as checkpoint_lib
from mtnt_tpu import checks
from mtnt_tpu import evaluate as evaluate_lib
from mtnt_tpu import export as export_lib
from mtnt_tpu import flops
from mtnt_tpu import metrics as metrics_lib
from mtnt_tpu import train
from mtnt_tpu import workdir as workdir_lib
from tests import helpers
from tests import trained_run


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


def _short(cache, **overrides):
  return helpers.tiny_config(**{
      'train.num_steps': 8, 'train.log_every': 2, 'train.eval_every': 4,
      'train.checkpoint_every': 100, 'train.eval_at_start': False,
      'eval.decode_examples': 0, 'runtime.compilation_cache': cache, **overrides})


# --- bad input: one line, before anything is compiled or written ------------

@pytest.mark.parametrize('override,message', [
    ({'train.num_steps': 0}, 'config.train.num_steps=0 must be >= 1'),
    ({'train.num_steps': -5}, 'config.train.num_steps=-5 must be >= 1'),
    ({'optim.learning_rate': -1.0}, 'config.optim.learning_rate=-1.0 must be >= 0'),
    ({'data.max_len': 1}, 'config.data.max_len=1 leaves no room for a translation'),
    ({'data.max_len': 0}, 'config.data.max_len=0 leaves no room'),
    ({'train.eval_every': 0}, 'config.train.eval_every=0 must be >= 1'),
    ({'train.checkpoint_every': 0}, 'config.train.checkpoint_every=0 must be >= 1'),
    ({'train.log_every': 0}, 'config.train.log_every=0 must be >= 1'),
    ({'optim.grad_accum_steps': 0}, 'config.optim.grad_accum_steps=0 must be >= 1'),
])
def test_bad_numbers_are_one_line_before_any_compile(override, message):
  with pytest.raises(checks.ConfigError, match=re.escape(message)):
    train.build(helpers.tiny_config(**override))


def test_read_only_workdir_is_one_line_at_start_up():
  # /proc/self exists and refuses new files even to root, like a read-only mount.
  with pytest.raises(checks.ConfigError, match=r'^cannot use workdir /proc/self .*choose a '
                     '--workdir you can write$'):
    workdir_lib.prepare('/proc/self', helpers.tiny_config())


def test_clip_norm_does_not_shape_the_optimizer_state():
  trees = [jax.tree.structure(train.build(helpers.tiny_config(
      **{'optim.clip_norm': v})).abstract_state) for v in (0.0, 1.0)]
  assert trees[0] == trees[1]


# --- logged speed: wall time, from the first interval ----------------------

def test_step_log_times_compute_not_dispatch(tmp_path):
  """Each fake step sleeps 50 ms on the device side; dispatch returns at once."""
  step_s, tokens = 0.05, 100.0

  def sleep(x):
    time.sleep(step_s)
    return x

  @jax.jit
  def fake_step(x):
    y = jax.pure_callback(sleep, jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1.0
    return y, {'loss': y, 'accuracy': y * 0, 'grad_norm': y, 'real_tokens': y * 0 + tokens}

  # Peak set so that one step per 50 ms is exactly MFU 1.
  log = metrics_lib.StepLog(metrics_lib.Writer(str(tmp_path), enabled=True),
                            tokens_per_step=int(tokens), schedule=lambda s: 0.0,
                            budget=flops.Budget(per_token=1.0, peak=tokens / step_s))
  x = jnp.zeros(())
  fake_step(x)[0].block_until_ready()  # compiled before the clock starts
  t0 = time.perf_counter()
  records = []
  with log.paused():
    pass
  for n in range(1, 13):
    t_in = time.perf_counter()
    time.sleep(0.005)  # the input pipeline
    x, m = fake_step(x)
    log.add(m, time.perf_counter() - t_in)
    if n % 4 == 0:
      records.append(log.close(n))
    if n == 6:
      with log.paused():
        time.sleep(0.3)  # an eval or a save: charged to no interval
  wall = time.perf_counter() - t0
  for r in records:
    assert r['step_time'] >= step_s * 0.98, r
    assert r['mfu'] <= 1.0 + 1e-9 and r['input_wait_frac'] <= 1.0, r
  assert sum(r['step_time'] * 4 for r in records) <= wall - 0.3



def test_metrics_on_an_object_store_are_rewritten_at_most_once_a_minute(tmp_path):
  """gs:// cannot append: the file is rewritten whole, so not at every record."""
  now = [0.0]
  path = tmp_path / 'metrics.jsonl'
  writes = []

  class Path(type(path)):
    def write_text(self, text, **kw):
      writes.append(text.count('\n'))
      return super().write_text(text, **kw)

  jsonl = metrics_lib._JsonLines(Path(path), appendable=False, clock=lambda: now[0])
  for i in range(300):  # five minutes of records, one a second
    jsonl.append(json.dumps({'step': i}))
    now[0] += 1.0
  assert writes == [1, 61, 121, 181, 241]
  jsonl.close()
  assert writes[-1] == 300
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == list(range(300))
  # A rerun on the same file keeps what was there.
  again = metrics_lib._JsonLines(Path(path), appendable=False, clock=lambda: now[0])
  again.append(json.dumps({'step': 300}))
  assert len(path.read_text().splitlines()) == 301

# --- a run in this process: SIGTERM in an eval, relative workdir, resume ----

@pytest.mark.slow
def test_sigterm_during_eval_saves_first_then_resumes(tmp_path, monkeypatch, cache):
  monkeypatch.chdir(tmp_path)
  real_eval = evaluate_lib.Evaluator.__call__
  started = []

  def eval_then_sigterm(self, params, step):
    started.append(step)
    os.kill(os.getpid(), signal.SIGTERM)  # what a spot VM gets, mid-eval
    return real_eval(self, params, step)

  monkeypatch.setattr(evaluate_lib.Evaluator, '__call__', eval_then_sigterm)
  train.train_and_evaluate(_short(cache), 'rel')  # a relative --workdir
  wd = tmp_path / 'rel'
  assert started == [4]
  assert sorted(os.listdir(wd / 'checkpoints')) == ['4']
  rows = _rows(wd)
  assert not [r for r in rows if 'eval_loss' in r], 'the eval was dropped, not finished'
  assert max(r['step'] for r in rows) == 4

  monkeypatch.setattr(evaluate_lib.Evaluator, '__call__', real_eval)
  train.train_and_evaluate(_short(cache), 'rel')
  rows = _rows(wd)
  assert [r['step'] for r in rows if 'eval_loss' in r] == [8]
  assert [r['step'] for r in rows if 'loss' in r] == [2, 4, 6, 8]
  for r in rows:
    if 'step_time' in r:
      assert 0 < r['mfu'] <= 1 and 0 <= r['input_wait_frac'] <= 1, r
      assert 0 < r['nonpad_fraction'] <= 1, r


@pytest.mark.slow
def test_nan_state_is_never_saved_and_the_message_says_where_a_rerun_resumes(tmp_path, cache):
  config = _short(cache, **{
      'optim.learning_rate': 3e3, 'optim.clip_norm': 0.0, 'train.num_steps': 30,
      'train.log_every': 7, 'train.checkpoint_every': 5, 'train.eval_every': 100})
  wd = tmp_path / 'wd'
  with pytest.raises(checkpoint_lib.NonFinite) as e:
    train.train_and_evaluate(config, str(wd))
  steps = sorted(int(p) for p in os.listdir(wd / 'checkpoints') if p.isdigit())
  message = str(e.value)
  if steps:
    assert f'a rerun resumes from step {steps[-1]},' in message, message
  else:
    assert 'a rerun starts from the beginning' in message, message
  for step in steps:
    params = helpers.restore_numpy(str(wd / 'checkpoints' / str(step) / 'state'))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step


# --- damaged checkpoints and a lost config.json, on the trained workdir -----

def _copy(tmp_path_factory, dest):
  src = trained_run.workdir(tmp_path_factory)
  shutil.copytree(src, dest, ignore=shutil.ignore_patterns('jax_cache', 'tensorboard'))
  return dest


def _damage(step_dir, kind):
  state = step_dir / 'state'
  if kind == 'truncated array file':
    files = [p for p in state.rglob('*') if p.is_file() and p.parent.name == 'd']
    biggest = max(files, key=lambda p: p.stat().st_size)
    with open(biggest, 'r+b') as f:
      f.truncate(biggest.stat().st_size // 2)
  elif kind == 'deleted _METADATA':
    (state / '_METADATA').unlink()
  else:
    shutil.rmtree(state)


@pytest.mark.parametrize('kind', ['truncated array file', 'deleted _METADATA',
                                  'deleted state/'])
@pytest.mark.slow
def test_damaged_latest_checkpoint_is_named_moved_aside_and_skipped(
    kind, tmp_path, tmp_path_factory, caplog):
  wd = _copy(tmp_path_factory, tmp_path / 'wd')
  _damage(wd / 'checkpoints' / '100', kind)
  config = workdir_lib.load_config(str(wd))
  # translate and export name the damaged step and stop. They read only the
  # params, so a truncated optimizer-state file does not concern them.
  if kind != 'truncated array file':
    with pytest.raises(workdir_lib.WorkdirError,
                       match=r'^checkpoint step 100 at .*/checkpoints/100 is damaged \(.*\); '
                       r'pass --step with an intact one \(others: 50'):
      workdir_lib.restore(str(wd), config, step=100)
  # The trainer names it in one line, moves it aside and resumes from step 50.
  ckpts = checkpoint_lib.Checkpoints(str(wd), 3)
  try:
    state, _ = train._initial_state(train.build(config), ckpts)
  finally:
    ckpts.close()
  assert int(jax.device_get(state.step)) == 50
  assert (wd / 'damaged' / '100').is_dir() and not (wd / 'checkpoints' / '100').exists()
  named = [r.getMessage() for r in caplog.records if ' is damaged (' in r.getMessage()]
  assert len(named) == 1 and 'checkpoint step 100' in named[0], named
  assert '\n' not in named[0]


@pytest.mark.slow
def test_damaged_best_is_named_by_export_and_relative_workdirs_work(
    tmp_path, tmp_path_factory, monkeypatch):
  wd = _copy(tmp_path_factory, tmp_path / 'wd')
  monkeypatch.chdir(tmp_path)
  path = export_lib.export('wd', 'out')  # a relative --workdir and --out
  assert os.path.isdir(path)
  best = next(p for p in (wd / 'best').iterdir() if p.name.isdigit())
  _damage(best, 'deleted _METADATA')
  with pytest.raises(workdir_lib.WorkdirError, match=rf'^checkpoint step {best.name} at '
                     r'.*/best/\d+ is damaged \(state/_METADATA is missing\)'):
    export_lib.export('wd', 'out2')
  assert not (tmp_path / 'out2').exists()


@pytest.mark.slow
def test_lost_config_json_is_not_replaced_by_a_run_that_fails(tmp_path, tmp_path_factory):
  wd = _copy(tmp_path_factory, tmp_path / 'wd')
  (wd / 'config.json').unlink()
  wrong = helpers.tiny_config(**{'lora.rank': 4})
  with pytest.raises(checks.ConfigError, match=r'checkpoint step 100 in .* was trained '
                     r'with another config'):
    train.train_and_evaluate(wrong, str(wd))
  assert not (wd / 'config.json').exists()
  right = helpers.tiny_config()
  workdir_lib.prepare(str(wd), right)
  assert not (wd / 'config.json').exists()  # not before a checkpoint restored with it
  ckpts = checkpoint_lib.Checkpoints(str(wd), 3)
  try:
    train._initial_state(train.build(right), ckpts)
  finally:
    ckpts.close()
  workdir_lib.record_config(str(wd), right)
  assert workdir_lib.load_config(str(wd)).model.variant == 'tiny'


# --- translate: relative workdir, output replaced only on success -----------

@pytest.mark.slow
def test_translate_keeps_output_until_done_and_names_a_bad_line(tmp_path, tmp_path_factory):
  wd = trained_run.workdir(tmp_path_factory)
  out = tmp_path / 'hyp.txt'
  out.write_text('what the user had\n')
  rel = os.path.relpath(wd, helpers.ROOT)
  r = trained_run.run_module('translate', '--workdir', rel, '--output', str(out),
                             stdin_bytes=b'Hello.\nA dog.\n\xe9t\xe9\n')
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1] == (
      'error: stdin line 3 is not UTF-8 (invalid continuation byte at byte 0 of the line); '
      'convert the file, e.g. iconv -f latin1 -t utf-8')
  assert out.read_text() == 'what the user had\n'
  r = trained_run.run_module('translate', '--workdir', rel, '--output', str(out),
                             stdin='Hello.\nA dog runs.\n')
  assert r.returncode == 0, r.stderr[-3000:]
  assert len(out.read_text().splitlines()) == 2
  assert not list(tmp_path.glob('hyp.txt.partial-*'))
