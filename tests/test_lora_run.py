"""LoRA end to end: adapters on an exported base, resume, translate, export --merge."""

import json
import os
import pathlib
import shutil

import flax
import jax
import pytest

from mtnt_tpu import export
from mtnt_tpu import metrics
from mtnt_tpu import workdir as workdir_lib
from tests import helpers
from tests import trained_run

pytestmark = pytest.mark.slow  # needs the shared trained run


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """A 100-step full run exported as a base, then 20 LoRA steps on it."""
  full = trained_run.workdir(tmp_path_factory)
  root = tmp_path_factory.mktemp('lora')
  base_dir = root / 'base'
  base = pathlib.Path(export.export(str(full), str(base_dir)))
  wd = root / 'wd'
  flags = ('--config.lora.rank=4', f'--config.model.checkpoint={base}',
           '--config.train.num_steps=20', '--config.train.eval_every=10',
           '--config.train.checkpoint_every=10', '--config.train.log_every=5',
           '--config.optim.learning_rate=1e-3')
  r = helpers.run_main(wd, *flags)
  assert r.returncode == 0, r.stderr[-3000:]
  return full, base, wd, flags


def _rows(wd):
  return metrics.read(wd)


def test_lora_starts_from_the_base_and_trains_only_adapters(lora_run):
  full, base, wd, _ = lora_run
  first = [r for r in _rows(wd) if 'eval_loss' in r][0]
  exported = json.loads((base.parent / export.MANIFEST).read_text())['step']
  (full_eval,) = [r for r in _rows(full) if 'eval_loss' in r and r['step'] == exported]
  # Zero-initialised B: step 0 of the LoRA run is the exported model itself.
  assert first['step'] == 0
  assert first['eval_loss'] == pytest.approx(full_eval['eval_loss'], abs=1e-4)
  state = helpers.restore_numpy(str(wd / 'checkpoints' / '20' / 'state'))
  paths = flax.traverse_util.flatten_dict(state['params'], sep='/')
  assert paths and all('lora' in p for p in paths)
  opt_paths = [jax.tree_util.keystr(k) for k, _ in
               jax.tree_util.tree_flatten_with_path(state['opt_state'])[0]]
  layer_paths = [p for p in opt_paths if 'layer_' in p]
  assert layer_paths and all('lora' in p for p in layer_paths)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
             os.walk(wd / 'checkpoints' / '20') for f in fs)
  base_size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                  os.walk(full / 'checkpoints' / '100') for f in fs)
  assert size < base_size / 2, 'a LoRA checkpoint holds only what changes'


def test_lora_run_resumes(lora_run):
  _, _, wd, flags = lora_run
  r = helpers.run_main(wd, *flags[:-4], '--config.train.num_steps=25',
                       '--config.train.eval_every=1000', '--config.train.log_every=5',
                       '--config.optim.learning_rate=1e-3')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'step 20' in r.stderr
  assert [r['step'] for r in _rows(wd) if 'loss' in r][-1] == 25


def test_translate_and_merged_export_of_a_lora_workdir(lora_run, tmp_path):
  _, _, wd, _ = lora_run
  r = trained_run.run_module('translate', '--workdir', str(wd), stdin='The cat sleeps.\n\n')
  assert r.returncode == 0, r.stderr[-3000:]
  assert len(r.stdout.split('\n')) == 3 and r.stdout.split('\n')[1] == ''
  with pytest.raises(workdir_lib.WorkdirError, match='pass --merge'):
    export.export(str(wd), str(tmp_path / 'x'))
  path = export.export(str(wd), str(tmp_path / 'merged'), merge=True)
  from gemma import params as gemma_params
  merged = gemma_params.load_and_format_params(path)['transformer']
  assert 'lora' not in json.dumps(list(flax.traverse_util.flatten_dict(merged, sep='/')))


def test_missing_base_is_named(lora_run, tmp_path):
  _, base, wd, _ = lora_run
  copy = tmp_path / 'wd'
  shutil.copytree(wd, copy)
  config = json.loads((copy / 'config.json').read_text())
  config['model']['checkpoint'] = str(tmp_path / 'gone' / 'tiny')
  (copy / 'config.json').write_text(json.dumps(config))
  r = trained_run.run_module('translate', '--workdir', str(copy), stdin='The cat.\n')
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert str(copy) in last and str(tmp_path / 'gone' / 'tiny') in last
