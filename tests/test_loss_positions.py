"""config.model.loss_positions: logits only at target positions, with exactly the sums and
gradients of every position; a frozen unembedding table gets no gradient work at all."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtnt_tpu import model as model_lib
from mtnt_tpu import steps
from mtnt_tpu import train
from tests import helpers

B, L, VOCAB = 4, 32, 300


def _batch(target_fraction: float) -> dict:
  rng = np.random.default_rng(0)
  seg = np.ones((B, L), np.int32)
  seg[:, L // 2:] = 2
  seg[1, -5:] = 0
  pos = np.concatenate([np.arange(L // 2)] * 2)[None].repeat(B, 0).astype(np.int32)
  # Targets at the end of each packed example, like a prompt followed by its answer.
  mask = np.zeros((B, L), np.int32)
  n = int(target_fraction * L // 2)
  mask[:, L // 2 - n:L // 2] = 1
  mask[:, L - n:] = 1
  mask &= seg > 0
  return {'inputs': rng.integers(0, VOCAB, (B, L), dtype=np.int32), 'positions': pos,
          'segment_ids': seg, 'targets': rng.integers(0, VOCAB, (B, L), dtype=np.int32),
          'mask': mask}


@pytest.fixture(scope='module')
def tiny():
  cfg = model_lib.build_config('tiny', VOCAB)
  model = model_lib.make_model(cfg)
  return model, model_lib.init_params(model, jax.random.key(1))


@pytest.mark.parametrize('target_fraction, loss_positions', [
    (0.5, 0.75),  # every row fits: logits at 24 of 32 positions
    (0.5, 0.25),  # rows hold more targets than 8 slots: every position, same sums
])
@pytest.mark.slow
def test_sums_and_gradients_equal_every_position(tiny, target_fraction, loss_positions):
  model, params = tiny
  batch = _batch(target_fraction)

  def f(p, positions):
    s = steps.token_sums(model, p, batch, jnp.float32, loss_chunk=32, loss_positions=positions)
    return s['loss_sum'], s
  (_, want), g_want = jax.value_and_grad(f, has_aux=True)(params, 0.0)
  (_, got), g_got = jax.value_and_grad(f, has_aux=True)(params, loss_positions)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))


def test_capacity_rounds_up_to_eight_and_never_passes_the_row():
  assert steps.target_capacity(128, 0.6) == 80
  assert steps.target_capacity(128, 0.75) == 96
  assert steps.target_capacity(20, 1.0) == 20


def test_a_frozen_table_gets_no_gradient_work():
  cfg = model_lib.build_config('tiny', 4096)
  sums = functools.partial(steps.chunked_sums, cfg, jnp.float32, 64)
  x_BLD = jnp.ones((B, L, 128), jnp.float32)
  w_VD = jnp.ones((4096, 128), jnp.float32) * 0.01
  t_BL = jnp.zeros((B, L), jnp.int32)
  m_BL = jnp.ones((B, L), jnp.float32)
  both = jax.jit(jax.grad(lambda x, w: sums(x, w, t_BL, m_BL)[0], argnums=(0, 1)))
  only_x = jax.jit(jax.grad(lambda x: sums(x, w_VD, t_BL, m_BL)[0]))
  flops_both = both.lower(x_BLD, w_VD).compile().cost_analysis()['flops']
  flops_x = only_x.lower(x_BLD).compile().cost_analysis()['flops']
  # The unembedding is 2 of its 3 [T, V, D] matmuls without the table's gradient.
  assert flops_x < 0.75 * flops_both, (flops_x, flops_both)
  np.testing.assert_allclose(only_x(x_BLD), both(x_BLD, w_VD)[0], rtol=1e-6)


def test_bad_loss_positions_are_one_line():
  for value, chunk in ((1.5, 8192), (-0.1, 8192), (0.5, 0)):
    with pytest.raises(train.ConfigError, match='config.model.loss_positions') as e:
      train.build(helpers.tiny_config(**{'model.loss_positions': value,
                                         'model.loss_chunk': chunk}))
    assert '\n' not in str(e.value)
