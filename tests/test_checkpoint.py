"""checkpoint.Checkpoints: which steps are kept, and which one is the best."""

import jax.numpy as jnp
import numpy as np
import pytest

from mtnt_tpu import checkpoint


def _state(step: int) -> dict:
  return {'params': {'w': jnp.full((4,), float(step))}, 'step': jnp.asarray(step)}


def test_only_the_last_keep_checkpoints_stay(tmp_path):
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=2, async_save=False)
  for step in (5, 10, 15, 20):
    ckpts.save(step, _state(step), None)
  ckpts.wait()
  assert ckpts.all_steps() == [15, 20] and ckpts.latest_step() == 20
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['15', '20']
  restored = ckpts.restore(15, _state(0), None)
  np.testing.assert_array_equal(restored['params']['w'], np.full(4, 15.0))
  ckpts.close()


@pytest.mark.parametrize('mode,scores,best', [
    ('min', {1: 3.0, 2: 1.0, 3: 2.0}, 2),  # the lowest eval loss, not the latest
    ('max', {1: 3.0, 2: 1.0, 3: 2.0}, 1),
])
def test_best_follows_best_mode(tmp_path, mode, scores, best):
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=3, best_metric='eval_loss', best_mode=mode,
                                 async_save=False)
  for step, value in scores.items():
    ckpts.save_best(step, _state(step), {'eval_loss': value, 'eval_bleu': 0.0})
  ckpts.wait()
  assert ckpts.best_step() == best
  assert ckpts.best_value() == scores[best]
  best_params = ckpts.restore_params(best, _state(0)['params'], best=True)
  np.testing.assert_array_equal(best_params['w'], np.full(4, float(best)))
  ckpts.close()


def test_bad_best_mode_names_the_field(tmp_path):
  with pytest.raises(ValueError, match="config.eval.best_mode='lowest'"):
    checkpoint.Checkpoints(str(tmp_path), keep=1, best_mode='lowest')
