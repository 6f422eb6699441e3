"""`python -m mtnt_tpu.translate` as a user runs it, on the shared tiny run."""

import re

import pytest

from mtnt_tpu import evaluate
from mtnt_tpu import workdir as workdir_lib
from tests import helpers
from tests import trained_run

pytestmark = pytest.mark.slow  # needs the shared trained run


@pytest.fixture(scope='module')
def translated(tmp_path_factory):
  """The CLI on the best step's logged eval sources, with empty lines mixed in."""
  wd = trained_run.workdir(tmp_path_factory)
  best = sorted(p.name for p in (wd / 'best').iterdir() if p.name.isdigit())
  assert len(best) == 1
  samples = evaluate.read_samples(wd / 'samples' / f'step_{best[0]}.txt')
  lines = [s.source for s in samples]
  lines[3:3] = ['', '   ']
  refs = [s.reference for s in samples]
  refs[3:3] = ['', '']
  tmp = tmp_path_factory.mktemp('translate')
  (tmp / 'refs.txt').write_text('\n'.join(refs) + '\n')
  r = trained_run.run_module('translate', '--workdir', str(wd), '--batch_size', '8',
                             '--reference', str(tmp / 'refs.txt'),
                             stdin='\n'.join(lines) + '\n')
  assert r.returncode == 0, r.stderr[-3000:]
  return wd, int(best[0]), samples, lines, r


def test_translate_reproduces_the_eval_hypotheses_of_its_checkpoint(translated):
  _, best, samples, lines, r = translated
  assert f'with step {best} from' in r.stderr
  out = r.stdout.split('\n')
  assert out[-1] == '' and len(out) - 1 == len(lines)
  out = out[:-1]
  del out[3:5]
  assert out == [s.hypothesis for s in samples]


def test_empty_lines_stay_empty_and_line_counts_match(translated):
  _, _, _, _, r = translated
  out = r.stdout.split('\n')
  assert out[3] == '' and out[4] == ''
  assert f'translated {len(out) - 1}/{len(out) - 1} lines' in r.stderr


def test_reference_prints_bleu_and_chrf(translated):
  _, _, _, _, r = translated
  assert re.search(r'^BLEU \d+\.\d\d \(nrefs:1\|', r.stderr, re.M)
  assert re.search(r'^chrF \d+\.\d\d \(nrefs:1\|', r.stderr, re.M)


def test_missing_workdir_is_one_clear_line(tmp_path):
  r = trained_run.run_module('translate', '--workdir', str(tmp_path / 'nope'), stdin='Hi.\n')
  assert r.returncode != 0 and r.stdout == ''
  assert r.stderr.strip().splitlines()[-1].startswith(
      f'error: --workdir {tmp_path / "nope"} does not exist')


def test_workdir_without_config_or_checkpoint_names_the_fix(tmp_path, translated):
  with pytest.raises(workdir_lib.WorkdirError, match='config.json is missing'):
    workdir_lib.load_config(str(tmp_path))
  wd = translated[0]
  (tmp_path / 'config.json').write_text((wd / 'config.json').read_text())
  config = workdir_lib.load_config(str(tmp_path))
  assert config.model.variant == 'tiny'
  with pytest.raises(workdir_lib.WorkdirError, match='holds no checkpoint.*train first'):
    workdir_lib.restore(str(tmp_path), config)
  with pytest.raises(workdir_lib.WorkdirError, match=r'no checkpoint of step 7 .*have: 50, 100'):
    workdir_lib.restore(str(wd), workdir_lib.load_config(str(wd)), step=7)


def test_config_json_round_trips(translated):
  """The workdir gives back the very config it was trained with, tuples and all."""
  wd = translated[0]
  config = workdir_lib.load_config(str(wd))
  assert config.to_dict() == helpers.tiny_config(**trained_run.OVERRIDES).to_dict()
