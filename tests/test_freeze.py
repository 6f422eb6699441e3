"""config.train.freeze: frozen parameters get no gradient, no optimizer state, no update."""

import jax
import numpy as np
import pytest

from mtnt_tpu import train

from mtnt_tpu import state as state_lib
from mtnt_tpu.data import pipeline
from tests import helpers

EMBED = 'embedder/input_embedding'


def _one_step(**overrides):
  cfg = helpers.tiny_config(**{'train.batch_size': 8, 'optim.clip_norm': 0.0,
                               'optim.warmup_steps': 0, **overrides})
  run = train.build(cfg)
  state = state_lib.init_state(run, jax.random.key(0))
  before = helpers.host(state.params)
  batch = helpers.train_batches(cfg, 1, local_batch=8)[0]
  train_step = train.compile_steps(run).train
  state, _ = train_step(state, pipeline.to_global(batch, run.batch_sharding), {})
  return before, helpers.host(state.params), state.opt_state


def _flat(tree):
  return {jax.tree_util.keystr(p, simple=True, separator='/'): v
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_frozen_params_stay_and_the_rest_train_as_without_freezing():
  before, free, _ = _one_step()
  before_f, frozen, opt_state = _one_step(**{'train.freeze': 'embedder/'})
  np.testing.assert_array_equal(before_f['embedder']['input_embedding'],
                                frozen['embedder']['input_embedding'])
  assert not np.array_equal(before['embedder']['input_embedding'],
                            free['embedder']['input_embedding'])
  # Without clipping Adam updates each parameter on its own, so freezing the
  # embedding must leave every other parameter's step exactly as it was.
  got, want = _flat(frozen), _flat(free)
  for path in want:
    if path != EMBED:
      np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-7, err_msg=path)
  moments = [p for p in _flat(opt_state) if EMBED in p]
  assert not moments, f'the optimizer keeps state for a frozen parameter: {moments}'


@pytest.mark.parametrize('freeze, words', [
    ('embedder/(', 'is not a regex'),
    ('no_such_param', 'matches no parameter'),
    ('.', 'freezes every parameter'),
])
def test_bad_freeze_patterns_are_one_line(freeze, words):
  with pytest.raises(train.ConfigError, match=words) as e:
    train.build(helpers.tiny_config(**{'train.freeze': freeze}))
  assert '\n' not in str(e.value) and 'config.train.freeze' in str(e.value)


def test_freeze_with_lora_is_refused():
  with pytest.raises(train.ConfigError, match='config.train.freeze is for full fine-tuning'):
    train.build(helpers.tiny_config(**{'train.freeze': 'embedder/', 'lora.rank': 4}))


@pytest.mark.slow
def test_a_frozen_run_checkpoints_and_resumes(tmp_path):
  flags = ['--config.train.freeze=embedder/', '--config.eval.decode_examples=0',
           '--config.train.checkpoint_every=5', '--config.train.eval_every=100']
  first = helpers.run_main(tmp_path, *flags, '--config.train.num_steps=5')
  assert first.returncode == 0, first.stderr[-2000:]
  second = helpers.run_main(tmp_path, *flags, '--config.train.num_steps=10')
  assert second.returncode == 0, second.stderr[-2000:]
  assert 'resuming from' in second.stderr
  base = helpers.restore_numpy(tmp_path / 'checkpoints' / '5' / 'state')
  last = helpers.restore_numpy(tmp_path / 'checkpoints' / '10' / 'state')
  np.testing.assert_array_equal(base['params']['embedder']['input_embedding'],
                                last['params']['embedder']['input_embedding'])


def test_frozen_parameters_count_four_flops_per_token_not_six():
  from mtnt_tpu import flops
  run = train.build(helpers.tiny_config(**{'train.freeze': 'embedder/'}))
  frozen = run.freeze.count(run.abstract_params)
  assert frozen == run.abstract_params['embedder']['input_embedding'].size
  total = sum(x.size for x in jax.tree.leaves(run.abstract_params))
  full = flops.per_token(total, 2, 4, 32, 64)
  assert flops.per_token(total, 2, 4, 32, 64, frozen_params=frozen) == full - 2 * frozen
