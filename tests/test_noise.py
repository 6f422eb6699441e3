"""MTNT-style noise: reproducible, of each documented kind, and exact on resume in training."""

import collections
import dataclasses
import difflib
import os
import random
import subprocess
import sys

import numpy as np

from mtnt_tpu.data import noise
from mtnt_tpu.data import pipeline
from tests import helpers

SAMPLE = os.path.join(helpers.ROOT, 'mtnt_tpu', 'data', 'sample', 'train.tsv')


def _sources(n=2000):
  with open(SAMPLE, encoding='utf-8') as f:
    return [line.split('\t')[1] for line in f.read().splitlines()[:n]]


def test_the_same_index_gets_the_same_noise_and_others_differ():
  src = _sources(200)
  a = [noise.noisy(s, 0, i) for i, s in enumerate(src)]
  assert a == [noise.noisy(s, 0, i) for i, s in enumerate(src)]
  other_seed = [noise.noisy(s, 1, i) for i, s in enumerate(src)]
  assert sum(x != y for x, y in zip(a, other_seed)) > 100
  assert sum(x != s for x, s in zip(a, src)) > 150  # most sentences get some noise


def test_each_kind_of_noise_appears_at_about_its_rate():
  src = [s for s in _sources() if s.rstrip().endswith('.')]
  out = [noise.noisy(s, 7, i) for i, s in enumerate(src)]
  n = len(src)
  kinds = collections.Counter()
  for s, o in zip(src, out):
    kinds['lowercase'] += o == o.lower() and s != s.lower()
    kinds['no_final_punct'] += not o.rstrip().endswith(('.', ')', 'D', ';)')) and not any(
        o.rstrip().endswith(e) for e in noise.EMOJI)
    kinds['emoji'] += any(e in o.split() for e in noise.EMOJI)
  # Rates from noise.Noise, with room for sampling error over ~2000 sentences.
  assert 0.25 < kinds['lowercase'] / n < 0.45, kinds
  assert 0.35 < kinds['no_final_punct'] / n < 0.75, kinds
  assert 0.15 < kinds['emoji'] / n < 0.35, kinds


def test_typos_touch_about_a_tenth_of_long_words_and_keep_the_sentence_readable():
  rng = random.Random(0)
  only_typos = noise.Noise(typo=0.1, lowercase=0, shout=0, drop_final_punct=0, emoji=0,
                           slang=0, apostrophe=0, stretch=0)
  words = changed = 0
  for s in _sources(1000):
    o = noise.noise_text(s, rng, only_typos)
    for a, b in zip(s.split(), o.split()):
      if len(a.strip('.,!?')) >= 3:
        words += 1
        changed += a != b
    assert difflib.SequenceMatcher(None, s, o).ratio() > 0.8, (s, o)
  assert 0.07 < changed / words < 0.13


def test_slang_and_contractions():
  rng = random.Random(3)
  always = noise.Noise(typo=0, lowercase=0, shout=0, drop_final_punct=0, emoji=0, slang=1,
                       apostrophe=1, stretch=0)
  assert noise.noise_text("You don't know what people want.", rng, always) == \
      'U dont know wut ppl want.'


def test_blank_lines_stay_blank():
  assert noise.noisy('', 0, 0) == '' and noise.noisy('   ', 0, 1) == '   '


def test_the_command_writes_a_noised_copy_line_for_line(tmp_path):
  src = _sources(50)
  (tmp_path / 'in.en').write_text('\n'.join(src) + '\n', encoding='utf-8')
  out = tmp_path / 'out.en'
  r = subprocess.run([sys.executable, '-m', 'mtnt_tpu.data.noise', '--input',
                      str(tmp_path / 'in.en'), '--output', str(out), '--seed', '5'],
                     cwd=helpers.ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  lines = out.read_text(encoding='utf-8').split('\n')[:-1]
  assert lines == [noise.noisy(s, 5, i) for i, s in enumerate(src)]
  assert not list(tmp_path.glob('*.tmp'))


def _stream(rate, n=4, **rates):
  cfg = helpers.tiny_config(**{'data.noise': rate},
                            **{f'data.noise_rates.{k}': v for k, v in rates.items()})
  it = iter(pipeline.train_dataset(cfg.data, cfg.tokenizer.path, 8, pipeline.HostShard(0, 1)))
  return it, [next(it) for _ in range(n)]


def test_training_noise_changes_sources_and_resumes_exactly():
  _, clean = _stream(0.0)
  it, noisy = _stream(1.0, 2)
  assert any(not np.array_equal(a['inputs'], b['inputs']) for a, b in zip(clean, noisy))
  # Only sources are noised: each example keeps its target tokens. (Packing
  # moves examples between rows, since noised sources change lengths.)
  def targets(batches):
    out = {}
    for b in batches:
      for idx in np.unique(b['index'][b['mask'] > 0]):
        out[int(idx)] = b['targets'][(b['index'] == idx) & (b['mask'] > 0)].tolist()
    return out
  a, b = targets(clean), targets(noisy)
  common = set(a) & set(b)
  assert len(common) > len(b) // 2
  assert all(a[i] == b[i] for i in common)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  resumed, _ = _stream(1.0, 0)
  resumed.set_state(state)
  for a, b in zip(want, [next(resumed) for _ in range(2)]):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])


def test_training_noise_uses_the_configured_rates():
  _, clean = _stream(0.0, 2)
  none = {f.name: 0.0 for f in dataclasses.fields(noise.Noise)}
  _, none_of_each = _stream(1.0, 2, **none)
  for a, b in zip(clean, none_of_each):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
  _, typos_only = _stream(1.0, 2, **{**none, 'typo': 0.5})
  assert any(not np.array_equal(a['inputs'], b['inputs']) for a, b in zip(clean, typos_only))


def test_the_command_can_noise_one_kind_only(tmp_path):
  src = _sources(200)
  (tmp_path / 'in.en').write_text('\n'.join(src) + '\n', encoding='utf-8')
  r = subprocess.run([sys.executable, '-m', 'mtnt_tpu.data.noise', '--input',
                      str(tmp_path / 'in.en'), '--output', str(tmp_path / 'out.en'),
                      '--only', 'typo'], capture_output=True, text=True, cwd=helpers.ROOT)
  assert r.returncode == 0, r.stderr
  lines = (tmp_path / 'out.en').read_text(encoding='utf-8').splitlines()
  assert lines == [noise.noisy(s, 0, i, noise.only(['typo'])) for i, s in enumerate(src)]
  # Typos only: no casing, punctuation, emoji or slang changes, so the words line up.
  assert sum(a != b for a, b in zip(lines, src)) > 50
  assert all(len(a.split()) == len(b.split()) and a[-1:] == b[-1:] for a, b in zip(lines, src))
  r = subprocess.run([sys.executable, '-m', 'mtnt_tpu.data.noise', '--input',
                      str(tmp_path / 'in.en'), '--output', '-', '--only', 'typos'],
                     capture_output=True, text=True, cwd=helpers.ROOT)
  assert r.returncode != 0
  assert r.stderr.strip().splitlines() == [
      'error: --only=typos: typos is not a kind of noise; use some of '
      'typo,lowercase,shout,drop_final_punct,emoji,slang,apostrophe,stretch']
