"""The trainer as a user runs it: `python -m mtnt_tpu.main` on the tiny config."""

import json
import os

import jax
import numpy as np
import pytest

from mtnt_tpu import metrics
from mtnt_tpu import train
from tests import helpers


def _metrics(workdir):
  return metrics.read(workdir)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run') / 'wd'
  r = helpers.run_main(workdir, '--config.train.num_steps=60', '--config.train.eval_every=30',
                       '--config.train.checkpoint_every=20', '--config.train.keep_checkpoints=2',
                       '--config.train.log_every=10')
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir, r


@pytest.mark.slow
def test_tiny_run_learns_and_checkpoints(trained):
  workdir, _ = trained
  rows = _metrics(workdir)
  evals = [r for r in rows if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [0, 30, 60]
  assert evals[-1]['eval_loss'] < 0.75 * evals[0]['eval_loss']
  logged = [r for r in rows if 'loss' in r]
  assert logged[-1]['loss'] < logged[0]['loss']
  for key in ('step', 'loss', 'learning_rate', 'tokens_per_sec', 'accuracy'):
    assert key in logged[-1]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['40', '60']  # 20 pruned: keep 2
  assert os.listdir(workdir / 'tensorboard')
  with open(workdir / 'config.json') as f:
    assert json.load(f)['model']['variant'] == 'tiny'


@pytest.mark.slow
def test_rerun_resumes_from_latest_step(trained):
  workdir, _ = trained
  r = helpers.run_main(workdir, '--config.train.num_steps=80', '--config.train.eval_every=1000',
                       '--config.train.checkpoint_every=1000', '--config.train.log_every=10')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resuming from' in r.stderr and 'step 60' in r.stderr
  steps = [row['step'] for row in _metrics(workdir) if 'loss' in row]
  assert steps == [10, 20, 30, 40, 50, 60, 70, 80]
  assert '80' in os.listdir(workdir / 'checkpoints')


@pytest.mark.parametrize('override,message', [
    ({'model.variant': 'gemma_3b'}, "config.model.variant='gemma_3b' is not a known variant"),
    ({'train.batch_size': 12}, 'config.train.batch_size=12 must be a multiple of 8'),
    ({'mesh.data': 3}, 'config.mesh'),
    ({'tokenizer.path': '/nonexistent/tokenizer.model'}, 'config.tokenizer.path'),
    ({'model.checkpoint': '/nonexistent/2b'}, 'config.model.checkpoint'),
    ({'data.dir': '/nonexistent'}, 'no train.array_record in config.data.dir'),
    ({'model.variant': 'gemma_2b'}, "set it to 'random'"),
    ({'data.noise_rates.typo': 1.5}, r'config.data.noise_rates.typo=1.5: a probability'),
    ({'data.noise_rates.typos': 0.2}, 'config.data.noise_rates.typos: not a kind of noise'),
])
def test_bad_config_is_one_clear_error(override, message):
  with pytest.raises(train.ConfigError, match=message):
    train.build(helpers.tiny_config(**override))


@pytest.mark.slow
def test_bad_input_stops_before_touching_the_workdir(tmp_path, trained):
  workdir, _ = trained
  before = sorted(os.listdir(workdir / 'checkpoints'))
  r = helpers.run_main(workdir, '--config.model.variant=gemma_3b')
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1].startswith("error: config.model.variant='gemma_3b'")
  assert sorted(os.listdir(workdir / 'checkpoints')) == before
  r = helpers.run_main(workdir, '--config.lora.rank=4')
  assert r.returncode != 0
  assert 'holds a run with config.lora.rank=0' in r.stderr.strip().splitlines()[-1]
  assert sorted(os.listdir(workdir / 'checkpoints')) == before
  fresh = tmp_path / 'never'
  r = helpers.run_main(fresh, '--config.train.batch_size=12')
  assert r.returncode != 0 and not fresh.exists()


@pytest.mark.slow
def test_typo_in_override_is_one_line(tmp_path):
  r = helpers.run_main(tmp_path / 'wd', '--config.train.num_stepz=3')
  assert r.returncode != 0
  assert r.stderr.strip().splitlines() == [
      "error: --config.train.num_stepz: the config has no field 'num_stepz'; did you mean "
      "'num_steps'?"]
  assert not (tmp_path / 'wd').exists()


@pytest.mark.slow
def test_second_run_compiles_nothing_new(tmp_path):
  """The persistent compilation cache: a rerun finds every program already built."""
  cache = tmp_path / 'cache'
  flags = ('--config.train.num_steps=2', f'--config.runtime.compilation_cache={cache}',
           '--config.eval.decode_examples=0', '--config.train.eval_at_start=False')
  r = helpers.run_main(tmp_path / 'a', *flags)
  assert r.returncode == 0, r.stderr[-3000:]
  entries = set(os.listdir(cache))
  assert entries
  r = helpers.run_main(tmp_path / 'b', *flags)
  assert r.returncode == 0, r.stderr[-3000:]
  assert set(os.listdir(cache)) == entries
  startup = [row for row in _metrics(tmp_path / 'b') if 'compile_time' in row]
  assert len(startup) == 1 and startup[0]['time_to_first_step'] > 0


def _finite(tree) -> bool:
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


@pytest.mark.slow
def test_nan_stops_the_run_and_nothing_nan_is_saved(tmp_path):
  """A diverging run ends with one error line; no checkpoint holds a NaN."""
  wd = tmp_path / 'wd'
  r = helpers.run_main(wd, '--config.train.num_steps=40', '--config.optim.learning_rate=3e3',
                       '--config.optim.clip_norm=0', '--config.optim.warmup_steps=0',
                       '--config.train.log_every=1', '--config.train.eval_every=1000',
                       '--config.train.checkpoint_every=1000', '--config.eval.decode_examples=0')
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'nan' in last.lower(), r.stderr[-3000:]
  for parent in ('checkpoints', 'best'):
    for step in (wd / parent).glob('[0-9]*'):
      assert _finite(helpers.restore_numpy(str(step / 'state'))), step


@pytest.mark.slow
def test_gemma3_variant_trains_through_main(tmp_path):
  """tiny_gemma3: sliding-window and global layers, qk-norm, two RoPE bases."""
  wd = tmp_path / 'wd'
  # Twice the tiny model's layers: its compile alone took 222 s on a loaded 2-core machine.
  r = helpers.run_main(wd, '--config.model.variant=tiny_gemma3', '--config.train.num_steps=16',
                       '--config.train.eval_every=16', '--config.train.checkpoint_every=16',
                       '--config.train.log_every=4', '--config.train.eval_at_start=False',
                       '--config.optim.warmup_steps=4', '--config.eval.decode_examples=4',
                       timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = _metrics(wd)
  losses = [row['loss'] for row in rows if 'loss' in row]
  assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
  (last_eval,) = [row for row in rows if 'eval_loss' in row]
  assert last_eval['step'] == 16 and 'eval_bleu' in last_eval
  with open(wd / 'config.json') as f:
    assert json.load(f)['model']['variant'] == 'tiny_gemma3'
  params = helpers.restore_numpy(str(wd / 'checkpoints' / '16' / 'state'))['params']
  assert '_query_norm' in params['layer_0']['attn'] and _finite(params)
