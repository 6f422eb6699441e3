"""config.optim: the schedule's shape, SGD's update, and which weights decay."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtnt_tpu import optim


def _cfg(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      name='adamw', learning_rate=1e-3, warmup_steps=10, end_learning_rate_ratio=0.1,
      b1=0.9, b2=0.999, weight_decay=0.0, momentum=0.0, clip_norm=0.0))
  c.update(overrides)
  return c


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_end_ratio():
  lr = optim.schedule(_cfg(), num_steps=110)
  at = lambda s: float(lr(s))
  assert at(0) == 0.0
  assert at(5) == pytest.approx(0.5e-3)
  assert at(10) == pytest.approx(1e-3)
  # Cosine from the peak at step 10 to peak * 0.1 at step 110: halfway is the mean.
  assert at(60) == pytest.approx(0.55e-3)
  assert at(35) == pytest.approx(1e-4 + 0.9e-3 * (1 + np.cos(np.pi / 4)) / 2)
  assert at(110) == pytest.approx(1e-4)
  after = [at(s) for s in range(10, 111)]
  assert all(a >= b for a, b in zip(after, after[1:]))


def test_schedule_with_fewer_steps_than_warmup_still_reaches_the_peak():
  lr = optim.schedule(_cfg(warmup_steps=100), num_steps=5)
  assert float(lr(4)) == pytest.approx(1e-3)


def _one_update(cfg, params, grads, steps=1):
  opt, _ = optim.make(cfg, num_steps=100)
  state = opt.init(params)
  updates = None
  for _ in range(steps):
    updates, state = opt.update(grads, state, params)
  return updates


def test_sgd_steps_against_the_gradient():
  params = {'w': jnp.array([1.0, -2.0])}
  grads = {'w': jnp.array([0.5, 0.25])}
  cfg = _cfg(name='sgd', warmup_steps=0, learning_rate=0.1)
  np.testing.assert_allclose(_one_update(cfg, params, grads)['w'], [-0.05, -0.025], rtol=1e-6)
  # Momentum 0.9: the second update is lr(1) * (g + 0.9 g).
  cfg = _cfg(name='sgd', warmup_steps=0, learning_rate=0.1, momentum=0.9)
  lr1 = float(optim.schedule(cfg, 100)(1))
  np.testing.assert_allclose(_one_update(cfg, params, grads, steps=2)['w'],
                             -lr1 * 1.9 * np.array([0.5, 0.25]), rtol=1e-5)


def test_unknown_optimizer_names_the_choices():
  with pytest.raises(ValueError, match="config.optim.name='lion'.*'adamw' or 'sgd'"):
    optim.make(_cfg(name='lion'), 10)


@pytest.mark.slow
def test_weight_decay_skips_norm_scales_only():
  params = {'layer_0': {'attn': {'q_einsum': {'w': jnp.ones((2, 3))}},
                        'pre_attention_norm': {'scale': jnp.ones(3)}},
            'embedder': {'input_embedding': jnp.ones((4, 3))},
            'final_norm': {'scale': jnp.ones(3)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  cfg = _cfg(warmup_steps=0, weight_decay=0.5)
  lr0 = float(optim.schedule(cfg, 100)(0))
  # Zero gradients: AdamW's whole update is the decay, -lr * wd * param.
  updates = _one_update(cfg, params, zeros)
  flat = {jax.tree_util.keystr(k, simple=True, separator='/'): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(updates)}
  decayed = {k for k, v in flat.items() if np.any(v != 0)}
  assert decayed == {'layer_0/attn/q_einsum/w', 'embedder/input_embedding'}
  np.testing.assert_allclose(flat['embedder/input_embedding'], -lr0 * 0.5, rtol=1e-6)
